#include "channel.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstring>
#include <utility>
#include <stdexcept>
#include <vector>

namespace erpy::worker {

void Channel::enlarge_pipes() noexcept {
#ifdef F_SETPIPE_SZ
  for (int fd : {in_, out_}) (void)fcntl(fd, F_SETPIPE_SZ, 1 << 20);
#endif
}

bool Channel::take_spin_token() noexcept {
  if (spin_token_ >= 0) return true;
  for (unsigned i = 0; i < spin_limit_; ++i) {
    const int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return false;
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    // Abstract namespace (leading NUL): no file, gone with the process.
    const int n = std::snprintf(addr.sun_path + 1, sizeof addr.sun_path - 1, "erpy-spin-%s-%u",
                                spin_group_.c_str(), i);
    const socklen_t len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + n);
    if (bind(fd, reinterpret_cast<sockaddr*>(&addr), len) == 0) {
      spin_token_ = fd;
      return true;
    }
    close(fd);
  }
  return false;
}

void Channel::drop_spin_token() noexcept {
  if (spin_token_ >= 0) close(std::exchange(spin_token_, -1));
}

// Polls the pipe before the caller blocks on it, as long as the policy says spinning
// pays (common/spin_wait.hpp): sched_yield between polls hands the core to any thread
// that wants it, and such a thread shows as a gap that stops the spin. The token is kept
// while requests keep coming within the window, and given up when the worker blocks.
Spun Channel::spin() noexcept {
  // The policy first: a worker that blocks at once makes no system call for the token.
  const std::int64_t budget = policy_.budget_ns();
  if (budget <= 0) {
    drop_spin_token();
    return Spun::skipped;
  }
  if (!take_spin_token()) return Spun::gave_up;
  std::int64_t lost = 0;
  const SpinPolicy::Outcome o = spin_for(
      budget, 1,
      [this] {
        pollfd p{in_, POLLIN, 0};
        return poll(&p, 1, 0) != 0;
      },
      [] { sched_yield(); }, [] {}, &lost);
  policy_.record(SpinPolicy::verdict(o, lost));
  if (o == SpinPolicy::Outcome::found) return Spun::found;
  drop_spin_token();
  return Spun::gave_up;
}

Channel::Fill Channel::fill(bool interruptible) {
  if (rpos_ == rlen_) {
    rpos_ = rlen_ = 0;
  } else if (rpos_ > 0 && rlen_ == rbuf_.size()) {
    std::memmove(rbuf_.data(), rbuf_.data() + rpos_, rlen_ - rpos_);
    rlen_ -= rpos_;
    rpos_ = 0;
  }
  // A wait the policy let block at once is timed: one that ends within the spin budget
  // tells the policy that spinning would have paid.
  const bool timed = policy_.max_ns() > 0 && interruptible && spin() == Spun::skipped;
  const std::int64_t blocked_at = timed ? mono_ns() : 0;
  for (;;) {
    const ssize_t got = ::read(in_, rbuf_.data() + rlen_, rbuf_.size() - rlen_);
    if (got > 0) {
      if (timed) policy_.record_blocked(mono_ns() - blocked_at);
      rlen_ += static_cast<std::size_t>(got);
      return Fill::ok;
    }
    if (got == 0) return Fill::eof;
    if (errno != EINTR) return Fill::eof;
    if (interruptible) return Fill::interrupted;
  }
}

// Reads the rest of a frame straight into its destination (big payloads skip the
// read-ahead buffer).
bool Channel::read_exact(std::uint8_t* p, std::size_t n) {
  const std::size_t from_buffer = std::min(n, avail());
  std::memcpy(p, rbuf_.data() + rpos_, from_buffer);
  rpos_ += from_buffer;
  p += from_buffer;
  n -= from_buffer;
  while (n) {
    const ssize_t got = ::read(in_, p, n);
    if (got > 0) {
      p += got;
      n -= static_cast<std::size_t>(got);
    } else if (got == 0 || errno != EINTR) {
      return false;
    }
  }
  return true;
}

bool Channel::skip_exact(std::size_t n) {
  const std::size_t from_buffer = std::min(n, avail());
  rpos_ += from_buffer;
  n -= from_buffer;
  std::vector<std::uint8_t> sink(std::min<std::size_t>(n, 1 << 16));
  while (n) {
    const std::size_t k = std::min(n, sink.size());
    if (!read_exact(sink.data(), k)) return false;
    n -= k;
  }
  return true;
}

Channel::Read Channel::read_frame(ByteBuffer& out, std::size_t max, std::size_t& oversize) {
  oversize = 0;
  while (avail() < 4) {
    // A signal may only interrupt the wait for a frame, never a frame half read.
    switch (fill(avail() == 0)) {
      case Fill::ok: break;
      case Fill::eof: return Read::eof;
      case Fill::interrupted: return Read::interrupted;
    }
  }
  const std::uint8_t* head = rbuf_.data() + rpos_;
  const std::size_t len = (std::size_t{head[0]} << 24) | (std::size_t{head[1]} << 16) |
                          (std::size_t{head[2]} << 8) | head[3];
  rpos_ += 4;
  if (len > max) {
    oversize = len;
    return skip_exact(len) ? Read::frame : Read::eof;
  }
  out.clear();
  if (len && !read_exact(out.append_uninitialized(len), len)) return Read::eof;
  return Read::frame;
}

bool Channel::write_frame(ByteBuffer& b, const std::uint8_t* tail, std::size_t tail_len) {
  const std::size_t len = b.size() - 4 + tail_len;
  std::uint8_t* p = b.data();
  p[0] = static_cast<std::uint8_t>(len >> 24);
  p[1] = static_cast<std::uint8_t>(len >> 16);
  p[2] = static_cast<std::uint8_t>(len >> 8);
  p[3] = static_cast<std::uint8_t>(len);
  iovec iov[2] = {{p, b.size()}, {const_cast<std::uint8_t*>(tail), tail_len}};
  int first = 0;
  const int count = tail_len ? 2 : 1;
  std::lock_guard<std::mutex> lock(write_mu_);
  while (first < count) {
    const ssize_t put = ::writev(out_, iov + first, count - first);
    if (put < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    auto left = static_cast<std::size_t>(put);
    while (first < count && left >= iov[first].iov_len) {
      left -= iov[first].iov_len;
      ++first;
    }
    if (first < count) {
      iov[first].iov_base = static_cast<std::uint8_t*>(iov[first].iov_base) + left;
      iov[first].iov_len -= left;
    }
  }
  return true;
}

}  // namespace erpy::worker
