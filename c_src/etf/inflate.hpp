// Compressed terms (tag 80): zlib data that must inflate to exactly the declared size.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "reader.hpp"

namespace etf {

// deflate cannot compress better than about 1032:1, so a declared size beyond this many
// times the compressed length is a lie, refused before anything is allocated.
inline constexpr std::size_t kMaxDeflateRatio = 1032;

// Inflates `compressed` into a buffer of exactly `declared` bytes. `offset` is where the
// compressed data starts in the caller's input (for error messages). Throws DecodeError
// when the declared size is implausible or above `max_inflated`, when the zlib data is
// corrupt, or when it inflates to a different size.
std::vector<std::uint8_t> inflate_exact(Bytes compressed, std::size_t declared,
                                        std::size_t max_inflated, std::size_t offset);

// Deflates `data` (zlib format) for a tag-80 term; level 0..9, -1 for zlib's default.
std::vector<std::uint8_t> deflate(Bytes data, int level);

}  // namespace etf
