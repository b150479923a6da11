#include "reactor.hpp"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <string>

#include "resource.hpp"

namespace erpy::nif::reactor {

namespace {

// One handed-over fd. `fd` is -1 once closed. Once the fd has been given to enif_select,
// only the stop callback closes it: the VM's poller may still hold it until then.
struct Conn {
  std::atomic<int> fd{-1};
  std::atomic<bool> selected{false};
  std::atomic<bool> stopping{false};
  ErlNifMonitor owner{};
};

ErlNifResourceType* g_conn_type = nullptr;

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
// closes it). Idempotent; `env`: the caller's or a callback's.
void stop(ErlNifEnv* env, Conn* c) {
  if (c->stopping.exchange(true)) return;
  const int fd = c->fd.load();
  if (fd < 0) return;
  if (!c->selected.load()) {
    c->fd.store(-1);
    ::close(fd);
    return;
  }
  enif_select(env, static_cast<ErlNifEvent>(fd), ERL_NIF_SELECT_STOP, c, nullptr, atom(env, "undefined"));
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

bool open_types(ErlNifEnv* env, ErlNifResourceFlags flags) {
  ErlNifResourceTypeInit init{};
  init.dtor = conn_dtor;
  init.stop = conn_stop;
  init.down = conn_down;
  ErlNifResourceFlags tried;
  g_conn_type = enif_open_resource_type_x(env, "erpy_reactor_fd", &init, flags, &tried);
  return g_conn_type != nullptr;
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
  if (enif_is_identical(argv[1], atom(env, "read"))) mode = ERL_NIF_SELECT_READ;
  else if (enif_is_identical(argv[1], atom(env, "write"))) mode = ERL_NIF_SELECT_WRITE;
  else return enif_make_badarg(env);
  const int fd = c->fd.load();
  if (fd < 0 || c->stopping.load()) return error(env, atom(env, "closed"));
  c->selected.store(true);
  const int r = enif_select(env, static_cast<ErlNifEvent>(fd), mode, c, nullptr, atom(env, "undefined"));
  if (r < 0) return error(env, atom(env, "select_failed"));
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
  const int fd = c->fd.load();
  return fd < 0 || c->stopping.load() ? atom(env, "closed") : enif_make_int(env, fd);
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
  if (!enif_get_int(env, argv[1], &os_pid) || !get_fd(env, argv[2], &fd)) return enif_make_badarg(env);
  if (!enif_inspect_binary(env, argv[3], &payload) || payload.size == 0 || payload.size > (1 << 20)) {
    return enif_make_badarg(env);
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
  if (answer == "K") return atom(env, "ok");
  if (answer.empty()) return error(env, atom(env, "worker_closed"));
  ERL_NIF_TERM text;
  unsigned char* p = enif_make_new_binary(env, answer.size() - 1, &text);
  std::memcpy(p, answer.data() + 1, answer.size() - 1);
  return error(env, enif_make_tuple2(env, atom(env, "python"), text));
}

}  // namespace erpy::nif::reactor
