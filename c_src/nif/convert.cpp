#include "convert.hpp"

#include "atoms.hpp"

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "etf/decode.hpp"
#include "etf/error.hpp"
#include "etf/stack.hpp"

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

// ETF sizes of the scalars to_term makes itself (what the codec would write for them).
std::size_t atom_size(std::size_t utf8_bytes) { return utf8_bytes <= 255 ? 2 + utf8_bytes : 3 + utf8_bytes; }

std::size_t int_size(long long v) {
  if (v >= 0 && v <= 255) return 2;
  if (v >= INT32_MIN && v <= INT32_MAX) return 5;
  unsigned long long mag = v < 0 ? 0ull - static_cast<unsigned long long>(v) : static_cast<unsigned long long>(v);
  std::size_t n = 0;
  for (; mag; mag >>= 8) ++n;
  return 3 + n;  // SMALL_BIG_EXT
}

std::size_t saturating_sub(std::size_t a, std::size_t b) { return a > b ? a - b : 0; }

}  // namespace

// One to_term call: its environment, options, running size and string cache.
struct Converter::ToTerm {
  ToTerm(ErlNifEnv* e, const ConvertOptions& opts, TermInfo& i) : env(e), o(opts), info(i) {}
  ErlNifEnv* env;
  const ConvertOptions& o;
  TermInfo& info;
  StrTerms strs;
  const etf::StackFloor stack = etf::StackFloor::current();

  void add(std::size_t n) {
    info.size += n;
    if (info.size > o.max_size) throw etf::TooLargeError(info.size, o.max_size);
  }
  // Before allocating for `n` more bytes' worth: nothing is counted yet.
  void need(std::size_t n) const {
    if (n > o.max_size || info.size > o.max_size - n) throw etf::TooLargeError(info.size + n, o.max_size);
  }
};

struct Converter::ToPython {
  ToPython(ErlNifEnv* e, const ConvertOptions& opts) : env(e), o(opts) {}
  ErlNifEnv* env;
  const ConvertOptions& o;
  const etf::StackFloor stack = etf::StackFloor::current();
};

// Reads an encoded term for what makes it unsafe to read back: its atoms are made to
// exist (or refused) by Converter::atom, and pids, ports, references and funs are noted.
// The atoms inside funs (module, function, the creator's node) count too.
class AtomScan : public etf::NullBuilder {
 public:
  AtomScan(Converter& c, ErlNifEnv* env, const ConvertOptions& o) : c_(c), env_(env), o_(o) {}
  bool opaque = false;

  Value atom(std::string_view a) {
    c_.atom(env_, a, o_);
    return {};
  }
  Value pid(std::string_view node, std::uint32_t, std::uint32_t, std::uint32_t) { return opaque_node(node); }
  Value port(std::string_view node, std::uint64_t, std::uint32_t) { return opaque_node(node); }
  Value reference(std::string_view node, std::uint32_t, std::span<const std::uint32_t>) { return opaque_node(node); }
  Value fun(etf::Bytes encoded) {
    opaque = true;
    // The decoder hands funs over whole (canonical): walk their parts for the atoms.
    etf::Reader r(encoded);
    const std::uint8_t tag = r.u8("fun");
    std::uint32_t parts = 0;
    if (tag == etf::kExport) {
      parts = 3;  // module, function, arity
    } else if (tag == etf::kNewFun) {
      r.take(4 + 1 + 16 + 4, "fun header");  // size, arity, uniq, index
      parts = 4 + r.u32("fun free variables");  // module, old index, old uniq, pid, free
    } else {
      parts = 4 + r.u32("fun free variables");  // pid, module, index, uniq, free
    }
    for (std::uint32_t i = 0; i < parts; ++i) etf::decode_term(r, *this);
    return {};
  }

 private:
  Value opaque_node(std::string_view node) {
    opaque = true;
    c_.atom(env_, node, o_);
    return {};
  }

  Converter& c_;
  ErlNifEnv* env_;
  const ConvertOptions& o_;
};

ERL_NIF_TERM Converter::latin1_atom(ErlNifEnv* env, const char* p, std::size_t n, std::string_view utf8,
                                    const ConvertOptions& o) {
  ERL_NIF_TERM t;
  if (enif_make_existing_atom_len(env, p, n, &t, ERL_NIF_LATIN1)) return t;
  if (!o.new_atoms || !o.new_atoms->take()) {
    throw UnknownAtomError(utf8.empty() && n ? latin1_to_utf8(p, static_cast<unsigned>(n)) : std::string(utf8));
  }
  return enif_make_atom_len(env, p, n);
}

ERL_NIF_TERM Converter::atom(ErlNifEnv* env, std::string_view utf8, const ConvertOptions& o) {
  // The Latin-1 form when every character has one: enif can look those up (OTP 25's enif
  // knows no UTF-8 atoms).
  char latin1[256];
  std::size_t n = 0;
  bool fits = true;
  for (std::size_t i = 0; i < utf8.size() && fits;) {
    const auto c = static_cast<unsigned char>(utf8[i]);
    if (c < 0x80) {
      latin1[n++] = static_cast<char>(c);
      i += 1;
    } else if ((c == 0xC2 || c == 0xC3) && i + 1 < utf8.size()) {
      latin1[n++] = static_cast<char>(((c & 0x1F) << 6) | (static_cast<unsigned char>(utf8[i + 1]) & 0x3F));
      i += 2;
    } else {
      fits = false;
    }
    if (n == sizeof latin1) fits = false;
  }
  if (fits) return latin1_atom(env, latin1, n, utf8, o);
  // Other atoms as a one-atom external term: read safely, it exists or fails.
  std::string ext;
  ext.reserve(4 + utf8.size());
  ext.push_back(static_cast<char>(etf::kVersion));
  ext.push_back(static_cast<char>(etf::kAtomUtf8));
  ext.push_back(static_cast<char>(utf8.size() >> 8));
  ext.push_back(static_cast<char>(utf8.size() & 0xFF));
  ext.append(utf8);
  const auto* data = reinterpret_cast<const unsigned char*>(ext.data());
  ERL_NIF_TERM t;
  if (enif_binary_to_term(env, data, ext.size(), &t, ERL_NIF_BIN2TERM_SAFE)) return t;
  if (!o.new_atoms || !o.new_atoms->take()) throw UnknownAtomError(std::string(utf8));
  if (!enif_binary_to_term(env, data, ext.size(), &t, 0)) throw etf::EncodeError("the VM refused an atom");
  return t;
}

PyRef Converter::via_etf(ToPython& w, ERL_NIF_TERM t, std::size_t depth) {
  ReleasedBinary b;
  if (!enif_term_to_binary(w.env, t, &b.bin)) throw std::bad_alloc();
  b.owned = true;
  py::DecodeOptions d = w.o.decode;
  d.max_depth = saturating_sub(d.max_depth, depth);  // the levels above count too
  return codec_.decode(etf::Bytes(b.bin.data, b.bin.size), d);
}

PyRef Converter::to_python(ErlNifEnv* env, ERL_NIF_TERM t, const ConvertOptions& o) {
  ToPython w(env, o);
  return python(w, t, 0);
}

PyRef Converter::python(ToPython& w, ERL_NIF_TERM t, std::size_t depth) {
  ErlNifEnv* env = w.env;
  const ConvertOptions& o = w.o;
  if (depth > o.decode.max_depth) {
    throw etf::DecodeError(0, "term nested deeper than " + std::to_string(o.decode.max_depth) + " levels");
  }
  if (w.stack.reached()) {
    throw etf::DecodeError(0, "term nested too deeply for this thread's stack (" + std::to_string(depth) + " levels)");
  }
  switch (enif_term_type(env, t)) {
    case ERL_NIF_TERM_TYPE_INTEGER: {
      ErlNifSInt64 v;
      if (enif_get_int64(env, t, &v)) return PyRef::check(PyLong_FromLongLong(v));
      return via_etf(w, t, depth);  // a big integer
    }
    case ERL_NIF_TERM_TYPE_FLOAT: {
      double d;
      enif_get_double(env, t, &d);
      return PyRef::check(PyFloat_FromDouble(d));
    }
    case ERL_NIF_TERM_TYPE_ATOM: {
      char buf[256 * 2];
      const int n = enif_get_atom(env, t, buf, sizeof buf, ERL_NIF_LATIN1);
      if (n <= 0) return via_etf(w, t, depth);  // not Latin-1: the codec reads its UTF-8
      bool ascii = true;
      for (int i = 0; i < n - 1; ++i) ascii = ascii && static_cast<unsigned char>(buf[i]) < 0x80;
      if (ascii) return PyRef::check(codec_.atom(std::string_view(buf, n - 1), o.decode));
      const std::string utf8 = latin1_to_utf8(buf, static_cast<unsigned>(n - 1));
      return PyRef::check(codec_.atom(utf8, o.decode));
    }
    case ERL_NIF_TERM_TYPE_BITSTRING: {
      ErlNifBinary bin;
      if (!enif_inspect_binary(env, t, &bin)) return via_etf(w, t, depth);  // not whole bytes
      return codec_.binary(etf::Bytes(bin.data, bin.size), o.decode);
    }
    case ERL_NIF_TERM_TYPE_LIST: {
      unsigned len;
      if (!enif_get_list_length(env, t, &len)) return via_etf(w, t, depth);  // improper
      PyRef list = PyRef::check(PyList_New(len));
      ERL_NIF_TERM head, tail = t;
      for (unsigned i = 0; i < len; ++i) {
        enif_get_list_cell(env, tail, &head, &tail);
        PyList_SET_ITEM(list.get(), i, python(w, head, depth + 1).release());
      }
      return list;
    }
    case ERL_NIF_TERM_TYPE_TUPLE: {
      int arity;
      const ERL_NIF_TERM* elems;
      enif_get_tuple(env, t, &arity, &elems);
      PyRef tuple = PyRef::check(PyTuple_New(arity));
      for (int i = 0; i < arity; ++i) {
        PyTuple_SET_ITEM(tuple.get(), i, python(w, elems[i], depth + 1).release());
      }
      return tuple;
    }
    case ERL_NIF_TERM_TYPE_MAP: {
      size_t size;
      enif_get_map_size(env, t, &size);
      // The codec's rules for keys (frozen forms, erpy.Key for keys equal in Python).
      py::DictBuilder dict(codec_, size, saturating_sub(o.decode.max_depth, depth));
      ErlNifMapIterator it;
      if (!enif_map_iterator_create(env, t, &it, ERL_NIF_MAP_ITERATOR_FIRST)) throw std::bad_alloc();
      struct IterGuard {
        ErlNifEnv* env;
        ErlNifMapIterator* it;
        ~IterGuard() { enif_map_iterator_destroy(env, it); }
      } guard{env, &it};
      ERL_NIF_TERM k, v;
      while (enif_map_iterator_get_pair(env, &it, &k, &v)) {
        PyRef key = python(w, k, depth + 1);
        PyRef value = python(w, v, depth + 1);
        dict.add(std::move(key), std::move(value), 0);
        enif_map_iterator_next(env, &it);
      }
      return dict.finish();
    }
    case ERL_NIF_TERM_TYPE_REFERENCE: {
      LentObject* lent;
      if (handle_type_ && enif_get_resource(env, t, handle_type_, reinterpret_cast<void**>(&lent))) {
        return PyRef::borrow(lent->obj);
      }
      return via_etf(w, t, depth);
    }
    default:
      return via_etf(w, t, depth);  // pids, ports, funs
  }
}

ERL_NIF_TERM Converter::term_via_etf(ToTerm& w, PyObject* obj, std::size_t depth) {
  py::EncodeOptions eo = w.o.encode;
  eo.max_depth = saturating_sub(eo.max_depth, depth);
  if (w.o.max_size != SIZE_MAX) eo.max_size = saturating_sub(w.o.max_size, w.info.size);
  PyRef bytes;
  try {
    bytes = codec_.encode(obj, eo);
  } catch (const etf::TooLargeError& e) {
    throw etf::TooLargeError(w.info.size + e.size(), w.o.max_size);
  }
  const auto* data = reinterpret_cast<const unsigned char*>(PyBytes_AS_STRING(bytes.get()));
  const auto size = static_cast<size_t>(PyBytes_GET_SIZE(bytes.get()));
  w.add(size - 1);  // not the version byte
  // Atoms first (made if allowed, else refused), so that the safe read below fails only
  // for what it must: a fun of a function the VM does not know.
  AtomScan scan(*this, w.env, w.o);
  etf::decode(etf::Bytes(data, size), scan);
  w.info.opaque = w.info.opaque || scan.opaque;
  ERL_NIF_TERM out;
  if (enif_binary_to_term(w.env, data, size, &out, ERL_NIF_BIN2TERM_SAFE) == 0) {
    throw etf::EncodeError("the VM refused the encoded term (a fun of a function it does not have?)");
  }
  return out;
}

ERL_NIF_TERM Converter::to_term(ErlNifEnv* env, PyObject* obj, const ConvertOptions& o, TermInfo& info) {
  ToTerm w(env, o, info);
  return term(w, obj, 0);
}

ERL_NIF_TERM Converter::term(ToTerm& w, PyObject* obj, std::size_t depth) {
  ErlNifEnv* env = w.env;
  const ConvertOptions& o = w.o;
  if (depth > o.encode.max_depth) throw etf::EncodeError("object nested too deeply");
  if (w.stack.reached()) throw etf::EncodeError("object nested too deeply for this thread's stack");
  PyTypeObject* type = Py_TYPE(obj);
  if (obj == Py_None) {
    w.add(atom_size(o.encode.none.size()));
    return latin1_atom(env, o.encode.none.data(), o.encode.none.size(), o.encode.none, o);
  }
  if (obj == Py_True) {
    w.add(6);
    return atoms.true_;
  }
  if (obj == Py_False) {
    w.add(7);
    return atoms.false_;
  }
  if (type == &PyLong_Type) {
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (!overflow) {
      if (v == -1 && PyErr_Occurred()) throw PythonError();
      w.add(int_size(v));
      return enif_make_int64(env, v);
    }
    return term_via_etf(w, obj, depth);
  }
  if (type == &PyFloat_Type) {
    const double d = PyFloat_AS_DOUBLE(obj);
    if (!std::isfinite(d)) return term_via_etf(w, obj, depth);  // the codec's clear error
    w.add(9);
    return enif_make_double(env, d);
  }
  if (type == &PyUnicode_Type) {
    const bool cacheable = PyUnicode_GET_LENGTH(obj) <= 32;
    const std::size_t slot = (reinterpret_cast<std::uintptr_t>(obj) >> 4) % StrTerms::kSlots;
    // At least a byte a character: counted before the UTF-8 form is made.
    const auto chars = static_cast<std::size_t>(PyUnicode_GET_LENGTH(obj));
    w.add(5 + chars);
    Py_ssize_t n;
    const char* p = PyUnicode_AsUTF8AndSize(obj, &n);
    if (!p) throw PythonError();
    w.add(static_cast<std::size_t>(n) - chars);
    if (cacheable && w.strs.obj[slot] == obj) return w.strs.term[slot];
    ERL_NIF_TERM out;
    unsigned char* dst = enif_make_new_binary(env, static_cast<size_t>(n), &out);
    if (!dst) throw std::bad_alloc();
    std::memcpy(dst, p, static_cast<size_t>(n));
    if (cacheable) {
      Py_INCREF(obj);
      Py_XDECREF(std::exchange(w.strs.obj[slot], obj));
      w.strs.term[slot] = out;
    }
    return out;
  }
  if (type == &PyBytes_Type) {
    const Py_ssize_t n = PyBytes_GET_SIZE(obj);
    w.add(5 + static_cast<std::size_t>(n));
    if (n >= kLendBytes) return lend_bytes(env, obj);
    ERL_NIF_TERM out;
    unsigned char* dst = enif_make_new_binary(env, static_cast<size_t>(n), &out);
    if (!dst) throw std::bad_alloc();
    std::memcpy(dst, PyBytes_AS_STRING(obj), static_cast<size_t>(n));
    return out;
  }
  if (type == &PyList_Type) return list_term(w, obj, depth);
  if (type == &PyTuple_Type) {
    const Py_ssize_t n = PyTuple_GET_SIZE(obj);
    w.need(static_cast<std::size_t>(n));  // a byte an element at least
    w.add(n <= 255 ? 2 : 5);
    TermBuffer items(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) items.push_back(term(w, PyTuple_GET_ITEM(obj, i), depth + 1));
    return enif_make_tuple_from_array(env, items.data(), static_cast<unsigned>(n));
  }
  if (type == &PyDict_Type) {
    const auto n = static_cast<size_t>(PyDict_GET_SIZE(obj));
    w.need(2 * n);
    w.add(5);
    TermBuffer keys(n), values(n);
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(obj, &pos, &k, &v)) {
      // Borrowed: hold them while Python code (custom encoders) may run.
      PyRef key = PyRef::borrow(k), value = PyRef::borrow(v);
      keys.push_back(term(w, key.get(), depth + 1));
      values.push_back(term(w, value.get(), depth + 1));
    }
    if (keys.size() != n) throw etf::EncodeError("dict changed size while being encoded");
    ERL_NIF_TERM out;
    if (!enif_make_map_from_arrays(env, keys.data(), values.data(), keys.size(), &out)) {
      throw etf::EncodeError("two keys of a dict are the same term in Erlang (True and Atom('true'), say)");
    }
    return out;
  }
  const py::Types& t = codec_.types();
  if (type == reinterpret_cast<PyTypeObject*>(t.key.get())) {  // an erpy.Key is the term it wraps
    PyRef value = PyRef::check(PyObject_GetAttrString(obj, "value"));
    return term(w, value.get(), depth + 1);
  }
  if (type == reinterpret_cast<PyTypeObject*>(t.atom.get())) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(obj);
    if (PyUnicode_KIND(obj) == PyUnicode_1BYTE_KIND && n <= 255) {
      const auto* p = reinterpret_cast<const char*>(PyUnicode_1BYTE_DATA(obj));
      std::size_t utf8 = static_cast<std::size_t>(n);
      for (Py_ssize_t i = 0; i < n; ++i) utf8 += static_cast<unsigned char>(p[i]) >= 0x80;
      w.add(atom_size(utf8));
      return latin1_atom(env, p, static_cast<std::size_t>(n), {}, o);
    }
    return term_via_etf(w, obj, depth);
  }
  // Everything else (erpy.Pid, Ref, Port, Fun, ImproperList, BitBinary, the frozen key
  // types, bytearray, subclasses, custom encoders, errors) is the codec's business.
  return term_via_etf(w, obj, depth);
}

ERL_NIF_TERM Converter::list_term(ToTerm& w, PyObject* obj, std::size_t depth) {
  const Py_ssize_t n = PyList_GET_SIZE(obj);
  if (n == 0) {
    w.add(1);
    return enif_make_list(w.env, 0);
  }
  w.need(static_cast<std::size_t>(n));  // a byte an element at least
  std::vector<ERL_NIF_TERM> items(static_cast<size_t>(n));
  // 1..65535 small ints are a STRING_EXT in ETF: 3 bytes and one per element.
  bool bytes = n <= static_cast<Py_ssize_t>(etf::kMaxStringExt);
  for (Py_ssize_t i = 0; i < n && bytes; ++i) {
    PyObject* item = PyList_GET_ITEM(obj, i);
    int overflow = 0;
    const long v = PyLong_CheckExact(item) ? PyLong_AsLongAndOverflow(item, &overflow) : -1;
    bytes = !overflow && v >= 0 && v <= 255;
    if (bytes) items[static_cast<size_t>(i)] = enif_make_int(w.env, static_cast<int>(v));
  }
  if (bytes) {
    w.add(3 + static_cast<std::size_t>(n));
    return enif_make_list_from_array(w.env, items.data(), static_cast<unsigned>(n));
  }
  w.add(6);  // LIST_EXT header and the tail
  for (Py_ssize_t i = 0; i < n; ++i) {
    // The list may change while we walk it (a custom encoder runs Python code).
    if (i >= PyList_GET_SIZE(obj)) throw etf::EncodeError("list changed size while being encoded");
    PyRef item = PyRef::borrow(PyList_GET_ITEM(obj, i));
    items[static_cast<size_t>(i)] = term(w, item.get(), depth + 1);
  }
  return enif_make_list_from_array(w.env, items.data(), static_cast<unsigned>(n));
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
