// Tags of the Erlang External Term Format, as listed in erts/doc "External Term Format".
#pragma once
#include <cstdint>

namespace etf {

inline constexpr std::uint8_t kVersion = 131;

enum Tag : std::uint8_t {
  kCompressed = 80,
  kDistHeader = 68,
  kDistFragHeader = 69,
  kNewFloat = 70,
  kBitBinary = 77,
  kAtomCacheRef = 82,
  kNewPid = 88,
  kNewPort = 89,
  kNewerReference = 90,
  kSmallInteger = 97,
  kInteger = 98,
  kFloat = 99,
  kAtom = 100,
  kReference = 101,
  kPort = 102,
  kPid = 103,
  kSmallTuple = 104,
  kLargeTuple = 105,
  kNil = 106,
  kString = 107,
  kList = 108,
  kBinary = 109,
  kSmallBig = 110,
  kLargeBig = 111,
  kNewFun = 112,
  kExport = 113,
  kNewReference = 114,
  kSmallAtom = 115,
  kMap = 116,
  kFun = 117,
  kAtomUtf8 = 118,
  kSmallAtomUtf8 = 119,
  kV4Port = 120,
  kLocal = 121,
};

// Erlang limits an atom to 255 characters (code points), so at most 1020 UTF-8 bytes.
inline constexpr std::size_t kMaxAtomChars = 255;
// STRING_EXT carries a 16-bit length; longer byte lists are LIST_EXT.
inline constexpr std::size_t kMaxStringExt = 65535;

}  // namespace etf
