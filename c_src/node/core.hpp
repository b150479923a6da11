// The node: connections to other nodes, local processes (mailboxes), monitors and links,
// and the execution of spawn requests (erpc/rpc calls) in Python.
//
// Threads: one acceptor; one reader per connection (it also runs the spawn requests it
// reads, inline: no thread hand-off on the latency path); a watchdog that gives a
// connection a new reader when its reader has been inside Python for too long, so a slow
// handler never stalls the node; a ticker (ticks, silent peers). Python threads call in
// through module.cpp.
//
// Locks: Core::mu_ (tables), Process::mu (one mailbox), Connection::wmu (writes). The GIL
// is never taken while one of them is held, and the GIL is released before a thread
// waits on a socket write or a mailbox.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "etf/term.hpp"
#include "py/buffer.hpp"
#include "py/codec.hpp"
#include "py/ref.hpp"
#include "wire.hpp"

struct iovec;

namespace erpy::node {

using Bytes = std::vector<std::uint8_t>;

// An etf Sink appending to Bytes (etf::GrowSink's range insert trips GCC 12's
// -Warray-bounds on constant-size writes).
struct BytesSink {
  Bytes& out;
  void byte(std::uint8_t b) { out.push_back(b); }
  void write(const void* src, std::size_t n) {
    const auto* s = static_cast<const std::uint8_t*>(src);
    for (std::size_t i = 0; i < n; ++i) out.push_back(s[i]);
  }
};

// Control message operations (erts/doc "Distribution Protocol").
enum Op : int {
  kLink = 1, kSend = 2, kExit = 3, kUnlink = 4, kRegSend = 6, kGroupLeader = 7, kExit2 = 8,
  kSendTT = 12, kExitTT = 13, kRegSendTT = 16, kExit2TT = 18, kMonitorP = 19,
  kDemonitorP = 20, kMonitorPExit = 21, kSendSender = 22, kSendSenderTT = 23,
  kPayloadExit = 24, kPayloadExitTT = 25, kPayloadExit2 = 26, kPayloadExit2TT = 27,
  kPayloadMonitorPExit = 28, kSpawnRequest = 29, kSpawnRequestTT = 30, kSpawnReply = 31,
  kSpawnReplyTT = 32, kAliasSend = 33, kAliasSendTT = 34, kUnlinkId = 35, kUnlinkIdAck = 36,
};

// Pids, references and reasons are kept in their canonical encoding (no version byte):
// compared byte for byte and written back as they are.
struct Watch {
  std::string node;  // the other process's node
  // Incoming monitor: the watcher's pid. Outgoing: what we monitor as we named it in
  // MONITOR_P (a pid or a registered name), for DEMONITOR_P.
  Bytes watcher;
  Bytes ref;     // monitor reference
  // Incoming: what it monitors as it named it (our pid or our registered name), the
  // sender of MONITOR_P_EXIT. Outgoing: the object of our 'DOWN' message.
  Bytes target;
};

struct Process {
  std::uint32_t id = 0;
  Bytes pid;  // encoded
  std::string name;  // registered name, or empty
  bool sink = false;  // a system process whose messages are dropped

  std::mutex mu;
  std::condition_variable cv;
  std::deque<Bytes> queue;  // each message with its version byte
  std::size_t queued_bytes = 0;  // of the messages in queue
  bool closed = false;
  std::vector<Watch> monitors;      // remote processes monitoring this one
  std::vector<Watch> out_monitors;  // monitors this process holds (node, ref, target)
  std::vector<std::pair<std::string, Bytes>> links;  // (node, remote pid)

  // The oldest message (queue not empty; mu held).
  Bytes pop() {
    Bytes m = std::move(queue.front());
    queue.pop_front();
    queued_bytes -= m.size();
    return m;
  }
};

class Core;

struct Connection {
  Fd fd;
  Peer peer;
  std::mutex wmu;
  std::atomic<bool> up{true};
  std::atomic<std::int64_t> last_read{0}, last_write{0};

  // Reader role: only the thread holding the current token reads.
  std::atomic<std::uint64_t> reader_token{0};
  std::atomic<std::int64_t> busy_since{0};  // ns, 0 when no Python job runs
  // The read buffer, never zero-filled: a large message is read straight into it, and a
  // spawn request may take it over whole (its arguments are then not copied).
  std::unique_ptr<std::uint8_t[]> rbuf;
  std::size_t rcap = 0, rpos = 0, rend = 0;
  // Processes given messages from the bytes read so far; woken once per read, not per
  // message (a burst of sends costs one wake-up).
  std::vector<std::shared_ptr<Process>> wake;
  int batch_messages = 0;  // messages delivered from the bytes of the current read
  bool has_frame() const;
  Reassembler frames;   // headers, fragments, inbound limits
  std::size_t skip = 0;  // bytes of a refused frame still to be read and dropped

  void send(const std::uint8_t* data, std::size_t n);
  void sendv(struct iovec* iov, int n);
  void shutdown() noexcept;
};

struct Options {
  std::string name;  // name@host
  std::string cookie;
  std::string listen_host = "127.0.0.1";
  int port = 0;
  bool hidden = true;
  int ticktime = 60;
  int slow_ms = 5;  // a reader inside Python longer than this is replaced
  int spin_us = 0;  // a reader polls its socket this long before sleeping in recv (0: off)
  int workers = 8;  // threads that run calls arriving while others are waiting to be read
  // When one read brought several messages (a stream), wait this long before the next
  // read so that it brings many: one wake-up per batch instead of per message.
  int coalesce_us = 200;
  InLimits in;  // what one connection may make us hold (max_message_size ...)
  // What one process (mailbox) may be made to hold: a message to a mailbox that already
  // holds max_queued messages or max_queued_bytes bytes is dropped (so a mailbox holds at
  // most max_queued_bytes plus one message); a monitor or link from another node beyond
  // max_queued of them is refused with system_limit.
  std::size_t max_queued = 100000;
  std::size_t max_queued_bytes = std::size_t{1} << 30;
};

// One frame under construction: [len:32][131 68 0][control][payload]. With
// DFLAG_FRAGMENTS negotiated OTP expects a distribution header on every message (not the
// pass-through 'p' form); ours has no atom cache references, and the terms after a
// distribution header carry no version byte.
inline constexpr bool kPayloadMagic = false;
class Frame {
 public:
  explicit Frame(py::ByteBuffer& b) : b_(b), start_(b.size()) {
    static const std::uint8_t head[7] = {0, 0, 0, 0, 131, 68, 0};
    b_.write(head, sizeof head);
  }
  py::ByteBuffer& buf() { return b_; }
  void payload() {
    if (kPayloadMagic) b_.byte(131);
  }
  // Patches the length; `extra` counts bytes sent after this buffer (an iovec tail).
  void end(std::size_t extra = 0) {
    const std::size_t n = b_.size() - start_ - 4 + extra;
    std::uint8_t* p = b_.data() + start_;
    p[0] = static_cast<std::uint8_t>(n >> 24);
    p[1] = static_cast<std::uint8_t>(n >> 16);
    p[2] = static_cast<std::uint8_t>(n >> 8);
    p[3] = static_cast<std::uint8_t>(n);
  }

 private:
  py::ByteBuffer& b_;
  std::size_t start_;
};

// A control message with no payload: {Op, Parts...}, each part an encoded term
// (MONITOR_P, DEMONITOR_P, LINK).
py::ByteBuffer control_frame(int op, std::initializer_list<const Bytes*> parts);

class Core : public std::enable_shared_from_this<Core> {
 public:
  Core(Options o, py::Codec& codec, PyObject* resolver, PyObject* error_formatter);
  ~Core();

  // Listens, registers at EPMD, starts the threads. Without the GIL.
  void start();
  // Closes everything and joins the threads. Without the GIL.
  void stop();

  const std::string& name() const { return self_.name; }
  std::uint32_t creation() const { return self_.creation; }
  int port() const { return port_; }
  py::Codec& codec() { return codec_; }

  std::shared_ptr<Process> new_process();
  std::shared_ptr<Process> system_process() { return system_; }
  bool register_name(const std::string& name, const std::shared_ptr<Process>& p);
  void unregister_name(const std::string& name);
  std::shared_ptr<Process> whereis(const std::string& name);
  std::shared_ptr<Process> find(std::uint32_t id);
  // Ends a process: DOWN to its monitors, EXIT to its links. `reason` encoded, no version.
  void exit_process(const std::shared_ptr<Process>& p, const Bytes& reason);

  Bytes make_ref();
  Bytes encode_pid(std::uint32_t id) const;
  bool is_local(std::string_view node) const { return node == self_.name; }

  // The connection to `node`, connecting if needed (blocks: call without the GIL).
  std::shared_ptr<Connection> connection(const std::string& node);
  std::shared_ptr<Connection> existing(const std::string& node);
  std::vector<std::string> nodes();

  // Puts a message (version byte included) into a local process's mailbox. With `batch`
  // the wake-up waits for batch->wake to be flushed.
  void deliver(const std::shared_ptr<Process>& p, Bytes msg, Connection* batch = nullptr);
  void record_out_monitor(const std::shared_ptr<Process>& p, Watch w);
  void drop_out_monitor(const std::shared_ptr<Process>& p, const Bytes& ref);
  void add_link(const std::shared_ptr<Process>& p, const std::string& node, const Bytes& pid);
  void remove_link(const std::shared_ptr<Process>& p, const Bytes& pid);

  // Forgets cached handler lookups (after the allow-list changed). With the GIL.
  void clear_cache() { fn_cache_.clear(); }

  // From inside a call Erlang made (erpy.service): the largest result, in bytes of
  // external format, this call may return; a larger one is refused with
  // {message_too_large, Size, Max}. 0: no limit. With `binary` the result (or the error
  // map) goes back as its ETF in a binary, so that the caller decodes it under its own
  // rules (no atoms are made by the distribution layer). Applies to the calling thread's
  // current call only.
  static void set_result_limit(std::size_t max, bool binary = false);

  // The calling thread is about to wait for a message (a mailbox receive, with the GIL
  // released). If it is a connection's reader running a call inline, another thread
  // takes over reading now, so the answer it waits for can be read.
  void yield_reader();

  // While a call's thread waits in a mailbox (`p`): the call's cancellation (its caller
  // gave up) wakes it. cancelled() tells whether the call running on this thread was
  // cancelled; false outside calls.
  class WaitScope {
   public:
    explicit WaitScope(const std::shared_ptr<Process>& p);
    ~WaitScope();
    WaitScope(const WaitScope&) = delete;
    WaitScope& operator=(const WaitScope&) = delete;
    bool cancelled() const;
  };

  // Interrupts the call started by spawn request `req` (encoded, no version byte): for a
  // caller whose node abandoned the request before our SPAWN_REPLY reached it, so that it
  // will never send DEMONITOR_P (erpy_node_pool tells us itself).
  void cancel_request(const Bytes& req);

  // Counters for tests and benchmarks.
  // dropped: messages, monitors and links a process had no room for (max_queued ...).
  std::atomic<std::uint64_t> calls{0}, messages{0}, handovers{0}, refused{0}, dropped{0};

 private:
  void acceptor();
  void ticker();
  void watchdog();
  void start_reader(const std::shared_ptr<Connection>& c);
  void reader(std::shared_ptr<Connection> c, std::uint64_t token);
  void add_connection(const std::shared_ptr<Connection>& c);
  void connection_down(const std::shared_ptr<Connection>& c);
  // The next frame, or its start when it is over the limit (`full`: its length).
  void next_frame(Connection& c, std::uint8_t*& data, std::size_t& len, std::size_t& full);
  // A message refused by the connection's limits: logged, and a spawn request answered.
  void handle_refused(const std::shared_ptr<Connection>& c, const Incoming& in);
  // Answers spawn request `req` with a process that ends at once with `reason`.
  void end_spawn(Connection& c, const Bytes& req, const Bytes& from, bool monitor, bool link,
                 const Bytes& reason);
  // `owner`: a buffer holding `msg` that a spawn request may take over, or null.
  void handle_message(const std::shared_ptr<Connection>& c, etf::Bytes msg,
                      std::span<const std::string> cache, std::uint64_t token, Bytes* owner);
  void handle_spawn(const std::shared_ptr<Connection>& c, const etf::Tuple& ctl,
                    etf::Bytes payload, std::uint64_t token, Bytes* owner);
  static void flush_wake(Connection& c);
  void handle_net_kernel(const std::shared_ptr<Connection>& c, const Bytes& from, etf::Bytes payload);
  void send_exit_signal(const std::string& node, int op, const Bytes& from, const Bytes& to,
                        const Bytes* ref, const Bytes& reason);
  void wake_watchdog();
  // Counts and logs (at most once a second) what a full process did not take: `what` is
  // "message", "monitor" or "link"; `held` how many of them it has.
  void note_dropped(const Process& p, const char* what, std::size_t held, std::size_t bytes);
  std::atomic<std::int64_t> last_drop_log_{0};

  struct Job;
  // A call in progress (a spawned "process" of ours). Its SPAWN_REPLY goes out with its
  // exit unless the call is slow: then the watchdog sends it early, so that the caller's
  // node can tell us when the caller gives up (DEMONITOR_P on a timeout or the caller's
  // death, an exit signal through a link) and the call is interrupted (KeyboardInterrupt
  // in its thread, re-sent until it stops).
  struct Running {
    Connection* conn = nullptr;   // valid while the job is in running_
    Bytes reply;                  // the SPAWN_REPLY frame
    Bytes req;                    // the spawn request id: the caller's monitor reference
    bool monitor = false, link = false;
    std::int64_t started = 0;
    std::mutex mu;                // serializes the writes of this job; guards finished
    std::atomic<bool> replied{false};  // written under mu
    bool finished = false;
    std::atomic<bool> cancelled{false};
    Bytes cancel_reason;          // an exit signal's reason, under mu; empty for a demonitor
    // Under the GIL: the Python thread running the call, and whether Python is done.
    unsigned long tid = 0;
    bool py_done = false;
    std::shared_ptr<Process> waiting;  // a mailbox its thread waits in (WaitScope), under mu
  };
  static thread_local Running* current_run_;  // the call run_job runs on this thread
  // The connection this thread reads and runs a call of inline (yield_reader).
  static thread_local Connection* inline_conn_;
  static thread_local std::uint64_t inline_token_;
  void run_job(Connection& c, Job& job);
  // The caller gave up on job `id` (demonitor with `ref`, or an exit signal `reason`).
  bool cancel_job(std::uint32_t id, const Bytes* ref, const Bytes* reason);
  // Watchdog: early replies for slow jobs, interrupts for cancelled ones. Without locks.
  bool tend_jobs(std::int64_t now);
  std::mutex run_mu_;
  std::unordered_map<std::uint32_t, std::shared_ptr<Running>> running_;
  std::deque<Bytes> cancelled_reqs_;  // under run_mu_
  // Hands a job to a worker thread; false if there is none to take it.
  bool dispatch(const std::shared_ptr<Connection>& c, Job& job);
  void worker();
  struct Queued {
    std::shared_ptr<Connection> conn;
    std::unique_ptr<Job> job;
    ~Queued();
    Queued(std::shared_ptr<Connection> c, std::unique_ptr<Job> j);
    Queued(Queued&&) noexcept;
  };
  std::mutex jobs_mu_;
  std::condition_variable jobs_cv_;
  std::deque<Queued> jobs_;
  int idle_workers_ = 0, workers_ = 0;
  PyObject* resolve(const std::string& module, const std::string& function);  // borrowed

  Options opt_;
  Self self_;
  py::Codec& codec_;
  py::PyRef resolver_, error_formatter_;
  std::unordered_map<std::string, py::PyRef> fn_cache_;  // guarded by the GIL

  Fd listen_fd_, epmd_fd_;
  int port_ = 0;
  std::mutex mu_;
  std::unordered_map<std::string, std::shared_ptr<Connection>> conns_;
  std::unordered_map<std::uint32_t, std::shared_ptr<Process>> procs_;
  std::unordered_map<std::string, std::shared_ptr<Process>> names_;
  std::shared_ptr<Process> system_;
  std::mutex connect_mu_;
  std::atomic<std::uint32_t> next_pid_{1};
  std::atomic<std::uint64_t> next_ref_{1};
  std::uint32_t ref_salt_ = 0;
  std::int64_t spin_ns_ = 0;

  std::atomic<bool> stopping_{false};
  // Reader and handshake threads. A reader replaced by the watchdog, or whose connection
  // closed, ends; finished threads are joined when the next one starts (a finished but
  // unjoined thread keeps its stack).
  struct Worker {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::mutex threads_mu_;
  std::vector<Worker> threads_;
  template <class F> void spawn_locked(F&& f);  // threads_mu_ held
  std::thread acceptor_, ticker_, watchdog_;
  std::mutex wd_mu_;
  std::condition_variable wd_cv_;
  std::atomic<bool> wd_idle_{true};
  std::condition_variable tick_cv_;
};

std::int64_t now_ns();

}  // namespace erpy::node
