#include "tls.hpp"

#include <arpa/inet.h>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <fstream>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sstream>
#include <stdexcept>
#include <sys/uio.h>
#include <variant>

#include "protocol.hpp"

namespace erpy::node {

// --- the ssl_dist options file ----------------------------------------------------------------

namespace {

// The Erlang terms such a file holds: lists, tuples, atoms, strings, integers.
struct Term {
  enum Kind { kAtom, kString, kInt, kList, kTuple } kind = kAtom;
  std::string text;  // atom, string (a binary <<"...">> reads as a string)
  long long num = 0;
  std::vector<Term> items;
};

class TermParser {
 public:
  explicit TermParser(const std::string& s) : s_(s) {}

  Term parse() {
    Term t = term();
    skip();
    if (i_ < s_.size() && s_[i_] == '.') ++i_;
    skip();
    if (i_ != s_.size()) fail("text after the term");
    return t;
  }

 private:
  [[noreturn]] void fail(const std::string& why) {
    throw std::runtime_error("ssl_dist options: " + why + " at offset " + std::to_string(i_));
  }
  void skip() {
    while (i_ < s_.size()) {
      if (std::isspace(static_cast<unsigned char>(s_[i_]))) {
        ++i_;
      } else if (s_[i_] == '%') {
        while (i_ < s_.size() && s_[i_] != '\n') ++i_;
      } else {
        break;
      }
    }
  }
  std::string quoted(char q) {
    std::string out;
    ++i_;
    while (i_ < s_.size() && s_[i_] != q) {
      char c = s_[i_++];
      if (c == '\\' && i_ < s_.size()) {
        c = s_[i_++];
        if (c == 'n') c = '\n';
        else if (c == 't') c = '\t';
      }
      out.push_back(c);
    }
    if (i_ >= s_.size()) fail("unterminated quote");
    ++i_;
    return out;
  }
  void seq(Term& t, char close) {
    skip();
    if (i_ < s_.size() && s_[i_] == close) {
      ++i_;
      return;
    }
    for (;;) {
      t.items.push_back(term());
      skip();
      if (i_ >= s_.size()) fail("unterminated list or tuple");
      if (s_[i_] == ',') {
        ++i_;
        continue;
      }
      if (s_[i_] == close) {
        ++i_;
        return;
      }
      fail(std::string("expected ',' or '") + close + "'");
    }
  }
  Term term() {
    skip();
    if (i_ >= s_.size()) fail("unexpected end");
    Term t;
    const char c = s_[i_];
    if (c == '[') {
      ++i_;
      t.kind = Term::kList;
      seq(t, ']');
    } else if (c == '{') {
      ++i_;
      t.kind = Term::kTuple;
      seq(t, '}');
    } else if (c == '"') {
      t.kind = Term::kString;
      t.text = quoted('"');
    } else if (c == '\'') {
      t.kind = Term::kAtom;
      t.text = quoted('\'');
    } else if (s_.compare(i_, 2, "<<") == 0) {
      i_ += 2;
      skip();
      t.kind = Term::kString;
      if (i_ < s_.size() && s_[i_] == '"') t.text = quoted('"');
      skip();
      if (s_.compare(i_, 2, ">>") != 0) fail("expected >>");
      i_ += 2;
    } else if (std::isdigit(static_cast<unsigned char>(c)) || c == '-') {
      std::size_t end = i_ + 1;
      while (end < s_.size() && std::isdigit(static_cast<unsigned char>(s_[end]))) ++end;
      t.kind = Term::kInt;
      t.num = std::stoll(s_.substr(i_, end - i_));
      i_ = end;
    } else if (std::islower(static_cast<unsigned char>(c))) {
      std::size_t end = i_;
      while (end < s_.size() && (std::isalnum(static_cast<unsigned char>(s_[end])) || s_[end] == '_' || s_[end] == '@')) {
        ++end;
      }
      t.kind = Term::kAtom;
      t.text = s_.substr(i_, end - i_);
      i_ = end;
    } else {
      fail(std::string("unexpected '") + c + "'");
    }
    return t;
  }

  const std::string& s_;
  std::size_t i_ = 0;
};

[[noreturn]] void bad(const std::string& side, const std::string& opt, const std::string& why) {
  throw std::runtime_error("ssl_dist options, " + side + ": " + opt + " " + why);
}

std::string text_of(const std::string& side, const std::string& opt, const Term& v) {
  if (v.kind != Term::kString) bad(side, opt, "must be a string");
  return v.text;
}

bool bool_of(const std::string& side, const std::string& opt, const Term& v) {
  if (v.kind == Term::kAtom && (v.text == "true" || v.text == "false")) return v.text == "true";
  bad(side, opt, "must be true or false");
}

std::string version_of(const std::string& side, const Term& v) {
  if (v.kind == Term::kAtom && (v.text == "tlsv1.2" || v.text == "tlsv1.3")) return v.text;
  bad(side, "versions", "may hold 'tlsv1.2' and 'tlsv1.3' only");
}

TlsSide side_of(const std::string& side, const Term& list) {
  if (list.kind != Term::kList) bad(side, "options", "must be a list");
  TlsSide s;
  for (const Term& o : list.items) {
    if (o.kind != Term::kTuple || o.items.size() != 2 || o.items[0].kind != Term::kAtom) {
      bad(side, "options", "must be {Key, Value} tuples");
    }
    const std::string& k = o.items[0].text;
    const Term& v = o.items[1];
    if (k == "certfile") {
      s.certfile = text_of(side, k, v);
    } else if (k == "keyfile") {
      s.keyfile = text_of(side, k, v);
    } else if (k == "password") {
      s.password = text_of(side, k, v);
    } else if (k == "cacertfile") {
      s.cacertfile = text_of(side, k, v);
    } else if (k == "ciphers") {
      s.ciphers = text_of(side, k, v);
    } else if (k == "verify") {
      if (v.kind != Term::kAtom || (v.text != "verify_peer" && v.text != "verify_none")) {
        bad(side, k, "must be verify_peer or verify_none");
      }
      s.verify_peer = v.text == "verify_peer";
    } else if (k == "fail_if_no_peer_cert") {
      s.fail_if_no_peer_cert = bool_of(side, k, v);
    } else if (k == "depth") {
      if (v.kind != Term::kInt || v.num < 0 || v.num > 100) bad(side, k, "must be an integer 0..100");
      s.depth = static_cast<int>(v.num);
    } else if (k == "server_name_indication") {
      if (v.kind == Term::kAtom && v.text == "disable") {
        s.sni = false;
      } else {
        s.sni_host = text_of(side, k, v);
      }
    } else if (k == "versions") {
      if (v.kind != Term::kList || v.items.empty()) bad(side, k, "must be a list of versions");
      s.min_version = "tlsv1.3";
      s.max_version = "tlsv1.2";
      for (const Term& x : v.items) {
        const std::string ver = version_of(side, x);
        if (ver < s.min_version) s.min_version = ver;
        if (ver > s.max_version) s.max_version = ver;
      }
    } else if (k == "reuse_sessions" || k == "secure_renegotiate" || k == "hibernate_after" ||
               k == "honor_cipher_order" || k == "log_level") {
      // Without effect here (no sessions are resumed, renegotiation is off).
    } else {
      bad(side, k,
          "is not supported by erpy's node (supported: certfile, keyfile, password, cacertfile, verify, "
          "fail_if_no_peer_cert, depth, server_name_indication, versions, ciphers)");
    }
  }
  return s;
}

}  // namespace

TlsConfig parse_ssl_dist_opts(const std::string& text) {
  const Term t = TermParser(text).parse();
  if (t.kind != Term::kList) throw std::runtime_error("ssl_dist options: expected [{server, [...]}, {client, [...]}]");
  TlsConfig cfg;
  cfg.enabled = true;
  for (const Term& e : t.items) {
    if (e.kind != Term::kTuple || e.items.size() != 2 || e.items[0].kind != Term::kAtom ||
        (e.items[0].text != "server" && e.items[0].text != "client")) {
      throw std::runtime_error("ssl_dist options: expected {server, [...]} or {client, [...]}");
    }
    (e.items[0].text == "server" ? cfg.server : cfg.client) = side_of(e.items[0].text, e.items[1]);
  }
  return cfg;
}

TlsConfig read_ssl_dist_optfile(const std::string& path) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("cannot read the ssl_dist options file " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  try {
    return parse_ssl_dist_opts(ss.str());
  } catch (const std::runtime_error& e) {
    throw std::runtime_error(path + ": " + e.what());
  }
}

// --- contexts ------------------------------------------------------------------------------------

void SslCtxFree::operator()(SSL_CTX* c) const noexcept { SSL_CTX_free(c); }
void SslFree::operator()(SSL* s) const noexcept { SSL_free(s); }

namespace {

// OpenSSL's error queue (per thread) as text, emptied.
std::string ssl_errors() {
  std::string out;
  while (unsigned long e = ERR_get_error()) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof buf);
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out.empty() ? "unknown TLS error" : out;
}

int version_number(const std::string& v) { return v == "tlsv1.3" ? TLS1_3_VERSION : TLS1_2_VERSION; }

int password_cb(char* buf, int size, int, void* u) {
  const auto* pw = static_cast<const std::string*>(u);
  const int n = static_cast<int>(std::min<std::size_t>(pw->size(), static_cast<std::size_t>(size)));
  std::memcpy(buf, pw->data(), static_cast<std::size_t>(n));
  return n;
}

std::unique_ptr<SSL_CTX, SslCtxFree> make_ctx(const TlsSide& s, bool server) {
  const char* who = server ? "TLS server options" : "TLS client options";
  std::unique_ptr<SSL_CTX, SslCtxFree> ctx(SSL_CTX_new(server ? TLS_server_method() : TLS_client_method()));
  if (!ctx) throw std::runtime_error(std::string(who) + ": " + ssl_errors());
  auto fail = [&](const std::string& what) { throw std::runtime_error(std::string(who) + ": " + what + ": " + ssl_errors()); };
  SSL_CTX_set_min_proto_version(ctx.get(), version_number(s.min_version));
  SSL_CTX_set_max_proto_version(ctx.get(), version_number(s.max_version));
  // Erlang nodes close without close_notify: an end like any other (frames carry their
  // lengths, so a cut is still seen as a cut).
  SSL_CTX_set_options(ctx.get(), SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION | SSL_OP_IGNORE_UNEXPECTED_EOF);
  // Writes may be partial (a non-blocking socket) and retried from the send queue, whose
  // buffers move.
  SSL_CTX_set_mode(ctx.get(), SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                                  SSL_MODE_RELEASE_BUFFERS);
  // Fewer read syscalls: a read takes what the socket has, not one record header at a time.
  SSL_CTX_set_read_ahead(ctx.get(), 1);
  SSL_CTX_set_default_read_buffer_len(ctx.get(), 64 * 1024);
  if (!s.password.empty()) {
    // The context outlives nothing that owns `s`: TlsContext keeps its config.
    SSL_CTX_set_default_passwd_cb(ctx.get(), password_cb);
    SSL_CTX_set_default_passwd_cb_userdata(ctx.get(), const_cast<std::string*>(&s.password));
  }
  if (!s.certfile.empty() && SSL_CTX_use_certificate_chain_file(ctx.get(), s.certfile.c_str()) != 1) {
    fail("certfile " + s.certfile);
  }
  const std::string& key = s.keyfile.empty() ? s.certfile : s.keyfile;
  if (!key.empty()) {
    if (SSL_CTX_use_PrivateKey_file(ctx.get(), key.c_str(), SSL_FILETYPE_PEM) != 1) fail("keyfile " + key);
    if (SSL_CTX_check_private_key(ctx.get()) != 1) fail("keyfile " + key + " does not match certfile");
  }
  if (server && s.certfile.empty()) throw std::runtime_error(std::string(who) + ": certfile is required");
  if (!s.cacertfile.empty()) {
    if (SSL_CTX_load_verify_locations(ctx.get(), s.cacertfile.c_str(), nullptr) != 1) {
      fail("cacertfile " + s.cacertfile);
    }
    if (server) {
      // The CAs a client's certificate may come from, told to the client.
      if (STACK_OF(X509_NAME)* names = SSL_load_client_CA_file(s.cacertfile.c_str())) {
        SSL_CTX_set_client_CA_list(ctx.get(), names);
      }
    }
  }
  if (s.verify_peer && s.cacertfile.empty()) {
    throw std::runtime_error(std::string(who) + ": verify_peer needs cacertfile");
  }
  if (!s.ciphers.empty() && SSL_CTX_set_cipher_list(ctx.get(), s.ciphers.c_str()) != 1) fail("ciphers");
  int mode = SSL_VERIFY_NONE;
  if (s.verify_peer) {
    mode = SSL_VERIFY_PEER;
    if (server && s.fail_if_no_peer_cert) mode |= SSL_VERIFY_FAIL_IF_NO_PEER_CERT;
  }
  SSL_CTX_set_verify(ctx.get(), mode, nullptr);
  if (s.depth >= 0) SSL_CTX_set_verify_depth(ctx.get(), s.depth);
  return ctx;
}

}  // namespace

TlsContext::TlsContext(const TlsConfig& cfg) : cfg_(cfg) {
  server_ = make_ctx(cfg_.server, true);
  client_ = make_ctx(cfg_.client, false);
}

// --- streams -------------------------------------------------------------------------------------

namespace {

void wait_for(int fd, short events, std::int64_t deadline_ns) {
  for (;;) {
    const std::int64_t left = deadline_ns - now_ns();
    if (left <= 0) throw WireError("TLS: timeout");
    pollfd p{fd, events, 0};
    const int r = ::poll(&p, 1, static_cast<int>(std::min<std::int64_t>(left / 1'000'000 + 1, 1000)));
    if (r > 0) return;
    if (r < 0 && errno != EINTR) throw WireError(std::string("poll: ") + std::strerror(errno));
  }
}

}  // namespace

TlsStream::TlsStream(const TlsContext& ctx, int fd, bool server, const std::string& host, int timeout_ms)
    : fd_(fd) {
  const int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0 || ::fcntl(fd, F_SETFL, fl | O_NONBLOCK) != 0) throw WireError("fcntl: " + std::string(std::strerror(errno)));
  ERR_clear_error();
  ssl_.reset(SSL_new(server ? ctx.server() : ctx.client()));
  if (!ssl_ || SSL_set_fd(ssl_.get(), fd) != 1) throw WireError("TLS: " + ssl_errors());
  const TlsSide& side = server ? ctx.config().server : ctx.config().client;
  if (!server && side.sni) {
    // As inet_tls_dist: SNI and the certificate's name checked against the peer's host
    // (or server_name_indication's name); an address is checked against the
    // certificate's IP entries, and sent without SNI (SNI holds names only).
    const std::string& name = side.sni_host.empty() ? host : side.sni_host;
    in_addr a4;
    in6_addr a6;
    const bool ip = inet_pton(AF_INET, name.c_str(), &a4) == 1 || inet_pton(AF_INET6, name.c_str(), &a6) == 1;
    if (!ip) SSL_set_tlsext_host_name(ssl_.get(), name.c_str());
    if (side.verify_peer) {
      X509_VERIFY_PARAM* param = SSL_get0_param(ssl_.get());
      const int ok = ip ? X509_VERIFY_PARAM_set1_ip_asc(param, name.c_str())
                        : X509_VERIFY_PARAM_set1_host(param, name.c_str(), 0);
      if (ok != 1) throw WireError("TLS: bad host name " + name);
    }
  }
  const std::int64_t deadline = now_ns() + std::int64_t{timeout_ms} * 1'000'000;
  for (;;) {
    ERR_clear_error();
    const int r = server ? SSL_accept(ssl_.get()) : SSL_connect(ssl_.get());
    if (r == 1) break;
    const int e = SSL_get_error(ssl_.get(), r);
    if (e == SSL_ERROR_WANT_READ) {
      wait_for(fd, POLLIN, deadline);
    } else if (e == SSL_ERROR_WANT_WRITE) {
      wait_for(fd, POLLOUT, deadline);
    } else {
      std::string why = ERR_peek_error() ? ssl_errors() : std::string("the peer closed the connection");
      const long v = SSL_get_verify_result(ssl_.get());
      if (v != X509_V_OK) why += std::string(" (") + X509_verify_cert_error_string(v) + ")";
      throw WireError("TLS handshake failed: " + why);
    }
  }
}

std::size_t TlsStream::read(void* data, std::size_t n, short& want) {
  auto* p = static_cast<std::uint8_t*>(data);
  std::size_t got = 0;
  std::lock_guard lk(mu_);
  while (got < n) {
    ERR_clear_error();
    std::size_t r = 0;
    const int ok = SSL_read_ex(ssl_.get(), p + got, n - got, &r);
    if (ok == 1) {
      got += r;
      // What TLS holds is taken now; what is still in the kernel, at the next read
      // (poll sees it), without a read that would only say EAGAIN.
      if (!SSL_has_pending(ssl_.get())) break;
      continue;
    }
    const int e = SSL_get_error(ssl_.get(), ok);
    if (e == SSL_ERROR_WANT_READ) {
      want = POLLIN;
      break;
    }
    if (e == SSL_ERROR_WANT_WRITE) {
      want = POLLOUT;
      break;
    }
    if (got) break;  // the end or the error comes at the next read
    if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0)) {
      throw WireError("connection closed");
    }
    throw WireError("TLS: " + ssl_errors());
  }
  return got;
}

std::size_t TlsStream::write(const iovec* iov, int n, short& want) {
  // Small frames go out together, one record and one syscall for many. The buffer offers
  // the same leading bytes again after a partial write, so a retry is always valid.
  constexpr std::size_t kGather = 16 * 1024;
  thread_local std::uint8_t gather[kGather];
  std::size_t total = 0;
  std::lock_guard lk(mu_);
  int i = 0;
  while (i < n) {
    const std::uint8_t* buf;
    std::size_t len;
    int used;
    if (iov[i].iov_len >= kGather / 2 || i + 1 == n) {
      buf = static_cast<const std::uint8_t*>(iov[i].iov_base);
      len = iov[i].iov_len;
      used = 1;
    } else {
      len = 0;
      used = 0;
      while (i + used < n && len + iov[i + used].iov_len <= kGather) {
        std::memcpy(gather + len, iov[i + used].iov_base, iov[i + used].iov_len);
        len += iov[i + used].iov_len;
        ++used;
      }
      buf = gather;
    }
    std::size_t off = 0;
    while (off < len) {
      ERR_clear_error();
      std::size_t w = 0;
      const int ok = SSL_write_ex(ssl_.get(), buf + off, len - off, &w);
      if (ok == 1) {
        off += w;
        continue;
      }
      const int e = SSL_get_error(ssl_.get(), ok);
      if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
        want = e == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN;
        return total + off;
      }
      throw WireError("TLS: " + (ERR_peek_error() ? ssl_errors() : std::string(std::strerror(errno))));
    }
    total += len;
    i += used;
  }
  return total;
}

bool TlsStream::buffered() {
  std::lock_guard lk(mu_);
  return SSL_has_pending(ssl_.get()) == 1;
}

void TlsStream::write_all(const void* data, std::size_t n, std::int64_t deadline_ns) {
  const auto* p = static_cast<const std::uint8_t*>(data);
  while (n) {
    iovec v{const_cast<std::uint8_t*>(p), n};
    short want = 0;
    const std::size_t w = write(&v, 1, want);
    p += w;
    n -= w;
    if (n) wait_for(fd_, want, deadline_ns);
  }
}

void TlsStream::read_exact(void* data, std::size_t n, std::int64_t deadline_ns) {
  auto* p = static_cast<std::uint8_t*>(data);
  while (n) {
    short want = 0;
    const std::size_t r = read(p, n, want);
    p += r;
    n -= r;
    if (n && !r) wait_for(fd_, want, deadline_ns);
  }
}

TlsHandshakeIo::TlsHandshakeIo(TlsStream& s, int timeout_ms)
    : HandshakeIo(4), s_(s), deadline_(now_ns() + std::int64_t{timeout_ms} * 1'000'000) {}

void TlsHandshakeIo::write_all(const void* data, std::size_t n) { s_.write_all(data, n, deadline_); }
void TlsHandshakeIo::read_exact(void* data, std::size_t n) { s_.read_exact(data, n, deadline_); }

}  // namespace erpy::node
