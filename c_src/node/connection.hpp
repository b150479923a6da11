// One connection to another node: reading its frames, and its own send queue.
//
// Reading: only the thread holding the reader role (reader_token) reads; the read buffer
// is never zero-filled, and a spawn request may take it over whole.
//
// Sending never waits for the peer: a sender writes the socket itself when no one else is
// writing (no copy, no thread hand-off on the latency path), without holding any lock
// while it writes; frames that arrive meanwhile, or that the socket does not take, wait in
// the queue, and the connection's writer thread writes them as the peer reads. So a peer
// that stops reading holds up its own frames only, never a thread that serves other
// connections. A peer that lets more than `max_backlog` bytes pile up is disconnected.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <poll.h>
#include <string>
#include <vector>

#include "protocol.hpp"
#include "tls.hpp"
#include "wire.hpp"

struct iovec;

namespace erpy::node {

struct Process;

class Connection {
 public:
  // `max_backlog`: bytes waiting for the peer beyond which it is disconnected.
  // `spin_ns`: how long the reader may poll the socket after data before sleeping in
  // recv (0: never). Adaptive: it polls only as long as data recently came within that
  // time, half as long after each poll that found nothing, and not at all for a while
  // after a poll that lost its core to another thread (a busy machine).
  Connection(Fd fd, const InLimits& in, std::size_t max_backlog, std::int64_t spin_ns);
  Connection(const Connection&) = delete;
  Connection& operator=(const Connection&) = delete;

  Fd fd;
  // TLS distribution: every byte of the connection goes through it (set before the
  // connection is shared, never changed after). Null: plain TCP.
  std::unique_ptr<TlsStream> tls;
  Peer peer;
  std::atomic<bool> up{true};
  std::atomic<std::int64_t> last_read{0}, last_write{0};

  // --- reading (the reader role's thread only, except where noted) ---
  // Reader role: only the thread holding the current token reads.
  std::atomic<std::uint64_t> reader_token{0};
  std::atomic<std::int64_t> busy_since{0};  // ns, 0 when no Python job runs
  // The read buffer. rbuf/rcap/rpos/rend belong to the reader.
  std::unique_ptr<std::uint8_t[]> rbuf;
  std::size_t rcap = 0, rpos = 0, rend = 0;
  // Processes given messages from the bytes read so far; woken once per read, not per
  // message (a burst of sends costs one wake-up).
  std::vector<std::shared_ptr<Process>> wake;
  int batch_messages = 0;  // messages delivered from the bytes of the current read
  Reassembler frames;      // headers, fragments, inbound limits
  std::size_t skip = 0;    // bytes of a refused frame still to be read and dropped

  // A whole frame is in the read buffer.
  bool has_frame() const;
  // Bytes wait inside TLS, where poll() on the socket does not see them.
  bool tls_buffered() const { return tls && tls->buffered(); }
  // Reads the next frame, or its start when it is over the limit (`full`: its length; 0
  // for a tick). Blocks; throws WireError when the connection closes.
  void next_frame(std::uint8_t*& data, std::size_t& len, std::size_t& full);

  // --- sending (any thread) ---
  // Writes (or queues) whole frames; never waits for the peer.
  void send(const std::uint8_t* data, std::size_t n);
  void send(const py::ByteBuffer& b) { send(b.data(), b.size()); }
  void sendv(struct iovec* iov, int n);
  // As send(), but first waits while the queue is over its busy mark (without holding
  // any lock: for Python threads sending messages, as OTP suspends a process sending on
  // a busy distribution port). Returns when the connection is down too.
  void send_waiting(const std::uint8_t* data, std::size_t n);
  // Queues a frame without writing: for a sender that holds a lock which orders its
  // frame among others. Returns true when the caller took the writer role and must call
  // drain() once it released that lock.
  [[nodiscard]] bool queue(const std::uint8_t* data, std::size_t n);
  void drain();
  // Bytes waiting for the peer.
  std::size_t backlog() const;

  // Runs on the connection's writer thread until the connection is down.
  void write_backlog();
  // Starts write_backlog() on a thread of its own; set by the core before the first send.
  std::function<void()> start_writer;

  void shutdown() noexcept;

 private:
  // Reads what the socket has into the buffer; false when nothing (flags MSG_DONTWAIT).
  bool recv_some(std::size_t room, int flags);
  bool tls_recv(std::size_t room, int flags);
  // Polls the socket up to spin_budget_; true when data came.
  bool spin(std::size_t room);

  enum class Wrote { kAll, kBlocked, kFailed };
  // Writes what the socket takes now; advances iov past what was written.
  Wrote write_some(struct iovec*& iov, int& n);
  // Appends the unwritten rest of iov (qmu_ held).
  void append_locked(const struct iovec* iov, int n, bool front);
  // Writes the backlog while it holds the writer role; hands it to the writer thread
  // when the socket is full. `writer`: called by the writer thread.
  void drain_loop(bool writer);
  // Hands the writer role to the writer thread (qmu_ held); true when it must be started.
  bool hand_to_writer_locked();
  // The role's holder gives it up and drops the backlog (the connection failed).
  void release_role();
  void fail(const char* why);
  void fail_backlog();

  const std::size_t max_backlog_;
  const std::int64_t spin_ns_;
  std::int64_t spin_budget_;  // the reader's: how long it polls now (<= spin_ns_)
  int spin_cooldown_ = 0;     // the reader's: reads left that sleep at once
  short write_want_ = POLLOUT;  // the writer role's: what a blocked write waits for
  mutable std::mutex qmu_;
  std::condition_variable qcv_;   // the writer waits for work, send_waiting for room
  std::deque<Bytes> backlog_;     // whole frames or their unwritten rest, in order
  std::size_t backlog_bytes_ = 0;  // queued and not written, the front's written part excluded
  std::size_t front_off_ = 0;      // bytes of backlog_.front() already written
  int room_waiters_ = 0;           // threads in send_waiting
  bool writing_ = false;          // a thread holds the writer role (backlog_ is its job)
  bool handed_ = false;           // the writer thread holds it
  bool writer_started_ = false;
};

}  // namespace erpy::node
