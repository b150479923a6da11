#include "codec.hpp"

#include <cstring>
#include <new>

#include "etf/error.hpp"
#include "etf/stack.hpp"

namespace erpy::py {

namespace {

PyRef attr(PyObject* module, const char* name) {
  return PyRef::check(PyObject_GetAttrString(module, name));
}

PyRef type_attr(PyObject* module, const char* name) {
  PyRef t = attr(module, name);
  if (!PyType_Check(t.get())) {
    PyErr_Format(PyExc_TypeError, "erpy: %s is not a class", name);
    throw PythonError();
  }
  return t;
}

PyRef intern(const char* s) { return PyRef::check(PyUnicode_InternFromString(s)); }

}  // namespace

Types Types::load(PyObject* types_module, PyObject* errors_module) {
  Types t;
  t.atom = type_attr(types_module, "Atom");
  t.bit_binary = type_attr(types_module, "BitBinary");
  t.improper_list = type_attr(types_module, "ImproperList");
  t.pid = type_attr(types_module, "Pid");
  t.port = type_attr(types_module, "Port");
  t.ref = type_attr(types_module, "Ref");
  t.fun = type_attr(types_module, "Fun");
  t.frozen_list = type_attr(types_module, "FrozenList");
  t.frozen_map = type_attr(types_module, "FrozenMap");
  t.frozen_improper_list = type_attr(types_module, "FrozenImproperList");
  t.key = type_attr(types_module, "Key");
  t.encoders = attr(types_module, "ENCODERS");
  if (!PyDict_CheckExact(t.encoders.get())) {
    PyErr_SetString(PyExc_TypeError, "erpy: ENCODERS is not a dict");
    throw PythonError();
  }
  t.erpy_error = type_attr(errors_module, "ErpyError");
  t.decode_error = type_attr(errors_module, "DecodeError");
  t.encode_error = type_attr(errors_module, "EncodeError");
  return t;
}

Codec::Codec(Types types) : types_(std::move(types)) {
  n_node_ = intern("node");
  n_id_ = intern("id");
  n_serial_ = intern("serial");
  n_creation_ = intern("creation");
  n_ids_ = intern("ids");
  n_data_ = intern("data");
  n_bits_ = intern("bits");
  n_elements_ = intern("elements");
  n_tail_ = intern("tail");
  n_items_ = intern("_items");
  n_map_ = intern("_map");
  n_value_ = intern("value");
  n_made_ = intern("_made");
}

Codec::~Codec() {
  for (PyObject*& s : strs_) Py_CLEAR(s);
}

PyObject* Codec::atom(std::string_view utf8, const DecodeOptions& o) {
  if (utf8 == "true") Py_RETURN_TRUE;
  if (utf8 == "false") Py_RETURN_FALSE;
  if (utf8 == o.none) Py_RETURN_NONE;
  if (auto it = atoms_.find(utf8); it != atoms_.end()) {
    PyObject* a = it->second.get();
    Py_INCREF(a);
    return a;
  }
  PyRef text = PyRef::check(PyUnicode_DecodeUTF8(utf8.data(), static_cast<Py_ssize_t>(utf8.size()), "strict"));
  PyRef a = PyRef::check(PyObject_CallOneArg(types_.atom.get(), text.get()));
  // Creating the Atom ran Python code, which may have used the cache: look again.
  if (atoms_.size() >= kMaxAtoms) atoms_.clear();
  auto [it, inserted] = atoms_.try_emplace(std::string(utf8));
  if (inserted) it->second = PyRef::borrow(a.get());
  return a.release();
}

namespace {

std::uint64_t load64(const char* p) noexcept {
  std::uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}

std::uint32_t load32(const char* p) noexcept {
  std::uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Hash and equality for strings of at most 32 bytes with a few (overlapping) word loads:
// a libc memcmp call costs more than the comparison itself at these sizes.
std::uint64_t small_hash(const char* p, std::size_t n) noexcept {
  std::uint64_t h;
  if (n >= 8) {
    h = load64(p) * 0x9E3779B97F4A7C15ull ^ load64(p + n - 8) * 0xC2B2AE3D27D4EB4Full;
    if (n > 16) h ^= load64(p + 8) * 0x165667B19E3779F9ull;
  } else if (n >= 4) {
    h = (std::uint64_t{load32(p)} << 32 | load32(p + n - 4)) * 0x9E3779B97F4A7C15ull;
  } else {
    h = 0;
    for (std::size_t i = 0; i < n; ++i) h = h << 8 | static_cast<unsigned char>(p[i]);
    h *= 0x9E3779B97F4A7C15ull;
  }
  h ^= n;
  return h ^ (h >> 29);
}

bool small_equal(const char* a, const char* b, std::size_t n) noexcept {
  if (n >= 8) {
    for (std::size_t i = 0; i + 8 < n; i += 8) {
      if (load64(a + i) != load64(b + i)) return false;
    }
    return load64(a + n - 8) == load64(b + n - 8);
  }
  if (n >= 4) return load32(a) == load32(b) && load32(a + n - 4) == load32(b + n - 4);
  for (std::size_t i = 0; i < n; ++i) {
    if (a[i] != b[i]) return false;
  }
  return true;
}

}  // namespace

PyObject* Codec::short_str(const char* p, std::size_t n) {
  static_assert(kMaxCachedStr <= 32);
  PyObject*& slot = strs_[small_hash(p, n) % kStrSlots];
  if (slot && static_cast<std::size_t>(PyUnicode_GET_LENGTH(slot)) == n &&
      small_equal(reinterpret_cast<const char*>(PyUnicode_1BYTE_DATA(slot)), p, n)) {
    Py_INCREF(slot);
    return slot;
  }
  PyObject* s = PyUnicode_New(static_cast<Py_ssize_t>(n), 127);
  if (!s) throw PythonError();
  std::memcpy(PyUnicode_1BYTE_DATA(s), p, n);
  Py_INCREF(s);
  Py_XSETREF(slot, s);
  return s;
}

namespace {

// Builds the frozen form of a value bottom-up; containers that hold nothing to freeze
// stay the same objects.
class Freezer {
 public:
  Freezer(const Types& t, std::size_t max_depth) : t_(t), max_depth_(max_depth) {}

  PyRef run(PyObject* o, std::size_t depth) {
    if (depth > max_depth_ || stack_.reached()) {
      PyErr_SetString(PyExc_RecursionError, "erpy: map key nested too deeply to freeze");
      throw PythonError();
    }
    PyTypeObject* type = Py_TYPE(o);
    if (type == &PyList_Type) {
      PyRef items = PyRef::check(PyList_AsTuple(o));
      return make(t_.frozen_list, items_of(std::move(items), depth).get());
    }
    if (type == &PyTuple_Type) return items_of(PyRef::borrow(o), depth);
    if (type == &PyDict_Type) {
      PyRef d = PyRef::check(PyDict_New());
      Py_ssize_t pos = 0;
      PyObject *k, *v;
      while (PyDict_Next(o, &pos, &k, &v)) {
        PyRef key = PyRef::borrow(k);
        PyRef value = run(v, depth + 1);
        if (PyDict_SetItem(d.get(), key.get(), value.get()) != 0) throw PythonError();
      }
      return make(t_.frozen_map, d.get());
    }
    if (type == reinterpret_cast<PyTypeObject*>(t_.improper_list.get())) {
      PyRef elements = PyRef::check(PyObject_GetAttrString(o, "elements"));
      PyRef tail = PyRef::check(PyObject_GetAttrString(o, "tail"));
      PyRef items = PyRef::check(PySequence_Tuple(elements.get()));
      PyRef frozen = items_of(std::move(items), depth);
      PyRef frozen_tail = run(tail.get(), depth + 1);
      return PyRef::check(PyObject_CallFunctionObjArgs(t_.frozen_improper_list.get(), frozen.get(),
                                                       frozen_tail.get(), nullptr));
    }
    return PyRef::borrow(o);
  }

 private:
  // `t` (a tuple) with each item frozen: `t` itself when none changed.
  PyRef items_of(PyRef t, std::size_t depth) {
    const Py_ssize_t n = PyTuple_GET_SIZE(t.get());
    PyRef out;
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* item = PyTuple_GET_ITEM(t.get(), i);
      PyRef f = run(item, depth + 1);
      if (f.get() == item && !out) continue;
      if (!out) {
        out = PyRef::check(PyTuple_New(n));
        for (Py_ssize_t j = 0; j < i; ++j) {
          PyObject* same = PyTuple_GET_ITEM(t.get(), j);
          Py_INCREF(same);
          PyTuple_SET_ITEM(out.get(), j, same);
        }
      }
      PyTuple_SET_ITEM(out.get(), i, f.release());
    }
    return out ? std::move(out) : std::move(t);
  }

  static PyRef make(const PyRef& cls, PyObject* arg) { return PyRef::check(PyObject_CallOneArg(cls.get(), arg)); }

  const Types& t_;
  std::size_t max_depth_;
  const etf::StackFloor stack_ = etf::StackFloor::current();
};

}  // namespace

PyRef Codec::freeze(PyObject* obj, std::size_t max_depth) { return Freezer(types_, max_depth).run(obj, 0); }

std::pair<PyRef, PyRef> Codec::key_parts(PyObject* obj, std::size_t max_depth) {
  PyRef frozen = freeze(obj, max_depth);
  EncodeOptions o;
  o.exact = true;
  o.max_depth = max_depth;
  PyRef exact = encode(frozen.get(), o);
  return {std::move(frozen), std::move(exact)};
}

PyRef Codec::key(PyObject* obj, std::size_t max_depth) {
  auto [frozen, exact] = key_parts(obj, max_depth);
  return PyRef::check(
      PyObject_CallMethodObjArgs(types_.key.get(), n_made_.get(), frozen.get(), exact.get(), nullptr));
}

namespace {

void raise_decode_error(const Types& t, const etf::DecodeError& e) {
  PyRef exc(PyRef::steal(PyObject_CallFunction(t.decode_error.get(), "sn", e.what(),
                                               static_cast<Py_ssize_t>(e.offset()))));
  if (!exc) return;  // the failed call set its own exception
  PyErr_SetObject(t.decode_error.get(), exc.get());
}

}  // namespace

void set_python_error(const Types& t) noexcept {
  try {
    throw;
  } catch (const PythonError&) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_SystemError, "erpy: error without an exception");
  } catch (const etf::DecodeError& e) {
    raise_decode_error(t, e);
  } catch (const etf::EncodeError& e) {
    PyErr_SetString(t.encode_error.get(), e.what());
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(t.erpy_error.get(), e.what());
  } catch (...) {
    PyErr_SetString(t.erpy_error.get(), "erpy: unknown C++ exception");
  }
}

}  // namespace erpy::py
