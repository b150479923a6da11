%% W5: ETF encode+decode of W3b's term inside Python (erpy.decode + erpy.encode), beside
%% Erlang's own term_to_binary + binary_to_term of the same term, in the same run.
-module(erpy_bench_w5).

-export([rows/1, term/0]).

-define(TARGET, 1.5).

%% API.

%% W3b's term: a list of 10,000 small maps.
-spec term() -> [map()].
term() ->
    [#{<<"id">> => I, <<"name">> => <<"item">>, <<"score">> => 1.5} || I <- lists:seq(1, 10000)].

-spec rows(erpy_bench:ctx()) -> [erpy_bench:row()].
rows(#{pairs := Pairs, seconds := Seconds} = Ctx) ->
    T = term(),
    Bytes = term_to_binary(T, [{minor_version, 2}]),
    Size = byte_size(Bytes),
    Port = erpy_bench:python_port(Ctx, "bench_port.py"),
    <<"ok">> = erpy_bench:request(Port, [<<"L">>, Bytes]),
    Py = fun(K) ->
             <<Wall:64, Cpu:64>> = erpy_bench:request(Port, <<"R", K:32>>),
             {Wall, Cpu}
         end,
    KPy = erpy_bench:calibrate(fun(K) -> element(1, Py(K)) end, Seconds),
    KErl = erpy_bench:calibrate(fun(K) -> element(1, erlang_run(T, K)) end, Seconds),
    io:format("W5: ~b-byte term, ~b pairs, ~b Python / ~b Erlang rounds per run~n",
              [Size, Pairs, KPy, KErl]),
    {PyRuns, ErlRuns} = erpy_bench:alternate(Pairs, fun() -> Py(KPy) end,
                                             fun() -> erlang_run(T, KErl) end),
    port_close(Port),
    MBs = fun(K, {Wall, _}) -> Size * K / Wall * 1000 end,          % bytes/ns * 1000 = MB/s
    CpuUs = fun(K, {_, Cpu}) -> Cpu / K / 1000 end,
    PyMBs = [MBs(KPy, R) || R <- PyRuns],
    ErlMBs = [MBs(KErl, R) || R <- ErlRuns],
    Ratios = [P / E || {P, E} <- lists:zip(PyMBs, ErlMBs)],
    Ratio = erpy_bench:median(Ratios),
    PyCpu = erpy_bench:median([CpuUs(KPy, R) || R <- PyRuns]),
    ErlCpu = erpy_bench:median([CpuUs(KErl, R) || R <- ErlRuns]),
    [#{id => <<"W5">>,
       workload => <<"ETF encode+decode of W3b's term (10,000 maps) inside Python">>,
       erpy => fmt("~.1f MB/s, ~b us CPU/op", [erpy_bench:median(PyMBs), round(PyCpu)]),
       reference => fmt("Erlang term_to_binary+binary_to_term: ~.1f MB/s, ~b us CPU/op",
                        [erpy_bench:median(ErlMBs), round(ErlCpu)]),
       ratio => Ratio,
       target => fmt(">= ~.1fx", [?TARGET]),
       pass => Ratio >= ?TARGET,
       notes => [fmt("term of ~b ETF bytes; ~b pairs; per run ~b Python rounds "
                     "(erpy.encode(erpy.decode(b))) and ~b Erlang rounds "
                     "(binary_to_term(term_to_binary(T))), about ~.1f s each; MB/s = bytes x "
                     "rounds / wall time; CPU: Python process_time, Erlang VM runtime; "
                     "per-pair ratios min ~.2f, max ~.2f",
                     [Size, Pairs, KPy, KErl, Seconds, lists:min(Ratios), lists:max(Ratios)])]}].

%% Internal.

%% K rounds of Erlang's own codec in a fresh process: {wall ns, CPU ns of the VM}.
erlang_run(T, K) ->
    {Pid, MRef} = spawn_monitor(
        fun() ->
            {R0, _} = erlang:statistics(runtime),
            W0 = erlang:monotonic_time(nanosecond),
            Check = loop(T, K, 0),
            W1 = erlang:monotonic_time(nanosecond),
            {R1, _} = erlang:statistics(runtime),
            exit({done, W1 - W0, (R1 - R0) * 1000000, Check})
        end),
    receive
        {'DOWN', MRef, process, Pid, {done, Wall, Cpu, _}} -> {Wall, Cpu};
        {'DOWN', MRef, process, Pid, Why} -> error({erlang_run, Why})
    end.

%% The sizes are summed so that no round can be optimised away.
loop(_, 0, Acc) ->
    Acc;
loop(T, K, Acc) ->
    B = term_to_binary(T, [{minor_version, 2}]),
    T2 = binary_to_term(B),
    loop(T, K - 1, Acc + byte_size(B) + length(T2)).

fmt(F, A) ->
    iolist_to_binary(io_lib:format(F, A)).
