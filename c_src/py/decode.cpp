// ETF -> Python objects: an etf::Decoder Builder whose values are PyRefs. Containers are
// allocated once at their final size and filled in place.
#include <array>
#include <cstring>
#include <memory>
#include <string>

#include "codec.hpp"
#include "etf/decode.hpp"
#include "repr.hpp"

namespace erpy::py {

namespace {

bool all_ascii(const std::uint8_t* p, std::size_t n) noexcept {
  // Eight bytes at a time: map keys and short values are most of what is checked. Long
  // input stops at the first 256-byte block with a high bit (raw bytes fail at once).
  constexpr std::uint64_t kHigh = 0x8080808080808080ull;
  std::uint64_t acc = 0;
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    std::uint64_t w;
    std::memcpy(&w, p + i, 8);
    acc |= w;
    if ((i & 255) == 248 && (acc & kHigh)) return false;
  }
  for (; i < n; ++i) acc |= p[i];
  return (acc & kHigh) == 0;
}

// Whether a term with this tag is a value that Python cannot change (str, bytes, int,
// float, an atom's object), so that equal bytes may give the same object twice.
constexpr bool immutable_tag(std::uint8_t tag) noexcept {
  switch (tag) {
    case etf::kSmallInteger: case etf::kInteger: case etf::kSmallBig: case etf::kLargeBig:
    case etf::kNewFloat: case etf::kFloat: case etf::kBinary:
    case etf::kAtom: case etf::kSmallAtom: case etf::kAtomUtf8: case etf::kSmallAtomUtf8:
    case etf::kAtomCacheRef:
      return true;
    default:
      return false;
  }
}

// Equality of two byte runs of the same length, inline for the short ones (a map key, a
// small value): a memcmp call costs more than the comparison at these sizes.
inline bool same_bytes(const std::uint8_t* a, const std::uint8_t* b, std::size_t n) noexcept {
  const auto load = [](const std::uint8_t* p, auto v) {
    std::memcpy(&v, p, sizeof v);
    return v;
  };
  if (n >= 8) {
    if (n > 16) return std::memcmp(a, b, n) == 0;
    return load(a, std::uint64_t{}) == load(b, std::uint64_t{}) &&
           load(a + n - 8, std::uint64_t{}) == load(b + n - 8, std::uint64_t{});
  }
  if (n >= 4) {
    return load(a, std::uint32_t{}) == load(b, std::uint32_t{}) &&
           load(a + n - 4, std::uint32_t{}) == load(b + n - 4, std::uint32_t{});
  }
  if (n >= 2) {
    return load(a, std::uint16_t{}) == load(b, std::uint16_t{}) &&
           load(a + n - 2, std::uint16_t{}) == load(b + n - 2, std::uint16_t{});
  }
  return n == 0 || a[0] == b[0];
}

class PyBuilder {
 public:
  using Value = PyRef;

  // Maps in a list of records repeat their keys, and often some values: each map arity
  // keeps, per key and value position, the last immutable term seen there (its bytes in
  // the input and its object). A term with the same bytes is that object again, found
  // with one comparison instead of a decoding (and its str keeps its cached hash).
  struct Slot {
    const std::uint8_t* raw = nullptr;  // in the input, which outlives the builder
    std::size_t size = 0;
    PyRef value;
  };
  struct Map {
    DictBuilder dict;
    Slot* slots;  // 2 per pair, or null: no reuse for this map
  };
  static constexpr std::size_t kMaxReusedPairs = 32;
  static constexpr std::size_t kMaxReusedBytes = 256;

  PyBuilder(Codec& c, const DecodeOptions& o) : c_(c), o_(o) {}

  Value integer(std::int64_t v) { return PyRef::check(PyLong_FromLongLong(v)); }

  Value big_integer(bool negative, etf::Bytes magnitude) {
#if PY_VERSION_HEX >= 0x030D0000
    PyRef mag = PyRef::check(PyLong_FromUnsignedNativeBytes(
        magnitude.data(), magnitude.size(),
        Py_ASNATIVEBYTES_LITTLE_ENDIAN | Py_ASNATIVEBYTES_UNSIGNED_BUFFER));
#else
    PyRef mag = PyRef::check(_PyLong_FromByteArray(magnitude.data(), magnitude.size(), 1, 0));
#endif
    if (!negative) return mag;
    return PyRef::check(PyNumber_Negative(mag.get()));
  }

  // Floats are immutable, so a value that repeats (a default, a score, 0.0) can be one
  // object, as CPython's small ints are.
  Value floating(double d) {
    std::uint64_t bits;
    std::memcpy(&bits, &d, sizeof bits);
    if (last_float_ && bits == last_float_bits_) return PyRef::borrow(last_float_.get());
    last_float_ = PyRef::check(PyFloat_FromDouble(d));
    last_float_bits_ = bits;
    return PyRef::borrow(last_float_.get());
  }

  Value atom(std::string_view utf8) { return PyRef::check(c_.atom(utf8, o_)); }

  Value binary(etf::Bytes b) { return c_.binary(b, o_); }

  Value bitstring(etf::Bytes b, unsigned bits) {
    // Made from NULL and filled here: with a source, a 1-byte bytes object would be
    // CPython's shared singleton for that byte, and masking it would corrupt every b'\xff'.
    PyRef data = PyRef::check(PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(b.size())));
    auto* raw = reinterpret_cast<std::uint8_t*>(PyBytes_AS_STRING(data.get()));
    std::memcpy(raw, b.data(), b.size());
    raw[b.size() - 1] &= static_cast<std::uint8_t>(0xFF << (8 - bits));
    return PyRef::check(PyObject_CallFunction(c_.types().bit_binary.get(), "OI", data.get(), bits));
  }

  Value byte_list(etf::Bytes b) {
    PyRef list = PyRef::check(PyList_New(static_cast<Py_ssize_t>(b.size())));
    for (std::size_t i = 0; i < b.size(); ++i) {
      // Small ints are CPython singletons: this cannot fail.
      PyList_SET_ITEM(list.get(), static_cast<Py_ssize_t>(i), PyLong_FromLong(b[i]));
    }
    return list;
  }

  Value nil() { return PyRef::check(PyList_New(0)); }

  Value pid(std::string_view node, std::uint32_t id, std::uint32_t serial, std::uint32_t creation) {
    PyRef n = atom_node(node);
    return PyRef::check(
        PyObject_CallFunction(c_.types().pid.get(), "OIII", n.get(), id, serial, creation));
  }

  Value port(std::string_view node, std::uint64_t id, std::uint32_t creation) {
    PyRef n = atom_node(node);
    return PyRef::check(PyObject_CallFunction(c_.types().port.get(), "OKI", n.get(),
                                              static_cast<unsigned long long>(id), creation));
  }

  Value reference(std::string_view node, std::uint32_t creation, std::span<const std::uint32_t> ids) {
    PyRef n = atom_node(node);
    PyRef t = PyRef::check(PyTuple_New(static_cast<Py_ssize_t>(ids.size())));
    for (std::size_t i = 0; i < ids.size(); ++i) {
      PyObject* v = PyLong_FromUnsignedLong(ids[i]);
      if (!v) throw PythonError();
      PyTuple_SET_ITEM(t.get(), static_cast<Py_ssize_t>(i), v);
    }
    return PyRef::check(PyObject_CallFunction(c_.types().ref.get(), "OIO", n.get(), creation, t.get()));
  }

  Value fun(etf::Bytes encoded) {
    PyRef data = PyRef::check(PyBytes_FromStringAndSize(reinterpret_cast<const char*>(encoded.data()),
                                                        static_cast<Py_ssize_t>(encoded.size())));
    return PyRef::check(PyObject_CallOneArg(c_.types().fun.get(), data.get()));
  }

  // A long list or tuple is hidden from the garbage collector while it is filled: every
  // collection that runs meanwhile (one per few hundred objects made) would otherwise walk
  // all the items it holds so far, which makes decoding a long list of containers grow
  // faster than its length. Nothing else holds it, so it is in no cycle until it is returned.
  static constexpr std::size_t kUntrackedFill = 256;

  PyRef tuple_begin(std::size_t n) {
    PyRef t = PyRef::check(PyTuple_New(static_cast<Py_ssize_t>(n)));
    if (n >= kUntrackedFill) PyObject_GC_UnTrack(t.get());  // as list_begin
    return t;
  }
  void tuple_set(PyRef& t, std::size_t i, PyRef&& v) {
    PyTuple_SET_ITEM(t.get(), static_cast<Py_ssize_t>(i), v.release());
  }
  Value tuple_end(PyRef& t) {
    track(t.get(), PyTuple_GET_SIZE(t.get()));
    return std::move(t);
  }

  PyRef list_begin(std::size_t n) {
    PyRef l = PyRef::check(PyList_New(static_cast<Py_ssize_t>(n)));
    if (n >= kUntrackedFill) PyObject_GC_UnTrack(l.get());
    return l;
  }
  void list_set(PyRef& l, std::size_t i, PyRef&& v) {
    PyList_SET_ITEM(l.get(), static_cast<Py_ssize_t>(i), v.release());
  }
  Value list_end(PyRef& l) {
    track(l.get(), PyList_GET_SIZE(l.get()));
    return std::move(l);
  }

  // Erlang has no list whose tail is a list: [1 | [2, 3]] is [1, 2, 3]. Such input is
  // flattened the same way, so Python never sees an ImproperList ending in a list.
  Value improper_list_end(PyRef& l, PyRef&& tail) {
    track(l.get(), PyList_GET_SIZE(l.get()));  // before Python code can see it
    const Types& t = c_.types();
    // LIST_EXT of no elements: what remains of the list is its tail.
    if (PyList_GET_SIZE(l.get()) == 0) return std::move(tail);
    if (PyList_CheckExact(tail.get())) {
      if (PyList_SetSlice(l.get(), PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, tail.get()) != 0) throw PythonError();
      return std::move(l);
    }
    if (Py_TYPE(tail.get()) == reinterpret_cast<PyTypeObject*>(t.improper_list.get())) {
      PyRef elements = PyRef::check(PyObject_GetAttrString(tail.get(), "elements"));
      PyRef inner_tail = PyRef::check(PyObject_GetAttrString(tail.get(), "tail"));
      if (PyList_SetSlice(l.get(), PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, elements.get()) != 0) throw PythonError();
      return PyRef::check(PyObject_CallFunction(t.improper_list.get(), "OO", l.get(), inner_tail.get()));
    }
    return PyRef::check(PyObject_CallFunction(t.improper_list.get(), "OO", l.get(), tail.get()));
  }

  Map map_begin(std::size_t n) { return Map{DictBuilder(c_, n, o_.max_depth), slots_for(n)}; }

  void map_set(Map& m, PyRef&& key, PyRef&& value, std::size_t key_offset) {
    m.dict.add(std::move(key), std::move(value), key_offset);
  }

  Value map_end(Map& m) { return m.dict.finish(); }

  bool map_reuses(const Map& m) const { return m.slots != nullptr; }

  bool map_reuse(Map& m, std::size_t slot, etf::Reader& r, PyRef& out) {
    const Slot& s = m.slots[slot];
    if (!s.value || s.size > r.remaining() || !same_bytes(r.data().data() + r.pos(), s.raw, s.size)) {
      return false;
    }
    r.take(s.size, "term");
    out = PyRef::borrow(s.value.get());
    return true;
  }

  void map_remember(Map& m, std::size_t slot, etf::Bytes raw, const PyRef& v) {
    if (raw.size() > kMaxReusedBytes || !immutable_tag(raw[0])) return;
    Slot& s = m.slots[slot];
    s.raw = raw.data();
    s.size = raw.size();
    s.value = PyRef::borrow(v.get());
  }

 private:
  PyRef atom_node(std::string_view node) {
    // A node named like the `none` atom is still a node: keep it an Atom.
    if (node == "true" || node == "false" || node == o_.none) {
      PyRef text = PyRef::check(PyUnicode_DecodeUTF8(node.data(), static_cast<Py_ssize_t>(node.size()), "strict"));
      return PyRef::check(PyObject_CallOneArg(c_.types().atom.get(), text.get()));
    }
    return PyRef::check(c_.atom(node, o_));
  }

  // Undoes list_begin's and tuple_begin's untracking (`n`: the size they were made with).
  static void track(PyObject* o, Py_ssize_t n) {
    if (n >= static_cast<Py_ssize_t>(kUntrackedFill) && !PyObject_GC_IsTracked(o)) PyObject_GC_Track(o);
  }

  // The slots of maps of n pairs, from the second such map on: a term with one map (most
  // messages) costs no allocation.
  Slot* slots_for(std::size_t n) {
    if (n == 0 || n > kMaxReusedPairs) return nullptr;
    const std::uint32_t bit = std::uint32_t{1} << (n - 1);
    if (!(seen_ & bit)) {
      seen_ |= bit;
      return nullptr;
    }
    if (!shapes_) shapes_ = std::make_unique<Shapes>();
    auto& slots = shapes_->by_arity[n - 1];
    if (!slots) slots = std::make_unique<Slot[]>(2 * n);
    return slots.get();
  }

  Codec& c_;
  const DecodeOptions& o_;
  struct Shapes {
    std::array<std::unique_ptr<Slot[]>, kMaxReusedPairs> by_arity;
  };
  static_assert(kMaxReusedPairs <= 32, "seen_ has a bit per arity");
  std::uint32_t seen_ = 0;  // bit n - 1: a map of n pairs was decoded
  std::unique_ptr<Shapes> shapes_;
  PyRef last_float_;
  std::uint64_t last_float_bits_ = 0;
};

// Two keys with equal hashes are compared, which recurses in Python: keys nested deep
// enough stop that with a RecursionError, a decoding error here.
[[noreturn]] void too_deep_to_compare(std::size_t key_offset) {
  if (!PyErr_ExceptionMatches(PyExc_RecursionError)) throw PythonError();
  PyErr_Clear();
  throw etf::DecodeError(key_offset, "map key nested too deeply to compare with the others in Python");
}

etf::DecodeOptions core_options(const DecodeOptions& o) {
  etf::DecodeOptions d;
  d.max_depth = o.max_depth;
  if (o.max_size != SIZE_MAX) d.max_inflated = o.max_size;
  return d;
}

}  // namespace

void DictBuilder::insert_frozen(PyRef& key, PyObject* value, std::size_t key_offset) {
  if (!PyErr_ExceptionMatches(PyExc_TypeError)) too_deep_to_compare(key_offset);
  PyErr_Clear();
  // A list, a map or an improper list (or a tuple holding one) as a key: its frozen
  // form, made only now, so that keys Python can hash cost nothing more.
  try {
    key = c_.freeze(key.get(), max_depth_);
  } catch (const PythonError&) {
    if (!PyErr_ExceptionMatches(PyExc_RecursionError)) throw;
    PyErr_Clear();
    throw etf::DecodeError(key_offset, "map key nested too deeply for this thread's stack");
  }
  if (!PyDict_SetDefault(dict_.get(), key.get(), value)) too_deep_to_compare(key_offset);
}

void DictBuilder::add_rare(PyRef&& key, PyRef&& value, std::size_t key_offset, Py_ssize_t before) {
  if (equal_) {  // add() tried nothing
    if (!PyDict_SetDefault(dict_.get(), key.get(), value.get())) insert_frozen(key, value.get(), key_offset);
  } else if (PyErr_Occurred()) {  // add()'s try found the key unhashable
    insert_frozen(key, value.get(), key_offset);
  }
  if (PyDict_GET_SIZE(dict_.get()) != before) {
    if (equal_) equal_->pairs.push_back(Pair{std::move(key), std::move(value), key_offset});
    return;
  }
  // Equal in Python to an earlier key (1.0 after 1): from now on every pair is kept, and
  // the dict is made again at the end.
  if (!equal_) {
    auto e = std::make_unique<Equal>();
    e->keys = PyRef::check(PySet_New(nullptr));
    e->pairs.reserve(static_cast<std::size_t>(PyDict_GET_SIZE(dict_.get())) + 1);
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(dict_.get(), &pos, &k, &v)) {
      e->pairs.push_back(Pair{PyRef::borrow(k), PyRef::borrow(v), key_offset});
    }
    equal_ = std::move(e);
  }
  if (PySet_Add(equal_->keys.get(), key.get()) != 0) too_deep_to_compare(key_offset);
  equal_->pairs.push_back(Pair{std::move(key), std::move(value), key_offset});
}

PyRef DictBuilder::finish_rare() {
  PyRef out = PyRef::check(PyDict_New());
  for (Pair& p : equal_->pairs) {
    const int wrap = PySet_Contains(equal_->keys.get(), p.key.get());
    if (wrap < 0) too_deep_to_compare(p.offset);
    PyRef key = PyRef::borrow(p.key.get());
    if (wrap) {
      try {
        key = c_.key(p.key.get(), max_depth_);
      } catch (const PythonError&) {
        if (!PyErr_ExceptionMatches(PyExc_RecursionError)) throw;
        PyErr_Clear();
        throw etf::DecodeError(p.offset, "map key nested too deeply for this thread's stack");
      } catch (const etf::EncodeError& e) {
        throw etf::DecodeError(p.offset, std::string("map key cannot be an erpy.Key: ") + e.what());
      }
    }
    // Bare keys are unequal to every other key here, and Keys compare exactly: only a key
    // that is the same term as another can fail to go in.
    const Py_ssize_t before = PyDict_GET_SIZE(out.get());
    if (PyDict_SetItem(out.get(), key.get(), p.value.get()) != 0) too_deep_to_compare(p.offset);
    if (PyDict_GET_SIZE(out.get()) == before) {
      throw etf::DecodeError(p.offset, "map key " + short_repr(p.key.get()) + " appears twice");
    }
  }
  equal_.reset();
  return out;
}

PyRef Codec::binary(etf::Bytes b, const DecodeOptions& o) {
  const char* p = reinterpret_cast<const char*>(b.data());
  const auto n = static_cast<Py_ssize_t>(b.size());
  if (o.binary_as_bytes) return PyRef::check(PyBytes_FromStringAndSize(p, n));
  if (all_ascii(b.data(), b.size())) {
    if (b.size() <= kMaxCachedStr) return PyRef::steal(short_str(p, b.size()));
    PyObject* s = PyUnicode_New(n, 127);
    if (!s) throw PythonError();
    std::memcpy(PyUnicode_1BYTE_DATA(s), p, b.size());
    return PyRef::steal(s);
  }
  // Validating first keeps invalid UTF-8 (a common case: raw bytes) from costing a
  // UnicodeDecodeError that would only be thrown away.
  if (!etf::utf8_length(b)) return PyRef::check(PyBytes_FromStringAndSize(p, n));
  return PyRef::check(PyUnicode_DecodeUTF8(p, n, "strict"));
}

PyRef Codec::decode(etf::Bytes input, const DecodeOptions& o) {
  if (input.size() > o.max_size) {
    throw etf::DecodeError(0, "term of " + std::to_string(input.size()) + " bytes, above max_size " +
                                  std::to_string(o.max_size));
  }
  PyBuilder b(*this, o);
  return etf::decode(input, b, core_options(o));
}

PyRef Codec::decode_term(etf::Reader& r, const DecodeOptions& o) {
  PyBuilder b(*this, o);
  return etf::decode_term(r, b, core_options(o));
}

}  // namespace erpy::py
