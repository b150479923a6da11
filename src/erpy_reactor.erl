%% The reactor: Python protocols on file descriptors (doc/reactor.md). Erlang accepts a
%% connection (or opens any fd: TCP, UDP, a Unix socket, a pipe) and hands it to a pool;
%% a protocol object made by the pool's factory (python/erpy/reactor.py) handles it.
%%
%% Embedded pools: the fd stays in this VM. One Erlang process per connection owns it
%% (a NIF resource, closed when the process ends however it ends); its enif_select
%% reports to the pool's hub, which submits all the connections ready at once as one
%% light batch job (erpy.reactor._ready on a context thread for each, which re-arms
%% each select itself when the protocol waits again); the protocol runs under the
%% pool's policy, timeout and callbacks like any call. A callback that raises, returns an unknown action or runs
%% past `timeout` closes its connection only: the process ends with {shutdown, Why}.
%%
%% Port pools: the fd goes to a worker process with SCM_RIGHTS over the worker's
%% channel (an abstract Unix socket, checked to belong to that worker); the worker's own
%% poll loop runs the same erpy.reactor code, and a worker that crashes loses its
%% connections, not the VM. Each worker's loop also gets a callback channel (a socket
%% pair): erlang.call/apply/send from its protocols come there, to a process of ours
%% per worker that runs them under the pool's policy.
%%
%% Ownership: handoff/3,4 takes the fd (erpy closes it, also on error); handoff_socket/3
%% duplicates the socket's fd, so the caller keeps its socket and closes it when it
%% likes (it must not read from it meanwhile: {active, false}).
-module(erpy_reactor).

-export([handoff/3, handoff/4, handoff_socket/2, handoff_socket/3, close/1,
         configure/2, valid_factory/1, dup/1]).

%% Called by the transports (erpy_transport's reactor/5), never directly.
-export([embedded/5, port/5, close_fd/1]).
-export_type([conn/0, factory/0]).

%% A connection: in embedded mode the pid of its process (it exits when the connection
%% closes: normal, or {shutdown, Why}); in port mode the worker that has it.
-type conn() :: pid() | {erpy_reactor_port, erpy:pool(), OsPid :: non_neg_integer()}.
%% {Module, Name}: Module.Name() makes a protocol; Module: a module whose import calls
%% erpy.reactor.set_protocol_factory.
-type factory() :: {atom() | binary(), atom() | binary()} | atom() | binary().
-type opts() :: #{factory => factory(), timeout => timeout()}.

-define(CONFIG(Pool), {?MODULE, config, Pool}).
-define(CHANNELS(Pool), {?MODULE, channels, Pool}).
%% The "pool" a port protocol's callbacks nest in: none (see run_port_callback/4).
-define(NO_NESTING, '$erpy_reactor_port_callback').

%% API.

%% @doc Hands `Fd` to `Pool`'s reactor. `Info` (a map, usually with addr, port and type)
%% is the protocol's `client_info`. erpy owns `Fd` from now on and closes it, also when
%% this fails. Options: `factory` (else the pool's `reactor` option, else what Python
%% set with set_protocol_factory), `timeout` (per callback, else the pool's `timeout`).
-spec handoff(erpy:pool(), non_neg_integer(), map()) -> {ok, conn()} | {error, term()}.
handoff(Pool, Fd, Info) ->
    handoff(Pool, Fd, Info, #{}).

-spec handoff(erpy:pool(), non_neg_integer(), map(), opts()) -> {ok, conn()} | {error, term()}.
handoff(Pool, Fd, Info, Opts) when is_integer(Fd), Fd >= 0, is_map(Info), is_map(Opts) ->
    Config = maps:merge(config(Pool), Opts),
    case valid_factory(maps:get(factory, Config, undefined)) of
        false ->
            close_fd(Fd),
            {error, {badarg, factory}};
        true ->
            %% The pool's transport decides where the fd goes (embedded/5, port/5).
            case erpy_transport:lookup(Pool) of
                {ok, Module, Handle} -> Module:reactor(Handle, Pool, Fd, Info, Config);
                error -> close_fd(Fd), {error, {no_pool, Pool}}
            end
    end;
handoff(_Pool, Fd, _Info, _Opts) ->
    {error, {badarg, Fd}}.

%% @doc Hands a copy of a `gen_tcp`/`gen_udp` or `socket` socket's fd to `Pool`: the
%% caller keeps its socket (close it when you like; do not read from it). `Info`
%% defaults to the peer's addr and port and the socket's type.
-spec handoff_socket(erpy:pool(), gen_tcp:socket() | socket:socket()) -> {ok, conn()} | {error, term()}.
handoff_socket(Pool, Socket) ->
    handoff_socket(Pool, Socket, #{}).

-spec handoff_socket(erpy:pool(), gen_tcp:socket() | socket:socket(), opts() | map()) ->
    {ok, conn()} | {error, term()}.
handoff_socket(Pool, Socket, Opts) ->
    case socket_fd(Socket) of
        {ok, Fd} ->
            case dup(Fd) of
                {ok, Copy} ->
                    Info = maps:merge(socket_info(Socket), maps:get(info, Opts, #{})),
                    handoff(Pool, Copy, Info, maps:without([info], Opts));
                Error ->
                    Error
            end;
        Error ->
            Error
    end.

%% @doc A close-on-exec copy of an fd (the caller owns both).
-spec dup(non_neg_integer()) -> {ok, non_neg_integer()} | {error, term()}.
dup(Fd) ->
    erpy_nif:reactor_dup(Fd).

%% @doc Closes an embedded connection (connection_lost runs). Port connections close
%% from their protocol ("close") or their peer.
-spec close(conn()) -> ok.
close(Pid) when is_pid(Pid) ->
    Ref = monitor(process, Pid),
    Pid ! {?MODULE, close},
    receive {'DOWN', Ref, process, Pid, _} -> ok end;
close({erpy_reactor_port, _Pool, _OsPid}) ->
    ok.

%% @doc Called as a pool starts (erpy_pool_sup): its `reactor` and `timeout` options.
-spec configure(erpy:pool(), map()) -> ok.
configure(Pool, Opts) ->
    Config = maps:filter(fun(_, V) -> V =/= undefined end,
                         #{factory => maps:get(reactor, Opts, undefined),
                           timeout => maps:get(timeout, Opts, undefined)}),
    case persistent_term:get(?CONFIG(Pool), undefined) of
        Config -> ok;
        _ -> persistent_term:put(?CONFIG(Pool), Config)
    end,
    _ = persistent_term:erase(?CHANNELS(Pool)),
    ok.

%% @doc Is this a `factory` (or pool option `reactor`)?
-spec valid_factory(term()) -> boolean().
valid_factory(undefined) -> true;
valid_factory({M, F}) -> is_name(M) andalso is_name(F);
valid_factory(M) -> is_name(M).

%% Internal.

is_name(N) when is_atom(N), N =/= undefined -> true;
is_name(N) when is_binary(N), byte_size(N) > 0 -> true;
is_name(_) -> false.

config(Pool) ->
    persistent_term:get(?CONFIG(Pool), #{}).

%% What Python's _factory reads: [M, F], a module name, or false (the pool's own).
spec(#{factory := {M, F}}) -> [name(M), name(F)];
spec(#{factory := M}) -> name(M);
spec(_) -> false.

name(A) when is_atom(A) -> atom_to_binary(A, utf8);
name(B) when is_binary(B) -> B.

timeout(Config) ->
    maps:get(timeout, Config, application:get_env(erpy, timeout, 5000)).

-spec close_fd(non_neg_integer()) -> ok.
close_fd(Fd) ->
    case erpy_nif:reactor_adopt(Fd) of
        {ok, Res} -> erpy_nif:reactor_close(Res);
        _ -> ok
    end.

socket_fd({'$socket', _} = S) ->
    socket:getopt(S, {otp, fd});
socket_fd(S) ->
    inet:getfd(S).

socket_info({'$socket', _} = S) ->
    Type = case socket:getopt(S, {otp, domain}) of
               {ok, local} -> unix;
               _ -> case socket:getopt(S, {socket, type}) of
                        {ok, dgram} -> udp;
                        _ -> tcp
                    end
           end,
    case socket:peername(S) of
        {ok, #{addr := Addr, port := Port}} when is_tuple(Addr) ->
            #{addr => list_to_binary(inet:ntoa(Addr)), port => Port, type => Type};
        _ -> #{type => Type}
    end;
socket_info(S) ->
    Type = case catch erlang:port_info(S, name) of
               {name, "udp_inet"} -> udp;
               {name, "tcp_inet"} -> tcp;
               _ -> unknown
           end,
    case inet:peername(S) of
        {ok, {Addr, Port}} when is_tuple(Addr) ->
            #{addr => list_to_binary(inet:ntoa(Addr)), port => Port, type => Type};
        _ -> #{type => Type}
    end.

%% ---- embedded mode: a process per connection, a hub per pool -------------------------
%%
%% A connection's process owns its fd (its resource: closed when the process ends however
%% it ends) but sees none of its events: its select reports to the pool's hub (one
%% process per pool), which takes every readiness message waiting in its mailbox and
%% submits them as one batch job (erpy_nif:reactor_batch): a context thread runs
%% erpy.reactor._ready(Fd, Event) for each under one GIL hold and re-arms each select
%% itself when its protocol waits again. So the usual event costs a readiness message
%% to a process that is mostly running already, and a share of one NIF call and one job.
%% The connection's process hears only what ends it: {Ref, {ok, close} | {error, Why}}
%% from the batch, {Ref, {error, timeout}} from the hub (the callback ran past its
%% timeout: the batch is cancelled, its other connections go back to the poller), and the
%% batch's callbacks into Erlang, which the hub hands to it to run under the pool's
%% policy (this process is the caller).

-spec embedded(atom(), map(), non_neg_integer(), map(), map()) -> {ok, conn()} | {error, term()}.
embedded(Pool, #{pid := PoolPid} = Handle, Fd, Info, Config) ->
    Caller = self(),
    Ref = make_ref(),
    Timeout = timeout(Config),
    case hub(Pool, PoolPid, Handle) of
        {ok, Hub} ->
            {Pid, Mon} = spawn_monitor(fun() ->
                                               open(Caller, Ref, Pool, PoolPid, Hub, Handle, Fd, Info,
                                                    spec(Config), Timeout)
                                       end),
            receive
                {Ref, Result} ->
                    demonitor(Mon, [flush]),
                    Result;
                {'DOWN', Mon, process, Pid, Why} ->
                    {error, Why}
            end;
        {error, _} = Error ->
            close_fd(Fd),
            Error
    end.

-record(c, {pool, pool_mon, hub, hub_mon, res, fd,
            policy,              % the pool's policy (callbacks)
            ref,                 % tags what the hub and the batches tell this process
            job,                 % the batch whose callbacks ctx serves
            ctx,                 % its policy context, made at its first callback
            closing = false}).   % erpy_reactor:close/1 came while a batch held it

open(Caller, Ref, Pool, PoolPid, Hub, #{policy := Policy}, Fd, Info, Spec, Timeout) ->
    case erpy_nif:reactor_adopt(Fd) of
        {ok, Res} ->
            PoolMon = monitor(process, PoolPid),
            HubMon = monitor(process, Hub),
            C = #c{pool = Pool, pool_mon = PoolMon, hub = Hub, hub_mon = HubMon, res = Res, fd = Fd,
                   policy = Policy, ref = make_ref()},
            ok = erpy_nif:reactor_bind(Res, Hub, C#c.ref, Timeout),
            case python(Pool, Timeout, '_open', [Fd, Info, Pool, Spec]) of
                {ok, Mode} when Mode =:= <<"read">>; Mode =:= <<"write">>; Mode =:= <<"close">> ->
                    Caller ! {Ref, {ok, self()}},
                    next(C, binary_to_existing_atom(Mode));
                {ok, Other} ->
                    Caller ! {Ref, {error, {bad_mode, Other}}},
                    stop(C, {bad_mode, Other});
                {error, Why} ->
                    Caller ! {Ref, {error, Why}},
                    stop(C, Why)
            end;
        {error, Why} ->
            Caller ! {Ref, {error, Why}}
    end.

python(Pool, Timeout, F, Args) ->
    erpy:call('erpy.reactor', F, Args, #{pool => Pool, timeout => Timeout}).

%% Wait for `Mode` (read | write), or close.
next(C, close) ->
    erpy_nif:reactor_close(C#c.res),
    exit(normal);
next(#c{closing = true} = C, _Mode) ->
    stop(C, normal);
next(C, Mode) ->
    case erpy_nif:reactor_select(C#c.res, Mode) of
        ok -> wait(C);
        {error, Why} -> stop(C, Why)
    end.

wait(#c{res = Res, ref = Ref, pool_mon = PoolMon, hub_mon = HubMon} = C) ->
    receive
        {Ref, {callback_job, Job, BatchRef, Tag, PyCtx, Kind, M, F, Args}} ->
            callback(C, Job, BatchRef, Tag, {PyCtx, Kind, M, F, Args});
        {Ref, Answer} -> answer(C, Answer);
        {?MODULE, close} ->
            case erpy_nif:reactor_watch(Res) of
                idle -> stop(C, normal);
                busy -> wait(C#c{closing = true})  % closed once its batch tells it
            end;
        {'DOWN', PoolMon, process, _, _} -> pool_stopped(C);
        {'DOWN', HubMon, process, _, _} -> stop(C, hub_stopped)
    end.

answer(C, {ok, Mode}) when Mode =:= read; Mode =:= write; Mode =:= close ->
    next(C, Mode);
answer(C, {error, #{type := <<"ConnectionResetError">>}}) ->
    stop(C, econnreset);
answer(C, {error, pool_closed}) ->
    pool_stopped(C);
answer(C, {error, Why}) ->
    stop(C, Why).

%% Python called erlang.call/apply/send from the protocol: checked by the pool's policy
%% and run here, as erpy_embedded does for any request of the pool (this process is the
%% caller). What a batch's callbacks handed to Python is forgotten when a callback of
%% another batch comes, or the connection ends. The reply makes the job answer by
%% polling again: what it says next (the batch's end, or a callback, maybe another
%% connection's) goes back to the hub.
callback(#c{policy = Policy, pool = Pool, hub = Hub} = C0, Job, BatchRef, Tag, {PyCtx, Kind, M, F, Args}) ->
    C1 = case C0#c.job of
             Job -> C0;
             _ -> (ended(C0))#c{job = Job}
         end,
    Ctx = case C1#c.ctx of
              undefined -> erpy_policy:request_ctx(Policy, self(), [C1#c.fd]);
              Known -> Known
          end,
    Mode = case Tag of
               callback -> trusted;
               callback_check -> check
           end,
    erpy_nif:callback_reply(Job, erpy_policy:run_callback(Ctx, Pool, PyCtx, Kind, M, F, {Mode, Args})),
    repoll(Job, BatchRef, Hub),
    wait(C1#c{ctx = Ctx}).

%% After a callback's reply the job is polled (erpy_nif:poll/2, as after any callback):
%% what it says now goes to the hub as the message it would have sent.
repoll(Job, BatchRef, Hub) ->
    case erpy_nif:poll(Job, true) of
        {done, Answer} -> Hub ! {BatchRef, Answer};
        {T, _, _, _, _, _} = Next when T =:= callback; T =:= callback_check -> Hub ! {BatchRef, Next};
        _Wait -> ok  % from now on it messages the hub
    end.

ended(#c{ctx = undefined} = C) ->
    C#c{job = undefined};
ended(#c{ctx = Ctx} = C) ->
    erpy_policy:done(Ctx),
    C#c{job = undefined, ctx = undefined}.

pool_stopped(C) ->
    %% The pool stopped, and with it the Python that knew this connection.
    _ = ended(C),
    erpy_nif:reactor_close(C#c.res),
    exit({shutdown, pool_stopped}).

%% Closes the connection for `Why`: Python forgets it (connection_lost), then the fd
%% goes (once no protocol callback uses it: reactor.cpp). The process ends with `normal`
%% or {shutdown, Why}.
stop(C0, Why) ->
    C = ended(C0),
    _ = python(C#c.pool, min(timeout(#{}), 5000), '_abort', [C#c.fd]),
    erpy_nif:reactor_close(C#c.res),
    case Why of
        normal -> exit(normal);
        _ -> exit({shutdown, Why})
    end.

%% ---- the hub: one per embedded pool ------------------------------------------------------
%%
%% Started at the pool's first handoff (kept in a persistent term under the pool's pid,
%% so a restarted pool gets its own), it ends with the pool. The last batch submitted,
%% until a context takes it, is `open`: what becomes ready meanwhile joins it
%% (reactor_append), so a context that ends a batch finds the next one waiting, and each
%% batch carries all that was ready. Each batch in flight is watched for a callback
%% running past its connection's timeout (reactor_expire).

hub(Pool, PoolPid, #{pool := NifPool}) ->
    Key = {?MODULE, hub, PoolPid},
    case persistent_term:get(Key, undefined) of
        Hub when is_pid(Hub) ->
            case is_process_alive(Hub) of
                true -> {ok, Hub};
                false -> start_hub(Key, Pool, PoolPid, NifPool)
            end;
        undefined ->
            start_hub(Key, Pool, PoolPid, NifPool)
    end.

%% Two first handoffs at once may start two hubs: each serves the connections bound to
%% it, and both end with the pool.
start_hub(Key, Pool, PoolPid, NifPool) ->
    case is_process_alive(PoolPid) of
        false ->
            {error, {no_pool, Pool}};
        true ->
            Hub = spawn(fun() ->
                                Mon = monitor(process, PoolPid),
                                hub_loop(#{nif_pool => NifPool, mon => Mon, key => Key}, #{}, undefined)
                        end),
            persistent_term:put(Key, Hub),
            {ok, Hub}
    end.

-define(HUB_CHECK, 100).  % ms between looks at a batch in flight

%% InFlight: BatchRef => {Job, Batch, NextCheck}; Open: the last batch, maybe not taken yet.
hub_loop(#{mon := Mon, key := Key} = S, InFlight, Open) ->
    receive
        {select, _, undefined, _} = Sel ->
            hub_ready(S, InFlight, Open, drain([Sel]));
        {Ref, {ok, done}} when is_map_key(Ref, InFlight) ->
            hub_loop(S, maps:remove(Ref, InFlight), closed(Ref, Open));
        {Ref, {Tag, PyCtx, Kind, M, F, Args}} when (Tag =:= callback orelse Tag =:= callback_check),
                                                   is_map_key(Ref, InFlight) ->
            {Job, Batch, _} = maps:get(Ref, InFlight),
            case erpy_nif:reactor_running(Batch) of
                {Owner, ConnRef} -> Owner ! {ConnRef, {callback_job, Job, Ref, Tag, PyCtx, Kind, M, F, Args}};
                none ->
                    erpy_nif:callback_reply(Job, {error, no_connection}),
                    repoll(Job, Ref, self())
            end,
            hub_loop(S, InFlight, Open);
        {Ref, _} when is_map_key(Ref, InFlight) ->
            %% {error, pool_closed}: the pool is stopping, and its connections with it.
            hub_loop(S, maps:remove(Ref, InFlight), closed(Ref, Open));
        {'DOWN', Mon, process, _, _} ->
            _ = persistent_term:get(Key, undefined) =:= self() andalso persistent_term:erase(Key),
            exit(normal);
        _ ->
            hub_loop(S, InFlight, Open)
    after hub_timeout(InFlight) ->
        InFlight1 = hub_expire(InFlight),
        hub_loop(S, InFlight1, case Open of {R, _} when is_map_key(R, InFlight1) -> Open; _ -> undefined end)
    end.

closed(Ref, {Ref, _}) -> undefined;
closed(_, Open) -> Open.

%% Every readiness message already in the mailbox comes along.
drain(Ready) ->
    receive {select, _, undefined, _} = Sel -> drain([Sel | Ready])
    after 0 -> Ready
    end.

hub_ready(S, InFlight, {_, Batch} = Open, Ready) ->
    case erpy_nif:reactor_append(Batch, Ready) of
        ok -> hub_loop(S, InFlight, Open);
        started -> hub_ready(S, InFlight, undefined, Ready)
    end;
hub_ready(#{nif_pool := NifPool} = S, InFlight, undefined, Ready) ->
    Ref = make_ref(),
    case erpy_nif:reactor_batch(NifPool, Ref, Ready) of
        {ok, Job, Batch} ->
            Check = erlang:monotonic_time(millisecond) + ?HUB_CHECK,
            hub_loop(S, InFlight#{Ref => {Job, Batch, Check}}, {Ref, Batch});
        _EmptyOrClosed ->
            hub_loop(S, InFlight, undefined)
    end.

hub_timeout(InFlight) when map_size(InFlight) =:= 0 ->
    infinity;
hub_timeout(InFlight) ->
    Next = lists:min([Check || {_, _, Check} <- maps:values(InFlight)]),
    max(0, Next - erlang:monotonic_time(millisecond)).

hub_expire(InFlight) ->
    Now = erlang:monotonic_time(millisecond),
    maps:fold(fun(Ref, {Job, Batch, Check}, Acc) when Check =< Now ->
                      case erpy_nif:reactor_expire(Job, Batch) of
                          {wait, Ms} ->
                              Acc#{Ref => {Job, Batch, Now + max(1, Ms)}};
                          {timeout, Owner, ConnRef} ->
                              Owner ! {ConnRef, {error, timeout}},
                              maps:remove(Ref, Acc);
                          finished ->
                              maps:remove(Ref, Acc);
                          done ->
                              %% Its {ok, done} is on its way, or it was cancelled.
                              Acc#{Ref => {Job, Batch, Now + ?HUB_CHECK}}
                      end;
                 (_, _, Acc) ->
                      Acc
              end, InFlight, InFlight).

%% ---- port mode: the fd goes to a worker ------------------------------------------------

-spec port(atom(), map(), non_neg_integer(), map(), map()) -> {ok, conn()} | {error, term()}.
port(Pool, Handle, Fd, Info, Config) ->
    Payload = term_to_binary({Pool, Info, spec(Config)}),
    Result = send(Pool, Handle, Fd, Payload, timeout(Config), 2),
    close_fd(Fd),  % the worker has its own copy now (or none: failed)
    Result.

send(_Pool, _Handle, _Fd, _Payload, _Timeout, 0) ->
    {error, no_channel};
send(Pool, Handle, Fd, Payload, Timeout, Tries) ->
    case channels(Pool, Handle, Timeout) of
        [] ->
            {error, no_channel};
        Channels ->
            N = erlang:unique_integer([positive]) rem length(Channels),
            {Name, OsPid} = lists:nth(N + 1, Channels),
            case erpy_nif:reactor_send_fd(Name, OsPid, Fd, Payload) of
                ok ->
                    {ok, {erpy_reactor_port, Pool, OsPid}};
                {error, {python, _}} = Error ->
                    Error;
                {error, _} ->
                    %% The worker is gone (replaced): ask the pool again.
                    _ = persistent_term:erase(?CHANNELS(Pool)),
                    send(Pool, Handle, Fd, Payload, Timeout, Tries - 1)
            end
    end.

%% The reactor channels of the pool's workers: each worker starts its loop when first
%% asked (erpy.reactor._port_channel), and every worker is asked at once, held together,
%% so connections spread over all of them. Workers still starting are asked again a
%% second later.
channels(Pool, #{size := Size}, Timeout) ->
    Now = erlang:monotonic_time(millisecond),
    case persistent_term:get(?CHANNELS(Pool), {[], 0}) of
        {Known, At} when Known =:= []; length(Known) < Size, Now - At > 1000 ->
            Workers = hold(Pool, Size, []),
            Found = [C || W <- Workers,
                          {ok, {Name, OsPid}} <- [erpy:call('erpy.reactor', '_port_channel', [Timeout],
                                                            #{worker => W})],
                          C <- [{Name, OsPid}]],
            _ = [erpy:checkin(W) || W <- Workers],
            _ = [callback_channel(Pool, C) || C <- lists:usort(Found) -- Known],
            All = lists:usort(Found ++ Known),
            _ = All =/= [] andalso persistent_term:put(?CHANNELS(Pool), {All, Now}),
            All;
        {Known, _} ->
            Known
    end.

hold(_Pool, 0, Acc) ->
    Acc;
hold(Pool, N, Acc) ->
    case erpy:checkout(Pool, case Acc of [] -> 5000; _ -> 200 end) of
        {ok, W} -> hold(Pool, N - 1, [W | Acc]);
        {error, _} -> Acc
    end.

%% ---- port mode: the reactor's callbacks into Erlang -----------------------------------
%%
%% A worker's reactor thread has no Erlang caller and no use of the request pipe (the
%% serving thread's), so its erlang.call/apply/send go over a socket pair made when the
%% worker's channel is first found: one end to the worker (as an fd is handed over, with
%% the payload {erpy_callback_channel, Pool}), the other to a process here that reads
%% {callback, CbId, Kind, M, F, A} frames (4-byte lengths, as on the request pipe), runs
%% each under the pool's policy (a policy context per callback, whose caller is this
%% process) and answers {reply, CbId, ok | error, Value}. It ends when the worker's end
%% closes (the worker died): Python's waiting call then gets ErlangPortError. A worker
%% keeps its first live channel (asked again, it answers "has a callback channel").

callback_channel(Pool, {Name, OsPid}) ->
    Payload = term_to_binary({erpy_callback_channel, Pool}),
    case erpy_nif:reactor_send_fd(Name, OsPid, socketpair, Payload) of
        {ok, Fd} ->
            Pid = spawn(fun() -> callbacks_open(Pool, Fd) end),
            {ok, Pid};
        {error, {python, <<"has a callback channel">>}} = Known ->
            Known;
        {error, _} = Error ->
            %% No channel: the worker's protocols get ErlangPortError from erlang.*.
            logger:warning("erpy_reactor: no callback channel for worker ~p of ~p: ~p",
                           [OsPid, Pool, Error]),
            Error
    end.

callbacks_open(Pool, Fd) ->
    %% A copy (dup): the socket module closes only fds it made itself.
    Opened = socket:open(Fd, #{domain => local, type => stream, dup => true}),
    close_fd(Fd),
    case Opened of
        {ok, S} ->
            try callbacks(S, Pool)
            after
                socket:close(S),
                %% The worker died (or the channel broke): the next handoff asks the
                %% pool's workers again, and its replacement gets a channel.
                _ = persistent_term:erase(?CHANNELS(Pool))
            end;
        {error, _} ->
            ok
    end.

callbacks(S, Pool) ->
    case socket:recv(S, 4) of
        {ok, <<Len:32>>} ->
            case erpy_pool:lookup(Pool) of
                {ok, #{policy := Policy, max_message_size := Max}} when Len =< Max ->
                    case socket:recv(S, Len) of
                        {ok, <<131, 104, 6, 119, 8, "callback", 98, CbId:32/signed, _/binary>> = Frame} ->
                            %% The id is an INTEGER_EXT at a fixed place
                            %% (port_worker.cpp), so a refused term still gets its answer.
                            Reply = run_port_callback(Pool, Policy, CbId, Frame),
                            case socket:send(S, [<<(byte_size(Reply)):32>>, Reply]) of
                                ok ->
                                    flush_all(),
                                    callbacks(S, Pool);
                                {error, _} ->
                                    ok
                            end;
                        _ ->
                            ok  % not a callback frame: the channel closes
                    end;
                _ ->
                    %% The pool is gone, or the worker broke the size limit (the C++ side
                    %% checks it before sending): Python sees the channel close.
                    ok
            end;
        {error, _} ->
            ok
    end.

%% Decoded and run exactly as a request's callback (erpy_call's run_callback): the
%% policy's decode (sizes, atoms, funs), then erpy_policy:run_callback. The pool it is
%% given names no pool (it serves only to mark nesting): an erpy call made by the
%% callback goes through the pool as any, since the reactor thread cannot serve a
%% nested request.
run_port_callback(Pool, Policy, CbId, Frame) ->
    Ctx = erpy_policy:request_ctx(Policy, self(), []),
    try erpy_call:callback_reply(Ctx, Pool, ?NO_NESTING, self(), CbId, Frame)
    after erpy_policy:done(Ctx)
    end.

%% What Python may have sent this process (erlang.send to its caller): nobody reads it.
flush_all() ->
    receive _ -> flush_all()
    after 0 -> ok
    end.
