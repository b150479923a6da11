// Terms <-> Python objects inside the VM, with no ETF in between for the common types
// (integers, floats, atoms, binaries, lists, tuples, maps). The rare ones (pids, refs,
// ports, funs, bitstrings, improper lists, big integers, non-Latin-1 atoms, custom
// encoders) go through the shared ETF codec, so every mode maps types identically and
// that logic lives in one place (c_src/py).
// Everything here needs the GIL and throws like the codec: etf::DecodeError,
// etf::EncodeError, py::PythonError.
//
// Python -> Erlang is where Python code chooses what the VM gets, so it is bounded:
// - size: the term's ETF size is counted as it is built (see TermInfo), and passing the
//   pool's limit stops the conversion at once (etf::TooLargeError), before the large part
//   is copied;
// - atoms: none is created unless the pool allows it (AtomBudget); an unknown one stops
//   the conversion (UnknownAtomError). Terms that go through ETF are read back with
//   ERL_NIF_BIN2TERM_SAFE, after their atoms were checked the same way;
// - depth: max_depth and the thread's stack (etf/stack.hpp), as in the codec.
#pragma once
#include <erl_nif.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "py/codec.hpp"
#include "py/ref.hpp"

namespace erpy::nif {

// The atoms a pool may still create (pool option new_atoms, capped by the headroom the
// VM's atom table had when the pool started). Shared by the pool's conversions.
class AtomBudget {
 public:
  explicit AtomBudget(std::int64_t n) : left_(n) {}
  // Takes one, if any is left.
  bool take() noexcept {
    std::int64_t n = left_.load(std::memory_order_relaxed);
    while (n > 0) {
      if (left_.compare_exchange_weak(n, n - 1, std::memory_order_relaxed)) return true;
    }
    return false;
  }
  std::int64_t left() const noexcept { return left_.load(std::memory_order_relaxed); }

 private:
  std::atomic<std::int64_t> left_;
};

struct ConvertOptions {
  py::DecodeOptions decode;
  py::EncodeOptions encode;
  // Python -> Erlang: the largest term, as ETF would size it (TermInfo::size).
  std::size_t max_size = SIZE_MAX;
  // Python -> Erlang: new atoms allowed; null: none.
  std::shared_ptr<AtomBudget> new_atoms;
};

// What a conversion to a term found. One TermInfo may serve several conversions whose
// terms go in one message (a callback's module, function and arguments): sizes add up.
struct TermInfo {
  // The size of what was converted so far, as term_to_binary/1 would write it (without
  // the version byte).
  std::size_t size = 0;
  // It holds a pid, a port, a reference or a fun: the receiver checks those.
  bool opaque = false;
};

// An atom that does not exist in the VM, and the pool may not create.
class UnknownAtomError : public std::runtime_error {
 public:
  explicit UnknownAtomError(std::string name)
      : std::runtime_error("unknown atom: " + name), name_(std::move(name)) {}
  const std::string& name() const noexcept { return name_; }

 private:
  std::string name_;
};

class Converter {
 public:
  // `handle_type`: terms of this resource type are Python objects lent to Erlang (handles).
  Converter(py::Codec& codec, ErlNifResourceType* handle_type) : codec_(codec), handle_type_(handle_type) {}

  py::PyRef to_python(ErlNifEnv* env, ERL_NIF_TERM t, const ConvertOptions& o);
  // Throws etf::TooLargeError (sizes are the whole message's, with `info`'s earlier size),
  // UnknownAtomError, and what the codec throws.
  ERL_NIF_TERM to_term(ErlNifEnv* env, PyObject* obj, const ConvertOptions& o, TermInfo& info);

  // The atom `utf8` names, made if the options allow it; else UnknownAtomError.
  ERL_NIF_TERM atom(ErlNifEnv* env, std::string_view utf8, const ConvertOptions& o);

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
  struct ToTerm;
  struct ToPython;
  py::PyRef python(ToPython& w, ERL_NIF_TERM t, std::size_t depth);
  py::PyRef via_etf(ToPython& w, ERL_NIF_TERM t, std::size_t depth);
  ERL_NIF_TERM term(ToTerm& w, PyObject* obj, std::size_t depth);
  ERL_NIF_TERM term_via_etf(ToTerm& w, PyObject* obj, std::size_t depth);
  ERL_NIF_TERM list_term(ToTerm& w, PyObject* obj, std::size_t depth);
  ERL_NIF_TERM lend_bytes(ErlNifEnv* env, PyObject* bytes);
  ERL_NIF_TERM latin1_atom(ErlNifEnv* env, const char* p, std::size_t n, std::string_view utf8,
                           const ConvertOptions& o);

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
