// The canonical encoder: the smallest integer tag, UTF-8 atoms, STRING_EXT for byte lists,
// and a size pass that always matches the write pass.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "etf/term.hpp"

namespace {

using Buf = std::vector<std::uint8_t>;

Buf enc(const etf::Term& t) { return etf::encode(t); }

TEST(Encode, IntegersUseTheSmallestTag) {
  EXPECT_EQ(enc(etf::integer(0)), (Buf{131, 97, 0}));
  EXPECT_EQ(enc(etf::integer(255)), (Buf{131, 97, 255}));
  EXPECT_EQ(enc(etf::integer(256)), (Buf{131, 98, 0, 0, 1, 0}));
  EXPECT_EQ(enc(etf::integer(-1)), (Buf{131, 98, 255, 255, 255, 255}));
  EXPECT_EQ(enc(etf::integer(INT32_MIN)), (Buf{131, 98, 128, 0, 0, 0}));
  EXPECT_EQ(enc(etf::integer(std::int64_t{INT32_MAX} + 1)), (Buf{131, 110, 4, 0, 0, 0, 0, 128}));
  EXPECT_EQ(enc(etf::integer(INT64_MIN)), (Buf{131, 110, 8, 1, 0, 0, 0, 0, 0, 0, 0, 128}));
  // A bignum that fits in 32 bits is an INTEGER_EXT, as Erlang writes it.
  EXPECT_EQ(enc(etf::Term{etf::BigInt{true, {5, 0, 0}}}), (Buf{131, 98, 255, 255, 255, 251}));
  EXPECT_EQ(enc(etf::Term{etf::BigInt{false, std::vector<std::uint8_t>(256, 1)}})[1], etf::kLargeBig);
}

TEST(Encode, FloatsAndTheirLimits) {
  EXPECT_EQ(enc(etf::Term{1.5}), (Buf{131, 70, 0x3f, 0xf8, 0, 0, 0, 0, 0, 0}));
  EXPECT_THROW(enc(etf::Term{std::numeric_limits<double>::quiet_NaN()}), etf::EncodeError);
  EXPECT_THROW(enc(etf::Term{INFINITY}), etf::EncodeError);
}

TEST(Encode, AtomsAreUtf8) {
  EXPECT_EQ(enc(etf::atom("ok")), (Buf{131, 119, 2, 'o', 'k'}));
  std::string long_atom;
  for (int i = 0; i < 100; ++i) long_atom += "é";  // 200 bytes, 100 characters
  long_atom += std::string(100, 'x');               // 300 bytes, 200 characters
  const Buf b = enc(etf::atom(long_atom));
  EXPECT_EQ(b[1], etf::kAtomUtf8);
  EXPECT_EQ((b[2] << 8) | b[3], 300);
  EXPECT_THROW(etf::check_atom(std::string(256, 'a')), etf::EncodeError);
  EXPECT_THROW(etf::check_atom("\xff"), etf::EncodeError);
  EXPECT_NO_THROW(etf::check_atom(long_atom));
}

TEST(Encode, ByteListsAreStrings) {
  EXPECT_EQ(enc(etf::list({etf::integer(1), etf::integer(2)})), (Buf{131, 107, 0, 2, 1, 2}));
  EXPECT_EQ(enc(etf::list({etf::integer(1), etf::integer(300)}))[1], etf::kList);
  EXPECT_EQ(enc(etf::list({})), (Buf{131, 106}));
  EXPECT_EQ(enc(etf::list(std::vector<etf::Term>(65536, etf::integer(7))))[1], etf::kList);
}

TEST(Encode, BitstringsMaskUnusedBits) {
  EXPECT_EQ(enc(etf::Term{etf::Binary{{0xff, 0xff}, 3}}), (Buf{131, 77, 0, 0, 0, 2, 3, 0xff, 0xe0}));
  EXPECT_EQ(enc(etf::Term{etf::Binary{{}, 3}}), (Buf{131, 109, 0, 0, 0, 0}));
}

TEST(Encode, SizePassMatchesWritePass) {
  etf::SizeSink size;
  const etf::Term t = etf::tuple({etf::atom("a"), etf::binary("xyz"), etf::integer(1 << 20)});
  etf::put_term(size, t);
  EXPECT_EQ(size.size + 1, enc(t).size());
  std::vector<std::uint8_t> grown;
  etf::GrowSink g{grown};
  etf::put_version(g);
  etf::put_term(g, t);
  EXPECT_EQ(grown, enc(t));
  std::uint8_t small[3];
  etf::SpanSink s{small, small + 3};
  EXPECT_THROW(etf::put_term(s, t), etf::EncodeError);
}

TEST(Encode, PortsAndReferences) {
  EXPECT_EQ(enc(etf::Term{etf::Port{"a", 1, 2}})[1], etf::kNewPort);
  EXPECT_EQ(enc(etf::Term{etf::Port{"a", 1ull << 40, 2}})[1], etf::kV4Port);
  EXPECT_THROW(enc(etf::Term{etf::Ref{"a", 1, {}}}), etf::EncodeError);
}

}  // namespace
