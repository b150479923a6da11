%% Stateful Python functions hosted by Erlang (python/erpy/function.py, doc/function.md).
%%
%% One gen_server per function instance. It drives the Python instance (its module copy
%% or object) with ordinary erpy requests, one at a time: handle_init at start,
%% handle_cast and handle_call per message, handle_stop at a normal stop. Where the
%% Python instance lives depends on the pool's mode: port and node workers are separate
%% interpreters, so the instance holds one worker for its life and lives in it; an
%% embedded pool's contexts share the VM's one interpreter, so the instance holds none
%% and lives in erpy.function's table, and its requests go to any free context like a
%% plain erpy:call (a held context sleeps between requests and costs a thread wake-up per
%% call; see ensure_dropped/2 for how the table is kept clean). The instance's host API calls
%% (cast, call, delayed_cast, sync, telemetry_log...) come back as callbacks to host/1,
%% which the pool must allow (`allowed => [{erpy_function, host, 1}]`): they pass the
%% pool's policy like any `erlang.call`, and run in this process, which is how host/1 knows
%% the instance (Python cannot speak for another one).
%%
%% State: sync/1 writes the instance's state to the Mnesia table erpy_function_state
%% (disc_copies when Mnesia has a disc schema, see ensure_store/0); a restarted instance
%% (crash, lost worker, VM restart) reads it back for handle_init. Instances started with
%% start/1 run under erpy_function_sup with restart limits.
%%
%% Direct calls: call/3 normally runs the request itself, in the caller's process, when
%% the instance is idle, instead of a hop through the instance process (which costs two
%% process wake-ups per call). One "turn" per instance (an atomics slot) says who may run a
%% handler: 0 free, -1 the instance process, T > 0 the direct caller with token T, -T that
%% caller while the instance process waits for the turn. A direct caller takes it by CAS
%% 0 -> T, and only keeps it when nothing is queued for the instance: no counted cast in
%% flight (slot 2, counted by every cast this module sends to an instance, so a caller's
%% earlier casts are handled before its call) and an empty mailbox; else it falls back to
%% the process path. The instance process takes the turn before each handler (waiting,
%% marked -T, to be handed it at the holder's release) and frees it after. T is the
%% holder's pid as a number (token/0), so a waiting instance monitors the holder: one that
%% dies with the turn gives it back at its death, once Python no longer runs its call (its
%% job is interrupted; erpy.function counts each instance's running calls). The wait is
%% still bounded by the instance's timeout, which bounds every direct call, plus a grace.
%% During a
%% direct call the host API's callbacks run in the caller's process: the instance's
%% context is put there for the call's duration (and the caller's own restored after).
-module(erpy_function).
-behaviour(gen_server).

-compile({no_auto_import, [whereis/1]}).

-export([start/1, start_link/1, child_spec/1, stop/1,
         call/2, call/3, cast/2, cast/3,
         set_alias/3, whereis/1, info/1,
         ensure_store/0, read_state/1, delete_state/1,
         host/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-export_type([id/0, instance_id/0, target/0, opts/0, call_answer/0]).

%% The instance's stable name: it keys the synced state and is the function_id of its
%% instance id, so a restarted instance is the same instance.
-type id() :: binary().
%% {NodeId, FunctionId}, as EDGELESS InstanceId: the node's name and the id.
-type instance_id() :: {binary(), binary()}.
%% Where an alias points: a function instance by id (found again after it restarts), or
%% any process that speaks the protocol (see doc/function.md).
-type target() :: id() | pid() | atom() | {atom(), node()}.
-type opts() :: #{id := id(),
                  module := iodata(),
                  pool => erpy:pool(),
                  init_payload => iodata(),
                  aliases => #{binary() => target()},
                  timeout => timeout(),
                  store => mnesia | none,
                  max_restarts => {non_neg_integer(), pos_integer()}}.
-type call_answer() :: {reply, binary()} | noreply | {error, term()}.

-define(TABLE, erpy_function_state).
-define(REGISTRY, erpy_function_registry).
-define(CTX, '$erpy_function').
%% A caller's last direct entry (entry/1).
-define(LAST, '$erpy_function_last').
%% The process's direct-call token (token/0).
-define(TOKEN, '$erpy_function_token').
-define(PY, <<"erpy.function">>).
%% What a restart limit is when start/1 is not told: 3 restarts in 5 seconds.
-define(DEFAULT_RESTARTS, {3, 5}).
-define(STORE_WAIT_MS, 30000).
%% Atomics slots of an instance (see "Direct calls" above).
-define(TURN, 1).
-define(PENDING, 2).
-define(DIRECT_ERRORS, 3).
%% How long past the instance's timeout a waiting instance trusts the turn's holder.
-define(TURN_GRACE_MS, 2000).

-record(st, {id :: id(),
             self_id :: instance_id(),
             %% The instance's key in erpy.function's table (unique in the VM).
             key :: pos_integer(),
             %% The held worker; undefined when the instance holds none (embedded).
             worker :: erpy:worker() | undefined,
             pool :: erpy:pool(),
             timeout :: timeout(),
             %% Delayed casts not yet due, by {DueMs, Seq}: one timer for the earliest.
             delayed = gb_trees:empty() :: gb_trees:tree(),
             timer :: reference() | undefined,
             %% The turn and counters (undefined: no direct calls, timeout infinity).
             atomics :: atomics:atomics_ref() | undefined,
             %% erpy:call's options of this instance's requests, made once.
             req_opts :: map(),
             errors = 0 :: non_neg_integer()}).

%% API.

%% @doc Starts an instance under erpy_function_sup: restarted after a crash (or when its
%% worker is lost) at most `max_restarts` times per period, with its last synced state.
-spec start(opts()) -> {ok, pid()} | {error, term()}.
start(Opts) ->
    case check_opts(Opts) of
        {ok, Full} -> erpy_function_sup:start_instance(Full);
        Error -> Error
    end.

%% @doc Starts an instance linked to the caller, for a supervision tree of your own
%% (see child_spec/1); the restart policy is then that tree's.
-spec start_link(opts()) -> {ok, pid()} | {error, term()}.
start_link(Opts) ->
    case check_opts(Opts) of
        {ok, Full} ->
            ok = erpy_function_sup:ensure_started(),
            gen_server:start_link(?MODULE, Full, []);
        Error ->
            Error
    end.

-spec child_spec(opts()) -> supervisor:child_spec().
child_spec(#{id := Id} = Opts) ->
    #{id => {?MODULE, Id}, start => {?MODULE, start_link, [Opts]}, restart => transient,
      shutdown => 10000, type => worker}.

%% @doc Stops an instance: handle_stop runs, its worker goes back to the pool, and it is
%% not restarted. Its synced state stays (delete_state/1 removes it).
-spec stop(id() | pid()) -> ok | {error, not_found}.
stop(Inst) ->
    case resolve(Inst) of
        {ok, Pid} ->
            try gen_server:call(Pid, stop, infinity)
            catch exit:_ -> ok
            end;
        error ->
            {error, not_found}
    end.

%% @doc Calls the instance's handle_call(src, msg): `{reply, Binary}`, `noreply`, or
%% `{error, Reason}` (a Python error map when the handler raised).
-spec call(id() | pid(), iodata()) -> call_answer().
call(Inst, Msg) ->
    call(Inst, Msg, #{}).

%% Options: `timeout` (default: the application's), `src` (the instance_id() the handler
%% sees; default {Node, <<"erlang">>}). A bare timeout is accepted for the options.
-spec call(id() | pid(), iodata(), timeout() | #{timeout => timeout(), src => instance_id()}) ->
    call_answer().
call(Inst, Msg, Timeout) when is_integer(Timeout); Timeout =:= infinity ->
    call(Inst, Msg, #{timeout => Timeout});
call(Inst, Msg, Opts) when is_map(Opts) ->
    Timeout = case Opts of
                  #{timeout := T} -> T;
                  _ -> default_timeout()
              end,
    case {entry(Inst), to_bin(Msg)} of
        {error, _} ->
            {error, {no_instance, Inst}};
        {_, error} ->
            {error, {badarg, msg}};
        {Entry, {ok, Bin}} ->
            Src = case Opts of
                      #{src := S} -> S;
                      _ -> default
                  end,
            case Entry of
                {Pid, Id, A, Key, ReqOpts} ->
                    direct_call(Pid, Id, A, Key, ReqOpts, Src, Bin, Timeout);
                Pid ->
                    gen_call(Pid, {erpy_function, call, src(Src), Bin}, Timeout)
            end
    end.

%% @doc Sends a message to the instance's handle_cast(src, msg). Errors of the handler
%% go to `logger` (and info/1's `errors`).
-spec cast(id() | pid(), iodata()) -> ok | {error, term()}.
cast(Inst, Msg) ->
    cast(Inst, Msg, #{}).

-spec cast(id() | pid(), iodata(), #{src => instance_id()}) -> ok | {error, term()}.
cast(Inst, Msg, Opts) ->
    case {resolve(Inst), to_bin(Msg)} of
        {{ok, Pid}, {ok, Bin}} ->
            send_counted(Pid, maps:get(src, Opts, {node_id(), <<"erlang">>}), Bin);
        {error, _} -> {error, {no_instance, Inst}};
        {_, error} -> {error, {badarg, msg}}
    end.

%% @doc Points `Alias` of a running instance at `Target`. A restart goes back to the
%% start options' aliases; instances that point at each other need no set_alias: wire
%% them by id, which is resolved when a message is sent.
-spec set_alias(id() | pid(), binary(), target()) -> ok | {error, term()}.
set_alias(Inst, Alias, Target) when is_binary(Alias) ->
    case resolve(Inst) of
        {ok, Pid} -> gen_call(Pid, {set_alias, Alias, Target}, default_timeout());
        error -> {error, {no_instance, Inst}}
    end.

%% @doc The running instance `Id` of this node.
-spec whereis(id()) -> pid() | undefined.
whereis(Id) when is_binary(Id) ->
    try ets:lookup(?REGISTRY, Id) of
        [{_, Pid, _}] ->
            case is_process_alive(Pid) of
                true -> Pid;
                false -> undefined
            end;
        [] -> undefined
    catch error:badarg -> undefined
    end;
whereis(_) ->
    undefined.

-spec info(id() | pid()) -> {ok, map()} | {error, term()}.
info(Inst) ->
    case resolve(Inst) of
        {ok, Pid} -> gen_call(Pid, info, default_timeout());
        error -> {error, {no_instance, Inst}}
    end.

%% @doc Makes sure the state table exists and Mnesia runs. Mnesia's directory: the
%% application env `{erpy, function_store_dir}` or `{mnesia, dir}`; with either, the
%% schema is on disc (created if missing) and the table is disc_copies, so state survives
%% a VM restart. Without a directory (and no disc schema) it is ram_copies: state survives
%% restarts of instances only, and a warning says so.
-spec ensure_store() -> ok | {error, term()}.
ensure_store() ->
    try
        ok = start_mnesia(),
        Type = case mnesia:table_info(schema, disc_copies) of
                   [] -> ram_copies;
                   _ -> disc_copies
               end,
        case lists:member(?TABLE, mnesia:system_info(tables)) of
            true -> ok;
            false ->
                Type =:= ram_copies andalso
                    logger:warning("erpy_function: Mnesia has no disc schema (set {erpy, "
                                   "function_store_dir}): function state is kept in RAM only",
                                   #{domain => [erpy, function]}),
                case mnesia:create_table(?TABLE, [{Type, [node()]},
                                                  {attributes, [id, state]}]) of
                    {atomic, ok} -> ok;
                    {aborted, {already_exists, ?TABLE}} -> ok;
                    {aborted, Why} -> throw({store, Why})
                end
        end,
        %% A store directory written by a node of another name holds the table on that
        %% node only: waiting for it would time out, so it is said at once.
        case mnesia:table_info(?TABLE, all_nodes) of
            [_ | _] = Holders ->
                lists:member(node(), Holders) orelse
                    lists:any(fun(N) -> lists:member(N, nodes()) end, Holders) orelse
                    throw({store, {held_by_other_nodes, Holders, node()}});
            _ ->
                ok
        end,
        case mnesia:wait_for_tables([?TABLE], ?STORE_WAIT_MS) of
            ok -> ok;
            Other -> throw({store, Other})
        end
    catch
        throw:Why2 -> {error, Why2};
        exit:Why2 -> {error, {store, Why2}}
    end.

%% @doc The last state instance `Id` synced, if any.
-spec read_state(id()) -> {ok, binary()} | none | {error, term()}.
read_state(Id) ->
    try mnesia:dirty_read(?TABLE, Id) of
        [{?TABLE, Id, State}] -> {ok, State};
        [] -> none
    catch exit:Why -> {error, {store, Why}}
    end.

-spec delete_state(id()) -> ok | {error, term()}.
delete_state(Id) ->
    try mnesia:sync_dirty(fun() -> mnesia:delete({?TABLE, Id}) end)
    catch exit:Why -> {error, {store, Why}}
    end.

%% @doc The host API's entry point, called by an instance's Python through
%% `erlang.call('erpy_function', 'host', Op)` (so under the pool's policy). It acts only in
%% an instance's own process, for that instance; anywhere else it refuses.
-spec host(tuple()) -> ok | call_answer().
host(Op) ->
    case get(?CTX) of
        #{} = Ctx ->
            try host(Op, Ctx)
            catch Class:Why -> {error, {Class, Why}}
            end;
        {direct, Pid, Id} ->
            %% A direct call of instance Pid runs in this process (direct_run/9).
            case ets:lookup(?REGISTRY, {ctx, Id}) of
                [{_, Pid, Ctx}] ->
                    try host(Op, Ctx)
                    catch Class:Why -> {error, {Class, Why}}
                    end;
                _ ->
                    {error, not_an_instance}
            end;
        undefined ->
            {error, not_an_instance}
    end.

%% gen_server.

-spec init(map()) -> {ok, #st{}} | {stop, term()}.
init(#{id := Id, pool := Pool, timeout := Timeout} = Opts) ->
    process_flag(trap_exit, true),
    case register_instance(Id) of
        ok ->
            Started = case restore(Opts) of
                          {ok, State} -> start_python(Opts, State, Pool, Timeout);
                          {error, Why} -> {stop, Why}
                      end,
            case Started of
                {stop, _} ->
                    %% Unregistered before the starter hears of the failure (this process
                    %% exits only after that): a new start of `Id` must not find it.
                    unregister_instance(Id),
                    Started;
                _ ->
                    Started
            end;
        {error, _} = Error ->
            {stop, Error}
    end.

-spec handle_call(term(), gen_server:from(), #st{}) ->
    {reply, term(), #st{}} | {stop, term(), term(), #st{}}.
handle_call({erpy_function, call, Src, Msg}, _From, St) ->
    case turn_py(<<"erlang_call">>, call_args(St#st.key, Src, Msg), St) of
        {ok, Reply} when is_binary(Reply) -> {reply, {reply, Reply}, St};
        {ok, noreply} -> {reply, noreply, St};
        {ok, Other} -> {reply, {error, {bad_reply, Other}}, St};
        {lost, Why} -> {stop, {worker_lost, Why}, {error, {worker_lost, Why}}, St};
        {error, Why} -> {reply, {error, Why}, St#st{errors = St#st.errors + 1}}
    end;
handle_call({set_alias, Alias, Target}, _From, St) ->
    Ctx = get(?CTX),
    put(?CTX, Ctx#{aliases := maps:put(Alias, Target, maps:get(aliases, Ctx))}),
    publish(St),
    {reply, ok, St};
handle_call(info, _From, #st{} = St) ->
    #{aliases := Aliases, pool := Pool} = get(?CTX),
    Direct = case St#st.atomics of
                 undefined -> 0;
                 A -> atomics:get(A, ?DIRECT_ERRORS)
             end,
    {reply, {ok, #{id => St#st.id, self_id => St#st.self_id, pool => Pool, aliases => Aliases,
                   errors => St#st.errors + Direct,
                   delayed => gb_trees:size(St#st.delayed)}}, St};
handle_call(stop, _From, St) ->
    {stop, normal, ok, St};
handle_call(_Msg, _From, St) ->
    {reply, {error, unknown_call}, St}.

-spec handle_cast(term(), #st{}) -> {noreply, #st{}}.
handle_cast(_Msg, St) ->
    {noreply, St}.

-spec handle_info(term(), #st{}) -> {noreply, #st{}} | {stop, term(), #st{}}.
handle_info({erpy_function, cast, Src, Msg}, St) ->
    run_cast(Src, Msg, St);
handle_info({erpy_function_cast, Src, Msg}, St) ->
    %% A counted cast (send_counted/3): uncounted once handled, so direct calls resume.
    Answer = run_cast(Src, Msg, St),
    _ = St#st.atomics =:= undefined orelse atomics:sub(St#st.atomics, ?PENDING, 1),
    Answer;
handle_info({erpy_function_lost, Why}, St) ->
    %% A direct call found the instance's Python gone.
    {stop, {worker_lost, Why}, St};
handle_info({erpy_function_delay, Due, Seq, Alias, Msg}, St) ->
    {noreply, arm(St#st{delayed = gb_trees:insert({Due, Seq}, {Alias, Msg}, St#st.delayed)})};
handle_info({timeout, Timer, erpy_function_delayed}, #st{timer = Timer} = St) ->
    {noreply, arm(fire(St#st{timer = undefined}))};
handle_info({'DOWN', _, process, _, Why}, St) ->
    %% The held port worker died: its Python (and the instance in it) is gone.
    {stop, {worker_lost, Why}, St};
handle_info({nodedown, Node}, St) ->
    {stop, {worker_lost, {nodedown, Node}}, St};
handle_info(_Msg, St) ->
    {noreply, St}.

-spec terminate(term(), #st{}) -> ok.
terminate(Why, #st{id = Id, worker = Worker} = St) ->
    Stopping = Why =:= normal orelse Why =:= shutdown
               orelse (is_tuple(Why) andalso element(1, Why) =:= shutdown),
    %% No new direct calls; one running ends before handle_stop or the worker's checkin.
    true = ets:insert(?REGISTRY, {Id, self(), undefined}),
    _ = St#st.atomics =:= undefined orelse Why =:= killed orelse
        take_turn(St),
    case Why of
        {worker_lost, _} ->
            ok;
        _ when Worker =:= undefined ->
            %% Nothing held: handle_stop on a stop; after a crash the instance is only
            %% dropped from Python's table (its janitor does that too, after a kill).
            Fun = case Stopping of
                      true -> <<"erlang_stop">>;
                      false -> <<"erlang_drop">>
                  end,
            _ = py(Fun, [St#st.key], St),
            ok;
        _ ->
            %% handle_stop on a stop (not after a crash), then the worker goes back to
            %% the pool, which clears its namespace and so the instance.
            _ = Stopping andalso py(<<"erlang_stop">>, [St#st.key], St),
            erpy:checkin(Worker)
    end,
    unregister_instance(Id),
    ok.

%% Internal.

check_opts(#{id := Id, module := Module} = Opts) when is_binary(Id), byte_size(Id) > 0 ->
    Defaults = #{pool => default, init_payload => <<>>, aliases => #{},
                 timeout => default_timeout(), store => mnesia,
                 max_restarts => ?DEFAULT_RESTARTS},
    Full = maps:merge(Defaults, Opts),
    Checks = [{module, to_bin(Module)},
              {init_payload, to_bin(maps:get(init_payload, Full))},
              {pool, case maps:get(pool, Full) of P when is_atom(P) -> {ok, P}; _ -> error end},
              {aliases, check_aliases(maps:get(aliases, Full))},
              {store, case maps:get(store, Full) of S when S =:= mnesia; S =:= none -> {ok, S};
                                                     _ -> error end},
              {timeout, case maps:get(timeout, Full) of
                            T when is_integer(T), T > 0; T =:= infinity -> {ok, T};
                            _ -> error
                        end},
              {max_restarts, case maps:get(max_restarts, Full) of
                                 {R, P2} when is_integer(R), R >= 0, is_integer(P2), P2 > 0 -> {ok, {R, P2}};
                                 _ -> error
                             end}],
    case [K || {K, error} <- Checks] of
        [] -> {ok, maps:merge(Full, maps:from_list([{K, V} || {K, {ok, V}} <- Checks]))};
        [Bad | _] -> {error, {badarg, {Bad, maps:get(Bad, Full)}}}
    end;
check_opts(#{id := Id}) when not is_binary(Id); Id =:= <<>> ->
    {error, {badarg, {id, Id}}};
check_opts(#{id := _}) ->
    {error, {badarg, module}};
check_opts(_) ->
    {error, {badarg, id}}.

check_aliases(Aliases) when is_map(Aliases) ->
    case lists:all(fun({A, T}) -> is_binary(A) andalso is_target(T) end, maps:to_list(Aliases)) of
        true -> {ok, Aliases};
        false -> error
    end;
check_aliases(_) ->
    error.

is_target(T) when is_binary(T); is_pid(T); is_atom(T) -> true;
is_target({Name, Node}) when is_atom(Name), is_atom(Node) -> true;
is_target(_) -> false.

register_instance(Id) ->
    case whereis(Id) of
        %% No direct calls until it has started (publish/1).
        undefined -> true = ets:insert(?REGISTRY, {Id, self(), undefined}), ok;
        Pid -> {error, {already_started, Pid}}
    end.

unregister_instance(Id) ->
    _ = ets:match_delete(?REGISTRY, {Id, self(), '_'}),
    _ = ets:match_delete(?REGISTRY, {{ctx, Id}, self(), '_'}),
    _ = ets:delete_object(?REGISTRY, {self(), Id}),
    ok.

%% Makes the started instance reachable by direct calls, with its current context.
publish(#st{atomics = undefined}) ->
    ok;
publish(#st{id = Id, atomics = A, key = Key, req_opts = ReqOpts}) ->
    %% The context apart: a direct call copies only what it needs, and its callbacks (if
    %% any) read the context (see host/1).
    true = ets:insert(?REGISTRY, [{Id, self(), {A, Key, ReqOpts}},
                                  {{ctx, Id}, self(), get(?CTX)}, {self(), Id}]),
    ok.

restore(#{store := none}) ->
    {ok, <<>>};
restore(#{store := mnesia, id := Id}) ->
    case ensure_store() of
        ok ->
            case read_state(Id) of
                {ok, State} -> {ok, State};
                none -> {ok, <<>>};
                Error -> Error
            end;
        Error ->
            Error
    end.

start_python(#{id := Id, module := Module, init_payload := Payload} = Opts, State, Pool, Timeout) ->
    SelfId = {node_id(), Id},
    Key = erlang:unique_integer([positive]),
    put(?CTX, #{id => Id, self_id => SelfId, pool => Pool, store => maps:get(store, Opts),
                aliases => maps:get(aliases, Opts), timeout => Timeout, pid => self()}),
    A = case Timeout of
            infinity -> undefined;
            _ -> atomics:new(3, [])
        end,
    St0 = #st{id = Id, self_id = SelfId, key = Key, pool = Pool, timeout = Timeout,
              atomics = A, req_opts = #{pool => Pool, timeout => Timeout}},
    case erpy_transport:interpreter(Pool) of
        {ok, shared} -> start_shared(St0, Module, Payload, State);
        {ok, per_worker} -> start_held(St0, Module, Payload, State);
        error -> {stop, {no_worker, {no_pool, Pool}}}
    end.

%% Embedded: the instance goes into erpy.function's table (the VM's one interpreter, seen
%% by every context of every embedded pool) under its key, and is reached by key from any
%% context; a janitor drops it when this process ends.
start_shared(#st{key = Key, self_id = SelfId, pool = Pool} = St, Module, Payload, State) ->
    %% Before the start: an init that fails or times out leaves no entry behind either.
    ensure_dropped(Key, Pool),
    case erpy:call(?PY, <<"erlang_start_shared">>, [Key, Module, SelfId, Payload, State],
                   #{pool => Pool, timeout => St#st.timeout}) of
        {ok, ok} ->
            publish(St),
            {ok, St};
        {ok, Other} ->
            {stop, {init_failed, {bad_answer, Other}}};
        {error, {no_pool, _} = Why} ->
            {stop, {no_worker, Why}};
        {error, Why} ->
            {stop, {init_failed, Why}}
    end.

%% The janitor of a shared instance: when the instance process ends, its entry goes from
%% Python's table (a no-op after terminate/2 did it). Should the janitor itself be lost
%% (or the pool be gone), the next start of the same id drops the stale entry.
ensure_dropped(Key, Pool) ->
    Inst = self(),
    _ = spawn(fun() ->
                      Ref = erlang:monitor(process, Inst),
                      receive
                          {'DOWN', Ref, process, Inst, _} ->
                              _ = erpy:call(?PY, <<"erlang_drop">>, [Key],
                                            #{pool => Pool, timeout => default_timeout()})
                      end
              end),
    ok.

start_held(#st{key = Key, self_id = SelfId, pool = Pool, timeout = Timeout} = St0, Module,
           Payload, State) ->
    case erpy:checkout(Pool, Timeout) of
        {ok, Worker} ->
            watch(Worker),
            St = St0#st{worker = Worker, req_opts = #{worker => Worker, timeout => Timeout}},
            %% Evaluated in the held worker's namespace: the instance lives as long as it.
            Code = <<"__import__('erpy.function').function.erlang_start("
                     "globals(), k, m, i, p, s)">>,
            Locals = #{k => Key, m => Module, i => SelfId, p => Payload, s => State},
            case erpy:eval(Code, Locals, #{worker => Worker, timeout => Timeout}) of
                {ok, ok} -> publish(St), {ok, St};
                {ok, Other} -> erpy:checkin(Worker), {stop, {init_failed, {bad_answer, Other}}};
                {error, Why} -> erpy:checkin(Worker), {stop, {init_failed, Why}}
            end;
        {error, Why} ->
            {stop, {no_worker, Why}}
    end.

%% A held worker that can die on its own is watched, so that an idle instance notices its
%% Python is gone and is restarted at once (rather than at its next message).
watch({erpy_worker, _, {_Pool, WorkerPid}}) when is_pid(WorkerPid) ->
    _ = erlang:monitor(process, WorkerPid), ok;
watch({erpy_worker, _, {erpy_node_worker, _Pool, Node, _Session}}) ->
    true = erlang:monitor_node(Node, true), ok;
watch(_) ->
    ok.

run_cast(Src, Msg, St) ->
    case turn_py(<<"erlang_cast">>, [St#st.key, Src, Msg], St) of
        {ok, _} ->
            {noreply, St};
        {lost, Why} ->
            {stop, {worker_lost, Why}, St};
        {error, Why} ->
            logger:error("erpy_function ~ts: handle_cast failed: ~tp", [St#st.id, Why],
                         #{domain => [erpy, function], erpy_function => St#st.id}),
            {noreply, St#st{errors = St#st.errors + 1}}
    end.

%% A request to the instance's Python: on its held worker, or on any context of its
%% embedded pool. `lost`: the worker (and the instance) is gone.
py(Fun, Args, #st{req_opts = Opts}) ->
    py_answer(erpy:call(?PY, Fun, Args, Opts)).

py_answer(Answer) ->
    case Answer of
        {ok, _} = Ok -> Ok;
        %% The worker answers but no longer has the instance (it was replaced).
        {error, #{type := <<"LookupError">>} = Why} -> {lost, Why};
        {error, {Lost, _} = Why} when Lost =:= worker_exit; Lost =:= node_down;
                                      Lost =:= no_pool -> {lost, Why};
        {error, _} = Error -> Error
    end.

host({cast, Alias, Msg}, Ctx) ->
    with_target(Alias, Ctx, fun(T) -> send_cast(T, Msg, Ctx) end);
host({cast_raw, Dst, Msg}, Ctx) ->
    with_raw(Dst, fun(T) -> send_cast(T, Msg, Ctx) end);
host({call, Alias, Msg}, Ctx) ->
    with_target(Alias, Ctx, fun(T) -> send_call(T, Msg, Ctx) end);
host({call_raw, Dst, Msg}, Ctx) ->
    with_raw(Dst, fun(T) -> send_call(T, Msg, Ctx) end);
host({delayed_cast, Ms, Alias, Msg}, #{pid := Inst}) when is_integer(Ms), Ms >= 0,
                                                        is_binary(Alias), is_binary(Msg) ->
    %% Due a millisecond late rather than early: the clock is read in whole milliseconds.
    %% To the instance process (this may be a direct caller's), which keeps the timers.
    Due = erlang:monotonic_time(millisecond) + Ms + 1,
    Inst ! {erpy_function_delay, Due, erlang:unique_integer([monotonic]), Alias, Msg},
    ok;
host({sync, State}, #{store := Store, id := Id}) when is_binary(State) ->
    case Store of
        none -> ok;
        mnesia ->
            try mnesia:sync_dirty(fun() -> mnesia:write({?TABLE, Id, State}) end) of
                ok -> ok
            catch exit:Why -> {error, {store, Why}}
            end
    end;
host({telemetry_log, Level, Target, Msg}, #{id := Id}) when is_integer(Level) ->
    logger:log(log_level(Level), "~ts: ~ts", [Target, Msg],
               #{domain => [erpy, function], erpy_function => Id, target => Target}),
    ok;
host({slf}, #{self_id := SelfId}) ->
    {reply, SelfId};
host(Op, _Ctx) ->
    {error, {badarg, Op}}.

log_level(0) -> error;
log_level(1) -> warning;
log_level(2) -> info;
log_level(_) -> debug.

with_target(Alias, #{aliases := Aliases}, Fun) when is_binary(Alias) ->
    case maps:find(Alias, Aliases) of
        {ok, Target} -> Fun(Target);
        error -> {error, {no_alias, Alias}}
    end;
with_target(Alias, _Ctx, _Fun) ->
    {error, {badarg, {alias, Alias}}}.

%% A raw destination {NodeId, FunctionId}: an instance on this node, or on the node
%% NodeId names (which must already be a known atom: no atom is made from Python's data).
with_raw({Node, Fn}, Fun) when is_binary(Node), is_binary(Fn) ->
    case Node =:= node_id() of
        true -> Fun(Fn);
        false ->
            try binary_to_existing_atom(Node, utf8) of
                NodeAtom ->
                    case erpc:call(NodeAtom, ?MODULE, whereis, [Fn], default_timeout()) of
                        Pid when is_pid(Pid) -> Fun(Pid);
                        undefined -> {error, {no_instance, {Node, Fn}}}
                    end
            catch
                error:badarg -> {error, {no_instance, {Node, Fn}}};
                error:{erpc, Why} -> {error, {no_instance, {Node, Fn}, Why}}
            end
    end;
with_raw(Dst, _Fun) ->
    {error, {badarg, {dst, Dst}}}.

send_cast(Target, Msg, #{self_id := SelfId}) ->
    case dest(Target) of
        {ok, Dest} when is_pid(Dest), node(Dest) =:= node() -> send_counted(Dest, SelfId, Msg);
        {ok, Dest} -> _ = catch Dest ! {erpy_function, cast, SelfId, Msg}, ok;
        Error -> Error
    end.

send_call(Target, Msg, #{self_id := SelfId, timeout := Timeout, pid := Self}) ->
    case dest(Target) of
        {ok, Self} -> {error, self_call};
        {ok, Dest} when is_pid(Dest), node(Dest) =:= node() ->
            call(Dest, Msg, #{src => SelfId, timeout => Timeout});
        {ok, Dest} -> gen_call(Dest, {erpy_function, call, SelfId, Msg}, Timeout);
        Error -> Error
    end.

%% A cast to a local process: to an instance, counted (see "Direct calls"), so that a
%% direct call made after it by the same process waits for it; to any other process, the
%% protocol's message.
send_counted(Pid, Src, Msg) ->
    case ets:lookup(?REGISTRY, Pid) of
        [{_, Id}] ->
            case ets:lookup(?REGISTRY, Id) of
                [{_, Pid, {A, _, _}}] ->
                    _ = atomics:add(A, ?PENDING, 1),
                    Pid ! {erpy_function_cast, Src, Msg},
                    ok;
                _ ->
                    Pid ! {erpy_function, cast, Src, Msg},
                    ok
            end;
        [] ->
            Pid ! {erpy_function, cast, Src, Msg},
            ok
    end.

%% What call/3 needs of an instance: {Pid, Id, Atomics, Key, ReqOpts} when it takes
%% direct calls, its pid when not (not yet, or not on this node), or error. The last
%% direct entry a process used is kept in its dictionary (one, so nothing grows): an
%% instance's entry does not change while it lives, and a restarted one is a new process.
entry(Id) when is_binary(Id) ->
    case get(?LAST) of
        {Pid, Id, _, _, _} = Entry ->
            case is_process_alive(Pid) of
                true -> Entry;
                false -> registry_entry(Id)
            end;
        _ ->
            registry_entry(Id)
    end;
entry(Pid) when is_pid(Pid), node(Pid) =:= node() ->
    try ets:lookup(?REGISTRY, Pid) of
        [{_, Id}] ->
            case entry(Id) of
                {Pid, _, _, _, _} = Entry -> Entry;
                _ -> Pid
            end;
        [] -> Pid
    catch error:badarg -> Pid
    end;
entry(Pid) when is_pid(Pid) ->
    Pid;
entry(_) ->
    error.

registry_entry(Id) ->
    try ets:lookup(?REGISTRY, Id) of
        [{_, Pid, Direct}] ->
            case is_process_alive(Pid) of
                true when Direct =:= undefined -> Pid;
                true ->
                    {A, Key, ReqOpts} = Direct,
                    Entry = {Pid, Id, A, Key, ReqOpts},
                    _ = put(?LAST, Entry),
                    Entry;
                false -> error
            end;
        [] -> error
    catch error:badarg -> error
    end.

%% A call run in the caller's process when it gets the turn of an idle instance; else
%% (or when the call's timeout is longer than the instance's, which bounds how long a
%% direct caller may hold the turn) the process path.
direct_call(Pid, Id, A, Key, ReqOpts, Src, Msg, Timeout)
  when is_integer(Timeout), Timeout =< map_get(timeout, ReqOpts), Pid =/= self() ->
    T = token(),
    case atomics:compare_exchange(A, ?TURN, 0, T) of
        ok ->
            case atomics:get(A, ?PENDING) =:= 0 andalso
                process_info(Pid, message_queue_len) =:= {message_queue_len, 0} of
                true ->
                    direct_run(Pid, Id, A, T, Key, ReqOpts, Src, Msg, Timeout);
                false ->
                    release(A, T, Pid),
                    gen_call(Pid, {erpy_function, call, Src, Msg}, Timeout)
            end;
        _ ->
            gen_call(Pid, {erpy_function, call, Src, Msg}, Timeout)
    end;
direct_call(Pid, _Id, _A, _Key, _ReqOpts, Src, Msg, Timeout) ->
    gen_call(Pid, {erpy_function, call, Src, Msg}, Timeout).

direct_run(Pid, Id, A, T, Key, ReqOpts, Src, Msg, Timeout) ->
    Opts = case ReqOpts of
               #{timeout := Timeout} -> ReqOpts;
               _ -> ReqOpts#{timeout := Timeout}
           end,
    %% The instance's context for callbacks: read by host/1 when one comes.
    Outer = put(?CTX, {direct, Pid, Id}),
    Answer = try
                 Answer0 = py_answer(erpy:call(?PY, <<"erlang_call">>, call_args(Key, Src, Msg),
                                               Opts)),
                 %% The instance died meanwhile: an error, as on the process path (what
                 %% the handler did is not the restarted instance's state).
                 case is_process_alive(Pid) of
                     true -> Answer0;
                     false -> {error, {exit, instance_down}}
                 end
             after
                 _ = case Outer of
                         undefined -> erase(?CTX);
                         _ -> put(?CTX, Outer)
                     end,
                 release(A, T, Pid)
             end,
    case Answer of
        {ok, Reply} when is_binary(Reply) -> {reply, Reply};
        {ok, noreply} -> noreply;
        {ok, Other} -> {error, {bad_reply, Other}};
        {lost, Why} ->
            %% As on the process path: the instance restarts, and this call fails.
            Pid ! {erpy_function_lost, Why},
            {error, {worker_lost, Why}};
        {error, Why} ->
            _ = atomics:add(A, ?DIRECT_ERRORS, 1),
            {error, Why}
    end.

%% erpy.function.erlang_call's arguments: the source only when not the default one
%% ({Node, <<"erlang">>}), which Python keeps; it answers a reply as a bare binary.
call_args(Key, default, Msg) -> [Key, Msg];
call_args(Key, Src, Msg) -> [Key, Msg, Src].

src(default) -> {node_id(), <<"erlang">>};
src(Src) -> Src.

%% The direct caller's release: hands the turn to the instance process if it waits.
release(A, T, Pid) ->
    case atomics:compare_exchange(A, ?TURN, T, 0) of
        ok -> ok;
        Neg when Neg =:= -T ->
            case atomics:compare_exchange(A, ?TURN, -T, -1) of
                ok -> Pid ! {erpy_function_turn, T}, ok;
                _ -> ok
            end;
        _ ->
            %% Taken back by the instance after its wait ran out.
            ok
    end.

%% A handler run by the instance process: with the turn.
turn_py(Fun, Args, #st{atomics = undefined} = St) ->
    py(Fun, Args, St);
turn_py(Fun, Args, #st{atomics = A} = St) ->
    take_turn(St),
    try py(Fun, Args, St)
    after atomics:put(A, ?TURN, 0)
    end.

take_turn(#st{atomics = A} = St) ->
    case atomics:compare_exchange(A, ?TURN, 0, -1) of
        ok -> ok;
        T when T > 0 ->
            case atomics:compare_exchange(A, ?TURN, T, -T) of
                ok -> wait_turn(St, T);
                _ -> take_turn(St)
            end
    end.

%% Waits for the direct caller with token T to hand the turn over; if it dies first, takes
%% the turn back once Python no longer runs its call.
wait_turn(#st{atomics = A, timeout = Timeout} = St, T) ->
    Deadline = erpy_deadline:at(Timeout + ?TURN_GRACE_MS),
    Mon = erlang:monitor(process, holder(T)),
    receive
        {erpy_function_turn, T} ->
            erlang:demonitor(Mon, [flush]),
            ok;
        {'DOWN', Mon, process, _, _} ->
            %% Its call may still run in Python until its interrupt lands.
            calls_ended(St, Deadline),
            take_back(A, T)
    after erpy_deadline:remaining(Deadline) ->
        %% A live holder gives it back within the timeout.
        erlang:demonitor(Mon, [flush]),
        take_back(A, T)
    end.

%% The turn back from a holder that is gone, unless it was handed over just now.
take_back(A, T) ->
    case atomics:compare_exchange(A, ?TURN, -T, -1) of
        ok -> ok;
        _ -> receive {erpy_function_turn, T} -> ok end
    end.

%% Until Python runs no call of this instance (or the deadline, erpy_deadline).
calls_ended(#st{key = Key} = St, Deadline) ->
    case py(<<"erlang_running">>, [Key], St) of
        {ok, N} when is_integer(N), N > 0 ->
            case erpy_deadline:remaining(Deadline) of
                0 -> ok;
                _ -> timer:sleep(2), calls_ended(St, Deadline)
            end;
        _ ->
            ok
    end.

%% A direct caller's token: its pid as a positive integer (wait_turn/2 monitors the holder
%% of a turn through it), made once per process. A local pid is <0.Id.Serial>.
token() ->
    case get(?TOKEN) of
        undefined ->
            ["<0", Id, Serial] = string:lexemes(pid_to_list(self()), ".>"),
            T = (list_to_integer(Id) bsl 32) bor list_to_integer(Serial) + 1,
            put(?TOKEN, T),
            T;
        T ->
            T
    end.

holder(T) ->
    N = T - 1,
    list_to_pid("<0." ++ integer_to_list(N bsr 32) ++ "." ++ integer_to_list(N band 16#ffffffff) ++ ">").

dest(Id) when is_binary(Id) ->
    case whereis(Id) of
        undefined -> {error, {no_instance, Id}};
        Pid -> {ok, Pid}
    end;
dest(Other) ->
    {ok, Other}.

gen_call(Dest, Req, Timeout) ->
    CallTimeout = case Timeout of
                      infinity -> infinity;
                      T -> T + 1000
                  end,
    try gen_server:call(Dest, Req, CallTimeout)
    catch exit:{Why, _} -> {error, call_failure(Why)}
    end.

call_failure({nodedown, N}) -> {nodedown, N};
call_failure(noproc) -> noproc;
call_failure(timeout) -> timeout;
call_failure(Why) -> {exit, Why}.

%% Delayed casts: arm one timer for the earliest due; fire every one that is due, in
%% order of due time and then of request.
arm(#st{timer = undefined} = St) ->
    case gb_trees:is_empty(St#st.delayed) of
        true -> St;
        false ->
            {{Due, _}, _} = gb_trees:smallest(St#st.delayed),
            St#st{timer = erlang:start_timer(Due, self(), erpy_function_delayed, [{abs, true}])}
    end;
arm(St) ->
    St.

fire(St) ->
    Now = erlang:monotonic_time(millisecond),
    case gb_trees:is_empty(St#st.delayed) of
        true -> St;
        false ->
            case gb_trees:take_smallest(St#st.delayed) of
                {{Due, _}, {Alias, Msg}, Rest} when Due =< Now ->
                    Ctx = get(?CTX),
                    case with_target(Alias, Ctx, fun(T) -> send_cast(T, Msg, Ctx) end) of
                        ok -> ok;
                        {error, Why} ->
                            logger:warning("erpy_function ~ts: delayed cast to ~ts dropped: ~tp",
                                           [St#st.id, Alias, Why],
                                           #{domain => [erpy, function]})
                    end,
                    fire(St#st{delayed = Rest});
                _ ->
                    St
            end
    end.

start_mnesia() ->
    case mnesia:system_info(is_running) of
        yes -> ok;
        _ ->
            case application:get_env(erpy, function_store_dir) of
                {ok, Dir} -> ok = application:set_env(mnesia, dir, Dir);
                undefined -> ok
            end,
            case application:get_env(mnesia, dir) of
                {ok, _} ->
                    %% A disc schema once; `already_exists` when the directory has one.
                    case mnesia:create_schema([node()]) of
                        ok -> ok;
                        {error, {_, {already_exists, _}}} -> ok;
                        {error, Why} -> throw({store, {create_schema, Why}})
                    end;
                undefined ->
                    ok
            end,
            case application:ensure_all_started(mnesia) of
                {ok, _} -> ok;
                {error, Why2} -> throw({store, Why2})
            end
    end.

resolve(Pid) when is_pid(Pid) -> {ok, Pid};
resolve(Id) when is_binary(Id) ->
    case whereis(Id) of
        undefined -> error;
        Pid -> {ok, Pid}
    end;
resolve(_) -> error.

node_id() ->
    atom_to_binary(node(), utf8).

to_bin(B) when is_binary(B) -> {ok, B};
to_bin(L) when is_list(L) ->
    try {ok, iolist_to_binary(L)}
    catch error:_ ->
        try unicode:characters_to_binary(L) of
            B when is_binary(B) -> {ok, B};
            _ -> error
        catch error:_ -> error
        end
    end;
to_bin(_) -> error.

default_timeout() ->
    application:get_env(erpy, timeout, 5000).
