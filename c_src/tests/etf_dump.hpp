// A Builder that renders a term in the dump notation that test/golden/gen_golden.escript
// also writes, so the C++ decoder is checked against Erlang's own view of each term.
#pragma once
#include <algorithm>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "etf/decode.hpp"

namespace etf_test {

inline std::string hex(etf::Bytes b) {
  static const char* d = "0123456789abcdef";
  std::string s;
  s.reserve(b.size() * 2);
  for (std::uint8_t c : b) {
    s.push_back(d[c >> 4]);
    s.push_back(d[c & 15]);
  }
  return s;
}

inline std::string hex(std::string_view s) {
  return hex(etf::Bytes(reinterpret_cast<const std::uint8_t*>(s.data()), s.size()));
}

// GCC 12 warns (-Wrestrict, falsely) on "literal" + std::string; this says the same.
inline std::string cat(const char* prefix, const std::string& rest) {
  std::string s(prefix);
  s += rest;
  return s;
}

inline std::string hex_magnitude(etf::Bytes le) {
  // little-endian bytes -> lowercase hex without leading zeros
  std::string s;
  static const char* d = "0123456789abcdef";
  for (std::size_t i = le.size(); i-- > 0;) {
    s.push_back(d[le[i] >> 4]);
    s.push_back(d[le[i] & 15]);
  }
  const auto nz = s.find_first_not_of('0');
  return nz == std::string::npos ? "0" : s.substr(nz);
}

struct DumpBuilder {
  using Value = std::string;
  struct Seq {
    std::vector<std::string> items;
  };

  Value integer(std::int64_t v) {
    const std::uint64_t mag = v < 0 ? 0 - static_cast<std::uint64_t>(v) : static_cast<std::uint64_t>(v);
    char buf[32];
    std::snprintf(buf, sizeof buf, "%llx", static_cast<unsigned long long>(mag));
    return std::string(v < 0 ? "i-" : "i+") + buf;
  }
  Value big_integer(bool negative, etf::Bytes mag) {
    return std::string(negative ? "i-" : "i+") + hex_magnitude(mag);
  }
  Value floating(double d) {
    std::uint64_t bits;
    std::memcpy(&bits, &d, 8);
    char buf[32];
    std::snprintf(buf, sizeof buf, "f%016llx", static_cast<unsigned long long>(bits));
    return buf;
  }
  Value atom(std::string_view utf8) { return cat("a", hex(utf8)); }
  Value binary(etf::Bytes b) { return cat("b", hex(b)); }
  Value bitstring(etf::Bytes b, unsigned bits) {
    std::vector<std::uint8_t> copy(b.begin(), b.end());
    copy.back() &= static_cast<std::uint8_t>(0xFF << (8 - bits));
    return cat("B", std::to_string(bits)) + ":" + hex(etf::Bytes(copy));
  }
  Value byte_list(etf::Bytes b) {
    std::string s = "[";
    for (std::size_t i = 0; i < b.size(); ++i) {
      if (i) s += ",";
      s += integer(b[i]);
    }
    return s + "]";
  }
  Value nil() { return "[]"; }
  Value pid(std::string_view node, std::uint32_t id, std::uint32_t serial, std::uint32_t creation) {
    return cat("P(", atom(node)) + "," + std::to_string(id) + "," + std::to_string(serial) + "," +
           std::to_string(creation) + ")";
  }
  Value port(std::string_view node, std::uint64_t id, std::uint32_t creation) {
    return cat("O(", atom(node)) + "," + std::to_string(id) + "," + std::to_string(creation) + ")";
  }
  Value reference(std::string_view node, std::uint32_t creation, std::span<const std::uint32_t> ids) {
    std::string s = cat("R(", atom(node)) + "," + std::to_string(creation) + ",";
    for (std::size_t i = 0; i < ids.size(); ++i) {
      if (i) s += ".";
      s += std::to_string(ids[i]);
    }
    return s + ")";
  }
  Value fun(etf::Bytes encoded) { return cat("F", hex(encoded)); }

  Seq tuple_begin(std::size_t n) { return Seq{std::vector<std::string>(n)}; }
  void tuple_set(Seq& t, std::size_t i, Value&& v) { t.items[i] = std::move(v); }
  Value tuple_end(Seq& t) { return cat("{", join(t.items)) + "}"; }
  Seq list_begin(std::size_t n) { return Seq{std::vector<std::string>(n)}; }
  void list_set(Seq& l, std::size_t i, Value&& v) { l.items[i] = std::move(v); }
  Value list_end(Seq& l) { return cat("[", join(l.items)) + "]"; }
  Value improper_list_end(Seq& l, Value&& tail) {
    if (l.items.empty()) return std::move(tail);
    if (tail.size() >= 2 && tail.front() == '[' && tail.back() == ']') {
      // [a|[b|c]] is [a,b|c]: Erlang sees one list.
      const std::string inner = tail.substr(1, tail.size() - 2);
      return cat("[", join(l.items)) + (inner.empty() ? "" : cat(",", inner)) + "]";
    }
    return cat("[", join(l.items)) + "|" + tail + "]";
  }
  Seq map_begin(std::size_t) { return Seq{}; }
  void map_set(Seq& m, Value&& k, Value&& v, std::size_t) {
    m.items.push_back(std::move(k));
    m.items.push_back(std::move(v));
  }
  Value map_end(Seq& m) {
    std::vector<std::pair<std::string, std::string>> kv;
    for (std::size_t i = 0; i < m.items.size(); i += 2) kv.emplace_back(m.items[i], m.items[i + 1]);
    std::sort(kv.begin(), kv.end());
    std::string s = "#{";
    for (std::size_t i = 0; i < kv.size(); ++i) {
      if (i) s += ",";
      s += kv[i].first + "=>" + kv[i].second;
    }
    return s + "}";
  }

  static std::string join(const std::vector<std::string>& v) {
    std::string s;
    for (std::size_t i = 0; i < v.size(); ++i) {
      if (i) s += ",";
      s += v[i];
    }
    return s;
  }
};

inline std::string dump(etf::Bytes input, const etf::DecodeOptions& o = {}) {
  DumpBuilder b;
  return etf::decode(input, b, o);
}

}  // namespace etf_test
