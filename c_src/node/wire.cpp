#include "wire.hpp"

#include <arpa/inet.h>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <array>
#include <random>
#include <sys/socket.h>
#include <unistd.h>
#include <vector>

#include "etf/reader.hpp"
#include "etf/tags.hpp"
#include "md5.hpp"

namespace erpy::node {

namespace {

constexpr int kEpmdPort = 4369;
constexpr std::uint8_t kAlive2Req = 120, kAlive2XResp = 118, kAlive2Resp = 121;
constexpr std::uint8_t kPortPlease2Req = 122, kPort2Resp = 119;

[[noreturn]] void fail_errno(const std::string& what) {
  throw WireError(what + ": " + std::strerror(errno));
}

void put16(std::vector<std::uint8_t>& b, std::uint16_t v) {
  b.push_back(static_cast<std::uint8_t>(v >> 8));
  b.push_back(static_cast<std::uint8_t>(v));
}
void put32(std::vector<std::uint8_t>& b, std::uint32_t v) {
  put16(b, static_cast<std::uint16_t>(v >> 16));
  put16(b, static_cast<std::uint16_t>(v));
}
void put64(std::vector<std::uint8_t>& b, std::uint64_t v) {
  put32(b, static_cast<std::uint32_t>(v >> 32));
  put32(b, static_cast<std::uint32_t>(v));
}
// A loop, not vector::insert: GCC 12 warns (wrongly) about insert of small arrays.
template <class It> void append(std::vector<std::uint8_t>& b, It first, It last) {
  for (; first != last; ++first) b.push_back(static_cast<std::uint8_t>(*first));
}
std::uint16_t get16(const std::uint8_t* p) { return static_cast<std::uint16_t>((p[0] << 8) | p[1]); }
std::uint32_t get32(const std::uint8_t* p) {
  return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) | (std::uint32_t{p[2]} << 8) | p[3];
}
std::uint64_t get64(const std::uint8_t* p) { return (std::uint64_t{get32(p)} << 32) | get32(p + 4); }

sockaddr_in resolve(const std::string& host, int port) {
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<std::uint16_t>(port));
  if (host.empty() || host == "0.0.0.0") {
    a.sin_addr.s_addr = htonl(INADDR_ANY);
    return a;
  }
  if (inet_pton(AF_INET, host.c_str(), &a.sin_addr) == 1) return a;
  addrinfo hints{};
  hints.ai_family = AF_INET;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  if (getaddrinfo(host.c_str(), nullptr, &hints, &res) != 0 || !res) {
    throw WireError("cannot resolve host " + host);
  }
  a.sin_addr = reinterpret_cast<sockaddr_in*>(res->ai_addr)->sin_addr;
  freeaddrinfo(res);
  return a;
}

// Handshake messages carry a 2-byte length (4 over TLS).
void send_hs(HandshakeIo& io, const std::vector<std::uint8_t>& body) {
  std::vector<std::uint8_t> f;
  if (io.header == 4) put16(f, static_cast<std::uint16_t>(body.size() >> 16));
  put16(f, static_cast<std::uint16_t>(body.size()));
  append(f, body.begin(), body.end());
  io.write_all(f.data(), f.size());
}
std::vector<std::uint8_t> recv_hs(HandshakeIo& io) {
  std::uint8_t h[4];
  io.read_exact(h, static_cast<std::size_t>(io.header));
  const std::size_t len = io.header == 4 ? get32(h) : get16(h);
  // Handshake messages are small: a peer claiming more is not speaking the protocol.
  if (len > 65535) throw WireError("handshake: message too long");
  std::vector<std::uint8_t> body(len);
  if (!body.empty()) io.read_exact(body.data(), body.size());
  return body;
}

std::array<std::uint8_t, 16> digest(std::uint32_t challenge, const std::string& cookie) {
  return md5(cookie + std::to_string(challenge));
}

std::uint32_t new_challenge() {
  static thread_local std::mt19937 gen{std::random_device{}()};
  return static_cast<std::uint32_t>(gen());
}

std::vector<std::uint8_t> name_message(const Self& self, const std::uint32_t* challenge) {
  std::vector<std::uint8_t> b;
  b.push_back('N');
  put64(b, self.flags);
  if (challenge) put32(b, *challenge);
  put32(b, self.creation);
  put16(b, static_cast<std::uint16_t>(self.name.size()));
  append(b, self.name.begin(), self.name.end());
  return b;
}

void check_flags(std::uint64_t flags) {
  if (flags & dflag::kMandatory25Digest) return;
  if ((flags & dflag::kRequired) != dflag::kRequired) {
    throw WireError("the other node lacks distribution flags erpy needs (OTP 23 or later is)");
  }
}

// Handshake steps must not hang forever on a silent peer.
class RecvTimeout {
 public:
  RecvTimeout(int fd, int seconds) : fd_(fd) { set(seconds); }
  ~RecvTimeout() { set(0); }
  RecvTimeout(const RecvTimeout&) = delete;
  RecvTimeout& operator=(const RecvTimeout&) = delete;

 private:
  void set(int seconds) {
    timeval tv{seconds, 0};
    setsockopt(fd_, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  }
  int fd_;
};

// The socket itself, each read bounded by SO_RCVTIMEO.
class PlainIo : public HandshakeIo {
 public:
  explicit PlainIo(int fd) : HandshakeIo(2), fd_(fd), guard_(fd, 10) {}
  void write_all(const void* data, std::size_t n) override { node::write_all(fd_, data, n); }
  void read_exact(void* data, std::size_t n) override { node::read_exact(fd_, data, n); }

 private:
  int fd_;
  RecvTimeout guard_;
};

// EPMD speaks with 2-byte lengths on a plain socket.
void send_epmd(int fd, const std::vector<std::uint8_t>& body) {
  std::vector<std::uint8_t> f;
  put16(f, static_cast<std::uint16_t>(body.size()));
  append(f, body.begin(), body.end());
  write_all(fd, f.data(), f.size());
}

}  // namespace

void Fd::reset() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

void write_all(int fd, const void* data, std::size_t n) {
  const auto* p = static_cast<const std::uint8_t*>(data);
  while (n) {
    const ssize_t w = ::send(fd, p, n, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      fail_errno("send");
    }
    p += w;
    n -= static_cast<std::size_t>(w);
  }
}

void read_exact(int fd, void* data, std::size_t n) {
  auto* p = static_cast<std::uint8_t*>(data);
  while (n) {
    const ssize_t r = ::recv(fd, p, n, 0);
    if (r == 0) throw WireError("connection closed");
    if (r < 0) {
      if (errno == EINTR) continue;
      fail_errno("recv");
    }
    p += r;
    n -= static_cast<std::size_t>(r);
  }
}

std::pair<std::string, std::string> split_node(std::string_view node) {
  const auto at = node.find('@');
  if (at == std::string_view::npos || at == 0 || at + 1 == node.size()) {
    throw WireError("node name must be name@host, got " + std::string(node));
  }
  return {std::string(node.substr(0, at)), std::string(node.substr(at + 1))};
}

std::pair<Fd, int> listen_tcp(const std::string& host, int port) {
  Fd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!s) fail_errno("socket");
  int one = 1;
  setsockopt(s.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in a = resolve(host, port);
  if (::bind(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) fail_errno("bind " + host);
  if (::listen(s.get(), 128) != 0) fail_errno("listen");
  socklen_t len = sizeof a;
  if (::getsockname(s.get(), reinterpret_cast<sockaddr*>(&a), &len) != 0) fail_errno("getsockname");
  return {std::move(s), ntohs(a.sin_port)};
}

Fd connect_tcp(const std::string& host, int port, int timeout_ms) {
  Fd s(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!s) fail_errno("socket");
  sockaddr_in a = resolve(host, port);
  if (::connect(s.get(), reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    if (errno != EINPROGRESS) fail_errno("connect to " + host + ":" + std::to_string(port));
    pollfd p{s.get(), POLLOUT, 0};
    if (::poll(&p, 1, timeout_ms) != 1) throw WireError("connect to " + host + ": timeout");
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(s.get(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
      errno = err;
      fail_errno("connect to " + host + ":" + std::to_string(port));
    }
  }
  // Back to blocking: every reader of this socket is a thread of its own.
  int one = 1;
  setsockopt(s.get(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  const int fl = ::fcntl(s.get(), F_GETFL);
  if (fl < 0 || ::fcntl(s.get(), F_SETFL, fl & ~O_NONBLOCK) != 0) fail_errno("fcntl");
  return s;
}

std::pair<Fd, std::uint32_t> epmd_register(const std::string& alive, int port, bool hidden) {
  Fd s = connect_tcp("127.0.0.1", kEpmdPort, 5000);
  std::vector<std::uint8_t> b;
  b.push_back(kAlive2Req);
  put16(b, static_cast<std::uint16_t>(port));
  b.push_back(hidden ? 72 : 77);  // node type: hidden / normal
  b.push_back(0);                  // protocol: TCP/IPv4
  put16(b, 6);                     // highest version: the OTP 23 handshake
  put16(b, 6);                     // lowest
  put16(b, static_cast<std::uint16_t>(alive.size()));
  append(b, alive.begin(), alive.end());
  put16(b, 0);  // no extra
  send_epmd(s.get(), b);
  std::uint8_t r[2];
  read_exact(s.get(), r, 2);
  if (r[0] == kAlive2XResp) {
    if (r[1] != 0) throw WireError("epmd refused the name " + alive + " (already registered?)");
    std::uint8_t c[4];
    read_exact(s.get(), c, 4);
    return {std::move(s), get32(c)};
  }
  if (r[0] == kAlive2Resp) {
    if (r[1] != 0) throw WireError("epmd refused the name " + alive + " (already registered?)");
    std::uint8_t c[2];
    read_exact(s.get(), c, 2);
    return {std::move(s), get16(c)};
  }
  throw WireError("unexpected answer from epmd");
}

int epmd_port_please(const std::string& host, const std::string& alive, int timeout_ms) {
  Fd s = connect_tcp(host, kEpmdPort, timeout_ms);
  std::vector<std::uint8_t> b;
  b.push_back(kPortPlease2Req);
  append(b, alive.begin(), alive.end());
  send_epmd(s.get(), b);
  std::uint8_t r[2];
  read_exact(s.get(), r, 2);
  if (r[0] != kPort2Resp) throw WireError("unexpected answer from epmd");
  if (r[1] != 0) return -1;
  std::uint8_t p[2];
  read_exact(s.get(), p, 2);
  return get16(p);  // the rest of the answer (versions, name) is not needed
}

Peer handshake_accept(int fd, const Self& self) {
  PlainIo io(fd);
  return handshake_accept(io, self);
}

Peer handshake_connect(int fd, const Self& self, const std::string& peer_name) {
  PlainIo io(fd);
  return handshake_connect(io, self, peer_name);
}

Peer handshake_accept(HandshakeIo& fd, const Self& self) {
  auto m = recv_hs(fd);
  if (m.size() < 15 || m[0] != 'N') {
    throw WireError("handshake: expected a version 6 send_name ('N'), OTP 23 or later");
  }
  Peer peer;
  peer.flags = get64(&m[1]);
  peer.creation = get32(&m[9]);
  const std::size_t nlen = get16(&m[13]);
  if (m.size() < 15 + nlen) throw WireError("handshake: truncated name");
  peer.name.assign(reinterpret_cast<const char*>(&m[15]), nlen);
  check_flags(peer.flags);
  send_hs(fd, {'s', 'o', 'k'});

  const std::uint32_t challenge = new_challenge();
  send_hs(fd, name_message(self, &challenge));

  auto reply = recv_hs(fd);
  if (reply.size() != 21 || reply[0] != 'r') throw WireError("handshake: bad challenge reply");
  const std::uint32_t their_challenge = get32(&reply[1]);
  const auto expected = digest(challenge, self.cookie);
  if (std::memcmp(expected.data(), &reply[5], 16) != 0) {
    throw WireError("connection attempt from " + peer.name + " refused: wrong cookie");
  }
  const auto ack = digest(their_challenge, self.cookie);
  std::vector<std::uint8_t> a{'a'};
  append(a, ack.begin(), ack.end());
  send_hs(fd, a);
  return peer;
}

Peer handshake_connect(HandshakeIo& fd, const Self& self, const std::string& peer_name) {
  send_hs(fd, name_message(self, nullptr));
  auto status = recv_hs(fd);
  const std::string st(status.begin(), status.end());
  if (st != "sok" && st != "sok_simultaneous") {
    throw WireError("handshake with " + peer_name + " refused: " + st);
  }
  auto m = recv_hs(fd);
  if (m.size() < 19 || m[0] != 'N') throw WireError("handshake: bad challenge from " + peer_name);
  Peer peer;
  peer.flags = get64(&m[1]);
  const std::uint32_t challenge = get32(&m[9]);
  peer.creation = get32(&m[13]);
  const std::size_t nlen = get16(&m[17]);
  if (m.size() < 19 + nlen) throw WireError("handshake: truncated name");
  peer.name.assign(reinterpret_cast<const char*>(&m[19]), nlen);
  check_flags(peer.flags);

  const std::uint32_t ours = new_challenge();
  const auto d = digest(challenge, self.cookie);
  std::vector<std::uint8_t> r{'r'};
  put32(r, ours);
  append(r, d.begin(), d.end());
  send_hs(fd, r);
  std::vector<std::uint8_t> ack;
  try {
    ack = recv_hs(fd);
  } catch (const WireError&) {
    throw WireError("handshake with " + peer_name + " failed: wrong cookie?");
  }
  const auto expected = digest(ours, self.cookie);
  if (ack.size() != 17 || ack[0] != 'a' || std::memcmp(expected.data(), &ack[1], 16) != 0) {
    throw WireError("handshake with " + peer_name + ": the other node has another cookie");
  }
  return peer;
}

}  // namespace erpy::node

// --- Incoming frames ------------------------------------------------------------------------

namespace erpy::node {

namespace {

constexpr std::uint8_t kPassThrough = 112, kFragCont = 70;

// The atom cache part of a distribution header (DFLAG_DIST_HDR_ATOM_CACHE). erpy does not
// ask for it, but a peer may still send headers with zero references.
std::vector<std::string> read_atom_refs(etf::Reader& r, std::vector<std::string>& cache) {
  const std::size_t n = r.u8("atom cache refs");
  std::vector<std::string> out;
  if (n == 0) return out;
  etf::Bytes flags = r.take(n / 2 + 1, "atom cache flags");
  const bool long_atoms = (flags[n / 2] >> (4 * (n % 2))) & 1;
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint8_t f = (flags[i / 2] >> (4 * (i % 2))) & 0xF;
    const std::size_t idx = std::size_t{f & 7u} * 256 + r.u8("atom cache index");
    if (f & 8) {
      const std::size_t len = long_atoms ? r.u16("atom length") : r.u8("atom length");
      etf::Bytes text = r.take(len, "atom text");
      cache[idx].assign(reinterpret_cast<const char*>(text.data()), text.size());
    }
    out.push_back(cache[idx]);
  }
  return out;
}

// Keeps the first kRefusedHead bytes of `b` and frees the rest.
void keep_head(Bytes& b) {
  if (b.size() <= kRefusedHead) return;
  Bytes head(b.begin(), b.begin() + kRefusedHead);
  b.swap(head);
}

}  // namespace

Incoming Reassembler::refuse(Incoming in, Incoming::Why why, std::size_t size) {
  in.kind = Incoming::kRefused;
  in.why = why;
  in.size = size;
  if (in.data.size() > kRefusedHead) in.data = in.data.first(kRefusedHead);
  return in;
}

Incoming Reassembler::drop(std::unordered_map<std::uint64_t, Partial>::iterator it, Incoming::Why why,
                           std::size_t size) {
  Incoming in;
  bytes_ -= it->second.data.size();
  in.owned = std::move(it->second.data);
  in.atoms = std::move(it->second.atoms);
  partial_.erase(it);
  keep_head(in.owned);
  in.data = in.owned;
  return refuse(std::move(in), why, size);
}

void Reassembler::clear() {
  partial_.clear();
  bytes_ = 0;
}

Incoming Reassembler::feed(std::span<const std::uint8_t> frame, std::size_t full) {
  Incoming in;
  if (frame.empty()) return in;  // a tick
  const bool cut = full > frame.size();
  const bool too_large = cut || full > lim_.max_message;
  if (frame[0] == kPassThrough) {
    in.data = frame.subspan(1);
    if (too_large) return refuse(std::move(in), Incoming::kTooLarge, full);
    in.kind = Incoming::kMessage;
    return in;
  }
  etf::Reader r(frame);
  if (r.u8("magic") != 131) throw WireError("bad distribution message");
  const std::uint8_t kind = r.u8("header");
  if (kind == etf::kDistHeader) {
    in.atoms = read_atom_refs(r, atom_cache_);
    in.data = frame.subspan(r.pos());
    if (too_large) return refuse(std::move(in), Incoming::kTooLarge, full);
    in.kind = Incoming::kMessage;
    return in;
  }
  if (kind == etf::kDistFragHeader) {
    const std::uint64_t seq = r.u64("sequence id");
    const std::uint64_t frag = r.u64("fragment id");
    in.atoms = read_atom_refs(r, atom_cache_);
    in.data = frame.subspan(r.pos());
    const std::size_t size = full - r.pos();
    if (too_large) return refuse(std::move(in), Incoming::kTooLarge, full);
    if (frag <= 1) {  // the whole message in one fragment
      in.kind = Incoming::kMessage;
      return in;
    }
    if (partial_.count(seq)) throw WireError("fragmented message " + std::to_string(seq) + " begun twice");
    // Refused here, the sequence is never recorded: its other fragments are skipped.
    if (partial_.size() >= lim_.max_pending || bytes_ + size > lim_.max_pending_bytes) {
      return refuse(std::move(in), Incoming::kPendingLimit, size);
    }
    Partial& p = partial_[seq];
    p.data.assign(in.data.begin(), in.data.end());
    p.atoms = std::move(in.atoms);
    bytes_ += size;
    return Incoming{};
  }
  if (kind == kFragCont) {
    const std::uint64_t seq = r.u64("sequence id");
    const std::uint64_t frag = r.u64("fragment id");
    auto it = partial_.find(seq);
    // A fragment of a message refused earlier (or never begun): skipped.
    if (it == partial_.end()) return in;
    const std::size_t add = full - r.pos();
    const std::size_t size = it->second.data.size() + add;
    if (cut || size > lim_.max_message) return drop(it, Incoming::kTooLarge, size);
    if (bytes_ + add > lim_.max_pending_bytes) return drop(it, Incoming::kPendingLimit, size);
    etf::Bytes rest = frame.subspan(r.pos());
    it->second.data.insert(it->second.data.end(), rest.begin(), rest.end());
    bytes_ += add;
    if (frag > 1) return in;
    bytes_ -= it->second.data.size();
    in.owned = std::move(it->second.data);
    in.atoms = std::move(it->second.atoms);
    partial_.erase(it);
    in.data = in.owned;
    in.kind = Incoming::kMessage;
    return in;
  }
  throw WireError("unknown distribution header " + std::to_string(kind));
}

}  // namespace erpy::node
