#include "core.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>

#include "etf/decode.hpp"

namespace erpy::node {

thread_local const std::shared_ptr<Connection>* Core::inline_conn_ = nullptr;
thread_local std::uint64_t Core::inline_token_ = 0;
thread_local int Core::waiting_reader_ = 0;

// --- lifecycle ------------------------------------------------------------------------------

Core::Core(Options o, py::Codec& codec, py::Runner& runner, PyObject* resolver)
    : opt_(std::move(o)), codec_(codec), procs_(opt_.name, opt_.procs) {
  self_.name = opt_.name;
  self_.cookie = opt_.cookie;
  split_node(self_.name);  // validates
  ref_salt_ = static_cast<std::uint32_t>(now_ns());
  jobs_ = std::make_unique<JobRunner>(
      JobRunner::Options{opt_.slow_ms, opt_.workers}, codec, runner, resolver, procs_,
      [this](std::function<void()> f) { return spawn(std::move(f)); },
      [this](bool force) { wake_watchdog(force); });
}

Core::~Core() {
  // Joined in stop(); a Core dropped without stop() must not leave threads behind.
  stop();
}

void Core::start() {
  auto [lfd, port] = listen_tcp(opt_.listen_host, opt_.port);
  listen_fd_ = std::move(lfd);
  port_ = port;
  auto [efd, creation] = epmd_register(split_node(self_.name).first, port_, opt_.hidden);
  epmd_fd_ = std::move(efd);
  self_.creation = creation;
  if (!opt_.hidden) self_.flags |= dflag::kPublished;
  procs_.set_creation(creation);

  // net_kernel answers net_adm:ping; it is also the sender of messages sent without a
  // process of our own.
  system_ = procs_.spawn();
  system_->sink = true;
  procs_.register_name("net_kernel", system_);

  acceptor_ = std::thread([self = shared_from_this()] { self->acceptor(); });
  ticker_ = std::thread([self = shared_from_this()] { self->ticker(); });
  watchdog_ = std::thread([self = shared_from_this()] { self->watchdog(); });
}

void Core::stop() {
  if (stopping_.exchange(true)) return;
  if (listen_fd_) ::shutdown(listen_fd_.get(), SHUT_RDWR);
  auto shut_all = [&] {
    std::lock_guard lk(mu_);
    for (auto& [_, c] : conns_) c->shutdown();
  };
  shut_all();
  {
    std::lock_guard lk(wd_mu_);
    wd_idle_ = false;
  }
  wd_cv_.notify_all();
  tick_cv_.notify_all();
  jobs_->stop();
  const auto self_id = std::this_thread::get_id();
  auto join = [&](std::thread& t) {
    if (t.joinable()) {
      if (t.get_id() == self_id) t.detach(); else t.join();
    }
  };
  join(acceptor_);
  join(ticker_);
  join(watchdog_);
  for (;;) {
    // Readers may still start handshake, reader or writer threads until they see
    // stopping_.
    std::vector<Worker> threads;
    {
      std::lock_guard lk(threads_mu_);
      threads.swap(threads_);
    }
    if (threads.empty()) break;
    shut_all();
    // Calls still in Python are interrupted (again, until their threads end: a handler
    // may take a while to reach a point where it sees it).
    auto running = [&] {
      return std::any_of(threads.begin(), threads.end(),
                         [&](Worker& w) { return !w.done->load() && w.thread.get_id() != self_id; });
    };
    while (running()) {
      jobs_->interrupt_all();
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    for (auto& w : threads) join(w.thread);
  }
  epmd_fd_.reset();
  listen_fd_.reset();
  {
    std::lock_guard lk(mu_);
    conns_.clear();
  }
  procs_.close_all();
}

template <class F> void Core::spawn_locked(F&& f) {
  std::erase_if(threads_, [](Worker& w) {
    if (!w.done->load()) return false;
    w.thread.join();  // it has returned already
    return true;
  });
  auto done = std::make_shared<std::atomic<bool>>(false);
  threads_.push_back(Worker{std::thread([f = std::forward<F>(f), done]() mutable {
                              f();
                              done->store(true);
                            }),
                            done});
}

bool Core::spawn(std::function<void()> f) {
  std::lock_guard lk(threads_mu_);
  if (stopping_.load()) return false;
  spawn_locked([self = shared_from_this(), f = std::move(f)] { f(); });
  return true;
}

// --- processes ------------------------------------------------------------------------------

Bytes Core::make_ref() {
  const std::uint64_t n = next_ref_++;
  const std::uint32_t ids[3] = {static_cast<std::uint32_t>(n & 0x3FFFF), static_cast<std::uint32_t>(n >> 18),
                                ref_salt_};
  return build([&](auto& s) { etf::put_reference(s, self_.name, procs_.creation(), ids); });
}

void Core::exit_process(const std::shared_ptr<Process>& p, const Bytes& reason) {
  Ended e;
  if (procs_.close(p, e)) signal_ended(p->pid, e, reason);
}

void Core::signal_ended(const Bytes& pid, const Ended& e, const Bytes& reason) {
  for (const Watch& m : e.monitors) {
    send_exit_signal(m.node, kPayloadMonitorPExit, m.target, m.watcher, &m.ref, reason);
  }
  for (const auto& [node, other] : e.links) send_exit_signal(node, kPayloadExit, pid, other, nullptr, reason);
  for (const Watch& m : e.out) {
    // Our monitors of remote processes end with us: tell their nodes.
    if (auto c = existing(m.node)) c->send(control_frame(kDemonitorP, {&pid, &m.watcher, &m.ref}));
  }
}

void Core::send_exit_signal(const std::string& node, int op, const Bytes& from, const Bytes& to,
                            const Bytes* ref, const Bytes& reason) {
  if (auto c = existing(node)) c->send(exit_frame(op, from, to, ref, reason));
}

// --- connections ----------------------------------------------------------------------------

std::shared_ptr<Connection> Core::existing(const std::string& node) {
  std::lock_guard lk(mu_);
  auto it = conns_.find(node);
  return it == conns_.end() ? nullptr : it->second;
}

std::vector<std::string> Core::nodes() {
  std::lock_guard lk(mu_);
  std::vector<std::string> out;
  for (auto& [n, c] : conns_) {
    if (c->up.load()) out.push_back(n);
  }
  return out;
}

std::shared_ptr<Connection> Core::make_connection(Fd fd) {
  auto c = std::make_shared<Connection>(std::move(fd), opt_.in, opt_.max_send_queue,
                                        static_cast<std::int64_t>(opt_.spin_us) * 1000);
  // Its writer thread, for when the peer is slow to read. The connection does not own
  // itself: the thread holds it while it runs.
  c->start_writer = [wk = weak_from_this(), wc = std::weak_ptr<Connection>(c)] {
    auto core = wk.lock();
    auto conn = wc.lock();
    if (core && conn) core->spawn([conn] { conn->write_backlog(); });
  };
  return c;
}

std::shared_ptr<Connection> Core::connection(const std::string& node) {
  if (auto c = existing(node)) return c;
  if (stopping_.load()) throw WireError("node stopped");
  std::lock_guard connecting(connect_mu_);
  if (auto c = existing(node)) return c;
  auto [alive, host] = split_node(node);
  const int port = epmd_port_please(host, alive, 5000);
  if (port < 0) throw WireError("node " + node + " is not registered at " + host + "'s epmd");
  auto c = make_connection(connect_tcp(host, port, 5000));
  if (opt_.tls) {
    try {
      c->tls = std::make_unique<TlsStream>(*opt_.tls, c->fd.get(), false, host, 10000);
      TlsHandshakeIo io(*c->tls, 10000);
      c->peer = handshake_connect(io, self_, node);
    } catch (const WireError& e) {
      // A certificate the CA did not sign, another cookie: refused, and said so.
      std::fprintf(stderr, "erpy.node %s: TLS connection to %s refused: %s\n", self_.name.c_str(), node.c_str(),
                   e.what());
      throw;
    }
  } else {
    c->peer = handshake_connect(c->fd.get(), self_, node);
  }
  add_connection(c);
  return c;
}

void Core::add_connection(const std::shared_ptr<Connection>& c) {
  c->last_read.store(now_ns());
  c->last_write.store(now_ns());
  std::shared_ptr<Connection> old;
  {
    std::lock_guard lk(mu_);
    auto& slot = conns_[c->peer.name];
    old = std::move(slot);
    slot = c;
  }
  if (old) {
    // The node reconnected before we saw its old connection go: what hung on the old one
    // (calls, monitors, links) goes now, before the new one's reader makes any of its own.
    old->shutdown();
    jobs_->connection_down(old.get());
    procs_.node_down(c->peer.name);
  }
  start_reader(c);
}

void Core::start_reader(const std::shared_ptr<Connection>& c) {
  const std::uint64_t token = c->reader_token.load();
  spawn([self = shared_from_this(), c, token] { self->reader(c, token); });
}

void Core::acceptor() {
  while (!stopping_.load()) {
    const int fd = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (stopping_.load()) return;
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    auto c = make_connection(Fd(fd));
    // The handshake runs on the connection's own thread, so a slow peer blocks no one.
    const bool started = spawn([self = shared_from_this(), c] {
      try {
        if (self->opt_.tls) {
          c->tls = std::make_unique<TlsStream>(*self->opt_.tls, c->fd.get(), true, std::string(), 10000);
          TlsHandshakeIo io(*c->tls, 10000);
          c->peer = handshake_accept(io, self->self_);
        } else {
          c->peer = handshake_accept(c->fd.get(), self->self_);
        }
      } catch (const std::exception& e) {
        // A wrong cookie, a certificate the CA did not sign, a broken peer: the socket
        // closes with `c`.
        std::fprintf(stderr, "erpy.node %s: %s%s\n", self->self_.name.c_str(),
                     self->opt_.tls ? "TLS connection refused: " : "", e.what());
        return;
      }
      self->add_connection(c);
    });
    if (!started) return;
  }
}

void Core::ticker() {
  const std::int64_t tick = static_cast<std::int64_t>(opt_.ticktime) * 1'000'000'000 / 4;
  std::unique_lock lk(wd_mu_);
  while (!stopping_.load()) {
    tick_cv_.wait_for(lk, std::chrono::nanoseconds(tick));
    if (stopping_.load()) return;
    std::vector<std::shared_ptr<Connection>> cs;
    {
      std::lock_guard ml(mu_);
      for (auto& [_, c] : conns_) cs.push_back(c);
    }
    lk.unlock();
    const std::int64_t now = now_ns();
    for (auto& c : cs) {
      if (now - c->last_read.load() > 4 * tick + tick / 2) {
        c->shutdown();  // silent for a whole ticktime: the node is gone
        continue;
      }
      // A tick behind frames the peer has not read yet would tell it nothing new.
      if (now - c->last_write.load() >= tick && c->backlog() == 0) {
        static const std::uint8_t zero[4] = {0, 0, 0, 0};
        c->send(zero, 4);
      }
    }
    keep_registered();
    lk.lock();
  }
}

// EPMD forgets a node when the node's connection to it closes (EPMD restarted, or killed
// and started again): then nodes could no longer find this one, so it registers again at
// the next tick, and at every tick after that until EPMD is back. The node's creation
// stays what it was: peers learn it in the handshake, not from EPMD. (Stock Erlang nodes
// do not do this; they stay unreachable by name until restarted.)
void Core::keep_registered() {
  if (epmd_fd_) {
    // EPMD sends nothing after its answer to the registration: readable means closed.
    pollfd p{epmd_fd_.get(), POLLIN, 0};
    if (::poll(&p, 1, 0) <= 0) return;
    epmd_fd_.reset();
  }
  try {
    epmd_fd_ = epmd_register(split_node(self_.name).first, port_, opt_.hidden).first;
  } catch (const std::exception&) {
    // Not back yet (or the name is taken meanwhile): the next tick tries again.
  }
}

void Core::wake_watchdog(bool force) {
  if (!force && !wd_idle_.load()) return;
  {
    std::lock_guard lk(wd_mu_);
    wd_idle_ = false;
  }
  wd_cv_.notify_all();
}

void Core::watchdog() {
  const std::int64_t slow = static_cast<std::int64_t>(opt_.slow_ms) * 1'000'000;
  std::int64_t last_busy = now_ns();
  std::unique_lock lk(wd_mu_);
  while (!stopping_.load()) {
    auto any_busy = [&] {
      std::lock_guard ml(mu_);
      for (auto& [_, c] : conns_) {
        if (c->busy_since.load()) return true;
      }
      return false;
    };
    if (now_ns() - last_busy > 200'000'000) {
      // Idle: sleep until a reader starts a Python job (it wakes us only in this state).
      wd_idle_ = true;
      wd_cv_.wait(lk, [&] { return !wd_idle_.load() || stopping_.load() || any_busy(); });
      wd_idle_ = false;
      last_busy = now_ns();
    } else {
      wd_cv_.wait_for(lk, std::chrono::nanoseconds(slow / 2));
    }
    if (stopping_.load()) return;
    std::vector<std::shared_ptr<Connection>> cs;
    {
      std::lock_guard ml(mu_);
      for (auto& [_, c] : conns_) cs.push_back(c);
    }
    const std::int64_t now = now_ns();
    lk.unlock();
    const bool jobs = jobs_->tend(now);
    lk.lock();
    if (jobs) last_busy = now;
    for (auto& c : cs) {
      const std::int64_t b = c->busy_since.load();
      if (!b) continue;
      last_busy = now;
      if (now - b < slow) continue;
      // The reader is stuck in a slow handler: the connection gets a new reader, the old
      // thread finishes its job and leaves.
      c->busy_since.store(0);
      c->reader_token.fetch_add(1);
      handovers.fetch_add(1, std::memory_order_relaxed);
      lk.unlock();
      start_reader(c);
      lk.lock();
    }
  }
}

void Core::yield_reader() {
  const std::shared_ptr<Connection>* cp = inline_conn_;
  if (!cp) return;
  const std::shared_ptr<Connection>& c = *cp;
  bool current;
  {
    // As the watchdog does (under the same lock, so that only one of us hands over).
    std::lock_guard lk(wd_mu_);
    if (c->reader_token.load() != inline_token_ || !c->busy_since.load()) return;
    c->busy_since.store(0);
    c->reader_token.fetch_add(1);
    // Only a connection still in use gets a reader (a new reader of one that was
    // replaced would take the new one's monitors down with it).
    std::lock_guard ml(mu_);
    auto it = conns_.find(c->peer.name);
    current = it != conns_.end() && it->second == c;
  }
  inline_conn_ = nullptr;
  handovers.fetch_add(1, std::memory_order_relaxed);
  if (current) start_reader(c);
}

void Core::wait_message(Process& p, const JobRunner::WaitScope& scope,
                        std::chrono::steady_clock::time_point until) {
  if (inline_conn_ && read_while_waiting(p, scope, until)) return;
  // Not a reader (a worker, a Python thread), or one that cannot read here: the reader
  // of the connection delivers the message and wakes us. A reader that cannot read here
  // hands its connection to another thread first, or the message may never be read.
  yield_reader();
  std::unique_lock lk(p.mu);
  p.cv.wait_until(lk, until, [&] { return !p.queue.empty() || p.closed || scope.cancelled(); });
}

bool Core::read_while_waiting(Process& p, const JobRunner::WaitScope& scope,
                              std::chrono::steady_clock::time_point until) {
  const std::shared_ptr<Connection>& c = *inline_conn_;
  const std::uint64_t token = inline_token_;
  Waker& waker = Waker::mine();
  {
    std::lock_guard lk(p.mu);
    if (p.waker) return false;  // another reader waits for this mailbox (rare): it reads
    p.waker = &waker;
  }
  bool reader;
  {
    // Out of Python: the watchdog leaves the connection to this thread (under its lock,
    // so it cannot be handing the connection over meanwhile).
    std::lock_guard lk(wd_mu_);
    reader = c->reader_token.load() == token;
    if (reader) c->busy_since.store(0);
  }
  if (!reader) {
    std::lock_guard lk(p.mu);
    p.waker = nullptr;
    return false;
  }
  ++waiting_reader_;
  auto ready = [&] {
    std::lock_guard lk(p.mu);
    return !p.queue.empty() || p.closed || scope.cancelled();
  };
  try {
    while (!ready()) {
      const auto now = std::chrono::steady_clock::now();
      if (now >= until || stopping_.load()) break;
      if (!c->has_frame() && !c->tls_buffered()) {
        if (!c->wake.empty()) ProcessTable::flush(c->wake);
        c->batch_messages = 0;  // no coalescing: someone waits
        // The socket, or the mailbox woken from elsewhere (another connection's reader,
        // a Python thread, a cancel).
        pollfd fds[2] = {{c->fd.get(), POLLIN, 0}, {waker.fd(), POLLIN, 0}};
        const auto left = std::chrono::duration_cast<std::chrono::nanoseconds>(until - now).count();
        const timespec ts{static_cast<time_t>(left / 1'000'000'000), static_cast<long>(left % 1'000'000'000)};
        if (::ppoll(fds, 2, &ts, nullptr) <= 0) continue;
        if (fds[1].revents) waker.drain();
        if (!fds[0].revents) continue;
      }
      read_frame(c, token);
    }
  } catch (const std::exception& e) {
    reader_lost(c, token, e);
    c->reader_token.fetch_add(1);  // the reader loop above us ends quietly
  }
  --waiting_reader_;
  {
    std::lock_guard lk(p.mu);
    p.waker = nullptr;
  }
  waker.drain();  // a wake-up that came as we left must not end the next wait at once
  if (!c->wake.empty()) ProcessTable::flush(c->wake);
  // Back into Python, on the reader: the watchdog watches the call again.
  if (c->reader_token.load() == token) {
    c->busy_since.store(now_ns());
    wake_watchdog(false);
  }
  return true;
}

void Core::connection_down(const std::shared_ptr<Connection>& c) {
  c->shutdown();
  bool current = false;
  {
    std::lock_guard lk(mu_);
    auto it = conns_.find(c->peer.name);
    if (it != conns_.end() && it->second == c) {
      conns_.erase(it);
      current = true;
    }
  }
  jobs_->connection_down(c.get());
  // A connection a newer one replaced was taken down then (add_connection): the node's
  // monitors and links now belong to the new one and stay.
  if (current) procs_.node_down(c->peer.name);
}

// --- reading --------------------------------------------------------------------------------

void Core::reader(std::shared_ptr<Connection> c, std::uint64_t token) {
  try {
    while (c->reader_token.load() == token && !stopping_.load()) {
      if (!c->has_frame() && !c->tls_buffered()) {
        if (!c->wake.empty()) ProcessTable::flush(c->wake);
        // Messages are streaming in (this read held several): let the next read gather
        // more of them. A lone message or call never waits here.
        if (c->batch_messages >= 2 && opt_.coalesce_us > 0) {
          std::this_thread::sleep_for(std::chrono::microseconds(opt_.coalesce_us));
        }
        c->batch_messages = 0;
      }
      read_frame(c, token);
    }
  } catch (const std::exception& e) {
    reader_lost(c, token, e);
  }
}

void Core::read_frame(const std::shared_ptr<Connection>& c, std::uint64_t token) {
  std::uint8_t* data;
  std::size_t len, full;
  c->next_frame(data, len, full);
  if (full == 0) return;  // a tick
  Incoming in = c->frames.feed({data, len}, full);
  if (in.kind == Incoming::kMessage) {
    handle_message(c, in.data, in.atoms, token, in.owned.empty() ? nullptr : &in.owned);
  } else if (in.kind == Incoming::kRefused) {
    handle_refused(c, in);
  }
}

void Core::reader_lost(const std::shared_ptr<Connection>& c, std::uint64_t token, const std::exception& e) {
  ProcessTable::flush(c->wake);
  if (c->reader_token.load() != token) return;
  c->frames.clear();  // unfinished fragmented messages go with the connection
  if (!stopping_.load() && std::strcmp(e.what(), "connection closed") != 0) {
    std::fprintf(stderr, "erpy.node %s: connection to %s lost: %s\n", self_.name.c_str(),
                 c->peer.name.c_str(), e.what());
  }
  connection_down(c);
}

void Core::handle_refused(const std::shared_ptr<Connection>& c, const Incoming& in) {
  refused.fetch_add(1, std::memory_order_relaxed);
  const InLimits& lim = c->frames.limits();
  Bytes why;
  {
    BytesSink s{why};
    etf::put_tuple_header(s, 3);
    if (in.why == Incoming::kTooLarge) {
      etf::put_atom(s, "message_too_large");
      etf::put_integer(s, static_cast<std::int64_t>(in.size));
      etf::put_integer(s, static_cast<std::int64_t>(lim.max_message));
      std::fprintf(stderr, "erpy.node %s: refused a message of %zu bytes or more from %s (max_message_size %zu)\n",
                   self_.name.c_str(), in.size, c->peer.name.c_str(), lim.max_message);
    } else {
      etf::put_atom(s, "fragment_limit");
      etf::put_integer(s, static_cast<std::int64_t>(lim.max_pending));
      etf::put_integer(s, static_cast<std::int64_t>(lim.max_pending_bytes));
      std::fprintf(stderr,
                   "erpy.node %s: refused a fragmented message from %s: the connection's unfinished "
                   "ones are at their limit (%zu messages, %zu bytes)\n",
                   self_.name.c_str(), c->peer.name.c_str(), lim.max_pending, lim.max_pending_bytes);
    }
  }
  // A spawn request (an rpc) is answered all the same: its caller must not wait forever.
  jobs_->answer_refused(*c, in, why);
}

// --- control messages ------------------------------------------------------------------------

struct Core::Message {
  const std::shared_ptr<Connection>& conn;
  const etf::Tuple& ctl;
  etf::Bytes payload;
  int op;
  std::uint64_t token;
  Bytes* owner;

  const std::vector<etf::Term>& it() const { return ctl.items; }
  const std::string& peer() const { return conn->peer.name; }
  void need(std::size_t n) const {
    if (ctl.items.size() < n) throw WireError("control message " + std::to_string(op) + " too short");
  }
  // The payload as a mailbox message (version byte first).
  Bytes payload_msg() const {
    Bytes b;
    b.reserve(payload.size() + 1);
    if (payload.empty() || payload[0] != 131) b.push_back(131);
    b.insert(b.end(), payload.begin(), payload.end());
    return b;
  }
  // The payload without its version byte (a reason).
  Bytes payload_term() const {
    etf::Bytes p = payload;
    if (!p.empty() && p[0] == 131) p = p.subspan(1);
    return Bytes(p.begin(), p.end());
  }
};

std::shared_ptr<Process> Core::local(const etf::Term& t) {
  if (const auto* pid = std::get_if<etf::Pid>(&t.v)) {
    if (pid->node == self_.name) return procs_.find(pid->id);
    return nullptr;
  }
  if (const auto* a = atom_of(t)) return procs_.whereis(*a);
  return nullptr;
}

void Core::handle_message(const std::shared_ptr<Connection>& c, etf::Bytes msg,
                          std::span<const std::string> cache, std::uint64_t token, Bytes* owner) {
  etf::Reader r(msg);
  if (r.peek_u8() == 131) r.u8();
  etf::TermBuilder tb;
  etf::DecodeOptions o;
  o.atom_cache = cache;
  etf::Term ctl_term = etf::decode_term(r, tb, o);
  const auto* ctl = std::get_if<etf::Tuple>(&ctl_term.v);
  if (!ctl || ctl->items.empty()) throw WireError("control message is not a tuple");
  Message m{c, *ctl, msg.subspan(r.pos()), static_cast<int>(int_of(ctl->items[0])), token, owner};

  switch (m.op) {
    case kSend:
    case kSendTT:
    case kSendSender:
    case kSendSenderTT:
      return on_send(m);
    case kRegSend:
    case kRegSendTT:
      return on_reg_send(m);
    case kLink:
      return on_link(m);
    case kUnlink:
      m.need(3);
      if (auto p = local(m.it()[2])) procs_.remove_link(p, enc(m.it()[1]));
      return;
    case kUnlinkId:
      return on_unlink_id(m);
    case kExit:
    case kExitTT:
    case kPayloadExit:
    case kPayloadExitTT:
    case kExit2:
    case kExit2TT:
    case kPayloadExit2:
    case kPayloadExit2TT:
      return on_exit(m);
    case kMonitorP:
      return on_monitor(m);
    case kDemonitorP:
      return on_demonitor(m);
    case kMonitorPExit:
    case kPayloadMonitorPExit:
      return on_monitor_exit(m);
    case kSpawnRequest:
    case kSpawnRequestTT:
      return on_spawn_request(m);
    case kSpawnReply:
    case kSpawnReplyTT:
      return on_spawn_reply(m);
    case kAliasSend:
    case kAliasSendTT:  // erpy makes no aliases
    case kUnlinkIdAck:
    case kGroupLeader:
    default:
      return;  // unknown operations are ignored, as OTP does for ones it does not use
  }
}

void Core::on_send(Message& m) {
  m.need(3);
  if (auto p = local(m.it()[2])) procs_.deliver(p, m.payload_msg(), &m.conn->wake);
  ++m.conn->batch_messages;
}

void Core::on_reg_send(Message& m) {
  m.need(4);
  const std::string* name = atom_of(m.it()[3]);
  if (!name) return;
  if (*name == "net_kernel") {
    on_net_kernel(*m.conn, m.payload);
  } else if (auto p = procs_.whereis(*name)) {
    procs_.deliver(p, m.payload_msg(), &m.conn->wake);
    ++m.conn->batch_messages;
  }
}

void Core::on_link(Message& m) {
  m.need(3);
  const auto& it = m.it();
  bool full = false;
  auto p = local(it[2]);
  if (p && procs_.add_remote_link(p, m.peer(), enc(it[1]), full)) return;
  send_exit_signal(m.peer(), kPayloadExit, enc(it[2]), enc(it[1]), nullptr,
                   enc_atom(full ? "system_limit" : "noproc"));
}

void Core::on_unlink_id(Message& m) {
  m.need(4);
  const auto& it = m.it();
  if (auto p = local(it[3])) procs_.remove_link(p, enc(it[2]));
  py::ByteBuffer b;
  Frame f(b);
  etf::put_tuple_header(b, 4);
  etf::put_integer(b, kUnlinkIdAck);
  etf::put_term(b, it[1]);
  etf::put_term(b, it[3]);
  etf::put_term(b, it[2]);
  f.end();
  m.conn->send(b);
}

void Core::on_exit(Message& m) {
  m.need(3);
  const auto& it = m.it();
  const int op = m.op;
  auto p = local(it[2]);
  const auto* pid = std::get_if<etf::Pid>(&it[2].v);
  if (!p && !(pid && pid->node == self_.name)) return;
  const Bytes from = enc(it[1]);
  Bytes reason;
  if (op == kExit || op == kExit2) {
    m.need(4);
    reason = enc(it[3]);
  } else if (op == kExitTT || op == kExit2TT) {
    m.need(5);
    reason = enc(it[4]);
  } else {
    reason = m.payload_term();
  }
  if (!p) {
    // To a call in progress: a linked caller died, or exit(Pid, Reason). Any reason but
    // normal ends it (kill ends it as killed).
    if (reason != enc_atom("normal")) {
      const Bytes why = reason == enc_atom("kill") ? enc_atom("killed") : reason;
      jobs_->cancel(pid->id, nullptr, &why);
    }
    return;
  }
  if (op == kExit || op == kExitTT || op == kPayloadExit || op == kPayloadExitTT) procs_.remove_link(p, from);
  const Bytes exit = enc_atom("EXIT");
  procs_.deliver(p, message_tuple({&exit, &from, &reason}));
}

void Core::on_monitor(Message& m) {
  m.need(4);
  const auto& it = m.it();
  auto p = local(it[2]);
  Watch w{m.peer(), enc(it[1]), enc(it[3]), enc(it[2])};
  const Bytes ref = w.ref;
  bool full = false;
  if (p && procs_.add_monitor(p, std::move(w), full)) return;
  send_exit_signal(m.peer(), kPayloadMonitorPExit, enc(it[2]), enc(it[1]), &ref,
                   enc_atom(full ? "system_limit" : "noproc"));
}

void Core::on_demonitor(Message& m) {
  m.need(4);
  const auto& it = m.it();
  if (auto p = local(it[2])) {
    procs_.remove_monitor(p, enc(it[3]));
  } else if (const auto* pid = std::get_if<etf::Pid>(&it[2].v); pid && pid->node == self_.name) {
    // A call's caller timed out or died: its node takes the monitor back.
    const Bytes ref = enc(it[3]);
    jobs_->cancel(pid->id, &ref, nullptr);
  }
}

void Core::on_monitor_exit(Message& m) {
  m.need(4);
  const auto& it = m.it();
  auto p = local(it[2]);
  if (!p) return;
  const Bytes ref = enc(it[3]);
  Bytes object = procs_.take_out_monitor(p, ref);
  if (object.empty()) object = enc(it[1]);
  Bytes reason;
  if (m.op == kMonitorPExit) {
    m.need(5);
    reason = enc(it[4]);
  } else {
    reason = m.payload_term();
  }
  const Bytes down = enc_atom("DOWN"), process = enc_atom("process");
  procs_.deliver(p, message_tuple({&down, &ref, &process, &object, &reason}));
}

void Core::on_spawn_request(Message& m) {
  m.need(6);
  const auto& c = m.conn;
  std::optional<JobRunner::Job> job = jobs_->accept(*c, m.ctl, m.payload, m.owner);
  if (!job) return;
  ProcessTable::flush(c->wake);
  // This thread reads while a call of its own waits (wait_message): it must not start
  // another call under that one.
  if (waiting_reader_ > 0) {
    jobs_->dispatch(c, *job, true);
    return;
  }
  // More requests already read and waiting: let a worker run this one so they run in
  // parallel as far as the GIL allows (handlers doing I/O or native work release it).
  // Alone, the reader runs it itself: no thread hand-off on the latency path.
  if (c->has_frame() && jobs_->dispatch(c, *job)) return;
  c->busy_since.store(now_ns());
  wake_watchdog(false);
  inline_conn_ = &c;
  inline_token_ = m.token;
  jobs_->run(c, *job);
  inline_conn_ = nullptr;
  if (c->reader_token.load() == m.token) c->busy_since.store(0);
}

void Core::on_spawn_reply(Message& m) {
  m.need(5);
  const auto& it = m.it();
  auto p = local(it[2]);
  if (!p) return;
  const std::int64_t flags = int_of(it[3]);
  const Bytes req = enc(it[1]), result = enc(it[4]);
  const bool ok = std::holds_alternative<etf::Pid>(it[4].v);
  if (ok && (flags & 2)) procs_.record_out_monitor(p, Watch{m.peer(), result, req, result});
  if (ok && (flags & 1)) procs_.add_link(p, m.peer(), result);
  const Bytes tag = enc_atom("spawn_reply"), status = enc_atom(ok ? "ok" : "error");
  procs_.deliver(p, message_tuple({&tag, &req, &status, &result}));
}

void Core::on_net_kernel(Connection& c, etf::Bytes payload) {
  // {'$gen_call', {From, Tag}, {is_auth, Node}}: net_adm:ping. Answer yes.
  etf::Term msg;
  try {
    etf::Reader r(payload);
    if (r.peek_u8() == 131) r.u8();
    etf::TermBuilder tb;
    msg = etf::decode_term(r, tb);
  } catch (const std::exception&) {
    return;
  }
  const auto* t = std::get_if<etf::Tuple>(&msg.v);
  if (!t || t->items.size() != 3) return;
  const std::string* tag0 = atom_of(t->items[0]);
  const auto* from = std::get_if<etf::Tuple>(&t->items[1].v);
  if (!tag0 || *tag0 != "$gen_call" || !from || from->items.size() != 2) return;
  const etf::Term& pid = from->items[0];
  const etf::Term& tag = from->items[1];
  py::ByteBuffer b;
  Frame f(b);
  // Since OTP 24 the tag may be [alias | Ref]: the reply goes to the alias.
  const auto* l = std::get_if<etf::List>(&tag.v);
  const bool alias = l && l->tail && !l->items.empty() && atom_of(l->items[0]) &&
                     *atom_of(l->items[0]) == "alias";
  etf::put_tuple_header(b, 3);
  etf::put_integer(b, alias ? kAliasSend : kSendSender);
  etf::put_raw(b, system_->pid);
  etf::put_term(b, alias ? *l->tail : pid);
  f.payload();
  etf::put_tuple_header(b, 2);
  etf::put_term(b, tag);
  etf::put_atom(b, "yes");
  f.end();
  c.send(b);
}

}  // namespace erpy::node
