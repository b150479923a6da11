// A hint to the CPU inside a busy-wait loop: the waiting thread backs off, so the
// core's other hardware thread (and the memory bus) serve the thread being waited for.
// The instruction differs per architecture; elsewhere the thread yields its time slice,
// which also lets the awaited thread run.
#pragma once
#include <sched.h>

namespace erpy {

inline void cpu_relax() noexcept {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__) || (defined(__arm__) && defined(__ARM_ARCH) && __ARM_ARCH >= 7)
  asm volatile("yield" ::: "memory");
#elif defined(__powerpc__) || defined(__powerpc64__)
  asm volatile("or 27,27,27" ::: "memory");
#else
  sched_yield();
#endif
}

}  // namespace erpy
