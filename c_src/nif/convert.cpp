#include "convert.hpp"

#include "atoms.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "etf/error.hpp"

namespace erpy::nif {

using py::PyRef;
using py::PythonError;

namespace {

struct ReleasedBinary {
  ErlNifBinary bin{};
  bool owned = false;
  ~ReleasedBinary() {
    if (owned) enif_release_binary(&bin);
  }
};

// Latin-1 atom text to UTF-8 (ASCII stays as it is).
std::string latin1_to_utf8(const char* p, unsigned n) {
  std::string out;
  out.reserve(n);
  for (unsigned i = 0; i < n; ++i) {
    const auto c = static_cast<unsigned char>(p[i]);
    if (c < 0x80) {
      out.push_back(static_cast<char>(c));
    } else {
      out.push_back(static_cast<char>(0xC0 | (c >> 6)));
      out.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
  }
  return out;
}

// Terms of one container: inline for the small ones (most maps and tuples), so a list of
// 10,000 small maps does not cost 20,000 heap allocations.
class TermBuffer {
 public:
  explicit TermBuffer(std::size_t n) {
    if (n > kInline) heap_.reserve(n);
  }
  void push_back(ERL_NIF_TERM t) {
    if (heap_.empty() && n_ < kInline) {
      inline_[n_++] = t;
      return;
    }
    if (heap_.empty()) heap_.assign(inline_, inline_ + n_);
    heap_.push_back(t);
    ++n_;
  }
  ERL_NIF_TERM* data() noexcept { return heap_.empty() ? inline_ : heap_.data(); }
  std::size_t size() const noexcept { return n_; }

 private:
  static constexpr std::size_t kInline = 16;
  ERL_NIF_TERM inline_[kInline];
  std::vector<ERL_NIF_TERM> heap_;
  std::size_t n_ = 0;
};

}  // namespace

PyRef Converter::via_etf(ErlNifEnv* env, ERL_NIF_TERM t, const ConvertOptions& o) {
  ReleasedBinary b;
  if (!enif_term_to_binary(env, t, &b.bin)) throw std::bad_alloc();
  b.owned = true;
  return codec_.decode(etf::Bytes(b.bin.data, b.bin.size), o.decode);
}

PyRef Converter::to_python(ErlNifEnv* env, ERL_NIF_TERM t, const ConvertOptions& o, std::size_t depth) {
  if (depth > o.decode.max_depth) throw etf::DecodeError(0, "term nested too deeply");
  switch (enif_term_type(env, t)) {
    case ERL_NIF_TERM_TYPE_INTEGER: {
      ErlNifSInt64 v;
      if (enif_get_int64(env, t, &v)) return PyRef::check(PyLong_FromLongLong(v));
      return via_etf(env, t, o);  // a big integer
    }
    case ERL_NIF_TERM_TYPE_FLOAT: {
      double d;
      enif_get_double(env, t, &d);
      return PyRef::check(PyFloat_FromDouble(d));
    }
    case ERL_NIF_TERM_TYPE_ATOM: {
      char buf[256 * 2];
      const int n = enif_get_atom(env, t, buf, sizeof buf, ERL_NIF_LATIN1);
      if (n <= 0) return via_etf(env, t, o);  // not Latin-1: the codec reads its UTF-8
      bool ascii = true;
      for (int i = 0; i < n - 1; ++i) ascii = ascii && static_cast<unsigned char>(buf[i]) < 0x80;
      if (ascii) return PyRef::check(codec_.atom(std::string_view(buf, n - 1), o.decode));
      const std::string utf8 = latin1_to_utf8(buf, static_cast<unsigned>(n - 1));
      return PyRef::check(codec_.atom(utf8, o.decode));
    }
    case ERL_NIF_TERM_TYPE_BITSTRING: {
      ErlNifBinary bin;
      if (!enif_inspect_binary(env, t, &bin)) return via_etf(env, t, o);  // not whole bytes
      return codec_.binary(etf::Bytes(bin.data, bin.size), o.decode);
    }
    case ERL_NIF_TERM_TYPE_LIST: {
      unsigned len;
      if (!enif_get_list_length(env, t, &len)) return via_etf(env, t, o);  // improper
      PyRef list = PyRef::check(PyList_New(len));
      ERL_NIF_TERM head, tail = t;
      for (unsigned i = 0; i < len; ++i) {
        enif_get_list_cell(env, tail, &head, &tail);
        PyList_SET_ITEM(list.get(), i, to_python(env, head, o, depth + 1).release());
      }
      return list;
    }
    case ERL_NIF_TERM_TYPE_TUPLE: {
      int arity;
      const ERL_NIF_TERM* elems;
      enif_get_tuple(env, t, &arity, &elems);
      PyRef tuple = PyRef::check(PyTuple_New(arity));
      for (int i = 0; i < arity; ++i) {
        PyTuple_SET_ITEM(tuple.get(), i, to_python(env, elems[i], o, depth + 1).release());
      }
      return tuple;
    }
    case ERL_NIF_TERM_TYPE_MAP: {
      size_t size;
      enif_get_map_size(env, t, &size);
      PyRef dict = PyRef::check(PyDict_New());
      ErlNifMapIterator it;
      if (!enif_map_iterator_create(env, t, &it, ERL_NIF_MAP_ITERATOR_FIRST)) throw std::bad_alloc();
      struct IterGuard {
        ErlNifEnv* env;
        ErlNifMapIterator* it;
        ~IterGuard() { enif_map_iterator_destroy(env, it); }
      } guard{env, &it};
      ERL_NIF_TERM k, v;
      while (enif_map_iterator_get_pair(env, &it, &k, &v)) {
        PyRef key = to_python(env, k, o, depth + 1);
        PyRef value = to_python(env, v, o, depth + 1);
        if (PyDict_SetItem(dict.get(), key.get(), value.get()) != 0) {
          // Unhashable in Python: the codec explains it, with the same words in every mode.
          if (!PyErr_ExceptionMatches(PyExc_TypeError)) throw PythonError();
          PyErr_Clear();
          return via_etf(env, t, o);
        }
        enif_map_iterator_next(env, &it);
      }
      if (static_cast<size_t>(PyDict_GET_SIZE(dict.get())) != size) return via_etf(env, t, o);  // keys equal in Python
      return dict;
    }
    case ERL_NIF_TERM_TYPE_REFERENCE: {
      LentObject* lent;
      if (handle_type_ && enif_get_resource(env, t, handle_type_, reinterpret_cast<void**>(&lent))) {
        return PyRef::borrow(lent->obj);
      }
      return via_etf(env, t, o);
    }
    default:
      return via_etf(env, t, o);  // pids, ports, funs
  }
}

ERL_NIF_TERM Converter::term_via_etf(ErlNifEnv* env, PyObject* obj, const ConvertOptions& o) {
  PyRef bytes = codec_.encode(obj, o.encode);
  const auto* data = reinterpret_cast<const unsigned char*>(PyBytes_AS_STRING(bytes.get()));
  ERL_NIF_TERM out;
  if (enif_binary_to_term(env, data, static_cast<size_t>(PyBytes_GET_SIZE(bytes.get())), &out, 0) == 0) {
    throw etf::EncodeError("the VM refused the encoded term");
  }
  return out;
}

ERL_NIF_TERM Converter::to_term(ErlNifEnv* env, PyObject* obj, const ConvertOptions& o, std::size_t depth) {
  StrTerms strs;
  return term(env, obj, o, depth, strs);
}

ERL_NIF_TERM Converter::term(ErlNifEnv* env, PyObject* obj, const ConvertOptions& o, std::size_t depth,
                             StrTerms& strs) {
  if (depth > o.encode.max_depth) throw etf::EncodeError("object nested too deeply");
  PyTypeObject* type = Py_TYPE(obj);
  if (obj == Py_None) return enif_make_atom_len(env, o.encode.none.data(), o.encode.none.size());
  if (obj == Py_True) return atoms.true_;
  if (obj == Py_False) return atoms.false_;
  if (type == &PyLong_Type) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (!overflow) {
      if (v == -1 && PyErr_Occurred()) throw PythonError();
      return enif_make_int64(env, v);
    }
    return term_via_etf(env, obj, o);
  }
  if (type == &PyFloat_Type) {
    const double d = PyFloat_AS_DOUBLE(obj);
    if (!std::isfinite(d)) return term_via_etf(env, obj, o);  // the codec's clear error
    return enif_make_double(env, d);
  }
  if (type == &PyUnicode_Type) {
    const bool cacheable = PyUnicode_GET_LENGTH(obj) <= 32;
    const std::size_t slot = (reinterpret_cast<std::uintptr_t>(obj) >> 4) % StrTerms::kSlots;
    if (cacheable && strs.obj[slot] == obj) return strs.term[slot];
    Py_ssize_t n;
    const char* p = PyUnicode_AsUTF8AndSize(obj, &n);
    if (!p) throw PythonError();
    ERL_NIF_TERM out;
    unsigned char* dst = enif_make_new_binary(env, static_cast<size_t>(n), &out);
    if (!dst) throw std::bad_alloc();
    std::memcpy(dst, p, static_cast<size_t>(n));
    if (cacheable) {
      Py_INCREF(obj);
      Py_XDECREF(std::exchange(strs.obj[slot], obj));
      strs.term[slot] = out;
    }
    return out;
  }
  if (type == &PyBytes_Type) {
    const Py_ssize_t n = PyBytes_GET_SIZE(obj);
    if (n >= kLendBytes) return lend_bytes(env, obj);
    ERL_NIF_TERM out;
    unsigned char* dst = enif_make_new_binary(env, static_cast<size_t>(n), &out);
    if (!dst) throw std::bad_alloc();
    std::memcpy(dst, PyBytes_AS_STRING(obj), static_cast<size_t>(n));
    return out;
  }
  if (type == &PyList_Type) {
    const Py_ssize_t n = PyList_GET_SIZE(obj);
    std::vector<ERL_NIF_TERM> items(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      // The list may change while we walk it (a custom encoder runs Python code).
      if (i >= PyList_GET_SIZE(obj)) throw etf::EncodeError("list changed size while being encoded");
      items[static_cast<size_t>(i)] = term(env, PyList_GET_ITEM(obj, i), o, depth + 1, strs);
    }
    return enif_make_list_from_array(env, items.data(), static_cast<unsigned>(n));
  }
  if (type == &PyTuple_Type) {
    const Py_ssize_t n = PyTuple_GET_SIZE(obj);
    TermBuffer items(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) items.push_back(term(env, PyTuple_GET_ITEM(obj, i), o, depth + 1, strs));
    return enif_make_tuple_from_array(env, items.data(), static_cast<unsigned>(n));
  }
  if (type == &PyDict_Type) {
    const auto n = static_cast<size_t>(PyDict_GET_SIZE(obj));
    TermBuffer keys(n), values(n);
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(obj, &pos, &k, &v)) {
      // Borrowed: hold them while Python code (custom encoders) may run.
      PyRef key = PyRef::borrow(k), value = PyRef::borrow(v);
      keys.push_back(term(env, key.get(), o, depth + 1, strs));
      values.push_back(term(env, value.get(), o, depth + 1, strs));
    }
    ERL_NIF_TERM out;
    if (!enif_make_map_from_arrays(env, keys.data(), values.data(), keys.size(), &out)) {
      return term_via_etf(env, obj, o);  // keys that are one term in Erlang: the codec says which
    }
    return out;
  }
  const py::Types& t = codec_.types();
  if (type == reinterpret_cast<PyTypeObject*>(t.atom.get())) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(obj);
    if (PyUnicode_KIND(obj) == PyUnicode_1BYTE_KIND && n <= 255) {
      return enif_make_atom_len(env, reinterpret_cast<const char*>(PyUnicode_1BYTE_DATA(obj)), static_cast<size_t>(n));
    }
    return term_via_etf(env, obj, o);
  }
  // Everything else (erpy.Pid, Ref, Port, Fun, ImproperList, BitBinary, bytearray,
  // subclasses, custom encoders, errors) is the codec's business.
  return term_via_etf(env, obj, o);
}

ERL_NIF_TERM Converter::lend_bytes(ErlNifEnv* env, PyObject* bytes) {
  // The Erlang binary points into the bytes object, which the resource keeps alive.
  auto* lent = static_cast<LentObject*>(enif_alloc_resource(handle_type_, sizeof(LentObject)));
  if (!lent) throw std::bad_alloc();
  Py_INCREF(bytes);
  lent->obj = bytes;
  ERL_NIF_TERM out = enif_make_resource_binary(env, lent, PyBytes_AS_STRING(bytes),
                                               static_cast<size_t>(PyBytes_GET_SIZE(bytes)));
  enif_release_resource(lent);
  return out;
}

}  // namespace erpy::nif
