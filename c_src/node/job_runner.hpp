// Spawn requests (rpc:call, erpc) run as Python calls: parsed from the control message,
// run on the connection's reader (inline: no thread hand-off on the latency path) or on
// a worker thread, answered with SPAWN_REPLY and the call's exit, and interrupted when
// the caller gives up.
//
// A call's SPAWN_REPLY goes out with its exit unless the call is slow: then the
// watchdog sends it early (tend()), so that the caller's node can tell us when the
// caller gives up (DEMONITOR_P on a timeout or the caller's death, an exit signal
// through a link) and the call is interrupted (KeyboardInterrupt in its thread, re-sent
// until it stops).
//
// The functions are found by the node's resolver (Python: the allow-list) and kept in a
// cache; what a call returns or raises is encoded as py::Runner reports it in every mode.
//
// Locks: run_mu_ (the running calls), Running::mu (one call), jobs_mu_ (the worker
// queue). None is held while the GIL is taken or a socket is written.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>

#include "connection.hpp"
#include "process_table.hpp"
#include "py/codec.hpp"
#include "py/ref.hpp"
#include "py/runner.hpp"

namespace erpy::node {

class JobRunner {
 public:
  struct Options {
    int slow_ms = 5;  // a call running longer gets its SPAWN_REPLY early
    int workers = 8;  // threads that run calls arriving while others are waiting to be read
  };
  // Starts a thread (tracked and joined by the core); false when the node stops.
  using Spawn = std::function<bool(std::function<void()>)>;
  // Wakes the watchdog: when it sleeps (`force`: also when it only naps).
  using Wake = std::function<void(bool force)>;

  // `resolver(module, function)` returns the callable (Python, with the GIL).
  JobRunner(Options o, py::Codec& codec, py::Runner& runner, PyObject* resolver, ProcessTable& procs,
            Spawn spawn, Wake wake);
  ~JobRunner();
  JobRunner(const JobRunner&) = delete;
  JobRunner& operator=(const JobRunner&) = delete;

  struct Job {
    enum Kind { kCall, kCast, kApply } kind = kApply;
    Bytes req, from;
    bool monitor = false, link = false;
    Bytes res;  // erpc's result reference (kCall)
    std::string module, function;
    etf::Bytes args;  // the argument list (no version byte), in one of the three below
    Bytes args_copy;
    std::unique_ptr<std::uint8_t[]> args_rbuf;  // a read buffer taken over
    Bytes args_owner;                           // a reassembled message taken over
  };

  // A SPAWN_REQUEST read from `c` (its reader's thread): the job to run, or nothing when
  // it was malformed (answered already). `owner`: a buffer holding the message that the
  // job may take over, or null.
  std::optional<Job> accept(Connection& c, const etf::Tuple& ctl, etf::Bytes payload, Bytes* owner);
  // Hands a job to a worker thread; false if there is none to take it. With `must` (a
  // reader that reads while a call of its own waits, so cannot run it) the job is queued
  // for the next free worker when none can start; false only once the node stops.
  bool dispatch(const std::shared_ptr<Connection>& c, Job& job, bool must = false);
  // Runs a job on this thread: Python, then SPAWN_REPLY and the exit.
  void run(const std::shared_ptr<Connection>& c, Job& job);

  // Answers spawn request `req` with a process that ends at once with `reason`.
  void end_spawn(Connection& c, const Bytes& req, const Bytes& from, bool monitor, bool link,
                 const Bytes& reason);
  // A message refused by the connection's limits (`in`, its start): a spawn request is
  // answered all the same, with `why`, so that its caller does not wait forever.
  void answer_refused(Connection& c, const Incoming& in, const Bytes& why);

  // The caller gave up on call `id` (a demonitor with `ref`, or an exit signal `reason`).
  bool cancel(std::uint32_t id, const Bytes* ref, const Bytes* reason);
  // Interrupts the call started by spawn request `req` (encoded, no version byte): for a
  // caller whose node abandoned the request before our SPAWN_REPLY reached it.
  void cancel_request(const Bytes& req);
  // `c` is down: calls whose caller was there are cancelled (nobody can get their result).
  void connection_down(const Connection* c);
  // Watchdog: early replies for slow calls, interrupts for cancelled ones. True when a
  // call needs watching. Without locks held.
  bool tend(std::int64_t now);
  // Wakes and ends the workers.
  void stop();
  // At the node's stop: every call still in Python gets KeyboardInterrupt, as a cancelled
  // one does (nobody will read its result). Without the GIL held.
  void interrupt_all();

  // Forgets cached functions (after the allow-list changed). With the GIL.
  void clear_cache() { fn_cache_.clear(); }

  // From inside a call: whether `pid` (encoded, no version byte) is the caller that
  // started it with a monitor or a link, so that the caller's end cancels the call (and
  // so ends any wait of it) without a monitor of its own.
  static bool watched_by(const Bytes& pid);

  // From inside a call: the largest result (bytes of external format) it may return, 0
  // for no limit; with `binary` its result or error map goes back as its ETF in a binary.
  static void set_result_limit(std::size_t max, bool binary);

  // While a call's thread waits in a mailbox (`p`): the call's cancellation wakes it.
  // cancelled() tells whether the call running on this thread was cancelled. A waiting
  // call does not count against `workers`: the calls it may wait for (a callback that
  // calls this node again) always get a thread.
  class WaitScope {
   public:
    explicit WaitScope(const std::shared_ptr<Process>& p);
    ~WaitScope();
    WaitScope(const WaitScope&) = delete;
    WaitScope& operator=(const WaitScope&) = delete;
    bool cancelled() const;

   private:
    JobRunner* runner_ = nullptr;
  };

  std::atomic<std::uint64_t> calls{0};

 private:
  // A call in progress (a spawned "process" of ours).
  struct Running {
    JobRunner* runner = nullptr;
    std::shared_ptr<Connection> conn;
    Bytes reply;                  // the SPAWN_REPLY frame
    Bytes req;                    // the spawn request id: the caller's monitor reference
    Bytes from;                   // the caller's pid
    bool monitor = false, link = false;
    std::int64_t started = 0;
    std::mutex mu;                // orders this call's SPAWN_REPLY; guards finished
    std::atomic<bool> replied{false};  // written under mu
    bool finished = false;
    std::atomic<bool> cancelled{false};
    Bytes cancel_reason;          // an exit signal's reason, under mu; empty for a demonitor
    // Under the GIL: the Python thread running the call, and whether Python is done.
    unsigned long tid = 0;
    bool py_done = false;
    std::shared_ptr<Process> waiting;  // a mailbox its thread waits in (WaitScope), under mu
  };
  static thread_local Running* current_run_;  // the call run() runs on this thread

  // The callable for module:function, owned: the cache may be cleared while it runs.
  py::PyRef resolve(const std::string& module, const std::string& function);
  // Encodes the pending Python exception as the call's error into `reason`.
  void put_error(py::ByteBuffer& reason, const Job& j, std::size_t base);
  void worker();
  // A call started (+1) or ended (-1) waiting in a mailbox; a queued job gets a worker
  // when the waiting ones hold them all.
  void waiting(int delta);
  // Starts a worker thread (jobs_mu_ held in `lk`, released while it starts); false if
  // the node stops.
  bool start_worker(std::unique_lock<std::mutex>& lk);

  struct Queued {
    std::shared_ptr<Connection> conn;
    std::unique_ptr<Job> job;
  };

  const Options opt_;
  py::Codec& codec_;
  py::Runner& runner_;
  py::PyRef resolver_;
  std::unordered_map<std::string, py::PyRef> fn_cache_;  // under the GIL
  ProcessTable& procs_;
  Spawn spawn_;
  Wake wake_;

  std::mutex run_mu_;
  std::unordered_map<std::uint32_t, std::shared_ptr<Running>> running_;
  std::deque<Bytes> cancelled_reqs_;  // under run_mu_

  std::mutex jobs_mu_;
  std::condition_variable jobs_cv_;
  std::deque<Queued> jobs_;
  int idle_workers_ = 0, workers_ = 0;
  int waiting_ = 0;  // calls waiting in a mailbox (under jobs_mu_)
  bool stopping_ = false;  // under jobs_mu_
};

}  // namespace erpy::node
