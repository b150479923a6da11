// The decoder on hand-made bytes: old forms Erlang no longer writes, and hostile input.
#include <gtest/gtest.h>

#include <pthread.h>

#include <chrono>
#include <functional>
#include <vector>

#include "etf/term.hpp"
#include "etf_dump.hpp"

namespace {

using Buf = std::vector<std::uint8_t>;

std::string dump(const Buf& b) { return etf_test::dump(b); }

std::size_t error_offset(const Buf& b, const etf::DecodeOptions& o = {}) {
  try {
    etf::validate(b, o);
  } catch (const etf::DecodeError& e) {
    return e.offset();
  }
  ADD_FAILURE() << "no DecodeError for " << etf_test::hex(etf::Bytes(b));
  return SIZE_MAX;
}

std::string error_text(const Buf& b) {
  try {
    etf::validate(b);
  } catch (const etf::DecodeError& e) {
    return e.what();
  }
  return "";
}

TEST(Decode, SmallAndLargeIntegers) {
  EXPECT_EQ(dump({131, 97, 255}), "i+ff");
  EXPECT_EQ(dump({131, 98, 255, 255, 255, 255}), "i-1");
  EXPECT_EQ(dump({131, 110, 0, 0}), "i+0");                          // empty bignum
  EXPECT_EQ(dump({131, 110, 2, 1, 1, 0}), "i-1");                    // high zero byte
  EXPECT_EQ(dump({131, 110, 8, 1, 0, 0, 0, 0, 0, 0, 0, 128}), "i-8000000000000000");
  EXPECT_EQ(dump({131, 110, 8, 0, 0, 0, 0, 0, 0, 0, 0, 128}), "i+8000000000000000");
  EXPECT_EQ(dump({131, 111, 0, 0, 0, 9, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1}), "i+10000000000000001");
  EXPECT_NE(error_text({131, 110, 1, 2, 5}).find("sign"), std::string::npos);
}

TEST(Decode, OldFloatText) {
  Buf b = {131, 99};
  const char* text = "1.50000000000000000000e+00";
  b.insert(b.end(), text, text + 26);
  b.resize(2 + 31, 0);
  EXPECT_EQ(dump(b), "f3ff8000000000000");
  b[2] = 'x';
  EXPECT_EQ(error_offset(b), 1u);
}

TEST(Decode, NonFiniteFloatIsRefused) {
  EXPECT_NE(error_text({131, 70, 0x7f, 0xf0, 0, 0, 0, 0, 0, 0}).find("NaN"), std::string::npos);
}

TEST(Decode, Latin1AtomsBecomeUtf8) {
  EXPECT_EQ(dump({131, 100, 0, 2, 'o', 'k'}), "a6f6b");
  EXPECT_EQ(dump({131, 115, 1, 0xe9}), "ac3a9");  // é
  EXPECT_EQ(dump({131, 119, 2, 0xc3, 0xa9}), "ac3a9");
  EXPECT_NE(error_text({131, 119, 1, 0xe9}).find("UTF-8"), std::string::npos);
}

TEST(Decode, OldPidPortReferenceForms) {
  const Buf node = {115, 3, 'a', '@', 'b'};
  Buf pid = {131, 103};
  pid.insert(pid.end(), node.begin(), node.end());
  pid.insert(pid.end(), {0, 0, 0, 7, 0, 0, 0, 1, 2});
  EXPECT_EQ(dump(pid), "P(a614062,7,1,2)");
  Buf port = {131, 102};
  port.insert(port.end(), node.begin(), node.end());
  port.insert(port.end(), {0, 0, 0, 9, 3});
  EXPECT_EQ(dump(port), "O(a614062,9,3)");
  Buf ref = {131, 101};
  ref.insert(ref.end(), node.begin(), node.end());
  ref.insert(ref.end(), {0, 0, 1, 0, 1});
  EXPECT_EQ(dump(ref), "R(a614062,1,256)");
  Buf newref = {131, 114, 0, 2};
  newref.insert(newref.end(), node.begin(), node.end());
  newref.insert(newref.end(), {3, 0, 0, 0, 1, 0, 0, 0, 2});
  EXPECT_EQ(dump(newref), "R(a614062,3,1.2)");
  Buf v4 = {131, 120};
  v4.insert(v4.end(), node.begin(), node.end());
  v4.insert(v4.end(), {0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5});
  EXPECT_EQ(dump(v4), "O(a614062,4294967296,5)");
  // Old forms come back in the canonical new forms.
  EXPECT_EQ(etf::encode(etf::decode_to_term(pid))[1], etf::kNewPid);
  EXPECT_EQ(etf::encode(etf::decode_to_term(ref))[1], etf::kNewerReference);
  EXPECT_EQ(etf::encode(etf::decode_to_term(v4))[1], etf::kV4Port);
}

TEST(Decode, FunsAreOpaqueButCanonical) {
  // fun lists:sort/1 with Latin-1 atoms comes back with UTF-8 atoms, as Erlang writes it.
  const Buf old = {131, 113, 100, 0, 5, 'l', 'i', 's', 't', 's', 100, 0, 4, 's', 'o', 'r', 't', 97, 1};
  const Buf canonical = {131, 113, 119, 5, 'l', 'i', 's', 't', 's', 119, 4, 's', 'o', 'r', 't', 97, 1};
  EXPECT_EQ(dump(old), "F" + etf_test::hex(etf::Bytes(canonical).subspan(1)));
  EXPECT_EQ(etf::encode(etf::decode_to_term(old)), canonical);
  EXPECT_EQ(etf::encode(etf::decode_to_term(canonical)), canonical);
  EXPECT_THROW(etf::validate(Buf{131, 113, 97, 1, 100, 0, 1, 'f', 97, 1}), etf::DecodeError);
}

TEST(Decode, ImproperAndNestedTails) {
  EXPECT_EQ(dump({131, 108, 0, 0, 0, 1, 97, 1, 97, 2}), "[i+1|i+2]");
  // A list whose tail is another list is one list.
  EXPECT_EQ(dump({131, 108, 0, 0, 0, 1, 97, 1, 107, 0, 1, 2}), "[i+1,i+2]");
  EXPECT_EQ(dump({131, 107, 0, 0}), "[]");
}

TEST(Decode, BitBinaryForms) {
  EXPECT_EQ(dump({131, 77, 0, 0, 0, 1, 3, 0xff}), "B3:e0");
  EXPECT_EQ(dump({131, 77, 0, 0, 0, 1, 8, 0xff}), "bff");
  EXPECT_EQ(error_offset({131, 77, 0, 0, 0, 1, 9, 0xff}), 1u);
  EXPECT_EQ(error_offset({131, 77, 0, 0, 0, 1, 0, 0xff}), 1u);
}

TEST(Decode, TruncatedAtEveryByteIsAnErrorWithinTheInput) {
  // A term with one of nearly everything in it.
  const Buf full = etf::encode(etf::tuple({
      etf::integer(1), etf::integer(-100000), etf::integer(INT64_MIN), etf::atom("héllo"),
      etf::binary("bin"), etf::list({etf::integer(300), etf::Term{2.5}}),
      etf::Term{etf::Map{{etf::atom("k"), etf::list({etf::integer(1), etf::integer(2)})}}},
      etf::Term{etf::Pid{"n@h", 1, 2, 3}}, etf::Term{etf::Ref{"n@h", 4, {1, 2, 3}}},
      etf::Term{etf::Port{"n@h", 5, 6}}, etf::Term{etf::Binary{{0xf0}, 4}},
  }));
  ASSERT_NO_THROW(etf::validate(full));
  for (std::size_t cut = 0; cut < full.size(); ++cut) {
    const Buf part(full.begin(), full.begin() + cut);
    const std::size_t off = error_offset(part);
    EXPECT_LE(off, cut) << "cut at " << cut;
  }
}

TEST(Decode, TrailingBytesAreAnError) {
  EXPECT_EQ(error_offset({131, 97, 1, 5}), 3u);
}

TEST(Decode, UnknownAndMisplacedTags) {
  EXPECT_EQ(error_offset({131, 200}), 1u);
  EXPECT_EQ(error_offset({131, 104, 1, 80, 0, 0, 0, 0}), 3u);
  EXPECT_EQ(error_offset({131, 121, 0}), 1u);
  EXPECT_EQ(error_offset({131, 82, 0}), 1u);
  EXPECT_EQ(error_offset({130, 97, 1}), 0u);
  EXPECT_EQ(error_offset({}), 0u);
}

TEST(Decode, HugeLengthFieldsAreRefusedBeforeAllocating) {
  // A list of 2^32-1 elements in 6 bytes, and friends.
  EXPECT_NE(error_text({131, 108, 255, 255, 255, 255}).find("4294967295"), std::string::npos);
  EXPECT_EQ(error_offset({131, 105, 255, 255, 255, 255}), 6u);
  EXPECT_EQ(error_offset({131, 116, 255, 255, 255, 255, 97, 1}), 6u);
  EXPECT_EQ(error_offset({131, 109, 255, 255, 255, 255, 1}), 6u);
  EXPECT_EQ(error_offset({131, 111, 255, 255, 255, 255, 0, 1}), 7u);
  EXPECT_EQ(error_offset({131, 112, 255, 255, 255, 255, 0}), 6u);
  EXPECT_EQ(error_offset({131, 90, 255, 255, 115, 0}), 1u);
}

TEST(Decode, DeepNestingIsRefusedWithoutExhaustingTheStack) {
  Buf deep = {131};
  for (int i = 0; i < 1000000; ++i) deep.insert(deep.end(), {104, 1});
  deep.push_back(106);
  const auto t0 = std::chrono::steady_clock::now();
  const std::size_t off = error_offset(deep);
  EXPECT_EQ(off, 1u + 2u * 2001u);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(2));
  etf::DecodeOptions shallow;
  shallow.max_depth = 3;
  EXPECT_EQ(error_offset({131, 108, 0, 0, 0, 1, 108, 0, 0, 0, 1, 108, 0, 0, 0, 1, 108, 0, 0, 0, 1, 106, 106, 106, 106, 106},
                         shallow),
            21u);
}

// Runs `f` on a thread of `stack` bytes of stack.
void on_stack(std::size_t stack, const std::function<void()>& f) {
  pthread_attr_t attr;
  ASSERT_EQ(pthread_attr_init(&attr), 0);
  ASSERT_EQ(pthread_attr_setstacksize(&attr, stack), 0);
  pthread_t t;
  auto run = [](void* p) -> void* {
    (*static_cast<const std::function<void()>*>(p))();
    return nullptr;
  };
  ASSERT_EQ(pthread_create(&t, &attr, run, const_cast<std::function<void()>*>(&f)), 0);
  pthread_join(t, nullptr);
  pthread_attr_destroy(&attr);
}

TEST(Decode, NoMaxDepthOutrunsTheStack) {
  // max_depth far beyond what any stack holds: the thread's stack decides, cleanly, on
  // the main thread and on threads with small stacks (as a NIF's or a Python thread's).
  Buf deep = {131};
  for (int i = 0; i < 1000000; ++i) deep.insert(deep.end(), {108, 0, 0, 0, 1});
  deep.insert(deep.end(), 1000001, 106);
  etf::DecodeOptions o;
  o.max_depth = 10'000'000;
  for (std::size_t stack : {std::size_t{64} << 10, std::size_t{256} << 10, std::size_t{8} << 20, std::size_t{0}}) {
    std::string what;
    std::size_t levels = 0;
    auto f = [&] {
      try {
        etf::TermBuilder b;  // a Term tree, as protocol code builds
        etf::decode(deep, b, o);
      } catch (const etf::DecodeError& e) {
        what = e.what();
        levels = (e.offset() - 1) / 5;
      }
    };
    if (stack) on_stack(stack, f); else f();
    EXPECT_NE(what.find("too deeply for this thread's stack"), std::string::npos) << stack << ": " << what;
    EXPECT_GT(levels, 10u) << stack;
  }
}

TEST(Decode, CompressedTerms) {
  const Buf plain = etf::encode(etf::list(std::vector<etf::Term>(1000, etf::atom("repeated"))));
  const auto packed = etf::deflate(etf::Bytes(plain).subspan(1), 6);
  Buf z = {131, 80};
  const std::uint32_t n = static_cast<std::uint32_t>(plain.size() - 1);
  z.insert(z.end(), {static_cast<std::uint8_t>(n >> 24), static_cast<std::uint8_t>(n >> 16),
                     static_cast<std::uint8_t>(n >> 8), static_cast<std::uint8_t>(n)});
  z.insert(z.end(), packed.begin(), packed.end());
  EXPECT_EQ(dump(z), dump(plain));
  // Declared size off by one either way.
  Buf bigger = z;
  bigger[5] += 1;
  EXPECT_NE(error_text(bigger).find("inflates"), std::string::npos);
  Buf smaller = z;
  smaller[5] -= 1;
  EXPECT_NE(error_text(smaller).find("declared"), std::string::npos);
  // Corrupt and truncated zlib data.
  Buf corrupt = z;
  corrupt[8] ^= 0x55;
  EXPECT_THROW(etf::validate(corrupt), etf::DecodeError);
  for (std::size_t cut = 6; cut < z.size(); cut += 3) {
    EXPECT_THROW(etf::validate(Buf(z.begin(), z.begin() + cut)), etf::DecodeError);
  }
}

TEST(Decode, CompressedClaimOfTwoGiBIsRefusedAtOnce) {
  const Buf z = {131, 80, 0x80, 0, 0, 0, 0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01};
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(error_offset(z), 6u);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::milliseconds(100));
  etf::DecodeOptions small;
  small.max_inflated = 10;
  const Buf plain = etf::encode(etf::binary(std::string(100, 'x')));
  const auto packed = etf::deflate(etf::Bytes(plain).subspan(1), 6);
  Buf z2 = {131, 80, 0, 0, 0, static_cast<std::uint8_t>(plain.size() - 1)};
  z2.insert(z2.end(), packed.begin(), packed.end());
  EXPECT_NO_THROW(etf::validate(z2));
  EXPECT_THROW(etf::validate(z2, small), etf::DecodeError);
}

TEST(Decode, FunSizeMustMatchContents) {
  // NEW_FUN_EXT whose Size claims more than it holds.
  Buf f = {131, 112, 0, 0, 0, 40, 0};
  f.resize(f.size() + 16 + 4, 0);
  f.insert(f.end(), {0, 0, 0, 0, 115, 1, 'm', 97, 0, 98, 0, 0, 0, 0, 88, 115, 1, 'n', 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0});
  EXPECT_THROW(etf::validate(f), etf::DecodeError);
}

}  // namespace
