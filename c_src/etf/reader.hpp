// A bounds-checked cursor over an ETF byte span. It never copies: everything it hands out
// is a view into the input, valid as long as the input is.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <span>
#include <string>

#include "error.hpp"

namespace etf {

using Bytes = std::span<const std::uint8_t>;

class Reader {
 public:
  // `base` is added to every offset reported in errors (the position of `data` in a
  // larger buffer, so messages point at the caller's bytes).
  explicit Reader(Bytes data, std::size_t base = 0) noexcept : data_(data), base_(base) {}

  std::size_t pos() const noexcept { return pos_; }
  std::size_t offset() const noexcept { return base_ + pos_; }
  std::size_t remaining() const noexcept { return data_.size() - pos_; }
  bool at_end() const noexcept { return pos_ == data_.size(); }
  Bytes data() const noexcept { return data_; }

  [[noreturn]] void fail(const std::string& what) const { throw DecodeError(offset(), what); }
  [[noreturn]] void fail_at(std::size_t pos, const std::string& what) const {
    throw DecodeError(base_ + pos, what);
  }

  // The checks stay small enough to inline (and are forced inline: they run for every
  // byte of every term); building the message is out of line.
  [[gnu::always_inline]] void need(std::size_t n, const char* what) const {
    if (n > remaining()) [[unlikely]] truncated(n, what);
  }

  [[gnu::always_inline]] std::uint8_t peek_u8(const char* what = "term") const {
    need(1, what);
    return data_[pos_];
  }
  [[gnu::always_inline]] std::uint8_t u8(const char* what = "term") {
    need(1, what);
    return data_[pos_++];
  }
  [[gnu::always_inline]] std::uint16_t u16(const char* what) {
    need(2, what);
    const std::uint8_t* p = data_.data() + pos_;
    pos_ += 2;
    return static_cast<std::uint16_t>((p[0] << 8) | p[1]);
  }
  [[gnu::always_inline]] std::uint32_t u32(const char* what) {
    need(4, what);
    const std::uint8_t* p = data_.data() + pos_;
    pos_ += 4;
    return (std::uint32_t{p[0]} << 24) | (std::uint32_t{p[1]} << 16) |
           (std::uint32_t{p[2]} << 8) | std::uint32_t{p[3]};
  }
  std::uint64_t u64(const char* what) {
    const std::uint64_t hi = u32(what);
    return (hi << 32) | u32(what);
  }
  [[gnu::always_inline]] Bytes take(std::size_t n, const char* what) {
    need(n, what);
    Bytes out = data_.subspan(pos_, n);
    pos_ += n;
    return out;
  }

  // Checks, before anything is allocated, that `count` items of at least `min_bytes`
  // each can still be in the input: a length field cannot claim more than the input holds.
  void need_items(std::uint64_t count, std::uint64_t min_bytes, const char* what) const {
    if (count > remaining() / min_bytes) [[unlikely]] too_many(count, what);
  }

 private:
  [[noreturn, gnu::noinline, gnu::cold]] void truncated(std::size_t n, const char* what) const {
    fail(std::string("truncated ") + what + ": needs " + std::to_string(n) +
         " bytes, " + std::to_string(remaining()) + " left");
  }
  [[noreturn, gnu::noinline, gnu::cold]] void too_many(std::uint64_t count, const char* what) const {
    fail(std::string(what) + " of " + std::to_string(count) +
         " elements cannot fit in the " + std::to_string(remaining()) + " bytes left");
  }

  Bytes data_;
  std::size_t pos_ = 0;
  std::size_t base_ = 0;
};

}  // namespace etf
