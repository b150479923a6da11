// The port's two pipes: {packet, 4} frames in on one fd, out on the other. Writes come
// from the main thread and the output-capture thread, so they are serialized here; reads
// belong to whoever holds read_mutex() (the main thread, or the watchdog while Python
// runs user code).
#pragma once
#include <cstdint>
#include <mutex>

#include "py/buffer.hpp"

namespace erpy::worker {

using py::ByteBuffer;

class Channel {
 public:
  Channel(int in_fd, int out_fd) noexcept : in_(in_fd), out_(out_fd) {}
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  // Larger pipes mean fewer wake-ups for big messages (Linux caps this for non-root
  // processes at /proc/sys/fs/pipe-max-size).
  void enlarge_pipes() noexcept;

  enum class Read { frame, eof, interrupted };
  // Reads one frame into `out` (replacing its contents). `interrupted` when a signal came
  // in before any byte of the frame did, so the caller can check for Python signals; a
  // frame once started is always read to its end. Frames over `max` bytes are consumed
  // and reported as too large by `oversize`.
  Read read_frame(ByteBuffer& out, std::size_t max, std::size_t& oversize);

  // Frames are built with 4 spare bytes in front (begin_frame), filled in here.
  static void begin_frame(ByteBuffer& b) {
    b.clear();
    const std::uint8_t zero[4] = {0, 0, 0, 0};
    b.write(zero, 4);
  }
  // Writes a frame made with begin_frame; false if Erlang is gone.
  bool write_frame(ByteBuffer& b);

  std::mutex& read_mutex() noexcept { return read_mu_; }
  int in_fd() const noexcept { return in_; }

 private:
  bool read_exact(std::uint8_t* p, std::size_t n);
  bool skip_exact(std::size_t n);

  int in_;
  int out_;
  std::mutex read_mu_;
  std::mutex write_mu_;
};

}  // namespace erpy::worker
