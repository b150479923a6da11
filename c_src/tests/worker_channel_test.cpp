// The port worker's framing: read-ahead over a pipe, frames split across writes, several
// frames in one read, oversized frames skipped, signals only between frames, writev.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "worker/channel.hpp"

namespace {

using erpy::worker::Channel;
using erpy::py::ByteBuffer;

struct Pipe {
  int fds[2];
  Pipe() { EXPECT_EQ(pipe(fds), 0); }
  ~Pipe() {
    for (int fd : fds) if (fd >= 0) close(fd);
  }
  void close_write() {
    close(fds[1]);
    fds[1] = -1;
  }
};

std::string frame(const std::string& payload) {
  std::string f(4, '\0');
  const auto n = static_cast<std::uint32_t>(payload.size());
  f[0] = static_cast<char>(n >> 24);
  f[1] = static_cast<char>(n >> 16);
  f[2] = static_cast<char>(n >> 8);
  f[3] = static_cast<char>(n);
  return f + payload;
}

void write_all(int fd, const std::string& s) {
  ASSERT_EQ(write(fd, s.data(), s.size()), static_cast<ssize_t>(s.size()));
}

std::string text(const ByteBuffer& b) {
  return {reinterpret_cast<const char*>(b.data()), b.size()};
}

TEST(WorkerChannel, SeveralFramesInOneReadAndSplitFrames) {
  Pipe in, out;
  Channel ch(in.fds[0], out.fds[1]);
  write_all(in.fds[1], frame("one") + frame("") + frame("three"));
  const std::string big(100000, 'x');
  const std::string f = frame(big);
  std::thread writer([&] {
    // A large frame in pieces, with pauses: the reader must wait for all of it.
    for (std::size_t i = 0; i < f.size(); i += 7000) {
      write_all(in.fds[1], f.substr(i, 7000));
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    in.close_write();
  });
  ByteBuffer b;
  std::size_t oversize = 0;
  ASSERT_EQ(ch.read_frame(b, 1 << 20, oversize), Channel::Read::frame);
  EXPECT_EQ(text(b), "one");
  ASSERT_EQ(ch.read_frame(b, 1 << 20, oversize), Channel::Read::frame);
  EXPECT_EQ(text(b), "");
  ASSERT_EQ(ch.read_frame(b, 1 << 20, oversize), Channel::Read::frame);
  EXPECT_EQ(text(b), "three");
  ASSERT_EQ(ch.read_frame(b, 1 << 20, oversize), Channel::Read::frame);
  EXPECT_EQ(text(b), big);
  EXPECT_EQ(ch.read_frame(b, 1 << 20, oversize), Channel::Read::eof);
  writer.join();
}

TEST(WorkerChannel, OversizedFramesAreSkippedWholeAndReported) {
  Pipe in, out;
  Channel ch(in.fds[0], out.fds[1]);
  write_all(in.fds[1], frame(std::string(5000, 'y')) + frame("after"));
  ByteBuffer b;
  std::size_t oversize = 0;
  ASSERT_EQ(ch.read_frame(b, 1000, oversize), Channel::Read::frame);
  EXPECT_EQ(oversize, 5000u);
  ASSERT_EQ(ch.read_frame(b, 1000, oversize), Channel::Read::frame);
  EXPECT_EQ(oversize, 0u);
  EXPECT_EQ(text(b), "after");
}

TEST(WorkerChannel, TruncatedFrameIsEof) {
  Pipe in, out;
  Channel ch(in.fds[0], out.fds[1]);
  write_all(in.fds[1], frame("complete").substr(0, 7));
  in.close_write();
  ByteBuffer b;
  std::size_t oversize = 0;
  EXPECT_EQ(ch.read_frame(b, 1 << 20, oversize), Channel::Read::eof);
}

extern "C" void ignore_signal(int) {}

TEST(WorkerChannel, ASignalInterruptsOnlyTheWaitBetweenFrames) {
  struct sigaction sa{};
  sa.sa_handler = ignore_signal;
  sigaction(SIGUSR2, &sa, nullptr);  // no SA_RESTART
  Pipe in, out;
  Channel ch(in.fds[0], out.fds[1]);
  const pthread_t reader = pthread_self();
  std::thread poke([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    pthread_kill(reader, SIGUSR2);
  });
  ByteBuffer b;
  std::size_t oversize = 0;
  EXPECT_EQ(ch.read_frame(b, 1 << 20, oversize), Channel::Read::interrupted);
  poke.join();
  // Half a frame is there: a signal now must not lose it.
  const std::string f = frame("whole");
  write_all(in.fds[1], f.substr(0, 6));
  std::thread rest([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    pthread_kill(reader, SIGUSR2);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    write_all(in.fds[1], f.substr(6));
  });
  ASSERT_EQ(ch.read_frame(b, 1 << 20, oversize), Channel::Read::frame);
  EXPECT_EQ(text(b), "whole");
  rest.join();
}

TEST(WorkerChannel, WriteFrameWithTailIsOneFrame) {
  Pipe in, out;
  Channel ch(in.fds[0], out.fds[1]);
  ByteBuffer head;
  Channel::begin_frame(head);
  head.write("ab", 2);
  const std::string tail(200000, 'z');
  std::thread reader([&] {
    Channel back(out.fds[0], in.fds[1]);
    ByteBuffer b;
    std::size_t oversize = 0;
    ASSERT_EQ(back.read_frame(b, 1 << 20, oversize), Channel::Read::frame);
    EXPECT_EQ(text(b), "ab" + tail);
  });
  ASSERT_TRUE(ch.write_frame(head, reinterpret_cast<const std::uint8_t*>(tail.data()), tail.size()));
  reader.join();
}

}  // namespace
