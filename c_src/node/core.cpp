#include "core.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <optional>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>

#include "common/cpu_relax.hpp"
#include "etf/decode.hpp"

namespace erpy::node {

using py::GilHold;
using py::PyRef;
using py::PythonError;

std::int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

namespace {

template <class F> Bytes build(F&& f) {
  Bytes out;
  BytesSink s{out};
  f(s);
  return out;
}

Bytes enc(const etf::Term& t) {
  return build([&](auto& s) { etf::put_term(s, t); });
}

Bytes enc_atom(std::string_view a) {
  return build([&](auto& s) { etf::put_atom(s, a); });
}

// A message for a mailbox (version byte first) from encoded parts: a tuple of them.
Bytes message_tuple(std::initializer_list<const Bytes*> parts) {
  Bytes out{131};
  BytesSink s{out};
  etf::put_tuple_header(s, parts.size());
  for (const Bytes* p : parts) out.insert(out.end(), p->begin(), p->end());
  return out;
}

const std::string* atom_of(const etf::Term& t) {
  const auto* a = std::get_if<etf::Atom>(&t.v);
  return a ? &a->name : nullptr;
}

std::int64_t int_of(const etf::Term& t) {
  const auto* i = std::get_if<std::int64_t>(&t.v);
  return i ? *i : -1;
}

// A Python thread state kept for the life of a C++ thread, so that taking the GIL there
// is cheap (PyGILState_Ensure on a thread without one creates and destroys one each time).
class ThreadState {
 public:
  ThreadState() : gstate_(PyGILState_Ensure()), saved_(PyEval_SaveThread()) {}
  ~ThreadState() {
    if (!Py_IsInitialized()) return;
    PyEval_RestoreThread(saved_);
    PyGILState_Release(gstate_);
  }
  ThreadState(const ThreadState&) = delete;
  ThreadState& operator=(const ThreadState&) = delete;

 private:
  PyGILState_STATE gstate_;
  PyThreadState* saved_;
};

void ensure_thread_state() {
  thread_local std::optional<ThreadState> ts;
  if (!ts) ts.emplace();
}

}  // namespace

// --- Connection -------------------------------------------------------------------------

void Connection::send(const std::uint8_t* data, std::size_t n) {
  iovec v{const_cast<std::uint8_t*>(data), n};
  sendv(&v, 1);
}

void Connection::sendv(iovec* iov, int n) {
  std::lock_guard lk(wmu);
  if (!up.load()) return;
  while (n > 0) {
    msghdr m{};
    m.msg_iov = iov;
    m.msg_iovlen = static_cast<std::size_t>(n);
    const ssize_t w = ::sendmsg(fd.get(), &m, MSG_NOSIGNAL);
    if (w < 0) {
      if (errno == EINTR) continue;
      up.store(false);
      ::shutdown(fd.get(), SHUT_RDWR);  // the reader notices and takes the connection down
      return;
    }
    std::size_t done = static_cast<std::size_t>(w);
    while (n > 0 && done >= iov->iov_len) {
      done -= iov->iov_len;
      ++iov;
      --n;
    }
    if (n > 0) {
      iov->iov_base = static_cast<std::uint8_t*>(iov->iov_base) + done;
      iov->iov_len -= done;
    }
  }
  last_write.store(now_ns());
}

void Connection::shutdown() noexcept {
  up.store(false);
  if (fd) ::shutdown(fd.get(), SHUT_RDWR);
}

// --- Core: lifecycle ----------------------------------------------------------------------

Core::Core(Options o, py::Codec& codec, PyObject* resolver, PyObject* error_formatter)
    : opt_(std::move(o)), codec_(codec), resolver_(PyRef::borrow(resolver)),
      error_formatter_(PyRef::borrow(error_formatter)) {
  self_.name = opt_.name;
  self_.cookie = opt_.cookie;
  split_node(self_.name);  // validates
  ref_salt_ = static_cast<std::uint32_t>(now_ns());
  spin_ns_ = static_cast<std::int64_t>(opt_.spin_us) * 1000;
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

  // net_kernel answers net_adm:ping; it is also the sender of messages sent without a
  // process of our own.
  system_ = new_process();
  system_->sink = true;
  register_name("net_kernel", system_);

  acceptor_ = std::thread([self = shared_from_this()] { self->acceptor(); });
  ticker_ = std::thread([self = shared_from_this()] { self->ticker(); });
  watchdog_ = std::thread([self = shared_from_this()] { self->watchdog(); });
}

void Core::stop() {
  if (stopping_.exchange(true)) return;
  if (listen_fd_) ::shutdown(listen_fd_.get(), SHUT_RDWR);
  {
    std::lock_guard lk(mu_);
    for (auto& [_, c] : conns_) c->shutdown();
  }
  {
    std::lock_guard lk(wd_mu_);
    wd_idle_ = false;
  }
  wd_cv_.notify_all();
  tick_cv_.notify_all();
  {
    std::lock_guard lk(jobs_mu_);
  }
  jobs_cv_.notify_all();
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
    // Readers may still start handshake or reader threads until they see stopping_.
    std::vector<Worker> readers;
    {
      std::lock_guard lk(threads_mu_);
      readers.swap(threads_);
    }
    if (readers.empty()) break;
    {
      std::lock_guard lk(mu_);
      for (auto& [_, c] : conns_) c->shutdown();
    }
    for (auto& w : readers) join(w.thread);
  }
  epmd_fd_.reset();
  listen_fd_.reset();
  std::lock_guard lk(mu_);
  conns_.clear();
  for (auto& [_, p] : procs_) {
    std::lock_guard pl(p->mu);
    p->closed = true;
    p->cv.notify_all();
  }
}

// --- Core: processes ----------------------------------------------------------------------

Bytes Core::encode_pid(std::uint32_t id) const {
  return build([&](auto& s) { etf::put_pid(s, self_.name, id, 0, self_.creation); });
}

Bytes Core::make_ref() {
  const std::uint64_t n = next_ref_++;
  const std::uint32_t ids[3] = {static_cast<std::uint32_t>(n & 0x3FFFF), static_cast<std::uint32_t>(n >> 18),
                                ref_salt_};
  return build([&](auto& s) { etf::put_reference(s, self_.name, self_.creation, ids); });
}

std::shared_ptr<Process> Core::new_process() {
  auto p = std::make_shared<Process>();
  p->id = next_pid_++;
  p->pid = encode_pid(p->id);
  std::lock_guard lk(mu_);
  procs_[p->id] = p;
  return p;
}

bool Core::register_name(const std::string& name, const std::shared_ptr<Process>& p) {
  std::lock_guard lk(mu_);
  if (names_.count(name) || !p->name.empty() || p->closed) return false;
  names_[name] = p;
  p->name = name;
  return true;
}

void Core::unregister_name(const std::string& name) {
  std::lock_guard lk(mu_);
  auto it = names_.find(name);
  if (it == names_.end()) return;
  it->second->name.clear();
  names_.erase(it);
}

std::shared_ptr<Process> Core::whereis(const std::string& name) {
  std::lock_guard lk(mu_);
  auto it = names_.find(name);
  return it == names_.end() ? nullptr : it->second;
}

std::shared_ptr<Process> Core::find(std::uint32_t id) {
  std::lock_guard lk(mu_);
  auto it = procs_.find(id);
  return it == procs_.end() ? nullptr : it->second;
}

void Core::deliver(const std::shared_ptr<Process>& p, Bytes msg, Connection* batch) {
  if (p->sink) return;
  {
    std::unique_lock lk(p->mu);
    if (p->closed) return;
    // A process that does not keep up (or a peer that floods it) must not grow us
    // without bound: over its limits the message is dropped, as a full queue would.
    if (p->queue.size() >= opt_.max_queued || p->queued_bytes >= opt_.max_queued_bytes) {
      const std::size_t n = p->queue.size(), bytes = p->queued_bytes;
      lk.unlock();
      note_dropped(*p, "message", n, bytes);
      return;
    }
    p->queued_bytes += msg.size();
    p->queue.push_back(std::move(msg));
  }
  messages.fetch_add(1, std::memory_order_relaxed);
  if (!batch) {
    p->cv.notify_one();
  } else if (batch->wake.empty() || batch->wake.back() != p) {
    batch->wake.push_back(p);
  }
}

void Core::note_dropped(const Process& p, const char* what, std::size_t held, std::size_t bytes) {
  const std::uint64_t total = dropped.fetch_add(1, std::memory_order_relaxed) + 1;
  // A flood must not become a flood of log lines too.
  const std::int64_t now = now_ns();
  std::int64_t last = last_drop_log_.load(std::memory_order_relaxed);
  if (last != 0 && now - last < 1'000'000'000) return;
  if (!last_drop_log_.compare_exchange_strong(last, now)) return;
  std::fprintf(stderr,
               "erpy.node %s: dropped a %s for process <0.%u.0>: it holds %zu %ss (%zu bytes of "
               "messages); max_queued_messages %zu, max_queued_bytes %zu; %llu dropped so far\n",
               self_.name.c_str(), what, p.id, held, what, bytes,
               opt_.max_queued, opt_.max_queued_bytes, static_cast<unsigned long long>(total));
}

void Core::flush_wake(Connection& c) {
  for (auto& p : c.wake) p->cv.notify_all();
  c.wake.clear();
}

bool Connection::has_frame() const {
  if (skip || rend - rpos < 4) return false;
  const std::uint8_t* h = rbuf.get() + rpos;
  const std::size_t len = (std::size_t{h[0]} << 24) | (std::size_t{h[1]} << 16) | (std::size_t{h[2]} << 8) | h[3];
  return rend - rpos >= 4 + len;
}

void Core::record_out_monitor(const std::shared_ptr<Process>& p, Watch w) {
  std::lock_guard lk(p->mu);
  p->out_monitors.push_back(std::move(w));
}

void Core::drop_out_monitor(const std::shared_ptr<Process>& p, const Bytes& ref) {
  std::lock_guard lk(p->mu);
  auto& v = p->out_monitors;
  for (auto it = v.begin(); it != v.end(); ++it) {
    if (it->ref == ref) {
      v.erase(it);
      return;
    }
  }
}

void Core::add_link(const std::shared_ptr<Process>& p, const std::string& node, const Bytes& pid) {
  std::lock_guard lk(p->mu);
  for (auto& l : p->links) {
    if (l.second == pid) return;
  }
  p->links.emplace_back(node, pid);
}

void Core::remove_link(const std::shared_ptr<Process>& p, const Bytes& pid) {
  std::lock_guard lk(p->mu);
  auto& v = p->links;
  for (auto it = v.begin(); it != v.end(); ++it) {
    if (it->second == pid) {
      v.erase(it);
      return;
    }
  }
}

void Core::exit_process(const std::shared_ptr<Process>& p, const Bytes& reason) {
  {
    std::lock_guard lk(mu_);
    procs_.erase(p->id);
    if (!p->name.empty()) {
      auto it = names_.find(p->name);
      if (it != names_.end() && it->second == p) names_.erase(it);
    }
  }
  std::vector<Watch> monitors, out;
  std::vector<std::pair<std::string, Bytes>> links;
  {
    std::lock_guard lk(p->mu);
    if (p->closed) return;
    p->closed = true;
    monitors.swap(p->monitors);
    out.swap(p->out_monitors);
    links.swap(p->links);
    p->queue.clear();
    p->queued_bytes = 0;
  }
  p->cv.notify_all();
  for (const Watch& m : monitors) send_exit_signal(m.node, kPayloadMonitorPExit, m.target, m.watcher, &m.ref, reason);
  for (const auto& [node, pid] : links) send_exit_signal(node, kPayloadExit, p->pid, pid, nullptr, reason);
  for (const Watch& m : out) {
    // Our monitors of remote processes end with us: tell their nodes.
    auto c = existing(m.node);
    if (!c) continue;
    py::ByteBuffer b = control_frame(kDemonitorP, {&p->pid, &m.watcher, &m.ref});
    c->send(b.data(), b.size());
  }
}

py::ByteBuffer control_frame(int op, std::initializer_list<const Bytes*> parts) {
  py::ByteBuffer b;
  Frame f(b);
  etf::put_tuple_header(b, parts.size() + 1);
  etf::put_integer(b, op);
  for (const Bytes* part : parts) etf::put_raw(b, *part);
  f.end();
  return b;
}

void Core::send_exit_signal(const std::string& node, int op, const Bytes& from, const Bytes& to,
                            const Bytes* ref, const Bytes& reason) {
  auto c = existing(node);
  if (!c) return;
  py::ByteBuffer b;
  Frame f(b);
  etf::put_tuple_header(b, ref ? 4 : 3);
  etf::put_integer(b, op);
  etf::put_raw(b, from);
  etf::put_raw(b, to);
  if (ref) etf::put_raw(b, *ref);
  f.payload();
  etf::put_raw(b, reason);
  f.end();
  c->send(b.data(), b.size());
}

// --- Core: connections --------------------------------------------------------------------

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

std::shared_ptr<Connection> Core::connection(const std::string& node) {
  if (auto c = existing(node)) return c;
  if (stopping_.load()) throw WireError("node stopped");
  std::lock_guard connecting(connect_mu_);
  if (auto c = existing(node)) return c;
  auto [alive, host] = split_node(node);
  const int port = epmd_port_please(host, alive, 5000);
  if (port < 0) throw WireError("node " + node + " is not registered at " + host + "'s epmd");
  auto c = std::make_shared<Connection>();
  c->frames.set_limits(opt_.in);
  c->fd = connect_tcp(host, port, 5000);
  c->peer = handshake_connect(c->fd.get(), self_, node);
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
  if (old) old->shutdown();
  start_reader(c);
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

void Core::start_reader(const std::shared_ptr<Connection>& c) {
  const std::uint64_t token = c->reader_token.load();
  std::lock_guard lk(threads_mu_);
  if (stopping_.load()) return;
  spawn_locked([self = shared_from_this(), c, token] { self->reader(c, token); });
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
    auto c = std::make_shared<Connection>();
    c->frames.set_limits(opt_.in);
    c->fd = Fd(fd);
    // The handshake runs on the connection's own thread, so a slow peer blocks no one.
    std::lock_guard lk(threads_mu_);
    if (stopping_.load()) return;
    spawn_locked([self = shared_from_this(), c] {
      try {
        c->peer = handshake_accept(c->fd.get(), self->self_);
      } catch (const std::exception& e) {
        // A wrong cookie or a broken peer: the socket closes with `c`.
        std::fprintf(stderr, "erpy.node %s: %s\n", self->self_.name.c_str(), e.what());
        return;
      }
      self->add_connection(c);
    });
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
      if (now - c->last_write.load() >= tick) {
        static const std::uint8_t zero[4] = {0, 0, 0, 0};
        c->send(zero, 4);
      }
    }
    lk.lock();
  }
}

void Core::wake_watchdog() {
  if (!wd_idle_.load()) return;
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
    const bool jobs = tend_jobs(now);
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

void Core::connection_down(const std::shared_ptr<Connection>& c) {
  c->shutdown();
  std::vector<std::shared_ptr<Process>> ps;
  {
    std::lock_guard lk(mu_);
    auto it = conns_.find(c->peer.name);
    if (it != conns_.end() && it->second == c) conns_.erase(it);
    for (auto& [_, p] : procs_) ps.push_back(p);
  }
  const std::string& node = c->peer.name;
  const Bytes down = enc_atom("DOWN"), process = enc_atom("process"), exit = enc_atom("EXIT"),
              noconn = enc_atom("noconnection");
  {
    // Calls whose caller was on that node: nobody can get their result any more.
    std::vector<std::uint32_t> ids;
    {
      std::lock_guard lk(run_mu_);
      for (auto& [id, r] : running_) {
        if (r->conn == c.get() && (r->monitor || r->link)) ids.push_back(id);
      }
    }
    for (std::uint32_t id : ids) cancel_job(id, nullptr, &noconn);
  }
  for (auto& p : ps) {
    std::vector<Bytes> msgs;
    {
      std::lock_guard lk(p->mu);
      std::erase_if(p->monitors, [&](const Watch& w) { return w.node == node; });
      std::erase_if(p->out_monitors, [&](const Watch& w) {
        if (w.node != node) return false;
        msgs.push_back(message_tuple({&down, &w.ref, &process, &w.target, &noconn}));
        return true;
      });
      std::erase_if(p->links, [&](const auto& l) {
        if (l.first != node) return false;
        msgs.push_back(message_tuple({&exit, &l.second, &noconn}));
        return true;
      });
    }
    for (auto& m : msgs) deliver(p, std::move(m));
  }
}

// --- Core: reading ------------------------------------------------------------------------

void Core::next_frame(Connection& c, std::uint8_t*& data, std::size_t& len, std::size_t& full) {
  constexpr std::size_t kInitial = 256 * 1024;
  auto ensure_buffer = [&] {
    if (c.rcap) return;
    c.rbuf.reset(new std::uint8_t[kInitial]);
    c.rcap = kInitial;
    c.rpos = c.rend = 0;
  };
  auto receive = [&](std::size_t room, int flags) {
    const ssize_t r = ::recv(c.fd.get(), c.rbuf.get() + c.rend, room, flags);
    if (r == 0) throw WireError("connection closed");
    if (r < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return false;
      throw WireError(std::string("recv: ") + std::strerror(errno));
    }
    c.rend += static_cast<std::size_t>(r);
    c.last_read.store(now_ns(), std::memory_order_relaxed);
    return true;
  };
  auto fill = [&](std::size_t need) {
    if (c.rend - c.rpos >= need) return;
    if (c.rcap - c.rpos < need) {
      const std::size_t have = c.rend - c.rpos;
      if (c.rcap >= need) {
        std::memmove(c.rbuf.get(), c.rbuf.get() + c.rpos, have);
      } else {
        const std::size_t cap = std::max(kInitial, need + (need >> 2));
        std::unique_ptr<std::uint8_t[]> fresh(new std::uint8_t[cap]);
        if (have) std::memcpy(fresh.get(), c.rbuf.get() + c.rpos, have);
        c.rbuf = std::move(fresh);
        c.rcap = cap;
      }
      c.rend = have;
      c.rpos = 0;
    }
    // Waking a thread blocked in recv costs 5 to 60 us on these machines (DESIGN.md):
    // poll the socket for spin_us after the last data before sleeping in recv, so a
    // burst of messages or back-to-back calls is read without that wake-up.
    std::int64_t spin_until = -1;
    while (c.rend - c.rpos < need) {
      int flags = 0;
      if (spin_ns_ > 0) {
        if (spin_until < 0) spin_until = now_ns() + spin_ns_;
        if (now_ns() < spin_until) flags = MSG_DONTWAIT;
      }
      if (!receive(c.rcap - c.rend, flags) && flags) cpu_relax();
    }
  };
  // The rest of a refused frame: read into the buffer and dropped, never held whole.
  while (c.skip > 0) {
    const std::size_t buffered = std::min(c.skip, c.rend - c.rpos);
    c.rpos += buffered;
    c.skip -= buffered;
    if (c.skip == 0) break;
    ensure_buffer();
    c.rpos = c.rend = 0;
    receive(std::min(c.skip, c.rcap), 0);
  }
  if (c.rpos == c.rend && c.rcap > 4 * 1024 * 1024) {
    // After a large message, give the memory back.
    c.rbuf.reset();
    c.rcap = c.rpos = c.rend = 0;
  }
  fill(4);
  const std::uint8_t* h = c.rbuf.get() + c.rpos;
  full = (std::size_t{h[0]} << 24) | (std::size_t{h[1]} << 16) | (std::size_t{h[2]} << 8) | h[3];
  // A length field cannot make us allocate more than max_message_size: of a larger frame
  // only the start is read (for its control message), the rest is skipped.
  len = std::min(full, full > opt_.in.max_message ? kRefusedHead : full);
  fill(4 + len);
  data = c.rbuf.get() + c.rpos + 4;
  c.rpos += 4 + len;
  c.skip = full - len;
}

void Core::reader(std::shared_ptr<Connection> c, std::uint64_t token) {
  try {
    while (c->reader_token.load() == token && !stopping_.load()) {
      std::uint8_t* data;
      std::size_t len;
      if (!c->has_frame()) {
        if (!c->wake.empty()) flush_wake(*c);
        // Messages are streaming in (this read held several): let the next read gather
        // more of them. A lone message or call never waits here.
        if (c->batch_messages >= 2 && opt_.coalesce_us > 0) {
          std::this_thread::sleep_for(std::chrono::microseconds(opt_.coalesce_us));
        }
        c->batch_messages = 0;
      }
      std::size_t full;
      next_frame(*c, data, len, full);
      if (full == 0) continue;  // a tick
      Incoming in = c->frames.feed({data, len}, full);
      if (in.kind == Incoming::kMessage) {
        handle_message(c, in.data, in.atoms, token, in.owned.empty() ? nullptr : &in.owned);
      } else if (in.kind == Incoming::kRefused) {
        handle_refused(c, in);
      }
    }
  } catch (const std::exception& e) {
    flush_wake(*c);
    if (c->reader_token.load() != token) return;
    c->frames.clear();  // unfinished fragmented messages go with the connection
    if (!stopping_.load() && std::strcmp(e.what(), "connection closed") != 0) {
      std::fprintf(stderr, "erpy.node %s: connection to %s lost: %s\n", self_.name.c_str(),
                   c->peer.name.c_str(), e.what());
    }
    connection_down(c);
  }
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
  const auto& it = ctl->items;
  etf::Bytes payload = msg.subspan(r.pos());
  auto payload_msg = [&] {
    Bytes b;
    b.reserve(payload.size() + 1);
    if (payload.empty() || payload[0] != 131) b.push_back(131);
    b.insert(b.end(), payload.begin(), payload.end());
    return b;
  };
  // The payload without its version byte (a reason).
  auto payload_term = [&] {
    etf::Bytes p = payload;
    if (!p.empty() && p[0] == 131) p = p.subspan(1);
    return Bytes(p.begin(), p.end());
  };
  auto local = [&](const etf::Term& t) -> std::shared_ptr<Process> {
    if (const auto* pid = std::get_if<etf::Pid>(&t.v)) {
      if (pid->node == self_.name) return find(pid->id);
      return nullptr;
    }
    if (const auto* a = atom_of(t)) return whereis(*a);
    return nullptr;
  };
  const std::string& peer = c->peer.name;
  const int op = static_cast<int>(int_of(it[0]));
  auto need = [&](std::size_t n) {
    if (it.size() < n) throw WireError("control message " + std::to_string(op) + " too short");
  };

  switch (op) {
    case kSend:
    case kSendTT:
    case kSendSender:
    case kSendSenderTT: {
      need(3);
      if (auto p = local(it[2])) deliver(p, payload_msg(), c.get());
      ++c->batch_messages;
      break;
    }
    case kRegSend:
    case kRegSendTT: {
      need(4);
      const std::string* name = atom_of(it[3]);
      if (!name) break;
      if (*name == "net_kernel") {
        handle_net_kernel(c, enc(it[1]), payload);
      } else if (auto p = whereis(*name)) {
        deliver(p, payload_msg(), c.get());
        ++c->batch_messages;
      }
      break;
    }
    case kAliasSend:
    case kAliasSendTT:
      break;  // erpy makes no aliases
    case kLink: {
      need(3);
      auto p = local(it[2]);
      if (p && !p->closed) {
        std::size_t n;
        {
          std::lock_guard lk(p->mu);
          n = p->links.size();
        }
        if (n < opt_.max_queued) {
          add_link(p, peer, enc(it[1]));
        } else {
          note_dropped(*p, "link", n, 0);
          send_exit_signal(peer, kPayloadExit, enc(it[2]), enc(it[1]), nullptr, enc_atom("system_limit"));
        }
      } else {
        send_exit_signal(peer, kPayloadExit, enc(it[2]), enc(it[1]), nullptr, enc_atom("noproc"));
      }
      break;
    }
    case kUnlink: {
      need(3);
      if (auto p = local(it[2])) remove_link(p, enc(it[1]));
      break;
    }
    case kUnlinkId: {
      need(4);
      if (auto p = local(it[3])) remove_link(p, enc(it[2]));
      py::ByteBuffer b;
      Frame f(b);
      etf::put_tuple_header(b, 4);
      etf::put_integer(b, kUnlinkIdAck);
      etf::put_term(b, it[1]);
      etf::put_term(b, it[3]);
      etf::put_term(b, it[2]);
      f.end();
      c->send(b.data(), b.size());
      break;
    }
    case kUnlinkIdAck:
    case kGroupLeader:
      break;
    case kExit:
    case kExitTT:
    case kPayloadExit:
    case kPayloadExitTT:
    case kExit2:
    case kExit2TT:
    case kPayloadExit2:
    case kPayloadExit2TT: {
      need(3);
      auto p = local(it[2]);
      const auto* pid = std::get_if<etf::Pid>(&it[2].v);
      if (!p && !(pid && pid->node == self_.name)) break;
      const Bytes from = enc(it[1]);
      Bytes reason;
      if (op == kExit || op == kExit2) {
        need(4);
        reason = enc(it[3]);
      } else if (op == kExitTT || op == kExit2TT) {
        need(5);
        reason = enc(it[4]);
      } else {
        reason = payload_term();
      }
      if (!p) {
        // To a call in progress: a linked caller died, or exit(Pid, Reason). Any reason
        // but normal ends it (kill ends it as killed).
        if (reason != enc_atom("normal")) {
          const Bytes why = reason == enc_atom("kill") ? enc_atom("killed") : reason;
          cancel_job(pid->id, nullptr, &why);
        }
        break;
      }
      if (op == kExit || op == kExitTT || op == kPayloadExit || op == kPayloadExitTT) remove_link(p, from);
      const Bytes exit = enc_atom("EXIT");
      deliver(p, message_tuple({&exit, &from, &reason}));
      break;
    }
    case kMonitorP: {
      need(4);
      auto p = local(it[2]);
      Watch w{peer, enc(it[1]), enc(it[3]), enc(it[2])};
      bool ok = false, full = false;
      std::size_t n = 0;
      if (p) {
        std::lock_guard lk(p->mu);
        n = p->monitors.size();
        full = !p->closed && n >= opt_.max_queued;
        if (!p->closed && !full) {
          p->monitors.push_back(std::move(w));
          ok = true;
        }
      }
      if (full) note_dropped(*p, "monitor", n, 0);
      if (!ok) {
        send_exit_signal(peer, kPayloadMonitorPExit, enc(it[2]), enc(it[1]), &w.ref,
                         enc_atom(full ? "system_limit" : "noproc"));
      }
      break;
    }
    case kDemonitorP: {
      need(4);
      if (auto p = local(it[2])) {
        const Bytes ref = enc(it[3]);
        std::lock_guard lk(p->mu);
        std::erase_if(p->monitors, [&](const Watch& w) { return w.ref == ref; });
      } else if (const auto* pid = std::get_if<etf::Pid>(&it[2].v); pid && pid->node == self_.name) {
        // A call's caller timed out or died: its node takes the monitor back.
        const Bytes ref = enc(it[3]);
        cancel_job(pid->id, &ref, nullptr);
      }
      break;
    }
    case kMonitorPExit:
    case kPayloadMonitorPExit: {
      need(4);
      auto p = local(it[2]);
      if (!p) break;
      const Bytes ref = enc(it[3]);
      Bytes object;
      {
        std::lock_guard lk(p->mu);
        auto& v = p->out_monitors;
        for (auto w = v.begin(); w != v.end(); ++w) {
          if (w->ref == ref) {
            object = std::move(w->target);
            v.erase(w);
            break;
          }
        }
      }
      if (object.empty()) object = enc(it[1]);
      Bytes reason;
      if (op == kMonitorPExit) {
        need(5);
        reason = enc(it[4]);
      } else {
        reason = payload_term();
      }
      const Bytes down = enc_atom("DOWN"), process = enc_atom("process");
      deliver(p, message_tuple({&down, &ref, &process, &object, &reason}));
      break;
    }
    case kSpawnRequest:
    case kSpawnRequestTT:
      need(6);
      handle_spawn(c, *ctl, payload, token, owner);
      break;
    case kSpawnReply:
    case kSpawnReplyTT: {
      need(5);
      auto p = local(it[2]);
      if (!p) break;
      const std::int64_t flags = int_of(it[3]);
      const Bytes req = enc(it[1]), result = enc(it[4]);
      const bool ok = std::holds_alternative<etf::Pid>(it[4].v);
      if (ok && (flags & 2)) record_out_monitor(p, Watch{peer, result, req, result});
      if (ok && (flags & 1)) add_link(p, peer, result);
      const Bytes tag = enc_atom("spawn_reply"), status = enc_atom(ok ? "ok" : "error");
      deliver(p, message_tuple({&tag, &req, &status, &result}));
      break;
    }
    default:
      break;  // unknown operations are ignored, as OTP does for ones it does not use
  }
}

void Core::handle_net_kernel(const std::shared_ptr<Connection>& c, const Bytes& /*from*/,
                             etf::Bytes payload) {
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
  c->send(b.data(), b.size());
}

// --- Core: spawn requests (rpc, erpc) ------------------------------------------------------

struct Core::Job {
  enum Kind { kCall, kCast, kApply } kind = kApply;
  Bytes req, from;
  bool monitor = false, link = false;
  Bytes res;  // erpc's result reference (kCall)
  std::string module, function;
  etf::Bytes args;  // the argument list (no version byte), in `args_copy` or `args_owner`
  Bytes args_copy;
  std::unique_ptr<std::uint8_t[]> args_rbuf;  // a read buffer taken over
  Bytes args_owner;                           // a reassembled message taken over
  const char* error = nullptr;  // a spawn error to reply instead (badarg, notsup)
};

namespace {

// The span of the next term, skipped without building anything.
etf::Bytes skip_term(etf::Reader& r) {
  const std::size_t start = r.pos();
  etf::NullBuilder nb;
  etf::decode_term(r, nb);
  return r.data().subspan(start, r.pos() - start);
}

std::string read_atom(etf::Reader& r) {
  etf::TermBuilder tb;
  etf::Term t = etf::decode_term(r, tb);
  const std::string* a = atom_of(t);
  if (!a) throw WireError("expected an atom");
  return *a;
}

}  // namespace

void Core::handle_spawn(const std::shared_ptr<Connection>& c, const etf::Tuple& ctl,
                        etf::Bytes payload, std::uint64_t token, Bytes* owner) {
  const auto& it = ctl.items;
  Job j;
  j.req = enc(it[1]);
  j.from = enc(it[2]);
  const auto* mfa = std::get_if<etf::Tuple>(&it[4].v);
  if (const auto* opts = std::get_if<etf::List>(&it[5].v)) {
    for (const auto& o : opts->items) {
      if (const std::string* a = atom_of(o)) {
        if (*a == "monitor") j.monitor = true;
        if (*a == "link") j.link = true;
      }
    }
  }
  try {
    if (!mfa || mfa->items.size() != 3 || !atom_of(mfa->items[0]) || !atom_of(mfa->items[1])) {
      throw WireError("bad MFA");
    }
    const std::string& m = *atom_of(mfa->items[0]);
    const std::string& f = *atom_of(mfa->items[1]);
    const std::int64_t arity = int_of(mfa->items[2]);
    etf::Reader r(payload);
    if (r.peek_u8() == 131) r.u8();
    // The job must own its arguments: a new reader may reuse the read buffer while it
    // runs. Large ones are not copied: the job takes the buffer that holds them.
    auto args_from = [&](etf::Bytes span) {
      const std::uint8_t* rb = c->rbuf.get();
      if (span.size() >= 64 * 1024 && owner) {
        j.args_owner = std::move(*owner);
        j.args = span;
      } else if (span.size() >= 64 * 1024 && rb && span.data() >= rb &&
                 span.data() + span.size() <= rb + c->rend && c->rpos == c->rend) {
        j.args_rbuf = std::move(c->rbuf);
        c->rcap = c->rpos = c->rend = 0;
        j.args = span;
      } else {
        j.args_copy.assign(span.begin(), span.end());
        j.args = j.args_copy;
      }
    };
    if (m == "erpc" && ((f == "execute_call" && arity == 4) || (f == "execute_cast" && arity == 3))) {
      if (r.u8("argument list") != etf::kList || r.u32("list length") != static_cast<std::uint32_t>(arity)) {
        throw WireError("bad argument list");
      }
      if (arity == 4) {
        j.kind = Job::kCall;
        etf::Bytes res = skip_term(r);
        j.res.assign(res.begin(), res.end());
      } else {
        j.kind = Job::kCast;
      }
      j.module = read_atom(r);
      j.function = read_atom(r);
      args_from(skip_term(r));
    } else {
      j.kind = Job::kApply;
      j.module = m;
      j.function = f;
      args_from(payload.subspan(r.pos()));
    }
  } catch (const std::exception&) {
    j.error = "badarg";
  }
  if (j.error) {
    py::ByteBuffer b;
    Frame fr(b);
    etf::put_tuple_header(b, 5);
    etf::put_integer(b, kSpawnReply);
    etf::put_raw(b, j.req);
    etf::put_raw(b, j.from);
    etf::put_integer(b, 0);
    etf::put_atom(b, j.error);
    fr.end();
    c->send(b.data(), b.size());
    return;
  }
  calls.fetch_add(1, std::memory_order_relaxed);
  flush_wake(*c);
  // More requests already read and waiting: let a worker run this one so they run in
  // parallel as far as the GIL allows (handlers doing I/O or native work release it).
  // Alone, the reader runs it itself: no thread hand-off on the latency path.
  if (c->has_frame() && dispatch(c, j)) return;
  c->busy_since.store(now_ns());
  wake_watchdog();
  inline_conn_ = c.get();
  inline_token_ = token;
  run_job(*c, j);
  inline_conn_ = nullptr;
  if (c->reader_token.load() == token) c->busy_since.store(0);
}

thread_local Core::Running* Core::current_run_ = nullptr;
thread_local Connection* Core::inline_conn_ = nullptr;
thread_local std::uint64_t Core::inline_token_ = 0;

void Core::yield_reader() {
  Connection* c = inline_conn_;
  if (!c) return;
  inline_conn_ = nullptr;
  std::shared_ptr<Connection> conn;
  {
    // As the watchdog does (under the same lock, so that only one of us hands over).
    std::lock_guard lk(wd_mu_);
    if (c->reader_token.load() != inline_token_ || !c->busy_since.load()) return;
    c->busy_since.store(0);
    c->reader_token.fetch_add(1);
    std::lock_guard ml(mu_);
    auto it = conns_.find(c->peer.name);
    if (it != conns_.end() && it->second.get() == c) conn = it->second;
  }
  handovers.fetch_add(1, std::memory_order_relaxed);
  if (conn) start_reader(conn);
}

Core::WaitScope::WaitScope(const std::shared_ptr<Process>& p) {
  if (Running* r = current_run_) {
    std::lock_guard lk(r->mu);
    r->waiting = p;
  }
}

Core::WaitScope::~WaitScope() {
  if (Running* r = current_run_) {
    std::lock_guard lk(r->mu);
    r->waiting.reset();
  }
}

bool Core::WaitScope::cancelled() const {
  const Running* r = current_run_;
  return r && r->cancelled.load();
}

void Core::end_spawn(Connection& c, const Bytes& req, const Bytes& from, bool monitor, bool link,
                     const Bytes& reason) {
  const Bytes pid = encode_pid(next_pid_++);
  py::ByteBuffer b;
  {
    Frame f(b);
    etf::put_tuple_header(b, 5);
    etf::put_integer(b, kSpawnReply);
    etf::put_raw(b, req);
    etf::put_raw(b, from);
    etf::put_integer(b, (link ? 1 : 0) | (monitor ? 2 : 0));
    etf::put_raw(b, pid);
    f.end();
  }
  if (monitor) {
    Frame f(b);
    etf::put_tuple_header(b, 4);
    etf::put_integer(b, kPayloadMonitorPExit);
    etf::put_raw(b, pid);
    etf::put_raw(b, from);
    etf::put_raw(b, req);
    f.payload();
    etf::put_raw(b, reason);
    f.end();
  }
  if (link) {
    Frame f(b);
    etf::put_tuple_header(b, 3);
    etf::put_integer(b, kPayloadExit);
    etf::put_raw(b, pid);
    etf::put_raw(b, from);
    f.payload();
    etf::put_raw(b, reason);
    f.end();
  }
  c.send(b.data(), b.size());
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
  // The call's process ends at once with the reason, inside erpc's result tuple when the
  // start of the payload holds it ({Res, error, Why, []}: erpc raises it as an error).
  try {
    etf::Reader r(in.data);
    if (r.peek_u8() == 131) r.u8();
    etf::TermBuilder tb;
    etf::DecodeOptions o;
    o.atom_cache = in.atoms;
    etf::Term ctl_term = etf::decode_term(r, tb, o);
    const auto* ctl = std::get_if<etf::Tuple>(&ctl_term.v);
    if (!ctl || ctl->items.size() < 6) return;
    const auto& it = ctl->items;
    const std::int64_t op = int_of(it[0]);
    if (op != kSpawnRequest && op != kSpawnRequestTT) return;
    bool monitor = false, link = false;
    if (const auto* opts = std::get_if<etf::List>(&it[5].v)) {
      for (const auto& opt : opts->items) {
        if (const std::string* a = atom_of(opt)) {
          monitor = monitor || *a == "monitor";
          link = link || *a == "link";
        }
      }
    }
    Bytes reason = why;
    const auto* mfa = std::get_if<etf::Tuple>(&it[4].v);
    if (mfa && mfa->items.size() == 3 && atom_of(mfa->items[0]) && *atom_of(mfa->items[0]) == "erpc" &&
        atom_of(mfa->items[1]) && *atom_of(mfa->items[1]) == "execute_call") {
      try {
        if (r.peek_u8() == 131) r.u8();
        if (r.u8("argument list") != etf::kList) throw WireError("bad argument list");
        r.u32("list length");
        etf::TermBuilder rb;
        const Bytes res = enc(etf::decode_term(r, rb));
        reason = build([&](auto& s) {
          etf::put_tuple_header(s, 4);
          etf::put_raw(s, res);
          etf::put_atom(s, "error");
          etf::put_raw(s, why);
          etf::put_nil(s);
        });
      } catch (const std::exception&) {
        // Not there: the plain reason.
      }
    }
    end_spawn(*c, enc(it[1]), enc(it[2]), monitor, link, reason);
  } catch (const std::exception&) {
    // Its start holds no whole control message: nothing to answer.
  }
}

Core::Queued::Queued(std::shared_ptr<Connection> c, std::unique_ptr<Job> j)
    : conn(std::move(c)), job(std::move(j)) {}
Core::Queued::Queued(Queued&&) noexcept = default;
Core::Queued::~Queued() = default;

bool Core::dispatch(const std::shared_ptr<Connection>& c, Job& j) {
  std::unique_lock lk(jobs_mu_);
  if (idle_workers_ == 0) {
    if (workers_ >= opt_.workers || stopping_.load()) return false;
    ++workers_;
    lk.unlock();
    {
      std::lock_guard tl(threads_mu_);
      if (!stopping_.load()) spawn_locked([self = shared_from_this()] { self->worker(); });
    }
    lk.lock();
  }
  jobs_.emplace_back(c, std::make_unique<Job>(std::move(j)));
  lk.unlock();
  jobs_cv_.notify_one();
  return true;
}

void Core::worker() {
  std::unique_lock lk(jobs_mu_);
  for (;;) {
    ++idle_workers_;
    jobs_cv_.wait(lk, [&] { return !jobs_.empty() || stopping_.load(); });
    --idle_workers_;
    if (stopping_.load()) return;
    Queued q = std::move(jobs_.front());
    jobs_.pop_front();
    lk.unlock();
    run_job(*q.conn, *q.job);
    q.job.reset();  // drop the arguments before sleeping
    q.conn.reset();
    lk.lock();
  }
}

PyObject* Core::resolve(const std::string& module, const std::string& function) {
  std::string key;
  key.reserve(module.size() + function.size() + 1);
  key += module;
  key += '\0';
  key += function;
  auto it = fn_cache_.find(key);
  if (it != fn_cache_.end()) return it->second.get();
  PyRef m = PyRef::check(PyUnicode_FromStringAndSize(module.data(), static_cast<Py_ssize_t>(module.size())));
  PyRef f = PyRef::check(PyUnicode_FromStringAndSize(function.data(), static_cast<Py_ssize_t>(function.size())));
  PyRef fn = PyRef::check(PyObject_CallFunctionObjArgs(resolver_.get(), m.get(), f.get(), nullptr));
  PyObject* raw = fn.get();
  if (fn_cache_.size() > 4096) fn_cache_.clear();
  fn_cache_.emplace(std::move(key), std::move(fn));
  return raw;
}

namespace {
thread_local std::size_t t_result_limit = 0;
thread_local bool t_result_binary = false;

// Appends `value` as a binary holding its external format (version byte first); returns
// the binary's size, as erlang:external_size/1 of the value would be.
std::size_t put_etf_binary(py::ByteBuffer& b, py::Codec& codec, PyObject* value, const py::EncodeOptions& eo) {
  const std::size_t head = b.size();
  static const std::uint8_t binary_ext[5] = {etf::kBinary, 0, 0, 0, 0};
  b.write(binary_ext, sizeof binary_ext);
  const std::size_t mark = b.size();
  b.byte(131);
  codec.encode_append(b, value, eo);
  const std::size_t n = b.size() - mark;
  if (n > 0xFFFFFFFFu) throw etf::EncodeError("a result over 4 GiB");
  std::uint8_t* p = b.data() + head + 1;
  p[0] = static_cast<std::uint8_t>(n >> 24);
  p[1] = static_cast<std::uint8_t>(n >> 16);
  p[2] = static_cast<std::uint8_t>(n >> 8);
  p[3] = static_cast<std::uint8_t>(n);
  return n;
}

void put_too_large(py::ByteBuffer& b, std::size_t size, std::size_t max) {
  etf::put_tuple_header(b, 3);
  etf::put_atom(b, "message_too_large");
  etf::put_integer(b, static_cast<std::int64_t>(size));
  etf::put_integer(b, static_cast<std::int64_t>(max));
}
}  // namespace

void Core::set_result_limit(std::size_t max, bool binary) {
  t_result_limit = max;
  t_result_binary = binary;
}

void Core::run_job(Connection& c, Job& j) {
  const std::uint32_t id = next_pid_++;
  const Bytes pid = encode_pid(id);
  thread_local py::ByteBuffer head, reason;
  head.clear();
  reason.clear();
  {
    Frame f(head);
    etf::put_tuple_header(head, 5);
    etf::put_integer(head, kSpawnReply);
    etf::put_raw(head, j.req);
    etf::put_raw(head, j.from);
    etf::put_integer(head, (j.link ? 1 : 0) | (j.monitor ? 2 : 0));
    etf::put_raw(head, pid);
    f.end();
  }
  const bool wanted = j.monitor || j.link;
  auto run = std::make_shared<Running>();
  run->conn = &c;
  run->reply.assign(head.data(), head.data() + head.size());
  run->req = j.req;
  run->monitor = j.monitor;
  run->link = j.link;
  run->started = now_ns();
  {
    std::lock_guard lk(run_mu_);
    running_.emplace(id, run);
    if (!cancelled_reqs_.empty() && std::find(cancelled_reqs_.begin(), cancelled_reqs_.end(), j.req) != cancelled_reqs_.end()) {
      run->cancelled.store(true);  // cancelled while it waited for a worker
    }
  }
  wake_watchdog();
  {
    ensure_thread_state();
    GilHold gil;
    run->tid = PyThread_get_thread_ident();
    t_result_limit = 0;
    t_result_binary = false;
    current_run_ = run.get();
    const std::size_t base = kPayloadMagic ? 1 : 0;
    if (kPayloadMagic) reason.byte(131);
    py::EncodeOptions eo;
    py::DecodeOptions dopt;
    // Python is done with the call: no interrupt may reach this thread after it (one
    // sent but not yet raised is withdrawn).
    auto py_done = [&] {
      if (run->py_done) return;
      run->py_done = true;
      PyObject *t, *v, *tb;
      PyErr_Fetch(&t, &v, &tb);
      PyThreadState_SetAsyncExc(run->tid, nullptr);
      PyErr_Restore(t, v, tb);
    };
    try {
      PyObject* fn;
      PyRef args;
      try {
        fn = resolve(j.module, j.function);
        etf::Reader ar(j.args);
        args = codec_.decode_term(ar, dopt);
        if (!PyList_Check(args.get())) throw WireError("arguments are not a list");
      } catch (...) {
        py_done();
        throw;
      }
      PyObject* raw = PyObject_Vectorcall(fn, &PyList_GET_ITEM(args.get(), 0),
                                          static_cast<std::size_t>(PyList_GET_SIZE(args.get())), nullptr);
      py_done();
      PyRef result = PyRef::check(raw);
      if (wanted) {
        if (j.kind == Job::kCall) {
          etf::put_tuple_header(reason, 3);
          etf::put_raw(reason, j.res);
          etf::put_atom(reason, "return");
          std::size_t size;
          if (t_result_binary) {
            size = put_etf_binary(reason, codec_, result.get(), eo);
          } else {
            const std::size_t mark = reason.size();
            codec_.encode_append(reason, result.get(), eo);
            size = reason.size() - mark + 1;  // as erlang:external_size/1
          }
          if (t_result_limit && size > t_result_limit) {
            reason.truncate(base);
            etf::put_tuple_header(reason, 4);
            etf::put_raw(reason, j.res);
            etf::put_atom(reason, "error");
            put_too_large(reason, size, t_result_limit);
            etf::put_nil(reason);
          }
        } else {
          etf::put_atom(reason, "normal");
        }
      }
    } catch (...) {
      reason.truncate(base);
      py::set_python_error(codec_.types());
      PyObject *t, *v, *tb;
      PyErr_Fetch(&t, &v, &tb);
      PyErr_NormalizeException(&t, &v, &tb);
      if (tb && v) PyException_SetTraceback(v, tb);
      PyRef type = PyRef::steal(t), value = PyRef::steal(v), trace = PyRef::steal(tb);
      PyRef map = PyRef::steal(value ? PyObject_CallOneArg(error_formatter_.get(), value.get()) : nullptr);
      if (!map) PyErr_Clear();
      if (j.kind == Job::kCall) {
        etf::put_tuple_header(reason, 4);
        etf::put_raw(reason, j.res);
        etf::put_atom(reason, "error");
      } else {
        etf::put_tuple_header(reason, 2);
      }
      const std::size_t mark = reason.size();
      try {
        if (!map) throw PythonError();
        if (t_result_binary && j.kind == Job::kCall) {
          // The error map too: its message and traceback are Python's to choose.
          const std::size_t size = put_etf_binary(reason, codec_, map.get(), eo);
          if (t_result_limit && size > t_result_limit) {
            reason.truncate(mark);
            put_too_large(reason, size, t_result_limit);
          }
        } else {
          codec_.encode_append(reason, map.get(), eo);
        }
      } catch (...) {
        PyErr_Clear();
        reason.truncate(mark);
        etf::put_atom(reason, "python_error");
      }
      etf::put_nil(reason);
    }
    t_result_limit = 0;
    t_result_binary = false;
    current_run_ = nullptr;
  }
  std::unique_lock rl(run->mu);
  run->finished = true;
  if (run->cancelled.load() && !run->cancel_reason.empty()) {
    // Killed by an exit signal: the process ends with its reason, as an Erlang one would.
    reason.clear();
    if (kPayloadMagic) reason.byte(131);
    reason.write(run->cancel_reason.data(), run->cancel_reason.size());
  }
  // SPAWN_REPLY (unless sent early), then the exit: 'DOWN' to the monitor and/or the exit
  // signal to the link, in one write.
  iovec iov[5];
  int n = 0;
  const std::size_t skip = run->replied.load() ? head.size() : 0;
  std::size_t cut = head.size();
  if (j.monitor) {
    Frame f(head);
    etf::put_tuple_header(head, 4);
    etf::put_integer(head, kPayloadMonitorPExit);
    etf::put_raw(head, pid);
    etf::put_raw(head, j.from);
    etf::put_raw(head, j.req);
    f.end(reason.size());
  }
  const std::size_t cut2 = head.size();
  if (j.link) {
    Frame f(head);
    etf::put_tuple_header(head, 3);
    etf::put_integer(head, kPayloadExit);
    etf::put_raw(head, pid);
    etf::put_raw(head, j.from);
    f.end(reason.size());
  }
  // `reason` is each exit frame's payload.
  if ((j.monitor ? cut2 : cut) > skip) iov[n++] = {head.data() + skip, (j.monitor ? cut2 : cut) - skip};
  if (j.monitor) iov[n++] = {reason.data(), reason.size()};
  if (j.link) {
    iov[n++] = {head.data() + cut2, head.size() - cut2};
    iov[n++] = {reason.data(), reason.size()};
  }
  if (n > 0) c.sendv(iov, n);
  rl.unlock();
  {
    std::lock_guard lk(run_mu_);
    running_.erase(id);
  }
  if (reason.capacity() > (std::size_t{4} << 20)) reason.release_memory();
  if (head.capacity() > (std::size_t{1} << 20)) head.release_memory();
}

bool Core::cancel_job(std::uint32_t id, const Bytes* ref, const Bytes* reason) {
  std::shared_ptr<Running> r;
  std::shared_ptr<Process> waiting;
  {
    std::lock_guard lk(run_mu_);
    auto it = running_.find(id);
    if (it == running_.end()) return false;
    r = it->second;
  }
  {
    std::lock_guard lk(r->mu);
    if (r->finished) return true;
    // The caller's monitor going away means nobody waits. (Its node may name it by the
    // request id, or, for a request it abandoned before our reply, by a new reference:
    // no one else can monitor a call, MONITOR_P on it answers noproc.)
    if (ref && !r->monitor) return true;
    if (reason) r->cancel_reason = *reason;
    r->cancelled.store(true);
    waiting = r->waiting;
  }
  if (waiting) {
    // Its thread waits in a mailbox (a callback into Erlang): wake it to see the cancel.
    { std::lock_guard pl(waiting->mu); }
    waiting->cv.notify_all();
  }
  {
    // The watchdog interrupts it (and again until it stops).
    std::lock_guard lk(wd_mu_);
    wd_idle_ = false;
  }
  wd_cv_.notify_all();
  return true;
}

void Core::cancel_request(const Bytes& req) {
  std::uint32_t id = 0;
  {
    std::lock_guard lk(run_mu_);
    for (auto& [i, r] : running_) {
      if (r->req == req) id = i;
    }
    if (!id) {
      // Not running (yet, or any more): remember it a while for a job still queued.
      cancelled_reqs_.push_back(req);
      if (cancelled_reqs_.size() > 64) cancelled_reqs_.pop_front();
      return;
    }
  }
  cancel_job(id, nullptr, nullptr);
}

bool Core::tend_jobs(std::int64_t now) {
  const std::int64_t slow = static_cast<std::int64_t>(opt_.slow_ms) * 1'000'000;
  std::vector<std::shared_ptr<Running>> rs;
  bool attention = false;
  {
    std::lock_guard lk(run_mu_);
    for (auto& [_, r] : running_) {
      if (r->cancelled.load() || !r->replied.load()) {
        rs.push_back(r);
        attention = true;
      }
    }
  }
  std::vector<std::shared_ptr<Running>> kill;
  for (auto& r : rs) {
    if (r->cancelled.load()) {
      kill.push_back(r);
      continue;
    }
    if (now - r->started < slow) continue;
    std::lock_guard lk(r->mu);
    if (r->finished || r->replied.load()) continue;
    r->replied.store(true);
    r->conn->send(r->reply.data(), r->reply.size());
  }
  if (!kill.empty()) {
    // Before 3.12 one thread taking its async exception can clear the signal for the
    // others, so a cancelled call gets its KeyboardInterrupt on every round until it stops.
    ensure_thread_state();
    GilHold gil;
    for (auto& r : kill) {
      if (!r->py_done && r->tid) PyThreadState_SetAsyncExc(r->tid, PyExc_KeyboardInterrupt);
    }
  }
  return attention;
}

}  // namespace erpy::node
