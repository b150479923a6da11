// The node's protocol pieces without Python: MD5 (RFC 1321 vectors) and the OTP 23+
// handshake between the accepting and the connecting side over a socket pair, with the
// same cookie and with different ones.
#include <gtest/gtest.h>
#include <sys/socket.h>

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

}  // namespace
