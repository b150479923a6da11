%% The reactor (issue 13): fds handed to Python protocols, in embedded mode (enif_select,
%% a process per connection) and port mode (SCM_RIGHTS to the worker's loop), against
%% real sockets: TCP (gen_tcp and socket), UDP, Unix sockets, pipes; peers that reset or
%% half-close, protocols that raise, return nonsense, hang or crash their worker; the
%% pool's policy; and no fd leaked, after 10,000 connections too.
-module(erpy_reactor_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([tcp_echo/1, socket_module_and_unix/1, udp/1, pipe/1, speaks_first/1,
         peer_reset/1, half_close/1, protocol_raises/1, bad_action/1, never_returns/1,
         idle_past_timeout/1, close_while_running/1, callback_then_close/1,
         many_events_in_order/1,
         policy_applies/1, no_factory/1, bad_fd/1, ten_thousand_no_leak/1,
         port_echo/1, port_crash_loses_only_its_connections/1, port_no_leak/1,
         port_callbacks/1, port_callback_channel_lost/1, port_worker_killed_in_callback/1,
         pool_option_checked/1, batch_hang_spares_others/1, batch_callbacks_routed/1,
         pool_restart_new_hub/1]).

-define(E, remb).
-define(P, rport).

all() ->
    [tcp_echo, socket_module_and_unix, udp, pipe, speaks_first, peer_reset, half_close,
     protocol_raises, bad_action, never_returns, idle_past_timeout, close_while_running,
     callback_then_close, many_events_in_order, policy_applies, no_factory, bad_fd,
     ten_thousand_no_leak, port_echo, port_crash_loses_only_its_connections, port_no_leak,
     port_callbacks, port_callback_channel_lost, port_worker_killed_in_callback,
     pool_option_checked, batch_hang_spares_others, batch_callbacks_routed,
     pool_restart_new_hub].

suite() ->
    [{timetrap, {seconds, 180}}].

init_per_suite(Config) ->
    ok = erpy_test_env:start_erpy(),
    Dir = filename:join(os:getenv("ERPY_ROOT", filename:dirname(code:priv_dir(erpy))), "test/py"),
    {ok, _} = erpy:start_pool(?E, #{mode => embedded, size => 2, timeout => 1000, allowed => [lists],
                                    reactor => {reactor_protocols, 'Echo'}}),
    %% One interpreter in the VM: the suite's protocols join its path.
    ok = erpy:exec(iolist_to_binary(["import sys; sys.path.insert(0, '", Dir, "')"]), #{pool => ?E}),
    {ok, _} = erpy:start_pool(?P, #{mode => port, size => 2, timeout => 1000, pythonpath => [Dir],
                                    allowed => [lists], send_allowed => [erpy_reactor_suite_sink],
                                    reactor => {reactor_protocols, 'Echo'}}),
    ok = erpy_test_env:wait_serves(?P, 100),
    %% The port pool's callback channels (an fd per worker, kept while it lives) are made
    %% at its first handoff: before the tests count fds.
    ok = port_warm_up(?P),
    %% The socket module keeps fds of its own (pipes) from its first receive with a
    %% timeout on: not ours to count.
    ok = warm_socket_module(sock_path("warm")),
    %% What suites before this one left winding down (a pool's workers being replaced or
    %% closing their ports) settles first: the tests count the VM's fds.
    settle_fds(fd_count(), 50),
    [{pydir, Dir} | Config].

settle_fds(_Count, 0) ->
    ok;
settle_fds(Count, N) ->
    timer:sleep(200),
    case fd_count() of
        Count -> ok;
        Other -> settle_fds(Other, N - 1)
    end.

end_per_suite(_Config) ->
    _ = erpy:stop_pool(?E),
    _ = erpy:stop_pool(?P),
    application:stop(erpy),
    ok.

init_per_testcase(_Case, Config) ->
    [{fds, fd_count()} | Config].

%% Every test ends with the fds it began with (the VM's), once its connections closed.
end_per_testcase(_Case, Config) ->
    ok = wait_until(fun() -> conns(?E) =:= 0 end, 5000),
    Before = ?config(fds, Config),
    case wait_until(fun() -> fd_count() =< Before end, 5000) of
        ok -> ok;
        timeout -> {fail, {fd_leak, Before, fd_count()}}
    end.

%% ---- embedded ---------------------------------------------------------------------------

tcp_echo(_Config) ->
    {L, Port} = listen(),
    {C, S} = connect(L, Port),
    {ok, Conn} = erpy_reactor:handoff_socket(?E, S),
    %% The caller's socket is its own: closing it leaves the connection to Python.
    ok = gen_tcp:close(S),
    ?assert(is_pid(Conn)),
    ok = gen_tcp:send(C, <<"hello">>),
    {ok, <<"hello">>} = gen_tcp:recv(C, 5, 2000),
    Big = binary:copy(<<"0123456789abcdef">>, 65536),  % 1 MiB: partial writes, many reads
    ok = gen_tcp:send(C, Big),
    {ok, Big} = gen_tcp:recv(C, byte_size(Big), 10000),
    ok = gen_tcp:send(C, <<"info">>),
    {ok, {_, Port2}} = inet:sockname(C),
    Expect = iolist_to_binary(io_lib:format("('tcp', '127.0.0.1', ~b)", [Port2])),
    {ok, Expect} = gen_tcp:recv(C, 0, 2000),
    Mon = monitor(process, Conn),
    ok = gen_tcp:close(C),
    receive {'DOWN', Mon, process, Conn, normal} -> ok after 5000 -> error(not_closed) end,
    gen_tcp:close(L).

socket_module_and_unix(_Config) ->
    Path = sock_path("unix"),
    {ok, L} = socket:open(local, stream, default),
    ok = socket:bind(L, #{family => local, path => Path}),
    ok = socket:listen(L),
    {ok, C} = socket:open(local, stream, default),
    ok = socket:connect(C, #{family => local, path => Path}),
    {ok, S} = socket:accept(L),
    {ok, _Conn} = erpy_reactor:handoff_socket(?E, S),
    ok = socket:close(S),
    ok = socket:send(C, <<"info">>),
    {ok, <<"('unix', 'None', None)">>} = socket:recv(C, 0, 2000),
    ok = socket:send(C, <<"over unix">>),
    {ok, <<"over unix">>} = socket:recv(C, 0, 2000),
    socket:close(C),
    socket:close(L),
    ok = file:delete(Path),
    ok = wait_until(fun() -> conns(?E) =:= 0 end, 5000).

udp(_Config) ->
    {ok, A} = gen_udp:open(0, [binary, {active, false}, {ip, {127, 0, 0, 1}}]),
    {ok, B} = gen_udp:open(0, [binary, {active, false}, {ip, {127, 0, 0, 1}}]),
    {ok, PA} = inet:port(A),
    {ok, PB} = inet:port(B),
    ok = gen_udp:connect(A, {127, 0, 0, 1}, PB),
    {ok, Conn} = erpy_reactor:handoff_socket(?E, A, #{factory => {reactor_protocols, 'Sink'}}),
    ok = gen_udp:close(A),
    {ok, Fd} = fd_of(Conn),
    ok = gen_udp:send(B, {127, 0, 0, 1}, PA, <<"one">>),
    ok = gen_udp:send(B, {127, 0, 0, 1}, PA, <<"reply">>),
    {ok, {_, _, <<"pong">>}} = gen_udp:recv(B, 0, 2000),
    {ok, <<"onereply">>} = erpy:call(reactor_protocols, got, [Fd], #{pool => ?E, timeout => 1000}),
    ok = erpy_reactor:close(Conn),
    gen_udp:close(B).

pipe(_Config) ->
    %% An OS pipe of this VM's own, made by the embedded Python.
    {ok, [R, W]} = erpy:eval(<<"list(__import__('os').pipe())">>, #{}, #{pool => ?E}),
    {ok, Conn} = erpy_reactor:handoff(?E, R, #{type => pipe}, #{factory => {reactor_protocols, 'Sink'}}),
    Mon = monitor(process, Conn),
    {ok, _} = erpy:eval(<<"__import__('os').write(w, b'through a pipe')">>, #{w => W}, #{pool => ?E}),
    ok = wait_until(fun() -> erpy:call(reactor_protocols, got, [R], #{pool => ?E}) =:= {ok, <<"through a pipe">>} end, 2000),
    {ok, _} = erpy:eval(<<"__import__('os').close(w)">>, #{w => W}, #{pool => ?E}),
    %% End of file: the connection closes.
    receive {'DOWN', Mon, process, Conn, normal} -> ok after 5000 -> error(not_closed) end.

speaks_first(_Config) ->
    {L, Port} = listen(),
    {C, S} = connect(L, Port),
    {ok, Conn} = erpy_reactor:handoff_socket(?E, S, #{factory => {reactor_protocols, 'Greeter'}}),
    gen_tcp:close(S),
    {ok, <<"hello\n">>} = gen_tcp:recv(C, 0, 2000),
    Mon = monitor(process, Conn),
    ok = gen_tcp:send(C, <<"bye">>),
    receive {'DOWN', Mon, process, Conn, normal} -> ok after 5000 -> error(not_closed) end,
    {error, closed} = gen_tcp:recv(C, 0, 2000),
    gen_tcp:close(L).

peer_reset(_Config) ->
    {L, Port} = listen(),
    {C, S} = connect(L, Port),
    {ok, Conn} = erpy_reactor:handoff_socket(?E, S),
    gen_tcp:close(S),
    Mon = monitor(process, Conn),
    ok = inet:setopts(C, [{linger, {true, 0}}]),
    ok = gen_tcp:close(C),  % RST
    receive
        {'DOWN', Mon, process, Conn, Why} ->
            ?assert(lists:member(Why, [normal, {shutdown, econnreset}]))
    after 5000 -> error(not_closed)
    end,
    gen_tcp:close(L).

half_close(_Config) ->
    {L, Port} = listen(),
    {C, S} = connect(L, Port),
    {ok, Conn} = erpy_reactor:handoff_socket(?E, S),
    gen_tcp:close(S),
    Mon = monitor(process, Conn),
    ok = gen_tcp:send(C, <<"last words">>),
    ok = gen_tcp:shutdown(C, write),
    %% The answer still comes, then the server side closes.
    {ok, <<"last words">>} = gen_tcp:recv(C, 10, 2000),
    {error, closed} = gen_tcp:recv(C, 0, 2000),
    receive {'DOWN', Mon, process, Conn, normal} -> ok after 5000 -> error(not_closed) end,
    gen_tcp:close(L).

protocol_raises(_Config) ->
    {L, Port} = listen(),
    {C1, S1} = connect(L, Port),
    {C2, S2} = connect(L, Port),
    {ok, Conn1} = erpy_reactor:handoff_socket(?E, S1),
    {ok, _Conn2} = erpy_reactor:handoff_socket(?E, S2),
    [gen_tcp:close(S) || S <- [S1, S2]],
    Mon = monitor(process, Conn1),
    ok = gen_tcp:send(C1, <<"raise">>),
    receive
        {'DOWN', Mon, process, Conn1, {shutdown, #{type := <<"ValueError">>, message := <<"asked to raise">>}}} -> ok
    after 5000 -> error(not_closed)
    end,
    {error, closed} = gen_tcp:recv(C1, 0, 2000),
    %% The other connection goes on.
    ok = gen_tcp:send(C2, <<"fine">>),
    {ok, <<"fine">>} = gen_tcp:recv(C2, 0, 2000),
    [gen_tcp:close(S) || S <- [C1, C2, L]].

bad_action(_Config) ->
    {L, Port} = listen(),
    {C, S} = connect(L, Port),
    {ok, Conn} = erpy_reactor:handoff_socket(?E, S),
    gen_tcp:close(S),
    Mon = monitor(process, Conn),
    ok = gen_tcp:send(C, <<"bogus">>),
    receive
        {'DOWN', Mon, process, Conn, {shutdown, #{type := <<"ReactorError">>, message := Msg}}} ->
            {match, _} = re:run(Msg, "'bogus_action'.*expected one of 'continue'")
    after 5000 -> error(not_closed)
    end,
    [gen_tcp:close(X) || X <- [C, L]].

never_returns(_Config) ->
    {L, Port} = listen(),
    {C1, S1} = connect(L, Port),
    {C2, S2} = connect(L, Port),
    {ok, Conn1} = erpy_reactor:handoff_socket(?E, S1, #{timeout => 300}),
    {ok, _} = erpy_reactor:handoff_socket(?E, S2),
    [gen_tcp:close(S) || S <- [S1, S2]],
    Mon = monitor(process, Conn1),
    ok = gen_tcp:send(C1, <<"hang">>),
    receive {'DOWN', Mon, process, Conn1, {shutdown, timeout}} -> ok after 5000 -> error(not_closed) end,
    {error, closed} = gen_tcp:recv(C1, 0, 2000),
    ok = gen_tcp:send(C2, <<"alive">>),
    {ok, <<"alive">>} = gen_tcp:recv(C2, 0, 2000),
    [gen_tcp:close(X) || X <- [C1, C2, L]].

%% The timeout bounds each protocol callback, not the wait for the peer: a connection
%% idle for longer stays open.
idle_past_timeout(_Config) ->
    {L, Port} = listen(),
    {C, S} = connect(L, Port),
    {ok, Conn} = erpy_reactor:handoff_socket(?E, S, #{timeout => 200}),
    gen_tcp:close(S),
    ok = gen_tcp:send(C, <<"one">>),
    {ok, <<"one">>} = gen_tcp:recv(C, 3, 2000),
    timer:sleep(600),
    ?assert(is_process_alive(Conn)),
    ok = gen_tcp:send(C, <<"two">>),
    {ok, <<"two">>} = gen_tcp:recv(C, 3, 2000),
    [gen_tcp:close(X) || X <- [C, L]].

%% erpy_reactor:close/1 while a protocol callback runs: the callback finishes (it is not
%% interrupted, its answer is written), then the connection closes normally.
close_while_running(_Config) ->
    {L, Port} = listen(),
    {C, S} = connect(L, Port),
    {ok, Conn} = erpy_reactor:handoff_socket(?E, S),
    gen_tcp:close(S),
    Mon = monitor(process, Conn),
    ok = gen_tcp:send(C, <<"slow">>),
    timer:sleep(100),  % data_received is sleeping now
    ok = erpy_reactor:close(Conn),
    receive {'DOWN', Mon, process, Conn, Why} -> normal = Why after 5000 -> error(not_closed) end,
    {ok, <<"slow">>} = gen_tcp:recv(C, 4, 2000),
    {error, closed} = gen_tcp:recv(C, 0, 2000),
    [gen_tcp:close(X) || X <- [C, L]].

%% A callback into Erlang, then "close" from the same protocol callback.
callback_then_close(_Config) ->
    {L, Port} = listen(),
    {C, S} = connect(L, Port),
    {ok, Conn} = erpy_reactor:handoff_socket(?E, S),
    gen_tcp:close(S),
    Mon = monitor(process, Conn),
    ok = gen_tcp:send(C, <<"quitcall">>),
    receive {'DOWN', Mon, process, Conn, Why} -> normal = Why after 5000 -> error(not_closed) end,
    {error, closed} = gen_tcp:recv(C, 0, 2000),
    [gen_tcp:close(X) || X <- [C, L]].

%% Many connections, many events each, callbacks among them: every answer comes back,
%% in order, on its own connection.
many_events_in_order(_Config) ->
    {L, Port} = listen(),
    Pairs = [connect(L, Port) || _ <- lists:seq(1, 16)],
    [begin {ok, _} = erpy_reactor:handoff_socket(?E, S), gen_tcp:close(S) end || {_, S} <- Pairs],
    Self = self(),
    Pids = [spawn_link(fun() ->
                               [begin
                                    Msg = iolist_to_binary(io_lib:format("~b-~b;", [I, N])),
                                    ok = gen_tcp:send(C, Msg),
                                    {ok, Msg} = gen_tcp:recv(C, byte_size(Msg), 5000),
                                    case N rem 10 of
                                        0 ->
                                            ok = gen_tcp:send(C, <<"call">>),
                                            {ok, <<"ok:[[1, 2, 3]];os:ErlangError">>} = gen_tcp:recv(C, 0, 5000);
                                        _ -> ok
                                    end
                                end || N <- lists:seq(1, 100)],
                               Self ! {done, self()}
                       end) || {I, {C, _}} <- lists:zip(lists:seq(1, 16), Pairs)],
    [receive {done, P} -> ok after 30000 -> error(timeout) end || P <- Pids],
    [gen_tcp:close(C) || {C, _} <- Pairs],
    gen_tcp:close(L).

policy_applies(_Config) ->
    %% erlang.call from a protocol is checked like any: lists allowed, os refused.
    {L, Port} = listen(),
    {C, S} = connect(L, Port),
    {ok, _} = erpy_reactor:handoff_socket(?E, S),
    gen_tcp:close(S),
    ok = gen_tcp:send(C, <<"call">>),
    {ok, <<"ok:[[1, 2, 3]];os:ErlangError">>} = gen_tcp:recv(C, 0, 2000),
    [gen_tcp:close(X) || X <- [C, L]].

no_factory(_Config) ->
    {ok, _} = erpy:start_pool(rbare, #{mode => embedded, size => 1}),
    {L, Port} = listen(),
    {C, S} = connect(L, Port),
    {error, #{type := <<"ReactorError">>, message := <<"no protocol factory", _/binary>>}} =
        erpy_reactor:handoff_socket(rbare, S),
    {error, {badarg, factory}} = erpy_reactor:handoff_socket(rbare, S, #{factory => 42}),
    %% A factory set from Python, for that pool only.
    ok = erpy:exec(<<"from erpy import reactor\nimport reactor_protocols\n"
                     "reactor.set_protocol_factory(reactor_protocols.Greeter, pool='rbare')">>,
                   #{pool => rbare}),
    {ok, _} = erpy_reactor:handoff_socket(rbare, S),
    {ok, <<"hello\n">>} = gen_tcp:recv(C, 0, 2000),
    [gen_tcp:close(X) || X <- [S, C, L]],
    ok = wait_until(fun() -> conns(rbare) =:= 0 end, 5000),
    ok = erpy:stop_pool(rbare).

bad_fd(_Config) ->
    {error, ebadf} = erpy_reactor:handoff(?E, 100000, #{}),
    {error, {badarg, -1}} = erpy_reactor:handoff(?E, -1, #{}),
    {error, {no_pool, nopool}} = erpy_reactor:handoff(nopool, 100000, #{}).

%% 10,000 connections opened, echoed once and closed, 20 at a time: the VM ends with the
%% fds it began with (end_per_testcase asserts it).
ten_thousand_no_leak(_Config) ->
    {L, Port} = listen(),
    Self = self(),
    Workers = [spawn_link(fun() -> [one_conn(L, Port) || _ <- lists:seq(1, 500)], Self ! {done, self()} end)
               || _ <- lists:seq(1, 20)],
    [receive {done, W} -> ok after 170000 -> error(timeout) end || W <- Workers],
    ok = wait_until(fun() -> conns(?E) =:= 0 end, 10000),
    gen_tcp:close(L).

one_conn(L, Port) ->
    {ok, C} = gen_tcp:connect({127, 0, 0, 1}, Port, [binary, {active, false}]),
    {ok, S} = accept(L, C),
    {ok, _} = erpy_reactor:handoff_socket(?E, S),
    ok = gen_tcp:close(S),
    ok = gen_tcp:send(C, <<"x">>),
    {ok, <<"x">>} = gen_tcp:recv(C, 1, 5000),
    ok = gen_tcp:close(C).

%% ---- port mode -----------------------------------------------------------------------------

port_echo(_Config) ->
    {L, Port} = listen(),
    Pairs = [begin
                 {C, S} = connect(L, Port),
                 {ok, {erpy_reactor_port, ?P, OsPid}} = erpy_reactor:handoff_socket(?P, S),
                 gen_tcp:close(S),
                 {C, OsPid}
             end || _ <- lists:seq(1, 8)],
    [begin
         ok = gen_tcp:send(C, <<"ping">>),
         {ok, <<"ping">>} = gen_tcp:recv(C, 4, 2000)
     end || {C, _} <- Pairs],
    {C1, _} = hd(Pairs),
    ok = gen_tcp:send(C1, <<"info">>),
    {ok, <<"('tcp', '127.0.0.1', ", _/binary>>} = gen_tcp:recv(C1, 0, 2000),
    %% A protocol that hangs is stopped after the pool's timeout: that connection closes.
    ok = gen_tcp:send(C1, <<"hang">>),
    {error, closed} = gen_tcp:recv(C1, 0, 5000),
    [begin
         ok = gen_tcp:send(C, <<"pong">>),
         {ok, <<"pong">>} = gen_tcp:recv(C, 4, 2000)
     end || {C, _} <- tl(Pairs)],
    [gen_tcp:close(C) || {C, _} <- Pairs],
    gen_tcp:close(L).

port_crash_loses_only_its_connections(_Config) ->
    {L, Port} = listen(),
    Pairs = [begin
                 {C, S} = connect(L, Port),
                 {ok, {erpy_reactor_port, ?P, OsPid}} = erpy_reactor:handoff_socket(?P, S),
                 gen_tcp:close(S),
                 {C, OsPid}
             end || _ <- lists:seq(1, 8)],
    {C1, Victim} = hd(Pairs),
    ok = gen_tcp:send(C1, <<"crash">>),
    {error, _} = gen_tcp:recv(C1, 0, 5000),
    %% The worker's connections are gone with it; the others, and the VM, carry on.
    [begin
         Expect = case OsPid of Victim -> lost; _ -> ok end,
         Got = case gen_tcp:send(C, <<"still">>) of
                   ok -> case gen_tcp:recv(C, 5, 2000) of {ok, <<"still">>} -> ok; _ -> lost end;
                   _ -> lost
               end,
         ?assertEqual(Expect, Got)
     end || {C, OsPid} <- tl(Pairs)],
    [gen_tcp:close(C) || {C, _} <- Pairs],
    %% The pool replaces the worker and takes connections again.
    ok = erpy_test_env:wait_serves(?P, 100),
    {C9, S9} = connect(L, Port),
    {ok, {erpy_reactor_port, ?P, _}} = erpy_reactor:handoff_socket(?P, S9),
    gen_tcp:close(S9),
    ok = gen_tcp:send(C9, <<"new">>),
    {ok, <<"new">>} = gen_tcp:recv(C9, 3, 2000),
    [gen_tcp:close(X) || X <- [C9, L]],
    %% The new worker's callback channel (an fd kept in the VM) is made once erpy knows
    %% it: now, not in a later test that counts fds.
    ok = wait_until(fun() ->
                            ok = port_warm_up(?P),
                            {Known, _} = persistent_term:get({erpy_reactor, channels, ?P}, {[], 0}),
                            length(Known) =:= 2
                    end, 10000).

%% The VM keeps no copy of a handed-over fd (end_per_testcase counts).
port_no_leak(_Config) ->
    {L, Port} = listen(),
    [begin
         {C, S} = connect(L, Port),
         {ok, _} = erpy_reactor:handoff_socket(?P, S),
         gen_tcp:close(S),
         ok = gen_tcp:send(C, <<"x">>),
         {ok, <<"x">>} = gen_tcp:recv(C, 1, 2000),
         gen_tcp:close(C)
     end || _ <- lists:seq(1, 200)],
    gen_tcp:close(L).

%% erlang.call/apply/send from a port-mode protocol: run in Erlang under the pool's
%% policy, as in embedded mode (policy_applies).
port_callbacks(_Config) ->
    {L, Port} = listen(),
    true = register(erpy_reactor_suite_sink, self()),
    try
        Conns = [begin
                     {C, S} = connect(L, Port),
                     {ok, {erpy_reactor_port, ?P, _}} = erpy_reactor:handoff_socket(?P, S),
                     gen_tcp:close(S),
                     C
                 end || _ <- lists:seq(1, 4)],  % both workers
        [begin
             ok = gen_tcp:send(C, <<"call">>),
             {ok, <<"ok:[[1, 2, 3]];os:ErlangError">>} = gen_tcp:recv(C, 0, 5000),
             ok = gen_tcp:send(C, <<"send:erpy_reactor_suite_sink">>),
             {ok, <<"sent">>} = gen_tcp:recv(C, 0, 5000),
             receive <<"from the reactor">> -> ok after 5000 -> error(no_message) end,
             %% Not in send_allowed (and an atom that exists): refused.
             ok = gen_tcp:send(C, <<"send:erpy_reactor_SUITE">>),
             {ok, <<"refused:ErlangError">>} = gen_tcp:recv(C, 0, 5000)
         end || C <- Conns],
        %% erpy asks its workers again (as after losing one): each keeps its channel (no
        %% fd more in the VM: end_per_testcase counts) and callbacks go on.
        _ = persistent_term:erase({erpy_reactor, channels, ?P}),
        {C5, S5} = connect(L, Port),
        {ok, _} = erpy_reactor:handoff_socket(?P, S5),
        gen_tcp:close(S5),
        [begin
             ok = gen_tcp:send(C, <<"call">>),
             {ok, <<"ok:[[1, 2, 3]];os:ErlangError">>} = gen_tcp:recv(C, 0, 5000)
         end || C <- [C5 | Conns]],
        gen_tcp:close(C5),
        [gen_tcp:close(X) || X <- [L | Conns]]
    after
        unregister(erpy_reactor_suite_sink)
    end.

%% The callback channel's Erlang end goes away while Python waits for an answer: the
%% protocol gets ErlangPortError, never hangs, and its connection goes on.
port_callback_channel_lost(_Config) ->
    {ok, _} = erpy:start_pool(rpcb, #{mode => port, size => 1, timeout => 10000,
                                      max_message_size => 65536,
                                      pythonpath => [pydir()], allowed => [lists, timer],
                                      reactor => {reactor_protocols, 'Echo'}}),
    try
        ok = erpy_test_env:wait_serves(rpcb, 50),
        {L, Port} = listen(),
        {C, S} = connect(L, Port),
        {ok, _} = erpy_reactor:handoff_socket(rpcb, S),
        gen_tcp:close(S),
        %% Sizes and atoms as for any callback.
        ok = gen_tcp:send(C, <<"limits">>),
        {ok, <<"ErlangError;ErlangError;">>} = gen_tcp:recv(C, 0, 5000),
        ok = gen_tcp:send(C, <<"sleepcall">>),
        Runner = wait_for_callback(),
        exit(Runner, kill),
        {ok, <<"ErlangPortError">>} = gen_tcp:recv(C, 0, 5000),
        ok = gen_tcp:send(C, <<"still here">>),
        {ok, <<"still here">>} = gen_tcp:recv(C, 0, 5000),
        [gen_tcp:close(X) || X <- [C, L]]
    after
        erpy:stop_pool(rpcb)
    end.

%% The worker dies while its protocol waits for a callback: its connection closes, the
%% Erlang side of the callback ends (no hang), and the replaced worker has callbacks.
port_worker_killed_in_callback(_Config) ->
    {ok, _} = erpy:start_pool(rpkill, #{mode => port, size => 1, timeout => 10000,
                                        pythonpath => [pydir()], allowed => [lists, timer],
                                        reactor => {reactor_protocols, 'Echo'}}),
    try
        ok = erpy_test_env:wait_serves(rpkill, 50),
        {L, Port} = listen(),
        {C, S} = connect(L, Port),
        {ok, {erpy_reactor_port, rpkill, OsPid}} = erpy_reactor:handoff_socket(rpkill, S),
        gen_tcp:close(S),
        ok = gen_tcp:send(C, <<"sleepcall">>),
        Runner = wait_for_callback(),
        Mon = monitor(process, Runner),
        _ = os:cmd("kill -9 " ++ integer_to_list(OsPid)),
        {error, _} = gen_tcp:recv(C, 0, 5000),
        receive {'DOWN', Mon, process, Runner, _} -> ok after 10000 -> error(callback_hangs) end,
        gen_tcp:close(C),
        ok = erpy_test_env:wait_serves(rpkill, 100),
        {C2, S2} = connect(L, Port),
        {ok, {erpy_reactor_port, rpkill, OsPid2}} = erpy_reactor:handoff_socket(rpkill, S2),
        ?assertNotEqual(OsPid, OsPid2),
        gen_tcp:close(S2),
        ok = gen_tcp:send(C2, <<"call">>),
        {ok, <<"ok:[[1, 2, 3]];os:ErlangError">>} = gen_tcp:recv(C2, 0, 5000),
        [gen_tcp:close(X) || X <- [C2, L]]
    after
        erpy:stop_pool(rpkill)
    end.

pydir() ->
    filename:join(os:getenv("ERPY_ROOT", filename:dirname(code:priv_dir(erpy))), "test/py").

%% The process running a port protocol's callback (timer:sleep from "sleepcall").
wait_for_callback() ->
    Found = [P || P <- processes(),
                  {current_stacktrace, St} <- [process_info(P, current_stacktrace)],
                  lists:keymember(timer, 1, St), lists:keymember(erpy_reactor, 1, St)],
    case Found of
        [P | _] -> P;
        [] -> timer:sleep(20), wait_for_callback()
    end.

port_warm_up(Pool) ->
    {L, Port} = listen(),
    {C, S} = connect(L, Port),
    {ok, _} = erpy_reactor:handoff_socket(Pool, S),
    gen_tcp:close(S),
    ok = gen_tcp:send(C, <<"x">>),
    {ok, <<"x">>} = gen_tcp:recv(C, 1, 5000),
    [gen_tcp:close(X) || X <- [C, L]],
    ok.

pool_option_checked(_Config) ->
    {error, {badarg, reactor}} = erpy:start_pool(rbad, #{mode => embedded, reactor => 42}),
    {error, {badarg, reactor}} = erpy:start_pool(rbad, #{mode => port, reactor => {"m", 1}}).

%% ---- helpers ---------------------------------------------------------------------------------

%% Unix socket paths are short (108 bytes): under /tmp, not the log folder.
sock_path(Name) ->
    Path = "/tmp/erpy_reactor_" ++ os:getpid() ++ "_" ++ Name ++ ".sock",
    _ = file:delete(Path),
    Path.

warm_socket_module(Path) ->
    {ok, L} = socket:open(local, stream, default),
    ok = socket:bind(L, #{family => local, path => Path}),
    ok = socket:listen(L),
    {ok, C} = socket:open(local, stream, default),
    ok = socket:connect(C, #{family => local, path => Path}),
    {ok, S} = socket:accept(L),
    ok = socket:send(C, <<"w">>),
    {ok, <<"w">>} = socket:recv(S, 0, 1000),
    [socket:close(X) || X <- [S, C, L]],
    file:delete(Path).

%% ---- one context: the ready connections of a pool run as one batch --------------------

%% A size-1 pool whose protocols are the suite's.
one_context_pool(Name, Config) ->
    {ok, _} = erpy:start_pool(Name, #{mode => embedded, size => 1, timeout => 1000,
                                      allowed => [lists], reactor => {reactor_protocols, 'Echo'}}),
    ok = erpy:exec(iolist_to_binary(["import sys; sys.path.insert(0, '", ?config(pydir, Config), "')"]),
                   #{pool => Name}).

%% A callback that never returns, in a batch with others ready at the same time: it is
%% interrupted at its timeout and closes its connection only; the others, given back to
%% the poller, are served.
batch_hang_spares_others(Config) ->
    one_context_pool(rone, Config),
    try
        {L, Port} = listen(),
        {CH, SH} = connect(L, Port),
        {ok, Hung} = erpy_reactor:handoff_socket(rone, SH, #{timeout => 300}),
        Others = [begin
                      {C, S} = connect(L, Port),
                      {ok, _} = erpy_reactor:handoff_socket(rone, S),
                      gen_tcp:close(S),
                      C
                  end || _ <- lists:seq(1, 8)],
        gen_tcp:close(SH),
        Mon = monitor(process, Hung),
        ok = gen_tcp:send(CH, <<"hang">>),
        [ok = gen_tcp:send(C, <<"later">>) || C <- Others],
        receive {'DOWN', Mon, process, Hung, {shutdown, timeout}} -> ok after 5000 -> error(not_closed) end,
        [{ok, <<"later">>} = gen_tcp:recv(C, 5, 5000) || C <- Others],
        {error, closed} = gen_tcp:recv(CH, 0, 2000),
        [ok = gen_tcp:send(C, <<"again">>) || C <- Others],
        [{ok, <<"again">>} = gen_tcp:recv(C, 5, 5000) || C <- Others],
        [gen_tcp:close(X) || X <- [CH, L | Others]],
        ok = wait_until(fun() -> conns(rone) =:= 0 end, 5000)
    after
        erpy:stop_pool(rone)
    end.

%% Callbacks into Erlang from several connections of one batch: each runs in its own
%% connection's process, under the pool's policy.
batch_callbacks_routed(Config) ->
    one_context_pool(rone, Config),
    try
        {L, Port} = listen(),
        Cs = [begin
                  {C, S} = connect(L, Port),
                  {ok, _} = erpy_reactor:handoff_socket(rone, S),
                  gen_tcp:close(S),
                  C
              end || _ <- lists:seq(1, 8)],
        [begin
             [ok = gen_tcp:send(C, <<"call">>) || C <- Cs],
             [{ok, <<"ok:[[1, 2, 3]];os:ErlangError">>} = gen_tcp:recv(C, 0, 5000) || C <- Cs]
         end || _ <- lists:seq(1, 5)],
        [gen_tcp:close(X) || X <- [L | Cs]],
        ok = wait_until(fun() -> conns(rone) =:= 0 end, 5000)
    after
        erpy:stop_pool(rone)
    end.

%% A pool stopped and started again under the same name serves new connections (its
%% connections' events go to the new pool's hub), and the old ones ended with it; a
%% protocol its stop left in the interpreter (which all embedded pools share) is lost
%% when its fd number is handed over again.
pool_restart_new_hub(Config) ->
    one_context_pool(rone, Config),
    {L, Port} = listen(),
    {C1, S1} = connect(L, Port),
    {ok, Conn1} = erpy_reactor:handoff_socket(rone, S1),
    gen_tcp:close(S1),
    Mon = monitor(process, Conn1),
    ok = erpy:stop_pool(rone),
    receive {'DOWN', Mon, process, Conn1, {shutdown, pool_stopped}} -> ok after 5000 -> error(not_closed) end,
    one_context_pool(rone, Config),
    try
        {C2, S2} = connect(L, Port),
        {ok, _} = erpy_reactor:handoff_socket(rone, S2),
        gen_tcp:close(S2),
        ok = gen_tcp:send(C2, <<"fresh">>),
        {ok, <<"fresh">>} = gen_tcp:recv(C2, 5, 5000),
        [gen_tcp:close(X) || X <- [C1, C2, L]],
        %% What the stop left in Python, unless its fd number came again (then lost).
        {ok, _} = erpy:eval(<<"[__import__('erpy.reactor').reactor._abort(f) "
                              "for f in list(__import__('erpy.reactor').reactor._conns)]">>,
                            #{}, #{pool => rone}),
        ok = wait_until(fun() -> conns(rone) =:= 0 end, 5000)
    after
        erpy:stop_pool(rone)
    end.

listen() ->
    {ok, L} = gen_tcp:listen(0, [binary, {active, false}, {reuseaddr, true}, {ip, {127, 0, 0, 1}},
                                 {backlog, 1024}]),
    {ok, Port} = inet:port(L),
    {L, Port}.

connect(L, Port) ->
    {ok, C} = gen_tcp:connect({127, 0, 0, 1}, Port, [binary, {active, false}]),
    {ok, S} = accept(L, C),
    {C, S}.

%% The accepted socket of client C (another worker of the same listener may take it).
accept(L, _C) ->
    gen_tcp:accept(L, 5000).

%% The connection's fd, as Python knows it: the only one open in the test.
fd_of(Conn) when is_pid(Conn) ->
    {ok, [Fd]} = erpy:eval(<<"list(__import__('erpy.reactor').reactor._conns)">>, #{}, #{pool => ?E}),
    {ok, Fd}.

conns(Pool) ->
    case erpy:call(reactor_protocols, count, [], #{pool => Pool, timeout => 2000}) of
        {ok, N} -> N;
        _ -> -1
    end.

fd_count() ->
    {ok, Fds} = file:list_dir("/proc/self/fd"),
    length(Fds).

wait_until(F, Ms) when Ms =< 0 ->
    case F() of true -> ok; _ -> timeout end;
wait_until(F, Ms) ->
    case F() of
        true -> ok;
        _ -> timer:sleep(20), wait_until(F, Ms - 20)
    end.
