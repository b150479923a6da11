// The Erlang distribution protocol below the messages: sockets, EPMD (register a name, look
// one up) and the OTP 23+ handshake (version 6, 'N' messages, MD5 cookie challenge). No
// Python here; every call blocks, so callers release the GIL around them.
//
// Facts from OTP's "Distribution Protocol" chapter (erts/doc) and kernel's dist_util.erl.
#pragma once
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace erpy::node {

// Distribution capability flags (kernel/include/dist.hrl).
namespace dflag {
inline constexpr std::uint64_t kPublished = 0x01;
inline constexpr std::uint64_t kExtendedReferences = 0x04;
inline constexpr std::uint64_t kDistMonitor = 0x08;
inline constexpr std::uint64_t kFunTags = 0x10;
inline constexpr std::uint64_t kDistMonitorName = 0x20;
inline constexpr std::uint64_t kNewFunTags = 0x80;
inline constexpr std::uint64_t kExtendedPidsPorts = 0x100;
inline constexpr std::uint64_t kExportPtrTag = 0x200;
inline constexpr std::uint64_t kBitBinaries = 0x400;
inline constexpr std::uint64_t kNewFloats = 0x800;
inline constexpr std::uint64_t kUnicodeIo = 0x1000;
inline constexpr std::uint64_t kSmallAtomTags = 0x4000;
inline constexpr std::uint64_t kUtf8Atoms = 0x10000;
inline constexpr std::uint64_t kMapTag = 0x20000;
inline constexpr std::uint64_t kBigCreation = 0x40000;
inline constexpr std::uint64_t kSendSender = 0x80000;
inline constexpr std::uint64_t kBigSeqtraceLabels = 0x100000;
inline constexpr std::uint64_t kExitPayload = 0x400000;
inline constexpr std::uint64_t kFragments = 0x800000;
inline constexpr std::uint64_t kHandshake23 = 0x1000000;
inline constexpr std::uint64_t kUnlinkId = 0x2000000;
inline constexpr std::uint64_t kMandatory25Digest = 0x4000000;
inline constexpr std::uint64_t kSpawn = 1ull << 32;
inline constexpr std::uint64_t kV4Nc = 1ull << 34;
inline constexpr std::uint64_t kAlias = 1ull << 35;

// What erpy's node offers. No atom cache (DFLAG_DIST_HDR_ATOM_CACHE): payloads then never
// hold ATOM_CACHE_REF and go to the Python codec as they are.
inline constexpr std::uint64_t kOurs =
    kExtendedReferences | kDistMonitor | kFunTags | kDistMonitorName | kNewFunTags |
    kExtendedPidsPorts | kExportPtrTag | kBitBinaries | kNewFloats | kUnicodeIo | kSmallAtomTags |
    kUtf8Atoms | kMapTag | kBigCreation | kSendSender | kBigSeqtraceLabels | kExitPayload |
    kFragments | kHandshake23 | kUnlinkId | kMandatory25Digest | kSpawn | kV4Nc | kAlias;
// What we need from the other side (OTP 25 offers all of it).
inline constexpr std::uint64_t kRequired = kExtendedReferences | kExtendedPidsPorts | kUtf8Atoms |
                                           kMapTag | kBigCreation | kHandshake23 | kNewFloats;
}  // namespace dflag

struct WireError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An owned file descriptor, closed on every path.
class Fd {
 public:
  Fd() noexcept = default;
  explicit Fd(int fd) noexcept : fd_(fd) {}
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    if (this != &o) {
      reset();
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() { reset(); }
  int get() const noexcept { return fd_; }
  explicit operator bool() const noexcept { return fd_ >= 0; }
  void reset() noexcept;

 private:
  int fd_ = -1;
};

void write_all(int fd, const void* data, std::size_t n);
// Reads exactly n bytes; throws WireError on EOF or error.
void read_exact(int fd, void* data, std::size_t n);

// Splits "name@host" into its parts.
std::pair<std::string, std::string> split_node(std::string_view node);

// A listening TCP socket on host:port (port 0: any); returns the socket and its port.
std::pair<Fd, int> listen_tcp(const std::string& host, int port);
Fd connect_tcp(const std::string& host, int port, int timeout_ms);

// Registers `alive` at the local EPMD (ALIVE2_REQ); the registration lasts while the
// returned socket stays open. Returns the socket and the creation EPMD assigned.
std::pair<Fd, std::uint32_t> epmd_register(const std::string& alive, int port, bool hidden);
// The distribution port of `alive` at `host`'s EPMD (PORT_PLEASE2_REQ); -1 if not registered.
int epmd_port_please(const std::string& host, const std::string& alive, int timeout_ms);

struct Peer {
  std::string name;
  std::uint64_t flags = 0;
  std::uint32_t creation = 0;
};

struct Self {
  std::string name;
  std::string cookie;
  std::uint32_t creation = 0;
  std::uint64_t flags = dflag::kOurs;
};

// Where the distribution handshake reads and writes: the socket itself (2-byte lengths),
// or TLS over it (4-byte lengths, as inet_tls_dist). Both throw WireError.
class HandshakeIo {
 public:
  explicit HandshakeIo(int header) : header(header) {}
  virtual ~HandshakeIo() = default;
  virtual void write_all(const void* data, std::size_t n) = 0;
  virtual void read_exact(void* data, std::size_t n) = 0;
  const int header;  // bytes of a handshake message's length
};

// The accepting side of the handshake. Throws WireError (a wrong cookie included); the
// caller closes the socket.
Peer handshake_accept(int fd, const Self& self);
Peer handshake_accept(HandshakeIo& io, const Self& self);
// The connecting side.
Peer handshake_connect(int fd, const Self& self, const std::string& peer_name);
Peer handshake_connect(HandshakeIo& io, const Self& self, const std::string& peer_name);

using Bytes = std::vector<std::uint8_t>;

// What one connection may make this node hold for the messages it receives.
struct InLimits {
  // One message: a frame, or the fragments of a fragmented message together (bytes after
  // the distribution headers; a frame counts whole).
  std::size_t max_message = std::size_t{64} << 20;
  // Fragmented messages begun and not finished, and their bytes together.
  std::size_t max_pending = 1024;
  std::size_t max_pending_bytes = std::size_t{256} << 20;
};

// Of a refused message only its start is kept: enough for the control message (to answer
// a spawn request), never the whole.
inline constexpr std::size_t kRefusedHead = 64 * 1024;

// What one frame amounts to.
struct Incoming {
  enum Kind { kNothing, kMessage, kRefused } kind = kNothing;
  enum Why { kTooLarge, kPendingLimit } why = kTooLarge;
  // kMessage: the message (control message, then payload); kRefused: its start. A span of
  // the frame, or of `owned` (a reassembled message, or what is left of a refused one).
  std::span<const std::uint8_t> data;
  Bytes owned;
  std::vector<std::string> atoms;  // the atom cache references of its header
  std::size_t size = 0;            // kRefused: its size in bytes (so far, if fragmented)
};

// Distribution headers and fragmented messages (DIST_FRAG_HEADER/CONT, OTP 22+) of one
// connection, within InLimits: a message over max_message, or a fragmented one that would
// take the connection over max_pending or max_pending_bytes, is refused and its bytes
// freed (the rest of its fragments are skipped as they come). Malformed frames throw
// WireError or etf::DecodeError: the connection is closed.
class Reassembler {
 public:
  void set_limits(const InLimits& l) { lim_ = l; }
  const InLimits& limits() const { return lim_; }
  // `frame`: a frame's bytes after its length. `full`: the frame's length when only its
  // start was read (a frame over max_message is not read whole), else frame.size().
  Incoming feed(std::span<const std::uint8_t> frame, std::size_t full);
  std::size_t pending() const { return partial_.size(); }
  std::size_t pending_bytes() const { return bytes_; }
  void clear();

 private:
  struct Partial {
    Bytes data;
    std::vector<std::string> atoms;
  };
  Incoming refuse(Incoming in, Incoming::Why why, std::size_t size);
  Incoming drop(std::unordered_map<std::uint64_t, Partial>::iterator it, Incoming::Why why,
                std::size_t size);

  InLimits lim_;
  std::unordered_map<std::uint64_t, Partial> partial_;  // by sequence id
  std::size_t bytes_ = 0;
  std::vector<std::string> atom_cache_ = std::vector<std::string>(2048);
};

}  // namespace erpy::node
