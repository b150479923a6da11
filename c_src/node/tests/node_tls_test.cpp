// TLS distribution below Python: the ssl_dist options file, the handshake with
// certificates verified (and refused), the distribution handshake inside TLS, and a
// connection's send queue over TLS when the peer reads slowly (partial writes retried
// from the queue), frames from many threads arriving whole and in order.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <future>
#include <thread>

#include "node/connection.hpp"
#include "node/tls.hpp"

namespace {

using namespace erpy::node;
namespace fs = std::filesystem;

TEST(NodeTls, ParsesAnSslDistFile) {
  const TlsConfig c = parse_ssl_dist_opts(R"(
    % as inet_tls_dist reads it
    [{server, [{certfile, "/etc/s.pem"}, {keyfile, "/etc/s.key"}, {cacertfile, "/etc/ca.pem"},
               {verify, verify_peer}, {fail_if_no_peer_cert, true}, {secure_renegotiate, true}]},
     {client, [{certfile, "/etc/c.pem"}, {verify, verify_peer}, {cacertfile, <<"/etc/ca.pem">>},
               {server_name_indication, disable}, {versions, ['tlsv1.3']}, {depth, 3}]}].
  )");
  EXPECT_TRUE(c.enabled);
  EXPECT_EQ(c.server.certfile, "/etc/s.pem");
  EXPECT_EQ(c.server.keyfile, "/etc/s.key");
  EXPECT_TRUE(c.server.verify_peer);
  EXPECT_TRUE(c.server.fail_if_no_peer_cert);
  EXPECT_EQ(c.client.cacertfile, "/etc/ca.pem");
  EXPECT_FALSE(c.client.sni);
  EXPECT_EQ(c.client.min_version, "tlsv1.3");
  EXPECT_EQ(c.client.depth, 3);
  EXPECT_FALSE(c.client.fail_if_no_peer_cert);
}

TEST(NodeTls, RefusesWhatItDoesNotSupport) {
  EXPECT_THROW(parse_ssl_dist_opts("[{server, [{verify_fun, {m, f, s}}]}]."), std::runtime_error);
  EXPECT_THROW(parse_ssl_dist_opts("[{server, [{verify, maybe}]}]."), std::runtime_error);
  EXPECT_THROW(parse_ssl_dist_opts("[{server, [{certfile, \"x\"}]"), std::runtime_error);
  EXPECT_THROW(parse_ssl_dist_opts("[{other, []}]."), std::runtime_error);
  EXPECT_THROW(parse_ssl_dist_opts("[{client, [{versions, ['tlsv1.1']}]}]."), std::runtime_error);
  EXPECT_THROW(read_ssl_dist_optfile("/nonexistent/ssl_dist.conf"), std::runtime_error);
}

// A CA, two certificates it signed and one it did not, made with the openssl command.
class NodeTlsCerts : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = fs::temp_directory_path() / ("erpy_tls_test_" + std::to_string(::getpid()));
    fs::create_directories(dir_);
    const std::string d = dir_.string();
    const std::string script =
        "cd " + d + " && (openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=ca -keyout ca.key -out ca.pem"
        " && openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=rogue -keyout rogue.key -out rogue.pem"
        " && for n in a b; do openssl req -newkey rsa:2048 -nodes -subj /CN=$n -keyout $n.key -out $n.csr"
        " && printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\\n' > $n.ext"
        " && openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile $n.ext -out $n.pem"
        " || exit 1; done) >/dev/null 2>&1";
    ok_ = std::system(script.c_str()) == 0;
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }
  void SetUp() override {
    if (!ok_) GTEST_SKIP() << "the openssl command is missing or failed: no certificates to test with";
  }
  static std::string f(const std::string& name) { return (dir_ / name).string(); }
  static TlsConfig config(const std::string& who) {
    TlsConfig c;
    c.enabled = true;
    TlsSide s;
    s.certfile = f(who + ".pem");
    s.keyfile = f(who + ".key");
    s.cacertfile = f("ca.pem");
    s.verify_peer = true;
    s.fail_if_no_peer_cert = true;
    c.server = c.client = s;
    return c;
  }
  static inline fs::path dir_;
  static inline bool ok_ = false;
};

struct SocketPair {
  SocketPair() {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    a = Fd(sv[0]);
    b = Fd(sv[1]);
  }
  Fd a, b;
};

TEST_F(NodeTlsCerts, HandshakeAndDistributionHandshakeInsideTls) {
  const TlsContext server(config("a")), client(config("b"));
  SocketPair p;
  auto accepted = std::async(std::launch::async, [&] {
    TlsStream s(server, p.a.get(), true, "", 5000);
    TlsHandshakeIo io(s, 5000);
    return handshake_accept(io, Self{"py@127.0.0.1", "secret", 1});
  });
  TlsStream c(client, p.b.get(), false, "127.0.0.1", 5000);
  TlsHandshakeIo io(c, 5000);
  const Peer seen = handshake_connect(io, Self{"e@127.0.0.1", "secret", 2}, "py@127.0.0.1");
  EXPECT_EQ(seen.name, "py@127.0.0.1");
  EXPECT_EQ(accepted.get().name, "e@127.0.0.1");
}

TEST_F(NodeTlsCerts, WrongCookieInsideTlsIsRefused) {
  const TlsContext server(config("a")), client(config("b"));
  SocketPair p;
  auto accepted = std::async(std::launch::async, [&] {
    TlsStream s(server, p.a.get(), true, "", 5000);
    TlsHandshakeIo io(s, 5000);
    return handshake_accept(io, Self{"py@127.0.0.1", "secret", 1});
  });
  TlsStream c(client, p.b.get(), false, "127.0.0.1", 5000);
  TlsHandshakeIo io(c, 5000);
  EXPECT_THROW(handshake_connect(io, Self{"e@127.0.0.1", "other", 2}, "py@127.0.0.1"), WireError);
  EXPECT_THROW(accepted.get(), WireError);
}

TEST_F(NodeTlsCerts, CertificateNotSignedByTheCaIsRefused) {
  const TlsContext server(config("a"));
  TlsConfig rogue = config("rogue");
  rogue.client.verify_peer = false;  // it would take anything; the server must not
  const TlsContext client(rogue);
  SocketPair p;
  auto accepted = std::async(std::launch::async, [&] { TlsStream s(server, p.a.get(), true, "", 5000); });
  try {
    TlsStream c(client, p.b.get(), false, "127.0.0.1", 5000);
    // TLS 1.3: the client may finish before the server refuses; its first read fails.
    TlsHandshakeIo io(c, 5000);
    std::uint8_t x;
    io.read_exact(&x, 1);
    ADD_FAILURE() << "the rogue client was served";
  } catch (const WireError&) {
  }
  try {
    accepted.get();
    ADD_FAILURE() << "the server accepted a certificate its CA did not sign";
  } catch (const WireError& e) {
    EXPECT_NE(std::string(e.what()).find("certificate"), std::string::npos) << e.what();
  }
}

TEST_F(NodeTlsCerts, ClientChecksTheServersName) {
  const TlsContext server(config("a")), client(config("b"));
  SocketPair p;
  auto accepted = std::async(std::launch::async, [&] {
    try {
      TlsStream s(server, p.a.get(), true, "", 5000);
    } catch (const WireError&) {
    }
  });
  // The certificate names 127.0.0.1 and localhost, not 10.9.9.9.
  EXPECT_THROW(TlsStream(client, p.b.get(), false, "10.9.9.9", 5000), WireError);
  p.b.reset();
  accepted.get();
}

TEST_F(NodeTlsCerts, SendQueueOverTlsWithASlowReader) {
  const TlsContext server(config("a")), client(config("b"));
  SocketPair p;
  // Small socket buffers: the sender's writes are partial and go through the queue.
  int small = 16 * 1024;
  setsockopt(p.a.get(), SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
  setsockopt(p.b.get(), SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
  auto rx_future = std::async(std::launch::async, [&] {
    auto c = std::make_shared<Connection>(Fd(::dup(p.b.get())), InLimits{}, std::size_t{1} << 30, 0);
    c->tls = std::make_unique<TlsStream>(client, c->fd.get(), false, "127.0.0.1", 5000);
    return c;
  });
  auto tx = std::make_shared<Connection>(Fd(::dup(p.a.get())), InLimits{}, std::size_t{1} << 30, 0);
  tx->tls = std::make_unique<TlsStream>(server, tx->fd.get(), true, "", 5000);
  std::vector<std::thread> writers;
  tx->start_writer = [&] { writers.emplace_back([c = tx] { c->write_backlog(); }); };
  auto rx = rx_future.get();

  constexpr int kThreads = 3, kFrames = 200;
  std::vector<std::thread> senders;
  for (int t = 0; t < kThreads; ++t) {
    senders.emplace_back([&, t] {
      for (std::uint32_t i = 0; i < kFrames; ++i) {
        const std::size_t size = 8 + (i * 7919u + t * 104729u) % 70000;  // small and large
        Bytes b(4 + size, static_cast<std::uint8_t>(i + t));
        b[0] = static_cast<std::uint8_t>(size >> 24);
        b[1] = static_cast<std::uint8_t>(size >> 16);
        b[2] = static_cast<std::uint8_t>(size >> 8);
        b[3] = static_cast<std::uint8_t>(size);
        b[4] = static_cast<std::uint8_t>(t);
        std::memcpy(&b[5], &i, sizeof i);
        tx->send(b.data(), b.size());
      }
    });
  }
  std::uint32_t next[kThreads] = {};
  for (int got = 0; got < kThreads * kFrames; ++got) {
    std::uint8_t* data;
    std::size_t len, full;
    rx->next_frame(data, len, full);
    ASSERT_EQ(len, full);
    const int t = data[0];
    ASSERT_LT(t, kThreads);
    std::uint32_t i;
    std::memcpy(&i, data + 1, sizeof i);
    ASSERT_EQ(i, next[t]) << "thread " << t;
    ++next[t];
    ASSERT_EQ(len, 8 + (i * 7919u + t * 104729u) % 70000);
    for (std::size_t k = 5; k < len; ++k) ASSERT_EQ(data[k], static_cast<std::uint8_t>(i + t)) << k;
    if (got % 50 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(2));  // a slow reader
  }
  for (auto& s : senders) s.join();
  tx->shutdown();
  rx->shutdown();
  for (auto& w : writers) w.join();
}

}  // namespace
