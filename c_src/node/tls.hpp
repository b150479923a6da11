// TLS distribution (as OTP's inet_tls_dist): the connection is TLS from its first byte,
// EPMD stays plain TCP, the distribution handshake runs inside TLS with 4-byte lengths.
//
// Configuration is inet_tls_dist's: an ssl_dist options file (`-ssl_dist_optfile`, the
// Erlang term [{server, Opts}, {client, Opts}]) or the same options given one by one.
// Supported options (each side): certfile, keyfile, password, cacertfile, verify
// (verify_peer | verify_none), fail_if_no_peer_cert (server), depth,
// server_name_indication (client: disable | "host"), versions (['tlsv1.2', 'tlsv1.3']),
// ciphers (an OpenSSL cipher string, TLS 1.2), and, without effect, reuse_sessions,
// secure_renegotiate, hibernate_after, honor_cipher_order. Any other option is refused
// with an error: a security option silently ignored would be worse.
//
// One TlsStream per connection, over a non-blocking socket. OpenSSL allows one thread at
// a time on an SSL object, so every call on it takes the stream's mutex; the calls are
// non-blocking (threads wait in poll() without the lock), so no thread waits for the peer
// while it holds it. The mutex is a leaf: nothing else is taken while it is held.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "wire.hpp"

struct ssl_st;
struct ssl_ctx_st;
struct iovec;

namespace erpy::node {

// One side's options (inet_tls_dist's `server` or `client` list).
struct TlsSide {
  std::string certfile, keyfile, password, cacertfile, ciphers;
  bool verify_peer = false;           // OTP 25's ssl default: verify_none
  bool fail_if_no_peer_cert = false;  // server: a client without a certificate is refused
  int depth = -1;                     // -1: OpenSSL's default (100)
  bool sni = true;                    // client: SNI and host name check with the peer's host
  std::string sni_host;               // client: that name instead of the peer's host
  std::string min_version = "tlsv1.2", max_version = "tlsv1.3";
};

struct TlsConfig {
  bool enabled = false;
  TlsSide server, client;
};

// Reads an ssl_dist options file; throws std::runtime_error saying what is wrong.
TlsConfig read_ssl_dist_optfile(const std::string& path);
// Parses its text (for tests).
TlsConfig parse_ssl_dist_opts(const std::string& text);

struct SslCtxFree {
  void operator()(ssl_ctx_st* c) const noexcept;
};
struct SslFree {
  void operator()(ssl_st* s) const noexcept;
};

// The two SSL_CTXs of a node, made once at start (files read then: a bad file is an error
// at start, not at the first connection).
class TlsContext {
 public:
  explicit TlsContext(const TlsConfig& cfg);
  ssl_ctx_st* server() const { return server_.get(); }
  ssl_ctx_st* client() const { return client_.get(); }
  const TlsConfig& config() const { return cfg_; }

 private:
  TlsConfig cfg_;
  std::unique_ptr<ssl_ctx_st, SslCtxFree> server_, client_;
};

class TlsStream {
 public:
  // Makes `fd` non-blocking and runs the TLS handshake on it, waiting up to timeout_ms.
  // `host`: the client's peer host (SNI, host name check). Throws WireError with
  // OpenSSL's reason (a certificate not signed by the CA, ...).
  TlsStream(const TlsContext& ctx, int fd, bool server, const std::string& host, int timeout_ms);
  TlsStream(const TlsStream&) = delete;
  TlsStream& operator=(const TlsStream&) = delete;

  // Reads what TLS has for us now, up to n bytes; 0 when it must wait, with `want` the
  // poll events to wait for. Throws WireError("connection closed") at the end.
  std::size_t read(void* data, std::size_t n, short& want);
  // Writes iov[0..n) in order as far as the socket takes it now; returns the bytes
  // written (whole records: TLS keeps a record the socket did not take and sends it
  // first on the next call, which must then offer the same bytes again: the send queue
  // keeps unwritten bytes at its front, so it does). `want` as read(). Throws on failure.
  std::size_t write(const struct iovec* iov, int n, short& want);
  // Decrypted or received bytes wait inside TLS (poll() would not see them).
  bool buffered();
  int fd() const { return fd_; }

  // Blocking helpers for the distribution handshake (a thread of its own, no lock held).
  void write_all(const void* data, std::size_t n, std::int64_t deadline_ns);
  void read_exact(void* data, std::size_t n, std::int64_t deadline_ns);

 private:
  std::mutex mu_;
  std::unique_ptr<ssl_st, SslFree> ssl_;
  int fd_;
};

// The distribution handshake's I/O over a TlsStream (4-byte lengths, as inet_tls_dist).
class TlsHandshakeIo : public HandshakeIo {
 public:
  TlsHandshakeIo(TlsStream& s, int timeout_ms);
  void write_all(const void* data, std::size_t n) override;
  void read_exact(void* data, std::size_t n) override;

 private:
  TlsStream& s_;
  std::int64_t deadline_;
};

}  // namespace erpy::node
