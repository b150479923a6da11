// The fd side of erpy's reactor (erpy_reactor.erl, doc/reactor.md): a resource that owns
// one file descriptor handed over by Erlang and waits for it with enif_select, and the
// SCM_RIGHTS send that carries an fd to a port worker. No Python here: these NIFs run on
// normal schedulers (send_fd on a dirty I/O one) and never take the GIL.
#pragma once
#include <erl_nif.h>

namespace erpy::nif::reactor {

// Opens the resource type (with the library's load/upgrade flags); false on failure.
bool open_types(ErlNifEnv* env, ErlNifResourceFlags flags);

// adopt(Fd) -> {ok, Res} | {error, Why}: Res owns Fd (non-blocking from now on) and
//   closes it when closed, or when the calling process (its owner) dies.
ERL_NIF_TERM nif_adopt(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]);
// dup(Fd) -> {ok, NewFd} | {error, Why}: a close-on-exec duplicate.
ERL_NIF_TERM nif_dup(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]);
// select(Res, read | write) -> ok | {error, closed | Why}: one {select, Res, undefined,
//   ready_input | ready_output} message to the caller when the fd is ready.
ERL_NIF_TERM nif_select(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]);
// close(Res) -> ok: stops selecting and closes the fd (once it is safe to).
ERL_NIF_TERM nif_close(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]);
// fd(Res) -> integer() | closed
ERL_NIF_TERM nif_fd(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]);
// send_fd(Channel, OsPid, Fd, Payload) -> ok | {error, Why} (dirty I/O): Fd (a copy of it)
//   to the port worker listening on the abstract Unix socket Channel, which must be
//   process OsPid; Payload goes with it; the worker's one-byte answer is awaited.
ERL_NIF_TERM nif_send_fd(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]);

}  // namespace erpy::nif::reactor
