%% The erpy API: run Python code, call Python functions, manage pools.
%%
%% Every call goes to a pool (the `default` one unless `pool` says otherwise). A call made
%% from inside a callback that Python made into Erlang goes back to the same Python worker,
%% so Python -> Erlang -> Python nests without needing a second worker.
-module(erpy).

-export([run/1, run/2,
         call/3, call/4,
         eval/1, eval/2, eval/3,
         exec/1, exec/2,
         getattr/2, getattr/3,
         start_pool/2, stop_pool/1,
         checkout/1, checkout/2, checkin/1, with_worker/2, with_worker/3, pool_info/1,
         async_call/3, async_call/4, async_eval/2, async_eval/3, async_run/1,
         await/1, await/2, cancel/1]).

-export_type([python_error/0, error_reason/0, pool/0, call_opts/0, worker/0, mode/0, async_id/0]).

-type pool() :: atom().
-type python_error() :: #{type := binary(), message := binary(), traceback := [binary()]}.
-type error_reason() :: timeout
                      | python_error()
                      | {worker_exit, term()}
                      | {node_down, node()}
                      | {message_too_large, non_neg_integer(), non_neg_integer()}
                      | {unknown_atom, binary()}
                      | {undecodable, binary()}
                      | {not_allowed, {module(), atom(), arity()} | {'fun', module(), atom(), arity()}}
                      | {badarg, term()}
                      | {not_supported, {handle | eval | exec | run, pool()}}
                      | {no_pool, pool()}
                      | {no_nodes, pool()}
                      | {internal, binary()}
                      | out_of_memory.
-type mode() :: port | embedded | node | program.
%% A held worker: opaque, hand it back with checkin/1 (erpy_transport).
-type worker() :: erpy_transport:worker().
-type async_id() :: erpy_async:id().
-type call_opts() :: #{kwargs => map(),
                       handle => boolean(),
                       timeout => timeout(),
                       pool => pool(),
                       worker => worker(),
                       locals => map()}.

-define(DEFAULT_POOL, default).

%% API.

%% @doc Runs a Python snippet as erl_py_runner does. Inside it `arguments` holds the
%% `arguments` term, `result` (default None) is what comes back and `erlang` calls back.
-spec run(#{code := iodata(), arguments => term(), pool => pool()}) ->
    {ok, #{status := ok, result := term()} | #{status := error, error := python_error()}}
    | {error, term()}.
run(Req) ->
    run(Req, default_timeout()).

-spec run(#{code := iodata(), arguments => term(), pool => pool()}, timeout()) ->
    {ok, #{status := ok, result := term()} | #{status := error, error := python_error()}}
    | {error, term()}.
run(#{code := Code} = Req, Timeout) ->
    case to_binary(Code) of
        {ok, CodeBin} ->
            Args = maps:get(arguments, Req, undefined),
            Opts = maps:with([pool, worker], Req),
            case request(erpy_request:run(CodeBin, Args), Opts#{timeout => Timeout}) of
                {ok, Result} -> {ok, #{status => ok, result => Result}};
                {error, #{type := _} = PyError} -> {ok, #{status => error, error => PyError}};
                {error, _} = Error -> Error
            end;
        error ->
            {error, {badarg, code}}
    end;
run(_Req, _Timeout) ->
    {error, {badarg, code}}.

%% @doc Calls `Module.Function(*Args)` in Python. `Module` is a dotted module name, or (in
%% embedded mode) a handle: a Python object returned by a call made with `handle => true`,
%% whose method `Function` is then called. Handles are also accepted as arguments.
-spec call(atom() | binary(), atom() | binary(), [term()]) -> {ok, term()} | {error, error_reason()}.
call(Module, Function, Args) ->
    call(Module, Function, Args, #{}).

-spec call(atom() | binary(), atom() | binary(), [term()], call_opts()) ->
    {ok, term()} | {error, error_reason()}.
call(Module, Function, Args, Opts) ->
    case call_request(Module, Function, Args, Opts) of
        {ok, Req} -> request(Req, Opts);
        Error -> Error
    end.

%% @doc Evaluates a Python expression, with `Locals` (a map of names to terms) in scope.
-spec eval(iodata()) -> {ok, term()} | {error, error_reason()}.
eval(Expression) ->
    eval(Expression, #{}, #{}).

-spec eval(iodata(), map()) -> {ok, term()} | {error, error_reason()}.
eval(Expression, Locals) ->
    eval(Expression, Locals, #{}).

-spec eval(iodata(), map(), call_opts()) -> {ok, term()} | {error, error_reason()}.
eval(Expression, Locals, Opts) ->
    case eval_request(Expression, Locals, Opts) of
        {ok, Req} -> request(Req, Opts);
        Error -> Error
    end.

%% @doc Executes Python statements. With a held worker (`worker` option, see checkout/2)
%% its names persist across calls; otherwise each exec has a fresh namespace.
-spec exec(iodata()) -> ok | {error, error_reason()}.
exec(Code) ->
    exec(Code, #{}).

-spec exec(iodata(), call_opts()) -> ok | {error, error_reason()}.
exec(Code, Opts) when is_map(Opts) ->
    case to_binary(Code) of
        {ok, Bin} ->
            case request(erpy_request:exec(Bin), Opts) of
                {ok, _} -> ok;
                Error -> Error
            end;
        error -> {error, {badarg, code}}
    end.

%% @doc Starts a named pool. Options: mode (port), size, python, venv, requirements,
%% allowed, max_message_size, timeout, recycle_after, max_memory_mb, none.
%% @doc Attribute `Name` of a handle (embedded mode), or of any object `eval` can reach.
-spec getattr(reference(), atom() | binary()) -> {ok, term()} | {error, error_reason()}.
getattr(Object, Name) ->
    getattr(Object, Name, #{}).

-spec getattr(reference(), atom() | binary(), call_opts()) -> {ok, term()} | {error, error_reason()}.
getattr(Object, Name, Opts) ->
    case name(Name) of
        {ok, N} -> eval(<<"getattr(o, n)">>, #{o => Object, n => N}, Opts);
        error -> {error, {badarg, name}}
    end.

-spec start_pool(pool(), map()) -> {ok, pid()} | {error, term()}.
start_pool(Name, Opts) when is_atom(Name), is_map(Opts) ->
    erpy_sup:start_pool(Name, Opts);
start_pool(_Name, _Opts) ->
    {error, {badarg, pool}}.

-spec stop_pool(pool()) -> ok | {error, not_found}.
stop_pool(Name) ->
    erpy_sup:stop_pool(Name).

%% @doc Holds one worker of a pool for a stateful sequence of calls (pass it as the
%% `worker` option). It goes back to the pool on checkin/1 or when the holder dies, with
%% its namespace cleared.
-spec checkout(pool()) -> {ok, worker()} | {error, error_reason()}.
checkout(Pool) ->
    checkout(Pool, default_timeout()).

-spec checkout(pool(), timeout()) -> {ok, worker()} | {error, error_reason()}.
checkout(Pool, Timeout) ->
    case erpy_transport:lookup(Pool) of
        {ok, Module, Handle} ->
            case Module:checkout(Handle, Timeout) of
                {ok, Ref} -> {ok, {erpy_worker, Module, Ref}};
                {error, _} = Error -> Error
            end;
        error ->
            {error, {no_pool, Pool}}
    end.

-spec checkin(worker()) -> ok.
checkin({erpy_worker, Module, Ref}) ->
    Module:checkin(Ref).

%% @doc What a pool is doing: its mode and size, and the mode's own figures.
-spec pool_info(pool()) -> {ok, map()} | {error, {no_pool, pool()}}.
pool_info(Pool) ->
    case erpy_transport:lookup(Pool) of
        {ok, Module, Handle} -> {ok, Module:info(Handle)};
        error -> {error, {no_pool, Pool}}
    end.

%% @doc Runs Fun(Worker) with a checked-out worker and always gives it back.
-spec with_worker(pool(), fun((worker()) -> Result)) -> Result | {error, error_reason()}.
with_worker(Pool, Fun) ->
    with_worker(Pool, Fun, default_timeout()).

-spec with_worker(pool(), fun((worker()) -> Result), timeout()) -> Result | {error, error_reason()}.
with_worker(Pool, Fun, Timeout) ->
    case checkout(Pool, Timeout) of
        {ok, Worker} ->
            try Fun(Worker) after checkin(Worker) end;
        Error ->
            Error
    end.

%% @doc Starts call/4 without waiting: `{ok, Id}` at once. The answer (what call/4 would
%% return) comes as the message `{erpy_reply, Id, Answer}`: wait for it with await/1,2,
%% or match it in a gen_server's handle_info. Any number may be in flight per caller;
%% each has its own timeout (the `timeout` option), so each is answered. Answers come in
%% the order the requests finish, not the order they were made.
-spec async_call(atom() | binary(), atom() | binary(), [term()]) -> {ok, async_id()}.
async_call(Module, Function, Args) ->
    async_call(Module, Function, Args, #{}).

-spec async_call(atom() | binary(), atom() | binary(), [term()], call_opts()) -> {ok, async_id()}.
async_call(Module, Function, Args, Opts) ->
    async(fun() -> call(Module, Function, Args, Opts) end, call_request(Module, Function, Args, Opts), Opts).

-spec async_eval(iodata(), map()) -> {ok, async_id()}.
async_eval(Expression, Locals) ->
    async_eval(Expression, Locals, #{}).

-spec async_eval(iodata(), map(), call_opts()) -> {ok, async_id()}.
async_eval(Expression, Locals, Opts) ->
    async(fun() -> eval(Expression, Locals, Opts) end, eval_request(Expression, Locals, Opts), Opts).

%% As run/1, asynchronously; `timeout` in the map is the request's timeout.
-spec async_run(#{code := iodata(), arguments => term(), pool => pool(), timeout => timeout()}) ->
    {ok, async_id()}.
async_run(Req) when is_map(Req) ->
    Timeout = maps:get(timeout, Req, default_timeout()),
    erpy_async:start(fun() -> run(maps:remove(timeout, Req), Timeout) end, #{}).

%% @doc The answer of an asynchronous request (see async_call/4). await/1 waits for it
%% (it always comes: the request has its own timeout); await/2 gives up after `Timeout`
%% with `{error, timeout}` and leaves the request running (await again, or cancel/1).
-spec await(async_id()) -> term().
await(Id) ->
    erpy_async:await(Id, infinity).

-spec await(async_id(), timeout()) -> term().
await(Id, Timeout) ->
    erpy_async:await(Id, Timeout).

%% @doc Stops an asynchronous request: its Python call is interrupted as for a caller that
%% gave up, and no answer comes after cancel/1 returns.
-spec cancel(async_id()) -> ok | {error, {badarg, term()}}.
cancel(Id) ->
    erpy_async:cancel(Id).

%% Internal.

call_request(Module, Function, Args, Opts) when is_list(Args), is_map(Opts) ->
    case {target(Module), name(Function)} of
        {{ok, M}, {ok, F}} ->
            Kwargs = maps:get(kwargs, Opts, #{}),
            Req = erpy_request:call(M, F, Args, Kwargs),
            {ok, case Opts of
                     #{handle := true} -> erpy_request:with(Req, #{result => handle});
                     _ -> Req
                 end};
        {error, _} -> {error, {badarg, module}};
        {_, error} -> {error, {badarg, function}}
    end;
call_request(_Module, _Function, _Args, _Opts) ->
    {error, {badarg, args}}.

eval_request(Expression, Locals, Opts) when is_map(Locals), is_map(Opts) ->
    case to_binary(Expression) of
        {ok, Expr} -> {ok, erpy_request:eval(Expr, Locals)};
        error -> {error, {badarg, expression}}
    end;
eval_request(_Expression, _Locals, _Opts) ->
    {error, {badarg, locals}}.

%% An asynchronous request: made by the pool's transport itself where it can (its answer
%% is exactly what `Sync` would return), else by a runner running `Sync`.
async(Sync, {ok, Req}, Opts) ->
    erpy_async:start(Sync, Req, maps:get(pool, Opts, ?DEFAULT_POOL),
                     maps:get(timeout, Opts, default_timeout()), Opts);
async(Sync, {error, _}, Opts) ->
    erpy_async:start(Sync, Opts).

request(Req, Opts) ->
    Timeout = maps:get(timeout, Opts, default_timeout()),
    case maps:find(worker, Opts) of
        {ok, {erpy_worker, Module, Ref}} ->
            Module:request_worker(Ref, Req, Timeout);
        {ok, Other} ->
            {error, {badarg, {worker, Other}}};
        error ->
            Pool = maps:get(pool, Opts, ?DEFAULT_POOL),
            case erpy_transport:lookup(Pool) of
                {ok, Module, Handle} ->
                    stopped(Pool, {Module, Handle}, Module:request(Handle, Req, Timeout, Opts));
                error ->
                    {error, {no_pool, Pool}}
            end
    end.

%% A call in flight when its pool stops answers as a call to a stopped pool does, in every
%% mode (whatever the mode saw: its worker shut down, its node gone).
stopped(Pool, Registered, {error, {Why, _}} = Error) when Why =:= worker_exit; Why =:= node_down ->
    case erpy_transport:lookup(Pool) of
        {ok, Module, Handle} when {Module, Handle} =:= Registered -> Error;
        _ -> {error, {no_pool, Pool}}
    end;
stopped(_Pool, _Registered, Answer) ->
    Answer.

default_timeout() ->
    application:get_env(erpy, timeout, 5000).

%% A module name, or (embedded mode) a Python object handle whose method is called.
target(Handle) when is_reference(Handle) -> {ok, Handle};
target(Module) -> name(Module).

name(A) when is_atom(A) -> {ok, atom_to_binary(A, utf8)};
name(B) when is_binary(B) -> {ok, B};
name(L) when is_list(L) -> to_binary(L);
name(_) -> error.

to_binary(B) when is_binary(B) -> {ok, B};
to_binary(L) when is_list(L) ->
    try {ok, unicode:characters_to_binary(L)} of
        {ok, B} when is_binary(B) -> {ok, B};
        _ -> error
    catch _:_ -> error
    end;
to_binary(_) -> error.
