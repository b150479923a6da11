#include "connection.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <thread>
#include <time.h>

#include "common/cpu_relax.hpp"

namespace erpy::node {

namespace {


// Senders that may wait (send_waiting) do so while this much is queued: a stalled peer
// slows the Python threads that send to it, as a busy distribution port does in OTP.
constexpr std::size_t kBusyMark = std::size_t{4} << 20;

}  // namespace

Connection::Connection(Fd f, const InLimits& in, std::size_t max_backlog, std::int64_t spin_ns)
    : fd(std::move(f)), max_backlog_(max_backlog), spin_ns_(spin_ns), spin_budget_(spin_ns) {
  frames.set_limits(in);
}

// --- reading ------------------------------------------------------------------------------

bool Connection::has_frame() const {
  if (skip || rend - rpos < 4) return false;
  const std::uint8_t* h = rbuf.get() + rpos;
  const std::size_t len = (std::size_t{h[0]} << 24) | (std::size_t{h[1]} << 16) | (std::size_t{h[2]} << 8) | h[3];
  return rend - rpos >= 4 + len;
}

void Connection::next_frame(std::uint8_t*& data, std::size_t& len, std::size_t& full) {
  constexpr std::size_t kInitial = 256 * 1024;
  auto ensure_buffer = [&] {
    if (rcap) return;
    rbuf.reset(new std::uint8_t[kInitial]);
    rcap = kInitial;
    rpos = rend = 0;
  };
  auto receive = [&](std::size_t room, int flags) { return recv_some(room, flags); };
  auto fill = [&](std::size_t need) {
    if (rend - rpos >= need) return;
    if (rcap - rpos < need) {
      const std::size_t have = rend - rpos;
      if (rcap >= need) {
        std::memmove(rbuf.get(), rbuf.get() + rpos, have);
      } else {
        const std::size_t cap = std::max(kInitial, need + (need >> 2));
        std::unique_ptr<std::uint8_t[]> fresh(new std::uint8_t[cap]);
        if (have) std::memcpy(fresh.get(), rbuf.get() + rpos, have);
        rbuf = std::move(fresh);
        rcap = cap;
      }
      rend = have;
      rpos = 0;
    }
    // Waking a thread blocked in recv costs 5 to 60 us on these machines: with spin_us,
    // poll the socket a while after the last data before sleeping in recv, so a burst of
    // messages or back-to-back calls is read without that wake-up. Only while it pays
    // (spin_budget_ adapts, see connection.hpp).
    while (rend - rpos < need) {
      if (spin_ns_ > 0 && spin_cooldown_ == 0 && spin_budget_ > 0 && spin(rcap - rend)) continue;
      if (spin_cooldown_ > 0) --spin_cooldown_;
      const std::int64_t t0 = spin_ns_ > 0 ? now_ns() : 0;
      if (receive(rcap - rend, 0) && spin_ns_ > 0) {
        // The data came this soon after the wait began: a spin this long would have
        // caught it. (Twice that, for the next time.)
        const std::int64_t waited = now_ns() - t0;
        if (waited < spin_ns_) spin_budget_ = std::min(spin_ns_, std::max(spin_budget_, 2 * waited));
      }
    }
  };
  // The rest of a refused frame: read into the buffer and dropped, never held whole.
  while (skip > 0) {
    const std::size_t buffered = std::min(skip, rend - rpos);
    rpos += buffered;
    skip -= buffered;
    if (skip == 0) break;
    ensure_buffer();
    rpos = rend = 0;
    receive(std::min(skip, rcap), 0);
  }
  if (rpos == rend && rcap > 4 * 1024 * 1024) {
    // After a large message, give the memory back.
    rbuf.reset();
    rcap = rpos = rend = 0;
  }
  ensure_buffer();
  fill(4);
  const std::uint8_t* h = rbuf.get() + rpos;
  full = (std::size_t{h[0]} << 24) | (std::size_t{h[1]} << 16) | (std::size_t{h[2]} << 8) | h[3];
  // A length field cannot make us allocate more than max_message_size: of a larger frame
  // only the start is read (for its control message), the rest is skipped.
  const std::size_t max = frames.limits().max_message;
  len = std::min(full, full > max ? kRefusedHead : full);
  fill(4 + len);
  data = rbuf.get() + rpos + 4;
  rpos += 4 + len;
  skip = full - len;
}

bool Connection::recv_some(std::size_t room, int flags) {
  if (tls) return tls_recv(room, flags);
  const ssize_t r = ::recv(fd.get(), rbuf.get() + rend, room, flags);
  if (r == 0) throw WireError("connection closed");
  if (r < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return false;
    throw WireError(std::string("recv: ") + std::strerror(errno));
  }
  rend += static_cast<std::size_t>(r);
  last_read.store(now_ns(), std::memory_order_relaxed);
  return true;
}

// As recv(): what TLS has now, or (without MSG_DONTWAIT) waits in poll() until it has
// some, holding no lock while it waits.
bool Connection::tls_recv(std::size_t room, int flags) {
  for (;;) {
    short want = POLLIN;
    const std::size_t got = tls->read(rbuf.get() + rend, room, want);
    if (got) {
      rend += got;
      last_read.store(now_ns(), std::memory_order_relaxed);
      return true;
    }
    if (flags & MSG_DONTWAIT) return false;
    pollfd p{fd.get(), want, 0};
    if (::poll(&p, 1, -1) < 0 && errno != EINTR) throw WireError(std::string("poll: ") + std::strerror(errno));
  }
}

namespace {

std::int64_t thread_cpu_ns() {
  timespec ts;
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return std::int64_t{ts.tv_sec} * 1'000'000'000 + ts.tv_nsec;
}

}  // namespace

bool Connection::spin(std::size_t room) {
  // A gap this long between two polls means the thread lost its core meanwhile.
  constexpr std::int64_t kPreempted = 50'000;
  // After a spin that lost its core, this many reads sleep at once.
  constexpr int kCooldown = 256;
  const std::int64_t t0 = now_ns(), cpu0 = thread_cpu_ns();
  std::int64_t last = t0;
  for (;;) {
    if (recv_some(room, MSG_DONTWAIT)) {
      spin_budget_ = std::min(spin_ns_, spin_budget_ * 2);  // it paid
      return true;
    }
    const std::int64_t now = now_ns();
    if (now - last > kPreempted) break;
    last = now;
    if (now - t0 >= spin_budget_) {
      // Nothing came: half as long next time. A spin that ran on a core it had to share
      // (its CPU time well behind the time that passed) delays whoever shares it: none
      // for a while.
      spin_budget_ /= 2;
      if (2 * (thread_cpu_ns() - cpu0) >= now - t0) return false;
      break;
    }
    cpu_relax();
  }
  spin_budget_ = 0;
  spin_cooldown_ = kCooldown;
  return false;
}

// --- sending ------------------------------------------------------------------------------

namespace {

// `done` bytes of the `n` buffers at `iov` were written: the rest is what remains.
void consume(iovec*& iov, int& n, std::size_t done) {
  while (n > 0 && done >= iov->iov_len) {
    done -= iov->iov_len;
    ++iov;
    --n;
  }
  if (n > 0) {
    iov->iov_base = static_cast<std::uint8_t*>(iov->iov_base) + done;
    iov->iov_len -= done;
  }
}

}  // namespace

Connection::Wrote Connection::write_some(iovec*& iov, int& n) {
  if (tls) {
    std::size_t done;
    short want = POLLOUT;
    try {
      done = tls->write(iov, n, want);
    } catch (const WireError& e) {
      std::fprintf(stderr, "erpy.node: connection to %s: %s\n", peer.name.c_str(), e.what());
      return Wrote::kFailed;
    }
    if (done) last_write.store(now_ns(), std::memory_order_relaxed);
    consume(iov, n, done);
    if (n > 0) {
      write_want_ = want;
      return Wrote::kBlocked;
    }
    return Wrote::kAll;
  }
  while (n > 0) {
    msghdr m{};
    m.msg_iov = iov;
    m.msg_iovlen = static_cast<std::size_t>(n);
    const ssize_t w = ::sendmsg(fd.get(), &m, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return Wrote::kBlocked;
      return Wrote::kFailed;
    }
    last_write.store(now_ns(), std::memory_order_relaxed);
    consume(iov, n, static_cast<std::size_t>(w));
  }
  return Wrote::kAll;
}

void Connection::append_locked(const iovec* iov, int n, bool front) {
  std::size_t total = 0;
  for (int i = 0; i < n; ++i) total += iov[i].iov_len;
  if (total == 0) return;
  Bytes b;
  b.reserve(total);
  for (int i = 0; i < n; ++i) {
    const auto* p = static_cast<const std::uint8_t*>(iov[i].iov_base);
    b.insert(b.end(), p, p + iov[i].iov_len);
  }
  backlog_bytes_ += total;
  if (front) {
    backlog_.push_front(std::move(b));
  } else {
    backlog_.push_back(std::move(b));
  }
}

void Connection::fail(const char* why) {
  if (why && up.load()) {
    std::fprintf(stderr, "erpy.node: connection to %s closed: %s\n", peer.name.c_str(), why);
  }
  shutdown();  // the reader notices and takes the connection down
}

void Connection::sendv(iovec* iov, int n) {
  bool over = false;
  {
    std::lock_guard lk(qmu_);
    if (!up.load()) return;
    if (writing_) {
      // Someone is writing (or the writer thread waits for a slow peer): behind what is
      // queued, in order.
      over = backlog_bytes_ > max_backlog_;
      if (!over) {
        append_locked(iov, n, false);
        return;
      }
    } else {
      writing_ = true;  // the backlog is empty whenever no one holds the role
    }
  }
  if (over) {
    fail_backlog();
    return;
  }
  // The role is ours: straight from the caller's buffers to the socket.
  switch (write_some(iov, n)) {
    case Wrote::kAll:
      drain_loop(false);
      return;
    case Wrote::kFailed:
      release_role();
      fail(nullptr);
      return;
    case Wrote::kBlocked: {
      bool start;
      {
        std::lock_guard lk(qmu_);
        append_locked(iov, n, true);  // ahead of what others queued meanwhile
        start = hand_to_writer_locked();
      }
      qcv_.notify_all();
      if (start && start_writer) start_writer();
      return;
    }
  }
}

void Connection::send(const std::uint8_t* data, std::size_t n) {
  iovec v{const_cast<std::uint8_t*>(data), n};
  sendv(&v, 1);
}

void Connection::send_waiting(const std::uint8_t* data, std::size_t n) {
  {
    std::unique_lock lk(qmu_);
    const std::size_t busy = std::min(kBusyMark, max_backlog_ / 2);
    if (backlog_bytes_ > busy) {
      ++room_waiters_;
      qcv_.wait(lk, [&] { return !up.load() || backlog_bytes_ <= busy; });
      --room_waiters_;
    }
  }
  send(data, n);
}

bool Connection::queue(const std::uint8_t* data, std::size_t n) {
  {
    std::lock_guard lk(qmu_);
    if (!up.load()) return false;
    if (backlog_bytes_ <= max_backlog_) {
      iovec v{const_cast<std::uint8_t*>(data), n};
      append_locked(&v, 1, false);
      if (writing_) return false;
      writing_ = true;
      return true;
    }
  }
  fail_backlog();
  return false;
}

void Connection::drain() { drain_loop(false); }

std::size_t Connection::backlog() const {
  std::lock_guard lk(qmu_);
  return backlog_bytes_;
}

bool Connection::hand_to_writer_locked() {
  handed_ = true;
  const bool start = !writer_started_;
  writer_started_ = true;
  return start;
}

void Connection::release_role() {
  {
    std::lock_guard lk(qmu_);
    writing_ = handed_ = false;
    backlog_.clear();
    backlog_bytes_ = front_off_ = 0;
  }
  qcv_.notify_all();
}

void Connection::fail_backlog() {
  std::size_t bytes;
  {
    std::lock_guard lk(qmu_);
    bytes = backlog_bytes_;
  }
  char why[160];
  std::snprintf(why, sizeof why, "it has not read the %zu bytes sent to it (max_send_queue %zu)", bytes,
                max_backlog_);
  fail(why);
}

void Connection::drain_loop(bool writer) {
  constexpr int kMaxIov = 64;
  iovec iov[kMaxIov];
  for (;;) {
    int n = 0;
    std::size_t before = 0;
    {
      std::lock_guard lk(qmu_);
      if (!up.load() || backlog_.empty()) {
        writing_ = handed_ = false;
        backlog_.clear();
        backlog_bytes_ = front_off_ = 0;
        qcv_.notify_all();
        return;
      }
      // Only the role's holder removes from the front, so these stay valid unlocked.
      std::size_t off = front_off_;
      for (Bytes& b : backlog_) {
        if (n == kMaxIov) break;
        iov[n++] = {b.data() + off, b.size() - off};
        before += b.size() - off;
        off = 0;
      }
    }
    iovec* p = iov;
    int left = n;
    const Wrote w = write_some(p, left);
    std::size_t after = 0;
    for (int i = 0; i < left; ++i) after += p[i].iov_len;
    bool start = false, wake = false, handed = false;
    {
      std::lock_guard lk(qmu_);
      std::size_t written = before - after;
      backlog_bytes_ -= written;
      while (written > 0) {
        const std::size_t rest = backlog_.front().size() - front_off_;
        if (written < rest) {
          front_off_ += written;
          break;
        }
        written -= rest;
        backlog_.pop_front();
        front_off_ = 0;
      }
      wake = room_waiters_ > 0;
      if (w == Wrote::kBlocked && !writer) {
        start = hand_to_writer_locked();
        handed = true;
      }
    }
    // A writer thread already started sleeps until told it holds the role now.
    if (wake || handed) qcv_.notify_all();
    if (w == Wrote::kFailed) {
      release_role();
      fail(nullptr);
      return;
    }
    if (w == Wrote::kBlocked) {
      if (!writer) {
        if (start && start_writer) start_writer();
        return;
      }
      // The writer thread: wait until the peer has read some (or the connection is
      // shut down: poll returns then too).
      pollfd pfd{fd.get(), write_want_, 0};
      ::poll(&pfd, 1, 1000);
    }
  }
}

void Connection::write_backlog() {
  for (;;) {
    {
      std::unique_lock lk(qmu_);
      qcv_.wait(lk, [&] { return handed_ || !up.load(); });
      if (!up.load()) {
        // Only the role's holder may drop the backlog (another may be writing from it).
        if (handed_) {
          writing_ = handed_ = false;
          backlog_.clear();
          backlog_bytes_ = front_off_ = 0;
        }
        lk.unlock();
        qcv_.notify_all();
        return;
      }
    }
    drain_loop(true);
  }
}

void Connection::shutdown() noexcept {
  {
    std::lock_guard lk(qmu_);
    up.store(false);
  }
  qcv_.notify_all();
  if (fd) ::shutdown(fd.get(), SHUT_RDWR);
}

}  // namespace erpy::node
