// The fd side of erpy's reactor (erpy_reactor.erl, doc/reactor.md): a resource that owns
// one file descriptor handed over by Erlang and waits for it with enif_select, and the
// SCM_RIGHTS send that carries an fd to a port worker, and the light batch job that runs
// the embedded fds' events. These NIFs run on normal schedulers (send_fd on a dirty I/O one) and never
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

// bind(Res, Hub, Ref, Timeout) -> ok | {error, bound}: before the first select, by the
//   owner: readiness goes to Hub (the pool's hub process) from now on; what the hub's
//   batches have to tell the owner comes as {Ref, Answer}; Timeout (ms | infinity)
//   bounds each protocol callback (expire/2).
ERL_NIF_TERM nif_bind(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]);
// batch(Pool, Ref, [SelectMsg]) -> {ok, Job, Batch} | empty | {error, pool_closed}: one job
//   that runs erpy.reactor._ready(Fd, Event) for every {select, Res, undefined,
//   ready_input | ready_output} given (closed ones skipped), under one GIL hold. A
//   connection that waits again is re-armed for the hub; else its owner gets {ConnRef,
//   {ok, close} | {error, Why}}, or {ConnRef, {ok, read | write}} once watch/1 said
//   busy (the owner re-arms). The caller (the hub) gets {Ref, {ok, done}} at the end,
//   and the batch's callbacks as {Ref, {callback | callback_check, ...}} (running/1 says
//   whose; callback_reply/2 answers).
ERL_NIF_TERM nif_batch(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]);
// append(Batch, [SelectMsg]) -> ok | started: more ready connections for a batch still
//   open (queued, or running and not at its end; started: submit another).
ERL_NIF_TERM nif_append(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]);
// running(Batch) -> {OwnerPid, ConnRef} (the connection whose callback runs) | none.
ERL_NIF_TERM nif_running(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]);
// expire(Job, Batch) -> {wait, Ms} | done | {timeout, OwnerPid, ConnRef}: the running
//   callback is past its connection's timeout: the batch's connections not yet run go
//   back to the poller and the job is cancelled (Python interrupted); the owner is to
//   close that connection. {wait, Ms}: look again in Ms.
ERL_NIF_TERM nif_expire(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]);
// watch(Res) -> idle (no batch holds it) | busy (one does: its end will be answered to
//   the owner as a message, not re-armed).
ERL_NIF_TERM nif_watch(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]);

}  // namespace erpy::nif::reactor
