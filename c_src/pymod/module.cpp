// The extension module erpy._native: encode() and decode() over the shared conversion
// layer (c_src/py). This file only parses arguments and turns C++ exceptions into Python
// ones, once, here at the boundary.
#include <string>

#include "py/codec.hpp"
#include "reactor_buffer.hpp"
#include "worker/port_worker.hpp"

namespace {

using erpy::py::Codec;
using erpy::py::PyRef;
using erpy::py::PythonError;

// Created at import, with the classes of erpy._types and erpy._errors; freed with the
// module. Used only under the GIL.
Codec* g_codec = nullptr;

[[noreturn]] void type_error(const char* fmt, PyObject* o) {
  PyErr_Format(PyExc_TypeError, fmt, Py_TYPE(o)->tp_name);
  throw PythonError();
}

std::string atom_name(PyObject* o, const char* fn) {
  if (!PyUnicode_Check(o)) {
    PyErr_Format(PyExc_TypeError, "%s(): none must be a str, not %s", fn, Py_TYPE(o)->tp_name);
    throw PythonError();
  }
  Py_ssize_t n = 0;
  const char* s = PyUnicode_AsUTF8AndSize(o, &n);
  if (!s) throw PythonError();
  if (PyUnicode_GET_LENGTH(o) > 255) {
    PyErr_Format(PyExc_ValueError, "%s(): none must be an atom name of at most 255 characters", fn);
    throw PythonError();
  }
  return {s, static_cast<std::size_t>(n)};
}

std::size_t max_depth(PyObject* o, const char* fn) {
  if (!PyLong_Check(o)) type_error("max_depth must be an int, not %s", o);
  const Py_ssize_t v = PyLong_AsSsize_t(o);
  if (v == -1 && PyErr_Occurred()) throw PythonError();
  if (v < 0) {
    PyErr_Format(PyExc_ValueError, "%s(): max_depth must be >= 0", fn);
    throw PythonError();
  }
  return static_cast<std::size_t>(v);
}

std::size_t max_size(PyObject* o, const char* fn) {
  if (o == Py_None) return SIZE_MAX;
  if (!PyLong_Check(o)) type_error("max_size must be an int or None, not %s", o);
  const Py_ssize_t v = PyLong_AsSsize_t(o);
  if (v == -1 && PyErr_Occurred()) throw PythonError();
  if (v < 0) {
    PyErr_Format(PyExc_ValueError, "%s(): max_size must be >= 0", fn);
    throw PythonError();
  }
  return static_cast<std::size_t>(v);
}

// Keyword arguments by name; positional ones are counted by the caller.
template <class F>
void each_keyword(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames, const char* fn, F&& f) {
  if (!kwnames) return;
  const Py_ssize_t n = PyTuple_GET_SIZE(kwnames);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* name = PyTuple_GET_ITEM(kwnames, i);
    const char* key = PyUnicode_AsUTF8(name);
    if (!key) throw PythonError();
    if (!f(std::string_view(key), args[nargs + i])) {
      PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%s'", fn, key);
      throw PythonError();
    }
  }
}

void one_positional(Py_ssize_t nargs, const char* fn) {
  if (nargs != 1) {
    PyErr_Format(PyExc_TypeError, "%s() takes exactly one positional argument (%zd given)", fn, nargs);
    throw PythonError();
  }
}

erpy::py::EncodeOptions encode_options(PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames,
                                       const char* fn) {
  erpy::py::EncodeOptions o;
  each_keyword(args, nargs, kwnames, fn, [&](std::string_view key, PyObject* v) {
    if (key == "none") {
      o.none = atom_name(v, fn);
    } else if (key == "default") {
      if (v != Py_None && !PyCallable_Check(v)) type_error("default must be callable or None, not %s", v);
      o.fallback = v == Py_None ? nullptr : v;
    } else if (key == "max_depth") {
      o.max_depth = max_depth(v, fn);
    } else {
      return false;
    }
    return true;
  });
  return o;
}

PyObject* encode(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  try {
    one_positional(nargs, "encode");
    const auto o = encode_options(args, nargs, kwnames, "encode");
    return g_codec->encode(args[0], o).release();
  } catch (...) {
    erpy::py::set_python_error(g_codec->types());
    return nullptr;
  }
}

PyObject* encode_two_pass(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  try {
    one_positional(nargs, "_encode_two_pass");
    const auto o = encode_options(args, nargs, kwnames, "_encode_two_pass");
    return g_codec->encode_two_pass(args[0], o).release();
  } catch (...) {
    erpy::py::set_python_error(g_codec->types());
    return nullptr;
  }
}

PyObject* decode(PyObject*, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames) {
  try {
    one_positional(nargs, "decode");
    erpy::py::DecodeOptions o;
    each_keyword(args, nargs, kwnames, "decode", [&](std::string_view key, PyObject* v) {
      if (key == "binary") {
        if (!PyUnicode_Check(v)) type_error("binary must be 'str' or 'bytes', not %s", v);
        if (PyUnicode_CompareWithASCIIString(v, "bytes") == 0) {
          o.binary_as_bytes = true;
        } else if (PyUnicode_CompareWithASCIIString(v, "str") == 0) {
          o.binary_as_bytes = false;
        } else {
          PyErr_Format(PyExc_ValueError, "decode(): binary must be 'str' or 'bytes', not %R", v);
          throw PythonError();
        }
      } else if (key == "none") {
        o.none = atom_name(v, "decode");
      } else if (key == "max_depth") {
        o.max_depth = max_depth(v, "decode");
      } else if (key == "max_size") {
        o.max_size = max_size(v, "decode");
      } else {
        return false;
      }
      return true;
    });
    erpy::py::BufferView input(args[0]);
    return g_codec->decode(etf::Bytes(input.data(), input.size()), o).release();
  } catch (...) {
    erpy::py::set_python_error(g_codec->types());
    return nullptr;
  }
}

PyObject* freeze(PyObject*, PyObject* obj) {
  try {
    return g_codec->freeze(obj).release();
  } catch (...) {
    erpy::py::set_python_error(g_codec->types());
    return nullptr;
  }
}

// For erpy.Key(value): (its frozen value, the bytes Keys are compared by).
PyObject* key_parts(PyObject*, PyObject* obj) {
  try {
    auto [frozen, exact] = g_codec->key_parts(obj);
    return PyTuple_Pack(2, frozen.get(), exact.get());
  } catch (...) {
    erpy::py::set_python_error(g_codec->types());
    return nullptr;
  }
}

PyMethodDef methods[] = {
    {"encode", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(encode)),
     METH_FASTCALL | METH_KEYWORDS,
     "encode(obj, /, *, none='undefined', default=None, max_depth=2000) -> bytes\n\n"
     "The canonical external term format of obj, as term_to_binary(T, [{minor_version, 2}])."},
    {"_encode_two_pass", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(encode_two_pass)),
     METH_FASTCALL | METH_KEYWORDS,
     "encode() by a size pass and a write pass (for benchmarks; calls custom encoders twice)."},
    {"decode", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(decode)),
     METH_FASTCALL | METH_KEYWORDS,
     "decode(data, /, *, binary='str', none='undefined', max_depth=2000, max_size=None) -> object\n\n"
     "The Python value of one external term (bytes-like, version byte 131). max_size: the\n"
     "largest term accepted in bytes; a compressed term never inflates past it."},
    {"freeze", freeze, METH_O,
     "freeze(value, /) -> object\n\n"
     "The hashable form of value, as decode() gives map keys: lists become FrozenList, dicts\n"
     "FrozenMap, ImproperLists FrozenImproperList, at every level (tuples included)."},
    {"_key_parts", key_parts, METH_O, "_key_parts(value, /) -> (frozen value, exact bytes), for erpy.Key."},
    {nullptr, nullptr, 0, nullptr},
};

void free_module(void*) {
  delete g_codec;
  g_codec = nullptr;
}

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "erpy._native", "ETF codec and port worker of erpy (C++).", -1, methods,
    nullptr, nullptr, nullptr, free_module,
};

}  // namespace

PyMODINIT_FUNC PyInit__native() {
  PyRef m = PyRef::steal(PyModule_Create(&module_def));
  if (!m) return nullptr;
  try {
    PyRef types = PyRef::check(PyImport_ImportModule("erpy._types"));
    PyRef errors = PyRef::check(PyImport_ImportModule("erpy._errors"));
    if (!g_codec) g_codec = new Codec(erpy::py::Types::load(types.get(), errors.get()));
    // The port worker's loop and the `erlang` callbacks live in the same module.
    erpy::worker::attach(g_codec);
    if (PyModule_AddFunctions(m.get(), erpy::worker::methods()) != 0) throw PythonError();
    if (!erpy::pymod::add_reactor(m.get())) throw PythonError();  // erpy.reactor
  } catch (const PythonError&) {
    return nullptr;
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ImportError, e.what());
    return nullptr;
  }
  return m.release();
}
