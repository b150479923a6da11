// erpy.reactor's native part: ReactorBuffer, the zero-copy bytes-like object a protocol's
// data_received() gets, and the fd reads and writes behind it (doc/reactor.md).
//
// A ReactorBuffer owns the memory read() filled; no bytes object is made for the data.
// It is valid during the callback only: the dispatcher calls release() when the callback
// returns, after which every use of the buffer raises BufferReleasedError. A memoryview
// taken during the call keeps the memory alive (it is freed with the last view), so
// nothing can read freed memory; the buffer object itself refuses further use.
#include "reactor_buffer.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <string_view>

#include "py/ref.hpp"

namespace erpy::pymod {

namespace {

using py::PyRef;

PyObject* g_released_error = nullptr;  // erpy.reactor.BufferReleasedError

struct ReactorBuffer {
  PyObject_HEAD
  char* data;      // malloc'd; owned until the last export is gone after release()
  Py_ssize_t size;
  Py_ssize_t exports;
  bool released;
};

PyTypeObject* g_type = nullptr;

void free_data(ReactorBuffer* b) {
  std::free(b->data);
  b->data = nullptr;
}

bool check_live(ReactorBuffer* b) {
  if (!b->released) return true;
  PyErr_SetString(g_released_error,
                  "this ReactorBuffer was only valid during the data_received() call that got it; "
                  "keep bytes(data) (a copy) to use the data later");
  return false;
}

std::string_view view(ReactorBuffer* b) { return {b->data, static_cast<std::size_t>(b->size)}; }

// A bytes-like argument, viewed for the duration of one method call.
class Arg {
 public:
  explicit Arg(PyObject* o) {
    if (PyObject_GetBuffer(o, &v_, PyBUF_SIMPLE) == 0) ok_ = true;
  }
  ~Arg() {
    if (ok_) PyBuffer_Release(&v_);
  }
  Arg(const Arg&) = delete;
  Arg& operator=(const Arg&) = delete;
  bool ok() const { return ok_; }
  std::string_view sv() const { return {static_cast<const char*>(v_.buf), static_cast<std::size_t>(v_.len)}; }

 private:
  Py_buffer v_{};
  bool ok_ = false;
};

// Python's slice bounds for start/end arguments (None or missing: the whole buffer).
bool bounds(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t first, Py_ssize_t size, Py_ssize_t& start,
            Py_ssize_t& end) {
  start = 0;
  end = size;
  if (nargs > first && args[first] != Py_None && !_PyEval_SliceIndex(args[first], &start)) return false;
  if (nargs > first + 1 && args[first + 1] != Py_None && !_PyEval_SliceIndex(args[first + 1], &end)) return false;
  PySlice_AdjustIndices(size, &start, &end, 1);
  if (end < start) end = start;
  return true;
}

// ---- buffer protocol ------------------------------------------------------------------

int rb_getbuffer(PyObject* self, Py_buffer* view, int flags) {
  auto* b = reinterpret_cast<ReactorBuffer*>(self);
  if (!check_live(b)) {
    view->obj = nullptr;
    return -1;
  }
  if (PyBuffer_FillInfo(view, self, b->data, b->size, 1, flags) != 0) return -1;
  ++b->exports;
  return 0;
}

void rb_releasebuffer(PyObject* self, Py_buffer*) {
  auto* b = reinterpret_cast<ReactorBuffer*>(self);
  if (--b->exports == 0 && b->released) free_data(b);
}

// ---- sequence -----------------------------------------------------------------------

Py_ssize_t rb_len(PyObject* self) {
  auto* b = reinterpret_cast<ReactorBuffer*>(self);
  if (!check_live(b)) return -1;
  return b->size;
}

PyObject* rb_subscript(PyObject* self, PyObject* key) {
  auto* b = reinterpret_cast<ReactorBuffer*>(self);
  if (!check_live(b)) return nullptr;
  if (PyIndex_Check(key)) {
    Py_ssize_t i = PyNumber_AsSsize_t(key, PyExc_IndexError);
    if (i == -1 && PyErr_Occurred()) return nullptr;
    if (i < 0) i += b->size;
    if (i < 0 || i >= b->size) {
      PyErr_SetString(PyExc_IndexError, "index out of range");
      return nullptr;
    }
    return PyLong_FromLong(static_cast<unsigned char>(b->data[i]));
  }
  if (PySlice_Check(key)) {
    Py_ssize_t start, stop, step;
    if (PySlice_Unpack(key, &start, &stop, &step) < 0) return nullptr;
    const Py_ssize_t n = PySlice_AdjustIndices(b->size, &start, &stop, step);
    if (step == 1) return PyBytes_FromStringAndSize(b->data + start, n);
    PyRef out = PyRef::steal(PyBytes_FromStringAndSize(nullptr, n));
    if (!out) return nullptr;
    char* p = PyBytes_AS_STRING(out.get());
    for (Py_ssize_t k = 0, i = start; k < n; ++k, i += step) p[k] = b->data[i];
    return out.release();
  }
  PyErr_Format(PyExc_TypeError, "ReactorBuffer indices must be integers or slices, not %s", Py_TYPE(key)->tp_name);
  return nullptr;
}

PyObject* rb_item(PyObject* self, Py_ssize_t i) {
  auto* b = reinterpret_cast<ReactorBuffer*>(self);
  if (!check_live(b)) return nullptr;
  if (i < 0 || i >= b->size) {
    PyErr_SetString(PyExc_IndexError, "index out of range");
    return nullptr;
  }
  return PyLong_FromLong(static_cast<unsigned char>(b->data[i]));
}

int rb_contains(PyObject* self, PyObject* x) {
  auto* b = reinterpret_cast<ReactorBuffer*>(self);
  if (!check_live(b)) return -1;
  if (PyLong_Check(x)) {
    const long v = PyLong_AsLong(x);
    if (v == -1 && PyErr_Occurred()) return -1;
    if (v < 0 || v > 255) {
      PyErr_SetString(PyExc_ValueError, "byte must be in range(0, 256)");
      return -1;
    }
    return std::memchr(b->data, static_cast<int>(v), static_cast<std::size_t>(b->size)) != nullptr;
  }
  Arg a(x);
  if (!a.ok()) return -1;
  return view(b).find(a.sv()) != std::string_view::npos;
}

// ---- methods --------------------------------------------------------------------------

PyObject* rb_richcompare(PyObject* self, PyObject* other, int op) {
  auto* b = reinterpret_cast<ReactorBuffer*>(self);
  if (op != Py_EQ && op != Py_NE) Py_RETURN_NOTIMPLEMENTED;
  if (!check_live(b)) return nullptr;
  if (!PyObject_CheckBuffer(other)) Py_RETURN_NOTIMPLEMENTED;
  Arg a(other);
  if (!a.ok()) return nullptr;
  const bool eq = view(b) == a.sv();
  return PyBool_FromLong((op == Py_EQ) == eq);
}

// startswith/endswith(prefix | tuple of prefixes [, start [, end]])
template <bool Ends>
PyObject* rb_affix(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  auto* b = reinterpret_cast<ReactorBuffer*>(self);
  if (!check_live(b)) return nullptr;
  if (nargs < 1 || nargs > 3) {
    PyErr_SetString(PyExc_TypeError, Ends ? "endswith() takes 1 to 3 arguments" : "startswith() takes 1 to 3 arguments");
    return nullptr;
  }
  Py_ssize_t start, end;
  if (!bounds(args, nargs, 1, b->size, start, end)) return nullptr;
  const std::string_view hay = view(b).substr(static_cast<std::size_t>(start), static_cast<std::size_t>(end - start));
  auto one = [&](PyObject* o) -> int {
    Arg a(o);
    if (!a.ok()) return -1;
    const std::string_view s = a.sv();
    if (s.size() > hay.size()) return 0;
    return Ends ? hay.substr(hay.size() - s.size()) == s : hay.substr(0, s.size()) == s;
  };
  if (PyTuple_Check(args[0])) {
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args[0]); ++i) {
      const int r = one(PyTuple_GET_ITEM(args[0], i));
      if (r != 0) return r < 0 ? nullptr : PyBool_FromLong(1);
    }
    Py_RETURN_FALSE;
  }
  const int r = one(args[0]);
  return r < 0 ? nullptr : PyBool_FromLong(r);
}

// The needle of find/count/index: bytes-like, or an int in range(256).
bool needle(PyObject* o, std::string& storage, std::string_view& out) {
  if (PyLong_Check(o)) {
    const long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred()) return false;
    if (v < 0 || v > 255) {
      PyErr_SetString(PyExc_ValueError, "byte must be in range(0, 256)");
      return false;
    }
    storage.assign(1, static_cast<char>(v));
    out = storage;
    return true;
  }
  Arg a(o);
  if (!a.ok()) return false;
  storage.assign(a.sv());
  out = storage;
  return true;
}

enum class Find { Find, RFind, Index, Count };

template <Find K>
PyObject* rb_find(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  auto* b = reinterpret_cast<ReactorBuffer*>(self);
  if (!check_live(b)) return nullptr;
  if (nargs < 1 || nargs > 3) {
    PyErr_SetString(PyExc_TypeError, "takes 1 to 3 arguments (sub[, start[, end]])");
    return nullptr;
  }
  std::string storage;
  std::string_view sub;
  if (!needle(args[0], storage, sub)) return nullptr;
  Py_ssize_t start, end;
  if (!bounds(args, nargs, 1, b->size, start, end)) return nullptr;
  const std::string_view hay = view(b).substr(static_cast<std::size_t>(start), static_cast<std::size_t>(end - start));
  if constexpr (K == Find::Count) {
    if (sub.empty()) return PyLong_FromSsize_t(static_cast<Py_ssize_t>(hay.size()) + 1);
    Py_ssize_t n = 0;
    for (std::size_t at = hay.find(sub); at != std::string_view::npos; at = hay.find(sub, at + sub.size())) ++n;
    return PyLong_FromSsize_t(n);
  } else {
    const std::size_t at = K == Find::RFind ? hay.rfind(sub) : hay.find(sub);
    if (at == std::string_view::npos) {
      if (K == Find::Index) {
        PyErr_SetString(PyExc_ValueError, "subsection not found");
        return nullptr;
      }
      return PyLong_FromLong(-1);
    }
    return PyLong_FromSsize_t(start + static_cast<Py_ssize_t>(at));
  }
}

PyObject* rb_decode(PyObject* self, PyObject* args, PyObject* kwargs) {
  auto* b = reinterpret_cast<ReactorBuffer*>(self);
  if (!check_live(b)) return nullptr;
  static const char* kw[] = {"encoding", "errors", nullptr};
  const char* encoding = "utf-8";
  const char* errors = "strict";
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|ss:decode", const_cast<char**>(kw), &encoding, &errors)) {
    return nullptr;
  }
  return PyUnicode_Decode(b->data, b->size, encoding, errors);
}

PyObject* rb_bytes(PyObject* self, PyObject*) {
  auto* b = reinterpret_cast<ReactorBuffer*>(self);
  if (!check_live(b)) return nullptr;
  return PyBytes_FromStringAndSize(b->data, b->size);
}

PyObject* rb_memoryview(PyObject* self, PyObject*) { return PyMemoryView_FromObject(self); }

// Ends the buffer's validity (the dispatcher, when the callback returns). Idempotent.
PyObject* rb_release(PyObject* self, PyObject*) {
  auto* b = reinterpret_cast<ReactorBuffer*>(self);
  if (!b->released) {
    b->released = true;
    if (b->exports == 0) free_data(b);
  }
  Py_RETURN_NONE;
}

PyObject* rb_repr(PyObject* self) {
  auto* b = reinterpret_cast<ReactorBuffer*>(self);
  if (b->released) return PyUnicode_FromString("<ReactorBuffer (released)>");
  return PyUnicode_FromFormat("<ReactorBuffer of %zd bytes>", b->size);
}

// Any other bytes method (split, upper, hex, ...) works on a copy: the common parsing
// ones above need none.
PyObject* rb_getattro(PyObject* self, PyObject* name) {
  PyObject* found = PyObject_GenericGetAttr(self, name);
  if (found || !PyErr_ExceptionMatches(PyExc_AttributeError)) return found;
  auto* b = reinterpret_cast<ReactorBuffer*>(self);
  if (b->released) return nullptr;  // the AttributeError stands
  PyRef copy = PyRef::steal(PyBytes_FromStringAndSize(b->data, b->size));
  if (!copy) return nullptr;
  PyObject* attr = PyObject_GetAttr(copy.get(), name);
  if (attr) PyErr_Clear();
  return attr;
}

void rb_dealloc(PyObject* self) {
  auto* b = reinterpret_cast<ReactorBuffer*>(self);
  free_data(b);
  Py_TYPE(self)->tp_free(self);
}

#define ERPY_FASTCALL(f) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(f))

PyMethodDef buffer_methods[] = {
    {"startswith", ERPY_FASTCALL(rb_affix<false>), METH_FASTCALL, "As bytes.startswith, without a copy."},
    {"endswith", ERPY_FASTCALL(rb_affix<true>), METH_FASTCALL, "As bytes.endswith, without a copy."},
    {"find", ERPY_FASTCALL(rb_find<Find::Find>), METH_FASTCALL, "As bytes.find, without a copy."},
    {"rfind", ERPY_FASTCALL(rb_find<Find::RFind>), METH_FASTCALL, "As bytes.rfind, without a copy."},
    {"index", ERPY_FASTCALL(rb_find<Find::Index>), METH_FASTCALL, "As bytes.index, without a copy."},
    {"count", ERPY_FASTCALL(rb_find<Find::Count>), METH_FASTCALL, "As bytes.count, without a copy."},
    {"decode", ERPY_FASTCALL(rb_decode), METH_VARARGS | METH_KEYWORDS, "As bytes.decode, without a copy."},
    {"__bytes__", rb_bytes, METH_NOARGS, "A copy of the data, valid after the call."},
    {"tobytes", rb_bytes, METH_NOARGS, "A copy of the data, valid after the call."},
    {"memoryview", rb_memoryview, METH_NOARGS, "A memoryview of the data (no copy)."},
    {"release", rb_release, METH_NOARGS, "Ends the buffer's validity (done by erpy.reactor)."},
    {nullptr, nullptr, 0, nullptr},
};

PyObject* released_getter(PyObject* self, void*) {
  return PyBool_FromLong(reinterpret_cast<ReactorBuffer*>(self)->released);
}

PyGetSetDef buffer_getset[] = {
    {"released", released_getter, nullptr, "True once the buffer is no longer valid.", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr},
};

PyObject* new_buffer(char* data, Py_ssize_t size) {
  auto* b = PyObject_New(ReactorBuffer, g_type);
  if (!b) {
    std::free(data);
    return nullptr;
  }
  b->data = data;
  b->size = size;
  b->exports = 0;
  b->released = false;
  return reinterpret_cast<PyObject*>(b);
}

int fd_arg(PyObject* o) {
  const long v = PyLong_AsLong(o);
  if (v == -1 && PyErr_Occurred()) return -1;
  if (v < 0 || v > INT32_MAX) {
    PyErr_SetString(PyExc_ValueError, "not a file descriptor");
    return -1;
  }
  return static_cast<int>(v);
}

// reactor_read(fd, n) -> ReactorBuffer (data), b'' (end of file) or None (nothing to read
// now). Errors raise OSError. The fd is non-blocking (erpy sets it so at handoff).
PyObject* reactor_read(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "reactor_read(fd, n)");
    return nullptr;
  }
  const int fd = fd_arg(args[0]);
  if (fd < 0) return nullptr;
  const Py_ssize_t n = PyLong_AsSsize_t(args[1]);
  if (n == -1 && PyErr_Occurred()) return nullptr;
  if (n <= 0 || n > (Py_ssize_t{1} << 30)) {
    PyErr_SetString(PyExc_ValueError, "reactor_read: n must be in 1..2**30");
    return nullptr;
  }
  char* data = static_cast<char*>(std::malloc(static_cast<std::size_t>(n)));
  if (!data) return PyErr_NoMemory();
  ssize_t got;
  do {
    got = ::read(fd, data, static_cast<std::size_t>(n));
  } while (got < 0 && errno == EINTR);
  if (got < 0) {
    const int e = errno;
    std::free(data);
    if (e == EAGAIN || e == EWOULDBLOCK) Py_RETURN_NONE;
    errno = e;
    return PyErr_SetFromErrno(PyExc_OSError);
  }
  if (got == 0) {
    std::free(data);
    return PyBytes_FromStringAndSize(nullptr, 0);
  }
  // Most reads are short: give the rest back.
  if (got < n / 2) {
    if (char* smaller = static_cast<char*>(std::realloc(data, static_cast<std::size_t>(got)))) data = smaller;
  }
  return new_buffer(data, got);
}

// reactor_write(fd, data) -> bytes written (0: the fd takes nothing now). Sockets are
// written with MSG_NOSIGNAL, so a reset peer is EPIPE and never SIGPIPE.
PyObject* reactor_write(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "reactor_write(fd, data)");
    return nullptr;
  }
  const int fd = fd_arg(args[0]);
  if (fd < 0) return nullptr;
  Arg a(args[1]);
  if (!a.ok()) return nullptr;
  const std::string_view s = a.sv();
  if (s.empty()) return PyLong_FromLong(0);
  ssize_t put;
  do {
    put = ::send(fd, s.data(), s.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    if (put < 0 && errno == ENOTSOCK) put = ::write(fd, s.data(), s.size());
  } while (put < 0 && errno == EINTR);
  if (put < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return PyLong_FromLong(0);
    return PyErr_SetFromErrno(PyExc_OSError);
  }
  return PyLong_FromSsize_t(put);
}

PyMethodDef module_methods[] = {
    {"reactor_read", ERPY_FASTCALL(reactor_read), METH_FASTCALL,
     "reactor_read(fd, n) -> ReactorBuffer | b'' (end of file) | None (would block)"},
    {"reactor_write", ERPY_FASTCALL(reactor_write), METH_FASTCALL,
     "reactor_write(fd, data) -> int (bytes written, 0 when the fd would block)"},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

bool add_reactor(PyObject* module) {
  if (!g_type) {
    static PyType_Slot slots[] = {
        {Py_tp_dealloc, reinterpret_cast<void*>(rb_dealloc)},
        {Py_tp_repr, reinterpret_cast<void*>(rb_repr)},
        {Py_tp_richcompare, reinterpret_cast<void*>(rb_richcompare)},
        {Py_tp_getattro, reinterpret_cast<void*>(rb_getattro)},
        {Py_tp_methods, buffer_methods},
        {Py_tp_getset, buffer_getset},
        {Py_sq_length, reinterpret_cast<void*>(rb_len)},
        {Py_sq_item, reinterpret_cast<void*>(rb_item)},
        {Py_sq_contains, reinterpret_cast<void*>(rb_contains)},
        {Py_mp_length, reinterpret_cast<void*>(rb_len)},
        {Py_mp_subscript, reinterpret_cast<void*>(rb_subscript)},
        {Py_bf_getbuffer, reinterpret_cast<void*>(rb_getbuffer)},
        {Py_bf_releasebuffer, reinterpret_cast<void*>(rb_releasebuffer)},
        {Py_tp_doc, const_cast<char*>("Bytes read by erpy.reactor, valid during data_received() only.")},
        {0, nullptr},
    };
    static PyType_Spec spec = {"erpy.reactor.ReactorBuffer", sizeof(ReactorBuffer), 0, Py_TPFLAGS_DEFAULT, slots};
    g_type = reinterpret_cast<PyTypeObject*>(PyType_FromSpec(&spec));
    if (!g_type) return false;
    // Hashing an object whose data goes away would be a trap: unhashable, as bytearray.
    g_type->tp_hash = PyObject_HashNotImplemented;
  }
  if (!g_released_error) {
    g_released_error = PyErr_NewExceptionWithDoc(
        "erpy.reactor.BufferReleasedError",
        "A ReactorBuffer was used after the data_received() call that got it returned.", PyExc_ValueError,
        nullptr);
    if (!g_released_error) return false;
  }
  Py_INCREF(g_type);
  if (PyModule_AddObject(module, "ReactorBuffer", reinterpret_cast<PyObject*>(g_type)) != 0) {
    Py_DECREF(g_type);
    return false;
  }
  Py_INCREF(g_released_error);
  if (PyModule_AddObject(module, "BufferReleasedError", g_released_error) != 0) {
    Py_DECREF(g_released_error);
    return false;
  }
  return PyModule_AddFunctions(module, module_methods) == 0;
}

}  // namespace erpy::pymod
