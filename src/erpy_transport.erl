%% The transport behaviour: what a mode does for erpy's API, and the registry of running
%% pools. One module per mode implements it (erpy_port, erpy_embedded, erpy_node_pool);
%% erpy.erl dispatches through the registry, which stores `{Module, Handle}` per pool, and
%% never looks at modes or at the shape of a mode's handles and workers.
%%
%% A held worker, as the API hands it out, is `{erpy_worker, Module, Ref}`: `Ref` is the
%% mode's own and only its module reads it.
-module(erpy_transport).

-export([module/1, register/3, unregister/1, lookup/1, interpreter/1]).
-export_type([handle/0, ref/0, request/0, result/0, worker/0]).

%% A mode's handle of a running pool (what its module registered).
-type handle() :: term().
%% A mode's reference to one held worker.
-type ref() :: term().
-type worker() :: {erpy_worker, module(), ref()}.
%% What erpy asks Python for (doc/protocol.md).
-type request() :: erpy_request:t().
-type result() :: {ok, term()} | {error, erpy:error_reason()}.

%% Checks and completes what only the mode knows of a pool's options (erpy_config has
%% done the common ones), before the pool starts.
-callback prepare(Opts :: map()) -> {ok, map()} | {error, term()}.
%% The pool's supervisor and children: `{SupFlags, ChildSpecs}` for erpy_pool_sup.
-callback child_specs(Name :: atom(), Opts :: map()) ->
    {supervisor:sup_flags(), [supervisor:child_spec()]}.
%% One request on any worker of the pool, waited for in the caller's process.
-callback request(handle(), request(), timeout(), erpy:call_opts()) -> result().
%% One request on a held worker.
-callback request_worker(ref(), request(), timeout()) -> result().
%% Holds one worker (its namespace persists) until checkin/1 or the holder's death.
-callback checkout(handle(), timeout()) -> {ok, ref()} | {error, erpy:error_reason()}.
-callback checkin(ref()) -> ok.
%% Hands the fd `Fd` to the pool's reactor (erpy_reactor:handoff/4 has merged `Config`);
%% the transport owns `Fd` from then on and closes it on failure.
-callback reactor(handle(), Pool :: atom(), Fd :: non_neg_integer(), Info :: map(), Config :: map()) ->
    {ok, term()} | {error, term()}.
%% What the pool is doing: at least `mode` and `size`.
-callback info(handle()) -> #{mode := erpy:mode(), size := non_neg_integer(), atom() => term()}.
%% Where the pool's Python state lives: `shared`, one interpreter that every worker of the
%% pool runs in (what one request leaves in a module is seen by the next, on any worker);
%% `per_worker`, an interpreter per worker (state stays with the worker that made it).
-callback interpreter(handle()) -> shared | per_worker.

-define(KEY(Name), {erpy_pool, Name}).

%% API.

%% The module of a mode.
-spec module(erpy:mode()) -> module().
module(port) -> erpy_port;
module(embedded) -> erpy_embedded;
module(node) -> erpy_node_pool;
module(program) -> erpy_port_program.

%% The interpreter/1 of a running pool.
-spec interpreter(atom()) -> {ok, shared | per_worker} | error.
interpreter(Name) ->
    case lookup(Name) of
        {ok, Module, Handle} -> {ok, Module:interpreter(Handle)};
        error -> error
    end.

%% Called by a pool's server when it is ready to take requests (and again if it restarts).
-spec register(atom(), module(), handle()) -> ok.
register(Name, Module, Handle) ->
    persistent_term:put(?KEY(Name), {Module, Handle}).

-spec unregister(atom()) -> ok.
unregister(Name) ->
    _ = persistent_term:erase(?KEY(Name)),
    ok.

-spec lookup(atom()) -> {ok, module(), handle()} | error.
lookup(Name) ->
    case persistent_term:get(?KEY(Name), undefined) of
        {Module, Handle} -> {ok, Module, Handle};
        undefined -> error
    end.
