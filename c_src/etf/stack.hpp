// How deep recursion may go on the current thread's stack.
//
// Every walk that follows the nesting of its input (the decoder, the Python encoder, the
// NIF's converter) recurses once per level, so `max_depth` alone cannot keep it on the
// stack: a caller may set it to 10**7, and the stack it runs on may be small (a Python
// thread made after threading.stack_size(64 * 1024), an Erlang scheduler's). Each level
// also checks that its frame is still above a floor near the bottom of this thread's
// stack, which leaves room for what runs at the deepest level (a Python call, a C++ throw).
#pragma once
#include <pthread.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace etf {

class StackFloor {
 public:
  // The floor of the calling thread (found once per thread, then cached).
  static StackFloor current() noexcept { return StackFloor(thread_floor()); }

  // True once the caller's frame is below the floor: recursing further is unsafe.
  [[gnu::always_inline]] bool reached() const noexcept {
    return reinterpret_cast<std::uintptr_t>(__builtin_frame_address(0)) < floor_;
  }

  // Kept free below the floor: what the deepest level may still use.
  static constexpr std::size_t kReserve = 256 * 1024;

 private:
  explicit StackFloor(std::uintptr_t f) noexcept : floor_(f) {}

  static std::uintptr_t thread_floor() noexcept {
    static thread_local std::uintptr_t floor = 0;
    if (floor == 0) floor = find_floor();
    return floor;
  }

  [[gnu::noinline]] static std::uintptr_t find_floor() noexcept {
    const auto here = reinterpret_cast<std::uintptr_t>(__builtin_frame_address(0));
    std::uintptr_t low = 0;
    std::size_t size = 0;
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      void* addr = nullptr;
      if (pthread_attr_getstack(&attr, &addr, &size) == 0) low = reinterpret_cast<std::uintptr_t>(addr);
      pthread_attr_destroy(&attr);
    }
    if (low == 0 || size == 0 || here < low || here - low > size) {
      // Unknown bounds: assume a small stack (64 KiB in use, 512 KiB in all).
      return here > 448 * 1024 ? here - 448 * 1024 : here;
    }
    // A main thread without a stack limit reports an unbounded size; trust 64 MiB of it.
    const std::size_t below = std::min<std::size_t>(here - low, std::size_t{64} << 20);
    const std::uintptr_t bottom = here - below;
    // Small stacks keep a quarter of themselves instead of the whole reserve.
    const std::size_t reserve = std::min(kReserve, size / 4);
    return bottom + reserve;
  }

  std::uintptr_t floor_;
};

}  // namespace etf
