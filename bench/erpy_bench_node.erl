%% Node mode: W1, W2, W3a, W3b for stock `rpc:call` into a Python node (python3 -m
%% erpy.node), each beside `rpc:call` into a second Erlang node on the same host,
%% measured alternately in the same run; W4 (a callback into Erlang from code a node pool
%% runs) beside a plain call on the same pool; W6 (a node pool's cold start in a fresh VM)
%% beside `python3 -c pass`; Erlang -> Python message throughput beside Erlang -> Erlang;
%% the Python node's memory over 100k calls.
%%
%% This VM becomes a distributed node (erpy_bench@127.0.0.1) if it is not one; the
%% Erlang reference is a peer node started here, the Python node runs bench/py/bench_node.py
%% handlers. CPU time is user+sys of this VM, the peer and the Python node (from /proc).
-module(erpy_bench_node).

-export([rows/1]).
%% Shared with erpy_bench_netns.
-export([wait_pong/2]).
%% Run on the peer node.
-export([sink_start/0]).

-import(erpy_bench_port, [latencies/3, concurrent/2, fmt/2, p99/1]).

%% API.

-spec rows(erpy_bench:ctx()) -> [erpy_bench:row()].
rows(Ctx) ->
    _ = os:cmd("epmd -daemon"),
    case is_alive() of
        true -> ok;
        false -> {ok, _} = net_kernel:start(['erpy_bench@127.0.0.1', longnames])
    end,
    {Py, Holder} = start_python(Ctx),
    {ok, Peer, Erl} = peer:start_link(#{name => erpy_bench_peer, host => "127.0.0.1", longnames => true,
                                        args => ["-setcookie", atom_to_list(erlang:get_cookie())]}),
    {ok, ?MODULE, Beam} = compile:file(code:which(?MODULE), [binary]),
    {module, ?MODULE} = erpc:call(Erl, code, load_binary, [?MODULE, code:which(?MODULE), Beam]),
    PyOs = rpc:call(Py, bench_node, getpid, []),
    ErlOs = list_to_integer(erpc:call(Erl, os, getpid, [])),
    Procs = fun() -> [os:getpid(), PyOs, ErlOs] end,
    Env = #{py => Py, erl => Erl, procs => Procs},
    try
        lists:append([w1(Ctx, Env), erpy_bench:loaded(Ctx, fun() -> w1(Ctx, Env) end), w2(Ctx, Env),
                      w3a(Ctx, Env), w3b(Ctx, Env), w4(Ctx, Env), w6(Ctx), messages(Ctx, Env),
                      memory(Ctx, Env)])
    after
        peer:stop(Peer),
        Holder ! stop
    end.

%% W1: sequential calls, us/call.
w1(#{pairs := Pairs}, #{py := Py, erl := Erl, procs := Procs}) ->
    Calls = 20000 div Pairs + 1,
    PyCall = fun() -> 3 = rpc:call(Py, operator, add, [1, 2]) end,
    ErlCall = fun() -> 3 = rpc:call(Erl, erlang, '+', [1, 2]) end,
    _ = [{PyCall(), ErlCall()} || _ <- lists:seq(1, 2000)],
    {P, E} = erpy_bench:alternate(Pairs, fun() -> latencies(PyCall, Calls, Procs) end,
                                  fun() -> latencies(ErlCall, Calls, Procs) end),
    Ratio = erpy_bench:median([median(A) / median(B) || {{A, _}, {B, _}} <- lists:zip(P, E)]),
    All = fun(Runs) -> lists:append([L || {L, _} <- Runs]) end,
    Cpu = fun(Runs) -> lists:sum([C || {_, C} <- Runs]) / length(All(Runs)) / 1000 end,
    [#{id => <<"W1">>,
       workload => <<"node: latency of sequential rpc:call(PyNode, operator, add, [1, 2]), us/call">>,
       erpy => fmt("median ~.1f us, p99 ~.1f us, ~.1f us CPU/call",
                   [median(All(P)), p99(All(P)), Cpu(P)]),
       reference => fmt("rpc:call into an Erlang node (erlang:'+'): median ~.1f us, p99 ~.1f us, ~.1f us CPU/call",
                        [median(All(E)), p99(All(E)), Cpu(E)]),
       ratio => Ratio, target => <<"<= 1.0x">>, pass => Ratio =< 1.0,
       notes => [fmt("~b pairs of ~b calls; ratio = Python median / Erlang median per pair", [Pairs, Calls])]}].

%% W2: 4 concurrent callers x 5,000 calls, calls/s.
w2(#{pairs := Pairs}, #{py := Py, erl := Erl, procs := Procs}) ->
    Per = 5000,
    Run = fun(Node, M, F) ->
                  fun() ->
                          concurrent([fun() -> [3 = rpc:call(Node, M, F, [1, 2]) || _ <- lists:seq(1, Per)] end
                                      || _ <- lists:seq(1, 4)], Procs)
                  end
          end,
    PyRun = Run(Py, operator, add),
    ErlRun = Run(Erl, erlang, '+'),
    _ = PyRun(),
    {P, E} = erpy_bench:alternate(max(3, Pairs div 3), PyRun, ErlRun),
    Rate = fun({Ns, _}) -> 4 * Per / (Ns / 1.0e9) end,
    CpuPer = fun(Runs) -> erpy_bench:median([C / (4 * Per) / 1000 || {_, C} <- Runs]) end,
    Ratio = erpy_bench:median([Rate(A) / Rate(B) || {A, B} <- lists:zip(P, E)]),
    [#{id => <<"W2">>,
       workload => <<"node: throughput, 4 concurrent callers x 5,000 rpc:call, calls/s">>,
       erpy => fmt("~b calls/s, ~.1f us CPU/call", [round(erpy_bench:median([Rate(R) || R <- P])), CpuPer(P)]),
       reference => fmt("the same into an Erlang node: ~b calls/s, ~.1f us CPU/call",
                        [round(erpy_bench:median([Rate(R) || R <- E])), CpuPer(E)]),
       ratio => Ratio, target => <<">= 1.0x">>, pass => Ratio >= 1.0,
       notes => [<<"ratio = Python calls/s / Erlang calls/s per pair">>]}].

%% W3a: echo a 1 MiB binary, MB/s.
w3a(#{pairs := Pairs}, #{py := Py, erl := Erl, procs := Procs}) ->
    Bin = erpy_bench_port:crypto_bytes(1 bsl 20),
    PyEcho = fun() -> Bin = rpc:call(Py, bench_node, echo, [Bin]) end,
    ErlEcho = fun() -> Bin = rpc:call(Erl, erlang, hd, [[Bin]]) end,
    N = 40,
    _ = [{PyEcho(), ErlEcho()} || _ <- lists:seq(1, 5)],
    {P, E} = erpy_bench:alternate(Pairs, fun() -> latencies(PyEcho, N, Procs) end,
                                  fun() -> latencies(ErlEcho, N, Procs) end),
    MBs = fun({L, _}) -> (1 bsl 20) / median(L) end,
    Ratio = erpy_bench:median([MBs(A) / MBs(B) || {A, B} <- lists:zip(P, E)]),
    Cpu = fun(Runs) -> lists:sum([C || {_, C} <- Runs]) / (N * length(Runs)) / 1000 end,
    [#{id => <<"W3a">>,
       workload => <<"node: rpc:call echo of a 1 MiB binary, MB/s (payload / round trip)">>,
       erpy => fmt("~.1f MB/s, ~.1f us CPU/echo", [erpy_bench:median([MBs(R) || R <- P]), Cpu(P)]),
       reference => fmt("the same into an Erlang node (erlang:hd([Bin])): ~.1f MB/s, ~.1f us CPU/echo",
                        [erpy_bench:median([MBs(R) || R <- E]), Cpu(E)]),
       ratio => Ratio, target => <<">= 1.0x">>, pass => Ratio >= 1.0,
       notes => [<<"random bytes: Python gets bytes and returns them">>]}].

%% W3b: echo the list of 10,000 maps, ms.
w3b(#{pairs := Pairs}, #{py := Py, erl := Erl, procs := Procs}) ->
    T = erpy_bench_w5:term(),
    PyEcho = fun() -> T = rpc:call(Py, bench_node, echo, [T]) end,
    ErlEcho = fun() -> T = rpc:call(Erl, erlang, hd, [[T]]) end,
    N = 10,
    _ = [{PyEcho(), ErlEcho()} || _ <- lists:seq(1, 3)],
    {P, E} = erpy_bench:alternate(Pairs, fun() -> latencies(PyEcho, N, Procs) end,
                                  fun() -> latencies(ErlEcho, N, Procs) end),
    Ms = fun({L, _}) -> median(L) / 1000 end,
    Ratio = erpy_bench:median([Ms(A) / Ms(B) || {A, B} <- lists:zip(P, E)]),
    Cpu = fun(Runs) -> lists:sum([C || {_, C} <- Runs]) / (N * length(Runs)) / 1.0e6 end,
    [#{id => <<"W3b">>,
       workload => <<"node: rpc:call echo of a list of 10,000 maps, ms per round trip">>,
       erpy => fmt("~.2f ms, ~.2f ms CPU/echo", [erpy_bench:median([Ms(R) || R <- P]), Cpu(P)]),
       reference => fmt("the same into an Erlang node: ~.2f ms, ~.2f ms CPU/echo",
                        [erpy_bench:median([Ms(R) || R <- E]), Cpu(E)]),
       ratio => Ratio, target => <<"<= 1.0x">>, pass => Ratio =< 1.0,
       notes => [<<"ratio = Python ms / Erlang ms per pair">>]}].

%% W4: Python calls erlang.call('erlang', 'abs', -1) once inside an erpy:eval on a node
%% pool (the request's caller runs the callback under the pool's policy), beside W1
%% through the same pool (erpy:call of operator.add).
w4(#{pairs := Pairs, root := Root}, #{py := Py, procs := Procs0}) ->
    Pool = erpy_bench_node_pool,
    Started = start_erpy(Root),
    {ok, _} = erpy:start_pool(Pool, #{mode => node, start => 1, allowed => [{erlang, abs}]}),
    try
        Opts = #{pool => Pool, timeout => 30000},
        {ok, PyOs} = erpy:eval(<<"__import__('os').getpid()">>, #{}, Opts),
        Procs = fun() -> Procs0() ++ [integer_to_list(PyOs)] end,
        Calls = 20000 div Pairs + 1,
        Callback = fun() -> {ok, 1} = erpy:eval(<<"erlang.call('erlang', 'abs', -1)">>, #{}, Opts) end,
        Add = fun() -> {ok, 3} = erpy:call(operator, add, [1, 2], Opts) end,
        _ = [{Add(), Callback()} || _ <- lists:seq(1, 1000)],
        Stock = fun() -> 3 = rpc:call(Py, operator, add, [1, 2]) end,
        {CbRuns, AddRuns} = erpy_bench:alternate(
            Pairs, fun() -> latencies(Callback, Calls div 2, Procs) end,
                   fun() -> latencies(Add, Calls div 2, Procs) end),
        {CbRuns2, StockRuns} = erpy_bench:alternate(
            max(3, Pairs div 3), fun() -> latencies(Callback, Calls div 2, Procs) end,
                                 fun() -> latencies(Stock, Calls div 2, Procs) end),
        Ratio = erpy_bench:median([median(C) / median(A) || {{C, _}, {A, _}} <- lists:zip(CbRuns, AddRuns)]),
        StockRatio = erpy_bench:median([median(C) / median(A) || {{C, _}, {A, _}} <- lists:zip(CbRuns2, StockRuns)]),
        All = fun(Runs) -> lists:append([L || {L, _} <- Runs]) end,
        Cpu = fun(Runs) -> lists:sum([C || {_, C} <- Runs]) / length(All(Runs)) / 1000 end,
        [#{id => <<"W4">>,
           workload => <<"node: Python calls erlang.call('erlang', 'abs', -1) once (erpy:eval on a node pool), "
                         "us/round trip">>,
           erpy => fmt("median ~.1f us, p99 ~.1f us, ~.1f us CPU/call",
                       [median(All(CbRuns)), p99(All(CbRuns)), Cpu(CbRuns)]),
           reference => fmt("W1 through the same pool (erpy:call of operator.add): median ~.1f us, ~.1f us CPU/call",
                            [median(All(AddRuns)), Cpu(AddRuns)]),
           ratio => Ratio, target => <<"<= 2.5x">>, pass => Ratio =< 2.5,
           notes => [fmt("~b pairs of ~b requests; ratio = callback median / call median per pair",
                         [Pairs, Calls div 2]),
                     fmt("same run: W1's stock rpc:call(PyNode, operator, add, [1, 2]) median ~.1f us, "
                         "the callback ~.2fx that", [median(All(StockRuns)), StockRatio])]}]
    after
        erpy:stop_pool(Pool),
        stop_erpy(Started)
    end.

%% W6: a fresh distributed VM starts a node pool with the defaults (two Python nodes,
%% started side by side) and answers one call, measured inside that VM from start_pool to
%% the answer, beside `python3 -c pass` (the start of the interpreter alone) measured
%% alternately; `erl -noshell -s init stop` in the notes.
w6(#{pairs := Pairs, root := Root, python := Python}) ->
    Erl = os:find_executable("erl"),
    Ebin = filename:join([Root, "_build", "default", "lib", "erpy", "ebin"]),
    %% PoolOpts: "#{mode => node}" (the defaults) or with `start`.
    Eval = fun(PoolOpts) ->
                   "application:load(erpy), application:set_env(erpy, pools, []), "
                   "{ok, _} = application:ensure_all_started(erpy), "
                   "T0 = erlang:monotonic_time(microsecond), "
                   "{ok, _} = erpy:start_pool(w6, " ++ PoolOpts ++ "), "
                   "{ok, 3} = erpy:call(operator, add, [1, 2], #{pool => w6}), "
                   "io:format(\"~nW6=~p~n\", [erlang:monotonic_time(microsecond) - T0]), halt()."
           end,
    StartWith = fun(PoolOpts) ->
                    fun() ->
                        Name = "erpy_bench_w6_" ++ integer_to_list(erlang:unique_integer([positive]))
                            ++ "@127.0.0.1",
                        Out = os:cmd(Erl ++ " -noshell -name " ++ Name ++ " -setcookie erpy_bench_w6 -pa "
                                     ++ Ebin ++ " -eval '" ++ Eval(PoolOpts) ++ "'"),
                        case re:run(Out, "W6=(\\d+)", [{capture, [1], list}]) of
                            {match, [Us]} -> list_to_integer(Us) / 1000;
                            nomatch -> error({w6_failed, Out})
                        end
                    end
                end,
    Start = StartWith("#{mode => node}"),
    StartOne = StartWith("#{mode => node, start => 1}"),
    Cmd = fun(C) -> fun() ->
                            T0 = erlang:monotonic_time(microsecond),
                            _ = os:cmd(C),
                            (erlang:monotonic_time(microsecond) - T0) / 1000
                    end
          end,
    PyPass = Cmd(Python ++ " -c pass"),
    _ = Start(),
    {E, F} = erpy_bench:alternate(max(5, Pairs div 2), Start, PyPass),
    ErlMs = erpy_bench:median([(Cmd(Erl ++ " -noshell -s init stop"))() || _ <- lists:seq(1, 3)]),
    OneMs = erpy_bench:median([StartOne() || _ <- lists:seq(1, 5)]),
    Ratio = erpy_bench:median([A / B || {A, B} <- lists:zip(E, F)]),
    EMs = erpy_bench:median(E),
    [#{id => <<"W6">>,
       workload => <<"node: cold start in a fresh VM, node pool with the defaults (2 Python nodes) started "
                     "to first answered call, ms">>,
       erpy => fmt("~.1f ms", [EMs]),
       reference => fmt("python3 -c pass: ~.1f ms", [erpy_bench:median(F)]),
       ratio => Ratio, target => <<"<= 150 ms">>, pass => EMs =< 150,
       notes => [fmt("measured inside the new VM from start_pool to the answer; ratio = pool start / "
                     "python3 -c pass per pair; same run: a pool of one node (start => 1) ~.1f ms, "
                     "erl -noshell -s init stop ~.1f ms", [OneMs, ErlMs])]}].

%% Messages: one sender, {Name, Node} ! {msg, I}, until the receiver has counted them all.
%% The end-to-end rate is bounded by the sending VM (one Erlang process sends ~200k small
%% distributed messages/s on this machine, whoever receives), so the row also gives the
%% receiving node's own capacity: messages per CPU second of the receiving OS process.
messages(#{pairs := Pairs}, #{py := Py, erl := Erl, procs := Procs}) ->
    _ = erpc:call(Erl, erlang, spawn, [?MODULE, sink_start, []]),
    timer:sleep(100),
    [_, PyOs, ErlOs] = Procs(),
    N = 200000,
    Run = fun(Dest, Receiver) ->
                  fun() ->
                          Pids = Procs(),
                          C0 = erpy_bench_port:cpu_ns(Pids),
                          R0 = erpy_bench_port:cpu_ns([Receiver]),
                          Base = count(Dest),
                          T0 = erlang:monotonic_time(nanosecond),
                          send_n(Dest, N),
                          Got = count(Dest),
                          Ns = erlang:monotonic_time(nanosecond) - T0,
                          N = Got - Base,
                          {N / (Ns / 1.0e9), erpy_bench_port:cpu_ns(Pids) - C0,
                           erpy_bench_port:cpu_ns([Receiver]) - R0}
                  end
          end,
    PyRun = Run({bench_sink, Py}, PyOs),
    ErlRun = Run({erpy_bench_sink, Erl}, ErlOs),
    _ = PyRun(),
    {P, E} = erpy_bench:alternate(max(3, Pairs div 3), PyRun, ErlRun),
    Capacity = fun({_, _, RecvNs}) -> N / (max(RecvNs, 1) / 1.0e9) end,
    Ratio = erpy_bench:median([Capacity(A) / Capacity(B) || {A, B} <- lists:zip(P, E)]),
    PCap = erpy_bench:median([Capacity(R) || R <- P]),
    Rate = fun(Runs) -> round(erpy_bench:median([R || {R, _, _} <- Runs])) end,
    RecvUs = fun(Runs) -> erpy_bench:median([C / N / 1000 || {_, _, C} <- Runs]) end,
    CpuPer = fun(Runs) -> erpy_bench:median([C / N / 1000 || {_, C, _} <- Runs]) end,
    [#{id => <<"MSG">>,
       workload => <<"node: Erlang -> Python messages ({bench_sink, PyNode} ! {msg, I}, 200,000 from one sender), "
                     "messages per CPU second of the receiving node">>,
       erpy => fmt("~b msg/s capacity (~.2f us Python-node CPU/msg); end to end ~b msg/s, ~.2f us CPU/msg all processes",
                   [round(PCap), RecvUs(P), Rate(P), CpuPer(P)]),
       reference => fmt("Erlang -> Erlang node (a registered counting process): ~b msg/s capacity (~.2f us receiving-VM CPU/msg); "
                        "end to end ~b msg/s, ~.2f us CPU/msg",
                        [round(erpy_bench:median([Capacity(R) || R <- E])), RecvUs(E), Rate(E), CpuPer(E)]),
       ratio => Ratio, target => <<">= 500,000 msg/s">>, pass => PCap >= 500000,
       notes => [<<"received = counted by a Python mailbox loop (receive_many); capacity = messages / CPU seconds of "
                   "the receiving OS process; the end-to-end rate is the sender's limit for both">>]}].

%% The Python node's RSS over 100k calls (after the runs above warmed it).
memory(_Ctx, #{py := Py}) ->
    Step = 10000,
    Samples = [begin
                   [3 = rpc:call(Py, operator, add, [1, 2]) || _ <- lists:seq(1, Step)],
                   rpc:call(Py, bench_node, rss_kb, [])
               end || _ <- lists:seq(1, 10)],
    First = hd(Samples),
    Last = lists:last(Samples),
    Growth = (Last - First) / max(First, 1),
    [#{id => <<"M1">>,
       workload => <<"node: the Python node's RSS over 100,000 rpc:calls, KiB">>,
       erpy => fmt("~b KiB after 10,000 calls, ~b KiB after 100,000", [First, Last]),
       reference => fmt("samples every 10,000 calls: ~w", [Samples]),
       ratio => Last / max(First, 1), target => <<"flat (< 5% growth)">>, pass => Growth < 0.05,
       notes => [<<"ratio = last sample / first sample">>]}].

%% On the peer: a registered process counting messages; {count, From} asks for the total.
-spec sink_start() -> no_return().
sink_start() ->
    register(erpy_bench_sink, self()),
    sink_loop(0).

sink_loop(N) ->
    receive
        {count, From} -> From ! {count, N}, sink_loop(N);
        _ -> sink_loop(N + 1)
    end.

%% Internal.

count(Dest) ->
    Dest ! {count, self()},
    receive {count, C} -> C after 60000 -> error({no_count, Dest}) end.

send_n(_Dest, 0) -> ok;
send_n(Dest, I) -> Dest ! {msg, I}, send_n(Dest, I - 1).

median(L) -> erpy_bench:median(L).

%% The erpy application, for the node pool rows; true when started here.
start_erpy(Root) ->
    true = code:add_patha(filename:join([Root, "_build", "default", "lib", "erpy", "ebin"])),
    case lists:keymember(erpy, 1, application:which_applications()) of
        true ->
            false;
        false ->
            _ = application:load(erpy),
            application:set_env(erpy, pools, []),
            {ok, _} = application:ensure_all_started(erpy),
            true
    end.

stop_erpy(true) -> application:stop(erpy);
stop_erpy(false) -> ok.

start_python(#{root := Root, python := Python}) ->
    Node = 'erpy_bench_py@127.0.0.1',
    Path = filename:join(Root, "python") ++ ":" ++ filename:join([Root, "bench", "py"]),
    Self = self(),
    Holder = spawn(fun() ->
                           Port = open_port({spawn_executable, Python},
                                            [{args, ["-m", "erpy.node", "--name", atom_to_list(Node),
                                                     "--allow", "operator,bench_node", "--load", "bench_node",
                                                     "--exit-on-eof"]},
                                             {env, [{"PYTHONPATH", Path},
                                                    {"ERPY_COOKIE", atom_to_list(erlang:get_cookie())}]},
                                             use_stdio, exit_status]),
                           Self ! {self(), started},
                           receive stop -> port_close(Port) end
                   end),
    receive {Holder, started} -> ok end,
    ok = wait_pong(Node, 200),
    {Node, Holder}.

wait_pong(_Node, 0) -> timeout;
wait_pong(Node, N) ->
    case net_adm:ping(Node) of
        pong -> ok;
        pang -> timer:sleep(50), wait_pong(Node, N - 1)
    end.
