// The atoms the NIF uses, made once when the library loads: enif_make_atom looks the
// name up in the VM's atom table under a lock, which showed in profiles of short calls.
// Atoms are immediate terms, valid in every environment and comparable with ==.
#pragma once
#include <erl_nif.h>

namespace erpy::nif {

struct Atoms {
  ERL_NIF_TERM apply = 0;
  ERL_NIF_TERM binary = 0;
  ERL_NIF_TERM busy = 0;
  ERL_NIF_TERM bytes = 0;
  ERL_NIF_TERM call = 0;
  ERL_NIF_TERM callback = 0;
  ERL_NIF_TERM canceled = 0;
  ERL_NIF_TERM closed = 0;
  ERL_NIF_TERM closing = 0;
  ERL_NIF_TERM replaced = 0;
  ERL_NIF_TERM stuck = 0;
  ERL_NIF_TERM kill_grace_ms = 0;
  ERL_NIF_TERM done = 0;
  ERL_NIF_TERM erpy_log = 0;
  ERL_NIF_TERM error = 0;
  ERL_NIF_TERM eval = 0;
  ERL_NIF_TERM exec = 0;
  ERL_NIF_TERM false_ = 0;
  ERL_NIF_TERM gil = 0;
  ERL_NIF_TERM held = 0;
  ERL_NIF_TERM hold = 0;
  ERL_NIF_TERM initialized = 0;
  ERL_NIF_TERM none = 0;
  ERL_NIF_TERM not_initialized = 0;
  ERL_NIF_TERM ok = 0;
  ERL_NIF_TERM own_gil_subinterpreters = 0;
  ERL_NIF_TERM pending = 0;
  ERL_NIF_TERM pool_closed = 0;
  ERL_NIF_TERM python_already_running = 0;
  ERL_NIF_TERM python_init = 0;
  ERL_NIF_TERM queued = 0;
  ERL_NIF_TERM run = 0;
  ERL_NIF_TERM sent = 0;
  ERL_NIF_TERM size = 0;
  ERL_NIF_TERM spin_us = 0;
  ERL_NIF_TERM stderr = 0;
  ERL_NIF_TERM stdout = 0;
  ERL_NIF_TERM true_ = 0;
  ERL_NIF_TERM undefined = 0;
  ERL_NIF_TERM unencodable_error = 0;
  ERL_NIF_TERM version = 0;
  ERL_NIF_TERM wait = 0;
  ERL_NIF_TERM atom_headroom = 0;
  ERL_NIF_TERM callback_check = 0;
  ERL_NIF_TERM max_message_size = 0;
  ERL_NIF_TERM message_too_large = 0;
  ERL_NIF_TERM new_atoms = 0;
  ERL_NIF_TERM ok_check = 0;
  ERL_NIF_TERM send = 0;
  ERL_NIF_TERM unknown_atom = 0;
  ERL_NIF_TERM erpy_nif = 0;
  ERL_NIF_TERM internal = 0;
  ERL_NIF_TERM out_of_memory = 0;
  ERL_NIF_TERM erpy_reply = 0;  // asynchronous jobs (pool.hpp, AsyncState)
  ERL_NIF_TERM erpy_async = 0;
  ERL_NIF_TERM erpy_embedded = 0;
  ERL_NIF_TERM erpy_async_adopt = 0;
  ERL_NIF_TERM gone = 0;
  ERL_NIF_TERM answered = 0;
  ERL_NIF_TERM not_yours = 0;
  ERL_NIF_TERM infinity = 0;
  ERL_NIF_TERM runner = 0;
  ERL_NIF_TERM timeout = 0;
  // The keys of an error answer (py::Runner::error): made here so that they exist when
  // Python's error maps convert, which makes no atoms.
  ERL_NIF_TERM message = 0;
  ERL_NIF_TERM traceback = 0;
  ERL_NIF_TERM type = 0;
  void init(ErlNifEnv* env) {
    apply = enif_make_atom(env, "apply");
    binary = enif_make_atom(env, "binary");
    busy = enif_make_atom(env, "busy");
    bytes = enif_make_atom(env, "bytes");
    call = enif_make_atom(env, "call");
    callback = enif_make_atom(env, "callback");
    canceled = enif_make_atom(env, "canceled");
    closed = enif_make_atom(env, "closed");
    closing = enif_make_atom(env, "closing");
    replaced = enif_make_atom(env, "replaced");
    stuck = enif_make_atom(env, "stuck");
    kill_grace_ms = enif_make_atom(env, "kill_grace_ms");
    done = enif_make_atom(env, "done");
    erpy_log = enif_make_atom(env, "erpy_log");
    error = enif_make_atom(env, "error");
    eval = enif_make_atom(env, "eval");
    exec = enif_make_atom(env, "exec");
    false_ = enif_make_atom(env, "false");
    gil = enif_make_atom(env, "gil");
    held = enif_make_atom(env, "held");
    hold = enif_make_atom(env, "hold");
    initialized = enif_make_atom(env, "initialized");
    none = enif_make_atom(env, "none");
    not_initialized = enif_make_atom(env, "not_initialized");
    ok = enif_make_atom(env, "ok");
    own_gil_subinterpreters = enif_make_atom(env, "own_gil_subinterpreters");
    pending = enif_make_atom(env, "pending");
    pool_closed = enif_make_atom(env, "pool_closed");
    python_already_running = enif_make_atom(env, "python_already_running");
    python_init = enif_make_atom(env, "python_init");
    queued = enif_make_atom(env, "queued");
    run = enif_make_atom(env, "run");
    sent = enif_make_atom(env, "sent");
    size = enif_make_atom(env, "size");
    spin_us = enif_make_atom(env, "spin_us");
    stderr = enif_make_atom(env, "stderr");
    stdout = enif_make_atom(env, "stdout");
    true_ = enif_make_atom(env, "true");
    undefined = enif_make_atom(env, "undefined");
    unencodable_error = enif_make_atom(env, "unencodable_error");
    version = enif_make_atom(env, "version");
    wait = enif_make_atom(env, "wait");
    message = enif_make_atom(env, "message");
    traceback = enif_make_atom(env, "traceback");
    type = enif_make_atom(env, "type");
    atom_headroom = enif_make_atom(env, "atom_headroom");
    callback_check = enif_make_atom(env, "callback_check");
    max_message_size = enif_make_atom(env, "max_message_size");
    message_too_large = enif_make_atom(env, "message_too_large");
    new_atoms = enif_make_atom(env, "new_atoms");
    ok_check = enif_make_atom(env, "ok_check");
    send = enif_make_atom(env, "send");
    unknown_atom = enif_make_atom(env, "unknown_atom");
    erpy_nif = enif_make_atom(env, "erpy_nif");
    internal = enif_make_atom(env, "internal");
    out_of_memory = enif_make_atom(env, "out_of_memory");
    erpy_reply = enif_make_atom(env, "erpy_reply");
    erpy_async = enif_make_atom(env, "erpy_async");
    erpy_embedded = enif_make_atom(env, "erpy_embedded");
    erpy_async_adopt = enif_make_atom(env, "erpy_async_adopt");
    gone = enif_make_atom(env, "gone");
    answered = enif_make_atom(env, "answered");
    not_yours = enif_make_atom(env, "not_yours");
    infinity = enif_make_atom(env, "infinity");
    runner = enif_make_atom(env, "runner");
    timeout = enif_make_atom(env, "timeout");
  }
};

inline Atoms atoms;

}  // namespace erpy::nif
