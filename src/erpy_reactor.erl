%% The reactor: Python protocols on file descriptors (doc/reactor.md). Erlang accepts a
%% connection (or opens any fd: TCP, UDP, a Unix socket, a pipe) and hands it to a pool;
%% a protocol object made by the pool's factory (python/erpy/reactor.py) handles it.
%%
%% Embedded pools: the fd stays in this VM. One Erlang process per connection owns it
%% (a NIF resource, closed when the process ends however it ends), waits for readiness
%% with enif_select and, at each event, submits a light event job to the pool
%% (erpy.reactor._ready on a context thread, which re-arms the select itself when the
%% protocol waits again); the protocol runs under the pool's policy, timeout and
%% callbacks like any call. A callback that raises, returns an unknown action or runs
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

%% ---- embedded mode: a process per connection -----------------------------------------
%%
%% The process owns the fd (its resource) and, at each readiness message, submits a light
%% event job (erpy_nif:reactor_event): a context thread runs erpy.reactor._ready(Fd,
%% Event) and, when the protocol says to wait again, re-arms the select for this process
%% itself, with no answer; so the usual event costs a readiness message and one NIF call
%% here. "close", errors, and callbacks into Erlang (run here, under the pool's policy)
%% come as {Ref, _} messages. While a job is in flight, `deadline` bounds it: past it the
%% job is cancelled (Python is interrupted) and the connection closes ({shutdown,
%% timeout}), unless it had ended quietly (reactor_watch says idle).

-spec embedded(atom(), map(), non_neg_integer(), map(), map()) -> {ok, conn()} | {error, term()}.
embedded(Pool, #{pid := PoolPid} = Handle, Fd, Info, Config) ->
    Caller = self(),
    Ref = make_ref(),
    Timeout = timeout(Config),
    {Pid, Mon} = spawn_monitor(fun() ->
                                       open(Caller, Ref, Pool, PoolPid, Handle, Fd, Info, spec(Config),
                                            Timeout)
                               end),
    receive
        {Ref, Result} ->
            demonitor(Mon, [flush]),
            Result;
        {'DOWN', Mon, process, Pid, Why} ->
            {error, Why}
    end.

-record(c, {pool, pool_mon, res, fd, timeout,
            nif_pool,            % the pool's NIF resource (event jobs go there)
            policy,              % the pool's policy (callbacks)
            ref,                 % tags this connection's job answers and callbacks
            job,                 % the event job in flight, or undefined
            event,               % its event (read | write)
            deadline = infinity, % when it times out
            ctx,                 % its policy context, made at its first callback
            closing = false}).   % erpy_reactor:close/1 came while a job ran

open(Caller, Ref, Pool, PoolPid, #{pool := NifPool, policy := Policy}, Fd, Info, Spec, Timeout) ->
    case erpy_nif:reactor_adopt(Fd) of
        {ok, Res} ->
            PoolMon = monitor(process, PoolPid),
            C = #c{pool = Pool, pool_mon = PoolMon, res = Res, fd = Fd, timeout = Timeout,
                   nif_pool = NifPool, policy = Policy, ref = make_ref()},
            case python(C, '_open', [Fd, Info, Pool, Spec]) of
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

python(#c{pool = Pool, timeout = Timeout}, F, Args) ->
    erpy:call('erpy.reactor', F, Args, #{pool => Pool, timeout => Timeout}).

%% The event job (if any) has ended: wait for `Mode` (read | write), or close.
next(C, close) ->
    erpy_nif:reactor_close(C#c.res),
    exit(normal);
next(C0, Mode) ->
    C = ended(C0),
    case C#c.closing of
        true -> stop(C, normal);
        false ->
            case erpy_nif:reactor_select(C#c.res, Mode) of
                ok -> wait(C);
                {error, Why} -> stop(C, Why)
            end
    end.

%% The event job is over (answered, or ended quietly): forget what its callbacks handed
%% to Python.
ended(#c{ctx = undefined} = C) ->
    C#c{job = undefined, deadline = infinity};
ended(#c{ctx = Ctx} = C) ->
    erpy_policy:done(Ctx),
    C#c{job = undefined, deadline = infinity, ctx = undefined}.

wait(#c{res = Res, ref = Ref, pool_mon = PoolMon, deadline = Deadline} = C) ->
    receive
        {select, Res, undefined, ready_input} -> event(C, read);
        {select, Res, undefined, ready_output} -> event(C, write);
        {Ref, {Tag, PyCtx, Kind, M, F, Args}} when Tag =:= callback; Tag =:= callback_check ->
            callback(C, Tag, {PyCtx, Kind, M, F, Args});
        {Ref, Answer} -> answer(C, Answer);
        {?MODULE, close} when C#c.job =:= undefined -> stop(C, normal);
        {?MODULE, close} ->
            case erpy_nif:reactor_watch(Res) of
                idle -> stop(ended(C), normal);
                busy -> wait(C#c{closing = true})  % closed once the job answers
            end;
        {'DOWN', PoolMon, process, _, _} -> pool_stopped(C)
    after remaining(Deadline) ->
        timed_out(C)
    end.

%% Readiness: the previous job (if any) ended quietly, having armed this select.
event(C0, Event) ->
    C = ended(C0),
    case erpy_nif:reactor_event(C#c.nif_pool, C#c.res, C#c.ref, Event) of
        {ok, Job} -> wait(C#c{job = Job, event = Event, deadline = deadline(C#c.timeout)});
        {error, pool_closed} -> pool_stopped(C);
        {error, Why} -> stop(C, Why)
    end.

answer(C, {ok, Mode}) when Mode =:= read; Mode =:= write; Mode =:= close ->
    next(C, Mode);
answer(C, {error, #{type := <<"ConnectionResetError">>}}) ->
    stop(ended(C), econnreset);
answer(C, {error, pool_closed}) ->
    pool_stopped(C);
answer(C, {error, Why}) ->
    stop(ended(C), Why).

%% Python called erlang.call/apply/send from the protocol: checked by the pool's policy
%% and run here, as erpy_embedded does for any request of the pool (this process is the
%% caller); then what follows is polled for, as it may wait in the job.
callback(#c{job = Job, policy = Policy, pool = Pool} = C0, Tag, {PyCtx, Kind, M, F, Args}) ->
    Ctx = case C0#c.ctx of
              undefined -> erpy_policy:request_ctx(Policy, self(), [C0#c.fd, C0#c.event]);
              Known -> Known
          end,
    C = C0#c{ctx = Ctx},
    Mode = case Tag of
               callback -> trusted;
               callback_check -> check
           end,
    erpy_nif:callback_reply(Job, erpy_policy:run_callback(Ctx, Pool, PyCtx, Kind, M, F, {Mode, Args})),
    case remaining(C#c.deadline) of
        0 -> timed_out(C);
        _ -> after_callback(C)
    end.

after_callback(#c{job = Job} = C) ->
    case erpy_nif:poll(Job, true) of
        {done, Answer} -> answer(C, Answer);
        {Tag, PyCtx, Kind, M, F, Args} when Tag =:= callback; Tag =:= callback_check ->
            callback(C, Tag, {PyCtx, Kind, M, F, Args});
        _Wait -> wait(C)
    end.

%% The job ran past its deadline, unless it ended quietly meanwhile (then its select is
%% armed and only readiness is awaited).
timed_out(#c{job = Job, res = Res, ref = Ref} = C) ->
    case erpy_nif:reactor_watch(Res) of
        idle ->
            wait(ended(C));
        busy ->
            case erpy_nif:cancel(Job) of
                canceled ->
                    flush(Ref),
                    stop(ended(C), timeout);
                {done, Answer} ->
                    answer(C, Answer);
                sent ->
                    %% It ended just now: watch made it answer, and that is on its way.
                    wait(C#c{deadline = infinity})
            end
    end.

pool_stopped(C) ->
    %% The pool stopped, and with it the Python that knew this connection.
    erpy_nif:reactor_close(C#c.res),
    exit({shutdown, pool_stopped}).

flush(Ref) ->
    receive {Ref, _} -> flush(Ref)
    after 0 -> ok
    end.

deadline(infinity) -> infinity;
deadline(Timeout) -> erlang:monotonic_time(millisecond) + Timeout.

remaining(infinity) -> infinity;
remaining(Deadline) -> max(0, Deadline - erlang:monotonic_time(millisecond)).

%% Closes the connection for `Why`: Python forgets it (connection_lost), then the fd
%% goes (once no protocol callback uses it: reactor.cpp). The process ends with `normal`
%% or {shutdown, Why}.
stop(C, Why) ->
    _ = python(C#c{timeout = min(timeout(#{}), 5000)}, '_abort', [C#c.fd]),
    erpy_nif:reactor_close(C#c.res),
    case Why of
        normal -> exit(normal);
        _ -> exit({shutdown, Why})
    end.

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
