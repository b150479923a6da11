// The canonical ETF encoder: the bytes Erlang's term_to_binary(T, [{minor_version, 2}])
// makes (UTF-8 atoms, NEW_FLOAT_EXT, the smallest integer tag, STRING_EXT for byte lists).
//
// Every function writes into a Sink, so the same code first measures a term (SizeSink)
// and then writes it into a buffer of exactly that size (SpanSink): a frame is allocated
// once. GrowSink appends to a vector for callers that prefer a single pass.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <span>
#include <string_view>
#include <vector>

#include "error.hpp"
#include "reader.hpp"
#include "tags.hpp"
#include "text.hpp"

namespace etf {

struct SizeSink {
  std::size_t size = 0;
  void byte(std::uint8_t) noexcept { ++size; }
  void write(const void*, std::size_t n) noexcept { size += n; }
};

// Writes into a fixed buffer; running past its end is a bug in the caller's size pass,
// reported as an EncodeError rather than a buffer overflow.
struct SpanSink {
  std::uint8_t* p;
  std::uint8_t* end;
  void byte(std::uint8_t b) {
    if (p == end) overflow();
    *p++ = b;
  }
  void write(const void* src, std::size_t n) {
    if (static_cast<std::size_t>(end - p) < n) overflow();
    if (n) std::memcpy(p, src, n);
    p += n;
  }
  [[noreturn]] static void overflow() {
    throw EncodeError("term changed between the size pass and the write pass");
  }
};

struct GrowSink {
  std::vector<std::uint8_t>& out;
  void byte(std::uint8_t b) { out.push_back(b); }
  void write(const void* src, std::size_t n) {
    const auto* s = static_cast<const std::uint8_t*>(src);
    out.insert(out.end(), s, s + n);
  }
};

template <class S> void put_u16(S& s, std::uint16_t v) {
  const std::uint8_t b[2] = {static_cast<std::uint8_t>(v >> 8), static_cast<std::uint8_t>(v)};
  s.write(b, 2);
}
template <class S> void put_u32(S& s, std::uint32_t v) {
  const std::uint8_t b[4] = {static_cast<std::uint8_t>(v >> 24), static_cast<std::uint8_t>(v >> 16),
                             static_cast<std::uint8_t>(v >> 8), static_cast<std::uint8_t>(v)};
  s.write(b, 4);
}
template <class S> void put_u64(S& s, std::uint64_t v) {
  put_u32(s, static_cast<std::uint32_t>(v >> 32));
  put_u32(s, static_cast<std::uint32_t>(v));
}

template <class S> void put_version(S& s) { s.byte(kVersion); }

template <class S> void put_integer(S& s, std::int64_t v) {
  if (v >= 0 && v <= 255) {
    s.byte(kSmallInteger);
    s.byte(static_cast<std::uint8_t>(v));
  } else if (v >= INT32_MIN && v <= INT32_MAX) {
    s.byte(kInteger);
    put_u32(s, static_cast<std::uint32_t>(static_cast<std::int32_t>(v)));
  } else {
    std::uint64_t mag = v < 0 ? 0 - static_cast<std::uint64_t>(v) : static_cast<std::uint64_t>(v);
    std::uint8_t digits[8];
    std::uint8_t n = 0;
    while (mag) {
      digits[n++] = static_cast<std::uint8_t>(mag);
      mag >>= 8;
    }
    s.byte(kSmallBig);
    s.byte(n);
    s.byte(v < 0 ? 1 : 0);
    s.write(digits, n);
  }
}

// An integer given as sign and little-endian magnitude (high zero bytes allowed).
template <class S> void put_big_integer(S& s, bool negative, Bytes magnitude) {
  while (!magnitude.empty() && magnitude.back() == 0) magnitude = magnitude.first(magnitude.size() - 1);
  if (magnitude.size() <= 4) {
    std::int64_t v = 0;
    for (std::size_t i = magnitude.size(); i-- > 0;) v = (v << 8) | magnitude[i];
    put_integer(s, negative ? -v : v);
    return;
  }
  if (magnitude.size() <= 255) {
    s.byte(kSmallBig);
    s.byte(static_cast<std::uint8_t>(magnitude.size()));
  } else {
    if (magnitude.size() > UINT32_MAX) throw EncodeError("integer too large for the external term format");
    s.byte(kLargeBig);
    put_u32(s, static_cast<std::uint32_t>(magnitude.size()));
  }
  s.byte(negative ? 1 : 0);
  s.write(magnitude.data(), magnitude.size());
}

template <class S> void put_float(S& s, double d) {
  if (!std::isfinite(d)) throw EncodeError("Erlang has no NaN or infinity: cannot encode " + std::to_string(d));
  std::uint64_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  s.byte(kNewFloat);
  put_u64(s, bits);
}

// `utf8` must be valid UTF-8 of at most 255 characters; check_atom() verifies it for
// callers that do not know.
inline void check_atom(std::string_view utf8) {
  const auto chars = utf8_length({reinterpret_cast<const std::uint8_t*>(utf8.data()), utf8.size()});
  if (!chars) throw EncodeError("atom is not valid UTF-8");
  if (*chars > kMaxAtomChars) {
    throw EncodeError("atom of " + std::to_string(*chars) + " characters: Erlang allows 255");
  }
}

template <class S> void put_atom(S& s, std::string_view utf8) {
  if (utf8.size() <= 255) {
    s.byte(kSmallAtomUtf8);
    s.byte(static_cast<std::uint8_t>(utf8.size()));
  } else {
    s.byte(kAtomUtf8);
    put_u16(s, static_cast<std::uint16_t>(utf8.size()));
  }
  s.write(utf8.data(), utf8.size());
}

template <class S> void put_binary_header(S& s, std::size_t n) {
  if (n > UINT32_MAX) throw EncodeError("binary of " + std::to_string(n) + " bytes: the limit is 4 GiB");
  s.byte(kBinary);
  put_u32(s, static_cast<std::uint32_t>(n));
}

template <class S> void put_binary(S& s, Bytes data) {
  put_binary_header(s, data.size());
  s.write(data.data(), data.size());
}

// A bitstring of data.size() bytes whose last byte holds `bits` (1..8) used bits; 8 is a
// binary. Unused low bits are written as zero, as Erlang does.
template <class S> void put_bitstring(S& s, Bytes data, unsigned bits) {
  if (bits < 1 || bits > 8) throw EncodeError("bits in the last byte must be 1..8");
  if (bits == 8 || data.empty()) {
    put_binary(s, data);
    return;
  }
  if (data.size() > UINT32_MAX) throw EncodeError("bitstring too large");
  s.byte(kBitBinary);
  put_u32(s, static_cast<std::uint32_t>(data.size()));
  s.byte(static_cast<std::uint8_t>(bits));
  s.write(data.data(), data.size() - 1);
  s.byte(static_cast<std::uint8_t>(data.back() & (0xFF << (8 - bits))));
}

template <class S> void put_tuple_header(S& s, std::size_t n) {
  if (n <= 255) {
    s.byte(kSmallTuple);
    s.byte(static_cast<std::uint8_t>(n));
  } else {
    if (n > UINT32_MAX) throw EncodeError("tuple too large");
    s.byte(kLargeTuple);
    put_u32(s, static_cast<std::uint32_t>(n));
  }
}

template <class S> void put_nil(S& s) { s.byte(kNil); }

// Header of a list of n >= 1 elements; the elements and then the tail follow.
template <class S> void put_list_header(S& s, std::size_t n) {
  if (n > UINT32_MAX) throw EncodeError("list too large");
  s.byte(kList);
  put_u32(s, static_cast<std::uint32_t>(n));
}

// A proper list of 1..65535 integers 0..255 (Erlang's STRING_EXT).
template <class S> void put_byte_list(S& s, Bytes data) {
  s.byte(kString);
  put_u16(s, static_cast<std::uint16_t>(data.size()));
  s.write(data.data(), data.size());
}

template <class S> void put_map_header(S& s, std::size_t n) {
  if (n > UINT32_MAX) throw EncodeError("map too large");
  s.byte(kMap);
  put_u32(s, static_cast<std::uint32_t>(n));
}

template <class S>
void put_pid(S& s, std::string_view node, std::uint32_t id, std::uint32_t serial, std::uint32_t creation) {
  s.byte(kNewPid);
  put_atom(s, node);
  put_u32(s, id);
  put_u32(s, serial);
  put_u32(s, creation);
}

template <class S>
void put_port(S& s, std::string_view node, std::uint64_t id, std::uint32_t creation) {
  if (id > UINT32_MAX) {
    s.byte(kV4Port);
    put_atom(s, node);
    put_u64(s, id);
  } else {
    s.byte(kNewPort);
    put_atom(s, node);
    put_u32(s, static_cast<std::uint32_t>(id));
  }
  put_u32(s, creation);
}

template <class S>
void put_reference(S& s, std::string_view node, std::uint32_t creation, std::span<const std::uint32_t> ids) {
  if (ids.empty() || ids.size() > 5) throw EncodeError("a reference has 1..5 id words");
  s.byte(kNewerReference);
  put_u16(s, static_cast<std::uint16_t>(ids.size()));
  put_atom(s, node);
  put_u32(s, creation);
  for (std::uint32_t id : ids) put_u32(s, id);
}

// Bytes that already are an encoded term (an opaque fun), written as they are.
template <class S> void put_raw(S& s, Bytes encoded) { s.write(encoded.data(), encoded.size()); }

// Measures with `emit(SizeSink&)`, then writes with `emit(SpanSink&)` into a vector of
// exactly that size, after `reserve_front` spare bytes (for a frame's length prefix).
template <class Emit>
std::vector<std::uint8_t> encode_exact(Emit&& emit, std::size_t reserve_front = 0) {
  SizeSink size;
  emit(size);
  std::vector<std::uint8_t> out(reserve_front + size.size);
  SpanSink sink{out.data() + reserve_front, out.data() + out.size()};
  emit(sink);
  if (sink.p != sink.end) SpanSink::overflow();
  return out;
}

}  // namespace etf
