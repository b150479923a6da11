// The head of a frame Erlang wrote to the worker, {Kind, Id, ...}: its kind (an atom),
// arity and, when the second element is an integer, the id. Read without decoding the
// rest, so a thread that only routes frames (the watchdog) pays nothing for a large
// request.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>

#include "etf/decode.hpp"

namespace erpy::worker {

struct FrameHead {
  std::string_view kind;  // a view into the frame
  std::size_t arity = 0;
  std::optional<std::int64_t> id;
};

// A SMALL_BIG_EXT that fits in 63 bits (erlang:unique_integer/1 ids often need one).
inline std::optional<std::int64_t> small_big(etf::Reader& r) {
  const std::size_t n = r.u8("id");
  const bool negative = r.u8("id") != 0;
  if (n > 8) return std::nullopt;
  const auto digits = r.take(n, "id");
  std::uint64_t v = 0;
  for (std::size_t i = n; i-- > 0;) v = (v << 8) | digits[i];
  if (v > static_cast<std::uint64_t>(INT64_MAX)) return std::nullopt;
  return negative ? -static_cast<std::int64_t>(v) : static_cast<std::int64_t>(v);
}

// nullopt for bytes that do not start as such a frame; never throws.
inline std::optional<FrameHead> frame_head(etf::Bytes frame) noexcept {
  try {
    etf::Reader r(frame);
    if (r.u8("version") != etf::kVersion) return std::nullopt;
    FrameHead h;
    const std::uint8_t tt = r.u8("frame");
    if (tt == etf::kSmallTuple) h.arity = r.u8("arity");
    else if (tt == etf::kLargeTuple) h.arity = r.u32("arity");
    else return std::nullopt;
    if (h.arity == 0) return std::nullopt;
    const std::uint8_t tag = r.u8("kind");
    std::size_t len;
    if (tag == etf::kSmallAtomUtf8 || tag == etf::kSmallAtom) len = r.u8("kind");
    else if (tag == etf::kAtomUtf8 || tag == etf::kAtom) len = r.u16("kind");
    else return std::nullopt;
    h.kind = etf::as_chars(r.take(len, "kind"));
    if (h.arity >= 2) {
      const std::uint8_t it = r.u8("id");
      if (it == etf::kSmallInteger) h.id = r.u8("id");
      else if (it == etf::kInteger) h.id = static_cast<std::int32_t>(r.u32("id"));
      else if (it == etf::kSmallBig) h.id = small_big(r);
    }
    return h;
  } catch (const etf::DecodeError&) {
    return std::nullopt;
  }
}

}  // namespace erpy::worker
