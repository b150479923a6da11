#include "inflate.hpp"

#include <zlib.h>

#include <climits>
#include <string>

namespace etf {
namespace {

// Owns a z_stream for its lifetime, whatever path leaves the function.
class InflateStream {
 public:
  InflateStream() {
    if (inflateInit(&z_) != Z_OK) throw std::bad_alloc();
  }
  ~InflateStream() { inflateEnd(&z_); }
  InflateStream(const InflateStream&) = delete;
  InflateStream& operator=(const InflateStream&) = delete;
  z_stream* get() { return &z_; }

 private:
  z_stream z_{};
};

}  // namespace

std::vector<std::uint8_t> inflate_exact(Bytes compressed, std::size_t declared,
                                        std::size_t max_inflated, std::size_t offset) {
  if (declared > max_inflated) {
    throw DecodeError(offset, "compressed term declares " + std::to_string(declared) +
                                  " bytes, above the limit of " + std::to_string(max_inflated));
  }
  if (declared / kMaxDeflateRatio > compressed.size()) {
    throw DecodeError(offset, "compressed term declares " + std::to_string(declared) +
                                  " bytes but only " + std::to_string(compressed.size()) +
                                  " compressed bytes follow");
  }
  if (compressed.size() > UINT_MAX || declared > UINT_MAX) {
    throw DecodeError(offset, "compressed term too large");
  }
  std::vector<std::uint8_t> out(declared);
  InflateStream stream;
  z_stream* z = stream.get();
  z->next_in = const_cast<Bytef*>(compressed.data());
  z->avail_in = static_cast<uInt>(compressed.size());
  // One spare byte lets us notice data that inflates to more than declared.
  std::uint8_t spare = 0;
  z->next_out = declared ? out.data() : &spare;
  z->avail_out = declared ? static_cast<uInt>(declared) : 1;
  int rc = inflate(z, Z_FINISH);
  if (rc == Z_BUF_ERROR && z->avail_out == 0 && declared) {
    z->next_out = &spare;
    z->avail_out = 1;
    rc = inflate(z, Z_FINISH);
    if (z->avail_out == 0) {
      throw DecodeError(offset, "compressed term inflates to more than the declared " +
                                    std::to_string(declared) + " bytes");
    }
  }
  if (rc != Z_STREAM_END) {
    const char* msg = z->msg ? z->msg : "truncated or corrupt zlib data";
    throw DecodeError(offset + (compressed.size() - z->avail_in),
                      std::string("bad compressed term: ") + msg);
  }
  if (z->total_out != declared) {
    throw DecodeError(offset, "compressed term inflates to " + std::to_string(z->total_out) +
                                  " bytes, not the declared " + std::to_string(declared));
  }
  if (z->avail_in != 0) {
    throw DecodeError(offset + (compressed.size() - z->avail_in),
                      std::to_string(z->avail_in) + " bytes after the compressed data");
  }
  return out;
}

std::vector<std::uint8_t> deflate(Bytes data, int level) {
  uLongf bound = compressBound(static_cast<uLong>(data.size()));
  std::vector<std::uint8_t> out(bound);
  if (compress2(out.data(), &bound, data.data(), static_cast<uLong>(data.size()), level) != Z_OK) {
    throw EncodeError("zlib compression failed");
  }
  out.resize(bound);
  return out;
}

}  // namespace etf
