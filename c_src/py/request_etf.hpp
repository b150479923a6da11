// The request map as external term format bytes (a port frame), for parse_request():
// keys and scalars are read in place, values decode straight to Python objects, and the
// caller's pid stays undecoded (most requests never ask for erlang.self()).
#pragma once
#include <optional>
#include <string>
#include <string_view>

#include "codec.hpp"
#include "etf/decode.hpp"
#include "request.hpp"

namespace erpy::py {

class EtfRequestSource {
 public:
  // `r` is at the map's tag.
  EtfRequestSource(etf::Reader& r, Codec& codec, const DecodeOptions& o) : r_(r), codec_(codec), o_(o) {
    if (r_.u8("request") != etf::kMap) request_error("a request must be a map");
    left_ = r_.u32("request size");
  }

  bool next(std::string_view& key) {
    if (left_ == 0) return false;
    --left_;
    const std::uint8_t tag = r_.peek_u8("request key");
    if (tag == etf::kSmallAtomUtf8 || tag == etf::kAtomUtf8 || tag == etf::kSmallAtom || tag == etf::kAtom) {
      r_.u8("request key");
      etf::detail::read_atom_text(r_, tag, key_, {});
      key = key_.text;
    } else {
      skip();
      key = {};  // not a field name: parse_request reports it unknown
    }
    return true;
  }

  std::optional<std::int64_t> integer() {
    const std::uint8_t tag = r_.peek_u8("request value");
    if (tag != etf::kSmallInteger && tag != etf::kInteger && tag != etf::kSmallBig) {
      skip();
      return std::nullopt;
    }
    Scalar s;
    etf::decode_term(r_, s);
    return s.int_value;
  }

  std::optional<std::string_view> atom() {
    const std::uint8_t tag = r_.peek_u8("request value");
    if (tag != etf::kSmallAtomUtf8 && tag != etf::kAtomUtf8 && tag != etf::kSmallAtom && tag != etf::kAtom) {
      skip();
      return std::nullopt;
    }
    r_.u8("request value");
    etf::detail::read_atom_text(r_, tag, value_, {});
    return value_.text;
  }

  PyRef object() { return codec_.decode_term(r_, o_); }

  void skip() {
    etf::NullBuilder b;
    etf::decode_term(r_, b);
  }

  void caller(Request&) {
    const std::size_t start = r_.pos();
    skip();
    caller_ = r_.data().subspan(start, r_.pos() - start);
  }
  void reply_to(Request&) { skip(); }

  // The caller's pid as ETF (no version byte): a view into the frame.
  etf::Bytes caller_bytes() const noexcept { return caller_; }

 private:
  struct Scalar : etf::NullBuilder {
    std::optional<std::int64_t> int_value;
    Value integer(std::int64_t v) {
      int_value = v;
      return {};
    }
  };

  etf::Reader& r_;
  Codec& codec_;
  const DecodeOptions& o_;
  std::uint32_t left_ = 0;
  etf::detail::AtomText key_, value_;
  etf::Bytes caller_{};
};

}  // namespace erpy::py
