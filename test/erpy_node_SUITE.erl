%% Node mode end to end (issue 6): real Python nodes (`python3 -m erpy.node`) reached by
%% stock OTP (net_adm, rpc, erpc, gen_server, !, monitors, links), Python reaching Erlang
%% nodes, the node pool (erpy_node_pool) with a node killed under load, the cookie, large
%% messages, and a Python node's memory over 100k calls. The suite makes this node
%% distributed if it is not, and starts every Python and peer node itself.
-module(erpy_node_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
%% Callbacks the pool tests let Python make.
-export([cb_gate/1]).
-export([ping/1, rpc_and_erpc/1, python_errors/1, allow_list/1, gen_server_handler/1,
         sends_and_order/1, monitors_and_links/1, python_to_erlang/1,
         several_erlang_nodes/1, nodedown_seen_by_python/1, silent_node_dropped_by_ticks/1,
         idle_connection_kept_by_ticks/1,
         wrong_cookie/1,
         large_messages/1, slow_handler_does_not_stall/1, concurrent_calls/1,
         calls_in_parallel/1,
         cli_env_fallbacks/1, pool_basics/1, pool_node_killed_under_load/1,
         pool_through_erpy_api/1, pool_caller_gives_up_interrupts_python/1,
         pool_max_message_size/1, pool_checkout/1,
         inbound_message_limit/1, pool_results_make_no_atoms/1, pool_callbacks/1,
         pool_callback_wait_interrupted/1, pool_request_waits_for_a_node/1,
         pool_callback_while_another_waits/1, pool_concurrent_callbacks/1,
         pool_nested_callbacks/1, pool_callbacks_after_timeout_dropped/1,
         pool_starts_nodes_side_by_side/1,
         memory_flat_over_100k_calls/1, crash_injection_soak/1,
         same_answers_as_port_mode/1, stock_rpc_resolves_as_every_mode/1]).

all() ->
    [ping, rpc_and_erpc, python_errors, allow_list, gen_server_handler, sends_and_order,
     monitors_and_links, python_to_erlang, several_erlang_nodes, nodedown_seen_by_python,
     silent_node_dropped_by_ticks, idle_connection_kept_by_ticks, wrong_cookie, large_messages, slow_handler_does_not_stall, concurrent_calls,
     calls_in_parallel,
     cli_env_fallbacks, pool_basics, pool_node_killed_under_load, pool_through_erpy_api,
     pool_caller_gives_up_interrupts_python, pool_max_message_size, pool_checkout,
     inbound_message_limit, pool_results_make_no_atoms, pool_callbacks,
     pool_callback_wait_interrupted, pool_request_waits_for_a_node,
     pool_callback_while_another_waits, pool_concurrent_callbacks, pool_nested_callbacks,
     pool_callbacks_after_timeout_dropped, pool_starts_nodes_side_by_side,
     memory_flat_over_100k_calls, crash_injection_soak,
     same_answers_as_port_mode, stock_rpc_resolves_as_every_mode].

suite() ->
    [{timetrap, {seconds, 60}}].

init_per_suite(Config) ->
    _ = os:cmd("epmd -daemon"),
    case is_alive() of
        true -> ok;
        false -> {ok, _} = net_kernel:start(['ct_erpy@127.0.0.1', longnames])
    end,
    _ = application:load(erpy),
    Py1 = start_python(py_a),
    Py2 = start_python(py_b),
    [{py1, Py1}, {py2, Py2} | Config].

end_per_suite(Config) ->
    [stop_python(?config(K, Config)) || K <- [py1, py2]],
    ok.

init_per_testcase(_Case, Config) ->
    Config.

end_per_testcase(_Case, _Config) ->
    catch erpy_node_pool:stop(np_basic),
    catch erpy_node_pool:stop(np_kill),
    ok.

%% ---- stock OTP into Python ---------------------------------------------------------------

%% net_adm:ping answers pong and the Python node is a hidden node of this one.
ping(Config) ->
    {Node, _} = ?config(py1, Config),
    ?assertEqual(pong, net_adm:ping(Node)),
    ?assert(lists:member(Node, nodes(hidden))),
    ?assertNot(lists:member(Node, nodes())).

%% rpc:call, erpc:call/cast/multicall reach allowed Python modules, dotted names included.
rpc_and_erpc(Config) ->
    {P1, _} = ?config(py1, Config),
    {P2, _} = ?config(py2, Config),
    ?assertEqual(3, rpc:call(P1, operator, add, [1, 2])),
    ?assertEqual(<<"a/b">>, rpc:call(P1, 'os.path', join, [<<"a">>, <<"b">>])),
    ?assertEqual([1, 2, 3], erpc:call(P1, builtins, sorted, [[1, 3, 2]])),
    ?assertEqual([{ok, 3}, {ok, 3}], erpc:multicall([P1, P2], operator, add, [1, 2])),
    ?assertEqual({[3, 3], []}, rpc:multicall([P1, P2], operator, add, [1, 2])),
    %% erpc:cast runs the function; it tells us so.
    ok = erpc:cast(P1, node_handlers, notify, [self(), cast_ran]),
    receive cast_ran -> ok after 5000 -> ct:fail(no_cast) end,
    %% A term of every kind survives the round trip.
    T = {1, -2, 1 bsl 70, 1.5, atom, <<"bin">>, <<255, 0>>, [1, [2]], #{<<"k">> => [v]},
         self(), make_ref(), [a | b], true, undefined},
    ?assertEqual(T, erpc:call(P1, node_handlers, echo, [T])).

%% A Python exception reaches erpc as error({exception, #{type, message, traceback}, Stack}) and rpc as badrpc.
python_errors(Config) ->
    {P, _} = ?config(py1, Config),
    try erpc:call(P, node_handlers, crash, [<<"bad thing">>]) of
        R -> ct:fail({no_exception, R})
    catch
        error:{exception, #{type := <<"ValueError">>, message := <<"bad thing">>,
                            traceback := [_ | _]}, []} -> ok
    end,
    ?assertMatch({badrpc, {'EXIT', {#{type := <<"ZeroDivisionError">>}, []}}},
                 rpc:call(P, operator, truediv, [1, 0])),
    %% The node stays usable.
    ?assertEqual(3, rpc:call(P, operator, add, [1, 2])).

%% Stock rpc finds functions as every mode does (dotted names walk attributes) and reports
%% errors as every mode does (the traceback is format_exception's chunks); private names
%% stay out of reach at every step of a dotted name.
stock_rpc_resolves_as_every_mode(Config) ->
    {P, _} = ?config(py1, Config),
    ?assertEqual(#{<<"a">> => 0, <<"b">> => 0}, rpc:call(P, builtins, 'dict.fromkeys', [[<<"a">>, <<"b">>], 0])),
    ?assertEqual(<<"ABC">>, erpc:call(P, builtins, 'str.upper', [<<"abc">>])),
    %% No Python frame between the call and the builtin: the exception line alone.
    ?assertMatch({badrpc, {'EXIT', {#{type := <<"ZeroDivisionError">>,
                                      traceback := [<<"ZeroDivisionError: division by zero\n">>]}, []}}},
                 rpc:call(P, operator, truediv, [1, 0])),
    try erpc:call(P, node_handlers, crash, [<<"bad">>]) of
        R -> ct:fail({no_exception, R})
    catch
        error:{exception, #{traceback := [<<"Traceback (most recent call last):\n">>, Frame, Last]}, []} ->
            ?assertMatch({_, _}, binary:match(Frame, <<"in crash\n">>)),
            ?assertEqual(<<"ValueError: bad\n">>, Last)
    end,
    ?assertMatch({badrpc, {'EXIT', {#{type := <<"NotAllowed">>}, _}}}, rpc:call(P, builtins, 'dict.__class__', [])),
    ?assertMatch({badrpc, {'EXIT', {#{type := <<"AttributeError">>}, _}}}, rpc:call(P, builtins, 'dict.nope', [])).

%% Node mode runs its requests through the executor of the other modes (py::Runner): the
%% same request gives the same answer as in port mode, in dotted names, namespaces, code
%% kept in a held worker, callbacks into Erlang, and every error map (the traceback's
%% format_exception chunks included).
same_answers_as_port_mode(_Config) ->
    {ok, _} = application:ensure_all_started(erpy),
    Opts = #{size => 1, allowed => [{lists, sort}], pythonpath => [test_py_dir()]},
    try
        {ok, _} = erpy:start_pool(parity_port, Opts),
        {ok, _} = erpy:start_pool(parity_node, Opts#{mode => node, start => 1}),
        Same = fun(F) ->
                       Port = F(#{pool => parity_port}),
                       ?assertEqual(Port, F(#{pool => parity_node})),
                       Port
               end,
        Call = fun(M, F, A) -> Same(fun(O) -> erpy:call(M, F, A, O) end) end,
        Eval = fun(E) -> Same(fun(O) -> erpy:eval(E, #{}, O) end) end,
        ?assertEqual({ok, #{<<"a">> => 0, <<"b">> => 0}}, Call(builtins, 'dict.fromkeys', [[<<"a">>, <<"b">>], 0])),
        ?assertEqual({ok, <<"a/b">>}, Call('os.path', join, [<<"a">>, <<"b">>])),
        ?assertEqual({ok, <<"ABC">>}, Call(builtins, 'str.upper', [<<"abc">>])),
        ?assertEqual({ok, [3, 2, 1]},
                     Same(fun(O) -> erpy:call(builtins, sorted, [[1, 3, 2]], O#{kwargs => #{reverse => true}}) end)),
        ?assertEqual({ok, 3}, Same(fun(O) -> erpy:eval(<<"x + y">>, #{x => 1, <<"y">> => 2}, O) end)),
        %% Errors, whole: type, message and traceback.
        ?assertMatch({error, #{type := <<"ZeroDivisionError">>,
                               traceback := [<<"Traceback (most recent call last):\n">>,
                                             <<"  File \"<erpy>\", line 1, in <module>\n">>,
                                             <<"ZeroDivisionError: division by zero\n">>]}},
                     Eval(<<"1 / 0">>)),
        ?assertMatch({error, #{traceback := [<<"ZeroDivisionError: division by zero\n">>]}},
                     Call(operator, truediv, [1, 0])),
        ?assertMatch({error, #{type := <<"ValueError">>, traceback := [_, _, _]}},
                     Call(node_handlers, crash, [<<"bad">>])),
        ?assertMatch({error, #{type := <<"AttributeError">>}}, Call(builtins, 'dict.nope', [])),
        ?assertMatch({error, #{type := <<"ModuleNotFoundError">>}}, Call(no_such_python_module, f, [])),
        ?assertMatch({error, #{type := <<"TypeError">>}}, Call(operator, add, [1])),
        ?assertMatch({error, #{type := <<"SyntaxError">>}}, Eval(<<"1 +">>)),
        ?assertMatch({error, #{type := <<"NameError">>}}, Eval(<<"leftover">>)),
        ?assertMatch({ok, #{status := error, error := #{type := <<"ValueError">>, traceback := [_, _, _, _]}}},
                     Same(fun(O) -> erpy:run(O#{code => <<"def f(x):\n    raise ValueError(x)\nresult = f(1)">>}) end)),
        %% Namespaces: a fresh one per request, with the same names in it.
        ?assertEqual({ok, [<<"__builtins__">>, <<"__name__">>, <<"erlang">>]}, Eval(<<"sorted(globals())">>)),
        ?assertEqual({ok, <<"__erpy__">>}, Eval(<<"__name__">>)),
        ?assertEqual({ok, #{status => ok,
                            result => [2, [<<"__builtins__">>, <<"__name__">>, <<"arguments">>, <<"erlang">>, <<"result">>]]}},
                     Same(fun(O) -> erpy:run(O#{code => <<"result = [arguments, sorted(globals())]">>,
                                                arguments => 2}) end)),
        %% A held worker keeps its names; a traceback through code it defined reads alike.
        {error, #{traceback := Tb}} =
            Same(fun(#{pool := Pool}) ->
                         erpy:with_worker(Pool, fun(W) ->
                                                        ok = erpy:exec(<<"def g(x):\n    return 1 / x">>, #{worker => W}),
                                                        {ok, 1.0} = erpy:eval(<<"g(1)">>, #{}, #{worker => W}),
                                                        erpy:eval(<<"g(0)">>, #{}, #{worker => W})
                                                end)
                 end),
        ?assertEqual(<<"  File \"<erpy>\", line 2, in g\n">>, lists:nth(3, Tb)),
        %% Callbacks into Erlang, allowed and refused.
        ?assertEqual({ok, #{status => ok, result => [1, 2, 3]}},
                     Same(fun(O) -> erpy:run(O#{code => <<"result = erlang.call('lists', 'sort', [3, 1, 2])">>}) end)),
        ?assertMatch({error, #{type := <<"ErlangError">>}}, Same(fun(O) -> erpy:exec(<<"erlang.call('os', 'getpid', [])">>, O) end)),
        ?assertEqual({ok, #{status => ok, result => {not_allowed, {os, getpid, 1}}}},
                     Same(fun(O) -> erpy:run(O#{code => <<"try:\n    erlang.call('os', 'getpid', [])\n"
                                                          "except erlang.ErlangError as e:\n    result = e.args[0]">>}) end)),
        ?assertMatch({error, #{type := <<"TypeError">>}},
                     Same(fun(O) -> erpy:exec(<<"erlang.apply('lists', 'sort', 5)">>, O) end))
    after
        catch erpy:stop_pool(parity_port),
        catch erpy:stop_pool(parity_node),
        application:stop(erpy)
    end.

%% Only allowed modules are reachable; private names never; a refusal is a NotAllowed error.
allow_list(Config) ->
    {P, _} = ?config(py1, Config),
    ?assertMatch({badrpc, {'EXIT', {#{type := <<"NotAllowed">>}, _}}}, rpc:call(P, os, getcwd, [])),
    ?assertMatch({badrpc, {'EXIT', {#{type := <<"NotAllowed">>}, _}}}, rpc:call(P, subprocess, run, [[<<"id">>]])),
    ?assertMatch({badrpc, {'EXIT', {#{type := <<"NotAllowed">>}, _}}}, rpc:call(P, operator, '__dict__', [])),
    %% Code execution through erpy.service is off unless --allow-code.
    ?assertMatch({badrpc, {'EXIT', {#{type := <<"NotAllowed">>}, _}}},
                 rpc:call(P, 'erpy.service', eval, [<<"1+1">>, #{}])).

%% gen_server:call/cast reach a Python GenServer registered by name; a deferred reply works; a crash exits the caller with the error map.
gen_server_handler(Config) ->
    {P, _} = ?config(py1, Config),
    S = {counter, P},
    Base = gen_server:call(S, get),
    ?assertEqual(Base + 5, gen_server:call(S, {add, 5})),
    ok = gen_server:cast(S, {add, 10}),
    ?assertEqual(Base + 15, gen_server:call(S, get)),
    ?assertEqual(deferred, gen_server:call(S, {defer, deferred})),
    ?assertEqual({unknown, what}, gen_server:call(S, what)),
    Pid = gen_server:call(S, pid),
    ?assert(is_pid(Pid)),
    ?assertEqual(P, node(Pid)),
    ?assertEqual(Base + 16, gen_server:call(Pid, {add, 1})),
    %% No monitor is left behind by calls (each call demonitors).
    {monitors, Mons} = process_info(self(), monitors),
    ?assertEqual([], Mons).

%% {Name, Node} ! Msg and Pid ! Msg reach Python mailboxes; one sender's messages arrive in order.
sends_and_order(Config) ->
    {P, _} = ?config(py1, Config),
    {counter, P} ! {ping, self()},
    Pid = receive {pong, Pp} -> Pp after 5000 -> ct:fail(no_pong) end,
    Pid ! {ping, self()},
    receive {pong, Pid} -> ok after 5000 -> ct:fail(no_pong_by_pid) end,
    [] = gen_server:call({collector, P}, get),
    N = 20000,
    [{collector, P} ! {seq, I} || I <- lists:seq(1, N)],
    Got = gen_server:call({collector, P}, get, 30000),
    ?assertEqual([{seq, I} || I <- lists:seq(1, N)], Got).

%% Monitors of Python processes get 'DOWN' with the exit reason, links get 'EXIT', a dead or unknown target gives noproc.
monitors_and_links(Config) ->
    {P, _} = ?config(py2, Config),
    Pid = gen_server:call({counter, P}, pid),
    Ref = erlang:monitor(process, Pid),
    process_flag(trap_exit, true),
    true = link(Pid),
    ok = gen_server:cast(Pid, {stop, finished}),
    receive {'DOWN', Ref, process, Pid, finished} -> ok after 5000 -> ct:fail(no_down) end,
    receive {'EXIT', Pid, finished} -> ok after 5000 -> ct:fail(no_exit) end,
    %% The process is gone: a new monitor fires at once with noproc.
    Ref2 = erlang:monitor(process, Pid),
    receive {'DOWN', Ref2, process, Pid, noproc} -> ok after 5000 -> ct:fail(no_noproc) end,
    Ref3 = erlang:monitor(process, {no_such_name, P}),
    receive {'DOWN', Ref3, process, {no_such_name, P}, noproc} -> ok after 5000 -> ct:fail(no_noproc_name) end,
    %% A handler crash: the monitor sees the error map.
    restart_counter(P),
    Pid2 = gen_server:call({counter, P}, pid),
    Ref4 = erlang:monitor(process, Pid2),
    ?assertExit({#{type := <<"RuntimeError">>}, _}, gen_server:call(Pid2, crash)),
    receive {'DOWN', Ref4, process, Pid2, #{type := <<"RuntimeError">>}} -> ok
    after 5000 -> ct:fail(no_crash_down) end,
    restart_counter(P),
    process_flag(trap_exit, false).

%% ---- Python into Erlang ------------------------------------------------------------------

%% Python calls Erlang (erpc), sends to registered names and pids, and makes gen_server calls into Erlang; the nested calls come back over the same connection.
python_to_erlang(Config) ->
    {P, _} = ?config(py1, Config),
    Me = node(),
    ?assertEqual(Me, rpc:call(P, node_handlers, erlang_rpc, [Me, erlang, node, []])),
    ?assertEqual([1, 2, 3], rpc:call(P, node_handlers, erlang_rpc, [Me, lists, sort, [[3, 1, 2]]])),
    ?assertMatch({badrpc, {'EXIT', {#{type := <<"ErlangError">>}, _}}},
                 rpc:call(P, node_handlers, erlang_rpc, [Me, erlang, error, [oops]])),
    Srv = spawn_link(fun Loop() ->
                             receive
                                 {'$gen_call', From, Req} -> gen:reply(From, {echo, Req}), Loop();
                                 {relay, To, M} -> To ! M, Loop()
                             end
                     end),
    register(erpy_test_srv, Srv),
    ?assertEqual({echo, hello}, rpc:call(P, node_handlers, erlang_call, [erpy_test_srv, Me, hello])),
    ok = rpc:call(P, node_handlers, erlang_send, [{erpy_test_srv, Me}, {relay, self(), via_name}]),
    receive via_name -> ok after 5000 -> ct:fail(no_send_by_name) end,
    ok = rpc:call(P, node_handlers, erlang_send, [self(), via_pid]),
    receive via_pid -> ok after 5000 -> ct:fail(no_send_by_pid) end,
    unregister(erpy_test_srv),
    unlink(Srv),
    exit(Srv, kill).

%% One Python node talks to several Erlang nodes, each over its own connection.
several_erlang_nodes(Config) ->
    {P, _} = ?config(py1, Config),
    {ok, Peer1, N1} = start_peer(erpy_peer_a),
    {ok, Peer2, N2} = start_peer(erpy_peer_b),
    try
        ?assertEqual(N1, rpc:call(P, node_handlers, erlang_rpc, [N1, erlang, node, []])),
        ?assertEqual(N2, rpc:call(P, node_handlers, erlang_rpc, [N2, erlang, node, []])),
        %% And they reach the Python node themselves.
        ?assertEqual(3, erpc:call(N1, rpc, call, [P, operator, add, [1, 2]])),
        ?assertEqual(3, erpc:call(N2, erpc, call, [P, operator, add, [1, 2]]))
    after
        peer:stop(Peer1),
        peer:stop(Peer2)
    end.

%% A Python process monitoring a process of an Erlang node that stops gets 'DOWN' with noconnection.
nodedown_seen_by_python(Config) ->
    {P, _} = ?config(py2, Config),
    {ok, Peer, N} = start_peer(erpy_peer_c),
    Remote = erpc:call(N, erlang, whereis, [init]),
    Self = self(),
    spawn_link(fun() -> Self ! {down, rpc:call(P, node_handlers, monitor_and_wait, [Remote, 10.0], 15000)} end),
    timer:sleep(300),
    peer:stop(Peer),
    receive {down, R} -> ?assertEqual(noconnection, R) after 15000 -> ct:fail(no_nodedown) end.

%% An Erlang node that stops answering (SIGSTOP: no ticks, no close) is dropped by the Python node after its ticktime, and monitors over that connection fire with noconnection.
silent_node_dropped_by_ticks(_Config) ->
    {Py, Holder} = start_python(py_ticks, #{args => ["--ticktime", "4"]}),
    {ok, Peer, N} = peer:start_link(#{name => erpy_peer_t, host => "127.0.0.1", longnames => true,
                                      args => ["-setcookie", atom_to_list(erlang:get_cookie()),
                                               "-kernel", "net_ticktime", "4"]}),
    OsPid = erpc:call(N, os, getpid, []),
    Remote = erpc:call(N, erlang, whereis, [init]),
    Self = self(),
    %% This node ticks every 15 s (net_ticktime 60): traffic keeps its own connection to
    %% the Python node (ticktime 4) alive meanwhile.
    Keep = spawn_link(fun Loop() -> {nobody, Py} ! keepalive, timer:sleep(300), Loop() end),
    try
        spawn_link(fun() -> Self ! {down, rpc:call(Py, node_handlers, monitor_and_wait, [Remote, 20.0], 25000)} end),
        timer:sleep(500),
        _ = os:cmd("kill -STOP " ++ OsPid),
        T0 = erlang:monotonic_time(millisecond),
        receive {down, R} -> ?assertEqual(noconnection, R) after 20000 -> ct:fail(not_dropped) end,
        Ms = erlang:monotonic_time(millisecond) - T0,
        ct:pal("silent node dropped after ~p ms", [Ms]),
        ?assert(Ms >= 2000 andalso Ms < 12000)
    after
        unlink(Keep),
        exit(Keep, kill),
        _ = os:cmd("kill -CONT " ++ OsPid),
        catch peer:stop(Peer),
        stop_python({Py, Holder})
    end.

%% An idle connection stays up across several ticktimes: the Python node ticks, so an Erlang node with net_ticktime 4 keeps it for 10 s of silence.
idle_connection_kept_by_ticks(_Config) ->
    {Py, Holder} = start_python(py_idle, #{args => ["--ticktime", "4"]}),
    %% Controlled over stdio, not distribution: this node (net_ticktime 60) and the peer
    %% (4) would not keep a connection between themselves.
    {ok, Peer, _N} = peer:start_link(#{name => erpy_peer_i, host => "127.0.0.1", longnames => true,
                                       connection => standard_io,
                                       args => ["-setcookie", atom_to_list(erlang:get_cookie()),
                                                "-kernel", "net_ticktime", "4"]}),
    try
        ?assertEqual(pong, peer:call(Peer, net_adm, ping, [Py])),
        timer:sleep(10000),
        ?assert(lists:member(Py, peer:call(Peer, erlang, nodes, [hidden]))),
        ?assertEqual(3, peer:call(Peer, rpc, call, [Py, operator, add, [1, 2]]))
    after
        catch peer:stop(Peer),
        stop_python({Py, Holder})
    end.

%% ---- security, size, concurrency -----------------------------------------------------------

%% A Python node with another cookie is refused: ping gives pang, rpc nodedown.
wrong_cookie(_Config) ->
    {Node, Port} = start_python(py_badcookie, #{cookie => "not_the_cookie"}),
    try
        ?assertEqual(pang, net_adm:ping(Node)),
        ?assertEqual({badrpc, nodedown}, rpc:call(Node, operator, add, [1, 2]))
    after
        stop_python({Node, Port})
    end.

%% Messages far over the fragmentation threshold go both ways intact.
large_messages(Config) ->
    {P, _} = ?config(py1, Config),
    Big = crypto:strong_rand_bytes(8 * 1024 * 1024),
    ?assertEqual(Big, erpc:call(P, node_handlers, echo, [Big], 30000)),
    Maps = [#{<<"id">> => I, <<"name">> => <<"item">>, <<"score">> => 1.5} || I <- lists:seq(1, 100000)],
    ?assertEqual(Maps, erpc:call(P, node_handlers, echo, [Maps], 30000)),
    ok = rpc:call(P, node_handlers, erlang_send, [self(), {big, Big}]),
    receive {big, B} -> ?assertEqual(Big, B) after 10000 -> ct:fail(no_big_message) end.

%% A handler that sleeps does not stall the node: other calls go on meanwhile.
slow_handler_does_not_stall(Config) ->
    {P, _} = ?config(py2, Config),
    Self = self(),
    spawn_link(fun() -> Self ! {slow, rpc:call(P, node_handlers, sleep, [1.5], 5000)} end),
    timer:sleep(100),
    {Us, R} = timer:tc(fun() -> rpc:call(P, operator, add, [1, 2]) end),
    ?assertEqual(3, R),
    ?assert(Us < 500000),
    receive {slow, slept} -> ok after 5000 -> ct:fail(no_slow_answer) end.

%% Many calls in flight from many callers: every answer is the right one.
concurrent_calls(Config) ->
    {P, _} = ?config(py1, Config),
    Self = self(),
    Callers = [spawn_link(fun() ->
                                  Rs = [erpc:call(P, operator, add, [C, I]) || I <- lists:seq(1, 2000)],
                                  Self ! {done, C, Rs}
                          end) || C <- lists:seq(1, 8)],
    [receive {done, C, Rs} -> ?assertEqual([C + I || I <- lists:seq(1, 2000)], Rs) end
     || C <- lists:seq(1, length(Callers))].

%% Calls that release the GIL (here time.sleep) run in parallel: 24 calls of 0.2 s from one node take far less than 24 x 0.2 s.
calls_in_parallel(Config) ->
    {P, _} = ?config(py2, Config),
    Self = self(),
    {Us, _} = timer:tc(fun() ->
                               [spawn_link(fun() -> Self ! {slept, rpc:call(P, node_handlers, sleep, [0.2])} end)
                                || _ <- lists:seq(1, 24)],
                               [receive {slept, R} -> ?assertEqual(slept, R) after 10000 -> ct:fail(stuck) end
                                || _ <- lists:seq(1, 24)]
                       end),
    ct:pal("24 calls of 0.2 s took ~p ms", [Us div 1000]),
    ?assert(Us < 2000000).

%% The node starts from the seed's BPY_BEAM_* environment variables alone (no flags).
cli_env_fallbacks(_Config) ->
    Node = list_to_atom("py_env@127.0.0.1"),
    Env = [{"BPY_BEAM_NODE", "py_env"}, {"BPY_BEAM_COOKIE", atom_to_list(erlang:get_cookie())},
           {"BPY_BEAM_HOST", "127.0.0.1"}, {"ERPY_NODE_ALLOW", "operator"}],
    Port = open_python(["-m", "erpy.node", "--exit-on-eof"], Env),
    try
        ok = wait_pong(Node, 100),
        ?assertEqual(7, rpc:call(Node, operator, add, [3, 4]))
    after
        stop_python({Node, Port})
    end.

%% ---- node pool ---------------------------------------------------------------------------

%% erpy_node_pool: call, eval, exec, run and errors over two Python nodes it starts itself, spread over both.
pool_basics(_Config) ->
    {ok, _} = erpy_node_pool:start_link(np_basic, #{start => 2, pythonpath => [test_py_dir()]}),
    %% The pool answers once its first node is up; the second joins right after.
    ?assertMatch([_ | _], erpy_node_pool:nodes(np_basic)),
    ok = all_up(np_basic, 2),
    ?assertEqual({ok, 3}, erpy_node_pool:request(np_basic, erpy_request:call(<<"operator">>, <<"add">>, [1, 2], #{}), 5000)),
    ?assertEqual({ok, [3, 2, 1]},
                 erpy_node_pool:request(np_basic, erpy_request:call(<<"builtins">>, <<"sorted">>, [[1, 3, 2]], #{reverse => true}), 5000)),
    ?assertEqual({ok, 42}, erpy_node_pool:request(np_basic, erpy_request:eval(<<"x * 2">>, #{x => 21}), 5000)),
    ?assertEqual({ok, undefined}, erpy_node_pool:request(np_basic, erpy_request:exec(<<"y = 1">>), 5000)),
    ?assertEqual({ok, 8}, erpy_node_pool:request(np_basic, erpy_request:run(<<"result = arguments * 2">>, 4), 5000)),
    ?assertMatch({error, #{type := <<"ZeroDivisionError">>, message := _, traceback := [_ | _]}},
                 erpy_node_pool:request(np_basic, erpy_request:eval(<<"1 / 0">>, #{}), 5000)),
    ?assertEqual({error, timeout},
                 erpy_node_pool:request(np_basic, erpy_request:exec(<<"import time; time.sleep(1)">>), 100)),
    Pids = lists:usort([element(2, erpy_node_pool:request(np_basic, erpy_request:eval(<<"__import__('os').getpid()">>, #{}), 5000))
                        || _ <- lists:seq(1, 10)]),
    ?assertEqual(2, length(Pids)),
    ?assertEqual({error, {no_pool, nope}}, erpy_node_pool:request(nope, erpy_request:exec(<<>>), 100)),
    ok = erpy_node_pool:stop(np_basic).

%% A pool's first node starts alone and the others once it is up, each joined as soon as
%% it says it listens: the pool answers from its start on and is soon up with all of them,
%% each answering. A first node that exits before it listens fails the start with its exit
%% status (not a timeout).
pool_starts_nodes_side_by_side(_Config) ->
    {ok, _} = erpy_node_pool:start_link(np_side, #{start => 3}),
    try
        ?assertEqual({ok, 3}, erpy_node_pool:request(np_side, erpy_request:call(<<"operator">>, <<"add">>, [1, 2], #{}), 5000)),
        ok = all_up(np_side, 3),
        Nodes = erpy_node_pool:nodes(np_side),
        [?assertEqual(3, erpc:call(N, 'erpy.service', call, [<<"operator">>, <<"add">>, [1, 2], #{}])) || N <- Nodes]
    after
        erpy_node_pool:stop(np_side)
    end,
    process_flag(trap_exit, true),
    try
        False = os:find_executable("false"),
        ?assertMatch({error, {node_start_failed, _, {exit_status, 1}}},
                     erpy_node_pool:start_link(np_false, #{start => 2, python => False})),
        receive {'EXIT', _, _} -> ok after 5000 -> ok end
    after
        process_flag(trap_exit, false)
    end.

%% A node killed under load fails only its in-flight calls ({node_down, Node}), is dropped, and rejoins when back.
pool_node_killed_under_load(_Config) ->
    {ok, _} = erpy_node_pool:start_link(np_kill, #{start => 2}),
    ok = all_up(np_kill, 2),
    [N1, N2] = erpy_node_pool:nodes(np_kill),
    OsPid = erpc:call(N1, 'erpy.service', eval, [<<"__import__('os').getpid()">>, #{}]),
    Self = self(),
    Callers = [spawn_link(fun() ->
                                  Rs = [erpy_node_pool:request(np_kill, erpy_request:call(<<"operator">>, <<"add">>, [I, 1], #{}), 5000)
                                        || I <- lists:seq(1, 1500)],
                                  Self ! {done, Rs}
                          end) || _ <- lists:seq(1, 4)],
    timer:sleep(200),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
    Results = lists:append([receive {done, Rs} -> Rs after 30000 -> ct:fail(caller_stuck) end || _ <- Callers]),
    Errors = [E || {error, _} = E <- Results],
    ct:pal("~p calls, errors: ~p", [length(Results), Errors]),
    %% Only in-flight calls fail (at most one per caller), only with node_down of N1.
    ?assert(length(Errors) =< 4),
    [?assertEqual({error, {node_down, N1}}, E) || E <- Errors],
    ?assertEqual(length(Results) - length(Errors), length([ok || {ok, _} <- Results])),
    %% The pool restarts its node, which rejoins.
    ok = wait_until(fun() -> lists:sort(erpy_node_pool:nodes(np_kill)) =:= lists:sort([N1, N2]) end, 200),
    ?assertEqual({ok, 2}, erpc_pool_call(np_kill)),
    ok = erpy_node_pool:stop(np_kill).

%% erpy:start_pool(P, #{mode => node}) gives the API of the other modes: call, eval, run, errors, stop.
pool_through_erpy_api(_Config) ->
    {ok, _} = application:ensure_all_started(erpy),
    try
        {ok, _} = erpy:start_pool(np_api, #{mode => node, start => 1}),
        ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], #{pool => np_api})),
        ?assertEqual({ok, <<"a/b">>}, erpy:call('os.path', join, [<<"a">>, <<"b">>], #{pool => np_api})),
        ?assertEqual({ok, 42}, erpy:eval(<<"x * 2">>, #{x => 21}, #{pool => np_api})),
        ?assertEqual({ok, #{status => ok, result => 30}},
                     erpy:run(#{code => <<"result = arguments['x'] + arguments['y']">>,
                                arguments => #{<<"x">> => 10, <<"y">> => 20}, pool => np_api})),
        ?assertMatch({ok, #{status := error, error := #{type := <<"ZeroDivisionError">>}}},
                     erpy:run(#{code => <<"result = 1 / 0">>, pool => np_api})),
        ?assertEqual({error, timeout}, erpy:run(#{code => <<"import time; time.sleep(1)">>, pool => np_api}, 100)),
        ok = erpy:stop_pool(np_api),
        ?assertMatch({error, _}, erpy:call(operator, add, [1, 2], #{pool => np_api}))
    after
        application:stop(erpy)
    end.

%% A caller that gives up (timeout, death, exit/2, a linked spawner's death) interrupts its
%% Python call: a busy loop stops (its counter stands still) and the same node answers the
%% next call promptly.
pool_caller_gives_up_interrupts_python(_Config) ->
    {ok, _} = application:ensure_all_started(erpy),
    try
        {ok, _} = erpy:start_pool(np_int, #{mode => node, start => 1}),
        Opts = #{pool => np_int},
        Count = fun() -> {ok, N} = erpy:eval(<<"getattr(__import__('sys'), 'erpy_n', 0)">>, #{}, Opts), N end,
        Loop = <<"import sys\nsys.erpy_n = 0\nwhile True: sys.erpy_n += 1">>,
        %% The loop has stopped: its counter stands still (waiting a little for it on a
        %% loaded machine); returns how long a short call took right after.
        Stopped = fun() ->
                          T0 = erlang:monotonic_time(millisecond),
                          {ok, 3} = erpy:call(operator, add, [1, 2], Opts),
                          Took = erlang:monotonic_time(millisecond) - T0,
                          ok = wait_until(fun() ->
                                                  A = Count(),
                                                  timer:sleep(100),
                                                  A > 0 andalso A =:= Count()
                                          end, 10),
                          Took
                  end,
        %% Timeout: erpc takes its monitor back, the Python node interrupts the call.
        ?assertEqual({error, timeout}, erpy:exec(Loop, Opts#{timeout => 200})),
        Took = Stopped(),
        ct:pal("call after the interrupted one: ~p ms", [Took]),
        ?assert(Took < 100),
        %% Also when the timeout comes before the Python node told the caller the call's pid.
        ?assertEqual({error, timeout}, erpy:exec(Loop, Opts#{timeout => 1})),
        timer:sleep(50),
        _ = Stopped(),
        %% The caller dies while the call runs.
        Caller = spawn(fun() -> erpy:exec(Loop, Opts#{timeout => 10000}) end),
        timer:sleep(200),
        exit(Caller, kill),
        timer:sleep(50),
        _ = Stopped(),
        %% Stock spawn on the Python node: exit(Pid, kill), and a linked spawner's death.
        [Node] = erpy_node_pool:nodes(np_int),
        Pid = spawn(Node, 'erpy.service', exec, [Loop]),
        timer:sleep(100),
        exit(Pid, kill),
        _ = Stopped(),
        Linker = spawn(fun() -> spawn_link(Node, 'erpy.service', exec, [Loop]), receive never -> ok end end),
        timer:sleep(100),
        exit(Linker, die),
        _ = Stopped(),
        %% A handler that swallows KeyboardInterrupt is interrupted again until it stops.
        Stubborn = <<"import sys\nsys.erpy_n = 0\nwhile True:\n  try:\n    while True: sys.erpy_n += 1\n"
                     "  except KeyboardInterrupt:\n    pass">>,
        ?assertEqual({error, timeout}, erpy:exec(Stubborn, Opts#{timeout => 200})),
        timer:sleep(200),
        _ = Stopped(),
        ok = erpy:stop_pool(np_int)
    after
        application:stop(erpy)
    end.

%% max_message_size: a larger request is not sent, a larger result is refused by the
%% Python node, both as {error, {message_too_large, Size, Max}}; the limit is the pool's.
pool_max_message_size(_Config) ->
    {ok, _} = erpy_node_pool:start_link(np_size, #{start => 1, max_message_size => 1000}),
    try
        Big = binary:copy(<<"x">>, 2000),
        Req = erpy_request:call(<<"builtins">>, <<"len">>, [Big], #{}),
        ?assertMatch({error, {message_too_large, _, 1000}}, erpy_node_pool:request(np_size, Req, 5000)),
        %% Just under the limit goes through.
        ?assertEqual({ok, 500}, erpy_node_pool:request(np_size, erpy_request:call(<<"builtins">>, <<"len">>, [binary:copy(<<"x">>, 500)], #{}), 5000)),
        %% Results: measured as Erlang would (external_size of the result).
        Result = binary:copy(<<"y">>, 3000),
        RSize = erlang:external_size(Result),
        ?assertEqual({error, {message_too_large, RSize, 1000}},
                     erpy_node_pool:request(np_size, erpy_request:eval(<<"'y' * 3000">>, #{}), 5000)),
        ?assertEqual({error, {message_too_large, RSize, 1000}},
                     erpy_node_pool:request(np_size, erpy_request:run(<<"result = 'y' * 3000">>, undefined), 5000)),
        ?assertEqual({ok, binary:copy(<<"y">>, 900)},
                     erpy_node_pool:request(np_size, erpy_request:eval(<<"'y' * 900">>, #{}), 5000)),
        %% The default is the application's max_message_size, 10 MiB.
        {ok, _} = erpy_node_pool:start_link(np_size2, #{nodes => erpy_node_pool:nodes(np_size)}),
        {ok, erpy_node_pool, #{max_message_size := 10485760}} = erpy_transport:lookup(np_size2),
        Over = erpy_request:eval(<<"len(b)">>, #{b => binary:copy(<<0>>, 10485760)}),
        ?assertMatch({error, {message_too_large, _, 10485760}}, erpy_node_pool:request(np_size2, Over, 5000)),
        ok = erpy_node_pool:stop(np_size2)
    after
        erpy_node_pool:stop(np_size)
    end.

%% checkout/checkin: a held worker is a namespace on one node, kept across requests,
%% separate from other holders, cleared at checkin and when the holder dies.
pool_checkout(_Config) ->
    {ok, _} = erpy_node_pool:start_link(np_co, #{start => 1}),
    try
        {ok, W} = erpy_node_pool:checkout(np_co, 5000),
        {erpy_node_worker, np_co, Node, _} = W,
        [Node] = erpy_node_pool:nodes(np_co),
        {ok, W2} = erpy_node_pool:checkout(np_co, 5000),
        ?assertEqual({ok, undefined}, erpy_node_pool:request_worker(W, erpy_request:exec(<<"x = 41\ndef f(a): return a + x">>), 5000)),
        ?assertEqual({ok, 42}, erpy_node_pool:request_worker(W, erpy_request:eval(<<"f(1)">>, #{}), 5000)),
        ?assertEqual({ok, 43}, erpy_node_pool:request_worker(W, erpy_request:run(<<"result = f(arguments)">>, 2), 5000)),
        ?assertEqual({ok, 41}, erpy_node_pool:request_worker(W, erpy_request:eval(<<"x">>, #{}), 5000)),
        ?assertEqual({ok, 3}, erpy_node_pool:request_worker(W, erpy_request:call(<<"operator">>, <<"add">>, [1, 2], #{}), 5000)),
        %% Another holder does not see it, nor does a plain request.
        ?assertMatch({error, #{type := <<"NameError">>}}, erpy_node_pool:request_worker(W2, erpy_request:eval(<<"x">>, #{}), 5000)),
        ?assertMatch({error, #{type := <<"NameError">>}}, erpy_node_pool:request(np_co, erpy_request:eval(<<"f(1)">>, #{}), 5000)),
        %% A held worker's timeout interrupts its call and keeps its namespace.
        ?assertEqual({error, timeout}, erpy_node_pool:request_worker(W, erpy_request:exec(<<"while True: pass">>), 100)),
        ?assertEqual({ok, 41}, erpy_node_pool:request_worker(W, erpy_request:eval(<<"x">>, #{}), 5000)),
        %% Checkin clears it.
        ok = erpy_node_pool:checkin(W),
        ?assertEqual({error, {worker_exit, session_closed}}, erpy_node_pool:request_worker(W, erpy_request:eval(<<"x">>, #{}), 5000)),
        ok = erpy_node_pool:checkin(W2),
        %% A holder that dies without checkin: its namespace goes too.
        Self = self(),
        Holder = spawn(fun() ->
                               {ok, W3} = erpy_node_pool:checkout(np_co, 5000),
                               {ok, _} = erpy_node_pool:request_worker(W3, erpy_request:exec(<<"y = 1">>), 5000),
                               Self ! {held, W3},
                               receive never -> ok end
                       end),
        W3 = receive {held, Held} -> Held after 5000 -> ct:fail(no_holder) end,
        ?assertEqual({ok, 1}, erpy_node_pool:request_worker(W3, erpy_request:eval(<<"y">>, #{}), 5000)),
        exit(Holder, kill),
        ok = wait_until(fun() ->
                                erpy_node_pool:request_worker(W3, erpy_request:eval(<<"y">>, #{}), 5000)
                                    =:= {error, {worker_exit, session_closed}}
                        end, 40),
        %% The Python node watches the holder itself (for a pool that died with it).
        Holder2 = spawn(fun() -> receive never -> ok end end),
        Sid = erpc:call(Node, 'erpy.service', session_open, [Holder2]),
        undefined = erpc:call(Node, 'erpy.service', request, [#{v => 1, kind => exec, code => <<"z = 1">>, session => Sid}]),
        exit(Holder2, kill),
        ok = wait_until(fun() ->
                                try erpc:call(Node, 'erpy.service', request, [#{v => 1, kind => eval, code => <<"z">>, session => Sid}]) of
                                    _ -> false
                                catch error:{exception, #{type := <<"SessionClosed">>}, _} -> true
                                end
                        end, 40),
        ?assertEqual({error, {no_pool, nope}}, erpy_node_pool:checkout(nope, 100))
    after
        erpy_node_pool:stop(np_co)
    end.

%% ---- limits and policy (issue 10) -----------------------------------------------------------

%% A Python node refuses a message over its --max-message-size (OTP sends it in fragments):
%% an rpc gets {message_too_large, Size, Max} at once, a plain message is dropped, the
%% connection and the node stay up, and a message under the limit goes through.
inbound_message_limit(_Config) ->
    {Py, Holder} = start_python(py_limit, #{args => ["--max-message-size", "1000000"]}),
    try
        Big = binary:copy(<<"x">>, 2000000),
        try erpc:call(Py, node_handlers, echo, [Big], 10000) of
            R -> ct:fail({not_refused, byte_size(R)})
        catch
            error:{exception, {message_too_large, Size, 1000000}, []} -> ?assert(Size > 1000000)
        end,
        %% A monitored spawn of it ends at once with the reason too.
        {Pid, Ref} = spawn_monitor(Py, node_handlers, echo, [Big]),
        receive {'DOWN', Ref, process, Pid, Why} ->
                ?assertMatch({message_too_large, _, 1000000}, Why)
        after 10000 -> ct:fail(no_down)
        end,
        %% A plain message over the limit is dropped; the ones around it arrive.
        {collector, Py} ! before,
        {collector, Py} ! {big, Big},
        {collector, Py} ! 'after',
        ?assertEqual([before, 'after'], gen_server:call({collector, Py}, get, 10000)),
        %% Same connection, still up: under the limit goes through.
        ?assert(lists:member(Py, nodes(hidden))),
        Ok = binary:copy(<<"y">>, 500000),
        ?assertEqual(Ok, erpc:call(Py, node_handlers, echo, [Ok], 10000)),
        #{refused := 3} = erpc:call(Py, node_handlers, stats, [])
    after
        stop_python({Py, Holder})
    end.

%% Results (and Python errors) of a node pool come back as ETF in a binary, decoded here
%% under the pool's policy: an atom this VM does not know is refused, not made; a result
%% or an error map over max_message_size is refused by the Python node.
pool_results_make_no_atoms(_Config) ->
    {ok, _} = erpy_node_pool:start_link(np_atoms, #{start => 1, max_message_size => 100000}),
    try
        Name = <<"erpy_never_made_", (integer_to_binary(erlang:unique_integer([positive])))/binary>>,
        Expr = <<"[1, (__import__('erpy').Atom('", Name/binary, "'), 2)]">>,
        ?assertEqual({error, {unknown_atom, Name}}, erpy_node_pool:request(np_atoms, erpy_request:eval(Expr, #{}), 5000)),
        ?assertError(badarg, binary_to_existing_atom(Name, utf8)),
        ?assertEqual({error, {unknown_atom, Name}},
                     erpy_node_pool:request(np_atoms, erpy_request:run(<<"result = {__import__('erpy').Atom('", Name/binary, "'): 1}">>, undefined), 5000)),
        ?assertError(badarg, binary_to_existing_atom(Name, utf8)),
        %% Known atoms, and every other kind of term, come back as before.
        ?assertEqual({ok, {ok, [1, 2.5, <<"s">>]}},
                     erpy_node_pool:request(np_atoms, erpy_request:eval(<<"(__import__('erpy').Atom('ok'), [1, 2.5, 's'])">>, #{}), 5000)),
        %% Errors are decoded the same way.
        ?assertMatch({error, #{type := <<"ValueError">>, message := <<"bad">>, traceback := [_ | _]}},
                     erpy_node_pool:request(np_atoms, erpy_request:exec(<<"raise ValueError('bad')">>), 5000)),
        ?assertMatch({error, {message_too_large, _, 100000}},
                     erpy_node_pool:request(np_atoms, erpy_request:eval(<<"'z' * 200000">>, #{}), 5000)),
        ?assertMatch({error, {message_too_large, _, 100000}},
                     erpy_node_pool:request(np_atoms, erpy_request:exec(<<"raise ValueError('z' * 200000)">>), 5000)),
        %% A stock erpc caller of erpy.service still gets plain terms.
        [Node] = erpy_node_pool:nodes(np_atoms),
        ?assertEqual(3, erpc:call(Node, 'erpy.service', eval, [<<"1 + 2">>, #{}]))
    after
        erpy_node_pool:stop(np_atoms)
    end.

%% erlang.call/apply/send/self in code a node pool runs reach the caller's process and
%% obey the pool's policy: the allow-list, send_allowed, and nested requests.
pool_callbacks(Config) ->
    {ok, _} = erpy_node_pool:start_link(np_cb, #{start => 1,
                                                 allowed => [{lists, sort}, {erlang, node},
                                                             {erpy, eval}],
                                                 send_allowed => [erpy_cb_listed]}),
    try
        Run = fun(Code) -> erpy_node_pool:request(np_cb, erpy_request:run(Code, undefined), 5000) end,
        ?assertEqual({ok, [1, 2, 3]}, Run(<<"result = erlang.call('lists', 'sort', [3, 1, 2])">>)),
        ?assertEqual({ok, node()}, Run(<<"result = erlang.apply('erlang', 'node', [])">>)),
        ?assertEqual({ok, self()}, Run(<<"result = erlang.self()">>)),
        %% Refused by the allow-list: ErlangError(Reason) in Python.
        ?assertEqual({ok, {not_allowed, {os, cmd, 1}}},
                     Run(<<"try:\n    erlang.call('os', 'cmd', 'id')\nexcept erlang.ErlangError as e:\n"
                           "    result = e.args[0]">>)),
        ?assertMatch({error, #{type := <<"ErlangError">>}}, Run(<<"erlang.call('os', 'cmd', 'id')">>)),
        %% A name that is no atom here is refused without making one.
        Unknown = <<"erpy_cb_unknown_", (integer_to_binary(erlang:unique_integer([positive])))/binary>>,
        ?assertMatch({ok, {not_allowed, _}},
                     Run(<<"try:\n    erlang.call('", Unknown/binary, "', 'f', 1)\nexcept erlang.ErlangError as e:\n"
                           "    result = e.args[0]">>)),
        ?assertError(badarg, binary_to_existing_atom(Unknown, utf8)),
        %% send: to the caller, and to a listed name; an unlisted one is refused.
        ?assertEqual({ok, undefined}, Run(<<"erlang.send(erlang.self(), (__import__('erpy').Atom('hello'), 1))">>)),
        receive {hello, 1} -> ok after 5000 -> ct:fail(no_send_to_caller) end,
        true = register(erpy_cb_listed, self()),
        ?assertEqual({ok, undefined}, Run(<<"erlang.send('erpy_cb_listed', 2)">>)),
        receive 2 -> ok after 5000 -> ct:fail(no_send_to_listed) end,
        unregister(erpy_cb_listed),
        Target = spawn(fun() -> receive _ -> exit(got_it) after 5000 -> ok end end),
        true = register(erpy_cb_unlisted, Target),
        ?assertEqual({ok, {not_allowed, {send, erpy_cb_unlisted}}},
                     Run(<<"try:\n    erlang.send('erpy_cb_unlisted', 3)\nexcept erlang.ErlangError as e:\n"
                           "    result = e.args[0]">>)),
        ?assert(is_process_alive(Target)),
        exit(Target, kill),
        %% The attack of issue 10: a $gen_call to rex would run os:cmd as the VM's user
        %% (and create a file of this run's own).
        Pwned = unicode:characters_to_binary(filename:join(?config(priv_dir, Config), "erpy_node_pwned")),
        ?assertMatch({error, #{type := <<"ErlangError">>}},
                     Run(<<"import erpy
"
                           "erlang.send(erpy.Atom('rex'), (erpy.Atom('$gen_call'), (erlang.self(), erpy.Ref('nonode@nohost', 0, (1, 2, 3))),"
                           " (erpy.Atom('call'), erpy.Atom('os'), erpy.Atom('cmd'), ['touch ", Pwned/binary, "'], erpy.Atom('user'))))">>)),
        ?assertNot(filelib:is_regular(Pwned)),
        %% A pid Erlang did not hand to this request (rebuilt from bytes) reaches nothing.
        Victim = spawn(fun() -> receive M -> exit({reached, M}) after 10000 -> ok end end),
        ?assertMatch({ok, {not_allowed, {pid, Victim}}},
                     erpy_node_pool:request(np_cb, erpy_request:run(<<"import erpy
try:
    erlang.send(erpy.decode(arguments), 'x')
"
                                                          "except erlang.ErlangError as e:
    result = e.args[0]">>, term_to_binary(Victim)), 5000)),
        ?assert(is_process_alive(Victim)),
        exit(Victim, kill),
        %% Many callbacks in one request, and a nested request to the same node from one.
        ?assertEqual({ok, 100}, Run(<<"result = sum(len(erlang.call('lists', 'sort', [2, 1])) // 2 for _ in range(100))">>)),
        ?assertEqual({ok, {ok, 2}},
                     Run(<<"from erpy import Atom\n"
                           "result = erlang.apply('erpy', 'eval', ['1 + 1', {}, {Atom('pool'): Atom('np_cb')}])">>)),
        %% Held workers too.
        {ok, W} = erpy_node_pool:checkout(np_cb, 5000),
        ?assertEqual({ok, [a, b]}, erpy_node_pool:request_worker(W, erpy_request:eval(<<"erlang.call('lists', 'sort', [__import__('erpy').Atom('b'), __import__('erpy').Atom('a')])">>, #{}), 5000)),
        ok = erpy_node_pool:checkin(W),
        %% No callback message is left behind.
        {messages, []} = process_info(self(), messages)
    after
        erpy_node_pool:stop(np_cb)
    end.

%% A Python call waiting for a callback's answer is interrupted when its caller gives up:
%% a stock erpc caller that never answers (its timeout), and a pool request whose
%% callback outlives the request's timeout. The waiting call monitors its caller from a
%% mailbox of its own; the monitor goes when the call has ended.
pool_callback_wait_interrupted(_Config) ->
    {ok, _} = erpy_node_pool:start_link(np_cbi, #{start => 1, allowed => [{timer, sleep}]}),
    try
        [Node] = erpy_node_pool:nodes(np_cbi),
        Watchers = fun(Pid) ->
                           {monitored_by, By} = process_info(Pid, monitored_by),
                           [W || W <- By, is_pid(W), node(W) =:= Node]
                   end,
        Wait = <<"erlang.call('timer', 'sleep', 1000)">>,
        Silent = spawn(fun() -> receive never -> ok end end),
        Self = self(),
        spawn_link(fun() -> timer:sleep(150), Self ! {watched, Watchers(Silent)} end),
        ?assertError({erpc, timeout},
                     erpc:call(Node, 'erpy.service', request, [#{v => 1, kind => exec, code => Wait, caller => Silent, reply_to => make_ref()}], 300)),
        receive {watched, W1} -> ?assertMatch([_], W1) after 5000 -> ct:fail(no_watch) end,
        ok = wait_until(fun() -> Watchers(Silent) =:= [] end, 100),
        exit(Silent, kill),
        %% The pool caller runs the callback (1 s) past the request's timeout (200 ms).
        ?assertEqual({error, timeout}, erpy_node_pool:request(np_cbi, erpy_request:exec(Wait), 200)),
        ok = wait_until(fun() -> Watchers(self()) =:= [] end, 100),
        ?assertEqual({ok, 3}, erpy_node_pool:request(np_cbi, erpy_request:call(<<"operator">>, <<"add">>, [1, 2], #{}), 5000))
    after
        erpy_node_pool:stop(np_cbi)
    end.

%% A request whose callback stays unanswered (its caller holds it back) leaves the
%% connection to the Python node fully usable: requests with callbacks of their own are
%% answered meanwhile, each with its own reply, and the waiting one completes once its
%% callback is answered. (The Python node goes on reading the connection from the waiting
%% call's own thread.)
pool_callback_while_another_waits(_Config) ->
    {ok, _} = erpy_node_pool:start_link(np_cbw, #{start => 1, allowed => [{?MODULE, cb_gate}, {erlang, abs}]}),
    try
        true = register(erpy_cb_gate_test, self()),
        Self = self(),
        spawn_link(fun() ->
                           R = erpy_node_pool:request(
                                 np_cbw, erpy_request:run(<<"result = erlang.call('erpy_node_SUITE', 'cb_gate', 7)">>, undefined),
                                 30000),
                           Self ! {waiter, R}
                   end),
        Gate = receive {in_gate, G} -> G after 10000 -> ct:fail(no_callback) end,
        Abs = fun(K) ->
                      erpy_node_pool:request(np_cbw, erpy_request:run(<<"result = erlang.call('erlang', 'abs', arguments)">>, -K),
                                             10000)
              end,
        [?assertEqual({ok, K}, Abs(K)) || K <- lists:seq(1, 20)],
        ?assertEqual({ok, 3}, erpy_node_pool:request(np_cbw, erpy_request:call(<<"operator">>, <<"add">>, [1, 2], #{}), 10000)),
        %% Still waiting: its answer is held back.
        receive {waiter, Early} -> ct:fail({answered_early, Early}) after 0 -> ok end,
        Gate ! {open, 35},
        ?assertEqual({ok, 42}, receive {waiter, R} -> R after 10000 -> ct:fail(waiter_stuck) end),
        {messages, []} = process_info(self(), messages)
    after
        catch unregister(erpy_cb_gate_test),
        erpy_node_pool:stop(np_cbw)
    end.

%% Run by Python as a callback in the caller's process: says so, then waits for its answer.
-spec cb_gate(integer()) -> integer() | timeout.
cb_gate(N) ->
    erpy_cb_gate_test ! {in_gate, self()},
    receive {open, V} -> N + V after 20000 -> timeout end.

%% Many callers at once, each request making several callbacks: every callback gets its
%% own reply (none crosses to another request), on one Python node and one connection.
pool_concurrent_callbacks(_Config) ->
    {ok, _} = erpy_node_pool:start_link(np_cbc, #{start => 1, allowed => [{erlang, abs}, {lists, reverse}]}),
    try
        Code = <<"result = [erlang.call('erlang', 'abs', -(arguments * 10 + i)) for i in range(5)]\n"
                 "result.append(erlang.apply('lists', 'reverse', [[arguments, 0]]))">>,
        Self = self(),
        Callers = [spawn_link(fun() ->
                                      Rs = [{K, erpy_node_pool:request(np_cbc, erpy_request:run(Code, K), 20000)}
                                            || J <- lists:seq(1, 15), K <- [C * 1000 + J]],
                                      Self ! {done, self(), Rs}
                              end) || C <- lists:seq(1, 24)],
        Results = lists:append([receive {done, P, Rs} -> Rs after 60000 -> ct:fail(caller_stuck) end
                                || P <- Callers]),
        ?assertEqual(24 * 15, length(Results)),
        [?assertEqual({ok, [K * 10, K * 10 + 1, K * 10 + 2, K * 10 + 3, K * 10 + 4, [0, K]]}, R)
         || {K, R} <- Results],
        {messages, []} = process_info(self(), messages)
    after
        erpy_node_pool:stop(np_cbc)
    end.

%% A callback that calls erpy again (a request to the same node, whose code calls back
%% in turn), three levels deep, from more concurrent callers than the node has worker
%% threads: calls waiting for their callbacks hold no worker the nested requests need.
pool_nested_callbacks(_Config) ->
    {ok, _} = erpy_node_pool:start_link(np_cbn, #{start => 1, allowed => [{erlang, abs},
                                                                          {erpy, run}]}),
    try
        %% Level 3: abs(-K) + 1; level 2: twice that; level 1: one more.
        Code = <<"from erpy import Atom\n"
                 "def request(code):\n"
                 "    st, m = erlang.apply('erpy', 'run', [{Atom('code'): code, Atom('arguments'): arguments,\n"
                 "                                         Atom('pool'): Atom('np_cbn')}, 20000])\n"
                 "    return st, m['result']\n"
                 "inner = \"result = erlang.call('erlang', 'abs', -arguments) + 1\"\n"
                 "middle = ('from erpy import Atom\\n' + \\\n"
                 "    'st, m = erlang.apply(\"erpy\", \"run\", [{Atom(\"code\"): %r, Atom(\"arguments\"): arguments, ' + \\\n"
                 "    'Atom(\"pool\"): Atom(\"np_cbn\")}, 20000])\\nresult = m[\"result\"] * 2') % inner\n"
                 "st, v = request(middle)\n"
                 "result = (st, v + 1)\n">>,
        ?assertEqual({ok, {ok, 9}}, erpy_node_pool:request(np_cbn, erpy_request:run(Code, 3), 20000)),
        Self = self(),
        Callers = [spawn_link(fun() ->
                                      Self ! {done, self(), K, erpy_node_pool:request(np_cbn, erpy_request:run(Code, K), 30000)}
                              end) || K <- lists:seq(1, 16)],
        [receive
             {done, P, K, R} -> ?assertEqual({ok, {ok, (K + 1) * 2 + 1}}, R)
         after 60000 -> ct:fail(nested_callbacks_stuck)
         end || P <- Callers],
        {messages, []} = process_info(self(), messages)
    after
        erpy_node_pool:stop(np_cbn)
    end.

%% Callbacks a call makes after its caller gave up (the request timed out; the code
%% swallows the interrupts) go nowhere: nothing reaches the caller nor the process they
%% name, the call's waits end at once, and the node serves the next requests (with
%% callbacks) as before.
pool_callbacks_after_timeout_dropped(_Config) ->
    {ok, _} = erpy_node_pool:start_link(np_cbt, #{start => 1, allowed => [{erlang, abs}]}),
    try
        true = register(erpy_cb_late, self()),
        %% The caller's interrupts (re-sent until the call ends) are swallowed: they land
        %% in a try (async exceptions are raised at calls and backward jumps).
        Code = <<"import time, sys\n"
                 "from erpy import Atom\n"
                 "sys.erpy_late, sys.erpy_done = 0, False\n"
                 "end = time.monotonic() + 1.0\n"
                 "while not sys.erpy_done:\n"
                 "    try:\n"
                 "        if time.monotonic() < end:\n"
                 "            time.sleep(0.01)\n"
                 "            continue\n"
                 "        for i in range(20):\n"
                 "            try:\n"
                 "                erlang.send(erlang.self(), (Atom('late'), i))\n"
                 "                erlang.send(Atom('erpy_cb_late'), (Atom('late'), i))\n"
                 "                erlang.call('erlang', 'abs', -i)\n"
                 "            except BaseException:\n"
                 "                sys.erpy_late += 1\n"
                 "        sys.erpy_done = True\n"
                 "    except BaseException:\n"
                 "        pass\n">>,
        ?assertEqual({error, timeout}, erpy_node_pool:request(np_cbt, erpy_request:exec(Code), 200)),
        %% The call ends: each callback's wait ended at once (interrupted), none answered.
        Late = fun() ->
                       {ok, R} = erpy_node_pool:request(
                                   np_cbt, erpy_request:eval(<<"(getattr(__import__('sys'), 'erpy_done', False), "
                                                    "getattr(__import__('sys'), 'erpy_late', 0))">>, #{}), 5000),
                       R
               end,
        ok = wait_until(fun() -> element(1, Late()) end, 200),
        ?assert(element(2, Late()) >= 1),
        receive Stray -> ct:fail({late_message, Stray}) after 300 -> ok end,
        ?assertEqual({ok, 5}, erpy_node_pool:request(np_cbt, erpy_request:eval(<<"erlang.call('erlang', 'abs', -5)">>, #{}), 5000)),
        {messages, []} = process_info(self(), messages)
    after
        catch unregister(erpy_cb_late),
        erpy_node_pool:stop(np_cbt)
    end.

%% While its only node restarts, a request waits for it (within its timeout) instead of
%% failing at once; one whose timeout ends first gets {error, timeout}. A pool without any
%% node says so at once.
pool_request_waits_for_a_node(_Config) ->
    {ok, _} = erpy_node_pool:start_link(np_wait, #{start => 1}),
    try
        [Node] = erpy_node_pool:nodes(np_wait),
        Crash = erpy_request:exec(<<"import os\nos._exit(7)">>),
        ?assertEqual({error, {node_down, Node}}, erpy_node_pool:request(np_wait, Crash, 5000)),
        ok = wait_until(fun() -> erpy_node_pool:nodes(np_wait) =:= [] end, 100),
        ?assertEqual({error, timeout}, erpy_node_pool:request(np_wait, erpy_request:eval(<<"1">>, #{}), 50)),
        ?assertEqual({ok, 3}, erpy_node_pool:request(np_wait, erpy_request:call(<<"operator">>, <<"add">>, [1, 2], #{}), 20000)),
        ?assertEqual([Node], erpy_node_pool:nodes(np_wait)),
        %% checkout waits the same way.
        ?assertEqual({error, {node_down, Node}}, erpy_node_pool:request(np_wait, Crash, 5000)),
        {ok, W} = erpy_node_pool:checkout(np_wait, 20000),
        ?assertEqual({ok, undefined}, erpy_node_pool:request_worker(W, erpy_request:exec(<<"x = 5">>), 5000)),
        ?assertEqual({ok, 5}, erpy_node_pool:request_worker(W, erpy_request:eval(<<"x">>, #{}), 5000)),
        ok = erpy_node_pool:checkin(W),
        %% Nothing is left in the caller's mailbox by the waits.
        {messages, []} = process_info(self(), messages)
    after
        erpy_node_pool:stop(np_wait)
    end,
    {ok, _} = erpy_node_pool:start_link(np_none, #{nodes => [], start => 0}),
    try
        ?assertEqual({error, {no_nodes, np_none}}, erpy_node_pool:request(np_none, erpy_request:eval(<<"1">>, #{}), 5000))
    after
        erpy_node_pool:stop(np_none)
    end.

%% ---- memory --------------------------------------------------------------------------------

%% A Python node's RSS stays flat over 100k rpc calls (after a warm-up).
memory_flat_over_100k_calls(Config) ->
    {P, _} = ?config(py2, Config),
    Run = fun(N) ->
                  Self = self(),
                  Ps = [spawn_link(fun() ->
                                           [3 = erpc:call(P, operator, add, [1, 2]) || _ <- lists:seq(1, N div 4)],
                                           Self ! done
                                   end) || _ <- lists:seq(1, 4)],
                  [receive done -> ok end || _ <- Ps]
          end,
    Run(20000),
    Before = rpc:call(P, node_handlers, rss_kb, []),
    Run(100000),
    After = rpc:call(P, node_handlers, rss_kb, []),
    ct:pal("Python node RSS: ~p KiB before, ~p KiB after 100k calls", [Before, After]),
    ?assert(After - Before < max(1024, Before div 20)).

%% ---- crash injection ----------------------------------------------------------------------

%% The crash-injection soak (test/erpy_soak.erl) on a pool of two Python nodes: 8 callers
%% mix values, Python exceptions, timeouts and crashes (os._exit in the node) for
%% ERPY_SOAK_SECONDS (default 15). No answer is wrong, lost or stray (a call in flight on a
%% node another call crashed gets {node_down, Node}: collateral), and the pool restarts
%% its nodes and serves with both again.
crash_injection_soak(_Config) ->
    Seconds = list_to_integer(os:getenv("ERPY_SOAK_SECONDS", "15")),
    ct:timetrap({seconds, Seconds + 90}),
    {ok, _} = application:ensure_all_started(erpy),
    try
        {ok, _} = erpy:start_pool(np_soak, #{mode => node, start => 2, allowed => [],
                                             kill_grace_ms => 300}),
        ok = all_up(np_soak, 2),
        R = erpy_soak:run(np_soak, node, 8, Seconds),
        ct:pal("soak node: ~p", [R]),
        ?assertMatch(#{wrong := 0, lost := 0, stray := 0, full_size := true, size := 2}, R),
        #{calls := Calls, ok := Ok, exceptions := Ex, timeouts := To, crashes := Cr,
          collateral := Co} = R,
        ?assert(Ok > 0 andalso Ex > 0 andalso To > 0 andalso Cr > 0),
        ?assertEqual(Calls, Ok + Ex + To + Cr + Co)
    after
        catch erpy:stop_pool(np_soak),
        application:stop(erpy)
    end.

%% ---- helpers -------------------------------------------------------------------------------

erpc_pool_call(Pool) ->
    erpy_node_pool:request(Pool, erpy_request:call(<<"operator">>, <<"add">>, [1, 1], #{}), 5000).

restart_counter(P) ->
    ok = rpc:call(P, node_handlers, respawn_counter, []).

root() ->
    case os:getenv("ERPY_ROOT") of
        %% Run without the Makefile (plain `rebar3 ct`): the checkout this suite came from.
        false -> filename:dirname(filename:dirname(proplists:get_value(source, module_info(compile))));
        R -> R
    end.

test_py_dir() -> filename:join(root(), "test/py").

python() ->
    case os:getenv("ERPY_PYTHON") of
        false -> "/usr/bin/python3";
        P -> P
    end.

%% The port (and so the Python node, started with --exit-on-eof) belongs to a process of
%% its own: init_per_suite's process ends before the cases run.
open_python(Args, Env) ->
    Path = filename:join(root(), "python") ++ ":" ++ test_py_dir(),
    Self = self(),
    Holder = spawn(fun() ->
                           Port = open_port({spawn_executable, python()},
                                            [{args, Args}, {env, [{"PYTHONPATH", Path} | Env]},
                                             exit_status, use_stdio, stderr_to_stdout, {line, 4096}]),
                           Self ! {self(), started},
                           hold(Port)
                   end),
    receive {Holder, started} -> Holder end.

hold(Port) ->
    receive
        stop -> catch port_close(Port);
        {Port, {data, {_, Line}}} -> ct:log("python: ~ts", [Line]), hold(Port);
        {Port, {exit_status, S}} -> ct:log("python exited: ~p", [S])
    end.

start_python(Name) ->
    start_python(Name, #{}).

start_python(Name, Opts) ->
    Node = list_to_atom(atom_to_list(Name) ++ "@127.0.0.1"),
    Cookie = maps:get(cookie, Opts, atom_to_list(erlang:get_cookie())),
    Port = open_python(["-m", "erpy.node", "--name", atom_to_list(Node),
                        "--allow", "operator,os.path,builtins,node_handlers",
                        "--load", "node_handlers", "--exit-on-eof" | maps:get(args, Opts, [])],
                       [{"ERPY_COOKIE", Cookie}]),
    case maps:get(cookie, Opts, undefined) of
        undefined -> ok = wait_pong(Node, 200);
        _ -> ok = wait_registered(Name, 200)
    end,
    {Node, Port}.

stop_python({Node, Holder}) ->
    Holder ! stop,
    wait_until(fun() -> not lists:member(Node, nodes(hidden)) end, 100).

wait_pong(_Node, 0) -> timeout;
wait_pong(Node, N) ->
    case net_adm:ping(Node) of
        pong -> ok;
        pang -> timer:sleep(50), wait_pong(Node, N - 1)
    end.

wait_registered(Name, N) ->
    wait_until(fun() ->
                       {ok, Names} = erl_epmd:names("127.0.0.1"),
                       lists:keymember(atom_to_list(Name), 1, Names)
               end, N).

%% A pool's nodes after the first join once they listen.
all_up(Pool, N) ->
    wait_until(fun() -> length(erpy_node_pool:nodes(Pool)) =:= N end, 200).

wait_until(_F, 0) -> timeout;
wait_until(F, N) ->
    case F() of
        true -> ok;
        _ -> timer:sleep(50), wait_until(F, N - 1)
    end.

start_peer(Name) ->
    {ok, Peer, Node} = peer:start_link(#{name => Name, host => "127.0.0.1", longnames => true,
                                         args => ["-setcookie", atom_to_list(erlang:get_cookie())]}),
    {ok, Peer, Node}.
