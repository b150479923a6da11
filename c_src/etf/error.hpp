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

}  // namespace etf
