#include "reactor.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <vector>
#include <mutex>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <string>

#include "errors.hpp"
#include "pool.hpp"
#include "py/ref.hpp"
#include "resource.hpp"
#include "runtime.hpp"

namespace erpy::nif::reactor {

namespace {

// One handed-over fd. `fd` is -1 once closed. Once the fd has been given to enif_select,
// only the stop callback closes it: the VM's poller may still hold it until then.
//
// Embedded events (run_event) use the fd from a context thread while the owner process
// waits: `m` orders that with stop() and with re-arming the select. While Python runs a
// callback on the fd (`in_python`), a stop is only noted (`stop_pending`) and done when
// the callback returns, so the fd number can never name another file meanwhile. Lock
// order: the GIL, then `m` (nothing else is taken under `m`; enif_select is, and its stop
// callback takes no lock of ours).
struct Conn {
  std::atomic<int> fd{-1};
  std::atomic<bool> selected{false};
  std::mutex m;
  // Guarded by m:
  bool stopping = false;
  bool in_python = false;
  bool stop_pending = false;
  bool in_flight = false;   // an event job was submitted and has not ended
  bool notify_end = false;  // its end must be answered (reactor_watch), not re-armed
  ErlNifMonitor owner{};
  // Set once by bind(), before the first select (read without `m` after that): where
  // readiness goes (the pool's hub), the owner and its tag for what the hub's batches
  // answer it, and its per-callback timeout (ms, -1: none).
  ErlNifPid hub{};
  ErlNifPid owner_pid{};
  OwnedEnv ref_env;
  ERL_NIF_TERM ref = 0;
  int timeout_ms = -1;
  bool bound = false;
};

ErlNifResourceType* g_conn_type = nullptr;
ERL_NIF_TERM g_read = 0, g_write = 0, g_close = 0, g_undefined = 0, g_ready_output = 0;

ERL_NIF_TERM atom(ErlNifEnv* env, const char* name) { return enif_make_atom(env, name); }

ERL_NIF_TERM error(ErlNifEnv* env, ERL_NIF_TERM why) { return enif_make_tuple2(env, atom(env, "error"), why); }

// As Erlang's posix atoms: econnrefused, ebadf, ...
ERL_NIF_TERM errno_error(ErlNifEnv* env, int e) {
  const char* name = strerrorname_np(e);
  std::string lower = name ? name : "unknown";
  for (char& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return error(env, enif_make_atom(env, lower.c_str()));
}

// Closes the fd now if the poller never had it, else stops the select (the stop callback
// closes it). `m` held; `env`: the caller's, a callback's, or null on a context thread.
void stop_now(ErlNifEnv* env, Conn* c) {
  const int fd = c->fd.load();
  if (fd < 0) return;
  if (!c->selected.load()) {
    c->fd.store(-1);
    ::close(fd);
    return;
  }
  enif_select(env, static_cast<ErlNifEvent>(fd), ERL_NIF_SELECT_STOP, c, nullptr, g_undefined);
}

// Idempotent; deferred while Python uses the fd (see Conn).
void stop(ErlNifEnv* env, Conn* c) {
  std::lock_guard<std::mutex> lock(c->m);
  if (c->stopping) return;
  c->stopping = true;
  if (c->in_python) {
    c->stop_pending = true;
    return;
  }
  stop_now(env, c);
}

void conn_stop(ErlNifEnv*, void* obj, ErlNifEvent event, int) {
  auto* c = static_cast<Conn*>(obj);
  int expected = static_cast<int>(event);
  if (c->fd.compare_exchange_strong(expected, -1)) ::close(static_cast<int>(event));
}

void conn_down(ErlNifEnv* env, void* obj, ErlNifPid*, ErlNifMonitor*) {
  // The owner died without closing: the fd must not outlive it (nor stay in the poller).
  stop(env, static_cast<Conn*>(obj));
}

void conn_dtor(ErlNifEnv*, void* obj) {
  auto* c = static_cast<Conn*>(obj);
  // Reached only when no select holds the resource: the fd is ours to close.
  const int fd = c->fd.exchange(-1);
  if (fd >= 0) ::close(fd);
  c->~Conn();
}

Conn* get_conn(ErlNifEnv* env, ERL_NIF_TERM t) {
  void* obj = nullptr;
  return enif_get_resource(env, t, g_conn_type, &obj) ? static_cast<Conn*>(obj) : nullptr;
}

bool get_fd(ErlNifEnv* env, ERL_NIF_TERM t, int* fd) { return enif_get_int(env, t, fd) && *fd >= 0; }

}  // namespace

bool open_batch_type(ErlNifEnv* env, ErlNifResourceFlags flags);

bool open_types(ErlNifEnv* env, ErlNifResourceFlags flags) {
  ErlNifResourceTypeInit init{};
  init.dtor = conn_dtor;
  init.stop = conn_stop;
  init.down = conn_down;
  ErlNifResourceFlags tried;
  g_conn_type = enif_open_resource_type_x(env, "erpy_reactor_fd", &init, flags, &tried);
  g_read = atom(env, "read");
  g_ready_output = atom(env, "ready_output");
  g_write = atom(env, "write");
  g_close = atom(env, "close");
  g_undefined = atom(env, "undefined");
  return g_conn_type != nullptr && open_batch_type(env, flags);
}

ERL_NIF_TERM nif_adopt(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  int fd;
  if (!get_fd(env, argv[0], &fd)) return enif_make_badarg(env);
  const int fl = ::fcntl(fd, F_GETFL);
  if (fl < 0) return errno_error(env, errno);
  if (::fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0) return errno_error(env, errno);
  void* mem = enif_alloc_resource(g_conn_type, sizeof(Conn));
  auto* c = new (mem) Conn();
  c->fd.store(fd);
  ResourcePtr<Conn> res = ResourcePtr<Conn>::adopt(c);
  ErlNifPid self;
  enif_self(env, &self);
  if (enif_monitor_process(env, c, &self, &c->owner) != 0) {
    stop(env, c);
    return error(env, atom(env, "noproc"));
  }
  return enif_make_tuple2(env, atom(env, "ok"), res.term(env));
}

ERL_NIF_TERM nif_dup(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  int fd;
  if (!get_fd(env, argv[0], &fd)) return enif_make_badarg(env);
  const int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) return errno_error(env, errno);
  return enif_make_tuple2(env, atom(env, "ok"), enif_make_int(env, copy));
}

ERL_NIF_TERM nif_select(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  Conn* c = get_conn(env, argv[0]);
  if (!c) return enif_make_badarg(env);
  ErlNifSelectFlags mode;
  if (enif_is_identical(argv[1], g_read)) mode = ERL_NIF_SELECT_READ;
  else if (enif_is_identical(argv[1], g_write)) mode = ERL_NIF_SELECT_WRITE;
  else return enif_make_badarg(env);
  std::lock_guard<std::mutex> lock(c->m);
  const int fd = c->fd.load();
  if (fd < 0 || c->stopping) return error(env, atom(env, "closed"));
  c->selected.store(true);
  const int r = enif_select(env, static_cast<ErlNifEvent>(fd), mode, c, c->bound ? &c->hub : nullptr, g_undefined);
  if (r < 0) return error(env, atom(env, "select_failed"));
  return atom(env, "ok");
}

ERL_NIF_TERM nif_bind(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  Conn* c = get_conn(env, argv[0]);
  ErlNifPid hub;
  int timeout = -1;
  if (!c || !enif_get_local_pid(env, argv[1], &hub) || !enif_is_ref(env, argv[2])) return enif_make_badarg(env);
  if (!enif_is_identical(argv[3], atom(env, "infinity")) && (!enif_get_int(env, argv[3], &timeout) || timeout < 0)) {
    return enif_make_badarg(env);
  }
  std::lock_guard<std::mutex> lock(c->m);
  if (c->bound || c->selected.load()) return error(env, atom(env, "bound"));
  c->hub = hub;
  enif_self(env, &c->owner_pid);
  c->ref_env = OwnedEnv::alloc();
  c->ref = enif_make_copy(c->ref_env.get(), argv[2]);
  c->timeout_ms = timeout;
  c->bound = true;
  return atom(env, "ok");
}

ERL_NIF_TERM nif_close(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  Conn* c = get_conn(env, argv[0]);
  if (!c) return enif_make_badarg(env);
  stop(env, c);
  enif_demonitor_process(env, c, &c->owner);
  return atom(env, "ok");
}

ERL_NIF_TERM nif_fd(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  Conn* c = get_conn(env, argv[0]);
  if (!c) return enif_make_badarg(env);
  std::lock_guard<std::mutex> lock(c->m);
  const int fd = c->fd.load();
  return fd < 0 || c->stopping ? atom(env, "closed") : enif_make_int(env, fd);
}

namespace {

// A socket closed on every path.
struct Sock {
  int fd = -1;
  ~Sock() {
    if (fd >= 0) ::close(fd);
  }
};

}  // namespace

ERL_NIF_TERM nif_send_fd(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  ErlNifBinary name, payload;
  int os_pid, fd;
  if (!enif_inspect_iolist_as_binary(env, argv[0], &name) || name.size == 0 ||
      name.size >= sizeof(sockaddr_un::sun_path) - 1) {
    return enif_make_badarg(env);
  }
  // `socketpair` for Fd: a new socket pair, one end sent, the other returned (the
  // reactor's callback channel, erpy_reactor.erl).
  const bool pair = enif_is_identical(argv[2], atom(env, "socketpair"));
  if (!enif_get_int(env, argv[1], &os_pid) || (!pair && !get_fd(env, argv[2], &fd))) return enif_make_badarg(env);
  if (!enif_inspect_binary(env, argv[3], &payload) || payload.size == 0 || payload.size > (1 << 20)) {
    return enif_make_badarg(env);
  }
  Sock mine, theirs;  // the pair's ends: ours goes to the caller on success only
  if (pair) {
    int sv[2];
    if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) return errno_error(env, errno);
    mine.fd = sv[0];
    theirs.fd = sv[1];
    fd = theirs.fd;
  }
  Sock s;
  s.fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (s.fd < 0) return errno_error(env, errno);
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  // An abstract name: a leading NUL, then the bytes (no terminator).
  std::memcpy(addr.sun_path + 1, name.data, name.size);
  const auto len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + name.size);
  if (::connect(s.fd, reinterpret_cast<sockaddr*>(&addr), len) < 0) return errno_error(env, errno);
  // Anyone could have bound the name: the fd goes only to the worker we mean.
  ucred cred{};
  socklen_t cl = sizeof cred;
  if (::getsockopt(s.fd, SOL_SOCKET, SO_PEERCRED, &cred, &cl) < 0) return errno_error(env, errno);
  if (cred.pid != os_pid || cred.uid != ::getuid()) return error(env, atom(env, "wrong_peer"));
  iovec iov{payload.data, payload.size};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  cmsghdr* cm = CMSG_FIRSTHDR(&msg);
  cm->cmsg_level = SOL_SOCKET;
  cm->cmsg_type = SCM_RIGHTS;
  cm->cmsg_len = CMSG_LEN(sizeof(int));
  std::memcpy(CMSG_DATA(cm), &fd, sizeof(int));
  ssize_t sent;
  do {
    sent = ::sendmsg(s.fd, &msg, MSG_NOSIGNAL);
  } while (sent < 0 && errno == EINTR);
  if (sent < 0) return errno_error(env, errno);
  if (static_cast<std::size_t>(sent) != payload.size) return error(env, atom(env, "short_send"));
  // The worker answers "K" once connection_made ran, or "E" and the error's text.
  std::string answer;
  char buf[4096];
  for (;;) {
    pollfd p{s.fd, POLLIN, 0};
    const int r = ::poll(&p, 1, 10000);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return error(env, atom(env, "timeout"));
    const ssize_t n = ::read(s.fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return errno_error(env, errno);
    if (n == 0) break;
    answer.append(buf, static_cast<std::size_t>(n));
    if (answer.size() > 8192) break;
  }
  if (answer == "K" && pair) {
    const int kept = mine.fd;
    mine.fd = -1;
    return enif_make_tuple2(env, atom(env, "ok"), enif_make_int(env, kept));
  }
  if (answer == "K") return atom(env, "ok");
  if (answer.empty()) return error(env, atom(env, "worker_closed"));
  ERL_NIF_TERM text;
  unsigned char* p = enif_make_new_binary(env, answer.size() - 1, &text);
  std::memcpy(p, answer.data() + 1, answer.size() - 1);
  return error(env, enif_make_tuple2(env, atom(env, "python"), text));
}

// ---- embedded events: batches of ready fds ---------------------------------------------
//
// The selects of a pool's connections all report to one process, the pool's hub
// (erpy_reactor.erl). It takes every readiness message waiting in its mailbox and submits
// them as ONE light job (a Batch): a context thread takes the GIL once and calls
// erpy.reactor._ready(fd, event) for each, no request map, no answer to decode. When a
// protocol says to wait again (read or write), the context thread re-arms that select for
// the hub itself; anything else ("close", an error) is sent to the connection's owner as
// {ConnRef, Answer}. The batch answers the hub {Ref, {ok, done}}. Callbacks into Erlang go
// to the hub, which hands them to the owner of the connection running (running/1).
// A connection whose callback runs past its timeout: expire/2 cancels the batch (Python is
// interrupted) after giving its other connections back to the poller.

namespace {

enum class Next { Read, Write, Close, Error, Bad };

// erpy.reactor._ready(fd, "read" | "write"); the GIL held. Error: a Python exception is
// pending.
Next call_ready(int fd, bool write) {
  // Kept for the VM's life, as the interpreter is (runtime.hpp).
  static PyObject* ready = nullptr;
  static PyObject* s_read = nullptr;
  static PyObject* s_write = nullptr;
  static PyObject* s_close = nullptr;
  if (!ready) {
    PyObject* mod = PyImport_ImportModule("erpy.reactor");
    if (!mod) return Next::Error;
    PyObject* f = PyObject_GetAttrString(mod, "_ready");
    Py_DECREF(mod);
    if (!f) return Next::Error;
    s_read = PyUnicode_InternFromString("read");
    s_write = PyUnicode_InternFromString("write");
    s_close = PyUnicode_InternFromString("close");
    if (!s_read || !s_write || !s_close) {
      Py_DECREF(f);
      return Next::Error;
    }
    ready = f;
  }
  py::PyRef fd_obj = py::PyRef::steal(PyLong_FromLong(fd));
  if (!fd_obj) return Next::Error;
  PyObject* args[2] = {fd_obj.get(), write ? s_write : s_read};
  py::PyRef r = py::PyRef::steal(PyObject_Vectorcall(ready, args, 2, nullptr));
  if (!r) return Next::Error;
  auto is = [&](PyObject* s) { return r.get() == s || (PyUnicode_Check(r.get()) && PyUnicode_Compare(r.get(), s) == 0); };
  if (is(s_read)) return Next::Read;
  if (is(s_write)) return Next::Write;
  if (is(s_close)) return Next::Close;
  PyErr_Clear();  // (a failed comparison)
  return Next::Bad;
}

// One fd of a batch. Pending until the context thread takes it (Running, then Done) or
// expire/2 gives it back to the poller (Returned).
enum class EntryState { Pending, Running, Done, Returned };

struct Entry {
  ResourcePtr<Conn> conn;
  bool write = false;
  EntryState state = EntryState::Pending;
};

// Lock order: the GIL, then Batch::m, then Conn::m (and the pool mutex after Batch::m in
// expire/2; the pool never takes ours).
struct Batch {
  std::mutex m;
  std::vector<Entry> entries;  // guarded by m (append/2 adds until `started`)
  bool started = false;        // guarded by m: closed to appends (append/2 says started)
  int running = -1;            // guarded by m
  std::int64_t started_ns = 0;  // guarded by m: when `running` started
};

ErlNifResourceType* g_batch_type = nullptr;

// A message to the connection's owner: {ConnRef, Answer}, Answer made in `msg`.
void tell_owner(Conn* c, MsgEnv msg, ERL_NIF_TERM answer) {
  ErlNifEnv* e = msg.get();
  enif_send(nullptr, &c->owner_pid, e, enif_make_tuple2(e, enif_make_copy(e, c->ref), answer));
}

// The event of `c` has ended with `next`: re-arm its select for the hub, or (closed
// meanwhile) nothing, or (its owner watches) tell the owner. Returns true if the owner
// is still to be told what `next` says (close, an error). `m` of c NOT held. `env`: a
// NIF's, or null on a context thread.
bool settle(ErlNifEnv* env, Conn* c, Next next) {
  std::lock_guard<std::mutex> lock(c->m);
  c->in_python = false;
  c->in_flight = false;
  const bool notify = c->notify_end;
  c->notify_end = false;
  if (c->stop_pending) {
    c->stop_pending = false;
    stop_now(env, c);
    return false;  // the owner gave up on this connection: it is closed now
  }
  if ((next == Next::Read || next == Next::Write) && !notify && !c->stopping) {
    const int fd = c->fd.load();
    const auto mode = next == Next::Read ? ERL_NIF_SELECT_READ : ERL_NIF_SELECT_WRITE;
    c->selected.store(true);
    if (fd >= 0 && enif_select(env, static_cast<ErlNifEvent>(fd), mode, c, &c->hub, g_undefined) >= 0) return false;
  }
  return true;
}

ERL_NIF_TERM next_answer(ErlNifEnv* e, Next next, const ConvertOptions& co) {
  switch (next) {
    case Next::Read: return enif_make_tuple2(e, atom(e, "ok"), g_read);
    case Next::Write: return enif_make_tuple2(e, atom(e, "ok"), g_write);
    case Next::Close: return enif_make_tuple2(e, atom(e, "ok"), g_close);
    case Next::Bad: return error(e, atom(e, "bad_mode"));
    case Next::Error: break;
  }
  try {
    throw py::PythonError();  // exception_answer reads the exception being handled
  } catch (...) {
    return exception_answer(e, co);
  }
}

// One connection's event on the context thread, the GIL held.
void run_one(Conn* c, bool write, const ConvertOptions& co) noexcept {
  int fd;
  {
    std::lock_guard<std::mutex> lock(c->m);
    fd = c->fd.load();
    if (c->stopping || fd < 0) {
      // Its owner closes it (a timeout, erpy_reactor:close, its death): nothing to run.
      c->in_flight = false;
      c->notify_end = false;
      return;
    }
    c->in_python = true;
  }
  Next next = Next::Error;
  try {
    next = call_ready(fd, write);
  } catch (...) {
    // (PyRef throws nothing here; this keeps the hook noexcept whatever changes.)
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, "erpy: reactor event failed");
  }
  if (!settle(nullptr, c, next)) {
    if (next == Next::Error) PyErr_Clear();
    return;
  }
  MsgEnv msg = MsgEnv::take();
  const ERL_NIF_TERM answer = next_answer(msg.get(), next, co);
  tell_owner(c, std::move(msg), answer);
}

// The JobHook of a batch: req is the Batch resource.
ERL_NIF_TERM run_batch(Job& job, MsgEnv& msg) noexcept {
  auto* b = get_resource<Batch>(job.env.get(), job.req, g_batch_type);
  if (b) {
    const ConvertOptions& co = job.pool->options().convert;
    // What the hub appends while this runs is run too: under load the context stays in
    // one job (no wake-up, no new job, one GIL hold). Closed when nothing is left, or
    // after kMaxRun events, so the pool's other jobs (a new connection's _open) get
    // their turn.
    constexpr std::size_t kMaxRun = 256;
    for (std::size_t i = 0;; ++i) {
      Conn* c;
      bool write;
      {
        std::lock_guard<std::mutex> lock(b->m);
        if (i >= b->entries.size() || i >= kMaxRun) {
          b->started = true;  // closed: the hub submits a new batch
          if (i >= b->entries.size()) break;
        }
        Entry& en = b->entries[i];
        if (en.state != EntryState::Pending) continue;  // given back by expire/2
        en.state = EntryState::Running;
        b->running = static_cast<int>(i);
        b->started_ns = mono_ns();
        c = en.conn.get();  // (the entry keeps it; the vector may grow meanwhile)
        write = en.write;
      }
      run_one(c, write, co);
      std::lock_guard<std::mutex> lock(b->m);
      b->entries[i].state = EntryState::Done;
      b->running = -1;
    }
  }
  msg = MsgEnv::take();
  return enif_make_tuple2(msg.get(), atom(msg.get(), "ok"), atom(msg.get(), "done"));
}

}  // namespace

bool open_batch_type(ErlNifEnv* env, ErlNifResourceFlags flags) {
  ErlNifResourceTypeInit init{};
  init.dtor = destroy_resource<Batch>;
  ErlNifResourceFlags tried;
  g_batch_type = enif_open_resource_type_x(env, "erpy_reactor_batch", &init, flags, &tried);
  return g_batch_type != nullptr;
}

namespace {

// Adds the connections of a list of select messages to `b` (`b->m` held).
void add_entries(ErlNifEnv* env, Batch* b, ERL_NIF_TERM list) {
  ERL_NIF_TERM head;
  while (enif_get_list_cell(env, list, &head, &list)) {
    // A select message: {select, Res, undefined, ready_input | ready_output}.
    int arity;
    const ERL_NIF_TERM* t;
    Conn* c = nullptr;
    if (!enif_get_tuple(env, head, &arity, &t) || arity != 4 || !(c = get_conn(env, t[1]))) continue;
    std::lock_guard<std::mutex> lock(c->m);
    if (c->stopping || !c->bound) continue;
    c->in_flight = true;
    c->notify_end = false;
    Entry en;
    en.conn = ResourcePtr<Conn>::share(c);
    en.write = enif_is_identical(t[3], g_ready_output);
    b->entries.push_back(std::move(en));
  }
}

}  // namespace

ERL_NIF_TERM nif_batch(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  Runtime& rt = Runtime::get();
  auto* ph = get_resource<PoolHandle>(env, argv[0], rt.types.pool);
  if (!ph || !enif_is_ref(env, argv[1]) || !enif_is_list(env, argv[2])) return enif_make_badarg(env);
  ResourcePtr<Batch> b = make_resource<Batch>(g_batch_type);
  {
    std::lock_guard<std::mutex> lock(b->m);  // (nobody else knows it yet)
    add_entries(env, b.get(), argv[2]);
  }
  if (b->entries.empty()) return atom(env, "empty");
  ResourcePtr<Job> job = make_resource<Job>(rt.types.job);
  job->env = OwnedEnv::alloc();
  job->ref = enif_make_copy(job->env.get(), argv[1]);
  job->req = b.term(job->env.get());
  job->pool = ph->pool;
  job->hook = run_batch;
  job->blocking = true;  // the answer and callbacks come as messages
  enif_self(env, &job->caller);
  if (!ph->pool->submit(job, -1)) {
    for (Entry& en : b->entries) {
      std::lock_guard<std::mutex> lock(en.conn->m);
      en.conn->in_flight = false;
    }
    return error(env, atom(env, "pool_closed"));
  }
  return enif_make_tuple3(env, atom(env, "ok"), job.term(env), b.term(env));
}

ERL_NIF_TERM nif_append(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  auto* b = get_resource<Batch>(env, argv[0], g_batch_type);
  if (!b || !enif_is_list(env, argv[1])) return enif_make_badarg(env);
  std::lock_guard<std::mutex> lock(b->m);
  if (b->started) return atom(env, "started");
  add_entries(env, b, argv[1]);
  return atom(env, "ok");
}

ERL_NIF_TERM nif_running(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  auto* b = get_resource<Batch>(env, argv[0], g_batch_type);
  if (!b) return enif_make_badarg(env);
  std::lock_guard<std::mutex> lock(b->m);
  if (b->running < 0) return atom(env, "none");
  Conn* c = b->entries[static_cast<std::size_t>(b->running)].conn.get();
  return enif_make_tuple2(env, enif_make_pid(env, &c->owner_pid), enif_make_copy(env, c->ref));
}

ERL_NIF_TERM nif_expire(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  Runtime& rt = Runtime::get();
  auto* job = get_resource<Job>(env, argv[0], rt.types.job);
  auto* b = get_resource<Batch>(env, argv[1], g_batch_type);
  if (!job || !b || !job->pool) return enif_make_badarg(env);
  Conn* late = nullptr;
  {
    std::lock_guard<std::mutex> lock(b->m);
    if (b->running < 0) {
      bool left = false;
      for (const Entry& en : b->entries) left = left || en.state == EntryState::Pending;
      // Queued (the pool's contexts are busy): look again a little later.
      return left ? enif_make_tuple2(env, atom(env, "wait"), enif_make_int(env, 100)) : atom(env, "done");
    }
    Conn* c = b->entries[static_cast<std::size_t>(b->running)].conn.get();
    if (c->timeout_ms < 0) return enif_make_tuple2(env, atom(env, "wait"), enif_make_int(env, 1000));
    const std::int64_t left_ms = c->timeout_ms - (mono_ns() - b->started_ns) / 1000000;
    if (left_ms > 0) return enif_make_tuple2(env, atom(env, "wait"), enif_make_int(env, static_cast<int>(left_ms)));
    late = c;
    b->started = true;  // nothing more joins a batch being cancelled
    for (Entry& en : b->entries) {
      if (en.state != EntryState::Pending) continue;
      en.state = EntryState::Returned;
    }
  }
  // The others go back to the poller: a level-triggered select fires again at once.
  for (Entry& en : b->entries) {
    if (en.state != EntryState::Returned) continue;
    const Next next = en.write ? Next::Write : Next::Read;
    if (settle(env, en.conn.get(), next)) {
      MsgEnv msg = MsgEnv::take();
      const ERL_NIF_TERM answer = next_answer(msg.get(), next, ConvertOptions{});
      tell_owner(en.conn.get(), std::move(msg), answer);
    }
  }
  ERL_NIF_TERM answer;
  switch (job->pool->cancel(job, env, &answer)) {
    case Pool::Outcome::Canceled: break;
    case Pool::Outcome::Sent: return atom(env, "done");  // it ended just now: {Ref, {ok, done}} comes
    case Pool::Outcome::Done: return atom(env, "finished");  // ended, and no message comes
  }
  return enif_make_tuple3(env, atom(env, "timeout"), enif_make_pid(env, &late->owner_pid),
                          enif_make_copy(env, late->ref));
}

ERL_NIF_TERM nif_watch(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  Conn* c = get_conn(env, argv[0]);
  if (!c) return enif_make_badarg(env);
  std::lock_guard<std::mutex> lock(c->m);
  if (!c->in_flight) return atom(env, "idle");
  c->notify_end = true;
  return atom(env, "busy");
}

}  // namespace erpy::nif::reactor
