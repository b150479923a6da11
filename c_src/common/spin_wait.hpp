// Adaptive spin-then-block waiting, shared by the port worker (its pipe), the embedded
// pool's context threads (the job queue, a callback's answer) and the embedded callers
// (their answer).
//
// Spinning pays when the awaited event comes within microseconds and the thread we wait
// for runs on another core: a wake-up from sleep costs tens of microseconds on virtual
// machines. It hurts when the awaited thread needs the core the spinner holds (a busy
// machine, or both on one core): the spinner then delays the very event it waits for,
// and a preempted spinner answers later than a sleeper would (the kernel favours waking
// sleepers). So every wait asks its SpinPolicy how long to spin, and tells it how the
// spin went:
// - found: the event came while spinning; the backoff halves;
// - timed_out: it did not come within the budget (the other side went idle, or works
//   longer than we spin);
// - preempted: the spinner lost its CPU meanwhile (gaps in its clock reads, each longer
//   than kGapNs, adding up to more than kWakeNs: other threads ran on that core), so the
//   core is contended. An event found after shorter losses still counts as found: the
//   thread that ran in the gap was most likely the one we wait for (a yielding spinner
//   hands the core to it), and the spin still saved the wake-up a sleeper would have
//   paid. Only losses longer than a wake-up mean blocking would have done as well.
// A failed spin doubles the penalty (up to kMaxPenalty) and the next `penalty` waits
// block at once; the wait after them spins again, as a probe. A good probe lowers the
// penalty: by half after timeouts, by one after preemption (so a machine that is busy
// now and then keeps its waiters blocking until it has been quiet for a while). A blocked wait that ended
// sooner than the spin budget shows that spinning would have found the event, which
// undoes a backoff that timeouts caused (not one that preemption caused: blocking is what
// helps a contended core). The policy is plain relaxed atomics, so waiters that take
// turns (one idle context at a time) can share one; it is a hint, races cost nothing.
#pragma once
#include <sched.h>
#include <time.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "common/cpu_relax.hpp"

namespace erpy {

// CLOCK_MONOTONIC in ns (a vDSO read, no system call).
inline std::int64_t mono_ns() noexcept {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return std::int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}

// The CPU this thread runs on now, -1 if unknown (a vDSO read or one instruction).
inline int current_cpu() noexcept { return sched_getcpu(); }

class SpinPolicy {
 public:
  enum class Outcome { found, timed_out, preempted };
  // A gap this long between two clock reads of a spin loop means the thread was off its
  // CPU (a timer tick or a hypervisor exit costs a few microseconds, a thread that runs
  // in our place a time slice).
  static constexpr std::int64_t kGapNs = 20000;
  // What waking a sleeping thread costs at most on these virtual machines: a spin that
  // lost more than this to other threads did no better than blocking would have.
  static constexpr std::int64_t kWakeNs = 60000;
  static constexpr int kMaxPenalty = 255;

  // How a spin went, from its result and the time it lost to other threads.
  static Outcome verdict(Outcome o, std::int64_t lost_ns) noexcept {
    if (lost_ns > kWakeNs) return Outcome::preempted;
    if (o == Outcome::found) return o;
    return lost_ns > kGapNs ? Outcome::preempted : o;
  }

  explicit SpinPolicy(std::int64_t max_ns = 0) noexcept : max_ns_(max_ns) {}
  SpinPolicy(const SpinPolicy&) = delete;
  SpinPolicy& operator=(const SpinPolicy&) = delete;

  void set_max_ns(std::int64_t ns) noexcept { max_ns_.store(ns, std::memory_order_relaxed); }
  std::int64_t max_ns() const noexcept { return max_ns_.load(std::memory_order_relaxed); }

  // Before a wait: how long to spin, 0 to block at once.
  std::int64_t budget_ns() noexcept {
    const std::int64_t max = max_ns();
    if (max <= 0) return 0;
    const int skip = skip_.load(std::memory_order_relaxed);
    if (skip > 0) {
      skip_.store(skip - 1, std::memory_order_relaxed);
      return 0;
    }
    return max;
  }

  void record(Outcome o) noexcept {
    const int p = penalty_.load(std::memory_order_relaxed);
    if (o == Outcome::found) {
      // Contention comes and goes with the machine's load: its backoff winds down one
      // step per good probe (about a second from the top here), a timeout's by halves.
      const bool contended = preempted_.load(std::memory_order_relaxed);
      const int next = contended ? std::max(p - 1, 0) : p / 2;
      penalty_.store(next, std::memory_order_relaxed);
      if (next == 0) preempted_.store(false, std::memory_order_relaxed);
      return;
    }
    const int next = std::min(2 * p + 1, kMaxPenalty);
    penalty_.store(next, std::memory_order_relaxed);
    skip_.store(next, std::memory_order_relaxed);
    if (o == Outcome::preempted) preempted_.store(true, std::memory_order_relaxed);
  }

  // A wait that blocked without spinning (budget 0) took `waited_ns`.
  void record_blocked(std::int64_t waited_ns) noexcept {
    if (waited_ns > max_ns() || preempted_.load(std::memory_order_relaxed)) return;
    const int p = penalty_.load(std::memory_order_relaxed) / 2;
    penalty_.store(p, std::memory_order_relaxed);
    if (skip_.load(std::memory_order_relaxed) > p) skip_.store(p, std::memory_order_relaxed);
  }

  // For tests and pool_info: the current backoff.
  int penalty() const noexcept { return penalty_.load(std::memory_order_relaxed); }
  int skip() const noexcept { return skip_.load(std::memory_order_relaxed); }

 private:
  std::atomic<std::int64_t> max_ns_;
  std::atomic<int> penalty_{0};
  std::atomic<int> skip_{0};
  std::atomic<bool> preempted_{false};
};

// Spins up to `budget_ns` until `ready()`, calling `pause()` between checks and reading
// the clock every `checks_per_read` checks (clock reads cost more than a check on these
// machines). `tick()` runs at each clock read (e.g. to yield when the awaited thread
// shares our CPU). `lost_ns` (if given) receives the time other threads took from the
// spin (gaps over kGapNs between clock reads). Stops early, as preempted, once that
// exceeds kWakeNs; a last check then still finds an event that came meanwhile (found
// wins: the caller needs the event; SpinPolicy::verdict still calls the spin preempted).
template <class Ready, class Pause, class Tick>
SpinPolicy::Outcome spin_for(std::int64_t budget_ns, int checks_per_read, Ready&& ready, Pause&& pause,
                             Tick&& tick, std::int64_t* lost_ns = nullptr) {
  const std::int64_t start = mono_ns();
  std::int64_t last = start, lost = 0;
  auto done = [&](SpinPolicy::Outcome o) {
    if (lost_ns) *lost_ns = lost;
    return o;
  };
  for (;;) {
    for (int i = 0; i < checks_per_read; ++i) {
      if (ready()) return done(SpinPolicy::Outcome::found);
      pause();
    }
    const std::int64_t now = mono_ns();
    if (now - last > SpinPolicy::kGapNs) lost += now - last;
    if (lost > SpinPolicy::kWakeNs) {
      return done(ready() ? SpinPolicy::Outcome::found : SpinPolicy::Outcome::preempted);
    }
    if (now - start >= budget_ns) return done(ready() ? SpinPolicy::Outcome::found : SpinPolicy::Outcome::timed_out);
    last = now;
    tick();
  }
}

// spin_for with the policy's budget, recording its verdict (SpinPolicy::verdict). `skipped`: the policy said block at once (the caller then times its
// blocked wait for record_blocked); `gave_up`: block now.
enum class Spun { found, gave_up, skipped };

template <class Ready, class Pause, class Tick>
Spun adaptive_spin(SpinPolicy& policy, int checks_per_read, Ready&& ready, Pause&& pause, Tick&& tick) {
  const std::int64_t budget = policy.budget_ns();
  if (budget <= 0) return Spun::skipped;
  std::int64_t lost = 0;
  const SpinPolicy::Outcome o = spin_for(budget, checks_per_read, ready, pause, tick, &lost);
  policy.record(SpinPolicy::verdict(o, lost));
  return o == SpinPolicy::Outcome::found ? Spun::found : Spun::gave_up;
}

}  // namespace erpy
