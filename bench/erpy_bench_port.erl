%% Port mode: W1, W2, W3a, W3b, W4 and W6, each beside its reference measured
%% alternately in the same run, plus a worker's memory over many calls.
%%
%% The pipe floor is an open_port to `cat` with {packet, 4} echoing a frame of the same
%% size as erpy's request. CPU time is user+sys of every process involved (the VM, the
%% Python workers, cat), read from /proc in nanoseconds (schedstat).
-module(erpy_bench_port).

-export([rows/1]).
%% Shared with the other modes' workload modules.
-export([throughput/7, echo_binary/6, echo_maps/6, cold_start/4]).
-export([cat/0, echo/2, echoer/1, latencies/3, concurrent/2, cpu_ns/1, crypto_bytes/1,
         p99/1, fmt/2, os_pid/1, wait_ready/1]).

-define(POOL, erpy_bench_port).

%% API.

-spec rows(erpy_bench:ctx()) -> [erpy_bench:row()].
rows(#{root := Root} = Ctx) ->
    true = code:add_patha(filename:join([Root, "_build", "default", "lib", "erpy", "ebin"])),
    ok = application:load(erpy),
    application:set_env(erpy, pools, [{default, #{mode => port, size => 1}}]),
    {ok, _} = application:ensure_all_started(erpy),
    %% Every W1-W4 figure twice: quiet, then with one core busy (erpy_bench:loaded/2).
    Twice = fun(Measure) -> Measure() ++ erpy_bench:loaded(Ctx, Measure) end,
    Rows = [Twice(fun() -> w1_w4(Ctx) end),
            Twice(fun() -> w2(Ctx, <<"W2">>, #{size => 1, pipeline => 4}, <<"pool of 1, pipeline => 4">>) end),
            Twice(fun() -> w2_defaults(Ctx) end),
            Twice(fun() -> w3a(Ctx) end), Twice(fun() -> w3b(Ctx) end), w6(Ctx), memory(Ctx)],
    application:stop(erpy),
    lists:append(Rows).

%% W1 (sequential add) and W4 (one callback into Erlang), each beside the pipe floor.
w1_w4(#{pairs := Pairs}) ->
    {ok, _} = erpy:start_pool(?POOL, #{size => 1, allowed => [{erlang, abs}]}),
    wait_ready(?POOL),
    Calls = 20000 div Pairs + 1,
    Callback = fun() -> {ok, 1} = erpy:eval(<<"erlang.call('erlang', 'abs', -1)">>, #{}, #{pool => ?POOL}) end,
    AddPool = fun() -> {ok, 3} = erpy:call(operator, add, [1, 2], #{pool => ?POOL}) end,
    Frame = erpy_call:encode_request(erpy_request:call(<<"operator">>, <<"add">>, [1, 2], #{}), 1, 5000, self()),
    Cat = cat(),
    Floor = fun() -> echo(Cat, Frame) end,
    Procs = fun() -> [os:getpid(), os_pid(Cat) | worker_os_pids(?POOL)] end,
    _ = [AddPool() || _ <- lists:seq(1, 2000)],            % warm up
    {ErpyRuns, FloorRuns} = erpy_bench:alternate(
        Pairs, fun() -> latencies(AddPool, Calls, Procs) end,
               fun() -> latencies(Floor, Calls, Procs) end),
    {CbRuns, AddRuns} = erpy_bench:alternate(
        Pairs, fun() -> latencies(Callback, Calls div 2, Procs) end,
               fun() -> latencies(AddPool, Calls div 2, Procs) end),
    port_close(Cat),
    erpy:stop_pool(?POOL),
    W1Ratio = erpy_bench:median([median(E) / median(F) || {{E, _}, {F, _}} <- lists:zip(ErpyRuns, FloorRuns)]),
    W4Ratio = erpy_bench:median([median(C) / median(A) || {{C, _}, {A, _}} <- lists:zip(CbRuns, AddRuns)]),
    All = fun(Runs) -> lists:append([L || {L, _} <- Runs]) end,
    Cpu = fun(Runs) -> lists:sum([C || {_, C} <- Runs]) / length(All(Runs)) / 1000 end,
    [#{id => <<"W1">>,
       workload => <<"port: latency of sequential operator.add(1, 2), us/call">>,
       erpy => fmt("median ~.1f us, p99 ~.1f us, ~.1f us CPU/call",
                   [median(All(ErpyRuns)), p99(All(ErpyRuns)), Cpu(ErpyRuns)]),
       reference => fmt("pipe floor ({packet,4} echo through cat): median ~.1f us, p99 ~.1f us, ~.1f us CPU/call",
                        [median(All(FloorRuns)), p99(All(FloorRuns)), Cpu(FloorRuns)]),
       ratio => W1Ratio, target => <<"<= 1.5x">>, pass => W1Ratio =< 1.5,
       notes => [fmt("~b pairs of ~b calls; ratio = erpy median / floor median per pair", [Pairs, Calls])]},
     #{id => <<"W4">>,
       workload => <<"port: Python calls erlang.call('erlang', 'abs', -1) once, us/round trip">>,
       erpy => fmt("median ~.1f us, p99 ~.1f us, ~.1f us CPU/call",
                   [median(All(CbRuns)), p99(All(CbRuns)), Cpu(CbRuns)]),
       reference => fmt("W1 (erpy:call of operator.add): median ~.1f us", [median(All(AddRuns))]),
       ratio => W4Ratio, target => <<"<= 2.5x">>, pass => W4Ratio =< 2.5,
       notes => [<<"the request is erpy:eval of the callback expression (compiled once, cached)">>]}].

%% W2: 4 concurrent callers x 5,000 calls against a pool configured by PoolOpts, beside
%% 4 callers each echoing through its own cat.
w2(Ctx, Id, PoolOpts, Config) ->
    {ok, _} = erpy:start_pool(?POOL, PoolOpts),
    wait_ready(?POOL),
    Rows = throughput(Ctx, Id,
                      fmt("port: throughput, 4 concurrent callers x 5,000 calls (~s), calls/s", [Config]),
                      ?POOL, fun() -> worker_os_pids(?POOL) end, 100000, []),
    erpy:stop_pool(?POOL),
    Rows.

%% W2': the same with a pool started with no options (adaptive pipelining, doc/internals.md),
%% held to the pipe floor: at least as many calls/s as 4 cat echoes.
w2_defaults(Ctx) ->
    [R#{target => <<">= 1.0x">>, pass => Ratio >= 1.0}
     || #{ratio := Ratio} = R <- w2(Ctx, <<"W2'">>, #{}, <<"pool started with no options: the defaults">>)].

%% W2 of any mode: 4 callers x 5,000 erpy:call(operator, add, [1, 2]) on `Pool` beside 4
%% callers each echoing through a cat of its own. `Extras` ({Text, OneCall}) are other
%% calls measured the same way in the same run, reported in the notes.
-spec throughput(erpy_bench:ctx(), binary(), binary(), atom(), fun(() -> [term()]), number(),
                 [{string(), fun(() -> term())}]) -> [erpy_bench:row()].
throughput(#{pairs := Pairs}, Id, Workload, Pool, Procs0, Target, Extras) ->
    Per = 5000,
    Frame = erpy_call:encode_request(erpy_request:call(<<"operator">>, <<"add">>, [1, 2], #{}), 1, 5000, self()),
    Echoers = [echoer(Frame) || _ <- lists:seq(1, 4)],
    Procs = fun() -> [os:getpid() | [P || {_, P} <- Echoers] ++ Procs0()] end,
    Callers = fun(Call) ->
                      fun() -> concurrent([fun() -> [Call() || _ <- lists:seq(1, Per)] end
                                           || _ <- lists:seq(1, 4)], Procs)
                      end
              end,
    ErpyRun = Callers(fun() -> {ok, 3} = erpy:call(operator, add, [1, 2], #{pool => Pool}) end),
    FloorRun = fun() ->
                   concurrent([fun() -> Ech ! {run, Per, self()}, receive {Ech, done} -> ok end end
                               || {Ech, _} <- Echoers], Procs)
               end,
    _ = ErpyRun(),
    {E, F} = erpy_bench:alternate(max(3, Pairs div 3), ErpyRun, FloorRun),
    Rate = fun({Ns, _}) -> 4 * Per / (Ns / 1.0e9) end,
    MedianRate = fun(Runs) -> round(erpy_bench:median([Rate(R) || R <- Runs])) end,
    ExtraNotes = [begin
                      Run = Callers(Call),
                      fmt("same run: 4 callers of ~s: ~b calls/s",
                          [Text, MedianRate([Run() || _ <- lists:seq(1, 3)])])
                  end || {Text, Call} <- Extras],
    [exit(Echoer, kill) || {Echoer, _} <- Echoers],
    CpuPer = fun(Runs) -> erpy_bench:median([C / (4 * Per) / 1000 || {_, C} <- Runs]) end,
    Ratio = erpy_bench:median([Rate(A) / Rate(B) || {A, B} <- lists:zip(E, F)]),
    ERate = erpy_bench:median([Rate(R) || R <- E]),
    [#{id => Id,
       workload => Workload,
       erpy => fmt("~b calls/s, ~.1f us CPU/call", [round(ERate), CpuPer(E)]),
       reference => fmt("4 callers x own cat echo: ~b echoes/s, ~.1f us CPU/echo",
                        [MedianRate(F), CpuPer(F)]),
       ratio => Ratio, target => fmt(">= ~s calls/s", [thousands(Target)]), pass => ERate >= Target,
       value => ERate,
       notes => [<<"ratio = erpy calls/s / floor echoes/s per pair; the target is absolute">>
                 | ExtraNotes]}].

thousands(N) when N >= 1000 -> io_lib:format("~b,~3..0b", [N div 1000, N rem 1000]);
thousands(N) -> integer_to_list(N).

%% W3a: echo a 1 MiB binary (Python gets bytes and returns them).
w3a(Ctx) ->
    {ok, _} = erpy:start_pool(?POOL, #{size => 1}),
    wait_ready(?POOL),
    Rows = echo_binary(Ctx, <<"port">>, ?POOL, fun() -> worker_os_pids(?POOL) end, 800,
                       [<<"random bytes (not UTF-8), so Python sees bytes; Python echoes with copy.copy">>]),
    erpy:stop_pool(?POOL),
    Rows.

%% W3b: echo the list of 10,000 maps.
w3b(Ctx) ->
    {ok, _} = erpy:start_pool(?POOL, #{size => 1}),
    wait_ready(?POOL),
    Rows = echo_maps(Ctx, <<"port">>, ?POOL, fun() -> worker_os_pids(?POOL) end, 10,
                     [<<"ratio = erpy ms / floor ms per pair">>]),
    erpy:stop_pool(?POOL),
    Rows.

%% W3a of any mode: erpy:call(copy, copy, [Bin]) on `Pool` beside a cat echo of the same
%% frame. `Procs` gives the OS pids outside the VM whose CPU time counts too.
-spec echo_binary(erpy_bench:ctx(), binary(), atom(), fun(() -> [term()]), number(), [binary()]) ->
    [erpy_bench:row()].
echo_binary(#{pairs := Pairs}, Mode, Pool, Procs0, Target, Notes) ->
    Bin = crypto_bytes(1 bsl 20),
    Frame = erpy_call:encode_request(erpy_request:call(<<"copy">>, <<"copy">>, [Bin], #{}), 1, 5000, self()),
    Cat = cat(),
    Procs = fun() -> [os:getpid(), os_pid(Cat) | Procs0()] end,
    Erpy = fun() -> {ok, Bin} = erpy:call(copy, copy, [Bin], #{pool => Pool}) end,
    Floor = fun() -> echo(Cat, Frame) end,
    N = 40,
    _ = [Erpy() || _ <- lists:seq(1, 5)],
    {E, F} = erpy_bench:alternate(Pairs, fun() -> latencies(Erpy, N, Procs) end,
                                  fun() -> latencies(Floor, N, Procs) end),
    port_close(Cat),
    MBs = fun({L, _}) -> (1 bsl 20) / median(L) end,          % bytes/us = MB/s
    Ratio = erpy_bench:median([MBs(A) / MBs(B) || {A, B} <- lists:zip(E, F)]),
    ERate = erpy_bench:median([MBs(R) || R <- E]),
    Cpu = fun(Runs) -> lists:sum([C || {_, C} <- Runs]) / (N * length(Runs)) / 1000 end,
    [#{id => <<"W3a">>,
       workload => fmt("~s: echo a 1 MiB binary, MB/s (payload / round trip)", [Mode]),
       erpy => fmt("~.1f MB/s, ~.1f us CPU/echo", [ERate, Cpu(E)]),
       reference => fmt("pipe floor (cat echo of the same frame): ~.1f MB/s, ~.1f us CPU/echo",
                        [erpy_bench:median([MBs(R) || R <- F]), Cpu(F)]),
       ratio => Ratio, target => fmt(">= ~b MB/s", [Target]), pass => ERate >= Target,
       notes => Notes}].

%% W3b of any mode: echo the list of 10,000 maps beside Erlang encode + cat + decode.
-spec echo_maps(erpy_bench:ctx(), binary(), atom(), fun(() -> [term()]), number(), [binary()]) ->
    [erpy_bench:row()].
echo_maps(#{pairs := Pairs}, Mode, Pool, Procs0, Target, Notes) ->
    T = erpy_bench_w5:term(),
    Cat = cat(),
    Procs = fun() -> [os:getpid(), os_pid(Cat) | Procs0()] end,
    Erpy = fun() -> {ok, T} = erpy:call(copy, copy, [T], #{pool => Pool}) end,
    %% The floor also pays Erlang's encode and decode: what any port bridge must do.
    Floor = fun() ->
                Frame = erpy_call:encode_request(erpy_request:call(<<"copy">>, <<"copy">>, [T], #{}), 1, 5000, self()),
                port_command(Cat, Frame),
                receive {Cat, {data, Back}} -> {request, _, #{args := [T]}} = binary_to_term(Back) end
            end,
    N = 10,
    _ = [Erpy() || _ <- lists:seq(1, 3)],
    {E, F} = erpy_bench:alternate(Pairs, fun() -> latencies(Erpy, N, Procs) end,
                                  fun() -> latencies(Floor, N, Procs) end),
    port_close(Cat),
    Ms = fun({L, _}) -> median(L) / 1000 end,
    Ratio = erpy_bench:median([Ms(A) / Ms(B) || {A, B} <- lists:zip(E, F)]),
    EMs = erpy_bench:median([Ms(R) || R <- E]),
    Cpu = fun(Runs) -> lists:sum([C || {_, C} <- Runs]) / (N * length(Runs)) / 1.0e6 end,
    [#{id => <<"W3b">>,
       workload => fmt("~s: echo a list of 10,000 maps, ms per round trip", [Mode]),
       erpy => fmt("~.2f ms, ~.2f ms CPU/echo", [EMs, Cpu(E)]),
       reference => fmt("floor (Erlang encode, cat echo, Erlang decode): ~.2f ms, ~.2f ms CPU/echo",
                        [erpy_bench:median([Ms(R) || R <- F]), Cpu(F)]),
       ratio => Ratio, target => fmt("<= ~b ms", [Target]), pass => EMs =< Target,
       notes => Notes}].

%% W6: pool start (4 workers) to first answered call, beside `erl -noshell -s init stop`.
w6(Ctx) ->
    Start = fun() ->
                T0 = erlang:monotonic_time(microsecond),
                {ok, _} = erpy:start_pool(?POOL, #{size => 4}),
                {ok, 3} = erpy:call(operator, add, [1, 2], #{pool => ?POOL, timeout => 30000}),
                T1 = erlang:monotonic_time(microsecond),
                erpy:stop_pool(?POOL),
                (T1 - T0) / 1000
            end,
    cold_start(Ctx, <<"port: cold start, pool of 4 started to first answered call, ms">>, Start,
               [<<"the first worker starts alone, the others once it is ready">>]).

%% W6 of any mode: `Start()` (ms from pool start to the first answer) beside the start of
%% an empty VM, `erl -noshell -s init stop`.
-spec cold_start(erpy_bench:ctx(), binary(), fun(() -> number()), [binary()]) -> [erpy_bench:row()].
cold_start(#{pairs := Pairs}, Workload, Start, Notes) ->
    Erl = os:find_executable("erl"),
    ErlStart = fun() ->
                   T0 = erlang:monotonic_time(microsecond),
                   _ = os:cmd(Erl ++ " -noshell -s init stop"),
                   (erlang:monotonic_time(microsecond) - T0) / 1000
               end,
    {E, F} = erpy_bench:alternate(max(5, Pairs div 2), Start, ErlStart),
    Ratio = erpy_bench:median([A / B || {A, B} <- lists:zip(E, F)]),
    EMs = erpy_bench:median(E),
    [#{id => <<"W6">>,
       workload => Workload,
       erpy => fmt("~.1f ms", [EMs]),
       reference => fmt("erl -noshell -s init stop: ~.1f ms", [erpy_bench:median(F)]),
       ratio => Ratio, target => <<"<= 100 ms">>, pass => EMs =< 100,
       notes => Notes}].

%% A worker's memory over many calls (1,000,000 unless BENCH_MEMORY_CALLS says otherwise).
memory(_Ctx) ->
    Calls = list_to_integer(os:getenv("BENCH_MEMORY_CALLS", "1000000")),
    {ok, _} = erpy:start_pool(?POOL, #{size => 1}),
    wait_ready(?POOL),
    [OsPid] = worker_os_pids(?POOL),
    Step = max(1, Calls div 10),
    Samples = [begin
                   [{ok, 3} = erpy:call(operator, add, [1, 2], #{pool => ?POOL}) || _ <- lists:seq(1, Step)],
                   rss_kb(OsPid)
               end || _ <- lists:seq(1, 10)],
    [OsPid] = worker_os_pids(?POOL),                          % the same worker all along
    erpy:stop_pool(?POOL),
    First = hd(Samples),
    Last = lists:last(Samples),
    Growth = (Last - First) / max(First, 1),
    [#{id => <<"M1">>,
       workload => fmt("port: a worker's RSS over ~b calls, KiB", [Calls]),
       erpy => fmt("~b KiB after ~b calls, ~b KiB after ~b", [First, Step, Last, Calls]),
       reference => fmt("samples every ~b calls: ~w", [Step, Samples]),
       ratio => Last / max(First, 1), target => <<"flat (< 5% growth)">>, pass => Growth < 0.05,
       notes => [<<"ratio = last sample / first sample">>]}].

%% Internal.

cat() ->
    open_port({spawn_executable, "/bin/cat"}, [{packet, 4}, binary, use_stdio]).

echo(Port, Frame) ->
    port_command(Port, Frame),
    receive {Port, {data, _}} -> ok end.

%% A process owning a cat port, echoing N frames when asked: {Pid, cat's OS pid}.
echoer(Frame) ->
    Self = self(),
    Pid = spawn(fun() ->
                        Cat = cat(),
                        Self ! {self(), os_pid(Cat)},
                        echo_loop(Cat, Frame)
                end),
    receive {Pid, OsPid} -> {Pid, OsPid} end.

echo_loop(Cat, Frame) ->
    receive
        {run, N, From} ->
            [echo(Cat, Frame) || _ <- lists:seq(1, N)],
            From ! {self(), done},
            echo_loop(Cat, Frame)
    end.

%% Runs F N times: per-call latencies in us, and the CPU ns all processes spent.
latencies(F, N, Procs) ->
    Pids = Procs(),
    C0 = cpu_ns(Pids),
    L = [begin
             T0 = erlang:monotonic_time(nanosecond),
             F(),
             (erlang:monotonic_time(nanosecond) - T0) / 1000
         end || _ <- lists:seq(1, N)],
    {L, cpu_ns(Pids) - C0}.

concurrent(Funs, Procs) ->
    Pids = Procs(),
    C0 = cpu_ns(Pids),
    Self = self(),
    T0 = erlang:monotonic_time(nanosecond),
    Ws = [spawn_link(fun() -> F(), Self ! {done, self()} end) || F <- Funs],
    [receive {done, W} -> ok end || W <- Ws],
    {erlang:monotonic_time(nanosecond) - T0, cpu_ns(Pids) - C0}.

%% CPU time (ns) of all threads of the given OS processes.
cpu_ns(OsPids) ->
    lists:sum([task_ns(P) || P <- OsPids]).

task_ns(OsPid) ->
    Dir = "/proc/" ++ to_list(OsPid) ++ "/task",
    case file:list_dir(Dir) of
        {ok, Tasks} ->
            lists:sum([case file:read_file(filename:join([Dir, T, "schedstat"])) of
                           {ok, S} -> binary_to_integer(hd(binary:split(S, <<" ">>)));
                           _ -> 0
                       end || T <- Tasks]);
        _ -> 0
    end.

rss_kb(OsPid) ->
    {ok, Status} = file:read_file("/proc/" ++ to_list(OsPid) ++ "/status"),
    {match, [Kb]} = re:run(Status, "VmRSS:\\s*(\\d+)", [{capture, [1], binary}]),
    binary_to_integer(Kb).

os_pid(Port) ->
    {os_pid, P} = erlang:port_info(Port, os_pid),
    P.

worker_os_pids(Pool) ->
    #{worker_pids := Ws} = erpy_pool:info(Pool),
    [gen_server:call(W, os_pid) || W <- Ws].

wait_ready(Pool) ->
    #{ready := R, size := S} = erpy_pool:info(Pool),
    case R >= S of
        true -> ok;
        false -> timer:sleep(10), wait_ready(Pool)
    end.

crypto_bytes(N) ->
    rand:seed(exsss, {1, 2, 3}),
    << <<(rand:uniform(256) - 1)>> || _ <- lists:seq(1, N) >>.

median(L) -> erpy_bench:median(L).

p99(L) ->
    S = lists:sort(L),
    lists:nth(max(1, round(length(S) * 0.99)), S).

to_list(P) when is_integer(P) -> integer_to_list(P);
to_list(P) -> P.

fmt(F, A) ->
    iolist_to_binary(io_lib:format(F, A)).
