// A mutex for critical sections of a few dozen instructions that are taken by Erlang
// schedulers and context threads alike: it spins instead of sleeping in the kernel, since
// on the VMs we run on a system call costs more than a microsecond (a futex wait and wake
// pair is several), far more than the section it protects. After a while of spinning
// (its holder was preempted) it yields the CPU between tries.
#pragma once
#include <sched.h>

#include <atomic>

#include "common/cpu_relax.hpp"

namespace erpy::nif {

class SpinMutex {
 public:
  void lock() noexcept {
    for (int spins = 0;; ++spins) {
      if (!locked_.exchange(true, std::memory_order_acquire)) return;
      while (locked_.load(std::memory_order_relaxed)) {
        if (spins < kSpinsBeforeYield) {
          ++spins;
          cpu_relax();
        } else {
          sched_yield();
        }
      }
    }
  }
  bool try_lock() noexcept {
    return !locked_.load(std::memory_order_relaxed) &&
           !locked_.exchange(true, std::memory_order_acquire);
  }
  void unlock() noexcept { locked_.store(false, std::memory_order_release); }

 private:
  static constexpr int kSpinsBeforeYield = 100;
  std::atomic<bool> locked_{false};
};

}  // namespace erpy::nif
