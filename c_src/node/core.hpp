// The node: what joins its parts. It listens and connects (EPMD, handshake), reads each
// connection's frames and acts on their control messages, and keeps the threads:
//
//   connection.hpp     framing of one connection and its own send queue
//   process_table.hpp  local processes: pids, names, mailboxes, monitors and links
//   job_runner.hpp     spawn requests (rpc, erpc) run as Python calls
//
// Threads: one acceptor; one reader per connection (it also runs the spawn requests it
// reads, inline: no thread hand-off on the latency path; when such a call waits for a
// message, the reader goes on reading meanwhile, so the answer is read by the thread
// that waits for it: wait_message); a writer per connection that
// writes what a slow peer did not take yet (started when first needed); worker threads
// for calls that arrive while others wait to be read; a watchdog that gives a connection
// a new reader when its reader has been inside Python for too long, so a slow handler
// never stalls the node, and sends slow calls' replies early; a ticker (ticks, silent
// peers). Python threads call in through module.cpp.
//
// Locks: Core::mu_ (connections), the process table's, the job runner's, a connection's
// send queue. The GIL is never taken while one of them is held, no socket is written
// under any of them, and the GIL is released before a thread waits on a mailbox. wd_mu_
// (the watchdog's) is taken before Core::mu_, never while a Process's mu is held.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "connection.hpp"
#include "job_runner.hpp"
#include "process_table.hpp"
#include "protocol.hpp"
#include "tls.hpp"
#include "py/codec.hpp"
#include "py/runner.hpp"
#include "wire.hpp"

namespace erpy::node {

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
  ProcessTable::Limits procs;  // what one process may be made to hold
  // Bytes waiting for a peer that does not read them, beyond which it is disconnected.
  std::size_t max_send_queue = std::size_t{256} << 20;
  // TLS distribution (tls.hpp), both directions; null: plain TCP.
  std::shared_ptr<const TlsContext> tls;
};

class Core : public std::enable_shared_from_this<Core> {
 public:
  // `resolver(module, function)`: the callable an rpc reaches (Python, the allow-list).
  // `runner`: runs erpy.service's requests and reports every call's errors.
  Core(Options o, py::Codec& codec, py::Runner& runner, PyObject* resolver);
  ~Core();

  // Listens, registers at EPMD, starts the threads. Without the GIL.
  void start();
  // Closes everything and joins the threads. Without the GIL.
  void stop();

  const std::string& name() const { return self_.name; }
  std::uint32_t creation() const { return procs_.creation(); }
  int port() const { return port_; }
  py::Codec& codec() { return codec_; }
  ProcessTable& procs() { return procs_; }
  JobRunner& jobs() { return *jobs_; }

  std::shared_ptr<Process> new_process() { return procs_.spawn(); }
  std::shared_ptr<Process> system_process() { return system_; }
  // Ends a process: DOWN to its monitors, EXIT to its links. `reason` encoded, no version.
  void exit_process(const std::shared_ptr<Process>& p, const Bytes& reason);

  Bytes make_ref();
  bool is_local(std::string_view node) const { return node == self_.name; }

  // The connection to `node`, connecting if needed (blocks: call without the GIL).
  std::shared_ptr<Connection> connection(const std::string& node);
  std::shared_ptr<Connection> existing(const std::string& node);
  std::vector<std::string> nodes();

  // Waits (the GIL released) until `p` has a message, is closed, the call running on this
  // thread is cancelled (`scope`), or `until`. A connection's reader running a call
  // inline goes on reading its connection meanwhile: the answer the call waits for (a
  // callback's reply, an rpc's result) is read by this very thread, with no hand-off to
  // another reader and no wake-up, and every other frame is handled as the reader does
  // (calls that arrive meanwhile go to worker threads).
  void wait_message(Process& p, const JobRunner::WaitScope& scope,
                    std::chrono::steady_clock::time_point until);

  // Counters for tests and benchmarks.
  std::atomic<std::uint64_t> handovers{0}, refused{0};

 private:
  void acceptor();
  void ticker();
  void keep_registered();
  void watchdog();
  void wake_watchdog(bool force);
  // Starts a thread that stop() joins; false once the node stops.
  bool spawn(std::function<void()> f);
  template <class F> void spawn_locked(F&& f);  // threads_mu_ held
  void start_reader(const std::shared_ptr<Connection>& c);
  void reader(std::shared_ptr<Connection> c, std::uint64_t token);
  // The reader's step: reads one frame of `c` and acts on it. Throws when the connection
  // fails; reader_lost() then takes it down.
  void read_frame(const std::shared_ptr<Connection>& c, std::uint64_t token);
  void reader_lost(const std::shared_ptr<Connection>& c, std::uint64_t token, const std::exception& e);
  // wait_message() for an inline call's reader: reads `c` until `p` is ready. False when
  // this thread is not (or no longer) the reader, or `p` has such a reader already.
  bool read_while_waiting(Process& p, const JobRunner::WaitScope& scope,
                          std::chrono::steady_clock::time_point until);
  // Another thread takes over reading (the watchdog's hand-over, done by this thread).
  void yield_reader();
  std::shared_ptr<Connection> make_connection(Fd fd);
  void add_connection(const std::shared_ptr<Connection>& c);
  void connection_down(const std::shared_ptr<Connection>& c);
  // Writes what a process's end means to other nodes.
  void signal_ended(const Bytes& pid, const Ended& e, const Bytes& reason);
  void send_exit_signal(const std::string& node, int op, const Bytes& from, const Bytes& to,
                        const Bytes* ref, const Bytes& reason);

  // One control message and its payload, as read from a connection.
  struct Message;
  // `owner`: a buffer holding `msg` that a spawn request may take over, or null.
  void handle_message(const std::shared_ptr<Connection>& c, etf::Bytes msg,
                      std::span<const std::string> cache, std::uint64_t token, Bytes* owner);
  // A message refused by the connection's limits: logged, and a spawn request answered.
  void handle_refused(const std::shared_ptr<Connection>& c, const Incoming& in);
  std::shared_ptr<Process> local(const etf::Term& t);
  void on_send(Message& m);
  void on_reg_send(Message& m);
  void on_link(Message& m);
  void on_unlink_id(Message& m);
  void on_exit(Message& m);
  void on_monitor(Message& m);
  void on_demonitor(Message& m);
  void on_monitor_exit(Message& m);
  void on_spawn_request(Message& m);
  void on_spawn_reply(Message& m);
  void on_net_kernel(Connection& c, etf::Bytes payload);

  // The connection this thread reads and runs a call of inline (wait_message).
  static thread_local const std::shared_ptr<Connection>* inline_conn_;
  static thread_local std::uint64_t inline_token_;
  // This thread reads its connection while a call of its own waits: calls it reads go to
  // workers, never inline.
  static thread_local int waiting_reader_;

  Options opt_;
  Self self_;
  py::Codec& codec_;
  ProcessTable procs_;
  std::unique_ptr<JobRunner> jobs_;

  Fd listen_fd_, epmd_fd_;
  int port_ = 0;
  std::mutex mu_;
  std::unordered_map<std::string, std::shared_ptr<Connection>> conns_;
  std::shared_ptr<Process> system_;
  std::mutex connect_mu_;
  std::atomic<std::uint64_t> next_ref_{1};
  std::uint32_t ref_salt_ = 0;

  std::atomic<bool> stopping_{false};
  // Reader, writer, worker and handshake threads. One whose connection closed (or that
  // was replaced by the watchdog) ends; finished threads are joined when the next one
  // starts (a finished but unjoined thread keeps its stack).
  struct Worker {
    std::thread thread;
    std::shared_ptr<std::atomic<bool>> done;
  };
  std::mutex threads_mu_;
  std::vector<Worker> threads_;
  std::thread acceptor_, ticker_, watchdog_;
  std::mutex wd_mu_;
  std::condition_variable wd_cv_;
  std::atomic<bool> wd_idle_{true};
  std::condition_variable tick_cv_;
};

}  // namespace erpy::node
