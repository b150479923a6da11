// Interrupts Python when a request passes its deadline or Erlang cancels it.
//
// A thread wakes every few milliseconds (no per-request syscalls: the main thread only
// updates a small stack under an uncontended mutex). To interrupt, it signals the main
// thread: the handler trips a Python signal whose handler raises KeyboardInterrupt (at the
// next bytecode; not SIGINT, which may be ignored) and the signal also breaks blocking
// system calls such as sleep(). The handler only acts
// while the request it was aimed at still runs, so a late signal cannot hit the next one.
//
// While Python runs user code nobody else reads the request pipe, so the watchdog does:
// a cancel or withdraw frame is acted on, anything else is kept for the main thread.
//
// Requests not started yet live here too, in order: those the watchdog read (the
// stash) and those the main thread read while a request waited for a callback's answer
// (deferred: they run after that request, never inside its callback). A withdraw frame
// takes such a request back: the worker answers {withdrawn, Id} and never runs it. It also notices
// Erlang closing the port (the VM or the worker is gone) and ends the process then.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "channel.hpp"

namespace erpy::worker {

class Watchdog {
 public:
  Watchdog(Channel& ch, std::size_t max_frame) : ch_(ch), max_frame_(max_frame) {}
  ~Watchdog();
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  void set_max_frame(std::size_t max) noexcept { max_frame_ = max; }

  // Installs the signal handlers (main thread, GIL held) and starts the thread.
  void start();

  // The main thread starts (and ends) work on a request. `deadline_ms` is wall-clock
  // milliseconds, 0 for none.
  void enter(std::int64_t id, std::int64_t deadline_ms);
  void leave();
  // Erlang cancelled request `id` (the main thread read the frame itself).
  void cancel(std::int64_t id);
  // True (once) if request `id` was cancelled before it started.
  bool take_precancelled(std::int64_t id);
  // True if the innermost request was cancelled or timed out.
  bool innermost_stopped();

  // A frame the watchdog read while Python ran; false if none.
  bool take_stashed(ByteBuffer& out);
  // A request frame the main thread read during a callback's wait, to run after the
  // running request; take_deferred gives them back in order.
  void defer(ByteBuffer&& frame);
  bool take_deferred(ByteBuffer& out);
  // Erlang withdrew request `id`: true if it had not started (it is dropped, and the
  // caller answers {withdrawn, Id}); false if it runs, ran or never came.
  bool withdraw(std::int64_t id);
  // Writes {withdrawn, Id} (any thread).
  void answer_withdrawn(std::int64_t id);

 private:
  struct Active {
    std::int64_t id;
    std::int64_t deadline_ms;
    bool stop = false;
  };

  void run();
  void read_while_busy();
  void fire();

  Channel& ch_;
  std::size_t max_frame_;
  std::mutex mu_;
  std::vector<Active> stack_;
  static constexpr std::size_t kMaxPrecancelled = 64;
  std::vector<std::int64_t> precancelled_;
  std::deque<ByteBuffer> stash_;
  std::atomic<bool> stash_nonempty_{false};
  std::deque<ByteBuffer> deferred_;
  std::thread thread_;
  std::atomic<bool> quit_{false};
};

}  // namespace erpy::worker
