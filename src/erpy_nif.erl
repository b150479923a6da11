%% The NIF library of embedded mode (c_src/nif). Loaded on first use; every function here
%% is replaced by its C++ version, which never runs Python on the calling scheduler.
-module(erpy_nif).

-export([init/2, pool_new/3, pool_close/1, pool_info/1, submit/3, cancel/1, poll/2,
         callback_reply/2, checkin/1, python_info/0, is_handle/1, dirty_noop/1]).
-export([async_submit/6, async_cancel/1, async_adopt/1, async_poll/2]).
-export([reactor_adopt/1, reactor_dup/1, reactor_select/2, reactor_close/1, reactor_fd/1,
         reactor_send_fd/4, reactor_bind/4, reactor_batch/3, reactor_append/2, reactor_running/1,
         reactor_expire/2, reactor_watch/1]).

-on_load(load/0).

-nifs([init/2, pool_new/3, pool_close/1, pool_info/1, submit/3, cancel/1, poll/2,
       callback_reply/2, checkin/1, python_info/0, is_handle/1, dirty_noop/1,
       async_submit/6, async_cancel/1, async_adopt/1, async_poll/2,
       reactor_adopt/1, reactor_dup/1, reactor_select/2, reactor_close/1, reactor_fd/1,
       reactor_send_fd/4, reactor_bind/4, reactor_batch/3, reactor_append/2, reactor_running/1,
       reactor_expire/2, reactor_watch/1]).

-type pool() :: reference().
-type context() :: reference().
-type job() :: reference().
-export_type([pool/0, context/0, job/0]).

%% ERPY_NIF_DIR (the sanitizer test build) overrides priv/.
load() ->
    Dir = case os:getenv("ERPY_NIF_DIR") of
              false -> code:priv_dir(erpy);
              "" -> code:priv_dir(erpy);
              D -> D
          end,
    erlang:load_nif(filename:join(Dir, "erpy_nif"), 0).

%% Starts the VM's Python (once; later calls check it is the same interpreter).
-spec init(iodata(), iodata()) -> ok | {error, term()}.
init(_Executable, _PythonDir) -> erlang:nif_error(not_loaded).

-spec pool_new(pos_integer(), pid(), map()) -> pool() | {error, term()}.
pool_new(_Size, _Owner, _Opts) -> erlang:nif_error(not_loaded).

-spec pool_close(pool()) -> ok.
pool_close(_Pool) -> erlang:nif_error(not_loaded).

-spec pool_info(pool()) -> map().
pool_info(_Pool) -> erlang:nif_error(not_loaded).

%% Queues a request. Its answer ({ok, R} | {error, E}) is polled for (poll/2), or comes
%% as {Ref, Answer} once the caller waits; callbacks come as
%% {Ref, {callback, Context, Kind, M, F, Args}}.
%% Request: the request map (erpy_request), or `hold` for a checkout.
-spec submit(pool() | context(), reference(), erpy_request:t() | hold) -> {ok, job()} | {error, closed}.
submit(_Target, _Ref, _Request) -> erlang:nif_error(not_loaded).

%% canceled: no answer will come; sent: the answer is in the caller's mailbox; or the
%% answer itself, which was waiting to be polled.
-spec cancel(job()) -> canceled | sent | {done, term()}.
cancel(_Job) -> erlang:nif_error(not_loaded).

%% The answer if it is there, or a callback Python makes; `wait` once they come as
%% messages (always after poll(Job, true)).
-spec poll(job(), boolean()) ->
    {done, term()} | {callback, context(), call | apply, term(), term(), [term()]} | pending | wait.
poll(_Job, _Block) -> erlang:nif_error(not_loaded).

%% Queues an asynchronous request (erpy:async_call): its answer comes to the caller as
%% {erpy_reply, {erpy_async, Ref, Job}, Answer} with nobody waiting, {error, timeout} once
%% `Timeout` ms have passed, `Closed` if the pool closes first. A job that needs Erlang
%% (a callback, a result to check) is handed to the pool's owner as
%% {erpy_async_adopt, Job, Caller}, for a runner to take over (async_adopt/1), which gets
%% `Extra`.
-spec async_submit(pool() | context(), reference(), erpy_request:t(), timeout(), term(), term()) ->
    {ok, job()} | {error, closed}.
async_submit(_Target, _Ref, _Request, _Timeout, _Closed, _Extra) -> erlang:nif_error(not_loaded).

%% canceled: no reply will come; sent: the reply is in the caller's mailbox (unless taken
%% already); {runner, Pid}: the job's runner may still reply (stop it, then look);
%% not_yours: the calling process is not the caller, nothing was done.
-spec async_cancel(job()) -> canceled | sent | {runner, pid()} | not_yours.
async_cancel(_Job) -> erlang:nif_error(not_loaded).

%% The calling process takes over a job handed to the owner: it polls for it from now on,
%% as a synchronous caller does. `gone`: nothing is left to do for it.
-spec async_adopt(job()) -> {ok, reference(), pid(), erpy_request:t(), term(), timeout()} | gone.
async_adopt(_Job) -> erlang:nif_error(not_loaded).

%% The caller awaits its asynchronous job: its answer if it is there (the reply then never
%% comes), pending (poll again), wait (the reply comes as a message; a first poll with
%% Block = true only says where the answer is), answered (it was sent: in the mailbox
%% unless taken), {runner, Pid} (that runner sends it), or not_yours (another process).
-spec async_poll(job(), boolean()) -> {done, term()} | pending | wait | answered | {runner, pid()} | not_yours.
async_poll(_Job, _Block) -> erlang:nif_error(not_loaded).

-spec callback_reply(job(), {ok, term()} | {error, term()}) -> ok.
callback_reply(_Job, _Reply) -> erlang:nif_error(not_loaded).

-spec checkin(context()) -> ok.
checkin(_Context) -> erlang:nif_error(not_loaded).

-spec python_info() -> map().
python_info() -> erlang:nif_error(not_loaded).

-spec is_handle(term()) -> boolean().
is_handle(_Term) -> erlang:nif_error(not_loaded).

%% Returns its argument, from a dirty CPU scheduler: what a round trip to a dirty
%% scheduler costs (make bench measures it beside an embedded call).
-spec dirty_noop(T) -> T.
dirty_noop(_Term) -> erlang:nif_error(not_loaded).

%% erpy_reactor's fds (c_src/nif/reactor.hpp).
-spec reactor_adopt(non_neg_integer()) -> {ok, reference()} | {error, atom()}.
reactor_adopt(_Fd) -> erlang:nif_error(not_loaded).

-spec reactor_dup(non_neg_integer()) -> {ok, non_neg_integer()} | {error, atom()}.
reactor_dup(_Fd) -> erlang:nif_error(not_loaded).

-spec reactor_select(reference(), read | write) -> ok | {error, atom()}.
reactor_select(_Res, _Mode) -> erlang:nif_error(not_loaded).

-spec reactor_close(reference()) -> ok.
reactor_close(_Res) -> erlang:nif_error(not_loaded).

-spec reactor_fd(reference()) -> non_neg_integer() | closed.
reactor_fd(_Res) -> erlang:nif_error(not_loaded).

-spec reactor_send_fd(binary(), non_neg_integer(), non_neg_integer() | socketpair, binary()) ->
    ok | {ok, non_neg_integer()} | {error, term()}.
reactor_send_fd(_Channel, _OsPid, _Fd, _Payload) -> erlang:nif_error(not_loaded).

-spec reactor_bind(reference(), pid(), reference(), timeout()) -> ok | {error, bound}.
reactor_bind(_Res, _Hub, _Ref, _Timeout) -> erlang:nif_error(not_loaded).

-spec reactor_batch(reference(), reference(), [tuple()]) ->
    {ok, reference(), reference()} | empty | {error, pool_closed}.
reactor_batch(_Pool, _Ref, _Selects) -> erlang:nif_error(not_loaded).

-spec reactor_append(reference(), [tuple()]) -> ok | started.
reactor_append(_Batch, _Selects) -> erlang:nif_error(not_loaded).

-spec reactor_running(reference()) -> {pid(), reference()} | none.
reactor_running(_Batch) -> erlang:nif_error(not_loaded).

-spec reactor_expire(reference(), reference()) ->
    {wait, non_neg_integer()} | done | finished | {timeout, pid(), reference()}.
reactor_expire(_Job, _Batch) -> erlang:nif_error(not_loaded).

-spec reactor_watch(reference()) -> idle | busy.
reactor_watch(_Res) -> erlang:nif_error(not_loaded).
