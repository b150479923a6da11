// Golden cases written by Erlang during the test run (test/golden/gen_golden.escript):
// each line holds term_to_binary bytes and Erlang's own dump of the term. The decoder must
// see the same term, and re-encoding a canonical case must give back the same bytes.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "etf/term.hpp"
#include "etf_dump.hpp"

namespace {

struct GoldenCase {
  std::string name;
  std::vector<std::uint8_t> bytes;
  std::string dump;
  bool canonical = false;
};

std::vector<std::uint8_t> unhex(const std::string& h) {
  std::vector<std::uint8_t> out;
  for (std::size_t i = 0; i + 1 < h.size(); i += 2) {
    out.push_back(static_cast<std::uint8_t>(std::stoi(h.substr(i, 2), nullptr, 16)));
  }
  return out;
}

std::vector<GoldenCase> load_cases() {
  const char* path = std::getenv("ERPY_GOLDEN_FILE");
  std::vector<GoldenCase> cases;
  if (!path) return cases;
  std::ifstream in(path);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    std::istringstream fields(line);
    GoldenCase c;
    std::string hex, kind;
    std::getline(fields, c.name, '\t');
    std::getline(fields, hex, '\t');
    std::getline(fields, c.dump, '\t');
    std::getline(fields, kind, '\t');
    c.bytes = unhex(hex);
    c.canonical = kind == "canonical";
    cases.push_back(std::move(c));
  }
  return cases;
}

TEST(Golden, DecodesAsErlangSeesItAndReencodesByteExact) {
  const char* path = std::getenv("ERPY_GOLDEN_FILE");
  ASSERT_NE(path, nullptr) << "ERPY_GOLDEN_FILE is not set: run the C++ tests through "
                              "'make test', which has Erlang write the golden cases first";
  const auto cases = load_cases();
  ASSERT_GT(cases.size(), 100u) << "golden file " << path << " has too few cases";
  std::size_t canonical = 0;
  for (const auto& c : cases) {
    SCOPED_TRACE(c.name);
    std::string got;
    ASSERT_NO_THROW(got = etf_test::dump(c.bytes)) << c.name;
    EXPECT_EQ(got, c.dump) << c.name;
    const etf::Term t = etf::decode_to_term(c.bytes);
    const auto again = etf::encode(t);
    if (c.canonical) {
      ++canonical;
      EXPECT_EQ(etf_test::hex(etf::Bytes(again)), etf_test::hex(etf::Bytes(c.bytes))) << c.name;
    } else {
      // Old forms re-encode to the canonical form of the same term.
      EXPECT_EQ(etf_test::dump(again), c.dump) << c.name;
    }
  }
  EXPECT_GT(canonical, 50u);
}

}  // namespace
