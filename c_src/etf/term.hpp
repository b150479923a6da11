// An owned term tree, for C++ code that needs to hold a term (protocol control messages,
// tests). Python and Erlang data never go through it: they convert straight from bytes.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <variant>
#include <vector>

#include "decode.hpp"
#include "encode.hpp"

namespace etf {

struct Term;

struct Atom { std::string name; bool operator==(const Atom&) const = default; };
struct BigInt {
  bool negative = false;
  std::vector<std::uint8_t> magnitude;  // little-endian, no high zero byte
  bool operator==(const BigInt&) const = default;
};
struct Binary {
  std::vector<std::uint8_t> data;
  unsigned bits = 8;  // used bits in the last byte; 8 for a binary
  bool operator==(const Binary&) const = default;
};
struct List {
  std::vector<Term> items;
  std::shared_ptr<const Term> tail;  // null for a proper list
  bool operator==(const List&) const;
};
struct Tuple { std::vector<Term> items; bool operator==(const Tuple&) const; };
// Keys and values alternate (k1, v1, k2, v2, ...), in encoding order.
struct Map { std::vector<Term> kv; bool operator==(const Map&) const; };
struct Pid {
  std::string node;
  std::uint32_t id = 0, serial = 0, creation = 0;
  bool operator==(const Pid&) const = default;
};
struct Port {
  std::string node;
  std::uint64_t id = 0;
  std::uint32_t creation = 0;
  bool operator==(const Port&) const = default;
};
struct Ref {
  std::string node;
  std::uint32_t creation = 0;
  std::vector<std::uint32_t> ids;
  bool operator==(const Ref&) const = default;
};
struct Fun { std::vector<std::uint8_t> encoded; bool operator==(const Fun&) const = default; };

struct Term {
  std::variant<std::int64_t, BigInt, double, Atom, Binary, List, Tuple, Map, Pid, Port, Ref, Fun> v;
  bool operator==(const Term& o) const { return v == o.v; }
};

inline bool List::operator==(const List& o) const {
  if (items != o.items) return false;
  if (!tail || !o.tail) return !tail && !o.tail;
  return *tail == *o.tail;
}
inline bool Tuple::operator==(const Tuple& o) const { return items == o.items; }
inline bool Map::operator==(const Map& o) const { return kv == o.kv; }

inline Term atom(std::string name) { return Term{Atom{std::move(name)}}; }
inline Term integer(std::int64_t v) { return Term{v}; }
inline Term tuple(std::vector<Term> items) { return Term{Tuple{std::move(items)}}; }
inline Term list(std::vector<Term> items) { return Term{List{std::move(items), nullptr}}; }
inline Term binary(std::string_view s) {
  return Term{Binary{std::vector<std::uint8_t>(s.begin(), s.end()), 8}};
}

struct TermBuilder {
  using Value = Term;
  Value integer(std::int64_t v) { return Term{v}; }
  Value big_integer(bool neg, Bytes mag) { return Term{BigInt{neg, {mag.begin(), mag.end()}}}; }
  Value floating(double d) { return Term{d}; }
  Value atom(std::string_view s) { return Term{Atom{std::string(s)}}; }
  Value binary(Bytes b) { return Term{Binary{{b.begin(), b.end()}, 8}}; }
  Value bitstring(Bytes b, unsigned bits) {
    Binary out{{b.begin(), b.end()}, bits};
    out.data.back() &= static_cast<std::uint8_t>(0xFF << (8 - bits));
    return Term{std::move(out)};
  }
  Value byte_list(Bytes b) {
    List l;
    l.items.reserve(b.size());
    for (std::uint8_t c : b) l.items.push_back(Term{std::int64_t{c}});
    return Term{std::move(l)};
  }
  Value nil() { return Term{List{}}; }
  Value pid(std::string_view node, std::uint32_t id, std::uint32_t serial, std::uint32_t creation) {
    return Term{Pid{std::string(node), id, serial, creation}};
  }
  Value port(std::string_view node, std::uint64_t id, std::uint32_t creation) {
    return Term{Port{std::string(node), id, creation}};
  }
  Value reference(std::string_view node, std::uint32_t creation, std::span<const std::uint32_t> ids) {
    return Term{Ref{std::string(node), creation, {ids.begin(), ids.end()}}};
  }
  Value fun(Bytes b) { return Term{Fun{{b.begin(), b.end()}}}; }
  std::vector<Term> tuple_begin(std::size_t n) { return std::vector<Term>(n); }
  void tuple_set(std::vector<Term>& t, std::size_t i, Value&& v) { t[i] = std::move(v); }
  Value tuple_end(std::vector<Term>& t) { return Term{Tuple{std::move(t)}}; }
  std::vector<Term> list_begin(std::size_t n) { return std::vector<Term>(n); }
  void list_set(std::vector<Term>& l, std::size_t i, Value&& v) { l[i] = std::move(v); }
  Value list_end(std::vector<Term>& l) { return Term{List{std::move(l), nullptr}}; }
  Value improper_list_end(std::vector<Term>& l, Value&& tail) {
    if (auto* inner = std::get_if<List>(&tail.v)) {
      // [a|[b|c]] is [a,b|c]: Erlang sees one list, so do we.
      l.insert(l.end(), inner->items.begin(), inner->items.end());
      return Term{List{std::move(l), inner->tail}};
    }
    if (l.empty()) return std::move(tail);
    return Term{List{std::move(l), std::make_shared<const Term>(std::move(tail))}};
  }
  std::vector<Term> map_begin(std::size_t n) {
    std::vector<Term> m;
    m.reserve(2 * n);
    return m;
  }
  void map_set(std::vector<Term>& m, Value&& k, Value&& v, std::size_t) {
    m.push_back(std::move(k));
    m.push_back(std::move(v));
  }
  Value map_end(std::vector<Term>& m) { return Term{Map{std::move(m)}}; }
};

inline Term decode_to_term(Bytes input, const DecodeOptions& o = {}) {
  TermBuilder b;
  return decode(input, b, o);
}

namespace detail {
inline bool is_byte_list(const List& l) {
  if (l.tail || l.items.empty() || l.items.size() > kMaxStringExt) return false;
  for (const Term& t : l.items) {
    const auto* i = std::get_if<std::int64_t>(&t.v);
    if (!i || *i < 0 || *i > 255) return false;
  }
  return true;
}
}  // namespace detail

template <class S> void put_term(S& s, const Term& t) {
  struct Visit {
    S& s;
    void operator()(std::int64_t v) { put_integer(s, v); }
    void operator()(const BigInt& b) { put_big_integer(s, b.negative, b.magnitude); }
    void operator()(double d) { put_float(s, d); }
    void operator()(const Atom& a) { put_atom(s, a.name); }
    void operator()(const Binary& b) { put_bitstring(s, b.data, b.bits); }
    void operator()(const List& l) {
      if (l.items.empty() && !l.tail) return put_nil(s);
      if (detail::is_byte_list(l)) {
        std::vector<std::uint8_t> bytes;
        for (const Term& t : l.items) bytes.push_back(static_cast<std::uint8_t>(std::get<std::int64_t>(t.v)));
        return put_byte_list(s, bytes);
      }
      put_list_header(s, l.items.size());
      for (const Term& t : l.items) put_term(s, t);
      if (l.tail) put_term(s, *l.tail); else put_nil(s);
    }
    void operator()(const Tuple& t) {
      put_tuple_header(s, t.items.size());
      for (const Term& i : t.items) put_term(s, i);
    }
    void operator()(const Map& m) {
      put_map_header(s, m.kv.size() / 2);
      for (const Term& t : m.kv) put_term(s, t);
    }
    void operator()(const Pid& p) { put_pid(s, p.node, p.id, p.serial, p.creation); }
    void operator()(const Port& p) { put_port(s, p.node, p.id, p.creation); }
    void operator()(const Ref& r) { put_reference(s, r.node, r.creation, r.ids); }
    void operator()(const Fun& f) { put_raw(s, f.encoded); }
  };
  std::visit(Visit{s}, t.v);
}

// The external form of `t`: version byte then the canonical encoding.
inline std::vector<std::uint8_t> encode(const Term& t) {
  return encode_exact([&](auto& s) {
    put_version(s);
    put_term(s, t);
  });
}

}  // namespace etf
