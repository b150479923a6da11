// Python objects -> canonical ETF. One recursive walk, generic over the etf Sink so the
// same code can measure (SizeSink), write into an exact buffer (SpanSink) or append to a
// growing one (ByteBuffer).
//
// Errors carry the path to the offending value ("at [3]['tags']"). The path is collected
// while the exception unwinds, so the common, successful case pays nothing for it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "codec.hpp"
#include "etf/decode.hpp"
#include "etf/encode.hpp"
#include "etf/stack.hpp"
#include "repr.hpp"

namespace erpy::py {

namespace {

struct Step {
  enum Kind : std::uint8_t { kIndex, kValue, kKey, kTail } kind;
  Py_ssize_t index = 0;
  PyRef key;  // kValue and kKey: the map key, kept alive until the message is written
};

[[noreturn]] void fail(const std::string& what) { throw etf::EncodeError(what); }

[[noreturn]] void changed(const char* what) {
  fail(std::string(what) + " changed size while it was being encoded");
}

// Fetches the pending exception, lets `f` call Python, puts the exception back.
template <class F> void with_exception_saved(F&& f) {
#if PY_VERSION_HEX >= 0x030C0000
  PyObject* exc = PyErr_GetRaisedException();
  f(exc);
  PyErr_SetRaisedException(exc);
#else
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  if (tb && value) PyException_SetTraceback(value, tb);
  f(value);
  PyErr_Restore(type, value, tb);
#endif
}

// The hot writers, as one fixed-size write each so that they inline into the walk (the
// etf:: versions carry their error paths and stay out of line).
template <class S> inline void fast_binary_header(S& s, std::size_t n) {
  if (n > UINT32_MAX) etf::put_binary_header(s, n);  // throws
  const std::uint8_t b[5] = {etf::kBinary, static_cast<std::uint8_t>(n >> 24), static_cast<std::uint8_t>(n >> 16),
                             static_cast<std::uint8_t>(n >> 8), static_cast<std::uint8_t>(n)};
  s.write(b, 5);
}

template <class S> inline void fast_float(S& s, double d) {
  if (!std::isfinite(d)) etf::put_float(s, d);  // throws
  std::uint64_t v;
  std::memcpy(&v, &d, 8);
  std::uint8_t b[9] = {etf::kNewFloat};
  for (int i = 0; i < 8; ++i) b[1 + i] = static_cast<std::uint8_t>(v >> (56 - 8 * i));
  s.write(b, 9);
}

template <class S> inline void fast_integer(S& s, long long v) {
  if (v >= 0 && v <= 255) {
    const std::uint8_t b[2] = {etf::kSmallInteger, static_cast<std::uint8_t>(v)};
    s.write(b, 2);
  } else if (v >= INT32_MIN && v <= INT32_MAX) {
    const auto u = static_cast<std::uint32_t>(static_cast<std::int32_t>(v));
    const std::uint8_t b[5] = {etf::kInteger, static_cast<std::uint8_t>(u >> 24), static_cast<std::uint8_t>(u >> 16),
                               static_cast<std::uint8_t>(u >> 8), static_cast<std::uint8_t>(u)};
    s.write(b, 5);
  } else {
    etf::put_integer(s, v);
  }
}

template <class S> inline void write_payload(S& s, const void* p, std::size_t n) { s.write(p, n); }
inline void write_payload(ByteBuffer& s, const void* p, std::size_t n) { s.write_payload(p, n); }

inline void store_be32(std::uint8_t* d, std::uint32_t v) noexcept {
  d[0] = static_cast<std::uint8_t>(v >> 24);
  d[1] = static_cast<std::uint8_t>(v >> 16);
  d[2] = static_cast<std::uint8_t>(v >> 8);
  d[3] = static_cast<std::uint8_t>(v);
}

// A binary: header and payload, in one step when the sink is the growing buffer.
template <class S> [[gnu::always_inline]] inline void fast_binary(S& s, const void* p, std::size_t n) {
  fast_binary_header(s, n);
  write_payload(s, p, n);
}
[[gnu::always_inline]] inline void fast_binary(ByteBuffer& s, const void* p, std::size_t n) {
  if (n > UINT32_MAX) etf::put_binary_header(s, n);  // throws
  std::uint8_t* d = s.append_uninitialized(5 + n);
  d[0] = etf::kBinary;
  store_be32(d + 1, static_cast<std::uint32_t>(n));
  ByteBuffer::copy(d + 5, static_cast<const std::uint8_t*>(p), n);
}

// The header of a list or map of n elements (tag kList or kMap).
template <class S> [[gnu::always_inline]] inline void fast_header(S& s, std::uint8_t tag, std::size_t n) {
  if (n > UINT32_MAX) {
    throw etf::EncodeError(tag == etf::kMap ? "map too large" : "list too large");
  }
  std::uint8_t b[5] = {tag};
  store_be32(b + 1, static_cast<std::uint32_t>(n));
  s.write(b, 5);
}

// The value of an exact int when it fits in a few digits, without a call.
[[gnu::always_inline]] inline bool small_long(PyObject* o, long long& v) noexcept {
#if PY_VERSION_HEX >= 0x030C0000
  auto* l = reinterpret_cast<PyLongObject*>(o);
  if (!PyUnstable_Long_IsCompact(l)) return false;
  v = static_cast<long long>(PyUnstable_Long_CompactValue(l));
  return true;
#else
  const Py_ssize_t size = Py_SIZE(o);
  const digit* d = reinterpret_cast<PyLongObject*>(o)->ob_digit;
  switch (size) {
    case 0: v = 0; return true;
    case 1: v = d[0]; return true;
    case -1: v = -static_cast<long long>(d[0]); return true;
    case 2: v = static_cast<long long>(d[0]) | static_cast<long long>(d[1]) << PyLong_SHIFT; return true;
    case -2: v = -(static_cast<long long>(d[0]) | static_cast<long long>(d[1]) << PyLong_SHIFT); return true;
    default: return false;
  }
#endif
}

}  // namespace

// EncodeOptions::exact writes None as this byte, which is no ETF tag.
constexpr std::uint8_t kExactNone = 0;

template <class S>
class Encoder {
  template <class> friend class Encoder;  // exact_map encodes each entry apart

 public:
  Encoder(Codec& c, const EncodeOptions& o, S& s)
      : c_(c), o_(o), s_(s), atom_type_(reinterpret_cast<PyTypeObject*>(c.types_.atom.get())) {}

  void run(PyObject* obj) {
    try {
      term(obj, 0);
    } catch (const PythonError&) {
      annotate_python_error();
      throw;
    } catch (const etf::TooLargeError&) {
      throw;  // its size and limit are what the caller reports
    } catch (const etf::EncodeError& e) {
      if (path_.empty()) throw;
      throw etf::EncodeError(std::string(e.what()) + " at " + path());
    }
  }

 private:
  // The items of containers that are plain scalars (exact str in ASCII, int, finite
  // float) are written here, without the recursion and the references term() takes: they
  // run no Python code, so nothing can change the container meanwhile. Anything else
  // (including what could fail) writes nothing and returns false, for term().
  [[gnu::always_inline]] bool scalar(PyObject* o) {
    PyTypeObject* t = Py_TYPE(o);
    if (t == &PyUnicode_Type) {
      if (!PyUnicode_IS_COMPACT_ASCII(o)) return false;
      fast_binary(s_, PyUnicode_DATA(o), static_cast<std::size_t>(PyUnicode_GET_LENGTH(o)));
      return true;
    }
    if (t == &PyLong_Type) {
      long long v;
      if (!small_long(o, v)) return false;
      fast_integer(s_, v);
      return true;
    }
    if (t == &PyFloat_Type) {
      const double d = PyFloat_AS_DOUBLE(o);
      if (!std::isfinite(d)) return false;
      fast_float(s_, d);
      return true;
    }
    return false;
  }

  void term(PyObject* o, std::size_t depth) {
    if (depth > o_.max_depth || stack_.reached()) [[unlikely]] too_deep(depth);
    PyTypeObject* t = Py_TYPE(o);
    if (t == &PyUnicode_Type) return str(o);
    if (t == &PyLong_Type) return integer(o);
    if (t == &PyDict_Type) return dict(o, depth);
    if (t == &PyFloat_Type) return fast_float(s_, PyFloat_AS_DOUBLE(o));
    if (t == &PyList_Type) return list(o, depth);
    if (t == &PyTuple_Type) return tuple(o, depth);
    if (o == Py_True) return etf::put_atom(s_, "true");
    if (o == Py_False) return etf::put_atom(s_, "false");
    if (o == Py_None) return none();
    if (t == atom_type_) return atom(o);
    if (t == &PyBytes_Type) {
      fast_binary_header(s_, static_cast<std::size_t>(PyBytes_GET_SIZE(o)));
      return s_.write(PyBytes_AS_STRING(o), static_cast<std::size_t>(PyBytes_GET_SIZE(o)));
    }
    return other(o, depth);
  }

  // Everything but the common exact types: erpy's classes, custom encoders, subclasses
  // of the builtins, `default`.
  [[gnu::noinline]] void other(PyObject* o, std::size_t depth) {
    const Types& ty = c_.types_;
    PyTypeObject* t = Py_TYPE(o);
    if (t == type(ty.pid)) return pid(o);
    if (t == type(ty.ref)) return ref(o);
    if (t == type(ty.port)) return port(o);
    if (t == type(ty.fun)) return fun(o);
    if (t == type(ty.bit_binary)) return bit_binary(o);
    if (t == type(ty.improper_list)) return improper_list(o, depth);
    if (t == type(ty.frozen_list)) return frozen_list(o, depth);
    if (t == type(ty.frozen_map)) return frozen_map(o, depth);
    if (t == type(ty.frozen_improper_list)) return improper_list(o, depth);
    if (t == type(ty.key)) return key(o, depth);
    if (PyObject* fn = find_encoder(t)) return convert(PyRef::borrow(fn), o, depth, "the erpy encoder");
    if (PyObject_TypeCheck(o, atom_type_)) return atom(o);
    if (PyUnicode_Check(o)) return str(o);
    if (PyLong_Check(o)) return integer(o);
    if (PyFloat_Check(o)) return fast_float(s_, PyFloat_AS_DOUBLE(o));
    if (PyDict_Check(o)) return dict_subclass(o, depth);
    if (PyList_Check(o)) return list(o, depth);
    if (PyTuple_Check(o)) return tuple(o, depth);
    if (PyBytes_Check(o) || PyByteArray_Check(o) || PyMemoryView_Check(o)) return buffer(o);
    if (PyObject_TypeCheck(o, type(ty.pid))) return pid(o);
    if (PyObject_TypeCheck(o, type(ty.ref))) return ref(o);
    if (PyObject_TypeCheck(o, type(ty.port))) return port(o);
    if (PyObject_TypeCheck(o, type(ty.fun))) return fun(o);
    if (PyObject_TypeCheck(o, type(ty.bit_binary))) return bit_binary(o);
    if (PyObject_TypeCheck(o, type(ty.improper_list))) return improper_list(o, depth);
    if (PyObject_TypeCheck(o, type(ty.frozen_list))) return frozen_list(o, depth);
    if (PyObject_TypeCheck(o, type(ty.frozen_map))) return frozen_map(o, depth);
    if (PyObject_TypeCheck(o, type(ty.frozen_improper_list))) return improper_list(o, depth);
    if (PyObject_TypeCheck(o, type(ty.key))) return key(o, depth);
    if (o_.fallback) return convert(PyRef::borrow(o_.fallback), o, depth, "the default function");
    fail(std::string("cannot encode object of type ") + t->tp_name);
  }

  static PyTypeObject* type(const PyRef& r) { return reinterpret_cast<PyTypeObject*>(r.get()); }

  PyObject* find_encoder(PyTypeObject* t) {
    PyObject* encoders = c_.types_.encoders.get();
    if (PyDict_GET_SIZE(encoders) == 0) return nullptr;
    // tp_mro starts with the type itself: an exact registration wins over a base's.
    PyObject* mro = t->tp_mro;
    const Py_ssize_t n = mro ? PyTuple_GET_SIZE(mro) : 0;
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* fn = PyDict_GetItemWithError(encoders, PyTuple_GET_ITEM(mro, i));
      if (fn) return fn;
      if (PyErr_Occurred()) throw PythonError();
    }
    return nullptr;
  }

  // `fn` is held: the call may drop the registry's reference to it.
  void convert(PyRef fn, PyObject* o, std::size_t depth, const char* who) {
    PyRef r = PyRef::steal(PyObject_CallOneArg(fn.get(), o));
    if (!r) {
      culprit_ = std::string(who) + " for " + Py_TYPE(o)->tp_name;
      throw PythonError();
    }
    if (Py_TYPE(r.get()) == Py_TYPE(o)) {
      fail(std::string(who) + " for " + Py_TYPE(o)->tp_name + " returned another " + Py_TYPE(o)->tp_name);
    }
    term(r.get(), depth + 1);
  }

  void str(PyObject* o) {
    const char* p;
    Py_ssize_t n;
    if (PyUnicode_IS_COMPACT_ASCII(o)) {
      p = static_cast<const char*>(PyUnicode_DATA(o));
      n = PyUnicode_GET_LENGTH(o);
    } else {
      p = utf8(o, &n);
    }
    fast_binary_header(s_, static_cast<std::size_t>(n));
    write_payload(s_, p, static_cast<std::size_t>(n));
  }

  static const char* utf8(PyObject* o, Py_ssize_t* n) {
    const char* p = PyUnicode_AsUTF8AndSize(o, n);
    if (p) return p;
    if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) throw PythonError();
    PyErr_Clear();
    fail("a str with lone surrogates has no UTF-8 form");
  }

  static std::string_view atom_text(PyObject* o, const char* what) {
    if (!PyUnicode_Check(o)) {
      fail(std::string(what) + " must be a str, not " + Py_TYPE(o)->tp_name);
    }
    const Py_ssize_t chars = PyUnicode_GET_LENGTH(o);
    if (chars > static_cast<Py_ssize_t>(etf::kMaxAtomChars)) {
      fail(std::string(what) + " of " + std::to_string(chars) + " characters: Erlang allows 255");
    }
    Py_ssize_t n;
    const char* p = utf8(o, &n);
    return {p, static_cast<std::size_t>(n)};
  }

  void atom(PyObject* o) { etf::put_atom(s_, atom_text(o, "atom")); }

  void none() {
    if (!o_.exact) return etf::put_atom(s_, o_.none);
    const std::uint8_t tag = kExactNone;
    s_.write(&tag, 1);
  }

  // An erpy.Key is the term it wraps.
  void key(PyObject* o, std::size_t depth) {
    PyRef value = get(o, c_.n_value_);
    term(value.get(), depth + 1);
  }

  void integer(PyObject* o) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (!overflow) {
      if (v == -1 && PyErr_Occurred()) throw PythonError();
      return fast_integer(s_, v);
    }
    big_integer(o);
  }

  [[gnu::noinline]] void big_integer(PyObject* o) {
    PyRef zero = PyRef::check(PyLong_FromLong(0));
    const int negative = PyObject_RichCompareBool(o, zero.get(), Py_LT);
    if (negative < 0) throw PythonError();
    PyRef mag = negative ? PyRef::check(PyNumber_Negative(o)) : PyRef::borrow(o);
#if PY_VERSION_HEX >= 0x030D0000
    const int flags = Py_ASNATIVEBYTES_LITTLE_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER;
    const Py_ssize_t n = PyLong_AsNativeBytes(mag.get(), nullptr, 0, flags);
    if (n < 0) throw PythonError();
    std::vector<std::uint8_t> digits(static_cast<std::size_t>(n));
    if (PyLong_AsNativeBytes(mag.get(), digits.data(), n, flags) < 0) throw PythonError();
#else
    const std::size_t bits = _PyLong_NumBits(mag.get());
    if (bits == static_cast<std::size_t>(-1) && PyErr_Occurred()) throw PythonError();
    std::vector<std::uint8_t> digits((bits + 7) / 8);
    if (_PyLong_AsByteArray(reinterpret_cast<PyLongObject*>(mag.get()), digits.data(), digits.size(), 1, 0) < 0) {
      throw PythonError();
    }
#endif
    etf::put_big_integer(s_, negative != 0, digits);
  }

  // `o` is a list or (for a FrozenList) a tuple: PySequence_Fast_* reads both.
  void list(PyObject* o, std::size_t depth) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
    if (n == 0) return etf::put_nil(s_);
    if (n <= static_cast<Py_ssize_t>(etf::kMaxStringExt) && byte_list(o, n)) return;
    fast_header(s_, etf::kList, static_cast<std::size_t>(n));
    const bool inline_scalars = depth + 1 <= o_.max_depth;  // else term() reports the depth
    for (Py_ssize_t i = 0; i < n; ++i) {
      // A custom encoder may shrink the list, or drop its last reference to an item.
      if (i >= PySequence_Fast_GET_SIZE(o)) changed("a list");
      if (inline_scalars && scalar(PySequence_Fast_GET_ITEM(o, i))) continue;
      PyRef item = PyRef::borrow(PySequence_Fast_GET_ITEM(o, i));
      try {
        term(item.get(), depth + 1);
      } catch (...) {
        path_.push_back(Step{Step::kIndex, i, {}});
        throw;
      }
    }
    if (PySequence_Fast_GET_SIZE(o) != n) changed("a list");
    etf::put_nil(s_);
  }

  // A FrozenList encodes as the list it stands for (a STRING_EXT, say).
  void frozen_list(PyObject* o, std::size_t depth) {
    PyRef items = get(o, c_.n_items_);
    if (!PyTuple_CheckExact(items.get())) fail("FrozenList._items must be a tuple");
    list(items.get(), depth);
  }

  void frozen_map(PyObject* o, std::size_t depth) {
    PyRef map = get(o, c_.n_map_);
    if (!PyDict_CheckExact(map.get())) fail("FrozenMap._map must be a dict");
    dict(map.get(), depth);
  }

  // Erlang writes a list of 1..65535 integers 0..255 as STRING_EXT; so do we. Only exact
  // ints count (True is not 1 here); in exact mode int subclasses too, so that the same
  // term always gives the same bytes.
  bool byte_list(PyObject* o, Py_ssize_t n) {
    const auto small_int = [&](PyObject* item) {
      return PyLong_CheckExact(item) || (o_.exact && PyLong_Check(item) && !PyBool_Check(item));
    };
    if (!small_int(PySequence_Fast_GET_ITEM(o, 0))) return false;
    bytes_.resize(static_cast<std::size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PySequence_Fast_GET_ITEM(o, i);
      if (!small_int(item)) return false;
      int overflow = 0;
      const long v = PyLong_AsLongAndOverflow(item, &overflow);
      if (overflow || v < 0 || v > 255) return false;
      bytes_[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(v);
    }
    etf::put_byte_list(s_, etf::Bytes(bytes_.data(), bytes_.size()));
    return true;
  }

  void tuple(PyObject* o, std::size_t depth) {
    const Py_ssize_t n = PyTuple_GET_SIZE(o);
    etf::put_tuple_header(s_, static_cast<std::size_t>(n));
    const bool inline_scalars = depth + 1 <= o_.max_depth;  // else term() reports the depth
    // The caller keeps the tuple alive, and the tuple its items.
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (inline_scalars && scalar(PyTuple_GET_ITEM(o, i))) continue;
      try {
        term(PyTuple_GET_ITEM(o, i), depth + 1);
      } catch (...) {
        path_.push_back(Step{Step::kIndex, i, {}});
        throw;
      }
    }
  }

  void dict(PyObject* o, std::size_t depth) {
    if (o_.exact) [[unlikely]] return exact_map(o, depth);
    const Py_ssize_t n = PyDict_GET_SIZE(o);
    fast_header(s_, etf::kMap, static_cast<std::size_t>(n));
    const bool inline_scalars = depth + 1 <= o_.max_depth;  // else term() reports the depth
    Py_ssize_t pos = 0, done = 0;
    PyObject *k, *v;
    while (PyDict_Next(o, &pos, &k, &v)) {
      if (done == n) changed("a dict");
      ++done;
      if (inline_scalars && scalar(k)) [[likely]] {
        if (scalar(v)) [[likely]] continue;
        PyRef key = PyRef::borrow(k);
        PyRef value = PyRef::borrow(v);
        value_of(key, value.get(), depth);
        continue;
      }
      // Held: a custom encoder may remove them from the dict.
      PyRef key = PyRef::borrow(k);
      PyRef value = PyRef::borrow(v);
      pair(key, value.get(), depth);
    }
    if (done != n) changed("a dict");
  }

  // dict subclasses go through items(), which may be overridden (OrderedDict keeps its
  // order outside the dict's own table).
  void dict_subclass(PyObject* o, std::size_t depth) {
    if (o_.exact) return exact_map(o, depth);
    PyRef items = PyRef::check(PyMapping_Items(o));
    const Py_ssize_t n = PyList_GET_SIZE(items.get());
    etf::put_map_header(s_, static_cast<std::size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* kv = PyList_GET_ITEM(items.get(), i);
      if (!PyTuple_Check(kv) || PyTuple_GET_SIZE(kv) != 2) {
        fail(std::string(Py_TYPE(o)->tp_name) + ".items() must give (key, value) pairs");
      }
      PyRef key = PyRef::borrow(PyTuple_GET_ITEM(kv, 0));
      pair(key, PyTuple_GET_ITEM(kv, 1), depth);
    }
  }

  void pair(PyRef& key, PyObject* value, std::size_t depth) {
    try {
      term(key.get(), depth + 1);
    } catch (...) {
      path_.push_back(Step{Step::kKey, 0, std::move(key)});
      throw;
    }
    value_of(key, value, depth);
  }

  void value_of(PyRef& key, PyObject* value, std::size_t depth) {
    try {
      term(value, depth + 1);
    } catch (...) {
      path_.push_back(Step{Step::kValue, 0, std::move(key)});
      throw;
    }
  }

  // EncodeOptions::exact: the entries sorted by their bytes, so that equal maps give the
  // same bytes whatever their order.
  [[gnu::noinline]] void exact_map(PyObject* o, std::size_t depth) {
    PyRef items = PyRef::check(PyMapping_Items(o));
    const Py_ssize_t n = PyList_GET_SIZE(items.get());
    std::vector<std::pair<ByteBuffer, ByteBuffer>> entries(static_cast<std::size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* kv = PyList_GET_ITEM(items.get(), i);
      if (!PyTuple_Check(kv) || PyTuple_GET_SIZE(kv) != 2) {
        fail(std::string(Py_TYPE(o)->tp_name) + ".items() must give (key, value) pairs");
      }
      auto& [k, v] = entries[static_cast<std::size_t>(i)];
      Encoder<ByteBuffer>(c_, o_, k).term(PyTuple_GET_ITEM(kv, 0), depth + 1);
      Encoder<ByteBuffer>(c_, o_, v).term(PyTuple_GET_ITEM(kv, 1), depth + 1);
    }
    const auto bytes = [](const ByteBuffer& b) {
      return std::string_view(reinterpret_cast<const char*>(b.data()), b.size());
    };
    std::sort(entries.begin(), entries.end(), [&](const auto& a, const auto& b) {
      const int c = bytes(a.first).compare(bytes(b.first));
      return c != 0 ? c < 0 : bytes(a.second) < bytes(b.second);
    });
    etf::put_map_header(s_, entries.size());
    for (const auto& [k, v] : entries) {
      s_.write(k.data(), k.size());
      s_.write(v.data(), v.size());
    }
  }

  void buffer(PyObject* o) {
    BufferView view(o);
    etf::put_binary(s_, etf::Bytes(view.data(), view.size()));
  }

  PyRef get(PyObject* o, const PyRef& name) { return PyRef::check(PyObject_GetAttr(o, name.get())); }

  // Unsigned integer attribute of at most `max`.
  std::uint64_t uint_attr(PyObject* o, const PyRef& name, std::uint64_t max, const char* what) {
    PyRef v = get(o, name);
    if (!PyLong_Check(v.get())) fail(std::string(what) + " must be an int, not " + Py_TYPE(v.get())->tp_name);
    const unsigned long long x = PyLong_AsUnsignedLongLong(v.get());
    if (x == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
      if (!PyErr_ExceptionMatches(PyExc_OverflowError)) throw PythonError();
      PyErr_Clear();
      fail(std::string(what) + " must be an integer in 0.." + std::to_string(max));
    }
    if (x > max) fail(std::string(what) + " must be an integer in 0.." + std::to_string(max));
    return x;
  }

  void pid(PyObject* o) {
    PyRef node = get(o, c_.n_node_);
    const auto text = atom_text(node.get(), "Pid.node");
    const auto id = uint_attr(o, c_.n_id_, UINT32_MAX, "Pid.id");
    const auto serial = uint_attr(o, c_.n_serial_, UINT32_MAX, "Pid.serial");
    const auto creation = uint_attr(o, c_.n_creation_, UINT32_MAX, "Pid.creation");
    etf::put_pid(s_, text, static_cast<std::uint32_t>(id), static_cast<std::uint32_t>(serial),
                 static_cast<std::uint32_t>(creation));
  }

  void port(PyObject* o) {
    PyRef node = get(o, c_.n_node_);
    const auto text = atom_text(node.get(), "Port.node");
    const auto id = uint_attr(o, c_.n_id_, UINT64_MAX, "Port.id");
    const auto creation = uint_attr(o, c_.n_creation_, UINT32_MAX, "Port.creation");
    etf::put_port(s_, text, id, static_cast<std::uint32_t>(creation));
  }

  void ref(PyObject* o) {
    PyRef node = get(o, c_.n_node_);
    const auto text = atom_text(node.get(), "Ref.node");
    const auto creation = uint_attr(o, c_.n_creation_, UINT32_MAX, "Ref.creation");
    PyRef ids = get(o, c_.n_ids_);
    if (!PyTuple_Check(ids.get()) || PyTuple_GET_SIZE(ids.get()) < 1 || PyTuple_GET_SIZE(ids.get()) > 5) {
      fail("Ref.ids must be a tuple of 1..5 ints");
    }
    std::array<std::uint32_t, 5> words{};
    const Py_ssize_t n = PyTuple_GET_SIZE(ids.get());
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* w = PyTuple_GET_ITEM(ids.get(), i);
      const unsigned long long x = PyLong_Check(w) ? PyLong_AsUnsignedLongLong(w) : static_cast<unsigned long long>(-1);
      if (PyErr_Occurred()) PyErr_Clear();
      if (x > UINT32_MAX) fail("Ref.ids must be ints in 0..4294967295");
      words[static_cast<std::size_t>(i)] = static_cast<std::uint32_t>(x);
    }
    etf::put_reference(s_, text, static_cast<std::uint32_t>(creation),
                       std::span<const std::uint32_t>(words.data(), static_cast<std::size_t>(n)));
  }

  void fun(PyObject* o) {
    PyRef data = get(o, c_.n_data_);
    if (!PyBytes_Check(data.get())) fail("Fun.data must be bytes");
    const etf::Bytes raw(reinterpret_cast<const std::uint8_t*>(PyBytes_AS_STRING(data.get())),
                         static_cast<std::size_t>(PyBytes_GET_SIZE(data.get())));
    // Written verbatim, so it must be exactly one encoded fun: anything else would
    // corrupt the surrounding term.
    if (raw.empty() || (raw[0] != etf::kNewFun && raw[0] != etf::kExport && raw[0] != etf::kFun)) {
      fail("Fun.data must start with a fun tag (112, 113 or 117)");
    }
    try {
      etf::Reader r(raw);
      etf::NullBuilder nb;
      etf::decode_term(r, nb);
      if (!r.at_end()) fail("Fun.data has bytes after the fun");
    } catch (const etf::DecodeError& e) {
      fail(std::string("Fun.data is not a valid encoded fun: ") + e.what());
    }
    etf::put_raw(s_, raw);
  }

  void bit_binary(PyObject* o) {
    PyRef data = get(o, c_.n_data_);
    if (!PyBytes_Check(data.get())) fail("BitBinary.data must be bytes");
    const auto bits = uint_attr(o, c_.n_bits_, 8, "BitBinary.bits");
    etf::put_bitstring(s_,
                       etf::Bytes(reinterpret_cast<const std::uint8_t*>(PyBytes_AS_STRING(data.get())),
                                  static_cast<std::size_t>(PyBytes_GET_SIZE(data.get()))),
                       static_cast<unsigned>(bits));
  }

  void improper_list(PyObject* o, std::size_t depth) {
    PyRef elements = get(o, c_.n_elements_);
    PyRef tail = get(o, c_.n_tail_);
    PyRef seq = PyRef::check(PySequence_Fast(elements.get(), "ImproperList.elements must be a sequence"));
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(seq.get());
    if (n > 0) {
      etf::put_list_header(s_, static_cast<std::size_t>(n));
      for (Py_ssize_t i = 0; i < n; ++i) {
        // seq is a list only when `elements` was one; hold each item against mutation.
        if (i >= PySequence_Fast_GET_SIZE(seq.get())) changed("ImproperList.elements");
        PyRef item = PyRef::borrow(PySequence_Fast_GET_ITEM(seq.get(), i));
        try {
          term(item.get(), depth + 1);
        } catch (...) {
          path_.push_back(Step{Step::kIndex, i, {}});
          throw;
        }
      }
    }
    try {
      term(tail.get(), depth + 1);
    } catch (...) {
      path_.push_back(Step{Step::kTail, 0, {}});
      throw;
    }
  }

  [[noreturn, gnu::noinline, gnu::cold]] void too_deep(std::size_t depth) {
    if (depth > o_.max_depth) {
      fail("nesting deeper than " + std::to_string(o_.max_depth) +
           " levels (a container that contains itself?)");
    }
    fail("nesting too deep for this thread's stack (" + std::to_string(depth) +
         " levels; a container that contains itself?)");
  }

  // Outermost step first; a very long path (a self-containing list) keeps both ends.
  std::string path() const {
    std::string out;
    const std::size_t n = path_.size();
    for (std::size_t j = 0; j < n; ++j) {
      if (n > 24 && j == 12) {
        out += "...(" + std::to_string(n - 20) + " more)...";
        j = n - 8;
      }
      const Step& s = path_[n - 1 - j];
      switch (s.kind) {
        case Step::kIndex: out += "[" + std::to_string(s.index) + "]"; break;
        case Step::kValue: out += "[" + short_repr(s.key.get(), 60) + "]"; break;
        case Step::kKey: out += "<key " + short_repr(s.key.get(), 60) + ">"; break;
        case Step::kTail: out += ".tail"; break;
      }
    }
    return out;
  }

  // A Python exception from a custom encoder (or from Python itself) goes on as it is, so
  // callers can catch their own exceptions; a note says where it happened.
  void annotate_python_error() {
    if (path_.empty() && culprit_.empty()) return;
    with_exception_saved([&](PyObject* exc) {
      if (!exc) return;
      std::string note = "while erpy encoded the value";
      if (!culprit_.empty()) note = "raised by " + culprit_;
      if (!path_.empty()) note += " at " + path();
      PyRef r = PyRef::steal(PyObject_CallMethod(exc, "add_note", "s", note.c_str()));
      if (!r) PyErr_Clear();
    });
  }

  Codec& c_;
  const EncodeOptions& o_;
  S& s_;
  PyTypeObject* atom_type_;
  const etf::StackFloor stack_ = etf::StackFloor::current();
  std::vector<Step> path_;
  std::string culprit_;
  std::vector<std::uint8_t> bytes_;
};

namespace {

// Marks the reusable buffer as taken; gives back its memory when one term made it large.
class ScratchLease {
 public:
  ScratchLease(ByteBuffer& b, bool& busy) : b_(b), busy_(busy) {
    busy_ = true;
    b_.clear();
  }
  ~ScratchLease() {
    busy_ = false;
    b_.set_limit(ByteBuffer::kNoLimit);
    if (b_.capacity() > kKeep) b_.release_memory();
  }
  ScratchLease(const ScratchLease&) = delete;
  ScratchLease& operator=(const ScratchLease&) = delete;

 private:
  static constexpr std::size_t kKeep = std::size_t{4} << 20;
  ByteBuffer& b_;
  bool& busy_;
};

PyRef to_bytes(const ByteBuffer& b) {
  return PyRef::check(PyBytes_FromStringAndSize(reinterpret_cast<const char*>(b.data()),
                                                static_cast<Py_ssize_t>(b.size())));
}

// The buffer's limit for a term of at most `max` bytes after its first `start` bytes.
std::size_t limit_after(std::size_t start, std::size_t max) {
  return max > ByteBuffer::kNoLimit - start ? ByteBuffer::kNoLimit : start + max;
}

// Runs the encoder with `out` limited to o.max_size more bytes; the limit goes back as it
// was, and a TooLargeError reports the term's own size, not the buffer's.
void encode_limited(Codec& c, ByteBuffer& out, PyObject* obj, const EncodeOptions& o) {
  const std::size_t start = out.size(), before = out.limit();
  if (o.max_size != ByteBuffer::kNoLimit) out.set_limit(std::min(before, limit_after(start, o.max_size)));
  try {
    Encoder<ByteBuffer>(c, o, out).run(obj);
  } catch (const etf::TooLargeError& e) {
    out.set_limit(before);
    if (e.max() != limit_after(start, o.max_size)) throw;
    throw etf::TooLargeError(e.size() - start, o.max_size);
  } catch (...) {
    out.set_limit(before);
    throw;
  }
  out.set_limit(before);
}

}  // namespace

PyRef Codec::encode(PyObject* obj, const EncodeOptions& o) {
  if (scratch_busy_) {  // re-entered from a custom encoder
    ByteBuffer local;
    local.byte(etf::kVersion);
    encode_limited(*this, local, obj, o);
    return to_bytes(local);
  }
  ScratchLease lease(scratch_, scratch_busy_);
  scratch_.byte(etf::kVersion);
  encode_limited(*this, scratch_, obj, o);
  return to_bytes(scratch_);
}

void Codec::encode_append(ByteBuffer& out, PyObject* obj, const EncodeOptions& o) {
  const std::size_t mark = out.size();
  try {
    encode_limited(*this, out, obj, o);
  } catch (...) {
    out.truncate(mark);
    throw;
  }
}

PyRef Codec::encode_two_pass(PyObject* obj, const EncodeOptions& o) {
  etf::SizeSink size;
  Encoder<etf::SizeSink>(*this, o, size).run(obj);
  if (size.size > o.max_size) throw etf::TooLargeError(size.size, o.max_size);
  PyRef bytes = PyRef::check(PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(size.size + 1)));
  auto* p = reinterpret_cast<std::uint8_t*>(PyBytes_AS_STRING(bytes.get()));
  etf::SpanSink sink{p, p + size.size + 1};
  sink.byte(etf::kVersion);
  Encoder<etf::SpanSink>(*this, o, sink).run(obj);
  if (sink.p != sink.end) etf::SpanSink::overflow();
  return bytes;
}

}  // namespace erpy::py
