// An embedded pool: N contexts, each a C++ thread with its own Python thread state and
// namespace, fed from one FIFO queue of jobs (and a queue of its own while it is held or
// while its job waits for Erlang).
//
// Threads and locks (doc/internals.md says it in prose):
// - Erlang processes never run Python. Their NIFs (submit, cancel, callback_reply, checkin)
//   only take the pool mutex for a few instructions and never the GIL.
// - Context threads run Python. They take the GIL only around Python work, and may take
//   the pool mutex while holding the GIL, never the other way round (order: GIL, then
//   mutex; and no thread waits for anything while holding the mutex).
// - The runtime's service thread injects interrupts and drops references that Erlang let
//   go of; it follows the same order.
#pragma once
#include <erl_nif.h>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "convert.hpp"
#include "env_cache.hpp"
#include "resource.hpp"
#include "common/spin_wait.hpp"
#include "spin_mutex.hpp"
#include "py/ref.hpp"

namespace erpy::nif {

class Pool;
using PoolMutex = SpinMutex;  // see spin_mutex.hpp
struct Context;

enum class JobState { Queued, Running, Done, Canceled };

// Who an asynchronous job (async_submit) talks to. Direct: its answer goes to the caller as
// {erpy_reply, {erpy_async, Ref, Job}, Answer}, sent by the pool, nobody waiting. Parked:
// it needs Erlang (a callback, a result to check): the callback or answer waits in the job
// (as for a polling caller) and the pool's server is asked to start a runner for it.
// Adopted: a runner took it over and follows the synchronous protocol from then on.
enum class AsyncState { Direct, Parked, Adopted };

struct Job;
// A job that is not a request map (the reactor's fd events, reactor.cpp): run on the
// context thread with the GIL held, in place of reading and running a request. It
// answers by taking `msg` and returning the answer made there, or returns 0: the job then
// ends with no answer (its caller learns the outcome another way). Must not throw.
using JobHook = ERL_NIF_TERM (*)(Job& job, MsgEnv& msg) noexcept;

// One request from one Erlang process. Lives in a NIF resource (the caller holds it as a
// term; the queue and the running context hold references).
struct Job {
  Job() noexcept = default;  // (time_point's constructor is not declared noexcept)
  OwnedEnv env;  // holds the copies of ref and req
  ERL_NIF_TERM ref = 0, req = 0;
  ErlNifPid caller{};
  bool want_handle = false;
  JobHook hook = nullptr;  // set: not a request (see JobHook)
  std::shared_ptr<Pool> pool;
  // Guarded by the pool mutex:
  JobState state = JobState::Queued;
  OwnedEnv reply_env;  // the answer to the callback in progress
  ERL_NIF_TERM reply = 0;
  // The caller polls for a short call's answer (poll/2), which then waits here; once it
  // blocks in `receive` (or a callback needs it there), answers come as messages. Made by
  // a context thread, so from the cache (env_cache.hpp).
  MsgEnv answer_env;
  ERL_NIF_TERM answer = 0;
  MsgEnv callback_env;  // a callback for the polling caller
  ERL_NIF_TERM callback = 0;
  bool blocking = false;
  std::atomic<bool> settled{false};  // answer_env set, or blocking: poll may take the lock
  std::atomic<bool> reply_ready{false};  // reply_env set: the context may stop spinning
  // The caller's spin (poll/2 before it blocks): when it ends (monotonic ns, 0: not
  // started). Touched only by the caller's process; atomic because that process moves
  // between scheduler threads in ways ThreadSanitizer does not see.
  std::atomic<std::int64_t> poll_until{0};
  bool monitored = false;
  ErlNifMonitor monitor{};
  std::chrono::steady_clock::time_point started{};
  std::chrono::steady_clock::time_point canceled_at{};  // when a running job was cancelled
  // Asynchronous jobs only (async_submit). `closed` and `extra` are in `env`: the answer
  // for a closed pool ({error, {no_pool, Name}}) and what the runner gets at adoption.
  bool async = false;
  ERL_NIF_TERM closed = 0, extra = 0;
  // Guarded by the pool mutex:
  // Changed under the mutex only; atomic so that an await may look without it.
  std::atomic<AsyncState> async_state{AsyncState::Direct};
  ErlNifPid handler{};  // the runner, once Adopted: the protocol's messages go there
  std::int64_t deadline_at = 0;  // the request's deadline (mono_ns, 0: none); set at submit
  bool replied = false;  // a reply to the caller is sent (or being sent): no other comes
  // Set once that reply is in the caller's mailbox (async_cancel waits for it).
  std::atomic<bool> reply_sent{false};
  // The caller spins in erpy:await (async_poll): a Direct answer is kept in the job for
  // it, not sent. Set without the mutex (a stale read only costs a message); its spin
  // ends at await_until (monotonic ns, 0: not spinning). Touched by the caller only.
  std::atomic<bool> awaiting{false};
  std::atomic<std::int64_t> await_until{0};
  // Where the protocol's messages (answer, callbacks) go: the caller, or its runner.
  const ErlNifPid& to() const noexcept { return async_state == AsyncState::Adopted ? handler : caller; }
};

// What an Erlang term refers to for a context (held contexts, nesting).
struct ContextHandle {
  std::shared_ptr<Pool> pool;
  int index = 0;
};

struct Context {
  Pool* pool = nullptr;
  int index = 0;
  std::condition_variable_any cv;
  PyThreadState* tstate = nullptr;
  unsigned long thread_id = 0;
  // Guarded by the pool mutex:
  // The term Erlang knows this context by. Kept while the pool is open; close() drops it
  // and replace_stuck() hands it to the replacement, so readers take their own reference
  // under the mutex (ResourcePtr::share) and use that.
  ResourcePtr<ContextHandle> handle;
  std::deque<ResourcePtr<Job>> pinned;  // jobs for this context only (held, or nested)
  std::vector<Job*> running;    // innermost last; more than one while nesting
  bool held = false;
  bool release_requested = false;
  bool idle = false;
  int in_callback = 0;  // waiting for Erlang (nested calls count)
  bool wake = false;
  bool retired = false;  // replaced while stuck: its thread ends once its job returns
  ErlNifPid holder{};
  ErlNifMonitor holder_monitor{};
  bool holder_monitored = false;
  std::atomic<bool> interrupt_pending{false};
  SpinPolicy callback_spin;  // waiting for a callback's answer (this context's thread only)
  // Touched only by this context's thread, with the GIL:
  py::PyRef held_ns;
};

struct PoolOptions {
  int size = 1;
  ConvertOptions convert;
  int spin_us = 50;
  // A context whose job was interrupted but has not stopped this long after (blocked in a
  // C function: time.sleep, a read) is replaced by a fresh thread.
  int kill_grace_ms = 2000;
  ErlNifPid owner{};  // the pool server: Python's output goes there as log lines
};

class Pool : public std::enable_shared_from_this<Pool> {
 public:
  explicit Pool(PoolOptions o);
  ~Pool();
  // Starts the context threads. If the system refuses one, those already started are
  // stopped (the pool is closed) and the error (std::system_error) is thrown.
  void start();
  // No more jobs: waiting ones answer {error, pool_closed}, running ones are interrupted
  // and answer the same; threads end after that. `env`: the calling NIF's, or null.
  void close(ErlNifEnv* env);

  // From Erlang processes (no GIL).
  bool submit(const ResourcePtr<Job>& job, int context);  // context -1: any; false when closed
  enum class Outcome { Canceled, Sent, Done };
  // Canceled: it will never answer. Sent: the answer is in the caller's mailbox. Done: the
  // answer is copied into `env` as *answer.
  Outcome cancel(Job* job, ErlNifEnv* env, ERL_NIF_TERM* answer);
  // Done (answer copied), Callback (the callback request copied), or Pending; with
  // `block`, Wait: from now on the answer (and callbacks) come as messages.
  enum class Poll { Done, Pending, Wait, Callback };
  Poll poll(Job* job, bool block, ErlNifEnv* env, ERL_NIF_TERM* answer);
  void callback_reply(Job* job, ErlNifEnv* env, ERL_NIF_TERM reply);
  // Checkin (`env`: the caller's, to remove the holder monitor) or the holder died
  // (`holder`: its pid, which must still be the holder's).
  void release(int context, ErlNifEnv* env, const ErlNifPid* holder);
  void caller_down(Job* job);
  ERL_NIF_TERM info(ErlNifEnv* env);
  // Asynchronous jobs. async_cancel from the caller: Canceled (nothing comes), Sent (the
  // reply is in the caller's mailbox now), or Runner (*runner has it: stop that process).
  enum class AsyncCancel { Canceled, Sent, Runner };
  AsyncCancel async_cancel(Job* job, ErlNifEnv* env, ErlNifPid* runner);
  // A runner (the calling process) takes a Parked job over; false if nothing is left to
  // do for it (answered, cancelled, or not parked).
  bool adopt(Job* job, ErlNifEnv* env);
  // The caller awaits: Done (*out: the answer, as the reply would carry it), Pending
  // (spin on), Wait (the reply comes as a message), Answered (it was sent: in the mailbox
  // unless taken already), Runner (*out: the runner's pid, which sends it).
  enum class AsyncPoll { Done, Pending, Wait, Answered, Runner };
  AsyncPoll async_poll(Job* job, bool block, ErlNifEnv* env, ERL_NIF_TERM* out);

  // From the service thread (interrupt_canceled with the GIL).
  void interrupt_canceled();
  void interrupt_canceled_locked(std::vector<unsigned long>& woken);  // m_ held
  void replace_stuck();  // see PoolOptions::kill_grace_ms
  bool has_interrupts();
  void kick_stalled();  // queued work and idle contexts: wake one (see wake_one_locked)
  void monitor_long_jobs(std::chrono::milliseconds after);
  void expire_async();  // asynchronous jobs past their deadline answer {error, timeout}

  const PoolOptions& options() const noexcept { return o_; }
  std::vector<std::unique_ptr<Context>>& contexts() noexcept { return ctxs_; }

  // Python calling Erlang, from the context thread `c` with the GIL held: the job's
  // caller gets {callback | callback_check, Ctx, Kind, M, F, Args} (F: undefined when
  // `f` is null) and answers {ok, Value} (returned) or {error, Reason} (raised as
  // erlang.ErlangError(Reason)). Terms Python cannot send (too large, an unknown atom)
  // raise ErlangError({message_too_large, Size, Max} | {unknown_atom, Name}) here.
  py::PyRef erlang_callback(Context& c, const char* kind, PyObject* m, PyObject* f, PyObject* args);
  void log(PyObject* stream, PyObject* text);

 private:
  friend struct ContextThread;
  void serve(Context& c);
  template <class Ready>
  Spun spin(SpinPolicy& policy, Ready ready);
  ResourcePtr<Job> next_job(Context& c, std::unique_lock<PoolMutex>& lock);
  void run_taken(Context& c, ResourcePtr<Job> job, std::unique_lock<PoolMutex>& lock);
  void run_job(Context& c, Job* job) noexcept;
  void run_request(Context& c, Job* job);
  bool finish(Job* job, MsgEnv msg, ERL_NIF_TERM answer);
  bool keep_answer_locked(Job* job, MsgEnv& msg, ERL_NIF_TERM answer);
  static void send_answer(ErlNifEnv* env, Job* job, MsgEnv msg, ERL_NIF_TERM answer);
  static void send_reply(ErlNifEnv* env, Job* job, MsgEnv msg, ERL_NIF_TERM answer);
  void park_locked(Job* job);
  AsyncPoll await_begin_locked(Job* job, bool block);
  void do_release(Context& c);
  void start_thread(Context* c);
  void retire(Context* c);
  void wake_one_locked();
  bool cancel_locked(Job* job);
  void answer_closed_locked(ErlNifEnv* env, ResourcePtr<Job> job);

  static constexpr std::chrono::microseconds kBusyHandoff{500};
  PoolOptions o_;
  ConvertOptions log_convert_;  // o_.convert without a size limit, for output lines
  std::vector<std::unique_ptr<Context>> ctxs_;
  PoolMutex m_;
  std::deque<ResourcePtr<Job>> queue_;
  bool closing_ = false;
  std::atomic<long> queued_{0};  // a hint for spinners (may lag the queue a little)
  std::atomic<int> inflight_{0};  // submitted, not yet finished
  std::atomic<bool> spinning_{false};
  // When the job a context of the pool (not a held one) runs now started (monotonic ns;
  // 0: none, or it waits for Erlang). The idle spinner leaves a queued job alone while
  // that job is younger than kSpinHandoff: its context takes the next job itself, with
  // the GIL it had, where the spinner would first wait for that GIL (a hand-off between
  // threads, which costs more than the job here).
  std::atomic<std::int64_t> young_since_ns_{0};
  static constexpr std::int64_t kSpinHandoffNs = 20'000;
  // Adaptive waiting (common/spin_wait.hpp): the idle context that spins for the next job
  // (one at a time), and the callers polling for their answers.
  SpinPolicy idle_spin_;
  SpinPolicy caller_spin_;
  // Where a context thread and a caller last ran (CPU numbers, -1: unknown). A spinner
  // whose awaited thread is on its own CPU yields the CPU instead: that thread cannot run
  // while we spin there.
  std::atomic<int> ctx_cpu_{-1};
  std::atomic<int> caller_cpu_{-1};
  std::vector<ResourcePtr<Job>> to_interrupt_;  // canceled while running; guarded by m_
  // Contexts replaced while stuck, until their threads end; guarded by m_.
  std::vector<std::unique_ptr<Context>> retired_;
  long replaced_ = 0;  // contexts replaced so far; guarded by m_
  // Replacements whose thread the system refused for now; tried again at the next tick
  // (replace_stuck). Guarded by m_.
  std::vector<Context*> unstarted_;
  // Asynchronous jobs Parked until a runner adopts them, guarded by m_ (close() answers
  // these: the pool's server, which starts runners, is stopping).
  std::vector<ResourcePtr<Job>> parked_;
};

}  // namespace erpy::nif
