// The ETF decoder: one pass over a byte span, driving a Builder that makes the values
// (Python objects, a test dump, nothing at all for validation). No intermediate tree.
//
// A Builder has a `Value` type and these members (containers are filled in place, so a
// builder that makes Python objects allocates each one once, at its final size):
//
//   Value integer(std::int64_t)
//   Value big_integer(bool negative, Bytes magnitude)   // little-endian, no high zero byte,
//                                                       // only for values outside int64
//   Value floating(double)                              // always finite
//   Value atom(std::string_view utf8)                   // valid UTF-8, <= 255 characters
//   Value binary(Bytes)
//   Value bitstring(Bytes, unsigned bits_in_last)       // 1..7; unused low bits may be set:
//                                                       // the builder masks them
//   Value byte_list(Bytes)                              // STRING_EXT: a list of small ints
//   Value nil()
//   Value pid(std::string_view node, std::uint32_t id, std::uint32_t serial,
//             std::uint32_t creation)
//   Value port(std::string_view node, std::uint64_t id, std::uint32_t creation)
//   Value reference(std::string_view node, std::uint32_t creation,
//                   std::span<const std::uint32_t> ids)
//   Value fun(Bytes encoded)                            // the whole term, from its tag on,
//                                                       // in canonical form
//   T tuple_begin(std::size_t n);  void tuple_set(T&, std::size_t i, Value&&);
//   Value tuple_end(T&)
//   L list_begin(std::size_t n);   void list_set(L&, std::size_t i, Value&&);
//   Value list_end(L&)                                  // tail was []
//   Value improper_list_end(L&, Value&& tail)           // tail was anything else
//   M map_begin(std::size_t n);
//   void map_set(M&, Value&& key, Value&& value, std::size_t key_offset)
//   Value map_end(M&)
//
// Builders may throw; the decoder adds nothing to the stack but its own frames, so an
// exception leaves cleanly through the RAII values of the builder.
//
// A builder may also offer these, for the keys and values of maps (slot 2i is the key of
// pair i, 2i + 1 its value), to skip decoding a term it has seen before:
//
//   bool map_reuses(const M&)                                   // false: the others are not
//                                                               // called for this map
//   bool map_reuse(M&, std::size_t slot, Reader&, Value& out)   // true: out is the value of
//                                                               // the term at the reader,
//                                                               // which it moved past
//   void map_remember(M&, std::size_t slot, Bytes raw, const Value&)  // raw: one whole term
//                                                                     // just decoded
#pragma once
#include <array>
#include <charconv>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "encode.hpp"
#include "inflate.hpp"
#include "reader.hpp"
#include "stack.hpp"
#include "tags.hpp"
#include "text.hpp"

namespace etf {

struct DecodeOptions {
  // Nesting deeper than this is refused, and so is nesting deeper than the stack of the
  // decoding thread holds (stack.hpp), whatever max_depth says.
  std::size_t max_depth = 2000;
  // Upper bound for the inflated size of a compressed term.
  std::size_t max_inflated = std::size_t{1} << 30;
  // The atom cache of a distribution message, for ATOM_CACHE_REF; empty elsewhere.
  std::span<const std::string> atom_cache{};
};

namespace detail {

// Holds an atom's text: a view into the input when it is already UTF-8, else a converted
// copy. Lives in the frame of one non-recursive function, never in the recursion.
struct AtomText {
  std::array<char, 2 * 255> buf;
  std::string_view text;
};

inline void read_atom_text(Reader& r, std::uint8_t tag, AtomText& out,
                           std::span<const std::string> atom_cache) {
  const std::size_t start = r.pos() - 1;
  std::size_t len;
  bool latin1;
  switch (tag) {
    case kAtom: len = r.u16("atom length"); latin1 = true; break;
    case kSmallAtom: len = r.u8("atom length"); latin1 = true; break;
    case kAtomUtf8: len = r.u16("atom length"); latin1 = false; break;
    case kSmallAtomUtf8: len = r.u8("atom length"); latin1 = false; break;
    case kAtomCacheRef: {
      const std::uint8_t index = r.u8("atom cache index");
      if (index >= atom_cache.size()) {
        r.fail_at(start, "ATOM_CACHE_REF " + std::to_string(index) +
                             " outside a distribution message's atom cache");
      }
      out.text = atom_cache[index];
      return;
    }
    default:
      r.fail_at(start, "expected an atom, got tag " + std::to_string(tag));
  }
  Bytes raw = r.take(len, "atom text");
  if (latin1) {
    if (len > kMaxAtomChars) r.fail_at(start, "atom longer than 255 characters");
    bool ascii = true;
    for (std::uint8_t c : raw) ascii &= c < 0x80;
    if (ascii) {
      out.text = as_chars(raw);
    } else {
      out.text = {out.buf.data(), latin1_to_utf8(raw, out.buf.data())};
    }
    return;
  }
  const auto chars = utf8_length(raw);
  if (!chars) r.fail_at(start, "atom is not valid UTF-8");
  if (*chars > kMaxAtomChars) r.fail_at(start, "atom longer than 255 characters");
  out.text = as_chars(raw);
}

inline std::uint32_t read_small_or_int(Reader& r, const char* what) {
  const std::uint8_t tag = r.u8(what);
  if (tag == kSmallInteger) return r.u8(what);
  if (tag == kInteger) return r.u32(what);
  r.fail_at(r.pos() - 1, std::string("expected an integer for ") + what);
}

}  // namespace detail

// A builder that builds nothing: decoding with it validates a term.
struct NullBuilder {
  struct Value {};
  Value integer(std::int64_t) { return {}; }
  Value big_integer(bool, Bytes) { return {}; }
  Value floating(double) { return {}; }
  Value atom(std::string_view) { return {}; }
  Value binary(Bytes) { return {}; }
  Value bitstring(Bytes, unsigned) { return {}; }
  Value byte_list(Bytes) { return {}; }
  Value nil() { return {}; }
  Value pid(std::string_view, std::uint32_t, std::uint32_t, std::uint32_t) { return {}; }
  Value port(std::string_view, std::uint64_t, std::uint32_t) { return {}; }
  Value reference(std::string_view, std::uint32_t, std::span<const std::uint32_t>) { return {}; }
  Value fun(Bytes) { return {}; }
  Value tuple_begin(std::size_t) { return {}; }
  void tuple_set(Value&, std::size_t, Value&&) {}
  Value tuple_end(Value&) { return {}; }
  Value list_begin(std::size_t) { return {}; }
  void list_set(Value&, std::size_t, Value&&) {}
  Value list_end(Value&) { return {}; }
  Value improper_list_end(Value&, Value&&) { return {}; }
  Value map_begin(std::size_t) { return {}; }
  void map_set(Value&, Value&&, Value&&, std::size_t) {}
  Value map_end(Value&) { return {}; }
};

// A builder that writes each part canonically into a sink as it is decoded (containers
// are written in decoding order, so nothing is held). Funs are opaque, but their bytes
// must not depend on how they were encoded (Latin-1 atoms, old pids), so their parts go
// through this.
template <class Sink>
struct CopyBuilder {
  Sink& s;
  struct Value {};
  Value integer(std::int64_t v) { put_integer(s, v); return {}; }
  Value big_integer(bool neg, Bytes mag) { put_big_integer(s, neg, mag); return {}; }
  Value floating(double d) { put_float(s, d); return {}; }
  Value atom(std::string_view a) { put_atom(s, a); return {}; }
  Value binary(Bytes b) { put_binary(s, b); return {}; }
  Value bitstring(Bytes b, unsigned bits) { put_bitstring(s, b, bits); return {}; }
  Value byte_list(Bytes b) {
    if (b.empty()) put_nil(s); else put_byte_list(s, b);
    return {};
  }
  Value nil() { put_nil(s); return {}; }
  Value pid(std::string_view node, std::uint32_t id, std::uint32_t serial, std::uint32_t creation) {
    put_pid(s, node, id, serial, creation);
    return {};
  }
  Value port(std::string_view node, std::uint64_t id, std::uint32_t creation) {
    put_port(s, node, id, creation);
    return {};
  }
  Value reference(std::string_view node, std::uint32_t creation, std::span<const std::uint32_t> ids) {
    put_reference(s, node, creation, ids);
    return {};
  }
  Value fun(Bytes b) { put_raw(s, b); return {}; }
  Value tuple_begin(std::size_t n) { put_tuple_header(s, n); return {}; }
  void tuple_set(Value&, std::size_t, Value&&) {}
  Value tuple_end(Value&) { return {}; }
  Value list_begin(std::size_t n) { put_list_header(s, n); return {}; }
  void list_set(Value&, std::size_t, Value&&) {}
  Value list_end(Value&) { put_nil(s); return {}; }
  Value improper_list_end(Value&, Value&&) { return {}; }
  Value map_begin(std::size_t n) { put_map_header(s, n); return {}; }
  void map_set(Value&, Value&&, Value&&, std::size_t) {}
  Value map_end(Value&) { return {}; }
};

// The builder's optional map hooks (see the top of this file).
template <class B, class M>
concept ReusesMapTerms = requires(B& b, M& m, Reader& r, typename B::Value& v, Bytes raw) {
  { b.map_reuses(m) } -> std::same_as<bool>;
  { b.map_reuse(m, std::size_t{}, r, v) } -> std::same_as<bool>;
  b.map_remember(m, std::size_t{}, raw, v);
};

template <class Builder>
class Decoder {
 public:
  using Value = typename Builder::Value;

  Decoder(Reader& r, Builder& b, const DecodeOptions& o) : r_(r), b_(b), o_(o) {}

  // Decodes one term at the reader's position (no version byte).
  Value term(std::size_t depth = 0) {
    if (depth > o_.max_depth || stack_.reached()) [[unlikely]] too_deep(depth);
    const std::uint8_t tag = r_.u8();
    switch (tag) {
      case kSmallInteger: return b_.integer(r_.u8("integer"));
      case kInteger: return b_.integer(static_cast<std::int32_t>(r_.u32("integer")));
      case kNewFloat: return new_float();
      case kFloat: return old_float();
      case kAtom: case kSmallAtom: case kAtomUtf8: case kSmallAtomUtf8: case kAtomCacheRef:
        return atom(tag);
      case kSmallTuple: return tuple(r_.u8("tuple arity"), depth);
      case kLargeTuple: return tuple(r_.u32("tuple arity"), depth);
      case kNil: return b_.nil();
      case kString: return b_.byte_list(r_.take(r_.u16("string length"), "string"));
      case kList: return list(depth);
      case kBinary: return b_.binary(r_.take(r_.u32("binary length"), "binary"));
      case kBitBinary: return bit_binary();
      case kSmallBig: return big(r_.u8("bignum length"));
      case kLargeBig: return big(r_.u32("bignum length"));
      case kMap: return map(depth);
      case kPid: case kNewPid: return pid(tag);
      case kPort: case kNewPort: case kV4Port: return port(tag);
      case kReference: case kNewReference: case kNewerReference: return reference(tag);
      case kNewFun: return new_fun(depth);
      case kFun: return old_fun(depth);
      case kExport: return export_fun(depth);
      case kCompressed:
        r_.fail_at(r_.pos() - 1, "a compressed term (tag 80) may only follow the version byte");
      case kLocal:
        r_.fail_at(r_.pos() - 1, "LOCAL_EXT (tag 121) can only be decoded by the node that made it");
      case kDistHeader: case kDistFragHeader:
        r_.fail_at(r_.pos() - 1, "a distribution header is not a term");
      default:
        r_.fail_at(r_.pos() - 1, "unknown tag " + std::to_string(tag));
    }
  }

 private:
  [[noreturn, gnu::noinline, gnu::cold]] void too_deep(std::size_t depth) {
    if (depth > o_.max_depth) r_.fail("terms nested deeper than " + std::to_string(o_.max_depth) + " levels");
    r_.fail("terms nested too deeply for this thread's stack (" + std::to_string(depth) + " levels)");
  }

  // Scalars live in functions of their own so their locals stay out of the recursion.
  [[gnu::noinline]] Value new_float() {
    const std::uint64_t bits = r_.u64("float");
    double d;
    std::memcpy(&d, &bits, sizeof d);
    if (!std::isfinite(d)) r_.fail_at(r_.pos() - 9, "float is NaN or infinite");
    return b_.floating(d);
  }

  [[gnu::noinline]] Value old_float() {
    const std::size_t start = r_.pos() - 1;
    Bytes text = r_.take(31, "float");
    std::size_t len = 0;
    while (len < text.size() && text[len] != 0) ++len;
    const char* first = reinterpret_cast<const char*>(text.data());
    while (len > 0 && first[0] == ' ') { ++first; --len; }
    double d = 0;
    auto [end, ec] = std::from_chars(first, first + len, d);
    if (ec != std::errc() || end != first + len || !std::isfinite(d)) {
      r_.fail_at(start, "FLOAT_EXT text is not a finite float");
    }
    return b_.floating(d);
  }

  [[gnu::noinline]] Value atom(std::uint8_t tag) {
    detail::AtomText a;
    detail::read_atom_text(r_, tag, a, o_.atom_cache);
    return b_.atom(a.text);
  }

  [[gnu::noinline]] Value big(std::uint32_t n) {
    const std::uint8_t sign = r_.u8("bignum sign");
    if (sign > 1) r_.fail_at(r_.pos() - 1, "bignum sign byte is " + std::to_string(sign));
    Bytes digits = r_.take(n, "bignum");
    while (!digits.empty() && digits.back() == 0) digits = digits.first(digits.size() - 1);
    if (digits.size() <= 8) {
      std::uint64_t v = 0;
      for (std::size_t i = digits.size(); i-- > 0;) v = (v << 8) | digits[i];
      if (!sign && v <= static_cast<std::uint64_t>(INT64_MAX)) {
        return b_.integer(static_cast<std::int64_t>(v));
      }
      if (sign && v <= static_cast<std::uint64_t>(INT64_MAX) + 1) {
        return b_.integer(static_cast<std::int64_t>(0 - v));
      }
    }
    return b_.big_integer(sign == 1, digits);
  }

  [[gnu::noinline]] Value bit_binary() {
    const std::size_t start = r_.pos() - 1;
    const std::uint32_t len = r_.u32("bitstring length");
    const std::uint8_t bits = r_.u8("bitstring bits");
    Bytes data = r_.take(len, "bitstring");
    if (bits < 1 || bits > 8) {
      r_.fail_at(start, "bitstring has " + std::to_string(bits) + " bits in its last byte (1..8)");
    }
    if (bits == 8 || len == 0) return b_.binary(data);
    return b_.bitstring(data, bits);
  }

  [[gnu::noinline]] Value pid(std::uint8_t tag) {
    detail::AtomText node;
    detail::read_atom_text(r_, r_.u8("pid node"), node, o_.atom_cache);
    const std::uint32_t id = r_.u32("pid id");
    const std::uint32_t serial = r_.u32("pid serial");
    const std::uint32_t creation = tag == kPid ? r_.u8("pid creation") : r_.u32("pid creation");
    return b_.pid(node.text, id, serial, creation);
  }

  [[gnu::noinline]] Value port(std::uint8_t tag) {
    detail::AtomText node;
    detail::read_atom_text(r_, r_.u8("port node"), node, o_.atom_cache);
    const std::uint64_t id = tag == kV4Port ? r_.u64("port id") : r_.u32("port id");
    const std::uint32_t creation = tag == kPort ? r_.u8("port creation") : r_.u32("port creation");
    return b_.port(node.text, id, creation);
  }

  [[gnu::noinline]] Value reference(std::uint8_t tag) {
    const std::size_t start = r_.pos() - 1;
    std::size_t count = 1;
    if (tag != kReference) count = r_.u16("reference length");
    if (count < 1 || count > 5) {
      r_.fail_at(start, "reference with " + std::to_string(count) + " id words (1..5)");
    }
    detail::AtomText node;
    detail::read_atom_text(r_, r_.u8("reference node"), node, o_.atom_cache);
    std::array<std::uint32_t, 5> ids{};
    std::uint32_t creation = 0;
    if (tag == kReference) {
      ids[0] = r_.u32("reference id");
      creation = r_.u8("reference creation");
    } else {
      creation = tag == kNewReference ? r_.u8("reference creation") : r_.u32("reference creation");
      for (std::size_t i = 0; i < count; ++i) ids[i] = r_.u32("reference id");
    }
    return b_.reference(node.text, creation, std::span<const std::uint32_t>(ids.data(), count));
  }

  // Funs are opaque to us: their parts are validated and re-encoded canonically, and the
  // builder gets those bytes.
  [[gnu::noinline]] Value new_fun(std::size_t depth) {
    const std::size_t start = r_.pos() - 1;
    const std::uint32_t size = r_.u32("fun size");
    if (size < 29) r_.fail_at(start, "NEW_FUN_EXT size " + std::to_string(size) + " is too small");
    r_.need(size - 4, "fun");
    Bytes head = r_.take(1 + 16 + 4, "fun header");
    const std::uint32_t num_free = r_.u32("fun free variable count");
    r_.need_items(num_free, 1, "fun free variables");
    std::vector<std::uint8_t> out;
    out.reserve(size + 16);
    GrowSink sink{out};
    sink.byte(kNewFun);
    put_u32(sink, 0);  // the size, patched below
    sink.write(head.data(), head.size());
    put_u32(sink, num_free);
    copy_parts(sink, [&](Decoder<CopyBuilder<GrowSink>>& d, CopyBuilder<GrowSink>& c) {
      if (!is_atom_tag(r_.peek_u8("fun module"))) r_.fail("NEW_FUN_EXT module must be an atom");
      d.term(depth + 1);
      c.integer(static_cast<std::int32_t>(detail::read_small_or_int(r_, "fun old index")));
      c.integer(static_cast<std::int32_t>(detail::read_small_or_int(r_, "fun old uniq")));
      const std::uint8_t pid_tag = r_.peek_u8("fun pid");
      if (pid_tag != kPid && pid_tag != kNewPid) r_.fail("NEW_FUN_EXT creator must be a pid");
      d.term(depth + 1);
      for (std::uint32_t i = 0; i < num_free; ++i) d.term(depth + 1);
    });
    if (r_.pos() != start + 1 + size) {
      r_.fail_at(start, "NEW_FUN_EXT size " + std::to_string(size) + " does not match its contents");
    }
    const auto new_size = static_cast<std::uint32_t>(out.size() - 1);
    for (int i = 0; i < 4; ++i) out[1 + i] = static_cast<std::uint8_t>(new_size >> (24 - 8 * i));
    return b_.fun(out);
  }

  [[gnu::noinline]] Value old_fun(std::size_t depth) {
    const std::uint32_t num_free = r_.u32("fun free variable count");
    r_.need_items(num_free, 1, "fun free variables");
    std::vector<std::uint8_t> out;
    GrowSink sink{out};
    sink.byte(kFun);
    put_u32(sink, num_free);
    copy_parts(sink, [&](Decoder<CopyBuilder<GrowSink>>& d, CopyBuilder<GrowSink>&) {
      for (std::uint32_t i = 0; i < 4 + num_free; ++i) d.term(depth + 1);  // pid, module, index, uniq, free
    });
    return b_.fun(out);
  }

  [[gnu::noinline]] Value export_fun(std::size_t depth) {
    std::vector<std::uint8_t> out;
    GrowSink sink{out};
    sink.byte(kExport);
    copy_parts(sink, [&](Decoder<CopyBuilder<GrowSink>>& d, CopyBuilder<GrowSink>&) {
      if (!is_atom_tag(r_.peek_u8("export module"))) r_.fail("EXPORT_EXT module must be an atom");
      d.term(depth + 1);
      if (!is_atom_tag(r_.peek_u8("export function"))) r_.fail("EXPORT_EXT function must be an atom");
      d.term(depth + 1);
    });
    if (r_.u8("export arity") != kSmallInteger) {
      r_.fail_at(r_.pos() - 1, "EXPORT_EXT arity must be a small integer");
    }
    sink.byte(kSmallInteger);
    sink.byte(r_.u8("export arity"));
    return b_.fun(out);
  }

  static bool is_atom_tag(std::uint8_t t) {
    return t == kAtom || t == kSmallAtom || t == kAtomUtf8 || t == kSmallAtomUtf8 || t == kAtomCacheRef;
  }

  template <class F>
  void copy_parts(GrowSink& sink, F&& parts) {
    CopyBuilder<GrowSink> cb{sink};
    Decoder<CopyBuilder<GrowSink>> d(r_, cb, o_);
    parts(d, cb);
  }

  Value tuple(std::uint32_t n, std::size_t depth) {
    r_.need_items(n, 1, "tuple");
    auto t = b_.tuple_begin(n);
    for (std::size_t i = 0; i < n; ++i) b_.tuple_set(t, i, term(depth + 1));
    return b_.tuple_end(t);
  }

  Value list(std::size_t depth) {
    const std::uint32_t n = r_.u32("list length");
    r_.need_items(n, 1, "list");
    auto l = b_.list_begin(n);
    if (n > 0 && depth + 1 > o_.max_depth) too_deep(depth + 1);  // as term() would, for item()
    for (std::size_t i = 0; i < n; ++i) b_.list_set(l, i, item(depth));
    if (r_.peek_u8("list tail") == kNil) {
      r_.u8();
      return b_.list_end(l);
    }
    return b_.improper_list_end(l, term(depth + 1));
  }

  Value map(std::size_t depth) {
    const std::uint32_t n = r_.u32("map arity");
    r_.need_items(n, 2, "map");
    auto m = b_.map_begin(n);
    // A reused term is not decoded, so its depth is checked here, as term() would.
    if (n > 0 && depth + 1 > o_.max_depth) too_deep(depth + 1);
    if constexpr (ReusesMapTerms<Builder, decltype(m)>) {
      if (b_.map_reuses(m)) {
        for (std::size_t i = 0; i < n; ++i) {
          const std::size_t key_offset = r_.offset();
          Value k = reused_or_item(m, 2 * i, depth);
          Value v = reused_or_item(m, 2 * i + 1, depth);
          b_.map_set(m, std::move(k), std::move(v), key_offset);
        }
        return b_.map_end(m);
      }
    }
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t key_offset = r_.offset();
      Value k = term(depth + 1);
      Value v = term(depth + 1);
      b_.map_set(m, std::move(k), std::move(v), key_offset);
    }
    return b_.map_end(m);
  }

  template <class M>
  [[gnu::always_inline]] Value reused_or_item(M& m, std::size_t slot, std::size_t depth) {
    Value v;
    if (b_.map_reuse(m, slot, r_, v)) return v;
    const std::size_t start = r_.pos();
    v = item(depth);
    b_.map_remember(m, slot, r_.data().subspan(start, r_.pos() - start), v);
    return v;
  }

  // An element of a container at `depth`, whose depth + 1 the caller has checked: integers,
  // the commonest scalars, without a recursive call.
  [[gnu::always_inline]] Value item(std::size_t depth) {
    const std::uint8_t tag = r_.peek_u8();
    if (tag == kSmallInteger) {
      r_.u8();
      return b_.integer(r_.u8("integer"));
    }
    if (tag == kInteger) {
      r_.u8();
      return b_.integer(static_cast<std::int32_t>(r_.u32("integer")));
    }
    return term(depth + 1);
  }

  Reader& r_;
  Builder& b_;
  const DecodeOptions& o_;
  const StackFloor stack_ = StackFloor::current();
};

// Decodes one term at the reader's position, without a version byte (the form inside
// protocol frames and distribution messages).
template <class Builder>
typename Builder::Value decode_term(Reader& r, Builder& b, const DecodeOptions& o = {}) {
  Decoder<Builder> d(r, b, o);
  return d.term();
}

// Decodes a whole external term: version byte 131, then a term or a compressed term,
// and nothing after it.
template <class Builder>
typename Builder::Value decode(Bytes input, Builder& b, const DecodeOptions& o = {}) {
  Reader r(input);
  const std::uint8_t version = r.u8("version byte");
  if (version != kVersion) {
    r.fail_at(0, "expected version byte 131, got " + std::to_string(version));
  }
  if (r.peek_u8() == kCompressed) {
    r.u8();
    const std::uint32_t declared = r.u32("compressed size");
    const std::size_t data_offset = r.pos();
    std::vector<std::uint8_t> inflated =
        inflate_exact(r.take(r.remaining(), "compressed data"), declared, o.max_inflated,
                      data_offset);
    // Offsets inside the inflated data are reported as they are: there is no better one.
    Reader inner(inflated);
    auto value = decode_term(inner, b, o);
    if (!inner.at_end()) {
      inner.fail(std::to_string(inner.remaining()) + " bytes after the term in the inflated data");
    }
    return value;
  }
  auto value = decode_term(r, b, o);
  if (!r.at_end()) r.fail(std::to_string(r.remaining()) + " bytes after the term");
  return value;
}

// Checks that `input` is one well-formed external term.
inline void validate(Bytes input, const DecodeOptions& o = {}) {
  NullBuilder b;
  decode(input, b, o);
}

}  // namespace etf
