// The fd side of erpy's reactor (erpy_reactor.erl, doc/reactor.md): a resource that owns
// one file descriptor handed over by Erlang and waits for it with enif_select, and the
// SCM_RIGHTS send that carries an fd to a port worker, and the light job of an embedded
// fd event. These NIFs run on normal schedulers (send_fd on a dirty I/O one) and never
// take the GIL; the event job's hook runs on a context thread, with it.
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
//   Fd = socketpair: a new Unix socket pair, one end sent, {ok, OtherEnd} answered (the
//   caller owns that fd).
ERL_NIF_TERM nif_send_fd(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]);

// event(Pool, Res, Ref, read | write) -> {ok, Job} | {error, closed | pool_closed}: runs
//   erpy.reactor._ready(Fd, Event) on a context of Pool for the caller (Res's owner).
//   If it says read or write, the select is re-armed for the caller and the job ends
//   with no answer (the next message is {select, Res, undefined, _}); else {Ref,
//   {ok, close} | {error, Why}} comes, or {Ref, {ok, read | write}} once watch/1 said
//   busy (the caller re-arms). Callbacks come as {Ref, {callback | callback_check, ...}}
//   for the caller to answer with callback_reply/2, as for submit/3.
ERL_NIF_TERM nif_event(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]);
// watch(Res) -> idle (no event job is in flight) | busy (one is: its end will be
//   answered as a message, not re-armed).
ERL_NIF_TERM nif_watch(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]);

}  // namespace erpy::nif::reactor
