#include "process.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sys/prctl.h>
#include <signal.h>
#include <sys/resource.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

namespace erpy::worker::process {
namespace {

// Read by the at-fork handler in the child, where only async-signal-safe calls are
// allowed: fixed arrays, filled before user code runs.
constexpr std::size_t kMaxFds = 8;
std::array<std::atomic<int>, kMaxFds> g_protected;
std::array<std::atomic<const int*>, kMaxFds> g_private;
std::atomic<int> g_null{-1};
std::atomic<bool> g_forked{false};
std::once_flag g_registered;

void in_child() noexcept {
  g_forked.store(true, std::memory_order_relaxed);
  const int null_fd = g_null.load(std::memory_order_relaxed);
  for (auto& slot : g_protected) {
    const int fd = slot.load(std::memory_order_relaxed);
    if (fd < 0) continue;
    // dup3 keeps the copy close-on-exec; if /dev/null could not be opened the fd is closed.
    if (null_fd < 0 || dup3(null_fd, fd, O_CLOEXEC) < 0) close(fd);
  }
  for (auto& slot : g_private) {
    const int* p = slot.load(std::memory_order_relaxed);
    if (p && *p >= 0) close(*p);
  }
}

void register_handler() {
  std::call_once(g_registered, [] {
    for (auto& s : g_protected) s.store(-1);
    g_null.store(open("/dev/null", O_RDWR | O_CLOEXEC));
    pthread_atfork(nullptr, nullptr, in_child);
  });
}

void set_cloexec(int fd) noexcept {
  const int flags = fcntl(fd, F_GETFD);
  if (flags >= 0) (void)fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
}

struct Resource {
  const char* name;
  int resource;
};

constexpr Resource kResources[] = {
    {"as", RLIMIT_AS},         {"cpu", RLIMIT_CPU},     {"nofile", RLIMIT_NOFILE},
    {"nproc", RLIMIT_NPROC},   {"fsize", RLIMIT_FSIZE}, {"core", RLIMIT_CORE},
};

}  // namespace

void own_session() noexcept {
  // Fails (harmlessly) when the worker already leads a process group, as under
  // erl_child_setup, which makes every port program a session leader.
  if (getpgid(0) != getpid() && setsid() < 0) (void)setpgid(0, 0);
}

bool keep_pipe_open(int fd) noexcept {
  const pid_t pid = fork();
  if (pid < 0) return false;
  if (pid > 0) return true;
  // The child: async-signal-safe calls only (the parent's Python must not run here).
  if (fd > 0) (void)close_range(0, static_cast<unsigned>(fd) - 1, 0);
  (void)close_range(static_cast<unsigned>(fd) + 1, ~0U, 0);
  signal(SIGINT, SIG_IGN);
  (void)prctl(PR_SET_NAME, "erpy-pipe-keep", 0, 0, 0);
  for (;;) {
    // No events asked for: data for the worker is never read here; POLLHUP (Erlang
    // closed its end, or the VM is gone) and POLLERR are always reported.
    pollfd p{fd, 0, 0};
    if (poll(&p, 1, -1) > 0 && (p.revents & (POLLHUP | POLLERR | POLLNVAL))) _exit(0);
  }
}

void protect(int fd) noexcept {
  register_handler();
  set_cloexec(fd);
  for (auto& slot : g_protected) {
    int expected = -1;
    if (slot.load() == fd) return;
    if (slot.compare_exchange_strong(expected, fd)) return;
  }
}

void close_in_children(const int* fd) noexcept {
  register_handler();
  for (auto& slot : g_private) {
    const int* expected = nullptr;
    if (slot.load() == fd) return;
    if (slot.compare_exchange_strong(expected, fd)) return;
  }
}

bool forked_child() noexcept { return g_forked.load(std::memory_order_relaxed); }

void end_group() noexcept {
  const pid_t self = getpid();
  if (getpgrp() != self) return;  // not our group: never the launcher's
  // A member may fork while we look: rounds until one finds nobody (killed processes
  // fork no more).
  for (int round = 0; round < 5; ++round) {
    DIR* proc = opendir("/proc");
    if (!proc) return;
    bool found = false;
    while (const dirent* e = readdir(proc)) {
      char* end = nullptr;
      const long pid = std::strtol(e->d_name, &end, 10);
      if (*end != '\0' || pid <= 0 || pid == self) continue;
      if (getpgid(static_cast<pid_t>(pid)) == self) {
        kill(static_cast<pid_t>(pid), SIGKILL);
        found = true;
      }
    }
    closedir(proc);
    if (!found) return;
  }
}

std::string set_limits(const std::vector<Limit>& limits) {
  for (const Limit& l : limits) {
    const Resource* r = nullptr;
    for (const Resource& k : kResources) {
      if (l.name == k.name) r = &k;
    }
    if (!r) return "unknown rlimit " + l.name;
    rlimit cur{};
    if (getrlimit(r->resource, &cur) != 0) return "getrlimit(" + l.name + "): " + std::strerror(errno);
    rlim_t v = l.value ? static_cast<rlim_t>(*l.value) : RLIM_INFINITY;
    if (l.value && (*l.value >= static_cast<std::uint64_t>(RLIM_INFINITY))) v = RLIM_INFINITY;
    if (cur.rlim_max != RLIM_INFINITY && (v == RLIM_INFINITY || v > cur.rlim_max)) v = cur.rlim_max;
    const rlimit want{v, v};
    if (setrlimit(r->resource, &want) != 0) {
      return "setrlimit(" + l.name + ", " + std::to_string(static_cast<unsigned long long>(v)) +
             "): " + std::strerror(errno);
    }
  }
  return {};
}

}  // namespace erpy::worker::process
