#include "port_worker.hpp"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "channel.hpp"
#include "etf/decode.hpp"
#include "etf/encode.hpp"
#include "output_capture.hpp"
#include "process.hpp"
#include "py/request_etf.hpp"
#include "py/runner.hpp"
#include "watchdog.hpp"

namespace erpy::worker {
namespace {

using py::ByteBuffer;
using py::PyRef;
using py::PythonError;

py::Codec* g_codec = nullptr;

constexpr std::size_t kDefaultMax = 10 * 1024 * 1024;

std::int64_t as_int64(PyObject* o) {
  const long long v = PyLong_AsLongLong(o);
  if (v == -1 && PyErr_Occurred()) throw PythonError();
  return v;
}

std::int64_t wall_ms() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(system_clock::now().time_since_epoch()).count();
}

std::string_view read_kind(etf::Reader& r) {
  // Kinds are atoms: a view into the frame (ASCII, so no conversion buffer is needed).
  const std::uint8_t tag = r.u8("frame kind");
  std::size_t len;
  if (tag == etf::kSmallAtomUtf8 || tag == etf::kSmallAtom) {
    len = r.u8("frame kind");
  } else if (tag == etf::kAtomUtf8 || tag == etf::kAtom) {
    len = r.u16("frame kind");
  } else {
    r.fail("a frame must start with an atom");
  }
  return etf::as_chars(r.take(len, "frame kind"));
}

// Python's exception classes of the `erlang` object, from erpy.erlang.
struct ErlangErrors {
  PyRef error, timeout, port;
};

class PortWorker;
PortWorker* g_worker = nullptr;

class PortWorker {
 public:
  PortWorker(py::Codec& codec, int in_fd, int out_fd)
      : codec_(codec), ch_(in_fd, out_fd), dog_(ch_, kDefaultMax), capture_(ch_) {}

  int serve();

  PyRef callback(const char* kind, PyObject* m, PyObject* f, PyObject* arg);
  void send_from_python(ByteBuffer& frame);
  PyRef self_pid();
  // The thread that serves requests (Python's id for it): erlang.* works there, and on
  // the reactor thread once it has its callback channel.
  unsigned long serving_thread() const noexcept { return serving_thread_; }

  // Port-mode reactor (python/erpy/reactor.py): erlang.call/apply/send from the reactor
  // thread go over a socket of their own (one end sent by erpy_reactor.erl with
  // SCM_RIGHTS, the other owned by an Erlang process per worker that runs them under the
  // pool's policy), never over the request pipe, which is the serving thread's. All of it
  // runs on the reactor thread with the GIL held, except its reads and writes.
  // False (fd not taken) if the thread's channel is alive.
  bool set_reactor_channel(int fd, std::int64_t timeout_ms);
  bool on_reactor_thread() const noexcept {
    return reactor_fd_ >= 0 && PyThread_get_thread_ident() == reactor_thread_;
  }
  PyRef reactor_callback(const char* kind, PyObject* m, PyObject* f, PyObject* arg);
  // The rest of a callback's reply frame after its id: the value, or ErlangError raised.
  PyRef callback_answer(etf::Reader& r);

 private:
  struct Request {
    std::int64_t id;
    // The caller's pid, undecoded: most code never asks for erlang.self(), and making an
    // erpy.Pid costs more than the rest of a small request. A view into the request's
    // frame, which outlives the request.
    etf::Bytes caller_raw;
    PyRef caller;  // made on first use
  };

  bool read_init();
  bool send_ready();
  void handle(ByteBuffer& frame);
  void run_request(std::int64_t id, etf::Reader& r);
  PyRef namespace_for_run();
  void reply_ok(std::int64_t id, PyObject* result);
  void reply_error(std::int64_t id, PyRef error_map);
  void reply_timeout(std::int64_t id);
  void finish_reply(etf::Bytes tail = {});
  bool write_frame(ByteBuffer& b, etf::Bytes tail = {});
  static etf::Bytes large_binary(PyObject* o);
  PyRef error_map_from_exception() { return runner_->error_from_exception(); }
  PyRef error_map(const char* type, const std::string& message) { return runner_->error(type, message); }
  bool read_next(ByteBuffer& frame, bool top_level);
  bool over_memory_limit() const;
  void load_erlang_errors();
  PyRef decode(etf::Reader& r) { return codec_.decode_term(r, dopts_); }

  py::Codec& codec_;
  Channel ch_;
  Watchdog dog_;
  OutputCapture capture_;
  std::size_t max_ = kDefaultMax;
  std::size_t max_memory_mb_ = 0;
  std::vector<process::Limit> limits_;
  py::DecodeOptions dopts_;
  py::EncodeOptions eopts_;
  std::vector<Request> stack_;
  bool held_ = false;
  PyRef held_ns_;
  std::int64_t next_callback_ = 1;
  PyRef erlang_module_;
  std::optional<py::Runner> runner_;
  ErlangErrors errors_;
  ByteBuffer out_;
  bool exiting_ = false;
  unsigned long serving_thread_ = 0;
  // The reactor's callback channel (see set_reactor_channel); -1: none. These are read
  // and written with the GIL held only (its I/O runs without the GIL, on a copy of fd).
  int reactor_fd_ = -1;
  unsigned long reactor_thread_ = 0;
  std::int64_t reactor_timeout_ms_ = 0;  // per callback; 0: none
  std::int32_t reactor_next_cb_ = 1;     // an int32, so Erlang reads it from the frame's head
  void close_reactor_channel();
};

// ---- serving ---------------------------------------------------------------------------

int PortWorker::serve() {
  serving_thread_ = PyThread_get_thread_ident();
  // Before any thread starts and any user code runs: see process.hpp.
  process::own_session();
  (void)process::keep_pipe_open(ch_.in_fd());
  process::protect(ch_.in_fd());
  process::protect(ch_.out_fd());
  process::close_in_children(ch_.spin_token_slot());
  ch_.enlarge_pipes();
  erlang_module_ = PyRef::check(PyImport_ImportModule("erpy.erlang"));
  runner_.emplace(codec_.types(), PyRef::borrow(erlang_module_.get()));
  load_erlang_errors();

  // The main thread owns the request pipe except while user code runs.
  std::unique_lock<std::mutex> reading(ch_.read_mutex());
  if (!read_init()) return 2;
  capture_.start();
  dog_.start();
  // Limits last, so the worker's own threads already have their stacks (`as`); a limit
  // that cannot be set stops the worker: it never serves without what the pool asked.
  if (const std::string failed = process::set_limits(limits_); !failed.empty()) {
    // Straight to Erlang's log: the output thread might not send a line before the exit.
    const std::string line = "erpy worker: rlimits: " + failed;
    Channel::begin_tuple_frame(out_, 3, "log");
    etf::put_atom(out_, "stderr");
    etf::put_binary(out_, etf::Bytes(reinterpret_cast<const std::uint8_t*>(line.data()), line.size()));
    write_frame(out_);
    return 4;
  }
  if (!send_ready()) return 2;
  ByteBuffer frame;
  while (!exiting_) {
    // A request that came while another waited for Erlang has its turn first.
    if (!dog_.take_deferred(frame) && !read_next(frame, true)) {
      break;
    }
    handle(frame);
    // A late interrupt meant for the request that just ended is dropped here.
    if (PyErr_CheckSignals() != 0) PyErr_Clear();
  }
  fflush(stdout);
  fflush(stderr);
  process::end_group();
  return 0;
}

void PortWorker::load_erlang_errors() {
  errors_.error = PyRef::check(PyObject_GetAttrString(erlang_module_.get(), "ErlangError"));
  errors_.timeout = PyRef::check(PyObject_GetAttrString(erlang_module_.get(), "ErlangTimeoutError"));
  errors_.port = PyRef::check(PyObject_GetAttrString(erlang_module_.get(), "ErlangPortError"));
}

// The first frame: {init, #{...}} (doc/protocol.md).
bool PortWorker::read_init() {
  ByteBuffer frame;
  if (!read_next(frame, true)) return false;
  PyRef init;
  try {
    PyRef msg = codec_.decode(etf::Bytes(frame.data(), frame.size()), dopts_);
    if (!PyTuple_Check(msg.get()) || PyTuple_GET_SIZE(msg.get()) != 2 ||
        !PyDict_Check(PyTuple_GET_ITEM(msg.get(), 1))) {
      return false;
    }
    init = PyRef::borrow(PyTuple_GET_ITEM(msg.get(), 1));
  } catch (const std::exception&) {
    PyErr_Clear();
    return false;
  }
  auto get = [&](const char* key) -> PyObject* {  // borrowed or null
    PyObject* v = PyDict_GetItemString(init.get(), key);
    return v == Py_None ? nullptr : v;
  };
  if (PyObject* v = get("max_message_size"); v && PyLong_Check(v)) {
    max_ = static_cast<std::size_t>(PyLong_AsUnsignedLongLong(v));
    dopts_.max_size = max_;  // a compressed term inflates no further than a frame may be
  }
  if (PyObject* v = get("spin_us"); v && PyLong_Check(v)) {
    PyObject* group = get("spin_group");
    PyObject* limit = get("spin_limit");
    const char* g = group && PyUnicode_Check(group) ? PyUnicode_AsUTF8(group) : nullptr;
    ch_.set_spin(static_cast<unsigned>(PyLong_AsUnsignedLong(v)),
                 g ? g : std::to_string(getppid()),
                 limit && PyLong_Check(limit) ? static_cast<unsigned>(PyLong_AsUnsignedLong(limit)) : 1);
  }
  if (PyObject* v = get("max_memory_mb"); v && PyLong_Check(v)) {
    max_memory_mb_ = static_cast<std::size_t>(PyLong_AsUnsignedLongLong(v));
  }
  // `none` is the atom for None on both sides; None itself means the default.
  if (PyObject* v = PyDict_GetItemString(init.get(), "none"); v && v != Py_None && PyUnicode_Check(v)) {
    dopts_.none = eopts_.none = PyUnicode_AsUTF8(v);
  }
  // rlimits: #{Name => Bytes | Seconds | Count | infinity}, checked by erpy_config.
  if (PyObject* v = get("rlimits"); v && PyDict_Check(v)) {
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(v, &pos, &key, &value)) {
      if (!PyUnicode_Check(key)) return false;
      process::Limit l{PyUnicode_AsUTF8(key), std::nullopt};
      if (PyLong_Check(value)) {
        l.value = PyLong_AsUnsignedLongLong(value);
        if (PyErr_Occurred()) return false;
      } else if (!PyUnicode_Check(value) || PyUnicode_CompareWithASCIIString(value, "infinity") != 0) {
        return false;
      }
      limits_.push_back(std::move(l));
    }
  }
  PyErr_Clear();
  dog_.set_max_frame(max_);
  return true;
}

bool PortWorker::send_ready() {
  out_.clear();
  Channel::begin_tuple_frame(out_, 2, "ready");
  etf::put_map_header(out_, 4);
  etf::put_atom(out_, "version");
  etf::put_integer(out_, kProtocolVersion);
  etf::put_atom(out_, "python");
  std::string v = Py_GetVersion();
  v = v.substr(0, v.find(' '));
  etf::put_binary(out_, etf::Bytes(reinterpret_cast<const std::uint8_t*>(v.data()), v.size()));
  etf::put_atom(out_, "pid");
  etf::put_integer(out_, getpid());
  etf::put_atom(out_, "gil");
#ifdef Py_GIL_DISABLED
  etf::put_atom(out_, "free_threaded");
#else
  etf::put_atom(out_, "shared");
#endif
  return write_frame(out_);
}

// Reads the next frame for the main thread: one the watchdog kept, or from the pipe with
// the GIL released. Signals that arrive while waiting are Python's to handle; at top level
// (between requests) any interrupt is stale and dropped.
bool PortWorker::read_next(ByteBuffer& frame, bool top_level) {
  for (;;) {
    if (dog_.take_stashed(frame)) return true;
    Channel::Read got;
    std::size_t oversize = 0;
    {
      py::GilRelease nogil;
      got = ch_.read_frame(frame, max_, oversize);
    }
    if (got == Channel::Read::eof) return false;
    if (got == Channel::Read::interrupted) {
      if (PyErr_CheckSignals() != 0) {
        if (top_level) {
          PyErr_Clear();
        } else {
          throw PythonError();
        }
      }
      continue;
    }
    if (oversize) {
      // Erlang checks sizes before sending, so this is a misbehaving peer: say so.
      PySys_WriteStderr("erpy worker: dropped a frame of %zu bytes (max %zu)\n", oversize, max_);
      continue;
    }
    return true;
  }
}

void PortWorker::handle(ByteBuffer& frame) {
  std::int64_t id = -1;
  try {
    etf::Reader r(etf::Bytes(frame.data(), frame.size()));
    if (r.u8("version") != etf::kVersion) r.fail_at(0, "expected version byte 131");
    const std::uint8_t tt = r.u8("frame");
    std::size_t arity = 0;
    if (tt == etf::kSmallTuple) arity = r.u8("frame arity");
    else if (tt == etf::kLargeTuple) arity = r.u32("frame arity");
    else r.fail("a frame must be a tuple");
    if (arity == 0) r.fail("empty frame");
    const std::string_view kind = read_kind(r);
    if (kind == "cancel" && arity == 2) {
      PyRef idobj = decode(r);
      dog_.cancel(as_int64(idobj.get()));
      return;
    }
    if (kind == "reset" && arity == 1) {
      held_ = false;
      held_ns_.reset();
      return;
    }
    if (kind == "hold" && arity == 1) {
      held_ = true;
      held_ns_.reset();
      return;
    }
    if (kind == "withdraw" && arity == 2) {
      // Taken back before it started (a request read during a callback's wait), or too
      // late: it ran, and its answer went out.
      PyRef idobj = decode(r);
      const std::int64_t wid = as_int64(idobj.get());
      if (dog_.withdraw(wid)) dog_.answer_withdrawn(wid);
      return;
    }
    if (kind == "reply") return;  // for a callback that was interrupted: too late now
    if ((kind != "request" && kind != "nested") || arity != 3) {
      r.fail("unknown frame " + std::string(kind) + "/" + std::to_string(arity));
    }
    PyRef idobj = decode(r);
    id = as_int64(idobj.get());
    run_request(id, r);
  } catch (const etf::DecodeError& e) {
    PyErr_Clear();
    if (id >= 0) reply_error(id, error_map("DecodeError", e.what()));
    else PySys_WriteStderr("erpy worker: bad frame: %s\n", e.what());
  } catch (const PythonError&) {
    PyRef err = error_map_from_exception();
    if (id >= 0) reply_error(id, std::move(err));
  }
}

// {request, Id, Request}: the request map (doc/protocol.md) read by the schema every mode
// shares (py/request.hpp).
void PortWorker::run_request(std::int64_t id, etf::Reader& r) {
  py::EtfRequestSource src(r, codec_, dopts_);
  py::Request req = py::parse_request(src);
  const std::int64_t deadline = req.deadline_ms;
  // A pipelined request may have waited behind another one past its deadline, or been
  // cancelled before it started: then it does not run at all.
  if (dog_.take_precancelled(id) || (deadline && wall_ms() >= deadline)) {
    reply_timeout(id);
    return;
  }
  stack_.push_back({id, src.caller_bytes(), PyRef()});
  dog_.enter(id, deadline);
  PyRef result;
  bool failed = false;
  {
    // User code runs without the read mutex, so the watchdog can see cancel frames.
    ch_.read_mutex().unlock();
    try {
      PyRef ns = py::uses_namespace(req.kind) ? namespace_for_run() : PyRef();
      result = runner_->execute(req, ns.get());
    } catch (const PythonError&) {
      failed = true;
    } catch (...) {
      ch_.read_mutex().lock();
      dog_.leave();
      stack_.pop_back();
      throw;
    }
    ch_.read_mutex().lock();
  }
  // Stopped by its deadline or a cancel: the KeyboardInterrupt (or ErlangTimeoutError)
  // is ours, not the user's, so the caller is told `timeout`.
  const bool stopped = failed && dog_.innermost_stopped();
  dog_.leave();
  stack_.pop_back();
  if (stopped) {
    PyErr_Clear();
    reply_timeout(id);
  } else if (failed) {
    reply_error(id, error_map_from_exception());
  } else {
    reply_ok(id, result.get());
  }
}

void PortWorker::reply_timeout(std::int64_t id) {
  Channel::begin_tuple_frame(out_, 3, "error");
  etf::put_integer(out_, id);
  etf::put_atom(out_, "timeout");
  finish_reply();
}

// A held worker keeps one namespace; otherwise every request gets a fresh one.
PyRef PortWorker::namespace_for_run() {
  if (held_ && held_ns_) return PyRef::borrow(held_ns_.get());
  PyRef ns = runner_->fresh_namespace();
  if (held_) held_ns_ = PyRef::borrow(ns.get());
  return ns;
}

// ---- replies -------------------------------------------------------------------------

void PortWorker::reply_ok(std::int64_t id, PyObject* result) {
  Channel::begin_tuple_frame(out_, 3, "ok");
  etf::put_integer(out_, id);
  // A large bytes or str result goes from the object to the pipe, not through out_.
  if (const etf::Bytes big = large_binary(result); !big.empty() && out_.size() - 4 + 5 + big.size() <= max_) {
    etf::put_binary_header(out_, big.size());
    finish_reply(big);
    return;
  }
  try {
    codec_.encode_append(out_, result, eopts_);
  } catch (...) {
    // The result has no ETF form: the caller gets a clear error instead.
    try {
      throw;
    } catch (const etf::EncodeError& e) {
      PyErr_Clear();
      reply_error(id, error_map("EncodeError", e.what()));
    } catch (const PythonError&) {
      reply_error(id, error_map_from_exception());
    }
    return;
  }
  const std::size_t size = out_.size() - 4;
  if (size > max_) {
    Channel::begin_tuple_frame(out_, 3, "error");
    etf::put_integer(out_, id);
    etf::put_tuple_header(out_, 3);
    etf::put_atom(out_, "message_too_large");
    etf::put_integer(out_, static_cast<std::int64_t>(size));
    etf::put_integer(out_, static_cast<std::int64_t>(max_));
  }
  finish_reply();
}

// Writes the answer in out_. Before the last answer of a top-level request, a worker over
// its memory limit says it leaves, so Erlang never hands it another request.
etf::Bytes PortWorker::large_binary(PyObject* o) {
  constexpr Py_ssize_t kLarge = 64 * 1024;
  if (PyBytes_CheckExact(o) && PyBytes_GET_SIZE(o) >= kLarge) {
    return {reinterpret_cast<const std::uint8_t*>(PyBytes_AS_STRING(o)),
            static_cast<std::size_t>(PyBytes_GET_SIZE(o))};
  }
  if (PyUnicode_CheckExact(o) && PyUnicode_GET_LENGTH(o) >= kLarge) {
    Py_ssize_t n = 0;
    const char* utf8 = PyUnicode_AsUTF8AndSize(o, &n);  // cached in the object
    if (!utf8) {
      PyErr_Clear();  // lone surrogates: the codec's path reports it properly
      return {};
    }
    return {reinterpret_cast<const std::uint8_t*>(utf8), static_cast<std::size_t>(n)};
  }
  return {};
}

void PortWorker::finish_reply(etf::Bytes tail) {
  if (stack_.empty() && !exiting_ && over_memory_limit()) {
    ByteBuffer note;
    Channel::begin_tuple_frame(note, 2, "exiting");
    etf::put_atom(note, "memory_limit");
    write_frame(note);
    exiting_ = true;
  }
  if (!write_frame(out_, tail)) exiting_ = true;
  if (stack_.empty() && out_.capacity() > 4 * 1024 * 1024) {
    out_.release_memory();  // do not keep a big frame's buffer
  }
}

// Every frame the main thread writes goes out without the GIL: Erlang may be slow to read
// (a busy VM, a large answer on a full pipe), and a write that waits for it must not stop
// the process's other Python threads. What is written is no Python object another thread
// could change: our own buffer, and a tail in a bytes or str object (immutable) that the
// request holds a reference to until the write returns.
bool PortWorker::write_frame(ByteBuffer& b, etf::Bytes tail) {
  py::GilRelease nogil;
  return ch_.write_frame(b, tail.data(), tail.size());
}

void PortWorker::reply_error(std::int64_t id, PyRef error) {
  Channel::begin_tuple_frame(out_, 3, "error");
  etf::put_integer(out_, id);
  try {
    codec_.encode_append(out_, error.get(), eopts_);
  } catch (...) {
    PyErr_Clear();
    Channel::begin_tuple_frame(out_, 3, "error");
    etf::put_integer(out_, id);
    etf::put_atom(out_, "unencodable_error");
  }
  finish_reply();
}

bool PortWorker::over_memory_limit() const {
  if (!max_memory_mb_) return false;
  FILE* f = std::fopen("/proc/self/statm", "r");
  if (!f) return false;
  unsigned long size = 0, resident = 0;
  const int n = std::fscanf(f, "%lu %lu", &size, &resident);
  std::fclose(f);
  if (n != 2) return false;
  const unsigned long bytes = resident * static_cast<unsigned long>(sysconf(_SC_PAGESIZE));
  return bytes / (1024 * 1024) >= max_memory_mb_;
}

// ---- callbacks into Erlang -------------------------------------------------------------

PyRef PortWorker::callback(const char* kind, PyObject* m, PyObject* f, PyObject* arg) {
  if (stack_.empty()) {
    PyErr_SetString(errors_.port.get(), "erlang.call works only while Erlang runs this code");
    throw PythonError();
  }
  const std::int64_t cb = next_callback_++;
  ByteBuffer frame;
  Channel::begin_tuple_frame(frame, 6, "callback");
  etf::put_integer(frame, cb);
  etf::put_atom(frame, kind);
  codec_.encode_append(frame, m, eopts_);
  codec_.encode_append(frame, f, eopts_);
  codec_.encode_append(frame, arg, eopts_);
  send_from_python(frame);
  // Wait for the answer; requests that arrive meanwhile are nested calls from the
  // callback (Python -> Erlang -> Python) and run right here.
  std::unique_lock<std::mutex> reading(ch_.read_mutex());
  ByteBuffer in;
  for (;;) {
    bool got;
    try {
      got = read_next(in, false);
    } catch (const PythonError&) {
      if (dog_.innermost_stopped()) {
        PyErr_Clear();
        PyErr_SetString(errors_.timeout.get(), "the request timed out or was cancelled while waiting for Erlang");
      }
      throw;
    }
    if (!got) {
      PyErr_SetString(errors_.port.get(), "the port to Erlang closed while waiting for an answer");
      exiting_ = true;
      throw PythonError();
    }
    etf::Reader r(etf::Bytes(in.data(), in.size()));
    std::string_view kind_seen;
    std::size_t arity = 0;
    try {
      r.u8("version");
      const std::uint8_t tt = r.u8("frame");
      arity = tt == etf::kSmallTuple ? r.u8("arity") : 0;
      kind_seen = read_kind(r);
    } catch (const etf::DecodeError&) {
      continue;
    }
    if (kind_seen == "reply" && arity == 4) {
      PyRef id = decode(r);
      if (as_int64(id.get()) != cb) continue;  // an answer to an interrupted callback
      return callback_answer(r);
    }
    if (kind_seen == "request") {
      // A pipelined request of another caller: it runs after the running one, never
      // inside its callback (its callbacks would reach that request's caller, under that
      // request's policy).
      dog_.defer(std::move(in));
      in = ByteBuffer();
      continue;
    }
    // Anything else is handled as at top level (a nested request answers for itself).
    handle(in);
  }
}

// A frame that Python code asked for (a callback): its failures are Python errors.
void PortWorker::send_from_python(ByteBuffer& frame) {
  if (frame.size() - 4 > max_) {
    PyErr_Format(errors_.error.get(), "message_too_large: %zu bytes, max %zu", frame.size() - 4, max_);
    throw PythonError();
  }
  if (!write_frame(frame)) {
    PyErr_SetString(errors_.port.get(), "the port to Erlang is closed");
    throw PythonError();
  }
}

PyRef PortWorker::callback_answer(etf::Reader& r) {
  const std::string_view status = read_kind(r);
  PyRef value = decode(r);
  if (status == "ok") return value;
  // ErlangError(reason): args[0] is Erlang's reason, also when it is a tuple
  // (PyErr_SetObject would spread a tuple over args).
  PyRef exc = PyRef::check(PyObject_CallOneArg(errors_.error.get(), value.get()));
  PyErr_SetObject(errors_.error.get(), exc.get());
  throw PythonError();
}

PyRef PortWorker::self_pid() {
  if (stack_.empty()) {
    PyErr_SetString(errors_.port.get(), "erlang.self() works only while Erlang runs this code");
    throw PythonError();
  }
  Request& req = stack_.back();
  if (!req.caller) {
    etf::Reader r(req.caller_raw);
    req.caller = decode(r);
  }
  return PyRef::borrow(req.caller.get());
}

// ---- the reactor's callbacks ----------------------------------------------------------

namespace {

enum class Got { ok, closed, timeout };

std::int64_t monotonic_ms() {
  using namespace std::chrono;
  return duration_cast<milliseconds>(steady_clock::now().time_since_epoch()).count();
}

// The poll timeout left until `deadline_ms` (monotonic; 0: none, a wait of -1); false
// once it has passed.
bool time_left(std::int64_t deadline_ms, int& wait) {
  wait = -1;
  if (!deadline_ms) return true;
  const std::int64_t now = monotonic_ms();
  if (now >= deadline_ms) return false;
  wait = static_cast<int>(std::min<std::int64_t>(deadline_ms - now, 1 << 30));
  return true;
}

// Writes all of `data` by `deadline_ms` (monotonic; 0: none).
Got write_all(int fd, const std::uint8_t* data, std::size_t n, std::int64_t deadline_ms) {
  while (n) {
    const ssize_t w = ::send(fd, data, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno == EAGAIN) {
      // Erlang's end reads one frame at a time: a large one waits for it.
      int wait;
      if (!time_left(deadline_ms, wait)) return Got::timeout;
      pollfd p{fd, POLLOUT, 0};
      (void)::poll(&p, 1, wait);
      continue;
    }
    if (w <= 0) return Got::closed;
    data += w;
    n -= static_cast<std::size_t>(w);
  }
  return Got::ok;
}

// Reads exactly n bytes by `deadline_ms` (monotonic; 0: none).
Got read_exact(int fd, std::uint8_t* data, std::size_t n, std::int64_t deadline_ms) {
  while (n) {
    int wait;
    if (!time_left(deadline_ms, wait)) return Got::timeout;
    pollfd p{fd, POLLIN, 0};
    const int r = ::poll(&p, 1, wait);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return Got::closed;
    if (r == 0) continue;  // the deadline is checked above
    const ssize_t got = ::read(fd, data, n);
    if (got < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (got <= 0) return Got::closed;
    data += got;
    n -= static_cast<std::size_t>(got);
  }
  return Got::ok;
}

}  // namespace

bool PortWorker::set_reactor_channel(int fd, std::int64_t timeout_ms) {
  if (reactor_fd_ >= 0) {
    // One channel per worker: a live one stays (Erlang asks again whenever it lost track
    // of its workers), one whose Erlang end closed is replaced.
    pollfd p{reactor_fd_, POLLRDHUP, 0};
    if (::poll(&p, 1, 0) == 0) return false;
  }
  close_reactor_channel();
  reactor_fd_ = fd;
  reactor_thread_ = PyThread_get_thread_ident();
  reactor_timeout_ms_ = timeout_ms > 0 ? timeout_ms : 0;
  return true;
}

void PortWorker::close_reactor_channel() {
  if (reactor_fd_ >= 0) ::close(reactor_fd_);
  reactor_fd_ = -1;
}

// One callback: {callback, CbId, Kind, M, F, A} out, {reply, CbId, ok | error, Value} back
// (4-byte lengths, as on the request pipe). One at a time: only the reactor thread calls.
PyRef PortWorker::reactor_callback(const char* kind, PyObject* m, PyObject* f, PyObject* arg) {
  const std::int32_t cb = reactor_next_cb_;
  reactor_next_cb_ = cb == INT32_MAX ? 1 : cb + 1;
  ByteBuffer frame;
  Channel::begin_tuple_frame(frame, 6, "callback");
  // Always INTEGER_EXT: Erlang finds the id at a fixed place even in a term it refuses.
  frame.byte(etf::kInteger);
  etf::put_u32(frame, static_cast<std::uint32_t>(cb));
  etf::put_atom(frame, kind);
  codec_.encode_append(frame, m, eopts_);
  codec_.encode_append(frame, f, eopts_);
  codec_.encode_append(frame, arg, eopts_);
  const std::size_t body = frame.size() - 4;
  if (body > max_) {
    PyErr_Format(errors_.error.get(), "message_too_large: %zu bytes, max %zu", body, max_);
    throw PythonError();
  }
  for (int i = 0; i < 4; ++i) frame.data()[i] = static_cast<std::uint8_t>(body >> (24 - 8 * i));
  const std::int64_t deadline = reactor_timeout_ms_ ? monotonic_ms() + reactor_timeout_ms_ : 0;
  const int fd = reactor_fd_;
  auto lost = [&](const char* why) -> PyRef {
    close_reactor_channel();
    PyErr_Format(errors_.port.get(), "%s: %s", kind, why);
    throw PythonError();
  };
  Got sent;
  {
    py::GilRelease nogil;
    sent = write_all(fd, frame.data(), frame.size(), deadline);
  }
  // A frame cut short would leave the stream unreadable: the channel goes with it.
  if (sent == Got::timeout) return lost("Erlang took no callback within the callback timeout");
  if (sent == Got::closed) return lost("the reactor's channel to Erlang is closed");
  ByteBuffer in;
  for (;;) {
    std::uint8_t head[4];
    Got got;
    std::uint32_t len = 0;
    {
      py::GilRelease nogil;
      got = read_exact(fd, head, 4, deadline);
      if (got == Got::ok) {
        len = (std::uint32_t{head[0]} << 24) | (std::uint32_t{head[1]} << 16) | (std::uint32_t{head[2]} << 8) | head[3];
        if (len <= max_ + 64) {
          in.clear();
          // A frame begun is read whole (a timeout now would leave the stream cut).
          got = read_exact(fd, in.append_uninitialized(len), len, 0);
        }
      }
    }
    if (got == Got::timeout) {
      // Its answer, when it comes, is skipped by its id.
      PyErr_Format(errors_.timeout.get(), "%s: no answer from Erlang within %lld ms", kind,
                   static_cast<long long>(reactor_timeout_ms_));
      throw PythonError();
    }
    if (got == Got::closed) return lost("the reactor's channel to Erlang closed while waiting for an answer");
    if (len > max_ + 64) return lost("the reactor's channel sent an oversized frame");
    etf::Reader r(etf::Bytes(in.data(), in.size()));
    try {
      if (r.u8("version") != etf::kVersion || r.u8("frame") != etf::kSmallTuple || r.u8("arity") != 4 ||
          read_kind(r) != "reply") {
        return lost("the reactor's channel sent a bad frame");
      }
      PyRef id = decode(r);
      if (as_int64(id.get()) != cb) continue;  // the late answer of a timed-out callback
      return callback_answer(r);
    } catch (const etf::DecodeError&) {
      PyErr_Clear();
      return lost("the reactor's channel sent an undecodable frame");
    }
  }
}

// ---- module functions ------------------------------------------------------------------

template <class F>
PyObject* guarded(F&& f) {
  return py::guarded(g_codec ? &g_codec->types() : nullptr, std::forward<F>(f));
}

// ErlangPortError("<what>: <why>").
[[noreturn]] void raise_port_error(const char* what, const char* why) {
  PyObject* mod = PyImport_ImportModule("erpy.erlang");
  PyObject* cls = mod ? PyObject_GetAttrString(mod, "ErlangPortError") : nullptr;
  Py_XDECREF(mod);
  if (cls) {
    PyErr_Format(cls, "%s: %s", what, why);
    Py_DECREF(cls);
  }
  throw PythonError();
}

PortWorker* current(const char* what) {
  // A forked child shares the worker's memory but not its pipes (process.hpp).
  if (process::forked_child()) raise_port_error(what, "not available in a process forked from an erpy port worker");
  if (!g_worker) raise_port_error(what, "not running inside an erpy port worker");
  // A thread of the user's own runs for no request: it has no caller, and the request
  // pipe is the serving thread's (as in embedded mode, where it has no context).
  if (PyThread_get_thread_ident() != g_worker->serving_thread()) {
    raise_port_error(what, "not inside an erpy request (no Erlang caller on this thread)");
  }
  return g_worker;
}

// erlang.call/apply/send: the request's caller on the serving thread, the reactor's
// callback channel on the reactor thread.
PyRef dispatch_callback(const char* what, const char* kind, PyObject* m, PyObject* f, PyObject* arg) {
  if (!process::forked_child() && g_worker && g_worker->on_reactor_thread()) {
    return g_worker->reactor_callback(kind, m, f, arg);
  }
  return current(what)->callback(kind, m, f, arg);
}

PyObject* serve_port(PyObject*, PyObject* args) {
  int in_fd = 3, out_fd = 4;
  if (!PyArg_ParseTuple(args, "|ii:serve_port", &in_fd, &out_fd)) return nullptr;
  return guarded([&]() -> PyObject* {
    if (g_worker) {
      PyErr_SetString(PyExc_RuntimeError, "serve_port is already running");
      throw PythonError();
    }
    auto worker = std::make_unique<PortWorker>(*g_codec, in_fd, out_fd);
    g_worker = worker.get();
    int code;
    try {
      code = worker->serve();
    } catch (...) {
      g_worker = nullptr;
      throw;
    }
    g_worker = nullptr;
    // The watchdog and output threads end with the process.
    (void)worker.release();
    return PyLong_FromLong(code);
  });
}

PyObject* erlang_call(PyObject*, PyObject* args) {
  PyObject *m, *f, *a;
  if (!PyArg_ParseTuple(args, "OOO:call", &m, &f, &a)) return nullptr;
  return guarded([&] { return dispatch_callback("erlang.call", "call", m, f, a).release(); });
}

PyObject* erlang_apply(PyObject*, PyObject* args) {
  PyObject *m, *f, *a;
  if (!PyArg_ParseTuple(args, "OOO:apply", &m, &f, &a)) return nullptr;
  return guarded([&] {
    PyRef list = py::apply_arguments(a);
    return dispatch_callback("erlang.apply", "apply", m, f, list.get()).release();
  });
}

PyObject* erlang_send(PyObject*, PyObject* args) {
  PyObject *dest, *msg;
  if (!PyArg_ParseTuple(args, "OO:send", &dest, &msg)) return nullptr;
  // A callback like the others: Erlang checks the destination against the pool's
  // policy and answers, so a refusal is an ErlangError here.
  return guarded([&]() -> PyObject* {
    PyRef list = PyRef::check(PyList_New(1));
    Py_INCREF(msg);
    PyList_SET_ITEM(list.get(), 0, msg);
    (void)dispatch_callback("erlang.send", "send", dest, Py_None, list.get());
    Py_RETURN_NONE;
  });
}

// reactor_callback_channel(fd, timeout_ms) -> bool: called by erpy.reactor's port loop,
// on its thread, with the callback channel Erlang sent it; True: the worker owns fd from
// then on; False: it has a live one already (the caller closes fd).
PyObject* reactor_callback_channel(PyObject*, PyObject* args) {
  int fd;
  long long timeout_ms;
  if (!PyArg_ParseTuple(args, "iL:reactor_callback_channel", &fd, &timeout_ms)) return nullptr;
  return guarded([&]() -> PyObject* {
    if (process::forked_child() || !g_worker) {
      raise_port_error("reactor_callback_channel", "not running inside an erpy port worker");
    }
    if (fd < 0) {
      PyErr_SetString(PyExc_ValueError, "reactor_callback_channel: bad fd");
      throw PythonError();
    }
    return PyBool_FromLong(g_worker->set_reactor_channel(fd, timeout_ms));
  });
}

PyObject* erlang_self(PyObject*, PyObject*) {
  return guarded([&] { return current("erlang.self")->self_pid().release(); });
}

PyMethodDef kMethods[] = {
    {"serve_port", serve_port, METH_VARARGS,
     "serve_port(in_fd=3, out_fd=4)\n--\n\nServe erpy's port protocol until Erlang closes the port."},
    {"erlang_call", erlang_call, METH_VARARGS, "erlang_call(module, function, arg)\n--\n\nModule:Function(Arg) in Erlang."},
    {"erlang_apply", erlang_apply, METH_VARARGS, "erlang_apply(module, function, args)\n--\n\napply(M, F, Args) in Erlang."},
    {"erlang_send", erlang_send, METH_VARARGS, "erlang_send(dest, message)\n--\n\nSend a message to a pid or registered name."},
    {"reactor_callback_channel", reactor_callback_channel, METH_VARARGS,
     "reactor_callback_channel(fd, timeout_ms)\n--\n\nThe port reactor thread's channel for erlang.* callbacks."},
    {"erlang_self", erlang_self, METH_NOARGS, "erlang_self()\n--\n\nThe pid of the Erlang process this code runs for."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

void attach(py::Codec* codec) { g_codec = codec; }
PyMethodDef* methods() { return kMethods; }

}  // namespace erpy::worker
