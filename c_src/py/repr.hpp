// A short repr for error messages. Never fails: a repr that raises is replaced by the type.
#pragma once
#include <string>

#include "ref.hpp"

namespace erpy::py {

inline std::string short_repr(PyObject* o, std::size_t max = 80) {
  PyRef r = PyRef::steal(PyObject_Repr(o));
  Py_ssize_t n = 0;
  const char* s = r ? PyUnicode_AsUTF8AndSize(r.get(), &n) : nullptr;
  if (!s) {
    PyErr_Clear();
    return std::string("<") + Py_TYPE(o)->tp_name + " object>";
  }
  std::string out(s, static_cast<std::size_t>(n));
  if (out.size() > max) out = out.substr(0, max - 3) + "...";
  return out;
}

}  // namespace erpy::py
