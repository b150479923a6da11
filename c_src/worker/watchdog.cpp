#include "watchdog.hpp"

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <poll.h>
#include <pthread.h>
#include <unistd.h>

#include <chrono>
#include <csignal>

#include "etf/encode.hpp"
#include "frame_head.hpp"
#include "process.hpp"

namespace erpy::worker {
namespace {

constexpr auto kTick = std::chrono::milliseconds(5);

// Set by the watchdog just before it signals the main thread; consumed by the handler.
std::atomic<bool> g_armed{false};
pthread_t g_main_thread;
// The signal whose Python handler raises KeyboardInterrupt (see python_interrupt).
std::atomic<int> g_python_signal{SIGINT};

int interrupt_signal() { return SIGRTMIN + 3; }

extern "C" void on_interrupt_signal(int) {
  // Async-signal-safe: an atomic exchange and PyErr_SetInterruptEx (documented as such).
  if (g_armed.exchange(false)) PyErr_SetInterruptEx(g_python_signal.load(std::memory_order_relaxed));
}

PyObject* raise_keyboard_interrupt(PyObject*, PyObject*) {
  PyErr_SetNone(PyExc_KeyboardInterrupt);
  return nullptr;
}

PyMethodDef kRaiseInterrupt = {"_erpy_interrupt", raise_keyboard_interrupt, METH_VARARGS,
                               "Raises KeyboardInterrupt: erpy's timeout and cancel."};

// PyErr_SetInterruptEx(SIGINT) does nothing when Python's SIGINT handler is SIG_IGN, as
// it is in a worker started by a VM with SIGINT ignored (nohup, `trap '' INT`, erl +Bi),
// or after user code ignored it. So the interrupt is a signal of its own that only
// Python's table knows (nobody sends it at the OS level), whose Python handler raises
// KeyboardInterrupt: what SIGINT is set to no longer matters. SIGINT is the fallback.
void install_python_interrupt() {
  const int sig = SIGRTMIN + 4;
  PyObject* fn = PyCFunction_New(&kRaiseInterrupt, nullptr);
  PyObject* mod = fn ? PyImport_ImportModule("signal") : nullptr;
  PyObject* old = mod ? PyObject_CallMethod(mod, "signal", "iO", sig, fn) : nullptr;
  if (old) {
    g_python_signal = sig;
  } else {
    PyErr_Clear();
  }
  Py_XDECREF(old);
  Py_XDECREF(mod);
  Py_XDECREF(fn);
}

std::int64_t now_ms() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}

// Erlang is gone while user code runs: nobody will read an answer.
[[noreturn]] void exit_now() {
  process::end_group();
  _exit(3);
}

}  // namespace

void Watchdog::start() {
  g_main_thread = pthread_self();
  install_python_interrupt();
  struct sigaction sa{};
  sa.sa_handler = on_interrupt_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: a blocking call must return EINTR and check signals
  sigaction(interrupt_signal(), &sa, nullptr);
  // The signal mask is inherited across exec: a launcher that blocked our signal would
  // leave every interrupt pending forever.
  sigset_t ours;
  sigemptyset(&ours);
  sigaddset(&ours, interrupt_signal());
  pthread_sigmask(SIG_UNBLOCK, &ours, nullptr);
  thread_ = std::thread([this] { run(); });
}

Watchdog::~Watchdog() {
  quit_ = true;
  if (thread_.joinable()) thread_.join();
}

void Watchdog::enter(std::int64_t id, std::int64_t deadline_ms) {
  std::lock_guard<std::mutex> lock(mu_);
  stack_.push_back({id, deadline_ms});
}

void Watchdog::leave() {
  std::lock_guard<std::mutex> lock(mu_);
  if (!stack_.empty()) stack_.pop_back();
  g_armed = false;
}

void Watchdog::cancel(std::int64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  bool running = false;
  for (Active& a : stack_) {
    if (a.id == id) a.stop = running = true;
  }
  if (running) return;
  // Not started yet (pipelined behind another request), or already answered: remember
  // it for a while; run_request skips it if it comes.
  if (precancelled_.size() >= kMaxPrecancelled) precancelled_.erase(precancelled_.begin());
  precancelled_.push_back(id);
}

bool Watchdog::take_precancelled(std::int64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto it = precancelled_.begin(); it != precancelled_.end(); ++it) {
    if (*it == id) {
      precancelled_.erase(it);
      return true;
    }
  }
  return false;
}

bool Watchdog::innermost_stopped() {
  std::lock_guard<std::mutex> lock(mu_);
  return !stack_.empty() && stack_.back().stop;
}

bool Watchdog::take_stashed(ByteBuffer& out) {
  if (!stash_nonempty_.load(std::memory_order_acquire)) return false;
  std::lock_guard<std::mutex> lock(mu_);
  if (stash_.empty()) return false;
  out = std::move(stash_.front());
  stash_.pop_front();
  stash_nonempty_ = !stash_.empty();
  return true;
}

void Watchdog::defer(ByteBuffer&& frame) {
  std::lock_guard<std::mutex> lock(mu_);
  deferred_.push_back(std::move(frame));
}

bool Watchdog::take_deferred(ByteBuffer& out) {
  std::lock_guard<std::mutex> lock(mu_);
  if (deferred_.empty()) return false;
  out = std::move(deferred_.front());
  deferred_.pop_front();
  return true;
}

bool Watchdog::withdraw(std::int64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  for (auto* q : {&deferred_, &stash_}) {
    for (auto it = q->begin(); it != q->end(); ++it) {
      const auto h = frame_head(etf::Bytes(it->data(), it->size()));
      if (h && h->kind == "request" && h->id == id) {
        q->erase(it);
        stash_nonempty_ = !stash_.empty();
        return true;
      }
    }
  }
  return false;
}

void Watchdog::answer_withdrawn(std::int64_t id) {
  ByteBuffer out;
  Channel::begin_tuple_frame(out, 2, "withdrawn");
  etf::put_integer(out, id);
  (void)ch_.write_frame(out);  // a closed pipe is seen by whoever reads next
}

void Watchdog::fire() {
  g_armed = true;
  pthread_kill(g_main_thread, interrupt_signal());
}

void Watchdog::run() {
  while (!quit_) {
    std::this_thread::sleep_for(kTick);
    bool busy;
    {
      std::lock_guard<std::mutex> lock(mu_);
      busy = !stack_.empty();
    }
    if (!busy) continue;
    read_while_busy();
    std::lock_guard<std::mutex> lock(mu_);
    if (stack_.empty()) continue;
    const std::int64_t now = now_ms();
    for (Active& a : stack_) {
      if (a.deadline_ms && now >= a.deadline_ms) a.stop = true;
    }
    // Keep signalling until the request ends: user code may swallow one interrupt.
    if (stack_.back().stop) fire();
  }
}

void Watchdog::read_while_busy() {
  // The main thread holds the read mutex except while it runs user code.
  std::unique_lock<std::mutex> reading(ch_.read_mutex(), std::try_to_lock);
  if (!reading.owns_lock()) return;
  for (;;) {
    if (!ch_.buffered()) {
      pollfd p{ch_.in_fd(), POLLIN, 0};
      if (poll(&p, 1, 0) <= 0) return;
      if (!(p.revents & POLLIN)) {
        // Erlang closed the port while we run: nobody will read an answer.
        if (p.revents & (POLLHUP | POLLERR)) exit_now();
        return;
      }
    }
    ByteBuffer frame;
    std::size_t oversize = 0;
    if (ch_.read_frame(frame, max_frame_, oversize) == Channel::Read::eof) exit_now();
    if (oversize) continue;
    const auto h = frame_head(etf::Bytes(frame.data(), frame.size()));
    if (h && h->kind == "cancel" && h->arity == 2 && h->id) {
      cancel(*h->id);
    } else if (h && h->kind == "withdraw" && h->arity == 2 && h->id) {
      if (withdraw(*h->id)) answer_withdrawn(*h->id);
    } else {
      std::lock_guard<std::mutex> lock(mu_);
      stash_.push_back(std::move(frame));
      stash_nonempty_ = true;
    }
  }
}

}  // namespace erpy::worker
