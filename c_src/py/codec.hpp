// Conversion between ETF and Python objects, following the type mapping in README.md.
//
// The Python types (erpy.Atom, erpy.Pid, ..., erpy.DecodeError) are plain Python classes
// handed in through `Types`, so the extension module, the port worker and the embedded
// tests all use the same classes without depending on one another.
//
// Everything here throws C++ exceptions: etf::DecodeError, etf::EncodeError, or
// PythonError when a Python call left an exception set. Callers turn them into a Python
// exception once, at their boundary, with set_python_error() (or into a term).
// All functions need the GIL.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "buffer.hpp"
#include "etf/reader.hpp"
#include "ref.hpp"

namespace erpy::py {

struct Types {
  PyRef atom, bit_binary, improper_list, pid, port, ref, fun;
  // The hashable forms of lists, maps and improper lists, for map keys.
  PyRef frozen_list, frozen_map, frozen_improper_list;
  // erpy.Key: a map key compared as an Erlang term (keys equal in Python, 1 and 1.0).
  PyRef key;
  PyRef erpy_error, decode_error, encode_error;
  // dict: class -> callable(obj) returning something encodable; shared with
  // erpy.register_encoder, so registrations made later are seen.
  PyRef encoders;

  // Takes the classes from the modules erpy._types and erpy._errors (or any objects with
  // those attributes).
  static Types load(PyObject* types_module, PyObject* errors_module);
};

struct DecodeOptions {
  bool binary_as_bytes = false;  // every binary becomes bytes, UTF-8 or not
  std::string none = "undefined";  // the atom that decodes to None
  std::size_t max_depth = 2000;  // the thread's stack may allow less (etf/stack.hpp)
  // The largest external term accepted, in bytes, a compressed one once inflated (a
  // compressed term never inflates past it). No limit: the input as it is, and at most
  // 1 GiB inflated.
  std::size_t max_size = SIZE_MAX;
};

struct EncodeOptions {
  std::string none = "undefined";  // the atom None encodes to
  PyObject* fallback = nullptr;    // borrowed: json-style `default` callable, or null
  std::size_t max_depth = 2000;  // the thread's stack may allow less (etf/stack.hpp)
  // Encoding stops with etf::TooLargeError once the term (without version byte) would
  // pass this many bytes.
  std::size_t max_size = SIZE_MAX;
  // Not ETF but the identity of erpy.Key: bytes that are equal exactly when the values are
  // the same Erlang term. Map entries are sorted (equal maps may iterate differently) and
  // None is a byte no atom starts with (it is whichever atom `none` names).
  bool exact = false;
};

class Codec {
 public:
  explicit Codec(Types types);
  ~Codec();
  Codec(const Codec&) = delete;
  Codec& operator=(const Codec&) = delete;

  const Types& types() const noexcept { return types_; }

  // A whole external term: version byte, then a term or a compressed term.
  PyRef decode(etf::Bytes input, const DecodeOptions& o);
  // One term at the reader's position, no version byte (inside protocol frames).
  PyRef decode_term(etf::Reader& r, const DecodeOptions& o);

  // The canonical external term (with version byte) as a bytes object.
  PyRef encode(PyObject* obj, const EncodeOptions& o);
  // Appends the term, without version byte, to `out` (for frames built by the caller).
  // On error `out` keeps what it held before.
  void encode_append(ByteBuffer& out, PyObject* obj, const EncodeOptions& o);
  // The same as encode(), by measuring first and writing into a bytes object of exact size
  // (calls custom encoders twice). Kept for comparison: see bench_codec.py.
  PyRef encode_two_pass(PyObject* obj, const EncodeOptions& o);

  // The hashable form of `obj` (a decoded map key that Python cannot hash): lists become
  // erpy.FrozenList, dicts erpy.FrozenMap, improper lists erpy.FrozenImproperList, at every
  // level, tuples included; everything else stays as it is. They encode as the originals.
  PyRef freeze(PyObject* obj, std::size_t max_depth = 2000);

  // erpy.Key(obj): its frozen value and the bytes it is compared by (EncodeOptions::exact).
  // Throws etf::EncodeError for what cannot be encoded, PythonError (RecursionError) for
  // what is nested too deeply.
  std::pair<PyRef, PyRef> key_parts(PyObject* obj, std::size_t max_depth = 2000);
  PyRef key(PyObject* obj, std::size_t max_depth = 2000);

  // Binaries up to this many ASCII bytes go through the str cache.
  static constexpr std::size_t kMaxCachedStr = 32;

  // Caches used by the decoder; public for the decoder's builder only.
  PyObject* atom(std::string_view utf8, const DecodeOptions& o);  // new reference
  PyObject* short_str(const char* p, std::size_t n);               // new reference, ASCII only
  // A binary's Python value: str when UTF-8 (cached when short), else bytes.
  PyRef binary(etf::Bytes b, const DecodeOptions& o);

 private:
  template <class S> friend class Encoder;
  Types types_;
  // Python object attribute names used on encode, made once.
  PyRef n_node_, n_id_, n_serial_, n_creation_, n_ids_, n_data_, n_bits_, n_elements_, n_tail_, n_items_, n_map_, n_value_, n_made_;

  // Atom objects by text, so a repeated atom is one object. Bounded: cleared when full.
  struct StringHash {
    using is_transparent = void;
    std::size_t operator()(std::string_view s) const noexcept { return std::hash<std::string_view>{}(s); }
  };
  std::unordered_map<std::string, PyRef, StringHash, std::equal_to<>> atoms_;
  static constexpr std::size_t kMaxAtoms = 4096;

  // Short ASCII binaries -> str, direct-mapped. Map keys and small values repeat, and a
  // reused str also keeps its cached hash, which makes the dict insert cheaper.
  static constexpr std::size_t kStrSlots = 1024;
  std::array<PyObject*, kStrSlots> strs_{};

  // Reused by encode() so a steady stream of terms does not allocate; `busy` because a
  // custom encoder may call erpy.encode again.
  ByteBuffer scratch_;
  bool scratch_busy_ = false;
};

// Fills a dict with the pairs of one decoded map, in the map's order. Every mode builds
// its dicts with it, so they all hold the same keys:
// - a key Python cannot hash (a list, a map, an improper list, a tuple holding one) takes
//   its frozen form (Codec::freeze);
// - keys that are different terms but equal in Python (1 and 1.0, true and 1, ok and
//   <<"ok">>, [1] and [1.0]) are each wrapped in erpy.Key, every key of such a group, so
//   which keys are wrapped does not depend on the map's order. The others stay bare.
// Two keys that are the same term are an etf::DecodeError, as Erlang refuses such a map.
// Maps without such keys cost one dict insert a pair, as before.
class DictBuilder {
 public:
  // `max_depth`: what is left of the decoder's limit, for freezing a key.
  DictBuilder(Codec& c, std::size_t size_hint, std::size_t max_depth) : c_(c), max_depth_(max_depth) {
#if PY_VERSION_HEX < 0x030D0000
    dict_ = PyRef::check(_PyDict_NewPresized(static_cast<Py_ssize_t>(size_hint)));
#else
    (void)size_hint;
    dict_ = PyRef::check(PyDict_New());
#endif
  }

  // `key_offset` locates errors (the key's offset in the input, 0 when there is none).
  void add(PyRef&& key, PyRef&& value, std::size_t key_offset) {
    const Py_ssize_t before = PyDict_GET_SIZE(dict_.get());
    // SetDefault, not SetItem: an equal key keeps its value, for the pairs kept then.
    if (!equal_ && PyDict_SetDefault(dict_.get(), key.get(), value.get()) &&
        PyDict_GET_SIZE(dict_.get()) != before) [[likely]] {
      return;
    }
    add_rare(std::move(key), std::move(value), key_offset, before);
  }

  PyRef finish() {
    if (!equal_) [[likely]] return std::move(dict_);
    return finish_rare();
  }

 private:
  struct Pair {
    PyRef key, value;
    std::size_t offset;
  };
  // An unhashable key (the exception set), a key equal to an earlier one, or any key once
  // there was one: out of line.
  void add_rare(PyRef&& key, PyRef&& value, std::size_t key_offset, Py_ssize_t before);
  // Inserts `key` in its frozen form, after Python found it unhashable.
  void insert_frozen(PyRef& key, PyObject* value, std::size_t key_offset);
  PyRef finish_rare();

  Codec& c_;
  std::size_t max_depth_;
  PyRef dict_;
  // From the first key equal to an earlier one on: the keys to wrap (a set, Python's
  // equality), and every pair in order (the dict keeps only the first of equal keys).
  struct Equal {
    PyRef keys;
    std::vector<Pair> pairs;
  };
  std::unique_ptr<Equal> equal_;
};

// Sets the Python exception for the C++ exception being handled (call it inside a catch
// block): etf::DecodeError -> erpy.DecodeError with .offset, etf::EncodeError ->
// erpy.EncodeError, PythonError -> the exception already set, anything else -> an
// erpy.ErpyError (or MemoryError) with its message.
void set_python_error(const Types& t) noexcept;

// The exception boundary of a C function that Python calls: any C++ exception becomes the
// Python exception set_python_error makes of it (t null: before the codec exists), and
// the function returns nullptr.
template <class F>
PyObject* guarded(const Types* t, F&& f) noexcept {
  try {
    return f();
  } catch (...) {
    if (t) {
      set_python_error(*t);
    } else if (!PyErr_Occurred()) {
      PyErr_SetString(PyExc_SystemError, "erpy: the codec is not initialized");
    }
    return nullptr;
  }
}

}  // namespace erpy::py
