// The head of a frame, read without decoding the rest: kinds, arities, ids of every
// integer size Erlang writes (unique_integer ids need a bignum), and refusals.
#include <gtest/gtest.h>

#include <cstdint>
#include <string_view>
#include <vector>

#include "worker/frame_head.hpp"

namespace {

using erpy::worker::frame_head;

std::vector<std::uint8_t> frame(std::vector<std::uint8_t> id_bytes, std::uint8_t arity = 3) {
  std::vector<std::uint8_t> f = {131, 104, arity, 119, 7};
  for (char c : std::string_view("request")) f.push_back(static_cast<std::uint8_t>(c));
  for (std::uint8_t b : id_bytes) f.push_back(b);
  f.push_back(106);  // the rest is never read
  return f;
}

std::optional<std::int64_t> id_of(const std::vector<std::uint8_t>& f) {
  const auto h = frame_head(etf::Bytes(f.data(), f.size()));
  return h ? h->id : std::nullopt;
}

TEST(FrameHead, KindArityAndEveryIdSize) {
  const auto f = frame({97, 7});
  const auto h = frame_head(etf::Bytes(f.data(), f.size()));
  ASSERT_TRUE(h);
  EXPECT_EQ(h->kind, "request");
  EXPECT_EQ(h->arity, 3u);
  EXPECT_EQ(h->id, 7);
  EXPECT_EQ(id_of(frame({98, 0, 1, 0, 0})), 65536);
  // 576460752303423489 = 2^59 + 1, as term_to_binary writes it.
  EXPECT_EQ(id_of(frame({110, 8, 0, 1, 0, 0, 0, 0, 0, 0, 8})), (std::int64_t{1} << 59) + 1);
}

TEST(FrameHead, RefusesWhatIsNotAFrame) {
  EXPECT_FALSE(id_of(frame({110, 9, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1})));   // past 64 bits: no id
  EXPECT_FALSE(id_of(frame({110, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0x80})));  // past int64
  EXPECT_FALSE(id_of(frame({100})));                                     // not an integer
  for (const std::vector<std::uint8_t>& bad :
       {std::vector<std::uint8_t>{}, {131}, {130, 104, 1, 119, 1, 'x'}, {131, 104, 0}, {131, 107, 0, 1, 'a'},
        {131, 104, 2, 119, 200, 'a'}}) {
    EXPECT_FALSE(frame_head(etf::Bytes(bad.data(), bad.size())));
  }
}

}  // namespace
