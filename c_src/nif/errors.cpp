#include "errors.hpp"

#include <cstring>
#include <new>
#include <string_view>

#include "atoms.hpp"
#include "etf/error.hpp"
#include "runtime.hpp"

namespace erpy::nif {

namespace {

ERL_NIF_TERM binary_term(ErlNifEnv* env, std::string_view s) {
  ERL_NIF_TERM t;
  unsigned char* p = enif_make_new_binary(env, s.size(), &t);
  if (!s.empty()) std::memcpy(p, s.data(), s.size());
  return t;
}

}  // namespace

ERL_NIF_TERM too_large_reason(ErlNifEnv* env, const etf::TooLargeError& e) {
  return enif_make_tuple3(env, atoms.message_too_large, enif_make_uint64(env, e.size()),
                          enif_make_uint64(env, e.max()));
}

ERL_NIF_TERM unknown_atom_reason(ErlNifEnv* env, const UnknownAtomError& e) {
  return enif_make_tuple2(env, atoms.unknown_atom, binary_term(env, e.name()));
}

ERL_NIF_TERM exception_reason(ErlNifEnv* env) noexcept {
  try {
    throw;
  } catch (const etf::TooLargeError& e) {
    return too_large_reason(env, e);
  } catch (const UnknownAtomError& e) {
    return unknown_atom_reason(env, e);
  } catch (const std::bad_alloc&) {
    return atoms.out_of_memory;
  } catch (const std::exception& e) {
    return enif_make_tuple2(env, atoms.internal, binary_term(env, e.what()));
  } catch (...) {
    return enif_make_tuple2(env, atoms.internal, binary_term(env, "unknown C++ exception"));
  }
}

ERL_NIF_TERM exception_answer(ErlNifEnv* env, const ConvertOptions& co) noexcept {
  Runtime& rt = Runtime::get();
  try {
    throw;
  } catch (const etf::TooLargeError& e) {
    PyErr_Clear();
    return enif_make_tuple2(env, atoms.error, too_large_reason(env, e));
  } catch (const UnknownAtomError& e) {
    PyErr_Clear();
    return enif_make_tuple2(env, atoms.error, unknown_atom_reason(env, e));
  } catch (...) {
    py::set_python_error(rt.codec().types());
  }
  try {
    py::PyRef err = rt.runner().error_from_exception();
    TermInfo info;
    return enif_make_tuple2(env, atoms.error, rt.converter().to_term(env, err.get(), co, info));
  } catch (const etf::TooLargeError& e) {
    // As port and node mode answer an error map over the pool's limit.
    PyErr_Clear();
    return enif_make_tuple2(env, atoms.error, too_large_reason(env, e));
  } catch (...) {
    PyErr_Clear();
    return enif_make_tuple2(env, atoms.error, atoms.unencodable_error);
  }
}

}  // namespace erpy::nif
