%% A pool of Python workers: a fixed number of slots, each served by one worker process.
%%
%% Callers claim an idle slot themselves (an atomics compare-and-swap) and send their
%% request straight to its worker, so a call costs no message to this server. Only when
%% every slot is busy does a request come here, to wait in order; a worker that finishes
%% while requests wait hands its slot to this server instead of freeing it. The server
%% also lends workers out (checkout), and keeps the pool's size by replacing workers that
%% die, with back-off when they die before they were ever ready.
-module(erpy_pool).
-behaviour(gen_server).

-export([start_link/3, lookup/1, max_message_size/1, info/1]).
-export([claim/1, unclaim/2, retire/2, worker_pid/2, started/3, finished/3, served/3]).
-export([pipeline/1]).
-export([checkout/2, checkin/1]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-export_type([worker/0, handle/0]).

%% A held worker, as erpy_port hands it to erpy_transport.
-type worker() :: {erpy:pool(), pid()}.
%% What callers need to claim a slot without asking the server.
-type handle() :: #{pid := pid(), name := atom(), size := pos_integer(),
                    slots := atomics:atomics_ref(), queued := counters:counters_ref(),
                    depth := pos_integer(), write_ahead := boolean(),
                    young_us := non_neg_integer() | infinity,
                    started := atomics:atomics_ref(),
                    service := atomics:atomics_ref(),
                    max_message_size := non_neg_integer(),
                    policy := erpy_policy:policy()}.

-record(st, {
    name :: atom(),
    opts :: map(),
    handle :: handle(),
    worker_sup :: pid() | undefined,
    size :: pos_integer(),
    %% Pid => #{slot, state, aliases}; state: starting | idle | busy | {held, Mon} |
    %% releasing. `aliases`: the callers of the last requests this server handed the
    %% worker (as many as may be in flight), told if the worker process itself dies.
    workers = #{} :: #{pid() => map()},
    %% Requests and checkouts that found no slot, oldest first.
    queue = queue:new() :: queue:queue(),
    holders = #{} :: #{reference() => pid()},
    %% Slots whose workers start once the first one is ready.
    deferred = [] :: [pos_integer()],
    failed_starts = 0 :: non_neg_integer()
}).

-define(TABLE, erpy_workers).
-define(MAX_BACKOFF_MS, 5000).
-define(DEFER_MS, 1000).
%% A slot's value is the number of requests its worker has in flight, or UNAVAILABLE while
%% it has no worker to take requests (starting, replaced, lent out, leaving).
-define(FREE, 0).
-define(UNAVAILABLE, 16#100000).
%% Adaptive pipelining (the default): at most this many requests per worker, one running
%% and the rest written to its pipe behind it, and only onto a worker whose running
%% request started less than ?YOUNG_US ago. A request written behind one that turns out
%% long is withdrawn from Python before it starts and placed again (erpy_port_worker).
-define(AUTO_DEPTH, 4).
-define(YOUNG_US, 1000).
%% With adaptive pipelining, requests go to the first workers while their requests are
%% short (a mean service time under ?PACK_US, as the workers measure it): a short request
%% is written behind a young one on the first worker rather than woken up on an idle
%% worker of its own, which on a machine with few cores costs more than it saves (another
%% OS process to schedule, its pipe, its wake-ups). Workers whose requests are longer, or
%% a first worker that is full or busy past ?YOUNG_US, spread the requests as before. A
%% worker starts out counted slow (?SERVICE_START_US), so packing needs short answers first.
-define(PACK_US, 200).
-define(SERVICE_START_US, 1000).

%% API.

%% `PoolSup` is the pool's supervisor; the worker supervisor is its sibling.
-spec start_link(atom(), map(), pid()) -> {ok, pid()} | {error, term()}.
start_link(Name, Opts, PoolSup) ->
    gen_server:start_link(?MODULE, {Name, Opts, PoolSup}, []).

-spec lookup(erpy:pool()) -> {ok, handle()} | error.
lookup(Name) ->
    case erpy_transport:lookup(Name) of
        {ok, erpy_port, Handle} -> {ok, Handle};
        _ -> error
    end.

-spec max_message_size(erpy:pool()) -> non_neg_integer().
max_message_size(Name) ->
    case lookup(Name) of
        {ok, #{max_message_size := Max}} -> Max;
        error -> application:get_env(erpy, max_message_size, 10485760)
    end.

-spec info(erpy:pool()) -> map().
info(Name) ->
    {ok, #{pid := Pid}} = lookup(Name),
    gen_server:call(Pid, info).

%% Claims a slot for one request: the lowest idle one, so a light load keeps one Python
%% hot. With no idle slot, pipelining may place it on a busy one with fewer than `depth`
%% requests, the one with the fewest: adaptive (`pipeline => auto`), only where the request
%% Python works on started less than `young_us` ago, so a long call takes no more;
%% `pipeline => N`, any.
-spec claim(handle()) -> {ok, pos_integer()} | none.
claim(#{slots := Slots, size := Size, depth := Depth} = Handle) ->
    case pack(Handle) of
        {ok, _} = Packed ->
            Packed;
        none ->
            case claim_idle(Slots, 1, Size, 1) of
                none when Depth > 1 -> claim_busy(Handle, young_since(Handle));
                Claimed -> Claimed
            end
    end.

%% Adaptive pipelining: the first worker (in slot order) that is busy with short requests,
%% young and not full takes this one too; none when a worker before such a one is idle
%% (claim_idle/4 takes that one) or when no worker qualifies.
pack(#{young_us := infinity}) ->
    none;
pack(#{size := Size} = Handle) ->
    pack(Handle, young_since(Handle), 1, Size).

pack(_Handle, _Since, I, Size) when I > Size ->
    none;
pack(#{slots := Slots, depth := Depth, started := Started, service := Service} = Handle, Since, I, Size) ->
    case atomics:get(Slots, I) of
        ?FREE ->
            none;
        N when N < Depth ->
            case atomics:get(Service, I) < ?PACK_US andalso atomics:get(Started, I) >= Since of
                true ->
                    case atomics:compare_exchange(Slots, I, N, N + 1) of
                        ok -> {ok, I};
                        _ -> pack(Handle, Since, I, Size)     % raced: look again
                    end;
                false ->
                    pack(Handle, Since, I + 1, Size)
            end;
        _ ->
            pack(Handle, Since, I + 1, Size)
    end.

claim_idle(_Slots, I, Size, _To) when I > Size ->
    none;
claim_idle(Slots, I, Size, To) ->
    case atomics:compare_exchange(Slots, I, ?FREE, To) of
        ok -> {ok, I};
        _ -> claim_idle(Slots, I + 1, Size, To)
    end.

%% Requests Python started at or after this (monotonic us) are young.
young_since(#{young_us := infinity}) -> undefined;
young_since(#{young_us := Us}) -> erlang:monotonic_time(microsecond) - Us.

claim_busy(#{slots := Slots, size := Size, depth := Depth, started := Started} = Handle, Since) ->
    case least_busy(Slots, Started, Since, 1, Size, Depth, none) of
        none ->
            none;
        {N, I} ->
            case atomics:compare_exchange(Slots, I, N, N + 1) of
                ok -> {ok, I};
                _ -> claim_busy(Handle, Since)                 % raced: look again
            end
    end.

least_busy(_Slots, _Started, _Since, I, Size, _Depth, Best) when I > Size ->
    Best;
least_busy(Slots, Started, Since, I, Size, Depth, Best) ->
    Next = case atomics:get(Slots, I) of
               N when N >= 1, N < Depth, (Best =:= none orelse {N, I} < Best) ->
                   case Since =:= undefined orelse atomics:get(Started, I) >= Since of
                       true -> {N, I};
                       false -> Best
                   end;
               _ ->
                   Best
           end,
    least_busy(Slots, Started, Since, I + 1, Size, Depth, Next).

-spec unclaim(handle(), pos_integer()) -> ok.
unclaim(#{slots := Slots}, Slot) ->
    atomics:sub(Slots, Slot, 1).

%% A worker that is leaving: no more requests for its slot until it is replaced.
-spec retire(handle(), pos_integer()) -> ok.
retire(#{slots := Slots}, Slot) ->
    atomics:put(Slots, Slot, ?UNAVAILABLE).

-spec worker_pid(atom(), pos_integer()) -> pid() | undefined.
worker_pid(Name, Slot) ->
    try ets:lookup_element(?TABLE, {Name, Slot}, 2)
    catch error:badarg -> undefined
    end.

%% Python starts a request of the pool on the worker of `Slot` at `Now` (monotonic us).
-spec started(handle(), pos_integer(), integer()) -> ok.
started(#{started := Started}, Slot, Now) ->
    atomics:put(Started, Slot, Now).

%% A worker answered a request of the pool that Python ran for `Us` microseconds: the
%% slot's mean service time (a moving average over about 8 requests) follows it.
-spec served(handle(), pos_integer(), non_neg_integer()) -> ok.
served(#{service := Service}, Slot, Us) ->
    Old = atomics:get(Service, Slot),
    atomics:put(Service, Slot, Old + (min(Us, 1000000) - Old) div 8).

%% A worker answered one request: one less in flight, or, if requests wait at the
%% server, its place goes to the server (which gives it the next one).
-spec finished(handle(), pos_integer(), pid()) -> ok.
finished(#{slots := Slots, queued := Queued, pid := Pid}, Slot, Worker) ->
    case counters:get(Queued, 1) of
        0 -> atomics:sub(Slots, Slot, 1);
        _ -> Pid ! {erpy_idle, Worker}
    end,
    ok.

-spec checkout(erpy:pool(), timeout()) -> {ok, worker()} | {error, term()}.
checkout(Pool, Timeout) ->
    case lookup(Pool) of
        {ok, #{pid := Pid, queued := Queued}} ->
            Deadline = case Timeout of
                           infinity -> infinity;
                           _ -> erlang:monotonic_time(millisecond) + Timeout
                       end,
            counters:add(Queued, 1, 1),
            Tag = make_ref(),
            try gen_server:call(Pid, {checkout, self(), Deadline, Tag}, Timeout) of
                {ok, WorkerPid} -> {ok, {Pool, WorkerPid}};
                Error -> Error
            catch
                exit:{timeout, _} ->
                    %% Given up: a worker lent meanwhile must come back.
                    gen_server:cast(Pid, {cancel_checkout, Tag}),
                    {error, timeout};
                exit:{noproc, _} ->
                    {error, {no_pool, Pool}}
            end;
        error ->
            {error, {no_pool, Pool}}
    end.

-spec checkin(worker()) -> ok.
checkin({Pool, WorkerPid}) ->
    case lookup(Pool) of
        {ok, #{pid := Pid}} -> gen_server:cast(Pid, {checkin, WorkerPid});
        error -> ok
    end.

%% gen_server.

service_atomics(Size) ->
    A = atomics:new(Size, [{signed, true}]),
    [atomics:put(A, I, ?SERVICE_START_US) || I <- lists:seq(1, Size)],
    A.

-spec init(term()) -> {ok, #st{}}.
init({Name, Opts, PoolSup}) ->
    process_flag(trap_exit, true),
    Size = maps:get(size, Opts),
    Slots = atomics:new(Size, [{signed, false}]),
    %% Every slot is unavailable until its worker is ready.
    [atomics:put(Slots, I, ?UNAVAILABLE) || I <- lists:seq(1, Size)],
    {Depth, WriteAhead, Young} = pipeline(Opts),
    Handle = #{pid => self(), name => Name, size => Size, slots => Slots,
               depth => Depth, write_ahead => WriteAhead, young_us => Young,
               started => atomics:new(Size, [{signed, true}]),
               service => service_atomics(Size),
               queued => counters:new(1, [write_concurrency]),
               max_message_size => maps:get(max_message_size, Opts),
               policy => erpy_policy:new(Name, Opts)},
    ok = erpy_transport:register(Name, erpy_port, Handle),
    %% The supervisor is still starting us: ask it for our sibling once it is done.
    self() ! {start_workers, PoolSup},
    {ok, #st{name = Name, opts = Opts#{pool_handle => Handle}, handle = Handle, size = Size}}.

-spec handle_call(term(), gen_server:from(), #st{}) -> {reply, term(), #st{}} | {noreply, #st{}}.
handle_call({checkout, Holder, Deadline, Tag}, From, St) ->
    {noreply, dispatch({checkout, From, Holder, Deadline, Tag}, St)};
handle_call(info, _From, #st{} = St) ->
    States = [S || #{state := S} <- maps:values(St#st.workers)],
    {reply, #{name => St#st.name, size => St#st.size,
              workers => maps:size(St#st.workers),
              ready => length([S || S <- States, S =/= starting]),
              queued => queue:len(St#st.queue),
              held => maps:size(St#st.holders),
              worker_pids => lists:sort(maps:keys(St#st.workers))}, St};
handle_call(_Msg, _From, St) ->
    {reply, {error, unknown_call}, St}.

-spec handle_cast(term(), #st{}) -> {noreply, #st{}}.
handle_cast({checkin, Worker}, St) ->
    case [M || {M, W} <- maps:to_list(St#st.holders), W =:= Worker] of
        [Mon | _] ->
            erlang:demonitor(Mon, [flush]),
            {noreply, release(Worker, St#st{holders = maps:remove(Mon, St#st.holders)})};
        [] ->
            {noreply, St}
    end;
handle_cast({cancel_checkout, Tag}, St) ->
    {Dropped, Q} = lists:partition(fun({checkout, _, _, _, T}) -> T =:= Tag; (_) -> false end,
                                   queue:to_list(St#st.queue)),
    St1 = uncount(length(Dropped), St#st{queue = queue:from_list(Q)}),
    Lent = [{Mon, W} || {Mon, W} <- maps:to_list(St1#st.holders),
                        maps:get(tag, maps:get(W, St1#st.workers, #{}), undefined) =:= Tag],
    St2 = lists:foldl(fun({Mon, W}, S) ->
                              erlang:demonitor(Mon, [flush]),
                              release(W, S#st{holders = maps:remove(Mon, S#st.holders)})
                      end, St1, Lent),
    {noreply, St2};
handle_cast(_Msg, St) ->
    {noreply, St}.

-spec handle_info(term(), #st{}) -> {noreply, #st{}}.
handle_info({erpy_request, Alias, _Caller, _Id, _Bin, _Deadline} = Req, St) ->
    %% The caller found no free slot (and counted itself as queued).
    {noreply, dispatch({request, Alias, Req}, St)};
handle_info({erpy_idle, Worker}, #st{handle = #{slots := Slots}} = St) ->
    case maps:find(Worker, St#st.workers) of
        {ok, #{state := {held, _}}} -> {noreply, St};
        {ok, #{state := releasing, slot := Slot}} ->
            %% Back from a checkout: the slot is this server's until next/2 passes it on.
            atomics:put(Slots, Slot, 1),
            {noreply, next(Worker, St)};
        {ok, _} -> {noreply, next(Worker, St)};
        error -> {noreply, St}
    end;
handle_info({erpy_ready, Worker}, #st{handle = #{slots := Slots}} = St) ->
    case maps:find(Worker, St#st.workers) of
        {ok, #{state := starting, slot := Slot}} ->
            ets:insert(?TABLE, {{St#st.name, Slot}, Worker}),
            atomics:put(Slots, Slot, 1),
            {noreply, next(Worker, start_deferred(St#st{failed_starts = 0}))};
        _ ->
            {noreply, St}
    end;
handle_info({'DOWN', Mon, process, Pid, Why}, St) ->
    case maps:take(Mon, St#st.holders) of
        {Worker, Holders} ->
            %% The holder died: its worker comes back, interrupted if it was working.
            {noreply, release(Worker, St#st{holders = Holders})};
        error ->
            {noreply, worker_down(Pid, Why, St)}
    end;
handle_info({start_workers, PoolSup}, St) ->
    [WorkerSup] = [Pid || {workers, Pid, _, _} <- supervisor:which_children(PoolSup)],
    %% The first worker starts alone and the others once it is ready (or after
    %% ?DEFER_MS): Pythons starting together share the CPUs, so the pool would answer its
    %% first call later.
    erlang:send_after(?DEFER_MS, self(), start_deferred),
    St1 = St#st{worker_sup = WorkerSup, deferred = lists:seq(2, St#st.size)},
    {noreply, start_worker(1, St1)};
handle_info(start_deferred, St) ->
    {noreply, start_deferred(St)};
handle_info({start_worker, Slot}, St) ->
    {noreply, start_worker(Slot, St)};
handle_info(_Msg, St) ->
    {noreply, St}.

-spec terminate(term(), #st{}) -> ok.
terminate(_Why, #st{name = Name, size = Size}) ->
    ok = erpy_transport:unregister(Name),
    [ets:delete(?TABLE, {Name, Slot}) || Slot <- lists:seq(1, Size)],
    ok.

%% `pipeline`: auto (adaptive, the default), 1 (off) or N > 1 (N requests written to a
%% worker at once, wherever they wait). As {depth, write ahead, young_us}.
-spec pipeline(map()) -> {pos_integer(), boolean(), non_neg_integer() | infinity}.
pipeline(Opts) ->
    case maps:get(pipeline, Opts, auto) of
        auto -> {?AUTO_DEPTH, true, ?YOUNG_US};
        N when is_integer(N), N > 1 -> {N, true, infinity};
        _ -> {1, false, infinity}
    end.

%% Internal.

start_worker(Slot, #st{worker_sup = Sup, name = Name, opts = Opts} = St) ->
    %% A new worker starts out counted slow (see ?PACK_US).
    atomics:put(maps:get(service, St#st.handle), Slot, ?SERVICE_START_US),
    case supervisor:start_child(Sup, [Name, self(), Opts#{slot => Slot}]) of
        {ok, Pid} ->
            erlang:monitor(process, Pid),
            St#st{workers = (St#st.workers)#{Pid => #{slot => Slot, state => starting}}};
        {error, Why} ->
            logger:warning("erpy pool ~p: cannot start a worker: ~p", [Name, Why],
                           #{domain => [erpy]}),
            schedule_start(Slot, St#st{failed_starts = St#st.failed_starts + 1})
    end.

start_deferred(#st{deferred = Slots} = St) ->
    lists:foldl(fun(Slot, S) -> start_worker(Slot, S) end, St#st{deferred = []}, Slots).

schedule_start(Slot, #st{failed_starts = N} = St) ->
    Delay = min(?MAX_BACKOFF_MS, 10 bsl min(N, 10)),
    erlang:send_after(Delay, self(), {start_worker, Slot}),
    St.

worker_down(Pid, Why, #st{handle = #{slots := Slots}} = St) ->
    case maps:take(Pid, St#st.workers) of
        {#{slot := Slot, state := State} = W, Workers} ->
            %% The slot stays unavailable until the replacement is ready.
            atomics:put(Slots, Slot, ?UNAVAILABLE),
            ets:delete(?TABLE, {St#st.name, Slot}),
            %% Requests this server gave the worker, if it could not answer them itself.
            %% Aliases of answered requests are inactive: those messages are dropped. A
            %% worker that leaves in order ({shutdown, _}) answers every request it took,
            %% so one it left unanswered was still in its mailbox: it never ran, and its
            %% caller places it again, as for a request sent straight to such a worker.
            Answer = case Why of
                         {shutdown, _} -> {retry, {worker_exit, Why}};
                         _ -> {error, {worker_exit, Why}}
                     end,
            [Alias ! {erpy_reply, Alias, Answer} || Alias <- maps:get(aliases, W, [])],
            St1 = St#st{workers = Workers},
            case State of
                starting -> schedule_start(Slot, St1#st{failed_starts = St1#st.failed_starts + 1});
                _ -> start_worker(Slot, St1)
            end;
        error ->
            St
    end.

%% A request or checkout that found no free slot: take one if one came free meanwhile,
%% else wait in line.
dispatch(Item, #st{handle = Handle} = St) ->
    Claimed = case Item of
                  %% A checkout needs an idle worker, and nobody may pipeline onto it.
                  {checkout, _, _, _, _} -> claim_idle(maps:get(slots, Handle), 1, St#st.size, ?UNAVAILABLE);
                  _ -> claim(Handle)
              end,
    case Claimed of
        {ok, Slot} ->
            case worker_pid(St#st.name, Slot) of
                undefined ->
                    unclaim(Handle, Slot),
                    St#st{queue = queue:in(Item, St#st.queue)};
                Worker ->
                    assign(Worker, Item, uncount(1, St))
            end;
        none ->
            St#st{queue = queue:in(Item, St#st.queue)}
    end.

%% A worker whose slot this server holds is free: give it the oldest live item, or free
%% the slot.
next(Worker, #st{handle = #{slots := Slots}} = St) ->
    case queue:out(St#st.queue) of
        {{value, Item}, Q} ->
            St1 = uncount(1, St#st{queue = Q}),
            case expired(Item) of
                true -> next(Worker, St1);
                false -> assign(Worker, Item, St1)
            end;
        {empty, _} ->
            #{slot := Slot} = W = maps:get(Worker, St#st.workers),
            atomics:sub(Slots, Slot, 1),
            St#st{workers = (St#st.workers)#{Worker => W#{state => idle}}}
    end.

assign(Worker, {request, Alias, Req}, #st{handle = #{depth := Depth}} = St) ->
    Worker ! Req,
    W = maps:get(Worker, St#st.workers),
    Aliases = lists:sublist([Alias | maps:get(aliases, W, [])], Depth),
    St#st{workers = (St#st.workers)#{Worker => W#{state => busy, aliases => Aliases}}};
assign(Worker, {checkout, From, Holder, _Deadline, Tag}, #st{handle = #{slots := Slots}} = St) ->
    W0 = maps:get(Worker, St#st.workers),
    atomics:put(Slots, maps:get(slot, W0), ?UNAVAILABLE),
    Mon = erlang:monitor(process, Holder),
    gen_server:reply(From, {ok, Worker}),
    erpy_port_worker:hold(Worker, Holder),
    W = maps:get(Worker, St#st.workers),
    St#st{workers = (St#st.workers)#{Worker => W#{state => {held, Mon}, tag => Tag}},
          holders = (St#st.holders)#{Mon => Worker}}.

%% A lent worker clears its namespace (and interrupts what it still runs for the
%% holder), then says it is idle; only then does it serve the queue again.
release(Worker, St) ->
    case maps:find(Worker, St#st.workers) of
        {ok, W} ->
            erpy_port_worker:release(Worker),
            St#st{workers = (St#st.workers)#{Worker => W#{state => releasing}}};
        error ->
            St
    end.

uncount(0, St) -> St;
uncount(N, #st{handle = #{queued := Queued}} = St) ->
    counters:sub(Queued, 1, N),
    St.

expired({request, _Alias, {erpy_request, _, _, _, _, Deadline}}) ->
    past(Deadline);
expired({checkout, _From, _Holder, Deadline, _Tag}) ->
    past(Deadline).

past(infinity) -> false;
past(Deadline) -> erlang:monotonic_time(millisecond) >= Deadline.
