// A connection's send queue over a socket pair, without Python: frames from many threads
// arrive whole and each thread's in order; a peer that stops reading blocks no sender;
// one that lets more than max_backlog pile up is disconnected; the reader side reads
// frames (ticks included) as they come.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <thread>
#include <vector>

#include "node/connection.hpp"

namespace {

using erpy::node::Bytes;
using erpy::node::Connection;
using erpy::node::Fd;
using erpy::node::InLimits;

// A connection on one end of a socket pair, with its writer thread joined at the end.
struct Pair {
  explicit Pair(std::size_t max_backlog = std::size_t{256} << 20, std::int64_t spin_ns = 0) {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    conn = std::make_shared<Connection>(Fd(sv[0]), InLimits{}, max_backlog, spin_ns);
    conn->peer.name = "peer@test";
    peer = Fd(sv[1]);
    conn->start_writer = [this] {
      writers.emplace_back([c = conn] { c->write_backlog(); });
    };
  }
  ~Pair() {
    conn->shutdown();
    for (auto& t : writers) t.join();
  }
  // Reads one frame (length-prefixed) from the peer's end; empty at EOF.
  Bytes read_frame() {
    std::uint8_t h[4];
    if (!read_exact(h, 4)) return {};
    const std::size_t n = (std::size_t{h[0]} << 24) | (std::size_t{h[1]} << 16) | (std::size_t{h[2]} << 8) | h[3];
    Bytes b(n);
    if (n && !read_exact(b.data(), n)) return {};
    return b;
  }
  bool read_exact(std::uint8_t* p, std::size_t n) {
    while (n) {
      const ssize_t r = ::read(peer.get(), p, n);
      if (r <= 0) return false;
      p += r;
      n -= static_cast<std::size_t>(r);
    }
    return true;
  }

  std::shared_ptr<Connection> conn;
  Fd peer;
  std::vector<std::thread> writers;
};

// A frame [len][sender][seq][filler...] of `size` bytes after its length.
Bytes frame(std::uint8_t sender, std::uint32_t seq, std::size_t size) {
  Bytes b(4 + size, static_cast<std::uint8_t>(seq * 7 + sender));
  b[0] = static_cast<std::uint8_t>(size >> 24);
  b[1] = static_cast<std::uint8_t>(size >> 16);
  b[2] = static_cast<std::uint8_t>(size >> 8);
  b[3] = static_cast<std::uint8_t>(size);
  b[4] = sender;
  std::memcpy(&b[5], &seq, sizeof seq);
  return b;
}

TEST(NodeConnection, FramesFromManyThreadsArriveWholeAndInOrder) {
  Pair p;
  constexpr int kThreads = 4, kFrames = 300;
  std::vector<std::thread> senders;
  for (int t = 0; t < kThreads; ++t) {
    senders.emplace_back([&, t] {
      for (std::uint32_t i = 0; i < kFrames; ++i) {
        // Small and large frames mixed: the large ones fill the socket pair's buffer.
        const std::size_t size = (i % 10 == 0) ? 300000 : 8 + (i % 50);
        Bytes b = frame(static_cast<std::uint8_t>(t), i, size);
        if (i % 3 == 0) {
          p.conn->send(b.data(), b.size());
        } else {
          p.conn->send_waiting(b.data(), b.size());
        }
      }
    });
  }
  std::map<int, std::uint32_t> next;
  for (int n = 0; n < kThreads * kFrames; ++n) {
    Bytes f = p.read_frame();
    ASSERT_GE(f.size(), 5u);
    const int sender = f[0];
    std::uint32_t seq;
    std::memcpy(&seq, &f[1], sizeof seq);
    ASSERT_EQ(seq, next[sender]) << "frames of sender " << sender << " out of order";
    ++next[sender];
    const auto fill = static_cast<std::uint8_t>(seq * 7 + sender);
    for (std::size_t i = 5; i < f.size(); ++i) ASSERT_EQ(f[i], fill);
  }
  for (auto& t : senders) t.join();
  // The writer counts its last bytes off the backlog just after they are written, which
  // may be just after this reader has them: wait for it (bounded).
  for (int i = 0; i < 2000 && p.conn->backlog() != 0; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(p.conn->backlog(), 0u);
}

TEST(NodeConnection, APeerThatStopsReadingBlocksNoSender) {
  Pair p;
  // Far more than the socket pair holds: send() returns each time, the rest waits.
  constexpr int kFrames = 16;
  for (std::uint32_t i = 0; i < kFrames; ++i) {
    Bytes b = frame(1, i, 1 << 20);
    p.conn->send(b.data(), b.size());
  }
  EXPECT_GT(p.conn->backlog(), 0u);
  EXPECT_TRUE(p.conn->up.load());
  // Queued frames keep their order with what a locked sender queues.
  Bytes last = frame(2, 0, 16);
  if (p.conn->queue(last.data(), last.size())) p.conn->drain();
  for (std::uint32_t i = 0; i < kFrames; ++i) {
    Bytes f = p.read_frame();
    ASSERT_EQ(f.size(), std::size_t{1} << 20);
    std::uint32_t seq;
    std::memcpy(&seq, &f[1], sizeof seq);
    EXPECT_EQ(seq, i);
  }
  Bytes f = p.read_frame();
  ASSERT_EQ(f.size(), 16u);
  EXPECT_EQ(f[0], 2);
}

TEST(NodeConnection, OverMaxBacklogTheConnectionCloses) {
  Pair p(1 << 20);
  Bytes big = frame(1, 0, 4 << 20);
  p.conn->send(big.data(), big.size());  // one frame is always taken, whatever its size
  EXPECT_TRUE(p.conn->up.load());
  Bytes more = frame(1, 1, 100);
  p.conn->send(more.data(), more.size());  // over the limit: the peer is dropped
  EXPECT_FALSE(p.conn->up.load());
  // A sender that would wait for room does not wait for a closed connection.
  p.conn->send_waiting(more.data(), more.size());
}

TEST(NodeConnection, ReadsFramesAndTicks) {
  Pair p;
  const std::uint8_t bytes[] = {0, 0, 0, 0, 0, 0, 0, 3, 'a', 'b', 'c'};
  ASSERT_EQ(::write(p.peer.get(), bytes, sizeof bytes), static_cast<ssize_t>(sizeof bytes));
  std::uint8_t* data;
  std::size_t len, full;
  p.conn->next_frame(data, len, full);
  EXPECT_EQ(full, 0u);  // a tick
  EXPECT_TRUE(p.conn->has_frame());
  p.conn->next_frame(data, len, full);
  ASSERT_EQ(len, 3u);
  EXPECT_EQ(std::memcmp(data, "abc", 3), 0);
  p.peer.reset();
  EXPECT_THROW(p.conn->next_frame(data, len, full), erpy::node::WireError);
}

// A reader that polls before it sleeps (spin_us) reads every frame whatever the gaps: data
// caught by the poll, data after the poll gave up (a blocking read), frames split in
// pieces, and after the poll has adapted up and down.
TEST(NodeConnection, ASpinningReaderReadsEveryFrame) {
  Pair p(std::size_t{256} << 20, 2'000'000);
  constexpr int kFrames = 60;
  std::thread writer([&] {
    for (int i = 0; i < kFrames; ++i) {
      const std::uint8_t body[] = {static_cast<std::uint8_t>(i), 'x', 'y'};
      const std::uint8_t head[] = {0, 0, 0, sizeof body};
      const int gap_us = (i % 3 == 0) ? 0 : (i % 3 == 1) ? 200 : 5000;  // within and beyond the poll
      std::this_thread::sleep_for(std::chrono::microseconds(gap_us));
      ASSERT_EQ(::write(p.peer.get(), head, sizeof head), static_cast<ssize_t>(sizeof head));
      if (i % 4 == 0) std::this_thread::sleep_for(std::chrono::microseconds(300));  // split
      ASSERT_EQ(::write(p.peer.get(), body, sizeof body), static_cast<ssize_t>(sizeof body));
    }
  });
  for (int i = 0; i < kFrames; ++i) {
    std::uint8_t* data;
    std::size_t len, full;
    p.conn->next_frame(data, len, full);
    ASSERT_EQ(len, 3u);
    EXPECT_EQ(data[0], static_cast<std::uint8_t>(i));
    EXPECT_EQ(std::memcmp(data + 1, "xy", 2), 0);
  }
  writer.join();
}

}  // namespace
