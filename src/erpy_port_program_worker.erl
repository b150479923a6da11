%% One program of a `mode => program` pool (erpy_port_program): the port to the user's
%% program, one request at a time. A request's frame is written as it comes; the next
%% frame from the program is its answer, sent raw to the caller's alias (the caller
%% decodes it under the pool's policy). The program's stdout carries the frames; its
%% stderr is the VM's.
%%
%% A request whose deadline passes, or whose caller dies, cannot be interrupted in a
%% protocol of the user's: the program is killed and this
%% process exits, so that the pool starts a fresh one. So does a program that exits.
-module(erpy_port_program_worker).
-behaviour(gen_server).

-export([start_link/3, release/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-record(st, {
    pool :: atom(),
    pool_pid :: pid(),
    port :: port() | undefined,
    %% The frames' header size, and their reader (the port is in stream mode: a length
    %% over the limit is refused before any of the frame is buffered, see erpy_frame).
    packet :: 1 | 2 | 4,
    in :: erpy_frame:reader(),
    max :: non_neg_integer(),
    os_pid :: non_neg_integer() | undefined,
    %% The program's start time (/proc), to tell its pid from a reused one.
    started :: integer() | undefined,
    %% The request running: {Alias, CallerMonitor, Timer}.
    running :: {reference(), reference(), reference() | undefined} | undefined
}).

%% API.

-spec start_link(atom(), pid(), map()) -> {ok, pid()} | {error, term()}.
start_link(Pool, PoolPid, Opts) ->
    gen_server:start_link(?MODULE, {Pool, PoolPid, Opts}, []).

%% The holder of this worker died: whatever still runs for it is killed.
-spec release(pid()) -> ok.
release(Worker) ->
    gen_server:cast(Worker, release).

%% gen_server.

-spec init({atom(), pid(), map()}) -> {ok, #st{}} | {stop, term()}.
init({Pool, PoolPid, Opts}) ->
    process_flag(trap_exit, true),
    Exe = maps:get(exe, Opts),
    Env = [{"PYTHONPATH", maps:get(pythonpath, Opts)}, {"PYTHONUNBUFFERED", "1"}],
    Dir = case maps:get(cd, Opts, undefined) of
              undefined -> [];
              D -> [{cd, D}]
          end,
    try open_port({spawn_executable, Exe},
                  [{args, maps:get(exe_args, Opts)}, stream, binary,
                   use_stdio, exit_status, {env, Env} | Dir]) of
        Port ->
            {os_pid, OsPid} = erlang:port_info(Port, os_pid),
            Packet = maps:get(packet, Opts),
            Max = maps:get(max_message_size, Opts, 10485760),
            {ok, #st{pool = Pool, pool_pid = PoolPid, port = Port, os_pid = OsPid,
                     packet = Packet, in = erpy_frame:reader(Packet, Max), max = Max,
                     started = started(OsPid)}}
    catch
        error:Why -> {stop, {cannot_start_program, Exe, Why}}
    end.

-spec handle_call(term(), gen_server:from(), #st{}) -> {reply, term(), #st{}}.
handle_call(os_pid, _From, St) ->
    {reply, St#st.os_pid, St};
handle_call(_Msg, _From, St) ->
    {reply, {error, unknown_call}, St}.

-spec handle_cast(term(), #st{}) -> {noreply, #st{}} | {stop, term(), #st{}}.
handle_cast(release, #st{running = undefined} = St) ->
    St#st.pool_pid ! {idle, self()},
    {noreply, St};
handle_cast(release, St) ->
    stop_killed(holder_down, St);
handle_cast(_Msg, St) ->
    {noreply, St}.

-spec handle_info(term(), #st{}) -> {noreply, #st{}} | {stop, term(), #st{}}.
handle_info({request, Alias, Caller, Frame, Deadline}, #st{running = undefined} = St) ->
    Mon = erlang:monitor(process, Caller),
    Timer = case Deadline of
                infinity -> undefined;
                _ -> erlang:start_timer(Deadline, self(), deadline, [{abs, true}])
            end,
    case erpy_frame:write(St#st.port, St#st.packet, Frame) of
        ok ->
            {noreply, St#st{running = {Alias, Mon, Timer}}};
        {error, closed} ->
            Alias ! {Alias, {error, {worker_exit, port_closed}}},
            {stop, {shutdown, port_closed}, St}
    end;
handle_info({request, Alias, _Caller, _Frame, _Deadline}, St) ->
    %% A held worker asked twice at once: one request at a time.
    Alias ! {Alias, {error, {badarg, {worker, busy}}}},
    {noreply, St};
handle_info({Port, {data, Data}}, #st{port = Port} = St) ->
    case erpy_frame:input(Data, St#st.in) of
        {ok, Frames, In} ->
            {noreply, lists:foldl(fun frame/2, St#st{in = In}, Frames)};
        {error, {frame_too_large, Len, Max}} ->
            %% The stream cannot be followed past a refused frame: the program goes.
            logger:error("erpy pool ~p: program ~p announced a ~b-byte frame (limit ~b); "
                         "killed", [St#st.pool, St#st.os_pid, Len, Max], #{domain => [erpy]}),
            answer({error, {message_too_large, Len, Max}}, St),
            kill(St),
            {stop, {shutdown, {frame_too_large, Len}}, St#st{running = undefined}}
    end;
handle_info({Port, {exit_status, Status}}, #st{port = Port} = St) ->
    answer({error, {worker_exit, {exit_status, Status}}}, St),
    {stop, {shutdown, {exit_status, Status}}, St#st{port = undefined, running = undefined}};
handle_info({timeout, Timer, deadline}, #st{running = {_, _, Timer}} = St) ->
    stop_killed(timeout, St);
handle_info({'DOWN', Mon, process, _, _}, #st{running = {_, Mon, _}} = St) ->
    stop_killed(caller_down, St);
handle_info({'EXIT', Port, _Why}, #st{port = Port} = St) ->
    answer({error, {worker_exit, port_closed}}, St),
    {stop, {shutdown, port_closed}, St#st{port = undefined, running = undefined}};
handle_info({'EXIT', _Pid, Why}, St) ->
    %% The pool server: it is going.
    {stop, Why, St};
handle_info(_Msg, St) ->
    {noreply, St}.

%% A frame from the program: the answer of the running request, else dropped.
frame(Frame, #st{running = {Alias, Mon, Timer}} = St) ->
    erlang:demonitor(Mon, [flush]),
    cancel(Timer),
    Alias ! {Alias, {ok, Frame}},
    St#st.pool_pid ! {idle, self()},
    St#st{running = undefined};
frame(_Frame, St) ->
    logger:warning("erpy pool ~p: program ~p wrote a frame nobody asked for; dropped",
                   [St#st.pool, St#st.os_pid], #{domain => [erpy]}),
    St.

-spec terminate(term(), #st{}) -> ok.
terminate(_Why, #st{port = undefined}) ->
    ok;
terminate(_Why, #st{port = Port, running = Running} = St) ->
    %% An idle program leaves on EOF (erpy.port does); a busy one may never read again.
    catch port_close(Port),
    case Running of
        undefined -> _ = spawn(fun() -> timer:sleep(2000), kill(St) end);
        _ -> kill(St)
    end,
    ok.

%% Internal.

stop_killed(Why, St) ->
    answer({error, Why}, St),
    kill(St),
    catch port_close(St#st.port),
    {stop, {shutdown, {killed, Why}}, St#st{port = undefined, running = undefined}}.

answer(_Answer, #st{running = undefined}) ->
    ok;
answer(Answer, #st{running = {Alias, _, _}}) ->
    Alias ! {Alias, Answer},
    ok.

cancel(undefined) -> ok;
cancel(Timer) -> _ = erlang:cancel_timer(Timer, [{async, true}, {info, false}]), ok.

%% The program, unless its pid now names another process (started at another time).
kill(#st{os_pid = undefined}) ->
    ok;
kill(#st{os_pid = OsPid, started = Started}) ->
    case started(OsPid) of
        Started when Started =/= undefined ->
            _ = os:cmd("kill -KILL " ++ integer_to_list(OsPid) ++ " 2>/dev/null"),
            ok;
        _ ->
            ok
    end.

%% Field 22 of /proc/Pid/stat (the start time), counted after the command's last ')'.
started(OsPid) ->
    case file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/stat") of
        {ok, Stat} ->
            case string:split(Stat, <<")">>, trailing) of
                [_, Rest] ->
                    case string:lexemes(Rest, " \n") of
                        Fields when length(Fields) >= 20 -> binary_to_integer(lists:nth(20, Fields));
                        _ -> undefined
                    end;
                _ -> undefined
            end;
        {error, _} ->
            undefined
    end.
