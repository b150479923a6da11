// Text helpers for atoms: UTF-8 validation and Latin-1 to UTF-8.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string_view>

namespace etf {

// Number of code points in `s` if it is valid UTF-8 (no overlongs, no surrogates,
// nothing above U+10FFFF); nullopt otherwise.
std::optional<std::size_t> utf8_length(std::span<const std::uint8_t> s) noexcept;

// Writes the UTF-8 form of Latin-1 `in` into `out` (which holds at least 2 * in.size()
// bytes) and returns its length.
std::size_t latin1_to_utf8(std::span<const std::uint8_t> in, char* out) noexcept;

inline std::string_view as_chars(std::span<const std::uint8_t> s) noexcept {
  return {reinterpret_cast<const char*>(s.data()), s.size()};
}

}  // namespace etf
