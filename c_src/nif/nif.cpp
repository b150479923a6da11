// erpy_nif: the NIF library of embedded mode. Registration, resource types and the
// argument checking of each NIF; the work is in pool.cpp and runtime.cpp.
//
// Every NIF here is short and runs on a normal scheduler, except init/2, which waits for
// Python to start and runs on a dirty I/O scheduler. None of them takes the GIL.
//
// The boundary: every NIF and every callback the VM makes into this library (resource
// destructors, monitors) runs inside one try/catch (`entry`, `callback`), so no C++
// exception ever unwinds into the VM, where it would end in std::terminate. A NIF whose
// C++ fails raises error:{erpy_nif, Reason} in the calling process (errors.hpp).
#include <erl_nif.h>

#include <algorithm>
#include <cstdio>
#include <string>

#include "pool.hpp"
#include "reactor.hpp"
#include "atoms.hpp"
#include "errors.hpp"
#include "resource.hpp"
#include "runtime.hpp"

namespace erpy::nif {

namespace {

using py::PyRef;
using py::PythonError;

ERL_NIF_TERM atom(ErlNifEnv* env, const char* name) { return enif_make_atom(env, name); }

ERL_NIF_TERM error(ErlNifEnv* env, ERL_NIF_TERM why) { return enif_make_tuple2(env, atoms.error, why); }

bool get_string(ErlNifEnv* env, ERL_NIF_TERM t, std::string& out) {
  ErlNifBinary b;
  if (!enif_inspect_iolist_as_binary(env, t, &b)) return false;
  out.assign(reinterpret_cast<const char*>(b.data), b.size);
  return true;
}

// ---- the boundary --------------------------------------------------------------------------

using NifFn = ERL_NIF_TERM (*)(ErlNifEnv*, int, const ERL_NIF_TERM[]);

// A NIF as the VM calls it: F's C++ exceptions become error:{erpy_nif, Reason}.
template <NifFn F>
ERL_NIF_TERM entry(ErlNifEnv* env, int argc, const ERL_NIF_TERM argv[]) noexcept {
  try {
    return F(env, argc, argv);
  } catch (...) {
    return enif_raise_exception(env, enif_make_tuple2(env, atoms.erpy_nif, exception_reason(env)));
  }
}

// A callback the VM makes (no caller to tell): a failure is written to stderr and the
// callback ends, which leaves at most a job or a context that the pool's close still ends.
template <class F>
void callback(const char* what, F&& f) noexcept {
  try {
    f();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "erpy_nif: %s: %s\n", what, e.what());
  } catch (...) {
    std::fprintf(stderr, "erpy_nif: %s: unknown C++ exception\n", what);
  }
}

// ---- resource types ----------------------------------------------------------------------

void job_down(ErlNifEnv*, void* obj, ErlNifPid*, ErlNifMonitor*) {
  callback("job monitor", [&] {
    auto* job = static_cast<Job*>(obj);
    if (job->pool) job->pool->caller_down(job);
  });
}

void pool_dtor(ErlNifEnv* env, void* obj) {
  callback("pool destructor", [&] {
    auto* h = static_cast<PoolHandle*>(obj);
    if (h->pool) h->pool->close(env);
  });
  destroy_resource<PoolHandle>(env, obj);
}

void context_down(ErlNifEnv*, void* obj, ErlNifPid* pid, ErlNifMonitor*) {
  // The holder of a checked-out context died: the context goes back, namespace cleared.
  callback("context monitor", [&] {
    auto* h = static_cast<ContextHandle*>(obj);
    if (h->pool) h->pool->release(h->index, nullptr, pid);
  });
}

void lent_dtor(ErlNifEnv*, void* obj) {
  // A scheduler thread: no Python here. The janitor drops the reference under the GIL.
  tsan_acquire(obj);
  auto* lent = static_cast<LentObject*>(obj);
  if (lent->obj) Runtime::get().drop_later(lent->obj);
  tsan_release(obj);
}

bool open_types(ErlNifEnv* env, ErlNifResourceFlags flags) {
  ResourceTypes& t = Runtime::get().types;
  ErlNifResourceTypeInit job_init{destroy_resource<Job>, nullptr, job_down, 0, nullptr};
  ErlNifResourceTypeInit ctx_init{destroy_resource<ContextHandle>, nullptr, context_down, 0, nullptr};
  ErlNifResourceFlags tried;
  t.job = enif_open_resource_type_x(env, "erpy_job", &job_init, flags, &tried);
  t.context = enif_open_resource_type_x(env, "erpy_context", &ctx_init, flags, &tried);
  t.pool = enif_open_resource_type(env, nullptr, "erpy_pool", pool_dtor, flags, &tried);
  t.lent = enif_open_resource_type(env, nullptr, "erpy_python_object", lent_dtor, flags, &tried);
  return t.job && t.context && t.pool && t.lent && reactor::open_types(env, flags);
}

// ---- NIFs ----------------------------------------------------------------------------------

// init(PythonExecutable, PythonDir) -> ok | {error, Why}
ERL_NIF_TERM nif_init(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  std::string exe, dir;
  if (!get_string(env, argv[0], exe) || !get_string(env, argv[1], dir)) return enif_make_badarg(env);
  Runtime& rt = Runtime::get();
  const std::string err = rt.init(exe, dir);
  if (!err.empty()) {
    ERL_NIF_TERM msg;
    unsigned char* p = enif_make_new_binary(env, err.size(), &msg);
    std::copy(err.begin(), err.end(), p);
    return error(env, enif_make_tuple2(env, atoms.python_init, msg));
  }
  if (!exe.empty() && exe != rt.executable()) {
    // One interpreter per VM: a second, different one cannot be started.
    ERL_NIF_TERM running;
    const std::string cur = rt.executable();
    unsigned char* p = enif_make_new_binary(env, cur.size(), &running);
    std::copy(cur.begin(), cur.end(), p);
    return error(env, enif_make_tuple2(env, atoms.python_already_running, running));
  }
  return atoms.ok;
}

// pool_new(Size, Owner, #{none := atom(), binary := str | bytes, spin_us := int,
//                         kill_grace_ms := int, max_message_size := int,
//                         new_atoms := int >= 0, atom_headroom := int}) -> Pool
ERL_NIF_TERM nif_pool_new(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  Runtime& rt = Runtime::get();
  if (!rt.ready()) return error(env, atoms.not_initialized);
  PoolOptions o;
  if (!enif_get_int(env, argv[0], &o.size) || o.size < 1 || o.size > 1024) return enif_make_badarg(env);
  if (!enif_get_local_pid(env, argv[1], &o.owner)) return enif_make_badarg(env);
  ERL_NIF_TERM v;
  char buf[256];
  if (enif_get_map_value(env, argv[2], atoms.none, &v)) {
    if (enif_get_atom(env, v, buf, sizeof buf, ERL_NIF_LATIN1) <= 0) return enif_make_badarg(env);
    o.convert.decode.none = buf;
    o.convert.encode.none = buf;
  }
  if (enif_get_map_value(env, argv[2], atoms.binary, &v)) {
    o.convert.decode.binary_as_bytes = enif_is_identical(v, atoms.bytes);
  }
  if (enif_get_map_value(env, argv[2], atoms.spin_us, &v) && !enif_get_int(env, v, &o.spin_us)) {
    return enif_make_badarg(env);
  }
  if (enif_get_map_value(env, argv[2], atoms.kill_grace_ms, &v) && !enif_get_int(env, v, &o.kill_grace_ms)) {
    return enif_make_badarg(env);
  }
  // Results and callback requests from Python: their size as ETF, checked as they convert.
  if (enif_get_map_value(env, argv[2], atoms.max_message_size, &v)) {
    ErlNifUInt64 max;
    if (!enif_get_uint64(env, v, &max)) return enif_make_badarg(env);
    o.convert.max_size = static_cast<std::size_t>(max);
  }
  // New atoms Python may make over the pool's life: at most new_atoms, and never more
  // than the atom table had room for (below 95% of its limit) when the pool started.
  ErlNifSInt64 new_atoms = 0, headroom = INT64_MAX;
  if (enif_get_map_value(env, argv[2], atoms.new_atoms, &v) && (!enif_get_int64(env, v, &new_atoms) || new_atoms < 0)) {
    return enif_make_badarg(env);
  }
  if (enif_get_map_value(env, argv[2], atoms.atom_headroom, &v) && !enif_get_int64(env, v, &headroom)) {
    return enif_make_badarg(env);
  }
  o.convert.new_atoms = std::make_shared<AtomBudget>(std::max<ErlNifSInt64>(0, std::min(new_atoms, headroom)));
  auto pool = std::make_shared<Pool>(std::move(o));
  // Threads the system refuses make start() throw, once it has stopped those it started.
  pool->start();
  rt.add_pool(pool);
  return make_resource<PoolHandle>(rt.types.pool, PoolHandle{std::move(pool)}).term(env);
}

ERL_NIF_TERM nif_pool_close(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  auto* h = get_resource<PoolHandle>(env, argv[0], Runtime::get().types.pool);
  if (!h) return enif_make_badarg(env);
  h->pool->close(env);
  return atoms.ok;
}

ERL_NIF_TERM nif_pool_info(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  auto* h = get_resource<PoolHandle>(env, argv[0], Runtime::get().types.pool);
  if (!h) return enif_make_badarg(env);
  return h->pool->info(env);
}

// submit(PoolOrContext, Ref, Request) -> {ok, Job} | {error, closed}. Request: the request
// map (read on the context thread, py/request.hpp) or `hold` (a checkout).
// A pool, or one context of it (held, or waiting for a callback): false if neither.
bool get_target(ErlNifEnv* env, ERL_NIF_TERM t, std::shared_ptr<Pool>& pool, int& context) {
  Runtime& rt = Runtime::get();
  if (auto* ph = get_resource<PoolHandle>(env, t, rt.types.pool)) {
    pool = ph->pool;
    context = -1;
  } else if (auto* ch = get_resource<ContextHandle>(env, t, rt.types.context)) {
    pool = ch->pool;
    context = ch->index;
  } else {
    return false;
  }
  return true;
}

ERL_NIF_TERM nif_submit(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  Runtime& rt = Runtime::get();
  std::shared_ptr<Pool> pool;
  int context = -1;
  if (!get_target(env, argv[0], pool, context)) return enif_make_badarg(env);
  if (!enif_is_map(env, argv[2]) && argv[2] != atoms.hold) return enif_make_badarg(env);
  ResourcePtr<Job> job = make_resource<Job>(rt.types.job);
  job->env = OwnedEnv::alloc();
  job->ref = enif_make_copy(job->env.get(), argv[1]);
  job->req = enif_make_copy(job->env.get(), argv[2]);
  job->pool = pool;
  enif_self(env, &job->caller);
  ERL_NIF_TERM t = job.term(env);
  if (!pool->submit(job, context)) return error(env, atoms.closed);
  return enif_make_tuple2(env, atoms.ok, t);
}

Job* get_job(ErlNifEnv* env, ERL_NIF_TERM t) { return get_resource<Job>(env, t, Runtime::get().types.job); }

// async_submit(PoolOrContext, Ref, Request, TimeoutMs | infinity, Closed, Extra)
//   -> {ok, Job} | {error, closed}
// An asynchronous request (pool.hpp, AsyncState): its answer comes to the caller as
// {erpy_reply, {erpy_async, Ref, Job}, Answer}, or {error, timeout} once TimeoutMs has
// passed; Closed is the answer when the pool closes first. Extra is for the runner that
// adopts the job if it needs Erlang (async_adopt/1).
ERL_NIF_TERM nif_async_submit(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  Runtime& rt = Runtime::get();
  std::shared_ptr<Pool> pool;
  int context = -1;
  if (!get_target(env, argv[0], pool, context) || !enif_is_map(env, argv[2])) return enif_make_badarg(env);
  std::int64_t deadline = 0;
  if (argv[3] != atoms.infinity) {
    ErlNifSInt64 ms;
    if (!enif_get_int64(env, argv[3], &ms) || ms < 0 || ms > std::int64_t{1} << 40) return enif_make_badarg(env);
    deadline = std::max<std::int64_t>(1, mono_ns() + ms * 1000000);
  }
  ResourcePtr<Job> job = make_resource<Job>(rt.types.job);
  job->env = OwnedEnv::alloc();
  job->ref = enif_make_copy(job->env.get(), argv[1]);
  job->req = enif_make_copy(job->env.get(), argv[2]);
  job->closed = enif_make_copy(job->env.get(), argv[4]);
  job->extra = enif_make_copy(job->env.get(), argv[5]);
  job->async = true;
  job->deadline_at = deadline;
  job->pool = pool;
  enif_self(env, &job->caller);
  ERL_NIF_TERM t = job.term(env);
  if (!pool->submit(job, context)) return error(env, atoms.closed);
  return enif_make_tuple2(env, atoms.ok, t);
}

// Only the process that made an asynchronous request may await or cancel it.
bool is_caller(ErlNifEnv* env, const Job* job) {
  ErlNifPid self;
  return enif_self(env, &self) && enif_compare_pids(&self, &job->caller) == 0;
}

// async_cancel(Job) -> canceled | sent (the reply is in the caller's mailbox, unless taken)
//                    | {runner, Pid} (the runner that took it over may still reply)
//                    | not_yours (another process: nothing done)
ERL_NIF_TERM nif_async_cancel(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  Job* job = get_job(env, argv[0]);
  if (!job || !job->async) return enif_make_badarg(env);
  if (!is_caller(env, job)) return atoms.not_yours;
  ErlNifPid runner;
  switch (job->pool->async_cancel(job, env, &runner)) {
    case Pool::AsyncCancel::Canceled: return atoms.canceled;
    case Pool::AsyncCancel::Sent: return atoms.sent;
    case Pool::AsyncCancel::Runner: return enif_make_tuple2(env, atoms.runner, enif_make_pid(env, &runner));
  }
  return atoms.canceled;
}

// async_poll(Job, Block) -> {done, Answer} | pending | wait | answered | {runner, Pid}
//                          | not_yours
// The caller awaits (see Pool::async_poll); another process gets not_yours.
ERL_NIF_TERM nif_async_poll(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  Job* job = get_job(env, argv[0]);
  if (!job || !job->async) return enif_make_badarg(env);
  if (!is_caller(env, job)) return atoms.not_yours;
  ERL_NIF_TERM out;
  switch (job->pool->async_poll(job, enif_is_identical(argv[1], atoms.true_), env, &out)) {
    case Pool::AsyncPoll::Done: return enif_make_tuple2(env, atoms.done, out);
    case Pool::AsyncPoll::Pending: return atoms.pending;
    case Pool::AsyncPoll::Wait: return atoms.wait;
    case Pool::AsyncPoll::Answered: return atoms.answered;
    case Pool::AsyncPoll::Runner: return enif_make_tuple2(env, atoms.runner, out);
  }
  return atoms.wait;
}

// async_adopt(Job) -> {ok, Ref, Caller, Request, Extra, Left} | gone. The calling process
// (a runner) takes the job over: it polls for it (poll/2) as a synchronous caller would,
// until its deadline, Left ms from now (or infinity).
ERL_NIF_TERM nif_async_adopt(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  Job* job = get_job(env, argv[0]);
  if (!job || !job->async) return enif_make_badarg(env);
  if (!job->pool->adopt(job, env)) return atoms.gone;
  const ERL_NIF_TERM left = job->deadline_at == 0
      ? atoms.infinity
      : enif_make_int64(env, std::max<std::int64_t>(0, (job->deadline_at - mono_ns()) / 1000000));
  ERL_NIF_TERM items[] = {atoms.ok, enif_make_copy(env, job->ref), enif_make_pid(env, &job->caller),
                          enif_make_copy(env, job->req), enif_make_copy(env, job->extra), left};
  return enif_make_tuple_from_array(env, items, 6);
}

// cancel(Job) -> canceled (it will never answer) | sent (its answer is in the mailbox)
//              | {done, Answer}
ERL_NIF_TERM nif_cancel(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  Job* job = get_job(env, argv[0]);
  if (!job) return enif_make_badarg(env);
  ERL_NIF_TERM answer;
  switch (job->pool->cancel(job, env, &answer)) {
    case Pool::Outcome::Canceled: return atoms.canceled;
    case Pool::Outcome::Sent: return atoms.sent;
    case Pool::Outcome::Done: return enif_make_tuple2(env, atoms.done, answer);
  }
  return atoms.sent;
}

// poll(Job, Block) -> {done, Answer} | {callback | callback_check, Ctx, Kind, M, F, Args}
//                   | pending | wait (the answer will come as a message)
ERL_NIF_TERM nif_poll(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  Job* job = get_job(env, argv[0]);
  if (!job) return enif_make_badarg(env);
  ERL_NIF_TERM answer;
  switch (job->pool->poll(job, enif_is_identical(argv[1], atoms.true_), env, &answer)) {
    case Pool::Poll::Done: return enif_make_tuple2(env, atoms.done, answer);
    case Pool::Poll::Pending: return atoms.pending;
    case Pool::Poll::Wait: return atoms.wait;
    case Pool::Poll::Callback: return answer;
  }
  return atoms.wait;
}

// callback_reply(Job, {ok, Value} | {error, Reason}) -> ok
ERL_NIF_TERM nif_callback_reply(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  Job* job = get_job(env, argv[0]);
  if (!job) return enif_make_badarg(env);
  job->pool->callback_reply(job, env, argv[1]);
  return atoms.ok;
}

// checkin(Context) -> ok
ERL_NIF_TERM nif_checkin(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  auto* ch = get_resource<ContextHandle>(env, argv[0], Runtime::get().types.context);
  if (!ch) return enif_make_badarg(env);
  ch->pool->release(ch->index, env, nullptr);
  return atoms.ok;
}

// python_info() -> #{version, gil, subinterpreters}: what this build of Python offers.
ERL_NIF_TERM nif_python_info(ErlNifEnv* env, int, const ERL_NIF_TERM[]) {
  const char* version = Py_GetVersion();  // safe before and after initialization
  std::string v(version);
  v = v.substr(0, v.find(' '));
  ERL_NIF_TERM vt;
  unsigned char* p = enif_make_new_binary(env, v.size(), &vt);
  std::copy(v.begin(), v.end(), p);
#ifdef Py_GIL_DISABLED
  const char* gil = "free_threaded";
#else
  const char* gil = "shared";
#endif
  // Contexts as subinterpreters with their own GIL need 3.12+ (PEP 684); this build is
  // compiled against the headers of the Python it runs.
  const bool own_gil = PY_VERSION_HEX >= 0x030C0000;
  ERL_NIF_TERM keys[] = {atoms.version, atoms.gil, atoms.own_gil_subinterpreters,
                         atoms.initialized};
  ERL_NIF_TERM values[] = {vt, atom(env, gil), atom(env, own_gil ? "true" : "false"),
                           atom(env, Runtime::get().ready() ? "true" : "false")};
  ERL_NIF_TERM out;
  enif_make_map_from_arrays(env, keys, values, 4, &out);
  return out;
}

// Handles: is this term a Python object lent to Erlang?
ERL_NIF_TERM nif_is_handle(ErlNifEnv* env, int, const ERL_NIF_TERM argv[]) {
  const bool yes = get_resource<LentObject>(env, argv[0], Runtime::get().types.lent) != nullptr;
  return atom(env, yes ? "true" : "false");
}

// dirty_noop(T) -> T on a dirty CPU scheduler: the cost of the round trip to a dirty
// scheduler and back, measured by make bench beside an embedded call, which is how the
// thread model was chosen (doc/internals.md).
ERL_NIF_TERM nif_dirty_noop(ErlNifEnv*, int, const ERL_NIF_TERM argv[]) { return argv[0]; }

ErlNifFunc funcs[] = {
    {"dirty_noop", 1, entry<nif_dirty_noop>, ERL_NIF_DIRTY_JOB_CPU_BOUND},
    {"init", 2, entry<nif_init>, ERL_NIF_DIRTY_JOB_IO_BOUND},
    {"pool_new", 3, entry<nif_pool_new>, 0},
    {"pool_close", 1, entry<nif_pool_close>, 0},
    {"pool_info", 1, entry<nif_pool_info>, 0},
    {"submit", 3, entry<nif_submit>, 0},
    {"cancel", 1, entry<nif_cancel>, 0},
    {"poll", 2, entry<nif_poll>, 0},
    {"callback_reply", 2, entry<nif_callback_reply>, 0},
    {"checkin", 1, entry<nif_checkin>, 0},
    {"async_submit", 6, entry<nif_async_submit>, 0},
    {"async_cancel", 1, entry<nif_async_cancel>, 0},
    {"async_adopt", 1, entry<nif_async_adopt>, 0},
    {"async_poll", 2, entry<nif_async_poll>, 0},
    {"python_info", 0, entry<nif_python_info>, 0},
    {"is_handle", 1, entry<nif_is_handle>, 0},
    // erpy_reactor (reactor.hpp)
    {"reactor_adopt", 1, entry<reactor::nif_adopt>, 0},
    {"reactor_dup", 1, entry<reactor::nif_dup>, 0},
    {"reactor_select", 2, entry<reactor::nif_select>, 0},
    {"reactor_close", 1, entry<reactor::nif_close>, 0},
    {"reactor_fd", 1, entry<reactor::nif_fd>, 0},
    {"reactor_send_fd", 4, entry<reactor::nif_send_fd>, ERL_NIF_DIRTY_JOB_IO_BOUND},
    {"reactor_bind", 4, entry<reactor::nif_bind>, 0},
    {"reactor_batch", 3, entry<reactor::nif_batch>, 0},
    {"reactor_append", 2, entry<reactor::nif_append>, 0},
    {"reactor_running", 1, entry<reactor::nif_running>, 0},
    {"reactor_expire", 2, entry<reactor::nif_expire>, 0},
    {"reactor_watch", 1, entry<reactor::nif_watch>, 0},
};

int load(ErlNifEnv* env, void** priv, ERL_NIF_TERM) noexcept {
  *priv = nullptr;
  atoms.init(env);
  // TAKEOVER too: a module loaded again after a purge finds its types still alive.
  return open_types(env, static_cast<ErlNifResourceFlags>(ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER)) ? 0 : 1;
}

// Upgrading takes the resource types over; the runtime (and Python) carries on as it is.
int upgrade(ErlNifEnv* env, void** priv, void**, ERL_NIF_TERM) noexcept {
  *priv = nullptr;
  atoms.init(env);
  return open_types(env, static_cast<ErlNifResourceFlags>(ERL_NIF_RT_CREATE | ERL_NIF_RT_TAKEOVER)) ? 0 : 1;
}

void unload(ErlNifEnv*, void*) {
  // Nothing to free: the library stays mapped (RTLD_NODELETE) and Python stays up, so
  // resources that outlive the module and the threads that serve them stay valid.
}

}  // namespace

}  // namespace erpy::nif

ERL_NIF_INIT(erpy_nif, erpy::nif::funcs, erpy::nif::load, nullptr, erpy::nif::upgrade, erpy::nif::unload)
