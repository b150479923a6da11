%% One Python worker OS process behind a port (ETF frames with 4-byte lengths on fds 3
%% and 4, so nothing Python prints can reach the protocol stream). The frames are split
%% by erpy_frame, which refuses a length over the limit before buffering any of it.
%%
%% The worker writes the callers' pre-encoded requests to the port and forwards Python's
%% answers to them without decoding them (it only peeks at the frame's head). Callback
%% requests from Python go to the caller undecoded, where the pool's policy decodes,
%% checks and runs them (erpy_policy). A request whose caller died or timed out is interrupted in Python;
%% if Python does not stop within the grace period the OS process is killed, and the pool
%% starts a new worker.
%%
%% The worker leads its own process group (c_src/worker/process.hpp), and its death is
%% seen by its OS pid as well as by the port closing: a process its code started may hold
%% a copy of a pipe, which would keep the port open. Whenever the worker dies or is
%% killed, its process group is killed too.
-module(erpy_port_worker).
-behaviour(gen_server).

-export([start_link/3, hold/2, release/1, protocol_version/0, write/2]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-define(WATCH_MS, 50).
%% Adaptive pipelining: a request written behind a running one that has run this long is
%% withdrawn from Python (if it has not started) and placed again.
-define(WITHDRAW_MS, 2).
%% The most requests from the mailbox written to Python with one port command.
-define(BATCH, 16).
-define(PROTOCOL_VERSION, 2).
-define(READY_TIMEOUT_MS, 60000).
%% The longest an idle worker polls for the next request before it sleeps (waking a
%% sleeping process costs far more on VMs). Adaptive (c_src/common/spin_wait.hpp): the
%% worker spins only while its spins find requests and keep their CPU, else it blocks.
-define(DEFAULT_SPIN_US, 50).
%% How often the worker's OS process is looked at (/proc), and how long a dead one's pipe
%% may stay open once its process group is killed.
-define(ALIVE_MS, 250).
-define(GONE_MS, 1000).

-record(req, {id :: integer(), alias :: reference() | undefined, caller :: pid(),
              %% The caller is monitored only once its request has waited ?WATCH_MS:
              %% most requests are answered sooner, and a monitor per call cost more
              %% than the call's own bookkeeping here. `since`: when the request came
              %% (monotonic us).
              mon :: reference() | undefined, since :: integer(),
              deadline :: integer() | infinity,
              %% Nested requests come from a callback of the running request; they hold
              %% no slot of the pool.
              nested = false :: boolean(),
              %% The frame, while the request waits here (see #st.waiting).
              frame :: erlang:iovec() | binary() | undefined,
              %% When Python started it (monotonic us); undefined while it waits in its pipe.
              started :: integer() | undefined,
              %% A withdraw frame went to Python for it: it comes back as {withdrawn, Id}
              %% unless Python started it first (then its answer comes).
              withdrawing = false :: boolean()}).

-record(st, {
    pool :: atom(),
    pool_pid :: pid(),
    port :: port() | undefined,
    os_pid :: non_neg_integer() | undefined,
    %% The OS process's start time (/proc/Pid/stat), which tells it from a later process
    %% with the same pid; undefined where there is no /proc.
    started :: non_neg_integer() | undefined,
    alive :: reference() | undefined,
    born :: integer(),
    %% Set once the OS process was found dead: the pipe gets this long to close.
    gone :: reference() | undefined,
    opts :: map(),
    max :: non_neg_integer(),
    %% Frames from Python are split here (the port is in stream mode): see erpy_frame.
    in :: erpy_frame:reader() | undefined,
    ready = false :: boolean(),
    %% Requests in flight. The head is the one Python works on: nested requests are
    %% pushed in front (Python runs them inside a callback of the head), pipelined ones
    %% are appended (Python reads them after the head's answer).
    pending = [] :: [#req{}],
    %% Requests the pool placed here while Python works on one of the pool, kept here
    %% when the pool does not write ahead (`pipeline => 1`, a nesting or held worker).
    %% Each is written to Python when the one before is answered, so until then it has not
    %% started and may still go elsewhere (back to its caller, which places it again).
    waiting = queue:new() :: queue:queue(#req{}),
    %% Pipelining (`pipeline => auto | N`): placed requests are written to Python at once;
    %% Python keeps them until the running one has answered (never runs them inside its
    %% callbacks). With auto, one still waiting behind a request that has run
    %% ?WITHDRAW_MS is withdrawn and placed again (#st.withdraw).
    write_ahead = false :: boolean(),
    withdraw = false :: boolean(),
    withdraw_timer :: reference() | undefined,
    watch :: reference() | undefined,
    releasing = false :: boolean(),
    held = false :: boolean(),
    calls = 0 :: non_neg_integer(),
    exiting = false :: boolean()
}).

%% API.

-spec start_link(atom(), pid(), map()) -> {ok, pid()} | {error, term()}.
start_link(Pool, PoolPid, Opts) ->
    gen_server:start_link(?MODULE, {Pool, PoolPid, Opts}, []).

%% Starts a checkout: the namespace persists across requests until release/1.
-spec hold(pid(), pid()) -> ok.
hold(Worker, _Holder) ->
    gen_server:cast(Worker, hold).

%% Ends a checkout: interrupt what still runs, clear the namespace, then report idle.
-spec release(pid()) -> ok.
release(Worker) ->
    gen_server:cast(Worker, release).

-spec protocol_version() -> pos_integer().
protocol_version() ->
    ?PROTOCOL_VERSION.

%% gen_server.

-spec init(term()) -> {ok, #st{}} | {ok, #st{}, timeout()} | {stop, term()}.
init({Pool, PoolPid, Opts}) ->
    process_flag(trap_exit, true),
    Python = maps:get(python, Opts),
    Env = [{"PYTHONPATH", maps:get(pythonpath, Opts)},
           {"PYTHONUNBUFFERED", "1"}],
    try open_port({spawn_executable, Python},
                  [{args, ["-m", "erpy.worker"]}, stream, binary, nouse_stdio,
                   exit_status, {env, Env}]) of
        Port ->
            {os_pid, OsPid} = erlang:port_info(Port, os_pid),
            Init = #{version => ?PROTOCOL_VERSION,
                     pool => Pool,
                     max_message_size => maps:get(max_message_size, Opts),
                     max_memory_mb => maps:get(max_memory_mb, Opts, undefined),
                     spin_us => maps:get(spin_us, Opts, ?DEFAULT_SPIN_US),
                     %% At most half the CPUs' worth of workers of this VM spin at once.
                     spin_group => list_to_binary(os:getpid()),
                     spin_limit => maps:get(spin_limit, Opts,
                                            max(1, erlang:system_info(logical_processors_available) div 2)),
                     none => maps:get(none, Opts, undefined),
                     %% Set by the worker on itself before it runs any request.
                     rlimits => maps:get(rlimits, Opts, #{})},
            write(Port, term_to_binary({init, Init}, [{minor_version, 2}])),
            Started = case proc_stat(OsPid) of
                          {_State, Start} -> Start;
                          gone -> undefined
                      end,
            St = #st{pool = Pool, pool_pid = PoolPid, port = Port, os_pid = OsPid, opts = Opts,
                     started = Started, alive = alive_timer(Started), born = now_ms(),
                     max = maps:get(max_message_size, Opts),
                     in = erpy_frame:reader(4, frame_limit(maps:get(max_message_size, Opts))),
                     write_ahead = maps:get(write_ahead, maps:get(pool_handle, Opts, #{}), false),
                     withdraw = maps:get(young_us, maps:get(pool_handle, Opts, #{}), infinity) =/= infinity},
            {ok, St, ?READY_TIMEOUT_MS}
    catch
        error:Why -> {stop, {cannot_start_python, Python, Why}}
    end.

-spec handle_call(term(), gen_server:from(), #st{}) -> {reply, term(), #st{}} | {reply, term(), #st{}, timeout()} | {noreply, #st{}}.
handle_call(os_pid, _From, St) ->
    {reply, St#st.os_pid, St, timeout(St)};
handle_call(_Msg, _From, St) ->
    {reply, {error, unknown_call}, St, timeout(St)}.

-spec handle_cast(term(), #st{}) -> {noreply, #st{}} | {noreply, #st{}, timeout()}.
handle_cast(release, #st{pending = []} = St) ->
    reset_namespace(St),
    St#st.pool_pid ! {erpy_idle, self()},
    {noreply, St#st{held = false}, timeout(St)};
handle_cast(release, St) ->
    {noreply, cancel_all(St#st{releasing = true, held = false}), timeout(St)};
handle_cast(hold, St) ->
    send_frame(St, {hold}),
    {noreply, St#st{held = true}, timeout(St)};
handle_cast(_Msg, St) ->
    {noreply, St, timeout(St)}.

-spec handle_info(term(), #st{}) -> {noreply, #st{}} | {noreply, #st{}, timeout()} | {stop, term(), #st{}}.
handle_info({erpy_request, Alias, _Caller, _Id, _Bin, _Deadline}, #st{exiting = true} = St) ->
    %% Sent before the slot was retired: it never started, so its caller places it again.
    Alias ! {erpy_reply, Alias, {retry, {worker_exit, exiting}}},
    {noreply, St, timeout(St)};
handle_info({erpy_request, Alias, Caller, Id, Bin, Deadline}, St) ->
    %% One clock read: it stamps the requests' arrival and, for one Python starts now, its
    %% start. The requests already in the mailbox are placed too, and what goes to Python
    %% is written with one port command (a pipe write costs more than the rest of a
    %% request's handling here, and callers answered together ask again together).
    Now = now_us(),
    {St1, Frames} = place(Alias, Caller, Id, Bin, Deadline, Now, St, [], ?BATCH),
    _ = Frames =:= [] orelse erpy_frame:write_all(St1#st.port, 4, Frames),
    St2 = watch(St1),
    {noreply, St2, timeout(St2)};
handle_info({erpy_nested, Alias, Caller, Id, Bin, Deadline}, #st{port = Port} = St) ->
    write(Port, Bin),
    Req = #req{id = Id, alias = Alias, caller = Caller, deadline = Deadline, nested = true,
               since = now_us()},
    St1 = watch(St#st{pending = [Req | St#st.pending]}),
    {noreply, St1, timeout(St1)};
handle_info({timeout, Timer, watch}, #st{watch = Timer, pending = Pending} = St) ->
    %% Callers of requests that have waited a while get monitored now (a dead one gives its
    %% DOWN at once), so a caller that dies mid-call still gets its request interrupted.
    Old = now_us() - ?WATCH_MS * 1000,
    Watch = fun(#req{mon = undefined, since = Since, caller = C} = R) when Since =< Old ->
                    R#req{mon = erlang:monitor(process, C)};
               (R) -> R
            end,
    St0 = St#st{pending = lists:map(Watch, Pending),
                waiting = queue:from_list(lists:map(Watch, queue:to_list(St#st.waiting))),
                watch = undefined},
    %% Requests waiting behind one that has run a whole tick go back to their callers,
    %% which place them again (on a free worker, or in the pool's queue).
    St1 = case running_since(St0) of
              Since when is_integer(Since), Since =< Old -> give_back(St0);
              _ -> St0
          end,
    %% The same tick enforces deadlines: a request still running its grace period after
    %% its deadline means Python ignored the interrupt (stuck in C code, or catching it).
    St2 = case overdue(St1) of
              true -> kill(St1), retire(St1), St1#st{exiting = true};
              false -> St1
          end,
    St3 = watch(St2),
    {noreply, St3, timeout(St3)};
handle_info({timeout, Timer, withdraw}, #st{withdraw_timer = Timer} = St) ->
    St1 = withdraw_behind(St#st{withdraw_timer = undefined}),
    {noreply, St1, timeout(St1)};
handle_info({Port, {data, Data}}, #st{port = Port} = St) ->
    case erpy_frame:input(Data, St#st.in) of
        {ok, Frames, In} ->
            frames(Frames, St#st{in = In});
        {error, {frame_too_large, Len, _Limit}} ->
            %% Only code that writes the protocol fd itself sends such a claim (erpy's
            %% worker answers a result over the limit with an error): the stream cannot
            %% be trusted past it, so the worker goes, and what it ran fails as too large.
            logger:error("erpy pool ~p: worker ~p announced a ~b-byte frame (limit ~b); "
                         "killed", [St#st.pool, St#st.os_pid, Len, St#st.max],
                         #{domain => [erpy]}),
            St1 = fail_pending({message_too_large, Len, St#st.max}, St),
            kill(St1),
            {stop, {shutdown, {frame_too_large, Len}}, St1}
    end;
handle_info({'DOWN', Mon, process, _Pid, _Why}, St) ->
    %% A caller died mid-call: interrupt its request; the answer is dropped on arrival.
    %% One still waiting here is dropped: it never started.
    {Gone, Waiting} = lists:partition(fun(#req{mon = M}) -> M =:= Mon end,
                                      queue:to_list(St#st.waiting)),
    St0 = case Gone of
              [] -> St;
              _ -> one_done(St#st{waiting = queue:from_list(Waiting)})
          end,
    down(Mon, St0);
handle_info({Port, {exit_status, Status}}, #st{port = Port} = St) ->
    St1 = fail_pending({worker_exit, {exit_status, Status}}, St#st{port = undefined}),
    kill(St1),  % what its code started and left behind
    {stop, {shutdown, {python_exit, Status}}, St1};
handle_info({'EXIT', Port, Why}, #st{port = Port} = St) ->
    St1 = fail_pending({worker_exit, Why}, St#st{port = undefined}),
    kill(St1),
    {stop, {shutdown, {port_exit, Why}}, St1};
handle_info({timeout, Timer, alive}, #st{alive = Timer} = St) ->
    %% These ticks keep the gen_server timeout from firing: the start's limit is kept here.
    StartOver = not St#st.ready andalso now_ms() >= St#st.born + ?READY_TIMEOUT_MS,
    case os_process_alive(St) of
        true when StartOver ->
            {stop, {shutdown, python_not_ready}, St};
        true ->
            {noreply, St#st{alive = alive_timer(St#st.started)}, timeout(St)};
        false ->
            %% Dead, yet the port is open: a process it started holds a pipe. Killing the
            %% group closes it, and exit_status follows; no request goes to it meanwhile.
            kill(St),
            retire(St),
            St1 = St#st{alive = undefined, exiting = true,
                        gone = erlang:start_timer(?GONE_MS, self(), gone)},
            {noreply, St1, timeout(St1)}
    end;
handle_info({timeout, Timer, gone}, #st{gone = Timer} = St) ->
    %% Something outside its process group still holds the pipe: the port cannot tell us
    %% more, so the worker is given up on now.
    {stop, {shutdown, {python_gone, St#st.os_pid}},
     fail_pending({worker_exit, os_process_gone}, St)};
handle_info({'EXIT', _From, Why}, St) ->
    {stop, Why, St};
handle_info(timeout, #st{ready = false} = St) ->
    {stop, {shutdown, python_not_ready}, St};
handle_info(timeout, St) ->
    {noreply, St, timeout(St)};
handle_info(_Msg, St) ->
    {noreply, St, timeout(St)}.

-spec terminate(term(), #st{}) -> ok.
terminate(_Why, #st{port = undefined}) ->
    ok;
terminate(_Why, #st{port = Port, pending = Pending} = St) ->
    %% An idle Python exits on EOF; a busy one may never read again, so it is killed.
    %% After the grace period nothing of the worker may be left: neither a Python stuck
    %% on its way out nor the processes its code started.
    catch port_close(Port),
    case Pending of
        %% Later, only where a reused pid can be told apart (kill/1).
        [] when St#st.started =/= undefined -> _ = spawn(fun() -> timer:sleep(grace(St)), kill(St) end);
        [] -> ok;
        _ -> kill(St)
    end,
    ok.

%% Internal.

down(Mon, St) ->
    Pending = [case R of
                   #req{mon = Mon} ->
                       send_frame(St, {cancel, R#req.id}),
                       R#req{alias = undefined, deadline = grace_deadline(St)};
                   _ -> R
               end || R <- St#st.pending],
    St1 = St#st{pending = Pending},
    {noreply, St1, timeout(St1)}.

frames([], St) ->
    {noreply, St, timeout(St)};
frames([Frame | More], St) ->
    case handle_frame(Frame, St) of
        {noreply, St1, _Timeout} -> frames(More, St1);
        Stop -> Stop
    end.

%% The largest frame Python may send: a reply over max_message_size is answered as
%% message_too_large (reply/3), but log lines (64 KiB) and the ready frame always fit.
frame_limit(Max) ->
    max(Max, 1 bsl 17).

handle_frame(<<131, 104, 3, 119, 2, "ok", Rest/binary>> = Frame, St) ->
    answer(frame_id(Rest), Frame, St);
handle_frame(<<131, 104, 3, 119, 5, "error", Rest/binary>> = Frame, St) ->
    answer(frame_id(Rest), Frame, St);
handle_frame(<<131, 104, 6, 119, 8, "callback", Rest/binary>> = Frame, St) ->
    %% Python calls back (erlang.call/apply/send): the caller decodes and checks it under
    %% the pool's policy (erpy_policy); nothing from Python is decoded here but its id.
    callback(frame_id(Rest), Frame, St),
    {noreply, St, timeout(St)};
handle_frame(Frame, St) ->
    %% Control frames name only atoms erpy has: [safe] refuses any other.
    try binary_to_term(Frame, [safe]) of
        Term -> control(Term, St)
    catch
        error:badarg ->
            logger:error("erpy pool ~p: undecodable frame from Python", [St#st.pool],
                         #{domain => [erpy]}),
            {noreply, St, timeout(St)}
    end.

answer(Id, Frame, #st{pending = Pending} = St) ->
    case lists:keytake(Id, #req.id, Pending) of
        {value, #req{alias = Alias, mon = Mon, nested = Nested, started = Started}, Rest} ->
            Mon =:= undefined orelse erlang:demonitor(Mon, [flush]),
            Now = now_us(),
            served(Started, Now, St),
            %% The next waiting request goes to Python before this answer to its caller.
            St1 = case Nested of
                      false -> next_waiting(promote(St#st{pending = Rest}, Now), Now);
                      true -> St#st{pending = Rest}
                  end,
            reply(Alias, Frame, St),
            St2 = St1#st{calls = St#st.calls + 1},
            case {St2#st.pending, Nested} of
                {[], _} -> idle(St2);
                {_, false} -> {noreply, one_done(St2), timeout(St2)};
                {_, true} -> {noreply, St2, timeout(St2)}
            end;
        false ->
            {noreply, St, timeout(St)}
    end.

%% How long Python ran a request of the pool: an adaptive pool places short ones together
%% (erpy_pool:pack/1); other pools do not look.
served(undefined, _Now, _St) ->
    ok;
served(Started, Now, #st{withdraw = true, opts = Opts}) ->
    case Opts of
        #{pool_handle := Handle, slot := Slot} ->
            erpy_pool:served(Handle, Slot, max(0, Now - Started));
        _ ->
            ok
    end;
served(_Started, _Now, _St) ->
    ok.

%% A pipelined request was answered and more are in flight: its place in the slot is free.
one_done(#st{exiting = false, releasing = false, held = false, opts = Opts} = St) ->
    erpy_pool:finished(maps:get(pool_handle, Opts), maps:get(slot, Opts), self()),
    St;
one_done(St) ->
    St.

reply(undefined, _Frame, _St) ->
    ok;
reply(Alias, Frame, #st{max = Max}) when byte_size(Frame) > Max ->
    Alias ! {erpy_reply, Alias, {error, {message_too_large, byte_size(Frame), Max}}};
reply(Alias, Frame, _St) ->
    Alias ! {erpy_reply, Alias, Frame}.

idle(#st{exiting = true} = St) ->
    %% Python said it leaves (or is being killed): its slot stays taken until the pool
    %% has replaced it, so no request is sent to a process on its way out.
    {noreply, St, timeout(St)};
idle(#st{releasing = true} = St) ->
    reset_namespace(St),
    St#st.pool_pid ! {erpy_idle, self()},
    {noreply, St#st{releasing = false}, timeout(St)};
idle(#st{held = true} = St) ->
    {noreply, St, timeout(St)};
idle(#st{opts = Opts, calls = Calls} = St) ->
    case maps:get(recycle_after, Opts, infinity) of
        N when is_integer(N), Calls >= N ->
            %% Recycled: the pool starts a fresh worker in its place.
            erpy_pool:retire(maps:get(pool_handle, Opts), maps:get(slot, Opts)),
            {stop, {shutdown, recycled}, St};
        _ ->
            erpy_pool:finished(maps:get(pool_handle, Opts), maps:get(slot, Opts), self()),
            {noreply, St, timeout(St)}
    end.

control({ready, #{version := ?PROTOCOL_VERSION}}, #st{ready = false} = St) ->
    St#st.pool_pid ! {erpy_ready, self()},
    {noreply, St#st{ready = true}, timeout(St#st{ready = true})};
control({ready, #{version := V}}, #st{ready = false} = St) ->
    {stop, {shutdown, {protocol_version, V, ?PROTOCOL_VERSION}}, St};
control({log, Stream, Text}, St) ->
    %% notice: shown by a default logger setup, as print() output is expected to be.
    Level = case Stream of stderr -> warning; _ -> notice end,
    logger:log(Level, "~ts", [Text], #{domain => [erpy, python], pool => St#st.pool,
                                       worker => self(), os_pid => St#st.os_pid,
                                       stream => Stream}),
    {noreply, St, timeout(St)};
control({withdrawn, Id}, #st{pending = Pending} = St) ->
    %% Python dropped it unstarted: its caller places it again.
    case lists:keytake(Id, #req.id, Pending) of
        {value, #req{alias = Alias, mon = Mon}, Rest} ->
            Mon =:= undefined orelse erlang:demonitor(Mon, [flush]),
            Alias =:= undefined orelse (Alias ! {erpy_reply, Alias, {retry, busy}}),
            St1 = promote(St#st{pending = Rest}, now_us()),
            case Rest of
                [] -> idle(St1);
                _ -> {noreply, one_done(St1), timeout(St1)}
            end;
        false ->
            {noreply, St, timeout(St)}
    end;
control({exiting, Why}, St) when Why =:= memory_limit ->
    %% Python leaves on its own (memory limit): the exit status follows. (Control frames
    %% are decoded with [safe]: the atoms they may name are written here.)
    logger:notice("erpy pool ~p: worker ~p exits: ~p", [St#st.pool, St#st.os_pid, Why],
                  #{domain => [erpy]}),
    retire(St),
    {noreply, hand_back({worker_exit, Why}, St#st{exiting = true}), timeout(St)};
control(Other, St) ->
    logger:error("erpy pool ~p: unexpected frame from Python: ~P", [St#st.pool, Other, 10],
                 #{domain => [erpy]}),
    {noreply, St, timeout(St)}.

callback(undefined, _Frame, St) ->
    logger:error("erpy pool ~p: callback frame without an id", [St#st.pool], #{domain => [erpy]});
callback(CbId, Frame, #st{pending = [#req{alias = Alias} | _]} = St) when Alias =/= undefined ->
    Alias ! {erpy_callback, Alias, self(), St#st.port, CbId, Frame};
callback(CbId, _Frame, St) ->
    send_frame(St, {reply, CbId, error, no_caller}).

%% Python is gone: what it ran failed with it; what it had not started yet (pipelined
%% behind, or waiting here) goes back to its caller, who places it again.
fail_pending(Reason, #st{pending = Pending} = St) ->
    Running = running(Pending),
    [A ! {erpy_reply, A, {error, Reason}} || #req{alias = A} <- Running, A =/= undefined],
    St1 = hand_back(Reason, St#st{pending = []}),
    [A ! {erpy_reply, A, {retry, Reason}}
     || #req{alias = A} <- lists:nthtail(length(Running), Pending), A =/= undefined],
    St1.

%% The requests waiting here go back to their callers, which place them again.
hand_back(Reason, #st{waiting = Waiting} = St) ->
    [begin
         Mon =:= undefined orelse erlang:demonitor(Mon, [flush]),
         A ! {erpy_reply, A, {retry, Reason}}
     end || #req{alias = A, mon = Mon} <- queue:to_list(Waiting)],
    St#st{waiting = queue:new()}.

cancel_all(#st{pending = Pending} = St) ->
    [send_frame(St, {cancel, Id}) || #req{id = Id} <- Pending],
    hand_back({worker_exit, released},
              St#st{pending = [R#req{alias = undefined, deadline = grace_deadline(St)} || R <- Pending]}).

%% No more requests for this worker's slot until the pool has replaced it.
retire(#st{opts = Opts}) ->
    erpy_pool:retire(maps:get(pool_handle, Opts), maps:get(slot, Opts)).

%% Without write-ahead, a request goes to Python only when Python works on no other
%% request of the pool.
room(#st{pending = Pending}) ->
    not lists:keymember(false, #req.nested, Pending).

%% A request from a caller goes to Python (its frame is added to `Frames`, written by the
%% caller of place/9) or waits here; then the next one in the mailbox, up to `N` in all.
place(Alias, Caller, Id, Bin, Deadline, Now, St, Frames, N) ->
    Req = #req{id = Id, alias = Alias, caller = Caller, deadline = Deadline, since = Now},
    {St1, Frames1} = case St#st.write_ahead orelse room(St) of
                         true -> {written(Req, Now, St), [Bin | Frames]};
                         false -> {St#st{waiting = queue:in(Req#req{frame = Bin}, St#st.waiting)}, Frames}
                     end,
    receive
        {erpy_request, Alias2, Caller2, Id2, Bin2, Deadline2} when N > 1 ->
            place(Alias2, Caller2, Id2, Bin2, Deadline2, Now, St1, Frames1, N - 1)
    after 0 ->
        {St1, lists:reverse(Frames1)}
    end.

%% Writes a request to Python; it starts now if Python works on no other of the pool,
%% else it waits in Python behind that one (and may be withdrawn, #st.withdraw).
start(Req, Bin, Now, #st{port = Port} = St) ->
    write(Port, Bin),
    written(Req, Now, St).

%% A request is in Python's pipe.
written(Req, Now, #st{pending = Pending} = St) ->
    case lists:keymember(false, #req.nested, Pending) of
        false ->
            started(Now, St),
            St#st{pending = Pending ++ [Req#req{frame = undefined, started = Now}]};
        true ->
            withdraw_timer(St#st{pending = Pending ++ [Req#req{frame = undefined}]})
    end.

%% Only a worker of the pool withdraws: the requests of a held (checked out) worker have
%% nowhere else to go, and a leaving one gives back all it has anyway.
withdraw_timer(#st{withdraw = true, withdraw_timer = undefined, held = false, releasing = false,
                   exiting = false} = St) ->
    St#st{withdraw_timer = erlang:start_timer(?WITHDRAW_MS, self(), withdraw)};
withdraw_timer(St) ->
    St.

%% The requests written behind one that has run ?WITHDRAW_MS are withdrawn (Python
%% answers {withdrawn, Id} for each it had not started); while the running one is
%% younger, the timer looks again.
withdraw_behind(#st{pending = Pending, port = Port, held = false, releasing = false,
                    exiting = false} = St) when Port =/= undefined ->
    case running_since(St) of
        Since when is_integer(Since) ->
            case now_us() - Since >= ?WITHDRAW_MS * 1000 of
                true ->
                    Pending1 = [case R of
                                    #req{nested = false, started = undefined, withdrawing = false, id = Id} ->
                                        send_frame(St, {withdraw, Id}),
                                        R#req{withdrawing = true};
                                    _ ->
                                        R
                                end || R <- Pending],
                    St#st{pending = Pending1};
                false ->
                    withdraw_timer(St)
            end;
        _ ->
            St
    end;
withdraw_behind(St) ->
    St.

%% A request of the pool was answered: the next one written to Python starts now.
promote(#st{pending = Pending} = St, Now) ->
    case lists:keyfind(false, #req.nested, Pending) of
        #req{started = undefined, id = Id} = R ->
            started(Now, St),
            St#st{pending = lists:keyreplace(Id, #req.id, Pending, R#req{started = Now})};
        _ ->
            St
    end.

%% Python starts a request of the pool: the pool's adaptive pipelining writes more only
%% behind a young one (erpy_pool:claim/1); a pool with a fixed depth does not look.
started(Now, #st{withdraw = true, opts = Opts}) ->
    erpy_pool:started(maps:get(pool_handle, Opts), maps:get(slot, Opts), Now);
started(_Now, _St) ->
    ok.

%% When Python started the request of the pool it works on, if it does.
running_since(#st{pending = Pending}) ->
    case lists:keyfind(false, #req.nested, Pending) of
        #req{started = Started} -> Started;
        false -> undefined
    end.

%% The waiting requests go back to their callers; their places in the slot are free
%% again (unless the slot is not the pool's now: lent out, or its worker leaving).
give_back(#st{waiting = Waiting, held = false, releasing = false, exiting = false,
              opts = Opts} = St) ->
    case queue:len(Waiting) of
        0 ->
            St;
        N ->
            St1 = hand_back(busy, St),
            [erpy_pool:unclaim(maps:get(pool_handle, Opts), maps:get(slot, Opts))
             || _ <- lists:seq(1, N)],
            St1
    end;
give_back(St) ->
    St.

%% Python answered a request of the pool: the oldest waiting one goes to it now.
next_waiting(#st{exiting = true} = St, _Now) ->
    St;
next_waiting(#st{waiting = Waiting} = St, Now) ->
    case queue:out(Waiting) of
        {{value, #req{frame = Bin} = Req}, Rest} ->
            case room(St) of
                true -> next_waiting(start(Req, Bin, Now, St#st{waiting = Rest}), Now);
                false -> St
            end;
        {empty, _} ->
            St
    end.

reset_namespace(St) ->
    send_frame(St, {reset}).

send_frame(#st{port = undefined}, _Term) ->
    ok;
send_frame(#st{port = Port}, Term) ->
    write(Port, term_to_binary(Term, [{minor_version, 2}])).

%% One frame to Python. Also used by callers answering Python's callbacks. A port that
%% closed (Python died) refuses writes until its exit is handled here, which fails or
%% places again every request it had: a lost write changes nothing.
-spec write(port(), iodata()) -> ok.
write(Port, Data) ->
    _ = erpy_frame:write(Port, 4, Data),
    ok.

frame_id(<<97, I, _/binary>>) -> I;
frame_id(<<98, I:32/signed, _/binary>>) -> I;
frame_id(<<110, N, 0, D:N/little-unit:8, _/binary>>) -> D;
frame_id(_) -> undefined.

grace(#st{opts = Opts}) ->
    maps:get(kill_grace_ms, Opts, 2000).

%% Cancelled requests get the grace period from now on to stop.
grace_deadline(_St) ->
    erlang:monotonic_time(millisecond).

%% One timer while requests are pending, every ?WATCH_MS: it watches their callers (see
%% #req.mon) and their deadlines.
watch(#st{watch = undefined, pending = [_ | _]} = St) ->
    St#st{watch = erlang:start_timer(?WATCH_MS, self(), watch)};
watch(St) ->
    St.

now_ms() ->
    erlang:monotonic_time(millisecond).

now_us() ->
    erlang:monotonic_time(microsecond).

%% The gen_server timeout only guards the start; deadlines are checked by the watch timer
%% (a receive timeout set at every message cost a timer per message).
timeout(#st{ready = false}) ->
    ?READY_TIMEOUT_MS;
timeout(_St) ->
    infinity.

overdue(#st{pending = Pending} = St) ->
    Now = now_ms(),
    lists:any(fun(#req{deadline = D}) -> D =/= infinity andalso D + grace(St) =< Now end,
              running(Pending)).

%% The requests Python has started: the nested ones and the request they nest in.
%% Pipelined requests behind it have not started, so their deadlines cannot be overdue.
running([#req{nested = true} = R | Rest]) -> [R | running(Rest)];
running([R | _]) -> [R];
running([]) -> [].

%% Kills the worker and its process group (the worker leads it: see the module doc).
%% POSIX keeps a pid from reuse while a group of that id exists, so once the worker is
%% gone the group is still only its own; a pid reused by now is left alone.
kill(#st{os_pid = undefined}) ->
    ok;
kill(#st{os_pid = OsPid, started = Started}) ->
    case proc_stat(OsPid) of
        {_, Start} when Started =/= undefined, Start =/= Started ->
            ok;
        _ ->
            P = integer_to_list(OsPid),
            _ = os:cmd("kill -KILL -" ++ P ++ " " ++ P ++ " 2>/dev/null"),
            ok
    end.

alive_timer(undefined) ->
    undefined;
alive_timer(_Started) ->
    erlang:start_timer(?ALIVE_MS, self(), alive).

os_process_alive(#st{os_pid = OsPid, started = Started}) ->
    case proc_stat(OsPid) of
        {State, Started} -> State =/= $Z andalso State =/= $X;
        _ -> false
    end.

%% {State, StartTime} of a process from /proc/Pid/stat, or gone. A raw file: no round
%% trip through the file server.
proc_stat(OsPid) ->
    case file:open("/proc/" ++ integer_to_list(OsPid) ++ "/stat", [read, raw, binary]) of
        {ok, Fd} ->
            Read = file:read(Fd, 1024),
            _ = file:close(Fd),
            case Read of
                {ok, Stat} -> parse_stat(Stat);
                _ -> gone
            end;
        {error, _} ->
            gone
    end.

%% "Pid (comm) State Ppid ... StartTime ...": the command may hold spaces and
%% parentheses, so fields are counted from the last ')'; StartTime is field 22.
parse_stat(Stat) ->
    case binary:matches(Stat, <<")">>) of
        [] ->
            gone;
        Ms ->
            {Pos, 1} = lists:last(Ms),
            Rest = binary:part(Stat, Pos + 1, byte_size(Stat) - Pos - 1),
            case string:lexemes(Rest, " \n") of
                [<<State, _/binary>> | Fields] when length(Fields) >= 19 ->
                    {State, binary_to_integer(lists:nth(19, Fields))};
                _ ->
                    gone
            end
    end.
