// Errors of the term core. They are C++ exceptions inside the core only: every boundary
// (Python extension, NIF, worker) catches them once and turns them into values.
#pragma once
#include <cstddef>
#include <stdexcept>
#include <string>

namespace etf {

// Malformed, truncated or hostile input. `offset` is the byte position in the input
// (for a compressed term: in the inflated data) where the problem was found.
class DecodeError : public std::runtime_error {
 public:
  DecodeError(std::size_t offset, const std::string& what)
      : std::runtime_error("at byte " + std::to_string(offset) + ": " + what),
        offset_(offset), reason_(what) {}
  std::size_t offset() const noexcept { return offset_; }
  const std::string& reason() const noexcept { return reason_; }

 private:
  std::size_t offset_;
  std::string reason_;
};

// A value that has no ETF form (NaN, an atom over 255 characters, ...).
class EncodeError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A term over the size its caller allows. `size` is what had been counted when the limit
// was passed: at least that, not the size of the whole term (which is never built).
class TooLargeError : public EncodeError {
 public:
  TooLargeError(std::size_t size, std::size_t max)
      : EncodeError("term of at least " + std::to_string(size) + " bytes, above the limit of " +
                    std::to_string(max)),
        size_(size), max_(max) {}
  std::size_t size() const noexcept { return size_; }
  std::size_t max() const noexcept { return max_; }

 private:
  std::size_t size_, max_;
};

}  // namespace etf
