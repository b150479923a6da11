// libFuzzer target for the term core's decoder: any bytes must give a term or a
// DecodeError, never a crash, a hang or an unbounded allocation; a decoded term must
// survive encode -> decode unchanged.
#include <cstdint>
#include <cstdlib>

#include "etf/term.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const etf::Bytes input(data, size);
  etf::DecodeOptions opts;
  opts.max_inflated = 64 << 20;
  etf::Term t;
  try {
    t = etf::decode_to_term(input, opts);
  } catch (const etf::DecodeError&) {
    return 0;
  }
  std::vector<std::uint8_t> again;
  try {
    again = etf::encode(t);
  } catch (const etf::EncodeError&) {
    std::abort();  // everything the decoder accepts has an encoding
  }
  if (!(etf::decode_to_term(again, opts) == t)) std::abort();
  // And the bare-term entry point used inside protocol frames.
  if (size > 1) {
    etf::Reader r(input.subspan(1));
    etf::NullBuilder nb;
    try {
      etf::decode_term(r, nb, opts);
    } catch (const etf::DecodeError&) {
    }
  }
  return 0;
}
