%% Embedded mode: W1, W2, W3a, W3b, W4 and W6, each beside the pipe floor
%% (an open_port to `cat` with {packet, 4}) measured alternately in the same run, with
%% port mode's figure of the same workload in the notes.
%%
%% CPU time is user+sys of every thread of the VM (Python runs inside it) and of cat.
-module(erpy_bench_embedded).

-export([rows/1]).
-export([w2_in_this_vm/0]).  % run in a fresh VM by one_scheduler_w2/1

-define(POOL, erpy_bench_emb).
-define(PORT_POOL, erpy_bench_emb_port).

-import(erpy_bench_port, [cat/0, echo/2, latencies/3, p99/1, fmt/2, os_pid/1, wait_ready/1]).

%% API.

-spec rows(erpy_bench:ctx()) -> [erpy_bench:row()].
rows(#{root := Root} = Ctx) ->
    true = code:add_patha(filename:join([Root, "_build", "default", "lib", "erpy", "ebin"])),
    _ = application:load(erpy),
    {ok, _} = application:ensure_all_started(erpy),
    {ok, _} = erpy:start_pool(?PORT_POOL, #{mode => port, size => 1, allowed => [{erlang, abs}]}),
    wait_ready(?PORT_POOL),
    %% Every W1-W4 figure twice: quiet, then with one core busy (erpy_bench:loaded/2).
    Twice = fun(Measure) -> Measure() ++ erpy_bench:loaded(Ctx, Measure) end,
    [#{value := QuietW2}] = W2 = w2(Ctx, true),
    W2Loaded = [R#{ratio := V / QuietW2, target := <<">= 0.5x its quiet figure">>,
                   pass := V / QuietW2 >= 0.5,
                   notes := Notes ++ [fmt("ratio = loaded calls/s / quiet calls/s (~b); vs the "
                                          "dirty NIF under the same load: ~.2fx", [round(QuietW2), Ratio])]}
                || #{value := V, ratio := Ratio, notes := Notes} = R
                       <- erpy_bench:loaded(Ctx, fun() -> w2(Ctx, false) end)],
    Rows = [w6(Ctx), Twice(fun() -> w1_w4(Ctx) end), W2, W2Loaded,
            Twice(fun() -> w3a(Ctx) end), Twice(fun() -> w3b(Ctx) end)],
    erpy:stop_pool(?PORT_POOL),
    application:stop(erpy),
    lists:append(Rows).

%% W1 (sequential add) beside the pipe floor, and W4 (one callback) beside W1.
w1_w4(#{pairs := Pairs}) ->
    start(#{size => 1, allowed => [{erlang, abs}]}),
    Calls = 20000 div Pairs + 1,
    Add = fun() -> {ok, 3} = erpy:call(operator, add, [1, 2], #{pool => ?POOL}) end,
    PortAdd = fun() -> {ok, 3} = erpy:call(operator, add, [1, 2], #{pool => ?PORT_POOL}) end,
    Empty = fun() -> {ok, undefined} = erpy:eval(<<"None">>, #{}, #{pool => ?POOL}) end,
    Callback = fun() -> {ok, 1} = erpy:eval(<<"erlang.call('erlang', 'abs', -1)">>, #{}, #{pool => ?POOL}) end,
    Frame = erpy_call:encode_request(erpy_request:call(<<"operator">>, <<"add">>, [1, 2], #{}), 1, 5000, self()),
    Cat = cat(),
    Procs = fun() -> [os:getpid(), os_pid(Cat)] end,
    Floor = fun() -> echo(Cat, Frame) end,
    _ = [Add() || _ <- lists:seq(1, 5000)],
    {Runs, FloorRuns} = erpy_bench:alternate(
        Pairs, fun() -> latencies(Add, Calls, Procs) end, fun() -> latencies(Floor, Calls, Procs) end),
    {PortRuns, EmptyRuns} = erpy_bench:alternate(
        max(3, Pairs div 3), fun() -> latencies(PortAdd, Calls, Procs) end,
                             fun() -> latencies(Empty, Calls, Procs) end),
    %% The alternative thread model: a NIF that does nothing, on a dirty scheduler.
    Dirty = fun() -> 1 = erpy_nif:dirty_noop(1) end,
    {DirtyRuns, _} = erpy_bench:alternate(
        max(3, Pairs div 3), fun() -> latencies(Dirty, Calls, Procs) end,
                             fun() -> latencies(Add, Calls, Procs) end),
    {CbRuns, AddRuns} = erpy_bench:alternate(
        Pairs, fun() -> latencies(Callback, Calls div 2, Procs) end,
               fun() -> latencies(Add, Calls div 2, Procs) end),
    {ok, PyNs} = erpy:eval(<<"__import__('timeit').timeit('add(1, 2)', setup='from operator import add', "
                             "number=200000) / 200000 * 1e9">>, #{}, #{pool => ?POOL}),
    port_close(Cat),
    erpy:stop_pool(?POOL),
    Med = fun(Rs) -> median(lists:append([L || {L, _} <- Rs])) end,
    P99 = fun(Rs) -> p99(lists:append([L || {L, _} <- Rs])) end,
    Cpu = fun(Rs) -> lists:sum([C || {_, C} <- Rs]) / length(lists:append([L || {L, _} <- Rs])) / 1000 end,
    W1Ratio = erpy_bench:median([median(E) / median(F) || {{E, _}, {F, _}} <- lists:zip(Runs, FloorRuns)]),
    W4Ratio = erpy_bench:median([median(C) / median(A) || {{C, _}, {A, _}} <- lists:zip(CbRuns, AddRuns)]),
    [#{id => <<"W1">>,
       workload => <<"embedded: latency of sequential operator.add(1, 2), us/call">>,
       erpy => fmt("median ~.2f us, p99 ~.1f us, ~.1f us CPU/call", [Med(Runs), P99(Runs), Cpu(Runs)]),
       reference => fmt("pipe floor (cat echo): median ~.1f us, p99 ~.1f us, ~.1f us CPU/echo",
                        [Med(FloorRuns), P99(FloorRuns), Cpu(FloorRuns)]),
       ratio => W1Ratio, target => <<"<= 0.4x">>, pass => W1Ratio =< 0.4,
       notes => [fmt("~b pairs of ~b calls; ratio = erpy median / floor median per pair", [Pairs, Calls]),
                 fmt("same run: port mode ~.1f us; embedded empty eval (None) ~.2f us; "
                     "Python's own operator.add(1, 2) ~.1f ns; a dirty-scheduler NIF that does "
                     "nothing (the thread model not chosen) ~.2f us",
                     [Med(PortRuns), Med(EmptyRuns), PyNs, Med(DirtyRuns)])]},
     #{id => <<"W4">>,
       workload => <<"embedded: Python calls erlang.call('erlang', 'abs', -1) once, us/round trip">>,
       erpy => fmt("median ~.2f us, p99 ~.1f us, ~.1f us CPU/call", [Med(CbRuns), P99(CbRuns), Cpu(CbRuns)]),
       reference => fmt("W1 (embedded operator.add): median ~.2f us", [Med(AddRuns)]),
       ratio => W4Ratio, target => <<"<= 2.5x">>, pass => W4Ratio =< 2.5,
       notes => [<<"the request is erpy:eval of the callback expression (compiled once, cached)">>]}].

%% W2: 4 concurrent callers x 5,000 calls on a pool of 4 contexts, beside the same 4
%% callers of an empty dirty-scheduler NIF (the thread model not chosen: a call that
%% needs no other thread), alternated; 4 callers of their own cat echo in the notes.
%% `OneScheduler`: also the +S 1 figure (a fresh VM; quiet runs only).
w2(#{pairs := Pairs} = Ctx, OneScheduler) ->
    start(#{size => 4}),
    Per = 5000,
    Frame = erpy_call:encode_request(erpy_request:call(<<"operator">>, <<"add">>, [1, 2], #{}), 1, 5000, self()),
    Echoers = [erpy_bench_port:echoer(Frame) || _ <- lists:seq(1, 4)],
    Procs = fun() -> [os:getpid() | [P || {_, P} <- Echoers]] end,
    Callers = fun(Call) ->
                      fun() -> erpy_bench_port:concurrent(
                                 [fun() -> [Call() || _ <- lists:seq(1, Per)] end || _ <- lists:seq(1, 4)], Procs)
                      end
              end,
    Erpy = Callers(fun() -> {ok, 3} = erpy:call(operator, add, [1, 2], #{pool => ?POOL}) end),
    Dirty = Callers(fun() -> 1 = erpy_nif:dirty_noop(1) end),
    Cat = fun() -> erpy_bench_port:concurrent(
                     [fun() -> Ech ! {run, Per, self()}, receive {Ech, done} -> ok end end
                      || {Ech, _} <- Echoers], Procs)
          end,
    _ = {Erpy(), Dirty()},
    {E, D} = erpy_bench:alternate(max(3, Pairs div 3), Erpy, Dirty),
    CatRuns = [Cat() || _ <- lists:seq(1, 3)],
    [exit(Ech, kill) || {Ech, _} <- Echoers],
    erpy:stop_pool(?POOL),
    Rate = fun({Ns, _}) -> 4 * Per / (Ns / 1.0e9) end,
    MedRate = fun(Runs) -> erpy_bench:median([Rate(R) || R <- Runs]) end,
    CpuPer = fun(Runs) -> erpy_bench:median([C / (4 * Per) / 1000 || {_, C} <- Runs]) end,
    Ratio = erpy_bench:median([Rate(A) / Rate(B) || {A, B} <- lists:zip(E, D)]),
    ERate = MedRate(E),
    Extra = case OneScheduler of
                true -> [one_scheduler_w2(Ctx)];
                false -> []
            end,
    [#{id => <<"W2">>,
       workload => <<"embedded: throughput, 4 concurrent callers x 5,000 calls (pool of 4), calls/s">>,
       erpy => fmt("~b calls/s, ~.1f us CPU/call", [round(ERate), CpuPer(E)]),
       reference => fmt("4 callers of an empty dirty-scheduler NIF: ~b calls/s, ~.1f us CPU/call",
                        [round(MedRate(D)), CpuPer(D)]),
       ratio => Ratio, target => <<">= 0.9x">>, pass => Ratio >= 0.9, value => ERate,
       notes => [<<"ratio = erpy calls/s / dirty NIF calls/s per pair (default VM)">>,
                 fmt("same run: 4 callers x own cat echo: ~b echoes/s", [round(MedRate(CatRuns))])
                 | Extra]}].

%% W2 again in a fresh VM started with one scheduler (+S 1), which leaves the second of
%% this machine's two cores to the context thread: the figure shows what sharing two
%% cores among two schedulers and Python's thread costs (the CPU is the limit here, see
%% doc/internals.md).
one_scheduler_w2(#{root := Root}) ->
    %% The new VM runs this module's w2_in_this_vm/0 with the shared bench helpers.
    Dir = filename:join([Root, "_build", "bench"]),
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    [begin
         Src = filename:join([Root, "bench", atom_to_list(Mod) ++ ".erl"]),
         {ok, Mod, Beam} = compile:file(Src, [binary]),
         ok = file:write_file(filename:join(Dir, atom_to_list(Mod) ++ ".beam"), Beam)
     end || Mod <- [?MODULE, erpy_bench_port, erpy_bench]],
    Ebin = filename:join([Root, "_build", "default", "lib", "erpy", "ebin"]),
    Out = os:cmd(os:find_executable("erl") ++ " +S 1 -noshell -pa " ++ Ebin ++ " -pa " ++ Dir ++
                 " -run " ++ atom_to_list(?MODULE) ++ " w2_in_this_vm"),
    case re:run(Out, "W2=(\\d+)", [{capture, [1], list}]) of
        {match, [Rate]} ->
            fmt("the same 4 callers in a fresh VM with one scheduler (+S 1, the second core "
                "left to Python's thread): ~s calls/s (median of 5)", [Rate]);
        nomatch ->
            fmt("the +S 1 run failed: ~s", [Out])
    end.

%% Run by one_scheduler_w2/1 in the VM it starts.
-spec w2_in_this_vm() -> no_return().
w2_in_this_vm() ->
    {ok, _} = application:ensure_all_started(erpy),
    {ok, _} = erpy:start_pool(?POOL, #{mode => embedded, size => 4}),
    Caller = fun() -> [{ok, 3} = erpy:call(operator, add, [1, 2], #{pool => ?POOL})
                       || _ <- lists:seq(1, 5000)] end,
    Run = fun() ->
              {Ns, _Cpu} = erpy_bench_port:concurrent(lists:duplicate(4, Caller), fun() -> [] end),
              20000 / (Ns / 1.0e9)
          end,
    _ = Run(),
    io:format("~nW2=~b~n", [round(median([Run() || _ <- lists:seq(1, 5)]))]),
    halt().

%% W3a: echo a 1 MiB binary (random bytes: Python gets bytes and returns them).
w3a(Ctx) ->
    start(#{size => 1}),
    Rows = erpy_bench_port:echo_binary(
             Ctx, <<"embedded">>, ?POOL, fun() -> [] end, 3000,
             [<<"the binary is copied once into Python's bytes; the bytes result is lent to "
                "Erlang without a copy">>]),
    erpy:stop_pool(?POOL),
    Rows.

%% W3b: echo the list of 10,000 maps.
w3b(Ctx) ->
    start(#{size => 1}),
    Rows = erpy_bench_port:echo_maps(
             Ctx, <<"embedded">>, ?POOL, fun() -> [] end, 5,
             [<<"ratio = erpy ms / floor ms per pair; terms convert straight to objects, no ETF">>]),
    erpy:stop_pool(?POOL),
    Rows.

%% W6: a fresh VM starts an embedded pool of 4 (Python itself starts here) and answers one
%% call, beside `erl -noshell -s init stop`.
w6(#{root := Root} = Ctx) ->
    Erl = os:find_executable("erl"),
    Ebin = filename:join([Root, "_build", "default", "lib", "erpy", "ebin"]),
    %% The application's default (port) pool is left to finish starting first, so its
    %% Python processes do not compete for the CPUs with the measured start.
    Eval = "application:ensure_all_started(erpy), "
           "{ok, 3} = erpy:call(operator, add, [1, 2], #{timeout => 30000}), "
           "T0 = erlang:monotonic_time(microsecond), "
           "{ok, _} = erpy:start_pool(w6, #{mode => embedded, size => 4}), "
           "{ok, 3} = erpy:call(operator, add, [1, 2], #{pool => w6}), "
           "io:format(\"~nW6=~p~n\", [erlang:monotonic_time(microsecond) - T0]), halt().",
    Start = fun() ->
                Out = os:cmd(Erl ++ " -noshell -pa " ++ Ebin ++ " -eval '" ++ Eval ++ "'"),
                {match, [Us]} = re:run(Out, "W6=(\\d+)", [{capture, [1], list}]),
                list_to_integer(Us) / 1000
            end,
    erpy_bench_port:cold_start(
      Ctx, <<"embedded: cold start in a fresh VM, pool of 4 started (Python initialized) "
             "to first answered call, ms">>, Start,
      [<<"measured inside the new VM from start_pool to the answer">>]).

%% Internal.

start(Opts) ->
    {ok, _} = erpy:start_pool(?POOL, Opts#{mode => embedded}),
    ok.

median(L) -> erpy_bench:median(L).
