%% A pool of Python nodes (node mode): requests go round robin to the Python nodes that
%% are up, as `erpc:call(Node, 'erpy.service', F, Args)`; Erlang distribution is the
%% transport, so the nodes can be on other hosts. A node that goes down fails only the
%% requests in flight on it ({error, {node_down, Node}}), is dropped, and rejoins when it
%% answers again. With `start => N` the pool also runs N Python nodes on this host itself
%% (erpy.node's main(), as `python3 -m erpy.node` runs it), restarting any that exits.
%%
%% The local Erlang node must be distributed (`erl -name/-sname`, or net_kernel:start/1).
-module(erpy_node_pool).
-behaviour(gen_server).
-behaviour(erpy_transport).
-compile({no_auto_import, [nodes/1]}).  % nodes/1 below is this pool's

-export([start_link/2, request/3, nodes/1, stop/1]).
-export([prepare/1, child_specs/2, request/4, request_worker/3, checkout/2, checkin/1, info/1, interpreter/1, reactor/5]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-define(KEY(Pool), {?MODULE, Pool}).
-define(RETRY_MS, 1000).
-define(START_WAIT_MS, 15000).

-type request() :: erpy_request:t().
-type worker() :: {erpy_node_worker, atom(), node(), pos_integer()}.
-export_type([request/0, worker/0]).

%% API.

%% @doc Starts the pool server of `Pool`. Options: `nodes` (Python nodes to use, default
%% []), `start` (how many Python nodes to run on this host; default 0 when `nodes` is
%% given, else `size`, default 2), and for started nodes `python`, `venv`,
%% `requirements`, `pythonpath` as the other modes, plus `node_args` (extra
%% `erpy.node` arguments) and `tls` (TLS distribution, tls_args/1).
-spec start_link(atom(), map()) -> {ok, pid()} | {error, term()}.
start_link(Pool, Opts) when is_atom(Pool), is_map(Opts) ->
    gen_server:start_link(?MODULE, {Pool, Opts}, []).

%% erpy_transport. The handle is #{name := Pool, ...}.

-spec prepare(map()) -> {ok, map()} | {error, term()}.
prepare(Opts) ->
    case erpy_config:no_rlimits(Opts) of
        %% What started nodes run (erpy_config:pool_opts/1 found both): kept under a key
        %% of this module's, so that init/1 need not find them again.
        ok -> {ok, Opts#{local_python => {maps:get(python, Opts), maps:get(pythonpath, Opts)}}};
        Error -> Error
    end.

-spec child_specs(atom(), map()) -> {supervisor:sup_flags(), [supervisor:child_spec()]}.
child_specs(Pool, Opts) ->
    {#{strategy => one_for_one, intensity => 5, period => 10},
     [#{id => pool, start => {?MODULE, start_link, [Pool, Opts]}, type => worker}]}.

-spec interpreter(term()) -> shared | per_worker.
interpreter(_Handle) -> per_worker.

-spec info(map()) -> #{mode := node, size := non_neg_integer(), atom() => term()}.
info(#{name := Pool}) ->
    Up = nodes(Pool),
    %% `size`: the nodes up; `configured`: those it was given or started (the others are
    %% starting, restarting or unreachable).
    Configured = case persistent_term:get(?KEY(Pool), undefined) of
                     {Tab, _, _, _, _} -> ets:lookup_element(Tab, configured, 2);
                     undefined -> length(Up)
                 end,
    #{mode => node, size => length(Up), nodes => Up, configured => Configured}.

%% @doc Runs one request on one of the pool's nodes, in the caller's process. With no
%% node up (the pool is restarting its nodes, or cannot reach them) the request waits for
%% one until its timeout, as a request in the other modes waits for a worker:
%% {error, timeout} if none came; {error, {no_nodes, Pool}} at once only for a pool that
%% has no node at all. A request
%% larger than the pool's `max_message_size` (erlang:external_size/1) is not sent, a
%% result larger than it is refused by the Python node: {error, {message_too_large,
%% Size, Max}}. The result comes back as its external format in a binary and is decoded
%% here under the pool's policy (erpy_policy: no new atoms, size, funs). Python's
%% erlang.call/apply/send in the request's code come to this process, which runs them
%% under the same policy. A caller that gives up (timeout) or dies interrupts the
%% Python call.
-spec request(atom(), request(), timeout()) -> erpy_transport:result().
request(Pool, Req, Timeout) ->
    request(#{name => Pool}, Req, Timeout, #{}).

-spec request(map(), request(), timeout(), erpy:call_opts()) -> erpy_transport:result().
request(#{name := Pool}, #{result := handle}, _Timeout, _Opts) ->
    %% Handles are Python objects living in this VM: embedded mode only.
    {error, {not_supported, {handle, Pool}}};
request(#{name := Pool}, Req, Timeout, _Opts) ->
    case persistent_term:get(?KEY(Pool), undefined) of
        undefined ->
            {error, {no_pool, Pool}};
        {Tab, Counter, Server, Max, Policy} ->
            Deadline = erpy_deadline:at(Timeout),
            case node_for(Pool, Tab, Counter, Server, Deadline) of
                {ok, Node} -> call(Pool, Node, Req, erpy_deadline:remaining(Deadline), Server, Max, Policy, undefined);
                Error -> Error
            end
    end.

%% @doc Holds a worker of the pool: a namespace on one of its Python nodes, where exec
%% state persists across request_worker/3 calls until checkin/1 or the holder's death
%% (the pool monitors the holder). The node is chosen round robin; with none up, as
%% request/3.
-spec checkout(atom() | map(), timeout()) -> {ok, worker()} | {error, erpy:error_reason()}.
checkout(Pool, Timeout) when is_atom(Pool) ->
    checkout(#{name => Pool}, Timeout);
checkout(#{name := Pool}, Timeout) ->
    case persistent_term:get(?KEY(Pool), undefined) of
        undefined ->
            {error, {no_pool, Pool}};
        {Tab, Counter, Server, _Max, _Policy} ->
            Deadline = erpy_deadline:at(Timeout),
            case node_for(Pool, Tab, Counter, Server, Deadline) of
                {ok, Node} ->
                    %% The Python node monitors the holder too: the session goes
                    %% with it even if this pool is gone.
                    case erpc_call(Node, session_open, [self()], erpy_deadline:remaining(Deadline), Server, undefined) of
                        {ok, Session} ->
                            ok = gen_server:call(Server, {hold, self(), Node, Session}),
                            {ok, {erpy_node_worker, Pool, Node, Session}};
                        Error ->
                            Error
                    end;
                Error ->
                    Error
            end
    end.

%% @doc Gives a held worker back: its namespace is dropped.
-spec checkin(worker()) -> ok.
checkin({erpy_node_worker, Pool, Node, Session}) ->
    case persistent_term:get(?KEY(Pool), undefined) of
        undefined -> ok;
        {_, _, Server, _, _} ->
            ok = gen_server:call(Server, {release, Node, Session}),
            %% Synchronous: the namespace is gone when checkin returns.
            _ = erpc_call(Node, session_close, [Session], 5000, Server, undefined),
            ok
    end.

%% @doc Runs one request in a held worker's namespace.
-spec request_worker(worker(), request(), timeout()) -> erpy_transport:result().
request_worker({erpy_node_worker, Pool, _, _}, #{result := handle}, _Timeout) ->
    {error, {not_supported, {handle, Pool}}};
request_worker({erpy_node_worker, Pool, Node, _Session} = Worker, Req, Timeout) ->
    case persistent_term:get(?KEY(Pool), undefined) of
        undefined -> {error, {no_pool, Pool}};
        {_, _, Server, Max, Policy} -> call(Pool, Node, Req, Timeout, Server, Max, Policy, Worker)
    end;
request_worker(Other, _Req, _Timeout) ->
    {error, {badarg, {worker, Other}}}.

%% @doc The pool's nodes that are up now.
-spec nodes(atom()) -> [node()].
nodes(Pool) ->
    case persistent_term:get(?KEY(Pool), undefined) of
        undefined -> [];
        {Tab, _, _, _, _} -> [{up, Up}] = ets:lookup(Tab, up), tuple_to_list(Up)
    end.

-spec stop(atom()) -> ok.
stop(Pool) ->
    case persistent_term:get(?KEY(Pool), undefined) of
        undefined -> ok;
        {_, _, Server, _, _} -> gen_server:stop(Server)
    end.

%% gen_server.

-type state() :: map().

-spec init({atom(), map()}) -> {ok, state()} | {stop, term()}.
init({Pool, Opts}) ->
    process_flag(trap_exit, true),
    case is_alive() of
        false ->
            {stop, not_distributed};
        true ->
            ok = net_kernel:monitor_nodes(true, [{node_type, all}]),
            Tab = ets:new(?MODULE, [set, public, {read_concurrency, true}]),
            ets:insert(Tab, {up, {}}),
            Max = maps:get(max_message_size, Opts,
                           application:get_env(erpy, max_message_size, 10485760)),
            Given = maps:get(nodes, Opts, []),
            Count = maps:get(start, Opts, case Given of
                                              [] -> maps:get(size, Opts, 2);
                                              _ -> 0
                                          end),
            ets:insert(Tab, {configured, length(Given) + Count}),
            S0 = #{pool => Pool, tab => Tab, opts => Opts, nodes => Given, up => [],
                   ports => #{}, held => #{}, max => Max, waiters => []},
            %% The Python nodes are started first: their start is most of the pool's, and
            %% what is left to do here overlaps it.
            case spawn_local(Count, S0) of
                {ok, Names, S1} ->
                    Policy = erpy_policy:new(Pool, Opts#{max_message_size => Max}),
                    persistent_term:put(?KEY(Pool), {Tab, atomics:new(1, []), self(), Max, Policy}),
                    ok = erpy_transport:register(Pool, ?MODULE,
                                                 #{name => Pool, pid => self(), max_message_size => Max,
                                                   policy => Policy}),
                    case await_local(Names, S1) of
                        {ok, S2} ->
                            S3 = lists:foldl(fun(N, S) -> connect(N, S) end, start_later(S2),
                                             maps:get(nodes, S2) -- maps:get(later, S2, [])),
                            erlang:send_after(?RETRY_MS, self(), retry),
                            {ok, S3};
                        {error, Why} ->
                            persistent_term:erase(?KEY(Pool)),
                            ok = erpy_transport:unregister(Pool),
                            {stop, Why}
                    end;
                {error, Why} ->
                    {stop, Why}
            end
    end.

-spec handle_call(term(), gen_server:from(), state()) -> {reply, term(), state()}.
handle_call(nodes, _From, S) ->
    {reply, maps:get(up, S), S};
handle_call({await_node, _Deadline}, _From, #{up := [_ | _]} = S) ->
    {reply, ok, S};
handle_call({await_node, _Deadline}, _From, #{nodes := [], pool := Pool} = S) ->
    {reply, {error, {no_nodes, Pool}}, S};
handle_call({await_node, Deadline}, From, #{waiters := Waiters} = S) ->
    %% Answered when a node comes up (add/2). Callers that gave up meanwhile (their
    %% deadline passed) are forgotten here, so the list stays as long as the live ones.
    Now = erlang:monotonic_time(millisecond),
    Live = [W || {_, D} = W <- Waiters, D =:= infinity orelse D > Now],
    {noreply, S#{waiters := [{From, Deadline} | Live]}};
handle_call({hold, Holder, Node, Session}, _From, #{held := Held} = S) ->
    Ref = erlang:monitor(process, Holder),
    {reply, ok, S#{held := Held#{Ref => {Node, Session}}}};
handle_call({release, Node, Session}, _From, #{held := Held} = S) ->
    case [R || {R, {N, Se}} <- maps:to_list(Held), N =:= Node, Se =:= Session] of
        [Ref] ->
            erlang:demonitor(Ref, [flush]),
            {reply, ok, S#{held := maps:remove(Ref, Held)}};
        [] ->
            {reply, ok, S}
    end;
handle_call(_Req, _From, S) ->
    {reply, {error, unknown_call}, S}.

-spec handle_cast(term(), state()) -> {noreply, state()}.
handle_cast({down, Node}, S) ->
    %% A caller saw noconnection: drop the node now rather than at the nodedown message.
    {noreply, drop(Node, S)};
handle_cast(_Msg, S) ->
    {noreply, S}.

-spec handle_info(term(), state()) -> {noreply, state()}.
handle_info({nodeup, Node, _Info}, S) ->
    case lists:member(Node, maps:get(nodes, S)) of
        true -> {noreply, add(Node, S)};
        false -> {noreply, S}
    end;
handle_info({nodedown, Node, _Info}, S) ->
    {noreply, drop(Node, S)};
handle_info(retry, #{nodes := Nodes, up := Up} = S) ->
    %% Pinging a node on an unreachable host can take seconds: not in this process.
    case Nodes -- Up of
        [] -> ok;
        Down -> spawn_link(fun() -> [net_adm:ping(N) || N <- Down] end)
    end,
    erlang:send_after(?RETRY_MS, self(), retry),
    {noreply, S};
handle_info({Port, {data, {_, Line}}}, #{ports := Ports, pool := Pool} = S) when is_port(Port) ->
    case Ports of
        #{Port := Node} ->
            %% A started node says when it listens: connect now rather than at the
            %% next retry (requests may be waiting for it).
            case binary:match(Line, <<" ready on port ">>) of
                nomatch -> ok;
                _ -> spawn_link(fun() -> net_adm:ping(Node) end)
            end,
            logger:notice("~ts", [Line], #{domain => [erpy, node], pool => Pool, node => Node});
        _ -> ok
    end,
    {noreply, S};
handle_info({Port, {exit_status, Status}}, #{ports := Ports, pool := Pool} = S) ->
    case maps:take(Port, Ports) of
        {Node, Rest} ->
            logger:warning("erpy node pool ~p: Python node ~p exited with status ~p; restarting it",
                           [Pool, Node, Status], #{domain => [erpy, node]}),
            S1 = drop(Node, S#{ports := Rest}),
            erlang:send_after(500, self(), {restart, Node}),
            {noreply, S1};
        error ->
            {noreply, S}
    end;
handle_info({restart, Node}, S) ->
    case spawn_node(Node, S) of
        {ok, S1} -> {noreply, S1};
        {error, _} ->
            erlang:send_after(?RETRY_MS, self(), {restart, Node}),
            {noreply, S}
    end;
handle_info({'DOWN', Ref, process, _, _}, #{held := Held} = S) ->
    %% A holder died without checkin: its namespace goes.
    case maps:take(Ref, Held) of
        {{Node, Session}, Rest} ->
            close_session(Node, Session),
            {noreply, S#{held := Rest}};
        error ->
            {noreply, S}
    end;
handle_info({'EXIT', _Pid, _Reason}, S) ->
    {noreply, S};
handle_info(_Msg, S) ->
    {noreply, S}.

-spec terminate(term(), state()) -> ok.
terminate(_Reason, #{pool := Pool, ports := Ports}) ->
    persistent_term:erase(?KEY(Pool)),
    ok = erpy_transport:unregister(Pool),
    %% Started nodes run with --exit-on-eof: closing the port ends them.
    [catch port_close(P) || P <- maps:keys(Ports)],
    ok.

%% A node's Python runs on another host as often as not: fds do not travel there.
-spec reactor(map(), atom(), non_neg_integer(), map(), map()) -> {error, term()}.
reactor(_Handle, _Pool, Fd, _Info, _Config) ->
    erpy_reactor:close_fd(Fd),
    {error, {not_supported, {reactor, node}}}.

%% Internal.

%% A node for a request: one that is up, else wait (until Deadline) for one to come up.
node_for(Pool, Tab, Counter, Server, Deadline) ->
    case pick(Tab, Counter, Server) of
        none ->
            %% pick/3's {down, Node} casts reach the server before this call.
            try gen_server:call(Server, {await_node, Deadline}, erpy_deadline:remaining(Deadline)) of
                ok -> node_for(Pool, Tab, Counter, Server, Deadline);
                {error, _} = Error -> Error
            catch
                exit:{timeout, _} -> {error, timeout};
                exit:_ -> {error, {no_pool, Pool}}
            end;
        Node ->
            {ok, Node}
    end.

%% Round robin over the nodes that are up. A node whose connection is already gone (the
%% pool has not heard yet) is skipped, not called: erpc would try to reconnect, and the
%% request, which never ran there, would fail as if it had been in flight.
pick(Tab, Counter, Server) ->
    case ets:lookup(Tab, up) of
        [{up, {}}] -> none;
        [{up, Up}] -> pick(Up, atomics:add_get(Counter, 1, 1), tuple_size(Up), Server)
    end.

pick(_Up, _I, 0, _Server) ->
    none;
pick(Up, I, Left, Server) ->
    Node = element(1 + (I rem tuple_size(Up)), Up),
    case lists:member(Node, erlang:nodes(connected)) of
        true ->
            Node;
        false ->
            gen_server:cast(Server, {down, Node}),
            pick(Up, I + 1, Left - 1, Server)
    end.

call(Pool, Node, Req, Timeout, Server, Max, Policy, Worker) ->
    case erlang:external_size(Req) of
        Size when Size > Max ->
            {error, {message_too_large, Size, Max}};
        _ ->
            Session = case Worker of
                          {erpy_node_worker, _, _, S} -> S;
                          undefined -> undefined
                      end,
            Ctx = erpy_policy:request_ctx(Policy, self(), Req),
            %% Python's callbacks come to this alias; once it is gone, a late one (after a
            %% timeout) is dropped by the runtime, not left here.
            Alias = alias([explicit_unalias]),
            Cb = #{ctx => Ctx, pool => Pool, worker => Worker, node => Node,
                   alias => Alias, max => Max},
            Sent = erpy_request:with(erpy_request:for_caller(Req, self(), Timeout),
                                     #{max_size => Max, session => Session, reply_to => Alias}),
            try erpc_call(Node, request, [Sent], Timeout, Server, Cb) of
                {ok, Bin} -> decode_result(Ctx, Bin);
                {python_error, Bin} -> decode_error(Ctx, Bin);
                Error -> Error
            after
                unalias(Alias),
                flush_callbacks(Alias),
                erpy_policy:done(Ctx)
            end
    end.

%% The result and the error map come as their external format in a binary: decoded under
%% the pool's policy, so nothing Python returns makes an atom or passes the size limit.
decode_result(Ctx, Bin) when is_binary(Bin) ->
    erpy_policy:decode(Ctx, Bin);
decode_result(_Ctx, _Other) ->
    {error, {undecodable, <<"the Python node answered with a term, not its external format">>}}.

decode_error(Ctx, Bin) ->
    case erpy_policy:decode(Ctx, Bin) of
        {ok, #{type := <<"SessionClosed">>}} -> {error, {worker_exit, session_closed}};
        {ok, PyError} -> {error, PyError};
        {error, _} = Error -> Error
    end.

%% {ok, Value} | {python_error, Bin} (binary results) | {error, Reason}.
erpc_call(Node, F, Args, Timeout, Server, Cb) ->
    try execute(Node, F, Args, Timeout, Cb) of
        Result -> {ok, Result}
    catch
        error:{exception, Bin, _} when is_binary(Bin), Cb =/= undefined -> {python_error, Bin};
        error:{exception, {message_too_large, _, _} = TooLarge, _} -> {error, TooLarge};
        error:{exception, {fragment_limit, _, _} = Limit, _} -> {error, Limit};
        error:{exception, #{type := <<"SessionClosed">>}, _} -> {error, {worker_exit, session_closed}};
        error:{exception, #{type := _} = PyError, _} -> {error, PyError};
        %% An error map the node could not encode, as the other modes answer it.
        error:{exception, python_error, _} -> {error, unencodable_error};
        error:{erpc, timeout} -> {error, timeout};
        error:{erpc, noconnection} ->
            gen_server:cast(Server, {down, Node}),
            {error, {node_down, Node}};
        error:{erpc, Reason} -> {error, Reason};
        Class:Reason -> {error, {Class, Reason}}
    end.

%% erpc:call(Node, 'erpy.service', F, Args, Timeout), inlined for two things erpc leaves
%% out: Python's callbacks, answered while we wait (`Cb`), and a timeout that comes
%% before the node's spawn reply: erpc abandons the request and our node never tells the
%% Python node (it does, with a DEMONITOR_P, once it has the reply), so we tell it
%% ourselves and it interrupts the call.
execute(Node, F, Args, Timeout, Cb) ->
    Res = make_ref(),
    ReqId = spawn_request(Node, erpc, execute_call, [Res, 'erpy.service', F, Args],
                          [{reply, error_only}, monitor]),
    wait(Node, ReqId, Res, Cb, erpy_deadline:at(Timeout)).

wait(Node, ReqId, Res, Cb, Deadline) ->
    Alias = case Cb of
                #{alias := A} -> A;
                undefined -> undefined
            end,
    receive
        {spawn_reply, ReqId, error, Reason} -> error({erpc, Reason});
        {'DOWN', ReqId, process, _, Reason} -> result(Res, Reason);
        {erpy_node_callback, Alias, ReplyTo, CbId, Kind, M, F, ArgsBin} when Alias =/= undefined ->
            answer(Cb, ReplyTo, CbId, Kind, M, F, ArgsBin),
            case erpy_deadline:remaining(Deadline) of
                0 -> give_up(Node, ReqId, Res);
                _ -> wait(Node, ReqId, Res, Cb, Deadline)
            end
    after erpy_deadline:remaining(Deadline) ->
        give_up(Node, ReqId, Res)
    end.

give_up(Node, ReqId, Res) ->
    case spawn_request_abandon(ReqId) of
        true ->
            ok = erpc:cast(Node, 'erpy.service', cancel, [ReqId]),
            error({erpc, timeout});
        false ->
            case erlang:demonitor(ReqId, [info]) of
                true ->
                    error({erpc, timeout});
                false ->
                    receive
                        {spawn_reply, ReqId, error, Reason} -> error({erpc, Reason});
                        {'DOWN', ReqId, process, _, Reason} -> result(Res, Reason)
                    after 0 -> error({erpc, timeout})
                    end
            end
    end.

%% One callback from Python, run here (the caller's process) under the pool's policy and
%% answered to the Python mailbox that waits for it. For send, ArgsBin holds [Dest, Msg].
answer(#{node := Node, max := Max} = Cb, ReplyTo, CbId, Kind, M, F, ArgsBin)
  when is_pid(ReplyTo), node(ReplyTo) =:= Node, is_binary(ArgsBin) ->
    {Status, Value} = case run_callback(Cb, Kind, M, F, ArgsBin) of
                          {ok, V} -> {ok, V};
                          {error, R} -> {error, R}
                      end,
    %% The answer obeys the pool's size limit too (the Python node would refuse it).
    Reply = case erlang:external_size(Value) of
                Size when Size > Max -> {erpy_callback_reply, CbId, error, {message_too_large, Size, Max}};
                _ -> {erpy_callback_reply, CbId, Status, Value}
            end,
    ReplyTo ! Reply,
    ok;
answer(_Cb, _ReplyTo, _CbId, _Kind, _M, _F, _ArgsBin) ->
    %% Not from the node running the request: nobody to answer.
    ok.

run_callback(#{ctx := Ctx, pool := Pool, worker := Worker}, send, _M, _F, ArgsBin) ->
    case erpy_policy:decode(Ctx, ArgsBin) of
        {ok, [Dest, Msg]} -> erpy_policy:run_callback(Ctx, Pool, Worker, send, Dest, undefined, {check, [Msg]});
        {ok, _} -> {error, {badarg, send}};
        {error, _} = Error -> Error
    end;
run_callback(#{ctx := Ctx, pool := Pool, worker := Worker}, Kind, M, F, ArgsBin)
  when Kind =:= call; Kind =:= apply ->
    erpy_policy:callback(Ctx, Pool, Worker, Kind, M, F, ArgsBin);
run_callback(_Cb, Kind, _M, _F, _ArgsBin) ->
    {error, {badarg, Kind}}.

%% Callbacks that reached the alias before it went inactive: no one will answer them
%% (the Python call has ended or is being interrupted).
flush_callbacks(Alias) ->
    receive
        {erpy_node_callback, Alias, _, _, _, _, _, _} -> flush_callbacks(Alias)
    after 0 -> ok
    end.



result(Res, {Res, return, Value}) -> Value;
result(Res, {Res, throw, Value}) -> throw(Value);
result(Res, {Res, exit, Reason}) -> exit({exception, Reason});
result(Res, {Res, error, Reason, Stack}) -> error({exception, Reason, Stack});
result(Res, {Res, error, {erpc, _} = Reason}) -> error(Reason);
result(_Res, noconnection) -> error({erpc, noconnection});
result(_Res, Reason) -> exit({signal, Reason}).

close_session(Node, Session) ->
    catch erpc:cast(Node, 'erpy.service', session_close, [Session]),
    ok.

connect(Node, S) ->
    case net_kernel:connect_node(Node) of
        true -> add(Node, S);
        _ -> S
    end.

add(Node, #{up := Up, waiters := Waiters} = S) ->
    case lists:member(Node, Up) of
        true ->
            S;
        false ->
            S1 = publish(S#{up := Up ++ [Node], waiters := []}),
            [gen_server:reply(From, ok) || {From, _} <- lists:reverse(Waiters)],
            S1
    end.

drop(Node, #{up := Up, held := Held} = S) ->
    %% Held workers on it lose their namespace with it (requests get node_down).
    Gone = maps:filter(fun(_, {N, _}) -> N =:= Node end, Held),
    [erlang:demonitor(R, [flush]) || R <- maps:keys(Gone)],
    publish(S#{up := lists:delete(Node, Up), held := maps:without(maps:keys(Gone), Held)}).

publish(#{tab := Tab, up := Up} = S) ->
    ets:insert(Tab, {up, list_to_tuple(Up)}),
    S.

%% Python nodes on this host.

%% The pool's nodes are named here and the first is started: {ok, [First], S}, its port
%% in S and the others' names in S's `later`; await_local/2 waits for the first.
spawn_local(0, S) ->
    {ok, [], S};
spawn_local(Count, #{pool := Pool, opts := Opts} = S) ->
    %% Options that came through erpy:start_pool/2 were completed there (prepare/1): not
    %% done twice on the way to the start.
    Completed = case Opts of
                    #{local_python := {Python, Path}} -> {ok, #{python => Python, pythonpath => Path}};
                    _ -> erpy_config:pool_opts(maps:remove(nodes, Opts#{mode => node}))
                end,
    case Completed of
        {ok, Full} ->
            [_, Host] = string:split(atom_to_list(node()), "@"),
            Names = [list_to_atom(lists:concat(["erpy_", Pool, "_", I, "_", os:getpid(), "@", Host]))
                     || I <- lists:seq(1, Count)],
            S1 = S#{opts := maps:merge(Opts, maps:with([python, pythonpath], Full)),
                    nodes := maps:get(nodes, S) ++ Names},
            %% The first node starts alone, the others once it is up (start_later/1), as
            %% a port pool's workers do: the first answer comes sooner, its start not
            %% shared with theirs on the machine's cores.
            [First | Later] = Names,
            case spawn_all([First], S1#{later => Later}) of
                {ok, S2} ->
                    %% Meanwhile, what this VM's first distribution connection would do
                    %% first (its resolver helper starts with the first address lookup;
                    %% the handshake's module loads): then the nodes are connected as soon
                    %% as they listen.
                    _ = spawn(fun() -> prepare_connections(Names) end),
                    {ok, [First], S2};
                {error, _} = Error ->
                    %% Those already started go with their ports (linked to this process).
                    Error
            end;
        {error, _} = Error ->
            Error
    end.

%% The nodes after the first: started now, they join the pool as they connect (their
%% ready line, handle_info/2); one that cannot be started is tried again later.
start_later(#{later := Later} = S) ->
    lists:foldl(fun(Node, Acc) ->
                        case spawn_node(Node, Acc) of
                            {ok, Acc1} -> Acc1;
                            {error, _} ->
                                erlang:send_after(?RETRY_MS, self(), {restart, Node}),
                                Acc
                        end
                end, maps:remove(later, S), Later);
start_later(S) ->
    S.

%% Each started node is connected as soon as it says it listens (its "ready on port"
%% line), not at the next poll, and the nodes are connected side by side.
await_local([], S) ->
    {ok, S};
await_local(Names, #{ports := Ports} = S) ->
    Deadline = erlang:monotonic_time(millisecond) + ?START_WAIT_MS,
    Waiting = maps:filter(fun(_, Node) -> lists:member(Node, Names) end, Ports),
    await_ready(Waiting, #{}, Deadline, S).

spawn_all([], S) ->
    {ok, S};
spawn_all([Node | Rest], S) ->
    case spawn_node(Node, S) of
        {ok, S1} -> spawn_all(Rest, S1);
        {error, _} = Error -> Error
    end.

%% `Waiting`: Port => Node of the nodes that have not said they listen yet; `Connecting`:
%% Port => {Pid, Node} of those being connected (by Pid). What their ports say is logged
%% as handle_info/2 logs it; a port that exits before its node is up fails the start.
await_ready(Waiting, Connecting, _Deadline, S)
  when map_size(Waiting) =:= 0, map_size(Connecting) =:= 0 ->
    {ok, S};
await_ready(Waiting, Connecting, Deadline, #{pool := Pool} = S) ->
    receive
        {Port, {data, {_, Line}}} when is_map_key(Port, Waiting) ->
            Node = maps:get(Port, Waiting),
            logger:notice("~ts", [Line], #{domain => [erpy, node], pool => Pool, node => Node}),
            case binary:match(Line, <<" ready on port ">>) of
                nomatch ->
                    await_ready(Waiting, Connecting, Deadline, S);
                _ ->
                    case lists:member(Node, erlang:nodes(connected)) of
                        true ->
                            %% It connected to this VM itself (--connect).
                            await_ready(maps:remove(Port, Waiting), Connecting, Deadline, add(Node, S));
                        false ->
                            Self = self(),
                            Pid = spawn_link(fun() -> Self ! {node_connected, Port, wait_up(Node, Deadline)} end),
                            await_ready(maps:remove(Port, Waiting), Connecting#{Port => {Pid, Node}},
                                        Deadline, S)
                    end
            end;
        {node_connected, Port, Result} when is_map_key(Port, Connecting) ->
            {{_Pid, Node}, Rest} = maps:take(Port, Connecting),
            case Result of
                ok -> await_ready(Waiting, Rest, Deadline, add(Node, S));
                timeout -> {error, {node_start_timeout, Node}}
            end;
        {Port, {exit_status, Status}} when is_map_key(Port, Waiting) ->
            {error, {node_start_failed, maps:get(Port, Waiting), {exit_status, Status}}};
        {Port, {exit_status, Status}} when is_map_key(Port, Connecting) ->
            {_Pid, Node} = maps:get(Port, Connecting),
            {error, {node_start_failed, Node, {exit_status, Status}}}
    after max(0, Deadline - erlang:monotonic_time(millisecond)) ->
        Late = maps:values(Waiting) ++ [N || {_, N} <- maps:values(Connecting)],
        {error, {node_start_timeout, hd(lists:sort(Late))}}
    end.

prepare_connections(_Names) ->
    _ = [code:ensure_loaded(M) || M <- [dist_util, erpy_request]],
    ok.

%% The node listens (it said so): connected at once, unless its registration is slow to
%% show (then again every 20 ms, until the deadline).
wait_up(Node, Deadline) ->
    case net_kernel:connect_node(Node) of
        true -> ok;
        _ ->
            case erlang:monotonic_time(millisecond) > Deadline of
                true -> timeout;
                false -> timer:sleep(20), wait_up(Node, Deadline)
            end
    end.

spawn_node(Node, #{opts := Opts, ports := Ports} = S) ->
    [_, Host] = string:split(atom_to_list(Node), "@"),
    %% An address as it is (a lookup, even of an address, starts the VM's resolver helper
    %% the first time: milliseconds on the way to the node's start).
    Listen = case inet:parse_ipv4strict_address(Host) of
                 {ok, _} -> Host;
                 {error, _} ->
                     case inet:getaddr(Host, inet) of
                         {ok, Ip} -> inet:ntoa(Ip);
                         {error, _} -> "127.0.0.1"
                     end
             end,
    %% `python3 -m erpy.node` compiles erpy/node.py twice (runpy's copy, then the module):
    %% without bytecode files (PYTHONDONTWRITEBYTECODE) that is most of a node's start.
    Args = ["-c", "import sys; from erpy.node import main; sys.exit(main())",
            "--name", atom_to_list(Node), "--listen", Listen,
            "--allow", "*", "--allow-code", "--exit-on-eof",
            %% It connects to this VM before it says it is ready: sooner than the other way
            %% round, which starts this VM's resolver first (connect/2 remains the fallback).
            "--connect", atom_to_list(node()),
            "--max-message-size", integer_to_list(node_limit(maps:get(max, S)))]
        ++ tls_args(Opts)
        ++ [to_list(A) || A <- maps:get(node_args, Opts, [])],
    %% The cookie goes through the environment, not argv (which `ps` shows).
    Env = [{"PYTHONPATH", maps:get(pythonpath, Opts)},
           {"ERPY_COOKIE", atom_to_list(erlang:get_cookie())},
           {"PYTHONUNBUFFERED", "1"}],
    try open_port({spawn_executable, maps:get(python, Opts)},
                  [{args, Args}, {env, Env}, {line, 4096}, exit_status, stderr_to_stdout,
                   use_stdio, binary]) of
        Port -> {ok, S#{ports := Ports#{Port => Node}}}
    catch
        error:Why -> {error, {python_start_failed, Why}}
    end.

%% TLS distribution of started nodes (doc/multihost.md): `tls => OptFile` (an ssl_dist
%% options file), `tls => #{cert := F, key => F, ca => F, verify => peer | none}`,
%% `tls => none`; by default the VM's own `-ssl_dist_optfile` when it runs
%% `-proto_dist inet_tls` (its nodes could not reach it otherwise), else none.
tls_args(Opts) ->
    case maps:get(tls, Opts, default) of
        none -> [];
        default ->
            case {init:get_argument(proto_dist), init:get_argument(ssl_dist_optfile)} of
                {{ok, [["inet_tls"]]}, {ok, [[File]]}} -> ["--ssl-dist-optfile", File];
                _ -> []
            end;
        #{cert := Cert} = T ->
            ["--tls-cert", to_list(Cert)]
                ++ lists:append([[Flag, to_list(V)] || {K, Flag} <- [{key, "--tls-key"}, {ca, "--tls-ca"},
                                                                     {verify, "--tls-verify"}],
                                                       {ok, V} <- [maps:find(K, T)]]);
        File -> ["--ssl-dist-optfile", to_list(File)]
    end.

%% A started node takes what the pool may send it: requests up to max_message_size, with
%% room for erpc's wrapping and the control message.
node_limit(Max) -> min(max(Max + 65536, 1024), 1 bsl 30).

to_list(B) when is_binary(B) -> binary_to_list(B);
to_list(A) when is_atom(A) -> atom_to_list(A);
to_list(L) when is_list(L) -> L.
