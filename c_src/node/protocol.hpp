// The distribution protocol's messages as the node core builds and reads them: control
// operations, frames, and terms kept in their encoded form. Shared by the connection, the
// process table, the job runner and the core; no Python, no sockets.
#pragma once
#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <string_view>
#include <vector>

#include "etf/encode.hpp"
#include "etf/term.hpp"
#include "py/buffer.hpp"

namespace erpy::node {

using Bytes = std::vector<std::uint8_t>;

// The monotonic clock every part of the node uses, in nanoseconds.
inline std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// An etf Sink appending to Bytes (etf::GrowSink's range insert trips GCC 12's
// -Warray-bounds on constant-size writes).
struct BytesSink {
  Bytes& out;
  void byte(std::uint8_t b) { out.push_back(b); }
  void write(const void* src, std::size_t n) {
    const auto* s = static_cast<const std::uint8_t*>(src);
    for (std::size_t i = 0; i < n; ++i) out.push_back(s[i]);
  }
};

// Control message operations (erts/doc "Distribution Protocol").
enum Op : int {
  kLink = 1, kSend = 2, kExit = 3, kUnlink = 4, kRegSend = 6, kGroupLeader = 7, kExit2 = 8,
  kSendTT = 12, kExitTT = 13, kRegSendTT = 16, kExit2TT = 18, kMonitorP = 19,
  kDemonitorP = 20, kMonitorPExit = 21, kSendSender = 22, kSendSenderTT = 23,
  kPayloadExit = 24, kPayloadExitTT = 25, kPayloadExit2 = 26, kPayloadExit2TT = 27,
  kPayloadMonitorPExit = 28, kSpawnRequest = 29, kSpawnRequestTT = 30, kSpawnReply = 31,
  kSpawnReplyTT = 32, kAliasSend = 33, kAliasSendTT = 34, kUnlinkId = 35, kUnlinkIdAck = 36,
};

// One frame under construction: [len:32][131 68 0][control][payload]. With
// DFLAG_FRAGMENTS negotiated OTP expects a distribution header on every message (not the
// pass-through 'p' form); ours has no atom cache references, and the terms after a
// distribution header carry no version byte.
inline constexpr bool kPayloadMagic = false;
class Frame {
 public:
  explicit Frame(py::ByteBuffer& b) : b_(b), start_(b.size()) {
    static const std::uint8_t head[7] = {0, 0, 0, 0, 131, 68, 0};
    b_.write(head, sizeof head);
  }
  py::ByteBuffer& buf() { return b_; }
  void payload() {
    if (kPayloadMagic) b_.byte(131);
  }
  // Patches the length; `extra` counts bytes sent after this buffer (an iovec tail).
  void end(std::size_t extra = 0) {
    const std::size_t n = b_.size() - start_ - 4 + extra;
    std::uint8_t* p = b_.data() + start_;
    p[0] = static_cast<std::uint8_t>(n >> 24);
    p[1] = static_cast<std::uint8_t>(n >> 16);
    p[2] = static_cast<std::uint8_t>(n >> 8);
    p[3] = static_cast<std::uint8_t>(n);
  }

 private:
  py::ByteBuffer& b_;
  std::size_t start_;
};

// A control message with no payload: {Op, Parts...}, each part an encoded term
// (MONITOR_P, DEMONITOR_P, LINK).
inline py::ByteBuffer control_frame(int op, std::initializer_list<const Bytes*> parts) {
  py::ByteBuffer b;
  Frame f(b);
  etf::put_tuple_header(b, parts.size() + 1);
  etf::put_integer(b, op);
  for (const Bytes* part : parts) etf::put_raw(b, *part);
  f.end();
  return b;
}

// A control message with a payload (an exit reason): {Op, From, To[, Ref]}, Reason.
inline py::ByteBuffer exit_frame(int op, const Bytes& from, const Bytes& to, const Bytes* ref,
                                 const Bytes& reason) {
  py::ByteBuffer b;
  Frame f(b);
  etf::put_tuple_header(b, ref ? 4 : 3);
  etf::put_integer(b, op);
  etf::put_raw(b, from);
  etf::put_raw(b, to);
  if (ref) etf::put_raw(b, *ref);
  f.payload();
  etf::put_raw(b, reason);
  f.end();
  return b;
}

// --- encoded terms (canonical encoding, no version byte) ---------------------------------

template <class F> Bytes build(F&& f) {
  Bytes out;
  BytesSink s{out};
  f(s);
  return out;
}

inline Bytes enc(const etf::Term& t) {
  return build([&](auto& s) { etf::put_term(s, t); });
}

inline Bytes enc_atom(std::string_view a) {
  return build([&](auto& s) { etf::put_atom(s, a); });
}

// A message for a mailbox (version byte first) from encoded parts: a tuple of them.
inline Bytes message_tuple(std::initializer_list<const Bytes*> parts) {
  Bytes out{131};
  BytesSink s{out};
  etf::put_tuple_header(s, parts.size());
  for (const Bytes* p : parts) out.insert(out.end(), p->begin(), p->end());
  return out;
}

inline const std::string* atom_of(const etf::Term& t) {
  const auto* a = std::get_if<etf::Atom>(&t.v);
  return a ? &a->name : nullptr;
}

inline std::int64_t int_of(const etf::Term& t) {
  const auto* i = std::get_if<std::int64_t>(&t.v);
  return i ? *i : -1;
}

}  // namespace erpy::node
