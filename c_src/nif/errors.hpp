// The one translation of C++ errors into the terms the NIF answers with. Each function
// here is called inside a catch block and describes the exception being handled; none
// of them throws.
//
// Reasons, with or without Python:
//   etf::TooLargeError      {message_too_large, Size, Max}
//   UnknownAtomError        {unknown_atom, <<"name">>}
// Without Python (NIF entry points, the VM's callbacks: no GIL there):
//   std::bad_alloc          out_of_memory
//   any other               {internal, <<"what() of the exception">>}
// With the GIL (a context thread answering a request), every other error becomes the
// Python exception py::set_python_error makes of it (a pending one stays; a DecodeError
// keeps its offset; std::bad_alloc is MemoryError; another std::exception an ErpyError
// with its message), answered as #{type, message, traceback} (py::Runner), or
// unencodable_error when that map has no Erlang form either.
#pragma once
#include <erl_nif.h>

#include "convert.hpp"

namespace erpy::nif {

// The reason of an error that needs no Python.
ERL_NIF_TERM exception_reason(ErlNifEnv* env) noexcept;

// {error, Reason} for a request that failed; with the GIL. Clears Python's error state.
ERL_NIF_TERM exception_answer(ErlNifEnv* env, const ConvertOptions& co) noexcept;

// Single reasons, for the raisers of erlang.ErlangError (pool.cpp).
ERL_NIF_TERM too_large_reason(ErlNifEnv* env, const etf::TooLargeError& e);
ERL_NIF_TERM unknown_atom_reason(ErlNifEnv* env, const UnknownAtomError& e);

}  // namespace erpy::nif
