// The Erlang distribution protocol below the messages: sockets, EPMD (register a name, look
// one up) and the OTP 23+ handshake (version 6, 'N' messages, MD5 cookie challenge). No
// Python here; every call blocks, so callers release the GIL around them.
//
// Facts from OTP's "Distribution Protocol" chapter (erts/doc) and kernel's dist_util.erl.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

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

// The accepting side of the handshake. Throws WireError (a wrong cookie included); the
// caller closes the socket.
Peer handshake_accept(int fd, const Self& self);
// The connecting side.
Peer handshake_connect(int fd, const Self& self, const std::string& peer_name);

}  // namespace erpy::node
