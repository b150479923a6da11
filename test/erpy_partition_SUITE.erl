%% Node pools across hosts, under network faults (issue 16). Three test hosts are network
%% namespaces (erpy_netns, test/netns/netns.sh), each with its own address and EPMD: an
%% Erlang node (a peer, driven over its stdin/stdout, so this VM needs no distribution) on
%% h0 runs a node pool over Python nodes (`python3 -m erpy.node`) on h1 and h2. For each
%% fault (a cable cut, a Python node killed, one paused with SIGSTOP, its host's EPMD
%% restarted) callers keep calling the pool, and the suite checks: calls in flight on the
%% node that went fail as {error, {node_down, Node}} (or time out at their deadline),
%% calls made once the pool knows go to the other node, the node rejoins once the fault is
%% undone, and every call has exactly one answer (none lost, none answered twice). Both
%% sides run with net_ticktime 4 s. Each case logs a line for bench/RESULTS.md.
%%
%% Needs root and `ip netns` (as CI runs): skipped with the reason otherwise. Everything
%% started runs inside the namespaces, and end_per_suite (or the next run's
%% init_per_suite, after a crash) kills it and deletes them.
-module(erpy_partition_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([link_cut/1, node_killed/1, node_paused/1, epmd_restarted/1]).
%% Run on the peer.
-export([peer_setup/2, load_start/3, load_stop/1, wait_pool/4]).

-define(TICKTIME, 4).
-define(POOL, np_net).
-define(CALL_TIMEOUT, 15000).
-define(WORKERS, 8).

all() ->
    [link_cut, node_killed, node_paused, epmd_restarted].

suite() ->
    [{timetrap, {seconds, 180}}].

init_per_suite(Config) ->
    case erpy_netns:available() of
        {skip, Why} ->
            {skip, Why};
        ok ->
            ok = erpy_netns:clean(),
            {ok, Net} = erpy_netns:up(3),
            try
                start_hosts(Net, Config)
            catch
                C:R:St ->
                    ok = erpy_netns:down(Net),
                    erlang:raise(C, R, St)
            end
    end.

start_hosts(Net, Config) ->
    Cookie = "erpy_partition_" ++ integer_to_list(erlang:unique_integer([positive])),
    Epmds = [start_epmd(Net, I) || I <- [0, 1, 2]],
    %% The Erlang node on h0, with this checkout's code.
    Erl = os:find_executable("erl"),
    Paths = lists:usort([filename:dirname(code:which(M)) || M <- [erpy, ?MODULE, erpy_test_env]]),
    {ok, Peer, ENode} = peer:start(#{name => e, host => erpy_netns:addr(0), longnames => true,
                                     connection => standard_io,
                                     exec => {ip(), ["netns", "exec", erpy_netns:ns(Net, 0), Erl]},
                                     args => ["-setcookie", Cookie,
                                              "-kernel", "net_ticktime", integer_to_list(?TICKTIME),
                                              "-kernel", "net_setuptime", "3",
                                              "-pa" | Paths]}),
    [_ = start_python(Net, I, Cookie) || I <- [1, 2]],
    Nodes = [py_node(1), py_node(2)],
    ok = peer:call(Peer, ?MODULE, peer_setup, [?POOL, Nodes], 60000),
    ct:log("hosts up: ~p on h0, ~p", [ENode, Nodes]),
    [{net, Net}, {peer, Peer}, {cookie, Cookie}, {epmds, Epmds} | Config].

end_per_suite(Config) ->
    catch peer:stop(?config(peer, Config)),
    ok = erpy_netns:down(?config(net, Config)),
    ok.

init_per_testcase(_Case, Config) ->
    %% Every case starts from both nodes in the pool.
    Peer = ?config(peer, Config),
    {ok, _} = peer:call(Peer, ?MODULE, wait_pool, [?POOL, py_node(1), in, 30000], 35000),
    {ok, _} = peer:call(Peer, ?MODULE, wait_pool, [?POOL, py_node(2), in, 30000], 35000),
    Config.

end_per_testcase(_Case, _Config) ->
    ok.

%% ---- the faults ------------------------------------------------------------------------

%% h1's cable is unplugged: nothing comes back from py1, so the connection goes after the
%% tick time; plugged back in, the pool's pings find it.
link_cut(Config) ->
    Net = ?config(net, Config),
    fault(Config, link_cut, 1, fun() -> erpy_netns:cut(Net, 1) end,
          fun() -> erpy_netns:heal(Net, 1) end).

%% py2 is killed: its host's kernel closes the connection, so the pool knows at once; a
%% new py2 (as a supervisor there would start) rejoins.
node_killed(Config) ->
    Net = ?config(net, Config),
    Cookie = ?config(cookie, Config),
    Pid = current_python(Config, 2),
    fault(Config, node_killed, 2,
          fun() -> erpy_netns:signal(Pid, "KILL") end,
          fun() -> _ = start_python(Net, 2, Cookie), ok end).

%% py1 is stopped (SIGSTOP): its connection stays open but silent, so it goes after the
%% tick time, and calls in flight on it fail then; resumed, it rejoins.
node_paused(Config) ->
    Pid = current_python(Config, 1),
    fault(Config, node_paused, 1, fun() -> erpy_netns:signal(Pid, "STOP") end,
          fun() -> erpy_netns:signal(Pid, "CONT") end).

%% h2's EPMD is killed and started again: connections do not go through EPMD, so the
%% node stays in the pool and no call fails.
epmd_restarted(Config) ->
    Net = ?config(net, Config),
    Epmd = lists:nth(3, ?config(epmds, Config)),
    Peer = ?config(peer, Config),
    Load = peer:call(Peer, ?MODULE, load_start, [?POOL, ?WORKERS, ?CALL_TIMEOUT], 10000),
    timer:sleep(1000),
    T0 = now_ms(),
    ok = erpy_netns:stop(Epmd),
    timer:sleep(500),
    _ = start_epmd(Net, 2),
    timer:sleep(2000),
    Stats = peer:call(Peer, ?MODULE, load_stop, [Load], ?CALL_TIMEOUT + 10000),
    report(epmd_restarted, py_node(2), Stats, T0, undefined, undefined),
    #{error := Errors, served := Served} = Stats,
    ?assertEqual(0, Errors),
    ?assert(maps:get(<<"h2">>, Served, 0) > 0),
    ?assert(lists:member(py_node(2), peer:call(Peer, erpy_node_pool, nodes, [?POOL]))),
    %% The Python node registers again with the new EPMD (at its next tick), so nodes can
    %% still find it by name after a later disconnect.
    Names = fun() -> os:cmd(ip() ++ " netns exec " ++ erpy_netns:ns(Net, 2) ++ " " ++
                                os:find_executable("epmd") ++ " -names 2>&1") end,
    Registered = fun Wait(0) -> false;
                     Wait(N) -> case string:find(Names(), "name py2 ") of
                                    nomatch -> timer:sleep(100), Wait(N - 1);
                                    _ -> true
                                end
                 end,
    ?assert(Registered(100)),
    ct:log("h2's epmd -names after the restart: ~ts", [Names()]).

%% ---- one fault under load --------------------------------------------------------------

%% Load on, Break() at T0; the time until the pool drops the node is Detect. Calls made
%% after that must all go to the other node. Repair() at T1; the time until the node is
%% back is Rejoin, and calls reach it again. Then the load stops and every call must
%% have had exactly one answer.
fault(Config, Name, I, Break, Repair) ->
    Peer = ?config(peer, Config),
    Node = py_node(I),
    Host = list_to_binary("h" ++ integer_to_list(I)),
    Load = peer:call(Peer, ?MODULE, load_start, [?POOL, ?WORKERS, ?CALL_TIMEOUT], 10000),
    timer:sleep(1000),
    T0 = now_ms(),
    ok = Break(),
    %% Both VMs run on this machine: their system times agree.
    {ok, TDetected} = peer:call(Peer, ?MODULE, wait_pool, [?POOL, Node, out, 30000], 35000),
    Detect = TDetected - T0,
    timer:sleep(2000),
    T1 = now_ms(),
    ok = Repair(),
    {ok, TBack} = peer:call(Peer, ?MODULE, wait_pool, [?POOL, Node, in, 60000], 65000),
    Rejoin = TBack - T1,
    timer:sleep(2000),
    Stats = peer:call(Peer, ?MODULE, load_stop, [Load], ?CALL_TIMEOUT + 10000),
    report(Name, Node, Stats, T0, Detect, Rejoin),
    #{results := Results} = Stats,
    %% Made once the pool had dropped the node, until it was repaired: not sent there.
    Misrouted = [R || {_, {ok, H}, S, _} = R <- Results, H =:= Host, S > TDetected + 50, S < T1],
    ?assertEqual([], Misrouted),
    %% Errors: only the node that went, never another or a wrong answer.
    Bad = [R || {_, {error, Why}, _, _} = R <- Results,
                Why =/= {node_down, Node}, Why =/= timeout],
    ?assertEqual([], Bad),
    %% Served again by the node once it was back.
    Back = [R || {_, {ok, H}, S, _} = R <- Results, H =:= Host, S > T1 + Rejoin],
    ?assertNotEqual([], Back),
    %% In flight on the node that went: failed by the tick time (plus the pool's
    %% round-trip), not held until the call's own deadline.
    Late = [R || {_, {error, {node_down, _}}, S, E} = R <- Results,
                 E - S > (?TICKTIME * 2 + 2) * 1000],
    ?assertEqual([], Late),
    ok.

report(Name, Node, #{ok := Ok, error := Err, lost := Lost, dup := Dup, wrong := Wrong,
                     served := Served, errors := Reasons}, _T0, Detect, Rejoin) ->
    Line = io_lib:format("| node pool across netns | ~p (~p) | ok ~p | error ~p | lost ~p | "
                         "detect ~ts | rejoin ~ts | net_ticktime ~p s |",
                         [Name, Node, Ok, Err, Lost, ms(Detect), ms(Rejoin), ?TICKTIME]),
    ct:log("~ts~nserved by host: ~p~nerrors: ~p~ndup ~p wrong ~p", [Line, Served, Reasons, Dup, Wrong]),
    ct:pal("~ts", [Line]),
    ?assertEqual(0, Lost),
    ?assertEqual(0, Dup),
    ?assertEqual(0, Wrong),
    ok.

ms(undefined) -> "-";
ms(N) -> integer_to_list(N) ++ " ms".

%% ---- on the peer -----------------------------------------------------------------------

peer_setup(Pool, Nodes) ->
    ok = erpy_test_env:start_erpy(),
    {ok, _} = erpy:start_pool(Pool, #{mode => node, nodes => Nodes}),
    [{ok, _} = wait_pool(Pool, N, in, 30000) || N <- Nodes],
    ok.

%% Waits until Node is in (or out of) the pool's nodes that are up: {ok, When} (system
%% time, ms).
wait_pool(Pool, Node, Want, Timeout) ->
    T0 = now_ms(),
    wait_pool(Pool, Node, Want, T0, T0 + Timeout).

wait_pool(Pool, Node, Want, T0, Deadline) ->
    In = lists:member(Node, erpy_node_pool:nodes(Pool)),
    Now = now_ms(),
    case {In, Want} of
        {true, in} -> {ok, Now};
        {false, out} -> {ok, Now};
        _ when Now > Deadline -> {error, {timeout, Want, Node}};
        _ -> timer:sleep(10), wait_pool(Pool, Node, Want, T0, Deadline)
    end.

%% Workers calling the pool in a loop: each call's id comes back with the host that ran
%% it. The collector counts what was started and what answered.
load_start(Pool, Workers, Timeout) ->
    spawn(fun() ->
                  Self = self(),
                  Ws = [spawn_link(fun() -> worker(Self, Pool, W, 0, Timeout) end)
                        || W <- lists:seq(1, Workers)],
                  collect(Ws, #{}, #{}, [])
          end).

load_stop(Load) ->
    Ref = monitor(process, Load),
    Load ! {stop, self()},
    receive
        {Load, Stats} -> demonitor(Ref, [flush]), Stats;
        {'DOWN', Ref, _, _, Why} -> error({load_died, Why})
    end.

worker(Collector, Pool, W, N, Timeout) ->
    receive
        stop -> Collector ! {stopped, self()}
    after 0 ->
        Id = W * 1000000 + N,
        Collector ! {started, Id, now_ms()},
        Res = erpy:eval(<<"__import__('time').sleep(0.02) or (x, __import__('os').environ['ERPYT_HOST'])">>,
                        #{x => Id}, #{pool => Pool, timeout => Timeout}),
        Stray = receive M when M =/= stop -> [M] after 0 -> [] end,
        Collector ! {done, Id, Res, Stray, now_ms()},
        worker(Collector, Pool, W, N + 1, Timeout)
    end.

collect(Ws, Started, Done, Stray) ->
    receive
        {started, Id, T} ->
            collect(Ws, Started#{Id => T}, Done, Stray);
        {done, Id, Res, S, T} ->
            %% A second answer for one id would be a call answered twice.
            Dup = case Done of #{Id := _} -> [{dup, Id}]; _ -> [] end,
            collect(Ws, Started, Done#{Id => {Res, T}}, Dup ++ S ++ Stray);
        {stop, From} ->
            [W ! stop || W <- Ws],
            finish(Ws, From, Started, Done, Stray)
    end.

finish([], From, Started, Done, Stray) ->
    From ! {self(), stats(Started, Done, Stray)};
finish(Ws, From, Started, Done, Stray) ->
    receive
        {stopped, W} ->
            finish(lists:delete(W, Ws), From, Started, Done, Stray);
        {started, Id, T} ->
            finish(Ws, From, Started#{Id => T}, Done, Stray);
        {done, Id, Res, S, T} ->
            Dup = case Done of #{Id := _} -> [{dup, Id}]; _ -> [] end,
            finish(Ws, From, Started, Done#{Id => {Res, T}}, Dup ++ S ++ Stray)
    after ?CALL_TIMEOUT + 5000 ->
        %% A worker still inside its call well past the call's deadline: that call is lost.
        From ! {self(), stats(Started, Done, Stray)}
    end.

stats(Started, Done, Stray) ->
    Results = [{Id, classify(Id, Res), S, E} || {Id, S} <- maps:to_list(Started),
                                               {Res, E} <- [maps:get(Id, Done, {lost, S})]],
    Count = fun(P) -> length([R || {_, C, _, _} = R <- Results, P(C)]) end,
    #{results => Results,
      ok => Count(fun({ok, _}) -> true; (_) -> false end),
      error => Count(fun({error, _}) -> true; (_) -> false end),
      lost => Count(fun(C) -> C =:= lost end),
      wrong => Count(fun({wrong, _}) -> true; (_) -> false end),
      %% A second answer to one call, or any message left in a caller's mailbox.
      dup => length(Stray),
      served => lists:foldl(fun({_, {ok, H}, _, _}, Acc) -> maps:update_with(H, fun(X) -> X + 1 end, 1, Acc);
                               (_, Acc) -> Acc
                            end, #{}, Results),
      errors => lists:foldl(fun({_, {error, Why}, _, _}, Acc) -> maps:update_with(Why, fun(X) -> X + 1 end, 1, Acc);
                               (_, Acc) -> Acc
                            end, #{}, Results)}.

classify(_Id, lost) -> lost;
classify(Id, {ok, {Id, Host}}) when is_binary(Host) -> {ok, Host};
classify(_Id, {ok, Other}) -> {wrong, Other};
classify(_Id, {error, Why}) -> {error, Why}.

%% ---- hosts -----------------------------------------------------------------------------

start_epmd(Net, I) ->
    Epmd = erpy_netns:spawn_in(Net, I, os:find_executable("epmd"), [], []),
    ok = wait_epmd(Net, I, 100),
    Epmd.

%% Until `epmd -names` answers in the namespace.
wait_epmd(_Net, _I, 0) ->
    {error, epmd_not_answering};
wait_epmd(Net, I, N) ->
    Out = os:cmd(ip() ++ " netns exec " ++ erpy_netns:ns(Net, I) ++ " " ++
                     os:find_executable("epmd") ++ " -names 2>&1"),
    case string:find(Out, "up and running") of
        nomatch -> timer:sleep(50), wait_epmd(Net, I, N - 1);
        _ -> ok
    end.

py_node(I) ->
    list_to_atom("py" ++ integer_to_list(I) ++ "@" ++ erpy_netns:addr(I)).

%% A Python node on host I, listening on the host's address, registered with its EPMD.
start_python(Net, I, Cookie) ->
    Root = root(),
    erpy_netns:spawn_in(Net, I, python(),
                        ["-m", "erpy.node", "--name", atom_to_list(py_node(I)),
                         "--listen", erpy_netns:addr(I), "--ticktime", integer_to_list(?TICKTIME),
                         "--allow-code", "--no-start-epmd", "--exit-on-eof"],
                        [{"ERPY_COOKIE", Cookie}, {"PYTHONPATH", filename:join(Root, "python")},
                         {"ERPYT_HOST", "h" ++ integer_to_list(I)}]).

%% The Python node now running on host I (node_killed starts a new one).
current_python(Config, I) ->
    Net = ?config(net, Config),
    Out = os:cmd(ip() ++ " netns pids " ++ erpy_netns:ns(Net, I)),
    Pids = [list_to_integer(P) || P <- string:lexemes(Out, "\n ")],
    [Py] = [P || P <- Pids, is_python(P)],
    Py.

is_python(Pid) ->
    case file:read_file("/proc/" ++ integer_to_list(Pid) ++ "/cmdline") of
        {ok, Cmd} -> binary:match(Cmd, <<"erpy.node">>) =/= nomatch;
        _ -> false
    end.

now_ms() -> erlang:system_time(millisecond).

ip() ->
    case os:find_executable("ip") of
        false -> "/usr/sbin/ip";
        Path -> Path
    end.

python() ->
    case os:getenv("ERPY_PYTHON") of
        false -> "/usr/bin/python3";
        P -> P
    end.

root() ->
    case os:getenv("ERPY_ROOT") of
        false -> filename:dirname(filename:dirname(proplists:get_value(source, module_info(compile))));
        R -> R
    end.
