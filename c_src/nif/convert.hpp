// Terms <-> Python objects inside the VM, with no ETF in between for the common types
// (integers, floats, atoms, binaries, lists, tuples, maps). The rare ones (pids, refs,
// ports, funs, bitstrings, improper lists, big integers, non-Latin-1 atoms, custom
// encoders) go through the shared ETF codec, so every mode maps types identically and
// that logic lives in one place (c_src/py).
// Everything here needs the GIL and throws like the codec: etf::DecodeError,
// etf::EncodeError, py::PythonError.
#pragma once
#include <erl_nif.h>

#include "py/codec.hpp"
#include "py/ref.hpp"

namespace erpy::nif {

struct ConvertOptions {
  py::DecodeOptions decode;
  py::EncodeOptions encode;
};

class Converter {
 public:
  // `handle_type`: terms of this resource type are Python objects lent to Erlang (handles).
  Converter(py::Codec& codec, ErlNifResourceType* handle_type) : codec_(codec), handle_type_(handle_type) {}

  py::PyRef to_python(ErlNifEnv* env, ERL_NIF_TERM t, const ConvertOptions& o, std::size_t depth = 0);
  ERL_NIF_TERM to_term(ErlNifEnv* env, PyObject* obj, const ConvertOptions& o, std::size_t depth = 0);

  // Binaries from Python at least this large are lent to Erlang instead of copied.
  static constexpr Py_ssize_t kLendBytes = 64 * 1024;

  py::Codec& codec() noexcept { return codec_; }

 private:
  // Short str objects already made into binaries during one to_term call: map keys and
  // repeated values are usually the same objects (the decoder's str cache), and a term
  // may appear many times in one environment.
  struct StrTerms {
    static constexpr std::size_t kSlots = 256;
    PyObject* obj[kSlots] = {};  // strong references: an address cannot be reused meanwhile
    ERL_NIF_TERM term[kSlots] = {};
    StrTerms() = default;
    StrTerms(const StrTerms&) = delete;
    StrTerms& operator=(const StrTerms&) = delete;
    ~StrTerms() {
      for (PyObject* o : obj) Py_XDECREF(o);
    }
  };
  ERL_NIF_TERM term(ErlNifEnv* env, PyObject* obj, const ConvertOptions& o, std::size_t depth, StrTerms& strs);
  py::PyRef via_etf(ErlNifEnv* env, ERL_NIF_TERM t, const ConvertOptions& o);
  ERL_NIF_TERM term_via_etf(ErlNifEnv* env, PyObject* obj, const ConvertOptions& o);
  ERL_NIF_TERM lend_bytes(ErlNifEnv* env, PyObject* bytes);

  py::Codec& codec_;
  ErlNifResourceType* handle_type_;
};

// A Python object lent to Erlang: a bytes object whose buffer backs an Erlang binary, or
// a handle. Its destructor runs on a scheduler, where Python may not run: it hands the
// object to the runtime's janitor thread, which drops the reference under the GIL.
struct LentObject {
  PyObject* obj;
};

}  // namespace erpy::nif
