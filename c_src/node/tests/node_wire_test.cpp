// The node's protocol pieces without Python: MD5 (RFC 1321 vectors), the OTP 23+
// handshake between the accepting and the connecting side over a socket pair, with the
// same cookie and with different ones, and incoming frames within the inbound limits
// (crafted messages, fragmented ones, hostile sizes and counts).
#include <gtest/gtest.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstdio>
#include <future>
#include <string>

#include "node/md5.hpp"
#include "node/wire.hpp"

namespace {

using erpy::node::Fd;
using erpy::node::Peer;
using erpy::node::Self;

std::string hex(const std::array<std::uint8_t, 16>& d) {
  std::string out;
  char b[3];
  for (auto c : d) {
    std::snprintf(b, sizeof b, "%02x", c);
    out += b;
  }
  return out;
}

TEST(NodeMd5, Rfc1321Vectors) {
  EXPECT_EQ(hex(erpy::node::md5("")), "d41d8cd98f00b204e9800998ecf8427e");
  EXPECT_EQ(hex(erpy::node::md5("a")), "0cc175b9c0f1b6a831c399e269772661");
  EXPECT_EQ(hex(erpy::node::md5("abc")), "900150983cd24fb0d6963f7d28e17f72");
  EXPECT_EQ(hex(erpy::node::md5("message digest")), "f96b697d7cb7938d525a2f31aaf161d0");
  EXPECT_EQ(hex(erpy::node::md5("abcdefghijklmnopqrstuvwxyz")), "c3fcd3d76192e4007dfb496cca67e13b");
  EXPECT_EQ(hex(erpy::node::md5("12345678901234567890123456789012345678901234567890123456789012345678901234567890")),
            "57edf4a22be3c955ac49da2e2107b67a");
}

struct Pair {
  Fd a, b;
  Pair() {
    int fds[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM, 0, fds), 0);
    a = Fd(fds[0]);
    b = Fd(fds[1]);
  }
};

Self self(const char* name, const char* cookie, std::uint32_t creation) {
  Self s;
  s.name = name;
  s.cookie = cookie;
  s.creation = creation;
  return s;
}

TEST(NodeHandshake, SameCookieBothSidesAgree) {
  Pair p;
  const Self acc = self("py@127.0.0.1", "secret", 7), con = self("erl@127.0.0.1", "secret", 9);
  auto accepted = std::async(std::launch::async, [&] { return erpy::node::handshake_accept(p.a.get(), acc); });
  const Peer seen_by_connector = erpy::node::handshake_connect(p.b.get(), con, "py@127.0.0.1");
  const Peer seen_by_acceptor = accepted.get();
  EXPECT_EQ(seen_by_acceptor.name, "erl@127.0.0.1");
  EXPECT_EQ(seen_by_acceptor.creation, 9u);
  EXPECT_EQ(seen_by_connector.name, "py@127.0.0.1");
  EXPECT_EQ(seen_by_connector.creation, 7u);
  EXPECT_EQ(seen_by_acceptor.flags, erpy::node::dflag::kOurs);
}

TEST(NodeHandshake, WrongCookieIsRefusedOnBothSides) {
  Pair p;
  const Self acc = self("py@127.0.0.1", "secret", 7), con = self("erl@127.0.0.1", "guess", 9);
  auto accepted = std::async(std::launch::async, [&] {
    try {
      erpy::node::handshake_accept(p.a.get(), acc);
      return std::string("accepted");
    } catch (const erpy::node::WireError& e) {
      p.a.reset();  // the refusing side closes, as OTP does
      return std::string(e.what());
    }
  });
  EXPECT_THROW(erpy::node::handshake_connect(p.b.get(), con, "py@127.0.0.1"), erpy::node::WireError);
  EXPECT_NE(accepted.get().find("wrong cookie"), std::string::npos);
}

TEST(NodeHandshake, OldHandshakeIsRefused) {
  Pair p;
  const Self acc = self("py@127.0.0.1", "secret", 7);
  auto accepted = std::async(std::launch::async, [&] {
    EXPECT_THROW(erpy::node::handshake_accept(p.a.get(), acc), erpy::node::WireError);
  });
  // A version 5 send_name ('n'): refused, OTP 23 or later is needed.
  const std::uint8_t old[] = {0, 8, 'n', 0, 5, 0, 0, 0, 4, 'x'};
  erpy::node::write_all(p.b.get(), old, sizeof old);
  accepted.get();
}

TEST(NodeWire, SplitNode) {
  EXPECT_EQ(erpy::node::split_node("a@b").first, "a");
  EXPECT_EQ(erpy::node::split_node("a@b").second, "b");
  EXPECT_THROW(erpy::node::split_node("nohost"), erpy::node::WireError);
  EXPECT_THROW(erpy::node::split_node("@h"), erpy::node::WireError);
}

// ---- incoming frames and their limits -------------------------------------------------------

using erpy::node::Bytes;
using erpy::node::Incoming;
using erpy::node::InLimits;
using erpy::node::Reassembler;

// Byte by byte: GCC 12's -Warray-bounds misreads range inserts after small initializers.
void append(Bytes& b, const Bytes& more) {
  for (std::uint8_t c : more) b.push_back(c);
}

void put64(Bytes& b, std::uint64_t v) {
  for (int i = 7; i >= 0; --i) b.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}

// A control message {2, '', Pid} stands in for any: the reassembler never looks inside.
Bytes body(std::size_t payload) {
  Bytes b = {104, 1, 97, 2};
  for (std::size_t i = 0; i < payload; ++i) b.push_back(0xAB);
  return b;
}

Bytes whole(const Bytes& msg) {
  Bytes f = {131, 68, 0};
  append(f, msg);
  return f;
}

Bytes frag_header(std::uint64_t seq, std::uint64_t frag, const Bytes& part) {
  Bytes f = {131, 69};
  put64(f, seq);
  put64(f, frag);
  f.push_back(0);  // no atom cache references
  append(f, part);
  return f;
}

Bytes frag_cont(std::uint64_t seq, std::uint64_t frag, const Bytes& part) {
  Bytes f = {131, 70};
  put64(f, seq);
  put64(f, frag);
  append(f, part);
  return f;
}

Incoming feed(Reassembler& r, const Bytes& frame) { return r.feed(frame, frame.size()); }

// `msg` cut in `n` fragments of one sequence.
std::vector<Bytes> fragments(std::uint64_t seq, const Bytes& msg, std::size_t n) {
  std::vector<Bytes> out;
  const std::size_t step = (msg.size() + n - 1) / n;
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t from = std::min(msg.size(), i * step), to = std::min(msg.size(), from + step);
    Bytes part(msg.begin() + static_cast<std::ptrdiff_t>(from), msg.begin() + static_cast<std::ptrdiff_t>(to));
    out.push_back(i == 0 ? frag_header(seq, n, part) : frag_cont(seq, n - i, part));
  }
  return out;
}

Reassembler limited(std::size_t max_message, std::size_t max_pending = 1024,
                    std::size_t max_pending_bytes = std::size_t{1} << 30) {
  Reassembler r;
  InLimits l;
  l.max_message = max_message;
  l.max_pending = max_pending;
  l.max_pending_bytes = max_pending_bytes;
  r.set_limits(l);
  return r;
}

TEST(NodeFrames, WholeMessagesAndTicksPassThrough) {
  Reassembler r = limited(1000);
  const Bytes msg = body(100), frame = whole(msg);
  Incoming in = feed(r, frame);  // a view of the frame
  ASSERT_EQ(in.kind, Incoming::kMessage);
  EXPECT_EQ(Bytes(in.data.begin(), in.data.end()), msg);
  EXPECT_EQ(r.feed({}, 0).kind, Incoming::kNothing);
}

TEST(NodeFrames, FragmentsAreReassembledAndFreed) {
  Reassembler r = limited(1 << 20);
  const Bytes msg = body(10000);
  auto frames = fragments(7, msg, 4);
  for (std::size_t i = 0; i + 1 < frames.size(); ++i) {
    EXPECT_EQ(feed(r, frames[i]).kind, Incoming::kNothing);
    EXPECT_EQ(r.pending(), 1u);
  }
  EXPECT_GT(r.pending_bytes(), 0u);
  Incoming in = feed(r, frames.back());
  ASSERT_EQ(in.kind, Incoming::kMessage);
  EXPECT_EQ(Bytes(in.data.begin(), in.data.end()), msg);
  EXPECT_EQ(r.pending(), 0u);
  EXPECT_EQ(r.pending_bytes(), 0u);
}

TEST(NodeFrames, AFrameOverTheLimitIsRefusedFromItsStart) {
  Reassembler r = limited(4096);
  // Only the start of a 100 MB frame was read: it is refused with its real size, and
  // what it hands back for an answer is bounded.
  const Bytes start = whole(body(erpy::node::kRefusedHead + 100));
  Incoming in = r.feed(start, 100'000'000);
  ASSERT_EQ(in.kind, Incoming::kRefused);
  EXPECT_EQ(in.why, Incoming::kTooLarge);
  EXPECT_EQ(in.size, 100'000'000u);
  EXPECT_LE(in.data.size(), erpy::node::kRefusedHead);
  EXPECT_EQ(in.data[0], 104);  // the control message is there
  // A whole frame just over the limit is refused too; the next message goes through.
  EXPECT_EQ(feed(r, whole(body(4100))).kind, Incoming::kRefused);
  EXPECT_EQ(feed(r, whole(body(10))).kind, Incoming::kMessage);
}

TEST(NodeFrames, FragmentsOverTheLimitAreDroppedAndTheRestSkipped) {
  Reassembler r = limited(10000);
  auto frames = fragments(1, body(40000), 8);
  Incoming in;
  std::size_t i = 0;
  for (; i < frames.size(); ++i) {
    in = feed(r, frames[i]);
    if (in.kind != Incoming::kNothing) break;
  }
  ASSERT_EQ(in.kind, Incoming::kRefused);
  EXPECT_EQ(in.why, Incoming::kTooLarge);
  EXPECT_GT(in.size, 10000u);
  EXPECT_EQ(in.data[0], 104);  // the message's start, for an answer
  EXPECT_LE(in.data.size(), erpy::node::kRefusedHead);
  EXPECT_LT(i, frames.size() - 1);
  EXPECT_EQ(r.pending(), 0u);
  EXPECT_EQ(r.pending_bytes(), 0u);
  for (++i; i < frames.size(); ++i) EXPECT_EQ(feed(r, frames[i]).kind, Incoming::kNothing);
  // The connection goes on.
  auto next = fragments(2, body(5000), 3);
  EXPECT_EQ(feed(r, next[0]).kind, Incoming::kNothing);
  EXPECT_EQ(feed(r, next[1]).kind, Incoming::kNothing);
  EXPECT_EQ(feed(r, next[2]).kind, Incoming::kMessage);
}

TEST(NodeFrames, UnfinishedSequencesAreCappedInNumber) {
  Reassembler r = limited(1 << 20, 3);
  std::vector<std::vector<Bytes>> seqs;
  for (std::uint64_t s = 0; s < 5; ++s) seqs.push_back(fragments(100 + s, body(300), 3));
  for (std::size_t s = 0; s < 3; ++s) EXPECT_EQ(feed(r, seqs[s][0]).kind, Incoming::kNothing);
  // A fourth and fifth begun while three are unfinished: refused, nothing kept of them.
  for (std::size_t s = 3; s < 5; ++s) {
    Incoming in = feed(r, seqs[s][0]);
    ASSERT_EQ(in.kind, Incoming::kRefused);
    EXPECT_EQ(in.why, Incoming::kPendingLimit);
    EXPECT_EQ(r.pending(), 3u);
    for (std::size_t k = 1; k < 3; ++k) EXPECT_EQ(feed(r, seqs[s][k]).kind, Incoming::kNothing);
  }
  // The three finish.
  for (std::size_t s = 0; s < 3; ++s) {
    EXPECT_EQ(feed(r, seqs[s][1]).kind, Incoming::kNothing);
    EXPECT_EQ(feed(r, seqs[s][2]).kind, Incoming::kMessage);
  }
  EXPECT_EQ(r.pending(), 0u);
}

TEST(NodeFrames, UnfinishedSequencesAreCappedInBytes) {
  Reassembler r = limited(1 << 20, 1024, 5000);
  auto a = fragments(1, body(6000), 3);  // fragments of about 2000 bytes
  auto b = fragments(2, body(3000), 3);  // of about 1000
  EXPECT_EQ(feed(r, a[0]).kind, Incoming::kNothing);
  EXPECT_EQ(feed(r, b[0]).kind, Incoming::kNothing);
  // a's second fragment would take the pending bytes over 5000: a is dropped, b goes on.
  Incoming in = feed(r, a[1]);
  ASSERT_EQ(in.kind, Incoming::kRefused);
  EXPECT_EQ(in.why, Incoming::kPendingLimit);
  EXPECT_EQ(r.pending(), 1u);
  EXPECT_LE(r.pending_bytes(), 5000u);
  EXPECT_EQ(feed(r, a[2]).kind, Incoming::kNothing);
  EXPECT_EQ(feed(r, b[1]).kind, Incoming::kNothing);
  EXPECT_EQ(feed(r, b[2]).kind, Incoming::kMessage);
  EXPECT_EQ(r.pending_bytes(), 0u);
}

TEST(NodeFrames, ClearFreesEverything) {
  Reassembler r = limited(1 << 20);
  for (std::uint64_t s = 0; s < 10; ++s) feed(r, fragments(s, body(3000), 3)[0]);
  EXPECT_EQ(r.pending(), 10u);
  r.clear();
  EXPECT_EQ(r.pending(), 0u);
  EXPECT_EQ(r.pending_bytes(), 0u);
}

TEST(NodeFrames, MalformedFramesThrow) {
  Reassembler r = limited(1 << 20);
  EXPECT_THROW(feed(r, Bytes{131, 99, 0}), erpy::node::WireError);
  EXPECT_THROW(feed(r, Bytes{130, 68, 0}), erpy::node::WireError);
  EXPECT_THROW(feed(r, Bytes{131, 69, 0, 0}), std::exception);  // truncated sequence id
  auto a = fragments(5, body(300), 3);
  feed(r, a[0]);
  EXPECT_THROW(feed(r, a[0]), erpy::node::WireError);  // the same sequence begun twice
  // A continuation of nothing is skipped, not an error (a refused message's rest).
  EXPECT_EQ(feed(r, frag_cont(99, 1, body(10))).kind, Incoming::kNothing);
}

}  // namespace
