// The port's two pipes: {packet, 4} frames in on one fd, out on the other. Writes come
// from the main thread and the output-capture thread, so they are serialized here; reads
// belong to whoever holds read_mutex() (the main thread, or the watchdog while Python
// runs user code).
#pragma once
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "common/spin_wait.hpp"
#include "etf/encode.hpp"
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
  // begin_frame, then the start of a tagged tuple {Tag, ...} of `arity` elements (the
  // shape of every protocol frame); the caller appends the other elements.
  static void begin_tuple_frame(ByteBuffer& b, std::size_t arity, std::string_view tag) {
    begin_frame(b);
    etf::put_version(b);
    etf::put_tuple_header(b, arity);
    etf::put_atom(b, tag);
  }
  // Writes a frame made with begin_frame; false if Erlang is gone.
  bool write_frame(ByteBuffer& b) { return write_frame(b, nullptr, 0); }
  // The same with `tail` bytes after the buffer's, written from where they are (writev).
  bool write_frame(ByteBuffer& b, const std::uint8_t* tail, std::size_t tail_len);

  // Before sleeping on an empty pipe, poll it for up to `us`: a caller that sends its
  // next request at once finds the worker awake (waking a sleeping process costs tens of
  // microseconds on virtual machines). Adaptive (common/spin_wait.hpp): the worker spins
  // only while spins find a request and keep their CPU; 0 turns spinning off.
  // Spinning workers compete with the VM for the CPUs, so at most `limit` workers of a
  // `group` (one VM) spin at a time; the others sleep at once.
  void set_spin(unsigned us, std::string group, unsigned limit) {
    policy_.set_max_ns(std::int64_t{us} * 1000);
    spin_group_ = std::move(group);
    spin_limit_ = limit;
  }
  const SpinPolicy& spin_policy() const noexcept { return policy_; }

  std::mutex& read_mutex() noexcept { return read_mu_; }
  int in_fd() const noexcept { return in_; }
  int out_fd() const noexcept { return out_; }
  // Where the spin token's fd is kept (-1 when none is held), for forked children to close.
  const int* spin_token_slot() const noexcept { return &spin_token_; }
  // Bytes already read from the pipe but not yet handed out (a frame may be waiting
  // here although the pipe itself is empty).
  bool buffered() const noexcept { return rlen_ > rpos_; }

 private:
  enum class Fill { ok, eof, interrupted };
  // Reads what the pipe has (one system call) into the read-ahead buffer.
  Fill fill(bool interruptible);
  Spun spin() noexcept;
  bool read_exact(std::uint8_t* p, std::size_t n);
  bool skip_exact(std::size_t n);
  std::size_t avail() const noexcept { return rlen_ - rpos_; }

  int in_;
  int out_;
  // Read-ahead: a small frame usually arrives with one read() instead of three.
  static constexpr std::size_t kReadAhead = 64 * 1024;
  std::vector<std::uint8_t> rbuf_ = std::vector<std::uint8_t>(kReadAhead);
  std::size_t rpos_ = 0;
  std::size_t rlen_ = 0;
  SpinPolicy policy_;
  std::string spin_group_;
  unsigned spin_limit_ = 1;
  // A bound abstract Unix socket is a token: the kernel frees it when the process dies.
  int spin_token_ = -1;
  bool take_spin_token() noexcept;
  void drop_spin_token() noexcept;
  std::mutex read_mu_;
  std::mutex write_mu_;
};

}  // namespace erpy::worker
