#include "channel.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <stdexcept>
#include <vector>

namespace erpy::worker {

void Channel::enlarge_pipes() noexcept {
#ifdef F_SETPIPE_SZ
  for (int fd : {in_, out_}) (void)fcntl(fd, F_SETPIPE_SZ, 1 << 20);
#endif
}

bool Channel::read_exact(std::uint8_t* p, std::size_t n) {
  while (n) {
    const ssize_t got = ::read(in_, p, n);
    if (got > 0) {
      p += got;
      n -= static_cast<std::size_t>(got);
    } else if (got == 0) {
      return false;
    } else if (errno != EINTR) {
      return false;
    }
  }
  return true;
}

bool Channel::skip_exact(std::size_t n) {
  std::vector<std::uint8_t> sink(std::min<std::size_t>(n, 1 << 16));
  while (n) {
    const std::size_t k = std::min(n, sink.size());
    if (!read_exact(sink.data(), k)) return false;
    n -= k;
  }
  return true;
}

Channel::Read Channel::read_frame(ByteBuffer& out, std::size_t max, std::size_t& oversize) {
  std::uint8_t head[4];
  // The first byte may wait for a long time: a signal there lets the caller look at it.
  ssize_t got;
  do {
    got = ::read(in_, head, 1);
    if (got < 0 && errno == EINTR) return Read::interrupted;
  } while (got < 0 && errno == EINTR);
  if (got <= 0) return Read::eof;
  if (!read_exact(head + 1, 3)) return Read::eof;
  const std::size_t len = (std::size_t{head[0]} << 24) | (std::size_t{head[1]} << 16) |
                          (std::size_t{head[2]} << 8) | head[3];
  oversize = 0;
  if (len > max) {
    oversize = len;
    return skip_exact(len) ? Read::frame : Read::eof;
  }
  out.clear();
  if (len) {
    // Grow once to the frame's size, then read straight into the buffer.
    if (!read_exact(out.append_uninitialized(len), len)) return Read::eof;
  }
  return Read::frame;
}

bool Channel::write_frame(ByteBuffer& b) {
  const std::size_t len = b.size() - 4;
  std::uint8_t* p = b.data();
  p[0] = static_cast<std::uint8_t>(len >> 24);
  p[1] = static_cast<std::uint8_t>(len >> 16);
  p[2] = static_cast<std::uint8_t>(len >> 8);
  p[3] = static_cast<std::uint8_t>(len);
  std::lock_guard<std::mutex> lock(write_mu_);
  std::size_t left = b.size();
  while (left) {
    const ssize_t put = ::write(out_, p, left);
    if (put < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    p += put;
    left -= static_cast<std::size_t>(put);
  }
  return true;
}

}  // namespace erpy::worker
