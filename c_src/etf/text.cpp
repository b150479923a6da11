#include "text.hpp"

namespace etf {

std::optional<std::size_t> utf8_length(std::span<const std::uint8_t> s) noexcept {
  std::size_t chars = 0;
  std::size_t i = 0;
  const std::size_t n = s.size();
  while (i < n) {
    const std::uint8_t c = s[i];
    ++chars;
    if (c < 0x80) { ++i; continue; }
    std::size_t len;
    std::uint32_t cp;
    if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
    else return std::nullopt;
    if (n - i < len) return std::nullopt;
    for (std::size_t k = 1; k < len; ++k) {
      const std::uint8_t cc = s[i + k];
      if ((cc & 0xC0) != 0x80) return std::nullopt;
      cp = (cp << 6) | (cc & 0x3F);
    }
    static constexpr std::uint32_t kMin[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < kMin[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return std::nullopt;
    i += len;
  }
  return chars;
}

std::size_t latin1_to_utf8(std::span<const std::uint8_t> in, char* out) noexcept {
  std::size_t o = 0;
  for (std::uint8_t c : in) {
    if (c < 0x80) {
      out[o++] = static_cast<char>(c);
    } else {
      out[o++] = static_cast<char>(0xC0 | (c >> 6));
      out[o++] = static_cast<char>(0x80 | (c & 0x3F));
    }
  }
  return o;
}

}  // namespace etf
