#include "pool.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
#include <thread>

#include "common/cpu_relax.hpp"
#include "etf/error.hpp"
#include "atoms.hpp"
#include "env_cache.hpp"
#include "errors.hpp"
#include "runtime.hpp"

namespace erpy::nif {

using py::PyRef;
using py::PythonError;
using Clock = std::chrono::steady_clock;

Pool::Pool(PoolOptions o) : o_(std::move(o)), log_convert_(o_.convert) {
  log_convert_.max_size = SIZE_MAX;
  log_convert_.new_atoms.reset();
}

Pool::~Pool() = default;  // only once every context thread has ended (each holds the pool)

void Pool::start() {
  auto self = shared_from_this();
  const std::int64_t spin_ns = std::int64_t{std::max(0, o_.spin_us)} * 1000;
  idle_spin_.set_max_ns(spin_ns);
  caller_spin_.set_max_ns(spin_ns);
  for (int i = 0; i < o_.size; ++i) {
    auto c = std::make_unique<Context>();
    c->pool = this;
    c->index = i;
    c->callback_spin.set_max_ns(spin_ns);
    c->handle = make_resource<ContextHandle>(Runtime::get().types.context, ContextHandle{self, i});
    ctxs_.push_back(std::move(c));
  }
  try {
    for (auto& c : ctxs_) start_thread(c.get());
  } catch (...) {
    close(nullptr);  // the threads already started end
    throw;
  }
}

void Pool::start_thread(Context* ctx) {
  auto self = shared_from_this();
  std::thread([self, ctx] {
    // Jobs answer their own errors (run_job); this is for the thread's own setup.
    try {
      self->serve(*ctx);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "erpy_nif: context %d stopped: %s\n", ctx->index, e.what());
    } catch (...) {
      std::fprintf(stderr, "erpy_nif: context %d stopped: unknown C++ exception\n", ctx->index);
    }
  }).detach();
}

void Pool::close(ErlNifEnv* env) {
  std::vector<ResourcePtr<ContextHandle>> handles;  // dropped after the mutex
  handles.reserve(ctxs_.size());
  std::vector<ResourcePtr<Job>> parked;
  {
    std::lock_guard<PoolMutex> lock(m_);
    if (closing_) return;
    closing_ = true;
    // The pool's server stops, so no runner will adopt a parked job: one parked with its
    // answer answers that the pool closed; one in a callback is interrupted below and
    // answers the same when it stops (finish).
    parked.swap(parked_);
    for (auto& j : parked) {
      if (j->state != JobState::Done || j->async_state != AsyncState::Parked || j->replied) continue;
      j->answer_env.reset();
      j->replied = true;
      MsgEnv msg = MsgEnv::take();
      const ERL_NIF_TERM answer = enif_make_tuple2(msg.get(), atoms.error, atoms.pool_closed);
      send_reply(env, j.get(), std::move(msg), answer);
    }
    // Requests that will not run now are answered at once, not left to time out.
    for (auto& j : queue_) answer_closed_locked(env, std::move(j));
    queue_.clear();
    queued_ = 0;
    for (auto& c : ctxs_) {
      for (auto& j : c->pinned) answer_closed_locked(env, std::move(j));
      c->pinned.clear();
      // Running ones are interrupted, and answer pool_closed when they stop (run_job).
      for (Job* j : c->running) {
        if (j->state == JobState::Running) to_interrupt_.push_back(ResourcePtr<Job>::share(j));
      }
      c->wake = true;
      c->cv.notify_all();
      handles.push_back(std::move(c->handle));
    }
  }
  handles.clear();
  Runtime::get().wake();
}

// {error, pool_closed} for a job that will not run; drops the queue's reference.
void Pool::answer_closed_locked(ErlNifEnv* env, ResourcePtr<Job> j) {
  inflight_.fetch_sub(1, std::memory_order_relaxed);
  if (j->state == JobState::Queued) {
    MsgEnv msg = MsgEnv::take();
    ERL_NIF_TERM answer = enif_make_tuple2(msg.get(), atoms.error, atoms.pool_closed);
    if (j->async) {
      j->state = JobState::Done;
      j->replied = true;
      send_reply(env, j.get(), std::move(msg), answer);
    } else if (keep_answer_locked(j.get(), msg, answer)) j->settled.store(true, std::memory_order_release);
    else send_answer(env, j.get(), std::move(msg), answer);
  }
}

void Pool::wake_one_locked() {
  if (spinning_.load(std::memory_order_acquire)) return;  // the spinner will see it
  // A context that started its job less than kBusyHandoff ago will most likely take this
  // one next, with the GIL it already has: waking another costs a thread wake-up and a GIL
  // handoff (both slow here). If that job turns out long, the service thread wakes an idle
  // context at its next tick (kick_stalled).
  const auto now = Clock::now();
  for (auto& c : ctxs_) {
    if (!c->held && c->in_callback == 0 && c->running.size() == 1 &&
        now - c->running.back()->started < kBusyHandoff) {
      return;
    }
  }
  for (auto& c : ctxs_) {
    if (c->idle && !c->held && !c->wake) {
      c->wake = true;
      c->cv.notify_one();
      return;
    }
  }
}

bool Pool::submit(const ResourcePtr<Job>& job, int context) {
  {
    std::lock_guard<PoolMutex> lock(m_);
    if (closing_) return false;
    if (context >= 0) {
      Context& c = *ctxs_[static_cast<size_t>(context)];
      c.pinned.push_back(job.share());
      inflight_.fetch_add(1, std::memory_order_relaxed);
      c.wake = true;
      c.cv.notify_one();
      return true;
    }
    queue_.push_back(job.share());
    inflight_.fetch_add(1, std::memory_order_relaxed);
    wake_one_locked();
  }
  // Told to a spinning context only now that the mutex is free, so that it does not go to
  // sleep on the mutex we still held (a futex wait and wake, tens of microseconds here).
  caller_cpu_.store(current_cpu(), std::memory_order_relaxed);
  queued_.fetch_add(1, std::memory_order_release);
  return true;
}

bool Pool::cancel_locked(Job* job) {
  switch (job->state) {
    case JobState::Done:
      return false;
    case JobState::Canceled:
      return true;
    case JobState::Queued:
      job->state = JobState::Canceled;  // skipped when its turn comes
      return true;
    case JobState::Running:
      job->state = JobState::Canceled;
      job->canceled_at = Clock::now();
      to_interrupt_.push_back(ResourcePtr<Job>::share(job));
      for (auto& c : ctxs_) c->cv.notify_all();  // a job waiting for Erlang gives up now
      return true;
  }
  return true;
}

Pool::Outcome Pool::cancel(Job* job, ErlNifEnv* env, ERL_NIF_TERM* answer) {
  bool interrupt;
  {
    std::lock_guard<PoolMutex> lock(m_);
    if (job->state == JobState::Done) {
      if (!job->answer_env) return Outcome::Sent;
      *answer = enif_make_copy(env, job->answer);
      job->answer_env.reset();
      return Outcome::Done;
    }
    interrupt = job->state == JobState::Running;
    cancel_locked(job);
  }
  if (interrupt) Runtime::get().wake();
  return Outcome::Canceled;
}

// ---- asynchronous jobs ---------------------------------------------------------------

// The caller (or another process) cancels an asynchronous job. After this returns no reply
// comes to the caller but one already in its mailbox (Sent), or one its runner may still
// send (Runner: the process that stops the runner must wait for it to end).
Pool::AsyncCancel Pool::async_cancel(Job* job, ErlNifEnv*, ErlNifPid* runner) {
  AsyncCancel out = AsyncCancel::Canceled;
  bool interrupt = false;
  MsgEnv dropped;  // a parked answer nobody will take, freed after the mutex
  {
    std::lock_guard<PoolMutex> lock(m_);
    if (job->async_state == AsyncState::Adopted) {
      *runner = job->handler;
      out = AsyncCancel::Runner;
      interrupt = job->state == JobState::Running;
      cancel_locked(job);
    } else if (job->replied) {
      out = AsyncCancel::Sent;
    } else if (job->state == JobState::Done) {
      // Parked with its answer, before a runner took it: the runner finds it cancelled.
      job->state = JobState::Canceled;
      dropped = std::move(job->answer_env);
    } else {
      interrupt = job->state == JobState::Running;
      cancel_locked(job);
    }
  }
  if (interrupt) Runtime::get().wake();
  // The reply was decided under the mutex and is sent right after it: wait for the send,
  // so that the caller finds it in its mailbox (a few microseconds at most).
  if (out == AsyncCancel::Sent) {
    while (!job->reply_sent.load(std::memory_order_acquire)) std::this_thread::yield();
  }
  return out;
}

bool Pool::adopt(Job* job, ErlNifEnv* env) {
  ResourcePtr<Job> parked;  // the list's reference, dropped after the mutex
  std::lock_guard<PoolMutex> lock(m_);
  auto it = std::find_if(parked_.begin(), parked_.end(), [job](const ResourcePtr<Job>& p) { return p.get() == job; });
  if (it != parked_.end()) {
    parked = std::move(*it);
    *it = std::move(parked_.back());
    parked_.pop_back();
  }
  if (job->async_state != AsyncState::Parked || job->replied || job->state == JobState::Canceled) return false;
  job->async_state = AsyncState::Adopted;
  enif_self(env, &job->handler);
  return true;
}

// The job needs Erlang (its callback or answer waits in the job, as for a polling
// caller): the pool's server starts a runner, which adopts it (erpy_embedded).
void Pool::park_locked(Job* job) {
  job->async_state = AsyncState::Parked;
  job->blocking = false;
  job->poll_until.store(0, std::memory_order_relaxed);
  job->settled.store(true, std::memory_order_release);
  parked_.push_back(ResourcePtr<Job>::share(job));
  MsgEnv msg = MsgEnv::take();
  ErlNifPid owner = o_.owner;
  // The caller too: the runner links to it before it adopts the job, so that the caller
  // sees its request running for it (erpy_async) as long as a reply may come.
  enif_send(nullptr, &owner, msg.get(),
            enif_make_tuple3(msg.get(), atoms.erpy_async_adopt, enif_make_resource(msg.get(), job),
                             enif_make_pid(msg.get(), &job->caller)));
}

// From the service thread: jobs nobody waits for answer {error, timeout} at their
// deadline, as erpy:call would (and are cancelled: interrupted if they run). They are
// looked for where they wait (the queues) or run, which costs a request nothing; a
// runner keeps an adopted job's deadline itself, as a synchronous caller does.
void Pool::expire_async() {
  std::vector<ResourcePtr<Job>> expired;
  {
    std::lock_guard<PoolMutex> lock(m_);
    const std::int64_t now = mono_ns();
    auto due = [now](const Job* j) {
      return j->async && j->deadline_at != 0 && j->deadline_at <= now && !j->replied &&
             j->async_state != AsyncState::Adopted &&
             (j->state == JobState::Queued || j->state == JobState::Running);
    };
    auto look = [&](Job* j) {
      if (!due(j)) return;
      cancel_locked(j);  // a running one is interrupted later in this same tick
      j->replied = true;
      expired.push_back(ResourcePtr<Job>::share(j));
    };
    for (auto& j : queue_) look(j.get());
    for (auto& c : ctxs_) {
      for (auto& j : c->pinned) look(j.get());
      for (Job* j : c->running) look(j);
    }
  }
  for (auto& j : expired) {
    MsgEnv msg = MsgEnv::take();
    const ERL_NIF_TERM answer = enif_make_tuple2(msg.get(), atoms.error, atoms.timeout);
    send_reply(nullptr, j.get(), std::move(msg), answer);
  }
}

// An await begins: the caller spins (finish() keeps the answer for it) while that pays.
Pool::AsyncPoll Pool::await_begin_locked(Job* job, bool block) {
  if (job->async_state == AsyncState::Parked || block) return AsyncPoll::Wait;
  const std::int64_t budget = caller_spin_.budget_ns();
  if (budget <= 0) return AsyncPoll::Wait;
  job->await_until.store(mono_ns() + budget, std::memory_order_relaxed);
  job->awaiting.store(true, std::memory_order_relaxed);
  return AsyncPoll::Pending;
}

// As poll(), for an asynchronous job's caller in erpy:await: a short job's answer is
// taken here, sooner than a message would wake the caller. The first poll of an await
// (await_until 0) says where the answer is: with a runner, sent already, or to come.
Pool::AsyncPoll Pool::async_poll(Job* job, bool block, ErlNifEnv* env, ERL_NIF_TERM* out) {
  const std::int64_t until = job->await_until.load(std::memory_order_relaxed);
  if (until != 0 && !block) {
    if (!job->settled.load(std::memory_order_acquire)) {
      if (mono_ns() < until) {
        const int cpu = current_cpu();
        caller_cpu_.store(cpu, std::memory_order_relaxed);
        if (cpu >= 0 && cpu == ctx_cpu_.load(std::memory_order_relaxed)) sched_yield();
        return AsyncPoll::Pending;
      }
      caller_spin_.record(SpinPolicy::Outcome::timed_out);
    } else {
      caller_spin_.record(SpinPolicy::Outcome::found);
    }
  }
  if (until == 0) {
    // The usual await, of a job that has not answered yet: no lock (a reply decided
    // meanwhile is found when the spin ends; Direct is the first state, so no answer
    // can have been taken before).
    if (job->reply_sent.load(std::memory_order_acquire)) return AsyncPoll::Answered;
    if (!block && job->async_state.load(std::memory_order_acquire) == AsyncState::Direct) {
      const std::int64_t budget = caller_spin_.budget_ns();
      if (budget > 0) {
        job->await_until.store(mono_ns() + budget, std::memory_order_relaxed);
        job->awaiting.store(true, std::memory_order_relaxed);
        return AsyncPoll::Pending;
      }
    }
    {
      std::lock_guard<PoolMutex> lock(m_);
      if (job->async_state == AsyncState::Adopted) {
        *out = enif_make_pid(env, &job->handler);
        return AsyncPoll::Runner;
      }
      if (!job->replied) return await_begin_locked(job, block);
    }
    // Sent right after the mutex that decided it: in the mailbox in a moment.
    while (!job->reply_sent.load(std::memory_order_acquire)) std::this_thread::yield();
    return AsyncPoll::Answered;
  }
  MsgEnv taken;  // freed after the mutex
  std::lock_guard<PoolMutex> lock(m_);
  job->await_until.store(0, std::memory_order_relaxed);
  job->awaiting.store(false, std::memory_order_relaxed);  // from now on the answer is sent
  if (job->async_state != AsyncState::Direct || job->state != JobState::Done || job->replied || !job->answer_env) {
    return AsyncPoll::Wait;
  }
  ERL_NIF_TERM a = job->answer;
  int arity;
  const ERL_NIF_TERM* el;
  if (enif_get_tuple(job->answer_env.get(), a, &arity, &el) && arity == 2 && el[0] == atoms.error &&
      el[1] == atoms.pool_closed) {
    a = job->closed;
  }
  *out = enif_make_copy(env, a);
  taken = std::move(job->answer_env);
  job->replied = true;
  job->reply_sent.store(true, std::memory_order_release);
  return AsyncPoll::Done;
}

Pool::Poll Pool::poll(Job* job, bool block, ErlNifEnv* env, ERL_NIF_TERM* answer) {
  // The caller spins (polls, yielding to its scheduler's other processes between polls)
  // while the pool's caller policy says that pays, for at most spin_us; then it blocks
  // and the answer comes as a message.
  const std::int64_t until = job->poll_until.load(std::memory_order_relaxed);
  if (!block && !job->settled.load(std::memory_order_acquire)) {
    const std::int64_t now = mono_ns();
    if (until == 0) {
      const std::int64_t budget = caller_spin_.budget_ns();
      if (budget > 0) job->poll_until.store(now + budget, std::memory_order_relaxed);
      block = budget <= 0;
    } else if (now >= until) {
      caller_spin_.record(SpinPolicy::Outcome::timed_out);
      block = true;
    }
    if (!block) {
      // The context we wait for last ran on this CPU: it cannot answer while this
      // scheduler holds the CPU, so let it run (both on one core: a busy machine).
      const int cpu = current_cpu();
      caller_cpu_.store(cpu, std::memory_order_relaxed);
      if (cpu >= 0 && cpu == ctx_cpu_.load(std::memory_order_relaxed)) sched_yield();
      // Polling must not compete for the mutex with the thread that is about to answer.
      return Poll::Pending;
    }
  }
  // An answer (or callback) found while spinning: spinning paid.
  if (!block && until > 0) caller_spin_.record(SpinPolicy::Outcome::found);
  std::lock_guard<PoolMutex> lock(m_);
  if (job->callback_env) {
    *answer = enif_make_copy(env, job->callback);
    job->callback_env.reset();
    job->settled.store(false, std::memory_order_relaxed);
    job->poll_until.store(0, std::memory_order_relaxed);  // a new spin for what follows
    return Poll::Callback;
  }
  if (job->answer_env) {
    *answer = enif_make_copy(env, job->answer);
    job->answer_env.reset();
    return Poll::Done;
  }
  if (block || job->blocking) {
    job->blocking = true;
    return Poll::Wait;
  }
  return Poll::Pending;
}

void Pool::caller_down(Job* job) {
  bool interrupt;
  {
    std::lock_guard<PoolMutex> lock(m_);
    interrupt = job->state == JobState::Running;
    cancel_locked(job);
  }
  if (interrupt) Runtime::get().wake();
}

void Pool::callback_reply(Job* job, ErlNifEnv*, ERL_NIF_TERM reply) {
  OwnedEnv copy = OwnedEnv::alloc();  // after the swap: an unread earlier reply, freed unlocked
  ERL_NIF_TERM t = enif_make_copy(copy.get(), reply);
  std::lock_guard<PoolMutex> lock(m_);
  std::swap(job->reply_env, copy);
  job->reply = t;
  // The caller polls again for what follows (usually the answer, soon).
  job->blocking = false;
  job->settled.store(false, std::memory_order_relaxed);
  job->reply_ready.store(true, std::memory_order_release);
  for (auto& c : ctxs_) {
    if (!c->running.empty() && c->running.back() == job) c->cv.notify_one();
  }
}

void Pool::release(int context, ErlNifEnv* env, const ErlNifPid* holder) {
  std::lock_guard<PoolMutex> lock(m_);
  Context& c = *ctxs_[static_cast<size_t>(context)];
  if (!c.held) return;
  // A monitor from an earlier hold may fire late: only the current holder counts.
  if (holder && enif_compare_pids(holder, &c.holder) != 0) return;
  if (env && c.holder_monitored && c.handle) {
    // Only from a scheduler thread: enif_demonitor_process crashes on our own threads
    // (found under load; a monitor that is never removed ends with its resource).
    enif_demonitor_process(env, c.handle.get(), &c.holder_monitor);
  }
  c.holder_monitored = false;
  c.release_requested = true;
  c.wake = true;
  c.cv.notify_one();
}

ERL_NIF_TERM Pool::info(ErlNifEnv* env) {
  std::lock_guard<PoolMutex> lock(m_);
  int held = 0, busy = 0;
  for (auto& c : ctxs_) {
    held += c->held;
    busy += !c->running.empty();
  }
  ERL_NIF_TERM keys[] = {atoms.size, atoms.queued, atoms.held, atoms.busy,
                         atoms.closing, atoms.replaced, atoms.stuck};
  ERL_NIF_TERM values[] = {enif_make_int(env, o_.size), enif_make_uint64(env, queue_.size()),
                           enif_make_int(env, held), enif_make_int(env, busy),
                           closing_ ? atoms.true_ : atoms.false_, enif_make_long(env, replaced_),
                           enif_make_uint64(env, retired_.size())};
  ERL_NIF_TERM out;
  enif_make_map_from_arrays(env, keys, values, 7, &out);
  return out;
}

// ---- the context thread ----------------------------------------------------------------

// Busy-waits for `ready` as the policy allows (common/spin_wait.hpp), reading the clock
// only every 64 checks (on these virtual machines a clock read costs more than a check).
// At each clock read: a caller on this very CPU cannot submit or answer while we spin
// here, so the CPU goes to it.
template <class Ready>
Spun Pool::spin(SpinPolicy& policy, Ready ready) {
  const int cpu = current_cpu();
  ctx_cpu_.store(cpu, std::memory_order_relaxed);
  return adaptive_spin(policy, 64, ready, [] { cpu_relax(); }, [this] {
    const int cpu = current_cpu();
    ctx_cpu_.store(cpu, std::memory_order_relaxed);
    if (cpu >= 0 && cpu == caller_cpu_.load(std::memory_order_relaxed)) sched_yield();
  });
}

ResourcePtr<Job> Pool::next_job(Context& c, std::unique_lock<PoolMutex>& lock) {
  for (;;) {
    if (closing_ || c.retired) return {};
    if (c.release_requested) return {};  // serve() resets the namespace, then asks again
    if (!c.pinned.empty()) {
      ResourcePtr<Job> j = std::move(c.pinned.front());
      c.pinned.pop_front();
      return j;
    }
    if (!c.held && !queue_.empty()) {
      ResourcePtr<Job> j = std::move(queue_.front());
      queue_.pop_front();
      queued_.fetch_sub(1, std::memory_order_relaxed);
      return j;
    }
    // Nothing to do: spin a little first (one context at a time), since the next request
    // of a busy caller usually comes within microseconds and a sleep/wake pair costs more;
    // as long as spinning pays (idle_spin_).
    bool timed = false;
    if (!c.held && o_.spin_us > 0 &&
        !spinning_.exchange(true, std::memory_order_acq_rel)) {
      lock.unlock();
      const Spun s = spin(idle_spin_, [this] {
        if (queued_.load(std::memory_order_acquire) <= 0) return false;
        const std::int64_t since = young_since_ns_.load(std::memory_order_relaxed);
        return since == 0 || mono_ns() - since >= kSpinHandoffNs;
      });
      lock.lock();
      spinning_.store(false, std::memory_order_release);
      if (!queue_.empty() || closing_ || !c.pinned.empty()) continue;
      timed = s == Spun::skipped;
    }
    const std::int64_t blocked_at = timed ? mono_ns() : 0;
    c.idle = true;
    c.wake = false;
    c.cv.wait(lock, [&] { return c.wake; });
    c.idle = false;
    c.wake = false;
    if (timed) idle_spin_.record_blocked(mono_ns() - blocked_at);
  }
}

// A job taken off a queue (`lock` held, and held again on return): skipped if it was
// cancelled meanwhile, else run without the lock; either way it leaves the pool's count
// (and the queue's reference goes, under the lock).
void Pool::run_taken(Context& c, ResourcePtr<Job> job, std::unique_lock<PoolMutex>& lock) {
  if (job->state != JobState::Canceled) {
    job->state = JobState::Running;
    job->started = Clock::now();
    ctx_cpu_.store(current_cpu(), std::memory_order_relaxed);
    c.running.push_back(job.get());
    lock.unlock();
    const std::int64_t since = c.held ? 0 : mono_ns();
    if (since) young_since_ns_.store(since, std::memory_order_relaxed);
    run_job(c, job.get());
    if (since) {
      std::int64_t mine = since;
      young_since_ns_.compare_exchange_strong(mine, 0, std::memory_order_relaxed);
    }
    lock.lock();
    c.running.pop_back();
  }
  inflight_.fetch_sub(1, std::memory_order_relaxed);
}

void Pool::serve(Context& c) {
  // Named, so top, perf and gdb tell context threads from the VM's schedulers.
  char name[16];
  std::snprintf(name, sizeof name, "erpy_ctx_%d", c.index);
  pthread_setname_np(pthread_self(), name);
  set_current_context(&c);
  auto self = shared_from_this();  // the pool outlives its threads' loops
  // Made on this thread, so it records this thread's id, which interrupts address.
  c.tstate = PyThreadState_New(PyInterpreterState_Main());
  c.thread_id = PyThread_get_thread_ident();
  std::unique_lock<PoolMutex> lock(m_);
  for (;;) {
    ResourcePtr<Job> job = next_job(c, lock);
    if (!job) {
      if (c.release_requested) {
        lock.unlock();
        do_release(c);
        lock.lock();
        continue;
      }
      break;  // closing, or retired
    }
    run_taken(c, std::move(job), lock);
  }
  const bool retired = c.retired;  // set under the lock by replace_stuck
  lock.unlock();
  PyEval_RestoreThread(c.tstate);
  c.held_ns.reset();
  PyThreadState_Clear(c.tstate);
  PyThreadState_DeleteCurrent();
  set_current_context(nullptr);
  if (retired) retire(&c);  // `c` is gone after this
}

// The end of a replaced context's thread: its job has returned at last.
void Pool::retire(Context* c) {
  std::unique_ptr<Context> gone;
  std::lock_guard<PoolMutex> lock(m_);
  for (auto& r : retired_) {
    if (r.get() == c) {
      gone = std::move(r);
      r = std::move(retired_.back());
      retired_.pop_back();
      break;
    }
  }
}

// A context whose job was cancelled kill_grace_ms ago and still runs it is blocked where
// an interrupt cannot reach (a C function that releases the GIL: time.sleep, a read; the
// exception waits for it to return). Its place goes to a fresh thread, so the pool keeps
// its size; the old thread ends when the call returns (still interrupted then). Held
// contexts are left alone (their namespace is their holder's), as are jobs waiting for
// Erlang (a cancel stops those at once).
void Pool::replace_stuck() {
  if (o_.kill_grace_ms <= 0) return;
  const auto now = Clock::now();
  const auto grace = std::chrono::milliseconds(o_.kill_grace_ms);
  std::vector<Context*> fresh;
  {
    std::lock_guard<PoolMutex> lock(m_);
    if (closing_) return;
    fresh.swap(unstarted_);
    // Code that swallows every interrupt never ends: past this many such threads the
    // pool stops replacing (and shrinks), rather than gathering threads without bound.
    const size_t max_stuck = static_cast<size_t>(std::max(4, o_.size));
    for (auto& jp : to_interrupt_) {
      Job* j = jp.get();
      if (retired_.size() >= max_stuck) break;
      if (j->state != JobState::Canceled || now - j->canceled_at < grace) continue;
      for (auto& slot : ctxs_) {
        Context& c = *slot;
        if (c.held || c.in_callback > 0 || c.running.empty() || c.running.back() != j) continue;
        auto repl = std::make_unique<Context>();
        repl->pool = this;
        repl->index = c.index;
        repl->callback_spin.set_max_ns(c.callback_spin.max_ns());
        repl->handle = std::move(c.handle);
        repl->pinned.swap(c.pinned);
        c.retired = true;
        fresh.push_back(repl.get());
        retired_.push_back(std::exchange(slot, std::move(repl)));
        ++replaced_;
        break;
      }
    }
  }
  // A thread the system refuses now (std::system_error) is asked for again at the next
  // tick; meanwhile the slot takes no work (it is not idle), and close() needs no thread.
  std::vector<Context*> refused;
  for (Context* c : fresh) {
    try {
      start_thread(c);
    } catch (...) {
      refused.push_back(c);
    }
  }
  if (!refused.empty()) {
    std::lock_guard<PoolMutex> lock(m_);
    unstarted_.insert(unstarted_.end(), refused.begin(), refused.end());
  }
}

void Pool::do_release(Context& c) {
  PyEval_RestoreThread(c.tstate);
  c.held_ns.reset();
  PyEval_SaveThread();
  std::lock_guard<PoolMutex> lock(m_);
  c.held = false;
  c.release_requested = false;
  if (!queue_.empty()) c.wake = true;
}

namespace {

// Raises erlang.ErlangError(Reason) in Python, Reason as Python sees the term: args[0]
// is the reason, also when it is a tuple (as in port mode).
[[noreturn]] void raise_erlang_error(ErlNifEnv* env, ERL_NIF_TERM reason, const ConvertOptions& co) {
  Runtime& rt = Runtime::get();
  PyRef value = rt.converter().to_python(env, reason, co);
  PyRef exc = PyRef::check(PyObject_CallOneArg(rt.erlang_error(), value.get()));
  PyErr_SetObject(rt.erlang_error(), exc.get());
  throw PythonError();
}

// The request map (doc/protocol.md) as a term, for the schema every mode shares
// (py/request.hpp): values convert straight to Python objects. The caller is the job's
// own (enif_self at submit), so the field is passed over.
class TermRequestSource {
 public:
  TermRequestSource(ErlNifEnv* env, ERL_NIF_TERM map, Converter& conv, const ConvertOptions& co)
      : env_(env), conv_(conv), co_(co) {
    if (!enif_is_map(env, map) || !enif_map_iterator_create(env, map, &it_, ERL_NIF_MAP_ITERATOR_FIRST)) {
      py::request_error("a request must be a map");
    }
    open_ = true;
  }
  ~TermRequestSource() {
    if (open_) enif_map_iterator_destroy(env_, &it_);
  }
  TermRequestSource(const TermRequestSource&) = delete;
  TermRequestSource& operator=(const TermRequestSource&) = delete;

  bool next(std::string_view& key) {
    if (started_ && !enif_map_iterator_next(env_, &it_)) return false;
    started_ = true;
    ERL_NIF_TERM k;
    if (!enif_map_iterator_get_pair(env_, &it_, &k, &value_)) return false;
    const int n = enif_get_atom(env_, k, key_, sizeof key_, ERL_NIF_LATIN1);
    key = n > 0 ? std::string_view(key_, static_cast<std::size_t>(n - 1)) : std::string_view();
    return true;
  }
  std::optional<std::int64_t> integer() {
    ErlNifSInt64 v;
    if (!enif_get_int64(env_, value_, &v)) return std::nullopt;
    return v;
  }
  std::optional<std::string_view> atom() {
    const int n = enif_get_atom(env_, value_, value_text_, sizeof value_text_, ERL_NIF_LATIN1);
    if (n <= 0) return std::nullopt;
    return std::string_view(value_text_, static_cast<std::size_t>(n - 1));
  }
  PyRef object() { return conv_.to_python(env_, value_, co_); }
  void skip() {}
  void caller(py::Request&) {}
  void reply_to(py::Request&) {}

 private:
  ErlNifEnv* env_;
  Converter& conv_;
  const ConvertOptions& co_;
  ErlNifMapIterator it_{};
  bool open_ = false, started_ = false;
  ERL_NIF_TERM value_ = 0;
  char key_[256], value_text_[256];
};

// The GIL for a context thread, with its own thread state, until release() or the end of
// the scope (also when an exception leaves it).
class ContextGil {
 public:
  explicit ContextGil(PyThreadState* ts) noexcept { PyEval_RestoreThread(ts); }
  ~ContextGil() { release(); }
  ContextGil(const ContextGil&) = delete;
  ContextGil& operator=(const ContextGil&) = delete;
  void release() noexcept {
    if (held_) PyEval_SaveThread();
    held_ = false;
  }

 private:
  bool held_ = true;
};

}  // namespace

// Every job gets an answer, also when something fails past the request's own error
// handling (a C++ error while answering): {error, Reason} (errors.hpp), not a wait for
// the caller's timeout; and no exception leaves the context thread.
void Pool::run_job(Context& c, Job* job) noexcept {
  try {
    run_request(c, job);
  } catch (...) {
    MsgEnv msg = MsgEnv::take();
    const ERL_NIF_TERM answer = enif_make_tuple2(msg.get(), atoms.error, exception_reason(msg.get()));
    finish(job, std::move(msg), answer);
  }
}

void Pool::run_request(Context& c, Job* job) {
  Runtime& rt = Runtime::get();
  if (job->req == atoms.hold) {
    ResourcePtr<ContextHandle> handle;
    {
      std::lock_guard<PoolMutex> lock(m_);
      // No handle: the pool closed meanwhile, and a hold would give Erlang a context it
      // could not name (to check it in).
      handle = c.handle.share();
      if (handle) {
        c.held = true;
        c.holder = job->caller;
        c.holder_monitored = enif_monitor_process(nullptr, handle.get(), &job->caller, &c.holder_monitor) == 0;
        if (!c.holder_monitored) c.release_requested = true;  // the holder is gone already
      }
    }
    MsgEnv msg = MsgEnv::take();
    const ERL_NIF_TERM answer = handle ? enif_make_tuple2(msg.get(), atoms.ok, handle.term(msg.get()))
                                       : enif_make_tuple2(msg.get(), atoms.error, atoms.pool_closed);
    if (!finish(job, std::move(msg), answer) && handle) release(c.index, nullptr, nullptr);  // nobody took it
    return;
  }

  ContextGil gil(c.tstate);
  if (c.interrupt_pending.exchange(false)) {
    // An interrupt meant for a job that ended first must not hit this one.
    PyThreadState_SetAsyncExc(c.thread_id, nullptr);
    PyErr_Clear();
  }
  if (job->hook) {
    MsgEnv msg;
    const ERL_NIF_TERM answer = job->hook(*job, msg);
    gil.release();
    if (answer) {
      finish(job, std::move(msg), answer);
    } else {
      std::lock_guard<PoolMutex> lock(m_);
      if (job->state == JobState::Running) job->state = JobState::Done;
    }
    return;
  }
  const ConvertOptions& co = o_.convert;
  Converter& conv = rt.converter();
  py::Runner& runner = rt.runner();
  // What went wrong, answered below by the one translation (errors.hpp): a Python
  // exception stays pending until then.
  std::exception_ptr failure;
  PyRef result;
  try {
    TermRequestSource src(job->env.get(), job->req, conv, co);
    py::Request req = py::parse_request(src);
    job->want_handle = req.result_handle;
    // A handle (a lent object) in place of a module name: its method is called.
    if (req.kind == py::RequestKind::Call && !PyUnicode_Check(req.module.get())) req.target = std::move(req.module);
    PyRef ns;
    if (py::uses_namespace(req.kind)) {
      if (c.held) {
        if (!c.held_ns) c.held_ns = runner.fresh_namespace();
        ns = PyRef::borrow(c.held_ns.get());
      } else {
        ns = runner.fresh_namespace();
      }
    }
    result = runner.execute(req, ns.get());
  } catch (...) {
    failure = std::current_exception();
  }

  bool canceled, closing;
  {
    std::lock_guard<PoolMutex> lock(m_);
    canceled = job->state == JobState::Canceled;
    closing = closing_;
  }
  if (canceled || closing) {
    // Stopped by its caller (timeout, death) or by close: whatever Python says now is
    // ours. A job the pool's close interrupted answers that the pool closed.
    PyErr_Clear();
    result.reset();
    failure = nullptr;
    gil.release();
    if (!canceled) {
      MsgEnv msg = MsgEnv::take();
      const ERL_NIF_TERM answer = enif_make_tuple2(msg.get(), atoms.error, atoms.pool_closed);
      finish(job, std::move(msg), answer);
    }
    return;
  }
  MsgEnv msg = MsgEnv::take();
  ERL_NIF_TERM answer;
  try {
    if (failure) std::rethrow_exception(failure);
    if (job->want_handle) {
      ResourcePtr<LentObject> lent = make_resource<LentObject>(rt.types.lent, LentObject{result.release()});
      answer = enif_make_tuple2(msg.get(), atoms.ok, lent.term(msg.get()));
    } else {
      // {ok_check, R} when R holds a pid, port, reference or fun: Erlang checks those
      // before the caller gets them, and walks no other result.
      TermInfo info;
      ERL_NIF_TERM r = conv.to_term(msg.get(), result.get(), co, info);
      answer = enif_make_tuple2(msg.get(), info.opaque ? atoms.ok_check : atoms.ok, r);
    }
  } catch (...) {
    answer = exception_answer(msg.get(), co);
  }
  failure = nullptr;
  result.reset();
  gil.release();
  finish(job, std::move(msg), answer);
}

// Hands the answer over unless the job was canceled meanwhile (false then): kept for the
// polling caller (no message, no lock on its process), or sent as {Ref, Answer} once it
// blocks.
bool Pool::finish(Job* job, MsgEnv msg, ERL_NIF_TERM answer) {
  enum class How { Kept, Send, Reply, Parked } how;
  {
    std::lock_guard<PoolMutex> lock(m_);
    // A caller monitor (long jobs) stays: it cannot be removed from this thread, its DOWN
    // finds the job done, and it ends with the job's resource.
    if (job->state == JobState::Canceled || job->state == JobState::Done) return false;
    if (job->async && job->async_state != AsyncState::Adopted) {
      // Nobody waits: the answer goes to the caller as erpy:call returns it, except one
      // Erlang must check first (ok_check), which a runner takes (unless the pool closes:
      // no runner would come, and a closing pool answers that it closed).
      int arity;
      const ERL_NIF_TERM* el;
      const bool check = enif_get_tuple(msg.get(), answer, &arity, &el) && arity == 2 && el[0] == atoms.ok_check;
      if (!check && job->async_state == AsyncState::Direct && job->awaiting.load(std::memory_order_relaxed)) {
        // Its caller spins in erpy:await for it (async_poll): no message needed.
        job->state = JobState::Done;
        job->answer_env = std::move(msg);
        job->answer = answer;
        how = How::Kept;
      } else if (check && job->async_state == AsyncState::Direct && !closing_) {
        job->state = JobState::Done;
        job->answer_env = std::move(msg);
        job->answer = answer;
        park_locked(job);
        how = How::Parked;
      } else {
        if (check) answer = enif_make_tuple2(msg.get(), atoms.error, atoms.pool_closed);
        job->state = JobState::Done;
        job->replied = true;
        how = How::Reply;
      }
    } else {
      how = keep_answer_locked(job, msg, answer) ? How::Kept : How::Send;
    }
  }
  // Both after the mutex is released: a polling caller that sees `settled` then finds the
  // mutex free (see submit), and a send locks the receiving process while submitters wait
  // for m_. A cancel that comes in between finds Done and waits for the message.
  switch (how) {
    case How::Kept: job->settled.store(true, std::memory_order_release); break;
    case How::Send: send_answer(nullptr, job, std::move(msg), answer); break;
    case How::Reply: send_reply(nullptr, job, std::move(msg), answer); break;
    case How::Parked: break;
  }
  return true;
}

// Marks the job done with its answer. Kept in the job for a caller that polls (true: the
// job owns `msg` now), or not (false: the caller blocks, and `msg` is still to be sent
// with send_answer).
bool Pool::keep_answer_locked(Job* job, MsgEnv& msg, ERL_NIF_TERM answer) {
  job->state = JobState::Done;
  if (job->blocking) return false;
  job->answer_env = std::move(msg);
  job->answer = answer;
  return true;
}

// {Ref, Answer} to the caller (or its runner). `env`: the calling NIF's, or null.
void Pool::send_answer(ErlNifEnv* env, Job* job, MsgEnv msg, ERL_NIF_TERM answer) {
  ERL_NIF_TERM ref = enif_make_copy(msg.get(), job->ref);
  ErlNifPid to = job->to();  // set before the job could answer (adopt), read after
  enif_send(env, &to, msg.get(), enif_make_tuple2(msg.get(), ref, answer));
}

// An asynchronous job's reply to its caller, {erpy_reply, {erpy_async, Ref, {erpy_embedded,
// Job}}, Answer} (the id erpy:async_call returned: erpy_async asks the transport it names), with a closed pool's answer as erpy:call gives it.
// Once per job (Job::replied, set under the mutex). `env`: the calling NIF's, or null.
void Pool::send_reply(ErlNifEnv* env, Job* job, MsgEnv msg, ERL_NIF_TERM answer) {
  ErlNifEnv* e = msg.get();
  int arity;
  const ERL_NIF_TERM* el;
  if (enif_get_tuple(e, answer, &arity, &el) && arity == 2 && el[0] == atoms.error && el[1] == atoms.pool_closed) {
    answer = enif_make_copy(e, job->closed);
  }
  const ERL_NIF_TERM id = enif_make_tuple3(e, atoms.erpy_async, enif_make_copy(e, job->ref),
                                          enif_make_tuple2(e, atoms.erpy_embedded, enif_make_resource(e, job)));
  enif_send(env, &job->caller, e, enif_make_tuple3(e, atoms.erpy_reply, id, answer));
  job->reply_sent.store(true, std::memory_order_release);
}

// ---- Python calling Erlang ---------------------------------------------------------------

PyRef Pool::erlang_callback(Context& c, const char* kind, PyObject* m, PyObject* f, PyObject* args) {
  Runtime& rt = Runtime::get();
  Job* job;
  ResourcePtr<ContextHandle> handle;
  {
    std::lock_guard<PoolMutex> lock(m_);
    job = c.running.empty() ? nullptr : c.running.back();
    handle = c.handle.share();
  }
  if (!job) {
    PyErr_SetString(rt.erlang_port_error(), "no Erlang caller: this code does not run for an erpy request");
    throw PythonError();
  }
  const ConvertOptions& co = o_.convert;
  MsgEnv msg = MsgEnv::take();
  // {Ref, {callback | callback_check, Context, Kind, M, F, Args}}: the caller runs it
  // (allow-list first); callback_check when M, F or Args hold a pid, port, reference or
  // fun, which the caller checks. Python's terms count against max_message_size together.
  TermInfo info;
  ERL_NIF_TERM mt, ft, at;
  try {
    mt = rt.converter().to_term(msg.get(), m, co, info);
    ft = f ? rt.converter().to_term(msg.get(), f, co, info) : atoms.undefined;
    at = rt.converter().to_term(msg.get(), args, co, info);
  } catch (const etf::TooLargeError& e) {
    PyErr_Clear();
    raise_erlang_error(msg.get(), too_large_reason(msg.get(), e), co);
  } catch (const UnknownAtomError& e) {
    PyErr_Clear();
    raise_erlang_error(msg.get(), unknown_atom_reason(msg.get(), e), co);
  }
  ERL_NIF_TERM items[] = {info.opaque ? atoms.callback_check : atoms.callback,
                          handle ? handle.term(msg.get()) : atoms.undefined,
                          enif_make_atom(msg.get(), kind), mt, ft, at};
  ERL_NIF_TERM body = enif_make_tuple_from_array(msg.get(), items, 6);
  OwnedEnv reply_env;
  ERL_NIF_TERM reply = 0;
  bool canceled = false;
  {
    py::GilRelease nogil;
    std::unique_lock<PoolMutex> lock(m_);
    ++c.in_callback;  // nested callbacks count too
    young_since_ns_.store(0, std::memory_order_relaxed);  // the GIL is free meanwhile
    if (job->state == JobState::Canceled) {
      canceled = true;
    } else if (job->async && job->async_state == AsyncState::Direct) {
      // Nobody waits for this job: its runner (started for it now) takes the callback.
      job->callback_env = std::move(msg);
      job->callback = body;
      park_locked(job);
    } else {
      if (job->blocking) {
        ERL_NIF_TERM ref = enif_make_copy(msg.get(), job->ref);
        ErlNifPid to = job->to();
        enif_send(nullptr, &to, msg.get(), enif_make_tuple2(msg.get(), ref, body));
      } else {
        // The caller is polling: it takes the callback from the job, no message needed.
        job->callback_env = std::move(msg);
        job->callback = body;
        job->settled.store(true, std::memory_order_release);
      }
    }
    // Wait for the answer, running the nested requests the callback makes meanwhile. A
    // callback into Erlang usually answers within microseconds: spin for it first.
    lock.unlock();
    const bool timed =
        spin(c.callback_spin, [job] { return job->reply_ready.load(std::memory_order_acquire); }) == Spun::skipped;
    const std::int64_t blocked_at = timed ? mono_ns() : 0;
    lock.lock();
    while (!canceled) {
      c.cv.wait(lock, [&] {
        return job->reply_env || job->state == JobState::Canceled || !c.pinned.empty() || closing_;
      });
      if (job->reply_env) {
        if (timed) c.callback_spin.record_blocked(mono_ns() - blocked_at);
        reply_env = std::move(job->reply_env);
        reply = job->reply;
        job->reply_ready.store(false, std::memory_order_relaxed);
        break;
      }
      if (job->state == JobState::Canceled || closing_) {
        canceled = true;
        break;
      }
      ResourcePtr<Job> nested = std::move(c.pinned.front());
      c.pinned.pop_front();
      run_taken(c, std::move(nested), lock);
    }
    --c.in_callback;
  }
  if (canceled) {
    PyErr_SetString(rt.erlang_timeout_error(), "the request was cancelled while Erlang worked");
    throw PythonError();
  }
  int arity;
  const ERL_NIF_TERM* elems;
  if (!enif_get_tuple(reply_env.get(), reply, &arity, &elems) || arity != 2) {
    PyErr_SetString(rt.erlang_error(), "bad callback answer");
    throw PythonError();
  }
  if (elems[0] != atoms.ok) raise_erlang_error(reply_env.get(), elems[1], co);
  return rt.converter().to_python(reply_env.get(), elems[1], co);
}

void Pool::log(PyObject* stream, PyObject* text) {
  // Text only, as UTF-8 (lone surrogates escaped), and at most kMaxLogLine bytes a message
  // as port mode's lines: a print() of a huge str goes as many lines, never as one message
  // of its size into the VM.
  constexpr Py_ssize_t kMaxLogLine = 64 * 1024;
  if (!PyUnicode_Check(text)) {
    PyErr_Format(PyExc_TypeError, "log: text must be a str, not %s", Py_TYPE(text)->tp_name);
    throw PythonError();
  }
  py::PyRef utf8 = py::PyRef::check(PyUnicode_AsEncodedString(text, "utf-8", "backslashreplace"));
  const char* p = PyBytes_AS_STRING(utf8.get());
  const Py_ssize_t n = PyBytes_GET_SIZE(utf8.get());
  Runtime& rt = Runtime::get();
  Py_ssize_t at = 0;
  do {
    Py_ssize_t len = std::min(kMaxLogLine, n - at);
    // Cut before a UTF-8 continuation byte, never inside a character.
    while (at + len < n && len > 0 && (static_cast<unsigned char>(p[at + len]) & 0xC0) == 0x80) --len;
    MsgEnv msg = MsgEnv::take();
    TermInfo info;
    // The stream's name makes no new atom (log_convert_ has no budget).
    ERL_NIF_TERM s = rt.converter().to_term(msg.get(), stream, log_convert_, info);
    ERL_NIF_TERM line;
    unsigned char* dst = enif_make_new_binary(msg.get(), static_cast<size_t>(len), &line);
    if (!dst) throw std::bad_alloc();
    if (len) std::memcpy(dst, p + at, static_cast<size_t>(len));
    ERL_NIF_TERM t = enif_make_tuple3(msg.get(), atoms.erpy_log, s, line);
    ErlNifPid owner = o_.owner;
    enif_send(nullptr, &owner, msg.get(), t);
    at += len;
  } while (at < n);
}

// ---- the service thread ------------------------------------------------------------------

void Pool::interrupt_canceled() {
  std::vector<unsigned long> woken;
  {
    std::lock_guard<PoolMutex> lock(m_);
    interrupt_canceled_locked(woken);
  }
  // After the lock: waking an event loop runs Python code (the exception is set already).
  for (unsigned long tid : woken) py::wake_event_loop(tid);
}

void Pool::interrupt_canceled_locked(std::vector<unsigned long>& woken) {
  std::vector<ResourcePtr<Job>> still;
  for (auto& jp : to_interrupt_) {
    Job* j = jp.get();
    bool running = false;
    auto interrupt = [&](Context& c) {
      if (std::find(c.running.begin(), c.running.end(), j) != c.running.end()) {
        // KeyboardInterrupt, as port mode: `except Exception` in user code does not stop it.
        PyThreadState_SetAsyncExc(c.thread_id, PyExc_KeyboardInterrupt);
        woken.push_back(c.thread_id);
        c.interrupt_pending = true;
        running = true;
      }
    };
    for (auto& c : ctxs_) interrupt(*c);
    for (auto& c : retired_) interrupt(*c);
    // Sent again at every tick until the job has stopped: before 3.12 the signal for
    // asynchronous exceptions is one flag per interpreter, so the first thread to take its
    // exception clears it for the others, whose exceptions then wait unseen (seen with
    // several contexts timing out at once).
    if (running) still.push_back(std::move(jp));
  }
  to_interrupt_.swap(still);  // the others' references go with `still`
}

void Pool::kick_stalled() {
  std::lock_guard<PoolMutex> lock(m_);
  if (queue_.empty() || closing_ || spinning_.load(std::memory_order_acquire)) return;
  for (auto& c : ctxs_) {
    if (c->idle && !c->held && !c->wake) {
      c->wake = true;
      c->cv.notify_one();
      return;
    }
  }
}

bool Pool::has_interrupts() {
  std::lock_guard<PoolMutex> lock(m_);
  return !to_interrupt_.empty();
}

void Pool::monitor_long_jobs(std::chrono::milliseconds after) {
  const auto now = Clock::now();
  std::vector<Job*> dead;
  {
    std::lock_guard<PoolMutex> lock(m_);
    for (auto& c : ctxs_) {
      for (Job* j : c->running) {
        if (j->monitored || j->state != JobState::Running || now - j->started < after) continue;
        // A caller that dies mid-call cancels it; watched only once a job runs long, so a
        // short call pays nothing for it.
        const int r = enif_monitor_process(nullptr, j, &j->caller, &j->monitor);
        if (r == 0) j->monitored = true;
        else if (r > 0) dead.push_back(j);
      }
    }
    for (Job* j : dead) cancel_locked(j);
  }
}

}  // namespace erpy::nif
