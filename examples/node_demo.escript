#!/usr/bin/env escript
%%! -noshell +pc unicode
%% `make demo`, part four: node mode. This VM becomes a distributed node, an erpy pool
%% starts a Python node on this host (`start => 1`), and stock OTP calls reach Python over
%% Erlang distribution: rpc:call, erpc:call, and erpy's own API through the pool.
-mode(compile).

main(_) ->
    Root = os:getenv("ERPY_ROOT", filename:dirname(filename:dirname(
                                     filename:absname(escript:script_name())))),
    true = code:add_patha(filename:join([Root, "_build", "default", "lib", "erpy", "ebin"])),
    logger:set_primary_config(level, warning),
    _ = os:cmd("epmd -daemon"),
    {ok, _} = net_kernel:start(['erpy_demo@127.0.0.1', longnames]),
    {ok, _} = application:ensure_all_started(erpy),
    T0 = erlang:monotonic_time(millisecond),
    {ok, _} = erpy:start_pool(py, #{mode => node, start => 1}),
    {ok, 3} = erpy:call(operator, add, [1, 2], #{pool => py, timeout => 30000}),
    [PyNode] = erpy_node_pool:nodes(py),
    io:format("a Python node started and answered in ~b ms: ~p~n~n",
              [erlang:monotonic_time(millisecond) - T0, PyNode]),
    show("net_adm:ping(PyNode)", net_adm:ping(PyNode)),
    show("rpc:call(PyNode, operator, add, [1, 2])", rpc:call(PyNode, operator, add, [1, 2])),
    show("erpc:call(PyNode, 'os.path', join, [<<\"a\">>, <<\"b\">>])",
         erpc:call(PyNode, 'os.path', join, [<<"a">>, <<"b">>])),
    show("erpc:call(PyNode, math, sqrt, [-1])  (a Python exception, raised in Erlang)",
         try erpc:call(PyNode, math, sqrt, [-1])
         catch error:{exception, #{type := Type, message := Message}, _} -> {exception, Type, Message}
         end),
    show("erpy:eval(<<\"sum(x) / len(x)\">>, #{x => [1, 2, 3, 4]}, #{pool => py})",
         erpy:eval(<<"sum(x) / len(x)">>, #{x => [1, 2, 3, 4]}, #{pool => py})),
    show("erpy:run(#{code => <<\"while True: pass\">>, pool => py}, 200)",
         erpy:run(#{code => <<"while True: pass">>, pool => py}, 200)),
    application:stop(erpy),
    ok.

show(Text, Result) ->
    io:format("~s~n   -> ~0tp~n", [Text, Result]).
