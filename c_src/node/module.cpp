// The extension module erpy._node: the Python face of the C++ distribution core.
//
//   Node(name, cookie, *, resolver, host='127.0.0.1', port=0,
//        hidden=True, ticktime=60, slow_ms=5, spin_us=0, coalesce_us=200,
//        max_message_size=64 MiB, max_fragments=1024, max_fragment_bytes=256 MiB,
//        max_queued_messages=100000, max_queued_bytes=1 GiB, max_send_queue=256 MiB)
//     .start() .stop() .mailbox() .send(dest, msg) .connect(node) .nodes() .make_ref()
//     .whereis(name) .unregister(name) .clear_cache() .stats()  .name .creation .port
//   Mailbox (a local process): .pid .receive(timeout=None) .receive_many(max, timeout)
//     .send(dest, msg) .monitor(target) .demonitor(ref) .link(pid) .unlink(pid)
//     .spawn_request(node, module, function, args, monitor=True, link=False)
//     .register(name) .close(reason='normal') .closed
//   The request executor every mode shares (py::Runner), for erpy.node's service:
//     service(policy) outcome(fn) resolve(module, function) call(module, function, args, kwargs=None)
//     eval(source, namespace, locals) exec(source, namespace)
//     run(source, arguments, namespace) namespace() error_map(exception)
//
// Every call that may wait (socket writes, connecting, an empty mailbox) releases the GIL.
#include <chrono>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>

#include "core.hpp"
#include "etf/decode.hpp"

namespace erpy::node {
namespace {

using py::GilRelease;
using py::PyRef;
using py::PythonError;

py::Codec* g_codec = nullptr;
py::Runner* g_runner = nullptr;

Bytes build_atom(std::string_view a) {
  Bytes out;
  BytesSink s{out};
  etf::put_atom(s, a);
  return out;
}

struct NodeObject {
  PyObject_HEAD
  std::shared_ptr<Core> core;
};

struct MailboxObject {
  PyObject_HEAD
  std::shared_ptr<Core> core;
  std::shared_ptr<Process> proc;
  PyObject* pid;  // owned
};

extern PyTypeObject NodeType;
extern PyTypeObject MailboxType;

// Raises the Python exception for the C++ exception being handled.
void raise_current() {
  try {
    throw;
  } catch (const PythonError&) {
  } catch (const WireError& e) {
    PyErr_SetString(PyExc_ConnectionError, e.what());
  } catch (...) {
    py::set_python_error(g_codec->types());
  }
}

PyRef decode_bare(const Bytes& term) {
  Bytes b;
  b.reserve(term.size() + 1);
  b.push_back(131);
  b.insert(b.end(), term.begin(), term.end());
  return g_codec->decode(b, py::DecodeOptions{});
}

Bytes encode_bare(PyObject* o) {
  py::ByteBuffer b;
  g_codec->encode_append(b, o, py::EncodeOptions{});
  return Bytes(b.data(), b.data() + b.size());
}

std::string str_attr(PyObject* o, const char* name) {
  PyRef a = PyRef::check(PyObject_GetAttrString(o, name));
  Py_ssize_t n;
  const char* s = PyUnicode_AsUTF8AndSize(a.get(), &n);
  if (!s) throw PythonError();
  return std::string(s, static_cast<std::size_t>(n));
}

std::string as_string(PyObject* o, const char* what) {
  if (!PyUnicode_Check(o)) {
    PyErr_Format(PyExc_TypeError, "%s must be a str, not %s", what, Py_TYPE(o)->tp_name);
    throw PythonError();
  }
  Py_ssize_t n;
  const char* s = PyUnicode_AsUTF8AndSize(o, &n);
  if (!s) throw PythonError();
  return std::string(s, static_cast<std::size_t>(n));
}

bool is_type(PyObject* o, const PyRef& t) {
  return PyObject_TypeCheck(o, reinterpret_cast<PyTypeObject*>(t.get()));
}

// Writes a frame to `node` without the GIL (connecting if needed).
void send_frame(Core& core, const std::string& node, const py::ByteBuffer& b) {
  std::string error;
  {
    GilRelease nogil;
    try {
      core.connection(node)->send_waiting(b.data(), b.size());
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  if (!error.empty()) {
    PyErr_SetString(PyExc_ConnectionError, error.c_str());
    throw PythonError();
  }
}

void send_to(Core& core, Process& from, PyObject* dest, PyObject* msg) {
  const py::Types& t = g_codec->types();
  py::EncodeOptions eo;
  py::ByteBuffer b;
  std::shared_ptr<Process> target;
  std::string node;
  auto remote = [&](int op, auto&& write_to) {
    Frame f(b);
    etf::put_tuple_header(b, op == kRegSend ? 4 : 3);
    etf::put_integer(b, op);
    etf::put_raw(b, from.pid);
    write_to();
    f.payload();
    g_codec->encode_append(b, msg, eo);
    f.end();
  };
  if (is_type(dest, t.pid)) {
    node = str_attr(dest, "node");
    if (core.is_local(node)) {
      PyRef id = PyRef::check(PyObject_GetAttrString(dest, "id"));
      target = core.procs().find(static_cast<std::uint32_t>(PyLong_AsUnsignedLong(id.get())));
      if (!target) return;
    } else {
      remote(kSendSender, [&] { g_codec->encode_append(b, dest, eo); });
    }
  } else if (is_type(dest, t.ref)) {
    node = str_attr(dest, "node");
    if (core.is_local(node)) return;
    remote(kAliasSend, [&] { g_codec->encode_append(b, dest, eo); });
  } else if (PyTuple_Check(dest) && PyTuple_GET_SIZE(dest) == 2) {
    const std::string name = as_string(PyTuple_GET_ITEM(dest, 0), "registered name");
    node = as_string(PyTuple_GET_ITEM(dest, 1), "node");
    if (core.is_local(node)) {
      target = core.procs().whereis(name);
      if (!target) return;
    } else {
      remote(kRegSend, [&] {
        etf::put_atom(b, "");
        etf::put_atom(b, name);
      });
    }
  } else if (PyUnicode_Check(dest)) {
    target = core.procs().whereis(as_string(dest, "registered name"));
    if (!target) return;
  } else {
    PyErr_Format(PyExc_TypeError, "send: expected a Pid, a Ref (alias), a registered name or "
                 "(name, node), got %s", Py_TYPE(dest)->tp_name);
    throw PythonError();
  }
  if (target) {
    b.byte(131);
    g_codec->encode_append(b, msg, eo);
    core.procs().deliver(target, Bytes(b.data(), b.data() + b.size()));
    return;
  }
  send_frame(core, node, b);
}

// --- Mailbox ------------------------------------------------------------------------------

PyObject* new_mailbox(const std::shared_ptr<Core>& core, std::shared_ptr<Process> proc) {
  PyRef pid = decode_bare(proc->pid);
  auto* m = PyObject_New(MailboxObject, &MailboxType);
  if (!m) return nullptr;
  new (&m->core) std::shared_ptr<Core>(core);
  new (&m->proc) std::shared_ptr<Process>(std::move(proc));
  m->pid = pid.release();
  return reinterpret_cast<PyObject*>(m);
}

void mailbox_dealloc(PyObject* self) {
  auto* m = reinterpret_cast<MailboxObject*>(self);
  if (m->proc) {
    // Nothing happens for a process that has ended already.
    static const Bytes normal = {etf::kSmallAtomUtf8, 6, 'n', 'o', 'r', 'm', 'a', 'l'};
    GilRelease nogil;
    m->core->exit_process(m->proc, normal);
  }
  Py_XDECREF(m->pid);
  m->proc.~shared_ptr<Process>();
  m->core.~shared_ptr<Core>();
  PyObject_Free(self);
}

MailboxObject* mb(PyObject* self) { return reinterpret_cast<MailboxObject*>(self); }

// Waits (without the GIL) until the mailbox has a message, is closed, or the deadline
// passes; wakes every 100 ms to let Python handle signals (Ctrl-C). Inside a call Erlang
// made, the wait does not hold up the connection (a call run by its connection's reader
// goes on reading it: Core::wait_message) and ends with KeyboardInterrupt when the
// caller gives up, as the call's Python code would.
// Returns false on timeout; throws PythonError for a signal or a cancel.
bool wait_for_message(Core& core, const std::shared_ptr<Process>& proc, double timeout) {
  using clock = std::chrono::steady_clock;
  Process& p = *proc;
  const bool forever = timeout < 0;
  const auto deadline = clock::now() + std::chrono::duration_cast<clock::duration>(
                                           std::chrono::duration<double>(forever ? 0 : timeout));
  for (;;) {
    bool ready, cancelled;
    {
      GilRelease nogil;
      JobRunner::WaitScope scope(proc);
      auto until = clock::now() + std::chrono::milliseconds(100);
      if (!forever && deadline < until) until = deadline;
      core.wait_message(p, scope, until);
      cancelled = scope.cancelled();
      std::lock_guard lk(p.mu);
      ready = !p.queue.empty() || p.closed;
    }
    if (cancelled) {
      PyErr_SetString(PyExc_KeyboardInterrupt, "the Erlang caller gave up on this call");
      throw PythonError();
    }
    if (ready) return true;
    if (PyErr_CheckSignals() != 0) throw PythonError();
    if (!forever && clock::now() >= deadline) return false;
  }
}

double timeout_arg(PyObject* t) {
  if (!t || t == Py_None) return -1;
  const double v = PyFloat_AsDouble(t);
  if (v == -1 && PyErr_Occurred()) throw PythonError();
  return v < 0 ? 0 : v;
}

PyObject* mailbox_receive(PyObject* self, PyObject* args, PyObject* kw) {
  static const char* kwlist[] = {"timeout", nullptr};
  PyObject* timeout = nullptr;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "|O", const_cast<char**>(kwlist), &timeout)) return nullptr;
  try {
    Process& p = *mb(self)->proc;
    const double t = timeout_arg(timeout);
    for (;;) {
      {
        std::unique_lock lk(p.mu);
        if (!p.queue.empty()) {
          Bytes msg = p.pop();
          lk.unlock();
          return g_codec->decode(msg, py::DecodeOptions{}).release();
        }
        if (p.closed) {
          PyErr_SetString(PyExc_EOFError, "the mailbox is closed");
          return nullptr;
        }
      }
      if (!wait_for_message(*mb(self)->core, mb(self)->proc, t)) {
        PyErr_SetString(PyExc_TimeoutError, "no message within the timeout");
        return nullptr;
      }
    }
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* mailbox_receive_many(PyObject* self, PyObject* args, PyObject* kw) {
  static const char* kwlist[] = {"max", "timeout", nullptr};
  Py_ssize_t max = 1024;
  PyObject* timeout = nullptr;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "|nO", const_cast<char**>(kwlist), &max, &timeout)) return nullptr;
  try {
    Process& p = *mb(self)->proc;
    std::vector<Bytes> got;
    const double t = timeout_arg(timeout);
    for (;;) {
      {
        std::lock_guard lk(p.mu);
        while (!p.queue.empty() && static_cast<Py_ssize_t>(got.size()) < max) {
          got.push_back(p.pop());
        }
        if (got.empty() && p.closed) {
          PyErr_SetString(PyExc_EOFError, "the mailbox is closed");
          return nullptr;
        }
      }
      if (!got.empty() || !wait_for_message(*mb(self)->core, mb(self)->proc, t)) break;
    }
    PyRef list = PyRef::check(PyList_New(static_cast<Py_ssize_t>(got.size())));
    for (std::size_t i = 0; i < got.size(); ++i) {
      PyList_SET_ITEM(list.get(), static_cast<Py_ssize_t>(i), g_codec->decode(got[i], py::DecodeOptions{}).release());
    }
    return list.release();
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* mailbox_send(PyObject* self, PyObject* args) {
  PyObject *dest, *msg;
  if (!PyArg_ParseTuple(args, "OO", &dest, &msg)) return nullptr;
  try {
    send_to(*mb(self)->core, *mb(self)->proc, dest, msg);
    Py_RETURN_NONE;
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

// A target given as a Pid or (name, node): its node, how MONITOR_P names it, and the
// object a 'DOWN' message names.
struct Target {
  std::string node;
  Bytes to_proc, down_object;
};

Target parse_target(Core& core, PyObject* target) {
  const py::Types& t = g_codec->types();
  Target out;
  if (is_type(target, t.pid)) {
    out.node = str_attr(target, "node");
    out.to_proc = encode_bare(target);
    out.down_object = out.to_proc;
  } else if (PyTuple_Check(target) && PyTuple_GET_SIZE(target) == 2) {
    const std::string name = as_string(PyTuple_GET_ITEM(target, 0), "registered name");
    out.node = as_string(PyTuple_GET_ITEM(target, 1), "node");
    out.to_proc = build_atom(name);
    out.down_object = Bytes{etf::kSmallTuple, 2};
    out.down_object.insert(out.down_object.end(), out.to_proc.begin(), out.to_proc.end());
    const Bytes n = build_atom(out.node);
    out.down_object.insert(out.down_object.end(), n.begin(), n.end());
  } else {
    PyErr_SetString(PyExc_TypeError, "expected a Pid or (name, node)");
    throw PythonError();
  }
  if (core.is_local(out.node)) {
    PyErr_SetString(PyExc_ValueError, "monitors and links between local processes are not supported");
    throw PythonError();
  }
  return out;
}

// Connects and writes; on failure delivers `on_fail` to the process instead (as Erlang
// does: a monitor of an unreachable node fires at once with noconnection).
void send_or_deliver(Core& core, const std::shared_ptr<Process>& p, const std::string& node,
                     const py::ByteBuffer& b, Bytes on_fail) {
  GilRelease nogil;
  try {
    core.connection(node)->send(b);
  } catch (const std::exception&) {
    core.procs().deliver(p, std::move(on_fail));
  }
}

Bytes tuple_msg(std::initializer_list<Bytes> parts) {
  Bytes out{131, etf::kSmallTuple, static_cast<std::uint8_t>(parts.size())};
  for (const Bytes& p : parts) out.insert(out.end(), p.begin(), p.end());
  return out;
}

PyObject* mailbox_monitor(PyObject* self, PyObject* target) {
  try {
    Core& core = *mb(self)->core;
    auto& p = mb(self)->proc;
    Target t = parse_target(core, target);
    Bytes ref = core.make_ref();
    core.procs().record_out_monitor(p, Watch{t.node, t.to_proc, ref, t.down_object});
    py::ByteBuffer b = control_frame(kMonitorP, {&p->pid, &t.to_proc, &ref});
    send_or_deliver(core, p, t.node, b,
                    tuple_msg({build_atom("DOWN"), ref, build_atom("process"), t.down_object,
                               build_atom("noconnection")}));
    return decode_bare(ref).release();
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* mailbox_demonitor(PyObject* self, PyObject* ref_obj) {
  try {
    Core& core = *mb(self)->core;
    auto& p = mb(self)->proc;
    const Bytes ref = encode_bare(ref_obj);
    Watch w;
    bool found = false;
    {
      std::lock_guard lk(p->mu);
      for (auto it = p->out_monitors.begin(); it != p->out_monitors.end(); ++it) {
        if (it->ref == ref) {
          w = std::move(*it);
          p->out_monitors.erase(it);
          found = true;
          break;
        }
      }
    }
    if (!found) Py_RETURN_FALSE;
    py::ByteBuffer b = control_frame(kDemonitorP, {&p->pid, &w.watcher, &ref});
    {
      GilRelease nogil;
      if (auto c = core.existing(w.node)) c->send(b);
    }
    Py_RETURN_TRUE;
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* mailbox_link(PyObject* self, PyObject* target) {
  try {
    Core& core = *mb(self)->core;
    auto& p = mb(self)->proc;
    Target t = parse_target(core, target);
    if (!is_type(target, g_codec->types().pid)) {
      PyErr_SetString(PyExc_TypeError, "link: expected a Pid");
      return nullptr;
    }
    core.procs().add_link(p, t.node, t.to_proc);
    py::ByteBuffer b = control_frame(kLink, {&p->pid, &t.to_proc});
    send_or_deliver(core, p, t.node, b, tuple_msg({build_atom("EXIT"), t.to_proc, build_atom("noconnection")}));
    Py_RETURN_NONE;
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* mailbox_unlink(PyObject* self, PyObject* target) {
  try {
    Core& core = *mb(self)->core;
    auto& p = mb(self)->proc;
    Target t = parse_target(core, target);
    core.procs().remove_link(p, t.to_proc);
    static std::atomic<std::uint64_t> unlink_id{1};
    py::ByteBuffer b;
    Frame f(b);
    etf::put_tuple_header(b, 4);
    etf::put_integer(b, kUnlinkId);
    etf::put_integer(b, static_cast<std::int64_t>(unlink_id++));
    etf::put_raw(b, p->pid);
    etf::put_raw(b, t.to_proc);
    f.end();
    {
      GilRelease nogil;
      if (auto c = core.existing(t.node)) c->send(b);
    }
    Py_RETURN_NONE;
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* mailbox_spawn_request(PyObject* self, PyObject* args, PyObject* kw) {
  static const char* kwlist[] = {"node", "module", "function", "args", "monitor", "link", nullptr};
  PyObject *node_o, *module_o, *function_o, *argv;
  int monitor = 1, link = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "OOOO!|pp", const_cast<char**>(kwlist), &node_o, &module_o,
                                   &function_o, &PyList_Type, &argv, &monitor, &link)) {
    return nullptr;
  }
  try {
    Core& core = *mb(self)->core;
    auto& p = mb(self)->proc;
    const std::string node = as_string(node_o, "node");
    const std::string module = as_string(module_o, "module");
    const std::string function = as_string(function_o, "function");
    Bytes req = core.make_ref();
    py::ByteBuffer b;
    Frame f(b);
    etf::put_tuple_header(b, 6);
    etf::put_integer(b, kSpawnRequest);
    etf::put_raw(b, req);
    etf::put_raw(b, p->pid);
    etf::put_raw(b, p->pid);  // group leader: io requests come back to us
    etf::put_tuple_header(b, 3);
    etf::put_atom(b, module);
    etf::put_atom(b, function);
    etf::put_integer(b, PyList_GET_SIZE(argv));
    const int nopts = monitor + link;
    if (nopts) {
      etf::put_list_header(b, static_cast<std::size_t>(nopts));
      if (monitor) etf::put_atom(b, "monitor");
      if (link) etf::put_atom(b, "link");
    }
    etf::put_nil(b);
    f.payload();
    g_codec->encode_append(b, argv, py::EncodeOptions{});
    f.end();
    send_or_deliver(core, p, node, b,
                    tuple_msg({build_atom("spawn_reply"), req, build_atom("error"), build_atom("noconnection")}));
    return decode_bare(req).release();
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* mailbox_register(PyObject* self, PyObject* name) {
  try {
    const std::string n = as_string(name, "name");
    if (mb(self)->core->procs().register_name(n, mb(self)->proc)) Py_RETURN_TRUE;
    Py_RETURN_FALSE;
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* mailbox_close(PyObject* self, PyObject* args) {
  PyObject* reason = nullptr;
  if (!PyArg_ParseTuple(args, "|O", &reason)) return nullptr;
  try {
    Bytes r;
    if (reason) {
      r = encode_bare(reason);
    } else {
      r = build_atom("normal");
    }
    GilRelease nogil;
    mb(self)->core->exit_process(mb(self)->proc, r);
  } catch (...) {
    raise_current();
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* mailbox_get_pid(PyObject* self, void*) { return Py_NewRef(mb(self)->pid); }

PyObject* mailbox_get_closed(PyObject* self, void*) {
  std::lock_guard lk(mb(self)->proc->mu);
  return PyBool_FromLong(mb(self)->proc->closed);
}

PyObject* mailbox_get_pending(PyObject* self, void*) {
  std::lock_guard lk(mb(self)->proc->mu);
  return PyLong_FromSize_t(mb(self)->proc->queue.size());
}

PyMethodDef mailbox_methods[] = {
    {"receive", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(mailbox_receive)),
     METH_VARARGS | METH_KEYWORDS, "receive(timeout=None): the next message (TimeoutError, EOFError when closed)"},
    {"receive_many", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(mailbox_receive_many)),
     METH_VARARGS | METH_KEYWORDS, "receive_many(max=1024, timeout=None): up to max messages, [] on timeout"},
    {"send", mailbox_send, METH_VARARGS, "send(dest, msg) with this process as the sender"},
    {"monitor", mailbox_monitor, METH_O, "monitor(pid or (name, node)) -> Ref"},
    {"demonitor", mailbox_demonitor, METH_O, "demonitor(ref) -> bool"},
    {"link", mailbox_link, METH_O, "link(pid)"},
    {"unlink", mailbox_unlink, METH_O, "unlink(pid)"},
    {"spawn_request", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(mailbox_spawn_request)),
     METH_VARARGS | METH_KEYWORDS, "spawn_request(node, module, function, args, monitor=True, link=False) -> Ref"},
    {"register", mailbox_register, METH_O, "register(name) -> bool"},
    {"close", mailbox_close, METH_VARARGS, "close(reason='normal'): the process ends"},
    {nullptr, nullptr, 0, nullptr},
};

PyGetSetDef mailbox_getset[] = {
    {"pid", mailbox_get_pid, nullptr, "this process's pid", nullptr},
    {"closed", mailbox_get_closed, nullptr, "whether the process has ended", nullptr},
    {"pending", mailbox_get_pending, nullptr, "messages waiting", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

// --- Node ---------------------------------------------------------------------------------

NodeObject* nd(PyObject* self) { return reinterpret_cast<NodeObject*>(self); }

PyObject* node_new(PyTypeObject* type, PyObject* args, PyObject* kw) {
  static const char* kwlist[] = {"name", "cookie", "resolver", "host", "port", "hidden", "ticktime",
                                 "slow_ms", "spin_us", "coalesce_us", "max_message_size",
                                 "max_fragments", "max_fragment_bytes", "max_queued_messages",
                                 "max_queued_bytes", "max_send_queue", "ssl_dist_optfile", "tls_cert",
                                 "tls_key", "tls_ca", "tls_verify", nullptr};
  const char *name, *cookie, *host = "127.0.0.1";
  PyObject* resolver = nullptr;
  int port = 0, hidden = 1, ticktime = 60, slow_ms = 5, spin_us = 0, coalesce_us = 200;
  // 0: the default (InLimits; the fragment bytes default to twice the message limit, at
  // least 256 MiB).
  unsigned long long max_message = 0, max_fragments = 0, max_fragment_bytes = 0, max_queued = 0,
                     max_queued_bytes = 0, max_send_queue = 0;
  // TLS distribution: an ssl_dist options file, or the same for both sides in flags.
  const char *optfile = nullptr, *tls_cert = nullptr, *tls_key = nullptr, *tls_ca = nullptr,
             *tls_verify = nullptr;
  if (!PyArg_ParseTupleAndKeywords(args, kw, "ss|$OsipiiiiKKKKKKzzzzz", const_cast<char**>(kwlist), &name,
                                   &cookie, &resolver, &host, &port, &hidden, &ticktime, &slow_ms, &spin_us,
                                   &coalesce_us, &max_message, &max_fragments, &max_fragment_bytes,
                                   &max_queued, &max_queued_bytes, &max_send_queue, &optfile, &tls_cert,
                                   &tls_key, &tls_ca, &tls_verify)) {
    return nullptr;
  }
  auto set = [](const char* s) { return s && *s; };
  if (set(optfile) && (set(tls_cert) || set(tls_key) || set(tls_ca) || set(tls_verify))) {
    PyErr_SetString(PyExc_ValueError, "give either ssl_dist_optfile or tls_cert/tls_key/tls_ca/tls_verify");
    return nullptr;
  }
  if (!set(optfile) && !set(tls_cert) && (set(tls_key) || set(tls_ca) || set(tls_verify))) {
    PyErr_SetString(PyExc_ValueError, "TLS distribution needs tls_cert (or ssl_dist_optfile)");
    return nullptr;
  }
  if (set(tls_verify) && std::strcmp(tls_verify, "peer") != 0 && std::strcmp(tls_verify, "none") != 0) {
    PyErr_SetString(PyExc_ValueError, "tls_verify must be 'peer' or 'none'");
    return nullptr;
  }
  // Frames carry a 32-bit length; a limit over 1 GiB is no limit worth having.
  constexpr unsigned long long kMinMessage = 1024, kMaxMessage = 1ull << 30;
  if ((max_message && (max_message < kMinMessage || max_message > kMaxMessage))) {
    PyErr_Format(PyExc_ValueError, "max_message_size must be between %llu and %llu bytes", kMinMessage,
                 kMaxMessage);
    return nullptr;
  }
  if (!resolver || !PyCallable_Check(resolver)) {
    PyErr_SetString(PyExc_TypeError, "resolver must be callable");
    return nullptr;
  }
  auto* self = reinterpret_cast<NodeObject*>(type->tp_alloc(type, 0));
  if (!self) return nullptr;
  new (&self->core) std::shared_ptr<Core>();
  try {
    Options o;
    o.name = name;
    o.cookie = cookie;
    o.listen_host = host;
    o.port = port;
    o.hidden = hidden;
    o.ticktime = ticktime < 4 ? 4 : ticktime;
    o.slow_ms = slow_ms < 1 ? 1 : slow_ms;
    o.spin_us = spin_us < 0 ? 0 : spin_us;
    o.coalesce_us = coalesce_us < 0 ? 0 : coalesce_us;
    if (max_message) o.in.max_message = static_cast<std::size_t>(max_message);
    if (max_fragments) o.in.max_pending = static_cast<std::size_t>(max_fragments);
    o.in.max_pending_bytes = max_fragment_bytes ? static_cast<std::size_t>(max_fragment_bytes)
                                                : std::max(o.in.max_pending_bytes, 2 * o.in.max_message);
    if (max_queued) o.procs.max_queued = static_cast<std::size_t>(max_queued);
    if (max_queued_bytes) o.procs.max_queued_bytes = static_cast<std::size_t>(max_queued_bytes);
    if (max_send_queue) o.max_send_queue = static_cast<std::size_t>(max_send_queue);
    if (set(optfile)) {
      o.tls = std::make_shared<const TlsContext>(read_ssl_dist_optfile(optfile));
    } else if (set(tls_cert)) {
      TlsConfig cfg;
      cfg.enabled = true;
      TlsSide side;
      side.certfile = tls_cert;
      if (set(tls_key)) side.keyfile = tls_key;
      if (set(tls_ca)) side.cacertfile = tls_ca;
      // With a CA the peer is verified unless told not to; both directions, as the
      // usual ssl_dist file does (verify_peer, fail_if_no_peer_cert).
      side.verify_peer = set(tls_verify) ? std::strcmp(tls_verify, "peer") == 0 : set(tls_ca);
      side.fail_if_no_peer_cert = side.verify_peer;
      cfg.server = side;
      cfg.client = side;
      o.tls = std::make_shared<const TlsContext>(cfg);
    }
    self->core = std::make_shared<Core>(std::move(o), *g_codec, *g_runner, resolver);
  } catch (...) {
    raise_current();
    Py_DECREF(self);
    return nullptr;
  }
  return reinterpret_cast<PyObject*>(self);
}

void node_dealloc(PyObject* self) {
  auto* n = nd(self);
  if (n->core) {
    std::shared_ptr<Core> core = std::move(n->core);
    {
      GilRelease nogil;
      core->stop();
    }
    core.reset();  // its Python references go with the GIL held
  }
  n->core.~shared_ptr<Core>();
  Py_TYPE(self)->tp_free(self);
}

PyObject* node_start(PyObject* self, PyObject*) {
  std::string error;
  {
    GilRelease nogil;
    try {
      nd(self)->core->start();
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  if (!error.empty()) {
    PyErr_SetString(PyExc_OSError, error.c_str());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* node_stop(PyObject* self, PyObject*) {
  {
    GilRelease nogil;
    nd(self)->core->stop();
  }
  Py_RETURN_NONE;
}

PyObject* node_mailbox(PyObject* self, PyObject*) {
  try {
    return new_mailbox(nd(self)->core, nd(self)->core->new_process());
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* node_send(PyObject* self, PyObject* args) {
  PyObject *dest, *msg;
  if (!PyArg_ParseTuple(args, "OO", &dest, &msg)) return nullptr;
  try {
    Core& core = *nd(self)->core;
    send_to(core, *core.system_process(), dest, msg);
    Py_RETURN_NONE;
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* node_connect(PyObject* self, PyObject* arg) {
  try {
    const std::string node = as_string(arg, "node");
    std::string error;
    {
      GilRelease nogil;
      try {
        nd(self)->core->connection(node);
      } catch (const std::exception& e) {
        error = e.what();
      }
    }
    if (!error.empty()) {
      PyErr_SetString(PyExc_ConnectionError, error.c_str());
      return nullptr;
    }
    Py_RETURN_TRUE;
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* node_nodes(PyObject* self, PyObject*) {
  auto names = nd(self)->core->nodes();
  PyRef list = PyRef::steal(PyList_New(0));
  if (!list) return nullptr;
  for (auto& n : names) {
    PyRef s = PyRef::steal(PyUnicode_FromStringAndSize(n.data(), static_cast<Py_ssize_t>(n.size())));
    if (!s || PyList_Append(list.get(), s.get()) != 0) return nullptr;
  }
  return list.release();
}

PyObject* node_make_ref(PyObject* self, PyObject*) {
  try {
    return decode_bare(nd(self)->core->make_ref()).release();
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* node_whereis(PyObject* self, PyObject* arg) {
  try {
    auto p = nd(self)->core->procs().whereis(as_string(arg, "name"));
    if (!p) Py_RETURN_NONE;
    return decode_bare(p->pid).release();
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* node_unregister(PyObject* self, PyObject* arg) {
  try {
    nd(self)->core->procs().unregister_name(as_string(arg, "name"));
    Py_RETURN_NONE;
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* node_clear_cache(PyObject* self, PyObject*) {
  nd(self)->core->jobs().clear_cache();
  Py_RETURN_NONE;
}

PyObject* node_cancel_request(PyObject* self, PyObject* arg) {
  try {
    const Bytes req = encode_bare(arg);
    Core* core = nd(self)->core.get();
    GilRelease nogil;
    core->jobs().cancel_request(req);
  } catch (...) {
    raise_current();
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* node_watched_by(PyObject*, PyObject* pid) {
  if (!is_type(pid, g_codec->types().pid)) Py_RETURN_FALSE;
  try {
    return PyBool_FromLong(JobRunner::watched_by(encode_bare(pid)));
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* node_set_result_limit(PyObject*, PyObject* args) {
  unsigned long long n;
  int binary = 0;
  if (!PyArg_ParseTuple(args, "K|p:set_result_limit", &n, &binary)) return nullptr;
  JobRunner::set_result_limit(static_cast<std::size_t>(n), binary != 0);
  Py_RETURN_NONE;
}

PyObject* node_stats(PyObject* self, PyObject*) {
  Core& c = *nd(self)->core;
  auto n = [](const std::atomic<std::uint64_t>& a) { return static_cast<unsigned long long>(a.load()); };
  return Py_BuildValue("{sKsKsKsKsK}", "calls", n(c.jobs().calls), "messages", n(c.procs().messages),
                       "handovers", n(c.handovers), "refused", n(c.refused), "dropped", n(c.procs().dropped));
}

PyObject* node_get_name(PyObject* self, void*) {
  const std::string& n = nd(self)->core->name();
  return PyUnicode_FromStringAndSize(n.data(), static_cast<Py_ssize_t>(n.size()));
}
PyObject* node_get_creation(PyObject* self, void*) { return PyLong_FromUnsignedLong(nd(self)->core->creation()); }
PyObject* node_get_port(PyObject* self, void*) { return PyLong_FromLong(nd(self)->core->port()); }

PyMethodDef node_methods[] = {
    {"start", node_start, METH_NOARGS, "listen, register at epmd, start the threads"},
    {"stop", node_stop, METH_NOARGS, "close every connection and join the threads"},
    {"mailbox", node_mailbox, METH_NOARGS, "a new local process with a mailbox"},
    {"send", node_send, METH_VARARGS, "send(dest, msg) from the node's system process"},
    {"connect", node_connect, METH_O, "connect(node) -> True, or ConnectionError"},
    {"nodes", node_nodes, METH_NOARGS, "names of the connected nodes"},
    {"make_ref", node_make_ref, METH_NOARGS, "a new reference of this node"},
    {"whereis", node_whereis, METH_O, "whereis(name) -> Pid or None"},
    {"unregister", node_unregister, METH_O, "unregister(name)"},
    {"clear_cache", node_clear_cache, METH_NOARGS, "forget resolved rpc handlers"},
    {"stats", node_stats, METH_NOARGS, "counters: calls, messages, handovers, refused, dropped"},
    {"cancel_request", node_cancel_request, METH_O,
     "cancel_request(req_id): interrupt the call started by this spawn request"},
    {"watched_by", node_watched_by, METH_O,
     "watched_by(pid): whether the call running on this thread was started by pid with a monitor "
     "or link (its end then cancels the call)"},
    {"set_result_limit", node_set_result_limit, METH_VARARGS,
     "set_result_limit(max, binary=False): the current call's result may not exceed max bytes "
     "(0: no limit); with binary it goes back as its ETF in a binary (errors too)"},
    {nullptr, nullptr, 0, nullptr},
};

PyGetSetDef node_getset[] = {
    {"name", node_get_name, nullptr, "name@host", nullptr},
    {"creation", node_get_creation, nullptr, "creation from epmd", nullptr},
    {"port", node_get_port, nullptr, "the distribution port", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

// --- the shared executor (py::Runner) ------------------------------------------------------

PyObject* runner_resolve(PyObject*, PyObject* args) {
  PyObject *module, *function;
  if (!PyArg_ParseTuple(args, "OO:resolve", &module, &function)) return nullptr;
  try {
    return g_runner->resolve(module, function).release();
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* runner_call(PyObject*, PyObject* args) {
  PyObject *module, *function, *argv, *kwargs = Py_None;
  if (!PyArg_ParseTuple(args, "OOO|O:call", &module, &function, &argv, &kwargs)) return nullptr;
  try {
    return g_runner->call(module, function, argv, kwargs).release();
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* runner_eval(PyObject*, PyObject* args) {
  PyObject *source, *ns, *locals;
  if (!PyArg_ParseTuple(args, "OO!O:eval", &source, &PyDict_Type, &ns, &locals)) return nullptr;
  try {
    return g_runner->eval(source, ns, locals).release();
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* runner_exec(PyObject*, PyObject* args) {
  PyObject *source, *ns;
  if (!PyArg_ParseTuple(args, "OO!:exec", &source, &PyDict_Type, &ns)) return nullptr;
  try {
    return g_runner->exec(source, ns).release();
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* runner_run(PyObject*, PyObject* args) {
  PyObject *source, *arguments, *ns;
  if (!PyArg_ParseTuple(args, "OOO!:run", &source, &arguments, &PyDict_Type, &ns)) return nullptr;
  try {
    return g_runner->run(source, arguments, ns).release();
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* runner_namespace(PyObject*, PyObject*) {
  try {
    return g_runner->fresh_namespace().release();
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

PyObject* runner_error_map(PyObject*, PyObject* exc) {
  if (!PyExceptionInstance_Check(exc)) {
    PyErr_Format(PyExc_TypeError, "error_map: expected an exception, not %s", Py_TYPE(exc)->tp_name);
    return nullptr;
  }
  try {
    PyObject* tb = PyException_GetTraceback(exc);  // new reference, or null
    PyErr_Restore(Py_NewRef(reinterpret_cast<PyObject*>(Py_TYPE(exc))), Py_NewRef(exc), tb);
    return g_runner->error_from_exception().release();
  } catch (...) {
    raise_current();
    return nullptr;
  }
}

// service(policy): erpy.service's `request(Request)` run by the shared executor from C, as
// the port worker and the NIF run theirs. Request is the request map (doc/protocol.md),
// here a dict the node decoded, read by the schema every mode shares (py/request.hpp).
// Then policy(kind=, module=, function=, session=, caller=, reply_to=, max_size=) (Python:
// the node's allow-list, allow_code, sessions) returns (context, target, namespace):
// `context` None or a context manager entered around the run (the request's Erlang
// caller), `target` None or a callable run in place of module.function (an exposed
// function), `namespace` the dict eval/exec/run use. The request then runs with no
// Python frame of erpy's between the caller and its code, so its errors (tracebacks
// included) read as in the other modes.
struct ServiceObject {
  PyObject_HEAD
  PyObject* policy;  // owned
};

extern PyTypeObject ServiceType;

// The request map as the dict the node decoded it to: keys are atoms (str).
class DictRequestSource {
 public:
  explicit DictRequestSource(PyObject* dict) : dict_(dict) {
    if (!PyDict_Check(dict)) py::request_error("a request must be a map");
  }
  bool next(std::string_view& key) {
    PyObject* k;
    if (!PyDict_Next(dict_, &pos_, &k, &value_)) return false;
    key = text(k).value_or(std::string_view());
    return true;
  }
  std::optional<std::int64_t> integer() {
    if (!PyLong_Check(value_)) return std::nullopt;
    const long long v = PyLong_AsLongLong(value_);
    if (v == -1 && PyErr_Occurred()) {
      PyErr_Clear();
      return std::nullopt;
    }
    return v;
  }
  std::optional<std::string_view> atom() { return text(value_); }
  // Borrowed from the dict, which the caller holds: nothing runs Python while it is read.
  PyRef object() { return PyRef::borrow(value_); }
  void skip() {}
  void caller(py::Request& r) { r.caller = PyRef::borrow(value_); }
  void reply_to(py::Request& r) { r.reply_to = PyRef::borrow(value_); }

 private:
  static std::optional<std::string_view> text(PyObject* o) {
    if (!PyUnicode_Check(o)) return std::nullopt;
    Py_ssize_t n;
    const char* t = PyUnicode_AsUTF8AndSize(o, &n);
    if (!t) {
      PyErr_Clear();
      return std::nullopt;
    }
    return std::string_view(t, static_cast<std::size_t>(n));
  }
  PyObject* dict_;
  Py_ssize_t pos_ = 0;
  PyObject* value_ = nullptr;
};

// Reads the request and asks the policy: the context to run it in, and the request ready
// for Runner::execute (namespace in `ns`).
PyRef prepare_request(PyObject* policy, PyObject* dict, py::Request& req, PyRef& ns) {
  DictRequestSource src(dict);
  req = py::parse_request(src);
  PyRef kwargs = PyRef::check(PyDict_New());
  PyRef kind = PyRef::check(PyUnicode_FromString(py::request_kind_name(req.kind)));
  PyRef max_size = PyRef::check(PyLong_FromLongLong(req.max_size));
  auto set = [&](const char* name, PyObject* value) {
    if (PyDict_SetItemString(kwargs.get(), name, value ? value : Py_None) != 0) throw PythonError();
  };
  set("kind", kind.get());
  set("module", req.module.get());
  set("function", req.function.get());
  set("session", req.session.get());
  set("caller", req.caller.get());
  set("reply_to", req.reply_to.get());
  set("max_size", max_size.get());
  PyRef empty = PyRef::check(PyTuple_New(0));
  PyRef answer = PyRef::check(PyObject_Call(policy, empty.get(), kwargs.get()));
  if (!PyTuple_Check(answer.get()) || PyTuple_GET_SIZE(answer.get()) != 3) {
    PyErr_SetString(PyExc_TypeError, "service: the policy must return (context, target, namespace)");
    throw PythonError();
  }
  PyObject* target = PyTuple_GET_ITEM(answer.get(), 1);
  PyObject* space = PyTuple_GET_ITEM(answer.get(), 2);
  if (target != Py_None) {
    req.target = PyRef::borrow(target);
    req.function.reset();  // the target itself is called
  }
  if (py::uses_namespace(req.kind)) {
    if (!PyDict_Check(space)) {
      PyErr_SetString(PyExc_TypeError, "service: the namespace must be a dict");
      throw PythonError();
    }
    ns = PyRef::borrow(space);
  }
  return PyRef::borrow(PyTuple_GET_ITEM(answer.get(), 0));
}

PyObject* service_call(PyObject* self, PyObject* args, PyObject* kw) {
  if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) != 1 || (kw && PyDict_GET_SIZE(kw) > 0)) {
    PyErr_SetString(PyExc_TypeError, "erpy.service request takes one argument, the request map");
    return nullptr;
  }
  py::Request req;
  PyRef ns;
  PyRef context;
  try {
    context = prepare_request(reinterpret_cast<ServiceObject*>(self)->policy, PyTuple_GET_ITEM(args, 0), req, ns);
  } catch (...) {
    raise_current();
    return nullptr;
  }
  PyObject* ctx = context.get();
  const bool with = ctx != Py_None;
  if (with) {
    PyRef entered = PyRef::steal(PyObject_CallMethod(ctx, "__enter__", nullptr));
    if (!entered) return nullptr;
  }
  PyRef result;
  try {
    result = g_runner->execute(req, ns.get());
  } catch (...) {
    raise_current();
  }
  if (with) {
    // As a with statement: __exit__ sees the exception (and may not swallow it).
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (v && tb) PyException_SetTraceback(v, tb);
    // The exception's own __traceback__ as the runner left it: a generator's __exit__
    // (contextlib) resets it, and the error map is made from it (for an ImportError it
    // is all there is: the import machinery trims the pending traceback).
    PyRef own = PyRef::steal(v ? PyException_GetTraceback(v) : nullptr);
    PyRef exited = PyRef::steal(PyObject_CallMethod(ctx, "__exit__", "OOO", t ? t : Py_None, v ? v : Py_None,
                                                    tb ? tb : Py_None));
    if (!exited) {
      Py_XDECREF(t);
      Py_XDECREF(v);
      Py_XDECREF(tb);
      return nullptr;  // __exit__'s own error wins, as in Python
    }
    if (v) PyException_SetTraceback(v, own ? own.get() : Py_None);
    PyErr_Restore(t, v, tb);
  }
  return result.release();
}

int service_traverse(PyObject* self, visitproc visit, void* arg) {
  Py_VISIT(reinterpret_cast<ServiceObject*>(self)->policy);
  return 0;
}

int service_clear(PyObject* self) {
  Py_CLEAR(reinterpret_cast<ServiceObject*>(self)->policy);
  return 0;
}

void service_dealloc(PyObject* self) {
  PyObject_GC_UnTrack(self);
  service_clear(self);
  PyObject_GC_Del(self);
}

PyObject* runner_service(PyObject*, PyObject* policy) {
  if (!PyCallable_Check(policy)) {
    PyErr_SetString(PyExc_TypeError, "service: policy must be callable");
    return nullptr;
  }
  auto* s = PyObject_GC_New(ServiceObject, &ServiceType);
  if (!s) return nullptr;
  s->policy = Py_NewRef(policy);
  PyObject_GC_Track(s);
  return reinterpret_cast<PyObject*>(s);
}

PyTypeObject ServiceType = [] {
  PyTypeObject t{};
  t.ob_base.ob_base.ob_refcnt = 1;  // a static type
  t.tp_name = "erpy._node.Service";
  t.tp_basicsize = sizeof(ServiceObject);
  t.tp_dealloc = service_dealloc;
  t.tp_call = service_call;
  t.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC;
  t.tp_traverse = service_traverse;
  t.tp_clear = service_clear;
  t.tp_doc = "erpy.service's request(Request): read by the shared schema, checked by the node's policy, run by the shared executor.";
  return t;
}();

// outcome(fn): a callable that returns fn(*args)'s value or raises its error from C:
// fn returns (None, value) or (ExceptionType, argument). erpy.node's erlang.* callbacks
// answer through it, so that their errors carry no frame of erpy's, as in the other
// modes (where the callbacks are C++).
struct OutcomeObject {
  PyObject_HEAD
  PyObject* fn;  // owned
};

extern PyTypeObject OutcomeType;

PyObject* outcome_call(PyObject* self, PyObject* args, PyObject* kw) {
  PyRef r = PyRef::steal(PyObject_Call(reinterpret_cast<OutcomeObject*>(self)->fn, args, kw));
  if (!r) return nullptr;
  if (!PyTuple_Check(r.get()) || PyTuple_GET_SIZE(r.get()) != 2) {
    PyErr_SetString(PyExc_TypeError, "outcome: expected (None, value) or (ExceptionType, argument)");
    return nullptr;
  }
  PyObject* type = PyTuple_GET_ITEM(r.get(), 0);
  PyObject* value = PyTuple_GET_ITEM(r.get(), 1);
  if (type == Py_None) return Py_NewRef(value);
  if (!PyExceptionClass_Check(type)) {
    PyErr_SetString(PyExc_TypeError, "outcome: the error must be an exception type");
    return nullptr;
  }
  PyRef exc = PyRef::steal(PyObject_CallOneArg(type, value));
  if (!exc) return nullptr;
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.get())), exc.get());
  return nullptr;
}

int outcome_traverse(PyObject* self, visitproc visit, void* arg) {
  Py_VISIT(reinterpret_cast<OutcomeObject*>(self)->fn);
  return 0;
}

int outcome_clear(PyObject* self) {
  Py_CLEAR(reinterpret_cast<OutcomeObject*>(self)->fn);
  return 0;
}

void outcome_dealloc(PyObject* self) {
  PyObject_GC_UnTrack(self);
  outcome_clear(self);
  PyObject_GC_Del(self);
}

PyObject* runner_outcome(PyObject*, PyObject* fn) {
  if (!PyCallable_Check(fn)) {
    PyErr_SetString(PyExc_TypeError, "outcome: fn must be callable");
    return nullptr;
  }
  auto* o = PyObject_GC_New(OutcomeObject, &OutcomeType);
  if (!o) return nullptr;
  o->fn = Py_NewRef(fn);
  PyObject_GC_Track(o);
  return reinterpret_cast<PyObject*>(o);
}

PyTypeObject OutcomeType = [] {
  PyTypeObject t{};
  t.ob_base.ob_base.ob_refcnt = 1;  // a static type
  t.tp_name = "erpy._node.Outcome";
  t.tp_basicsize = sizeof(OutcomeObject);
  t.tp_dealloc = outcome_dealloc;
  t.tp_call = outcome_call;
  t.tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC;
  t.tp_traverse = outcome_traverse;
  t.tp_clear = outcome_clear;
  t.tp_doc = "A callable returning its function's value, or raising its error from C.";
  return t;
}();

PyMethodDef module_methods[] = {
    {"outcome", runner_outcome, METH_O,
     "outcome(fn): call fn, which returns (None, value) or (ExceptionType, argument); return or raise"},
    {"service", runner_service, METH_O,
     "service(policy): a callable that runs a request map (doc/protocol.md) as every mode runs one"},
    {"resolve", runner_resolve, METH_VARARGS,
     "resolve(module, function): the object Module.Function names (Function may be dotted)"},
    {"call", runner_call, METH_VARARGS,
     "call(module, function, args, kwargs=None): Module.Function(*args, **kwargs), as every mode calls"},
    {"eval", runner_eval, METH_VARARGS, "eval(source, namespace, locals): as every mode evaluates"},
    {"exec", runner_exec, METH_VARARGS, "exec(source, namespace): as every mode executes; None"},
    {"run", runner_run, METH_VARARGS,
     "run(source, arguments, namespace): an erl_py_runner snippet; its `result`"},
    {"namespace", runner_namespace, METH_NOARGS, "a fresh namespace for eval/exec/run"},
    {"error_map", runner_error_map, METH_O, "error_map(exception): erpy's #{type, message, traceback}"},
    {nullptr, nullptr, 0, nullptr},
};

PyTypeObject NodeType = [] {
  PyTypeObject t{};
  t.ob_base.ob_base.ob_refcnt = 1;  // a static type
  t.tp_name = "erpy._node.Node";
  t.tp_basicsize = sizeof(NodeObject);
  t.tp_dealloc = node_dealloc;
  t.tp_flags = Py_TPFLAGS_DEFAULT;
  t.tp_doc = "An Erlang node in this Python process (C++ distribution core).";
  t.tp_methods = node_methods;
  t.tp_getset = node_getset;
  t.tp_new = node_new;
  return t;
}();

PyTypeObject MailboxType = [] {
  PyTypeObject t{};
  t.ob_base.ob_base.ob_refcnt = 1;  // a static type
  t.tp_name = "erpy._node.Mailbox";
  t.tp_basicsize = sizeof(MailboxObject);
  t.tp_dealloc = mailbox_dealloc;
  t.tp_flags = Py_TPFLAGS_DEFAULT;
  t.tp_doc = "A local process of an erpy node: a pid and a mailbox.";
  t.tp_methods = mailbox_methods;
  t.tp_getset = mailbox_getset;
  return t;
}();

void free_module(void*) {
  delete g_runner;
  g_runner = nullptr;
  delete g_codec;
  g_codec = nullptr;
}

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "erpy._node", "erpy's Erlang distribution core (C++).", -1, module_methods,
    nullptr, nullptr, nullptr, free_module,
};

}  // namespace
}  // namespace erpy::node

PyMODINIT_FUNC PyInit__node() {
  using namespace erpy::node;
  PyRef m = PyRef::steal(PyModule_Create(&module_def));
  if (!m) return nullptr;
  try {
    if (PyType_Ready(&NodeType) < 0 || PyType_Ready(&MailboxType) < 0 || PyType_Ready(&ServiceType) < 0 ||
        PyType_Ready(&OutcomeType) < 0) {
      return nullptr;
    }
    PyRef types = PyRef::check(PyImport_ImportModule("erpy._types"));
    PyRef errors = PyRef::check(PyImport_ImportModule("erpy._errors"));
    if (!g_codec) g_codec = new erpy::py::Codec(erpy::py::Types::load(types.get(), errors.get()));
    if (!g_runner) {
      PyRef erlang = PyRef::check(PyImport_ImportModule("erpy.erlang"));
      g_runner = new erpy::py::Runner(g_codec->types(), std::move(erlang));
    }
    if (PyModule_AddObjectRef(m.get(), "Node", reinterpret_cast<PyObject*>(&NodeType)) < 0) return nullptr;
    if (PyModule_AddObjectRef(m.get(), "Mailbox", reinterpret_cast<PyObject*>(&MailboxType)) < 0) return nullptr;
  } catch (const PythonError&) {
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
  return m.release();
}
