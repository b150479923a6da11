%% Port programs of your own (`mode => program`, doc/dropin.md): a pool whose workers run
%% the user's own program (a Python script, or any executable) behind a port with
%% `{packet, 1 | 2 | 4}` framing on its stdin/stdout, instead of erpy's worker.
%%
%% A request is one term: written as its external format in one frame, answered by one
%% frame (the program's protocol is its own, one request at a time per process).
%% call/2,3 send any term and give the reply term; erpy:call/4 on such a pool sends
%% BERT-RPC's `{call, Module, Function, Args}` and reads `{reply, R}` (-> `{ok, R}`) or
%% `{error, {Type, Code, Class, Detail, Backtrace}}` (-> `{error, #{type => Class,
%% message => Detail, traceback => Backtrace}}`): what `erpy.port.Protocol` answers.
%%
%% As erpy's port workers: a program that crashes fails only the request it was
%% running and is replaced (with back-off if it keeps dying at start); a request that
%% times out (or whose caller dies) kills its program, which is replaced, since a
%% protocol of the user's cannot be interrupted; the answer is decoded in the caller's
%% process under the pool's policy (erpy_policy: no new atoms, funs checked,
%% `max_message_size`). No answer reaches a caller after its call returned (aliases).
%%
%% This module is the transport (erpy_transport) and the pool server; each program is
%% an erpy_port_program_worker, linked to the pool server, which replaces it.
-module(erpy_port_program).
-behaviour(erpy_transport).
-behaviour(gen_server).

-export([call/2, call/3]).
-export([prepare/1, child_specs/2, request/4, request_worker/3, checkout/2, checkin/1,
         info/1, interpreter/1, reactor/5]).
-export([start_link/2]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).
-export_type([program/0]).

%% What a worker runs: a Python script (with the pool's interpreter, venv and
%% PYTHONPATH, so `import erpy` works), or any executable.
-type program() :: {python_script, file:filename_all()}
                 | {python_script, file:filename_all(), [string() | binary()]}
                 | {executable, file:filename_all(), [string() | binary()]}.
-type handle() :: #{pid := pid(), name := atom(), packet := 1 | 2 | 4,
                    max_frame := non_neg_integer(), policy := erpy_policy:policy()}.
-type ref() :: {atom(), pid()}.

-record(st, {
    name :: atom(),
    opts :: map(),
    handle :: handle(),
    %% Pid => idle | busy | {held, Monitor}
    workers = #{} :: #{pid() => idle | busy | {held, reference()}},
    %% Started at (monotonic ms), to tell a program that dies at start.
    born = #{} :: #{pid() => integer()},
    %% Requests and checkouts waiting for an idle worker, oldest first.
    queue = queue:new() :: queue:queue(),
    failed_starts = 0 :: non_neg_integer()
}).

-define(MAX_BACKOFF_MS, 5000).
%% A program that dies sooner than this after it started counts as failing to start.
-define(YOUNG_MS, 1000).

%% API.

%% @doc Sends `Term` to a program of pool `Pool` and waits for its reply (the pool's
%% `timeout`, else erpy's, by default). `{ok, Reply} | {error, timeout | {worker_exit,
%% Why} | {message_too_large, Size, Max} | {no_pool, Pool} | policy refusals}`.
-spec call(atom(), term()) -> {ok, term()} | {error, term()}.
call(Pool, Term) ->
    case erpy_transport:lookup(Pool) of
        {ok, ?MODULE, #{pid := Pid} = Handle} ->
            send(Handle, Pid, Term, gen_server:call(Pid, timeout));
        {ok, _, _} -> {error, {not_supported, {program, Pool}}};
        error -> {error, {no_pool, Pool}}
    end.

-spec call(atom(), term(), timeout()) -> {ok, term()} | {error, term()}.
call(Pool, Term, Timeout) ->
    case erpy_transport:lookup(Pool) of
        {ok, ?MODULE, #{pid := Pid} = Handle} -> send(Handle, Pid, Term, Timeout);
        {ok, _, _} -> {error, {not_supported, {program, Pool}}};
        error -> {error, {no_pool, Pool}}
    end.

%% erpy_transport.

-spec prepare(map()) -> {ok, map()} | {error, term()}.
prepare(#{program := Program} = Opts) ->
    Packet = maps:get(packet, Opts, 4),
    case {program(Program, Opts), lists:member(Packet, [1, 2, 4])} of
        {{ok, Exe, Args}, true} -> {ok, Opts#{packet => Packet, exe => Exe, exe_args => Args}};
        {{error, _} = Error, _} -> Error;
        {_, false} -> {error, {badarg, {packet, Packet}}}
    end;
prepare(_Opts) ->
    {error, {badarg, program}}.

-spec child_specs(atom(), map()) -> {supervisor:sup_flags(), [supervisor:child_spec()]}.
child_specs(Name, Opts) ->
    {#{strategy => one_for_all, intensity => 5, period => 10},
     [#{id => pool, start => {?MODULE, start_link, [Name, Opts]}, type => worker,
        shutdown => 10000}]}.

%% erpy:call/4 on a program pool: BERT-RPC's {call, M, F, A}.
-spec request(handle(), erpy_transport:request(), timeout(), erpy:call_opts()) ->
    erpy_transport:result().
request(#{pid := Pid} = Handle, Req, Timeout, _Opts) ->
    bert(Handle, Pid, Req, Timeout).

-spec request_worker(ref(), erpy_transport:request(), timeout()) -> erpy_transport:result().
request_worker({Pool, Worker}, Req, Timeout) ->
    case erpy_transport:lookup(Pool) of
        {ok, ?MODULE, Handle} -> bert(Handle, Worker, Req, Timeout);
        _ -> {error, {no_pool, Pool}}
    end.

-spec checkout(handle(), timeout()) -> {ok, ref()} | {error, erpy:error_reason()}.
checkout(#{pid := Pid, name := Name}, Timeout) ->
    Alias = alias([reply]),
    Pid ! {checkout, Alias, self(), erpy_deadline:at(Timeout)},
    receive
        {Alias, {ok, Worker}} -> {ok, {Name, Worker}};
        {Alias, Error} -> Error
    after Timeout ->
        unalias(Alias),
        receive
            {Alias, {ok, Worker}} -> checkin({Name, Worker}), {error, timeout};
            {Alias, _} -> {error, timeout}
        after 0 -> {error, timeout}
        end
    end.

-spec checkin(ref()) -> ok.
checkin({Pool, Worker}) ->
    case erpy_transport:lookup(Pool) of
        {ok, ?MODULE, #{pid := Pid}} -> Pid ! {checkin, Worker}, ok;
        _ -> ok
    end.

-spec interpreter(term()) -> shared | per_worker.
interpreter(_Handle) -> per_worker.

-spec info(handle()) -> #{mode := program, size := non_neg_integer(), atom() => term()}.
info(#{pid := Pid}) ->
    gen_server:call(Pid, info).

-spec reactor(handle(), atom(), non_neg_integer(), map(), map()) -> {error, term()}.
reactor(_Handle, Pool, _Fd, _Info, _Config) ->
    {error, {not_supported, {reactor, Pool}}}.

%% gen_server.

-spec start_link(atom(), map()) -> {ok, pid()} | {error, term()}.
start_link(Name, Opts) ->
    gen_server:start_link(?MODULE, {Name, Opts}, []).

-spec init({atom(), map()}) -> {ok, #st{}}.
init({Name, Opts}) ->
    process_flag(trap_exit, true),
    Packet = maps:get(packet, Opts),
    Handle = #{pid => self(), name => Name, packet => Packet,
               max_frame => min(maps:get(max_message_size, Opts), (1 bsl (8 * Packet)) - 1),
               policy => erpy_policy:new(Name, Opts)},
    ok = erpy_transport:register(Name, ?MODULE, Handle),
    St = #st{name = Name, opts = Opts, handle = Handle},
    {ok, lists:foldl(fun(_, S) -> start_worker(S) end, St, lists:seq(1, maps:get(size, Opts)))}.

-spec handle_call(term(), gen_server:from(), #st{}) -> {reply, term(), #st{}}.
handle_call(timeout, _From, St) ->
    {reply, maps:get(timeout, St#st.opts), St};
handle_call(info, _From, St) ->
    States = maps:values(St#st.workers),
    {reply, #{mode => program, name => St#st.name, size => maps:get(size, St#st.opts),
              workers => maps:size(St#st.workers),
              idle => length([S || S <- States, S =:= idle]),
              busy => length([S || S <- States, S =:= busy]),
              held => length([S || {held, _} = S <- States]),
              queued => queue:len(St#st.queue),
              packet => maps:get(packet, St#st.opts),
              worker_pids => lists:sort(maps:keys(St#st.workers))}, St};
handle_call(_Msg, _From, St) ->
    {reply, {error, unknown_call}, St}.

-spec handle_cast(term(), #st{}) -> {noreply, #st{}}.
handle_cast(_Msg, St) ->
    {noreply, St}.

-spec handle_info(term(), #st{}) -> {noreply, #st{}}.
handle_info({request, _Alias, _Caller, _Frame, _Deadline} = Req, St) ->
    {noreply, dispatch(Req, St)};
handle_info({checkout, _Alias, _Caller, _Deadline} = Req, St) ->
    {noreply, dispatch(Req, St)};
handle_info({idle, Worker}, St) ->
    case maps:find(Worker, St#st.workers) of
        {ok, {held, _}} -> {noreply, St};
        {ok, _} -> {noreply, next(Worker, St)};
        error -> {noreply, St}
    end;
handle_info({checkin, Worker}, St) ->
    case maps:find(Worker, St#st.workers) of
        {ok, {held, Mon}} ->
            erlang:demonitor(Mon, [flush]),
            {noreply, next(Worker, St)};
        _ ->
            {noreply, St}
    end;
handle_info({'DOWN', Mon, process, _Holder, _Why}, St) ->
    %% A holder died: its worker comes back (killed if it is still working for it).
    case [W || {W, {held, M}} <- maps:to_list(St#st.workers), M =:= Mon] of
        [Worker] ->
            erpy_port_program_worker:release(Worker),
            {noreply, St#st{workers = (St#st.workers)#{Worker => busy}}};
        [] ->
            {noreply, St}
    end;
handle_info({'EXIT', Pid, Why}, St) when is_map_key(Pid, St#st.workers) ->
    {noreply, worker_down(Pid, Why, St)};
handle_info({'EXIT', _Pid, Why}, St) when Why =/= normal ->
    {stop, Why, St};
handle_info(start_worker, St) ->
    {noreply, start_worker(St)};
handle_info(_Msg, St) ->
    {noreply, St}.

-spec terminate(term(), #st{}) -> ok.
terminate(_Why, St) ->
    ok = erpy_transport:unregister(St#st.name),
    %% Each worker closes its port and kills a program that does not leave on EOF.
    [exit(W, shutdown) || W <- maps:keys(St#st.workers)],
    [receive {'EXIT', W, _} -> ok after 5000 -> exit(W, kill) end
     || W <- maps:keys(St#st.workers)],
    ok.

%% Internal.

%% Called in the caller's process: the frame goes to the pool (or a held worker), the
%% answer comes to an alias, and is decoded here under the pool's policy.
send(#{max_frame := Max, policy := Policy}, Dest, Term, Timeout) ->
    Frame = term_to_binary(Term, [{minor_version, 2}]),
    case byte_size(Frame) of
        Size when Size > Max ->
            {error, {message_too_large, Size, Max}};
        _ ->
            Ctx = erpy_policy:request_ctx(Policy, self(), Term),
            Alias = alias([reply]),
            Dest ! {request, Alias, self(), Frame, erpy_deadline:at(Timeout)},
            Answer = receive
                         {Alias, A} -> A
                     after Timeout ->
                         unalias(Alias),
                         receive {Alias, A} -> A after 0 -> {error, timeout} end
                     end,
            ok = erpy_policy:done(Ctx),
            case Answer of
                {ok, Bin} -> erpy_policy:decode(Ctx, Bin);
                {error, _} = Error -> Error
            end
    end.

bert(#{name := Pool} = Handle, Dest, #{kind := call, module := M, function := F, args := A} = Req,
     Timeout) ->
    case maps:get(kwargs, Req, #{}) of
        Kwargs when map_size(Kwargs) > 0 ->
            {error, {badarg, kwargs}};
        _ when is_reference(M) ->
            {error, {not_supported, {handle, Pool}}};
        _ ->
            case send(Handle, Dest, {call, name(M), name(F), A}, Timeout) of
                {ok, {reply, R}} -> {ok, R};
                {ok, {noreply}} -> {ok, undefined};
                {ok, {error, {_Type, _Code, Class, Detail, Backtrace}}} ->
                    {error, #{type => text(Class), message => text(Detail),
                              traceback => [text(L) || L <- list(Backtrace)]}};
                {ok, Other} -> {error, {undecodable, bad_reply(Other)}};
                {error, _} = Error -> Error
            end
    end;
bert(#{name := Pool}, _Dest, #{kind := Kind}, _Timeout) ->
    {error, {not_supported, {Kind, Pool}}}.

%% Names go as the atoms they already are (erpy made binaries of them), else binaries.
name(B) ->
    try binary_to_existing_atom(B, utf8) catch error:badarg -> B end.

text(B) when is_binary(B) -> B;
text(A) when is_atom(A) -> atom_to_binary(A, utf8);
text(Other) ->
    case catch unicode:characters_to_binary(Other) of
        B when is_binary(B) -> B;
        _ -> iolist_to_binary(io_lib:format("~0p", [Other]))
    end.

list(L) when is_list(L) -> L;
list(_) -> [].

bad_reply(Term) ->
    iolist_to_binary(io_lib:format("not a BERT-RPC reply: ~0P", [Term, 20])).


program({python_script, Path}, Opts) ->
    program({python_script, Path, []}, Opts);
program({python_script, Path, Args}, #{python := Python}) when is_list(Args) ->
    {ok, Python, [to_list(Path) | [to_list(A) || A <- Args]]};
program({executable, Path, Args}, _Opts) when is_list(Args) ->
    case os:find_executable(to_list(Path)) of
        false -> {error, {program_not_found, Path}};
        Exe -> {ok, Exe, [to_list(A) || A <- Args]}
    end;
program(Other, _Opts) ->
    {error, {badarg, {program, Other}}}.

to_list(B) when is_binary(B) -> unicode:characters_to_list(B);
to_list(A) when is_atom(A) -> atom_to_list(A);
to_list(L) when is_list(L) -> L.

%% Requests and checkouts go to idle workers, in order; those whose caller gave up
%% (deadline passed) are dropped.
dispatch(Req, St) ->
    case [W || {W, idle} <- maps:to_list(St#st.workers)] of
        [Worker | _] -> give(Worker, Req, St);
        [] -> St#st{queue = queue:in(Req, St#st.queue)}
    end.

next(Worker, St) ->
    case queue:out(St#st.queue) of
        {{value, Req}, Q} -> give(Worker, Req, St#st{queue = Q});
        {empty, _} -> St#st{workers = (St#st.workers)#{Worker => idle}}
    end.

give(Worker, Req, St) ->
    Now = erlang:monotonic_time(millisecond),
    case Req of
        {_, _, _, _, Deadline} when Deadline =/= infinity, Deadline =< Now ->
            next(Worker, St);
        {request, _, Caller, _, _} when node(Caller) =:= node() ->
            %% A caller gone already would only get its program killed (see the worker).
            case is_process_alive(Caller) of
                true -> Worker ! Req, St#st{workers = (St#st.workers)#{Worker => busy}};
                false -> next(Worker, St)
            end;
        {checkout, _, _, Deadline} when Deadline =/= infinity, Deadline =< Now ->
            next(Worker, St);
        {request, _, _, _, _} ->
            Worker ! Req,
            St#st{workers = (St#st.workers)#{Worker => busy}};
        {checkout, Alias, Holder, _} ->
            Mon = erlang:monitor(process, Holder),
            Alias ! {Alias, {ok, Worker}},
            St#st{workers = (St#st.workers)#{Worker => {held, Mon}}}
    end.

start_worker(#st{opts = Opts} = St) ->
    case erpy_port_program_worker:start_link(St#st.name, self(), Opts) of
        {ok, Pid} ->
            next(Pid, St#st{workers = (St#st.workers)#{Pid => busy},
                            born = (St#st.born)#{Pid => erlang:monotonic_time(millisecond)}});
        {error, Why} ->
            logger:error("erpy pool ~p: program did not start: ~p", [St#st.name, Why],
                         #{domain => [erpy]}),
            retry(St)
    end.

%% A program that died is replaced; one that keeps dying at start, after a back-off.
worker_down(Pid, Why, St) ->
    Born = maps:get(Pid, St#st.born, 0),
    Workers = maps:remove(Pid, St#st.workers),
    case maps:get(Pid, St#st.workers) of
        {held, Mon} -> erlang:demonitor(Mon, [flush]);
        _ -> ok
    end,
    St1 = St#st{workers = Workers, born = maps:remove(Pid, St#st.born)},
    Killed = case Why of
                 {shutdown, {killed, _}} -> true;
                 _ -> false
             end,
    case not Killed andalso erlang:monotonic_time(millisecond) - Born < ?YOUNG_MS of
        true ->
            logger:warning("erpy pool ~p: program exited at start: ~p", [St#st.name, Why],
                           #{domain => [erpy]}),
            retry(St1);
        false ->
            start_worker(St1#st{failed_starts = 0})
    end.

retry(#st{failed_starts = N} = St) ->
    erlang:send_after(min(?MAX_BACKOFF_MS, 100 bsl min(N, 6)), self(), start_worker),
    St#st{failed_starts = N + 1}.
