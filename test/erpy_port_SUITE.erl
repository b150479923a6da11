%% Port mode end to end (issue 4): the seed's contract, the API, the allow-list, nesting,
%% output capture, limits, crashes, cancellation, queueing, recycling, crash injection
%% under load, and venv + requirements. Every case starts its own pools with explicit
%% options, so the cases do not depend on each other or on the default pool's size.
-module(erpy_port_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").
-include_lib("kernel/include/file.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([seed_examples/1, timeout_interrupts/1, api_calls/1, checkout_state/1,
         checkout_holder_dies/1, allow_list/1, nested_and_send/1, output_to_logger/1,
         limits/1, crash_exit/1, crash_segfault/1, crash_hang/1, caller_dies/1,
         queueing/1, checkout_timeout/1, recycle_after/1, max_memory/1,
         crash_injection_under_load/1, venv_requirements/1, protocol_version/1,
         pipelining/1, pipelined_never_inside_a_callback/1, adaptive_pipelining/1,
         crash_retries_unstarted/1,
         allow_list_follows_env/1]).
-export([fork_child_cannot_use_protocol/1, exec_child_has_no_protocol_fds/1,
         multiprocessing_fork_pool/1, background_child_then_crash/1,
         child_holding_pipe_then_crash/1, timeouts_with_sigint_ignored/1,
         rlimits_cpu/1, rlimits_as/1, rlimits_nofile/1, rlimits_fsize_nproc_core/1,
         rlimits_badarg/1, children_end_with_their_worker/1,
         forged_frame_header_refused/1, program_frame_header_refused/1]).
%% Run in the peer VM of timeouts_with_sigint_ignored.
-export([sigint_probe/1]).
-export([map_keys/1, keys_equal_in_python/1, checked_out_requests_never_withdrawn/1]).
%% Called from Python through the allow-list, and the logger handler of output_to_logger.
-export([nested/1, twice/2, log/2, slow_whoami/1, whoami/1]).

-define(SEED_SUM, <<"result = arguments['x'] + arguments['y']">>).

all() ->
    [seed_examples, timeout_interrupts, api_calls, checkout_state, checkout_holder_dies,
     allow_list, nested_and_send, output_to_logger, limits, crash_exit, crash_segfault,
     crash_hang, caller_dies, queueing, checkout_timeout, recycle_after, max_memory,
     crash_injection_under_load, venv_requirements, protocol_version, pipelining,
     pipelined_never_inside_a_callback,
     adaptive_pipelining, crash_retries_unstarted, allow_list_follows_env,
     fork_child_cannot_use_protocol, exec_child_has_no_protocol_fds, multiprocessing_fork_pool,
     background_child_then_crash, child_holding_pipe_then_crash, timeouts_with_sigint_ignored,
     rlimits_cpu, rlimits_as, rlimits_nofile, rlimits_fsize_nproc_core, rlimits_badarg,
     children_end_with_their_worker, map_keys, keys_equal_in_python,
     checked_out_requests_never_withdrawn, forged_frame_header_refused,
     program_frame_header_refused].

suite() ->
    [{timetrap, {seconds, 60}}].

init_per_suite(Config) ->
    ok = ensure_python_path(),
    %% The default pool reads `allowed` when it starts: the seed's lists:sort example
    %% runs through it unchanged.
    _ = application:stop(erpy),  % another suite of this run may have left it running
    _ = application:load(erpy),
    ok = application:set_env(erpy, allowed, [lists]),
    {ok, _} = application:ensure_all_started(erpy),
    wait_ready(default),
    Config.

end_per_suite(_Config) ->
    application:stop(erpy),
    application:unset_env(erpy, allowed),
    ok.

init_per_testcase(_Case, Config) ->
    Config.

end_per_testcase(_Case, _Config) ->
    [erpy:stop_pool(P) || P <- [p_seed, p_timeout, p_api, p_one, p_allow, nest, p_log,
                                p_limits, p_crash, p_dies, p_queue, p_recycle, p_mem,
                                p_load, p_venv, p_version, p_pipe, p_auto, p_retry]],
    ok.

%% A pool without its own allow-list follows the application env `allowed`, also when it changes while the pool runs.
allow_list_follows_env(_Config) ->
    Code = <<"result = erlang.call('lists', 'sort', [9, 1, 5])">>,
    ?assertEqual({ok, #{status => ok, result => [1, 5, 9]}}, erpy:run(#{code => Code})),
    ok = application:set_env(erpy, allowed, []),
    try
        {ok, #{status := error, error := #{type := <<"ErlangError">>}}} = erpy:run(#{code => Code})
    after
        ok = application:set_env(erpy, allowed, [lists])
    end,
    ?assertEqual({ok, #{status => ok, result => [1, 5, 9]}}, erpy:run(#{code => Code})).

%% ---- pipelining ------------------------------------------------------------------------

%% With pipeline => 4 several callers share one worker: every answer is right, and a request stuck behind a slow one times out without running.
%% With pipelining, a request written behind one that waits for a callback's answer runs
%% after it, never inside that callback: its own callbacks reach its own caller, under its
%% own request's policy, and erlang.self() is its caller.
pipelined_never_inside_a_callback(_Config) ->
    start(p_pipe_cb, #{size => 1, pipeline => 4, allowed => [{?MODULE, slow_whoami, 1}, {?MODULE, whoami, 1}]}),
    Self = self(),
    A = spawn_link(fun() ->
                           Self ! {a, self(), erpy:eval(<<"(erlang.call('erpy_port_SUITE', 'slow_whoami', 0), erlang.self())">>,
                                                       #{}, #{pool => p_pipe_cb, timeout => 10000})}
                   end),
    timer:sleep(100),
    B = spawn_link(fun() ->
                           Self ! {b, self(), erpy:eval(<<"(erlang.call('erpy_port_SUITE', 'whoami', 0), erlang.self())">>,
                                                       #{}, #{pool => p_pipe_cb, timeout => 10000})}
                   end),
    receive {a, A, RA} -> ?assertEqual({ok, {A, A}}, RA) after 15000 -> ct:fail(no_a) end,
    receive {b, B, RB} -> ?assertEqual({ok, {B, B}}, RB) after 15000 -> ct:fail(no_b) end.

slow_whoami(_) -> timer:sleep(500), self().
whoami(_) -> self().

pipelining(Config) ->
    start(p_pipe, #{size => 1, pipeline => 4}),
    %% The mark a request that must never run would leave: in this run's own directory.
    Mark = filename:join(?config(priv_dir, Config), "erpy_pipe_ran"),
    Self = self(),
    %% 4 callers x 500 calls on one worker, all answers correct and none lost.
    Callers = [spawn_link(fun() ->
                                  Rs = [erpy:call(operator, add, [I, C], #{pool => p_pipe})
                                        || I <- lists:seq(1, 500)],
                                  Self ! {done, C, Rs}
                          end) || C <- lists:seq(1, 4)],
    [receive {done, C, Rs} -> ?assertEqual([{ok, I + C} || I <- lists:seq(1, 500)], Rs) end
     || C <- lists:seq(1, 4), _ <- [Callers]],
    %% A slow request holds the worker; one pipelined behind it times out and never runs.
    Slow = spawn_link(fun() ->
                              Self ! {slow, erpy:run(#{code => <<"import time; time.sleep(0.6)">>,
                                                       pool => p_pipe}, 5000)}
                      end),
    timer:sleep(100),
    ?assertEqual({error, timeout},
                 erpy:run(#{code => <<"open(arguments, 'w').write('x')">>,
                            arguments => unicode:characters_to_binary(Mark), pool => p_pipe}, 200)),
    receive {slow, R} -> ?assertEqual({ok, #{status => ok, result => undefined}}, R) end,
    _ = Slow,
    ?assertNot(filelib:is_regular(Mark)),
    %% The slot counts came back: a free worker again serves without queueing.
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], #{pool => p_pipe, timeout => 1000})),
    %% Large results are written from the Python object itself: bytes and text intact.
    Raw = << <<(I rem 251), 255>> || I <- lists:seq(1, 100000) >>,
    Text = unicode:characters_to_binary(lists:duplicate(50000, "h\x{e9}llo ")),
    ?assertEqual({ok, Raw}, erpy:call(copy, copy, [Raw], #{pool => p_pipe})),
    ?assertEqual({ok, Text}, erpy:call(copy, copy, [Text], #{pool => p_pipe})),
    ?assertEqual({ok, [Text]}, erpy:call(copy, copy, [[Text]], #{pool => p_pipe})),
    ok.

%% Adaptive pipelining: many callers on two workers get every answer, and a short
%% request placed behind a request that turns out long does not wait for it.
adaptive_pipelining(_Config) ->
    ?assertEqual({error, {badarg, pipeline}}, erpy:start_pool(p_auto, #{pipeline => 0})),
    ?assertEqual({error, {badarg, pipeline}}, erpy:start_pool(p_auto, #{pipeline => yes})),
    start(p_auto, #{size => 2, pipeline => auto}),
    Self = self(),
    Callers = [spawn_link(fun() ->
                                  Rs = [erpy:call(operator, add, [I, C], #{pool => p_auto})
                                        || I <- lists:seq(1, 300)],
                                  Self ! {done, C, Rs}
                          end) || C <- lists:seq(1, 4)],
    [receive {done, C, Rs} -> ?assertEqual([{ok, I + C} || I <- lists:seq(1, 300)], Rs) end
     || C <- lists:seq(1, 4), _ <- [Callers]],
    %% Short requests are packed onto the first worker; two long ones still run side by
    %% side (the second, written behind the first, is withdrawn and placed on the other).
    Pid = <<"import os, time\ntime.sleep(0.3)\nresult = os.getpid()">>,
    [spawn_link(fun() -> Self ! {pid, erpy:run(#{code => Pid, pool => p_auto}, 10000)} end) || _ <- [1, 2]],
    Pids = [receive {pid, {ok, #{result := P}}} -> P end || _ <- [1, 2]],
    ?assertEqual(2, length(lists:usort(Pids))),
    Sleep = fun(S) -> erpy:call(time, sleep, [S], #{pool => p_auto, timeout => 10000}) end,
    %% One worker busy a while; then a long call on the other, and at once a short one,
    %% which may be placed behind the long one (it had just started).
    spawn_link(fun() -> Self ! {medium, Sleep(0.5)} end),
    timer:sleep(100),
    spawn_link(fun() -> Self ! {long, Sleep(3)} end),
    spawn_link(fun() -> Self ! {short, erpy:call(operator, add, [1, 2], #{pool => p_auto, timeout => 10000})} end),
    receive {short, Short} -> ?assertEqual({ok, 3}, Short) end,
    %% Answered while the long call still runs.
    receive {long, _} -> ct:fail(short_waited_for_long) after 0 -> ok end,
    receive {medium, M} -> ?assertEqual({ok, undefined}, M) end,
    receive {long, L} -> ?assertEqual({ok, undefined}, L) end,
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], #{pool => p_auto, timeout => 1000})).

%% A worker that crashes fails only the request it ran: those placed on it that Python
%% had not started (pipelined behind it, or waiting in its Erlang process) are placed
%% again, and answered by the replacement.
crash_retries_unstarted(_Config) ->
    [begin
         start(p_retry, Opts),
         Self = self(),
         spawn_link(fun() ->
                            Self ! {crash, erpy:run(#{code => <<"import os, time\ntime.sleep(0.3)\nos._exit(3)">>,
                                                      pool => p_retry}, 10000)}
                    end),
         timer:sleep(50),
         [spawn_link(fun() -> Self ! {short, I, erpy:call(operator, add, [I, 1], #{pool => p_retry, timeout => 10000})} end)
          || I <- lists:seq(1, 3)],
         receive {crash, R} -> ?assertMatch({error, {worker_exit, _}}, R) end,
         [receive {short, I, Rs} -> ?assertEqual({ok, I + 1}, Rs) end || I <- lists:seq(1, 3)],
         erpy:stop_pool(p_retry)
     end || Opts <- [#{size => 1, pipeline => 4}, #{size => 1, pipeline => auto}, #{size => 1}]],
    ok.

%% ---- 1. the seed's contract -------------------------------------------------------------

%% The seed's examples through run/1,2 on the default pool: a sum, lists:sort from Python, a Python exception.
seed_examples(_Config) ->
    ?assertEqual({ok, #{status => ok, result => 30}},
                 erpy:run(#{code => ?SEED_SUM, arguments => #{<<"x">> => 10, <<"y">> => 20}})),
    ?assertEqual({ok, #{status => ok, result => 30}},
                 erpy:run(#{code => ?SEED_SUM, arguments => #{<<"x">> => 10, <<"y">> => 20}},
                          10000)),
    ?assertEqual({ok, #{status => ok, result => [1, 5, 9]}},
                 erpy:run(#{code => <<"result = erlang.call('lists', 'sort', [9, 1, 5])">>,
                            arguments => #{}})),
    {ok, #{status := error, error := #{type := <<"ZeroDivisionError">>, message := Msg,
                                       traceback := [_ | _] = Tb}}} =
        erpy:run(#{code => <<"result = 1 / 0">>, arguments => #{}}),
    ?assert(is_binary(Msg)),
    ?assert(lists:all(fun is_binary/1, Tb)),
    %% `result` defaults to None, which is `undefined`.
    ?assertEqual({ok, #{status => ok, result => undefined}}, erpy:run(#{code => <<"x = 1">>})),
    ?assertEqual({error, {badarg, code}}, erpy:run(#{code => 42})).

%% A run that times out returns {error, timeout} promptly and the same (interrupted, not killed) worker answers next.
timeout_interrupts(_Config) ->
    start(p_timeout, #{size => 1}),
    [W] = worker_pids(p_timeout),
    OsPid = gen_server:call(W, os_pid),
    {T, R} = tc(fun() ->
                              erpy:run(#{code => <<"import time\ntime.sleep(10)">>,
                                         arguments => #{}, pool => p_timeout}, 300)
                      end),
    ?assertEqual({error, timeout}, R),
    ?assert(T < 1000, {slow_timeout, T}),
    {T2, R2} = tc(fun() -> erpy:eval(<<"__import__('os').getpid()">>, #{},
                                           #{pool => p_timeout, timeout => 2000})
                        end),
    ?assertEqual({ok, OsPid}, R2),
    ?assert(T2 < 1000, {slow_next_call, T2}),
    ?assertEqual([W], worker_pids(p_timeout)),
    %% A timeout while Python waits for Erlang: also interrupted, same worker.
    start(p_timeout_cb, #{size => 1, allowed => [timer]}),
    ?assertMatch({error, timeout},
                 erpy:run(#{code => <<"erlang.call('timer', 'sleep', 2000)">>,
                            pool => p_timeout_cb}, 200)),
    ?assertMatch({ok, _}, erpy:eval(<<"1">>, #{}, #{pool => p_timeout_cb, timeout => 3000})),
    erpy:stop_pool(p_timeout_cb).

%% ---- 2. the API ------------------------------------------------------------------------

%% call/3,4 with kwargs, dotted modules and Class.method, eval/1,2,3 with locals, exec/1,2.
api_calls(_Config) ->
    start(p_api, #{size => 2}),
    O = #{pool => p_api},
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], O)),
    ?assertEqual({ok, 3}, erpy:call(<<"operator">>, <<"add">>, [1, 2], O)),
    ?assertEqual({ok, 255}, erpy:call(builtins, int, [<<"ff">>], O#{kwargs => #{base => 16}})),
    ?assertEqual({ok, 255}, erpy:call(builtins, int, [<<"ff">>],
                                      O#{kwargs => #{<<"base">> => 16}})),
    ?assertEqual({ok, <<"a/b">>}, erpy:call('os.path', join, [<<"a">>, <<"b">>], O)),
    ?assertEqual({ok, <<"ABC">>}, erpy:call(builtins, 'str.upper', [<<"abc">>], O)),
    ?assertEqual({ok, #{<<"a">> => 0, <<"b">> => 0}},
                 erpy:call(builtins, 'dict.fromkeys', [[<<"a">>, <<"b">>], 0], O)),
    ?assertMatch({error, #{type := <<"ModuleNotFoundError">>}},
                 erpy:call(no_such_python_module, f, [], O)),
    ?assertMatch({error, #{type := <<"AttributeError">>}}, erpy:call(operator, nope, [], O)),
    ?assertMatch({error, {badarg, _}}, erpy:call(operator, add, not_a_list, O)),
    %% The default pool too.
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2])),
    ?assertEqual({ok, 4}, erpy:eval(<<"2 + 2">>)),
    ?assertEqual({ok, 3}, erpy:eval(<<"x + y">>, #{x => 1, y => 2})),
    ?assertEqual({ok, 3}, erpy:eval(<<"x + y">>, #{<<"x">> => 1, <<"y">> => 2}, O)),
    ?assertEqual({ok, [1, 2]}, erpy:eval("sorted(v)", #{v => [2, 1]}, O)),
    ?assertMatch({error, #{type := <<"SyntaxError">>}}, erpy:eval(<<"1 +">>, #{}, O)),
    ?assertEqual(ok, erpy:exec(<<"x = 1\nassert x == 1">>)),
    ?assertEqual(ok, erpy:exec(<<"import math\ny = math.sqrt(4)">>, O)),
    ?assertMatch({error, #{type := <<"AssertionError">>}}, erpy:exec(<<"assert False">>, O)),
    %% Without a checkout, nothing persists between requests.
    ok = erpy:exec(<<"leftover = 1">>, O),
    ?assertMatch({error, #{type := <<"NameError">>}}, erpy:eval(<<"leftover">>, #{}, O)),
    %% Types cross both ways.
    T = {a, <<"b">>, [1, 2.5], #{k => true}, -(1 bsl 70), self(), undefined},
    ?assertEqual({ok, T}, erpy:eval(<<"t">>, #{t => T}, O)).

%% A checked-out worker keeps its namespace across calls (checkout + worker option, with_worker) and clears it at checkin.
checkout_state(_Config) ->
    start(p_one, #{size => 1}),
    {ok, W} = erpy:checkout(p_one, 1000),
    ok = erpy:exec(<<"counter = 41">>, #{worker => W}),
    ok = erpy:exec(<<"counter += 1">>, #{worker => W}),
    ?assertEqual({ok, 42}, erpy:eval(<<"counter">>, #{}, #{worker => W})),
    ?assertEqual({ok, #{status => ok, result => 43}},
                 erpy:run(#{code => <<"result = counter + 1">>, worker => W})),
    ?assertEqual({ok, 42}, erpy:call(operator, add, [40, 2], #{worker => W})),
    ok = erpy:checkin(W),
    %% The same (only) worker, its namespace cleared.
    ?assertMatch({error, #{type := <<"NameError">>}}, erpy:eval(<<"counter">>, #{}, #{pool => p_one})),
    R = erpy:with_worker(p_one, fun(W2) ->
                                        ok = erpy:exec(<<"s = [1]">>, #{worker => W2}),
                                        ok = erpy:exec(<<"s.append(2)">>, #{worker => W2}),
                                        erpy:eval(<<"s">>, #{}, #{worker => W2})
                                end),
    ?assertEqual({ok, [1, 2]}, R),
    {ok, W3} = erpy:checkout(p_one, 1000),
    ?assertMatch({error, #{type := <<"NameError">>}}, erpy:eval(<<"s">>, #{}, #{worker => W3})),
    ok = erpy:checkin(W3),
    wait_idle(p_one),
    ?assertEqual({ok, 1}, erpy:eval(<<"1">>, #{}, #{pool => p_one, timeout => 2000})).

%% A holder that dies (idle or mid-call) gets its worker back into the pool: with a pool of 1 the next call succeeds.
checkout_holder_dies(_Config) ->
    start(p_one, #{size => 1}),
    Self = self(),
    {H, Mon} = spawn_monitor(fun() ->
                                     {ok, W} = erpy:checkout(p_one, 1000),
                                     ok = erpy:exec(<<"secret = 1">>, #{worker => W}),
                                     Self ! {held, W},
                                     receive stop -> ok end
                             end),
    receive {held, _} -> ok after 5000 -> ct:fail(no_checkout) end,
    exit(H, kill),
    receive {'DOWN', Mon, _, _, _} -> ok end,
    ?assertMatch({error, #{type := <<"NameError">>}},
                 erpy:eval(<<"secret">>, #{}, #{pool => p_one, timeout => 2000})),
    %% Dies while its held worker runs a long call: interrupted, then returned.
    [WPid] = worker_pids(p_one),
    OsPid = gen_server:call(WPid, os_pid),
    {H2, Mon2} = spawn_monitor(fun() ->
                                       {ok, W} = erpy:checkout(p_one, 1000),
                                       Self ! {held, W},
                                       erpy:exec(<<"import time\ntime.sleep(30)">>,
                                                 #{worker => W, timeout => infinity})
                               end),
    receive {held, _} -> ok after 5000 -> ct:fail(no_checkout) end,
    timer:sleep(200),
    exit(H2, kill),
    receive {'DOWN', Mon2, _, _, _} -> ok end,
    {T, R} = tc(fun() -> erpy:eval(<<"__import__('os').getpid()">>, #{},
                                         #{pool => p_one, timeout => 3000})
                      end),
    ?assertEqual({ok, OsPid}, R),
    ?assert(T < 1000, {slow, T}).

%% ---- 3. the allow-list -----------------------------------------------------------------

%% Only listed modules, functions and arities may be called from Python, and unknown names create no atoms.
allow_list(_Config) ->
    start(p_allow, #{size => 1, allowed => [lists, {erlang, abs}, {?MODULE, nested, 1}]}),
    Run = fun(Code) -> erpy:run(#{code => Code, arguments => #{}, pool => p_allow}) end,
    ?assertEqual({ok, #{status => ok, result => [1, 5, 9]}},
                 Run(<<"result = erlang.call('lists', 'sort', [9, 1, 5])">>)),
    ?assertEqual({ok, #{status => ok, result => [1, 2, 3]}},
                 Run(<<"result = erlang.apply('lists', 'seq', [1, 3])">>)),
    ?assertEqual({ok, #{status => ok, result => 3}},
                 Run(<<"result = erlang.call('erlang', 'abs', -3)">>)),
    NotAllowed = fun(Code) ->
                         {ok, #{status := error, error := #{type := <<"ErlangError">>} = E}} = Run(Code),
                         E
                 end,
    NotAllowed(<<"erlang.call('os', 'cmd', 'ls')">>),
    NotAllowed(<<"erlang.apply('erlang', 'halt', [])">>),
    NotAllowed(<<"erlang.apply('erlang', 'halt', [0])">>),
    NotAllowed(<<"erlang.apply('erlang', 'abs', [1, 2])">>),
    %% {M, F, 1}: only arity 1.
    ?assertEqual({ok, #{status => ok, result => 42}},
                 Run(<<"from erpy import Atom\n"
                       "result = erlang.apply('erpy_port_SUITE', 'nested', [(Atom('p_allow'), 21)])">>)),
    NotAllowed(<<"erlang.apply('erpy_port_SUITE', 'nested', [1, 2])">>),
    NotAllowed(<<"erlang.apply('erpy_port_SUITE', 'twice', [1, 2])">>),
    %% A refused call raises ErlangError, which Python can catch; args[0] is the reason.
    ?assertEqual({ok, #{status => ok, result => {not_allowed, {os, cmd, 1}}}},
                 Run(<<"try:\n    erlang.call('os', 'cmd', 'ls')\n"
                       "except erlang.ErlangError as e:\n    result = e.args[0]">>)),
    %% An exception in an allowed function: ErlangError with class, reason, stacktrace.
    {ok, #{status := ok, result := #{class := error, reason := badarg, stacktrace := [_ | _]}}} =
        Run(<<"try:\n    erlang.call('erlang', 'abs', 'x')\n"
              "except erlang.ErlangError as e:\n    result = e.args[0]">>),
    %% Unknown names create no atom (the name is made at run time, never an atom here).
    Name = iolist_to_binary(["erpy_no_such_mod_", integer_to_list(erlang:unique_integer([positive]))]),
    Fun = iolist_to_binary(["erpy_no_such_fun_", integer_to_list(erlang:unique_integer([positive]))]),
    Atoms = erlang:system_info(atom_count),
    E1 = NotAllowed(iolist_to_binary(["erlang.call('", Name, "', 'f', 1)"])),
    E2 = NotAllowed(iolist_to_binary(["erlang.call('lists', '", Fun, "', 1)"])),
    E3 = NotAllowed(iolist_to_binary(["erlang.apply('", Name, "', '", Fun, "', [])"])),
    ct:log("refusals: ~p~n~p~n~p", [E1, E2, E3]),
    ?assertError(badarg, binary_to_existing_atom(Name, utf8)),
    ?assertError(badarg, binary_to_existing_atom(Fun, utf8)),
    ?assert(erlang:system_info(atom_count) - Atoms < 5),
    %% Bad shapes are refused too.
    NotAllowed(<<"erlang.call(1, 2, 3)">>),
    %% After all that the worker is fine.
    ?assertEqual({ok, 2}, erpy:eval(<<"1 + 1">>, #{}, #{pool => p_allow})).

%% ---- 4. nesting, send, self ------------------------------------------------------------

%% Python -> Erlang -> Python nests on a pool of 1 without deadlock; erlang.send and erlang.self reach the caller.
nested_and_send(_Config) ->
    start(nest, #{size => 1, allowed => [{?MODULE, nested, 1}, {?MODULE, twice, 2}, {erlang, abs}],
                  send_allowed => [erpy_port_suite_target]}),
    ?assertEqual({ok, #{status => ok, result => 10}},
                 erpy:run(#{code => <<"result = erlang.call('erpy_port_SUITE', 'nested', 5)">>,
                            pool => nest}, 5000)),
    %% Two levels: Python -> nested/1 -> eval -> Python -> twice/2 -> eval -> Python.
    ?assertEqual({ok, 4 * 7},
                 erpy:eval(<<"erlang.apply('erpy_port_SUITE', 'twice', [7, 2])">>, #{},
                           #{pool => nest, timeout => 5000})),
    %% Concurrent nested callers on the one worker queue, none deadlocks.
    Self = self(),
    [spawn(fun() ->
                   Self ! {nested, I, erpy:run(#{code => <<"result = erlang.call('erpy_port_SUITE', 'nested', arguments)">>,
                                                 arguments => I, pool => nest}, 10000)}
           end) || I <- lists:seq(1, 5)],
    [receive {nested, I, R} -> ?assertEqual({ok, #{status => ok, result => 2 * I}}, R)
     after 15000 -> ct:fail({deadlock, I})
     end || I <- lists:seq(1, 5)],
    %% self() and send.
    Me = self(),
    ?assertEqual({ok, Me}, erpy:eval(<<"erlang.self()">>, #{}, #{pool => nest})),
    ?assertEqual({ok, undefined},
                 erpy:eval(<<"erlang.send(erlang.self(), ('hello', 1, erlang.self()))">>, #{},
                           #{pool => nest})),
    receive {<<"hello">>, 1, Me} -> ok after 2000 -> ct:fail(no_message) end,
    register(erpy_port_suite_target, self()),
    ok = erpy:exec(<<"import erpy\nerlang.send(erpy.Atom('erpy_port_suite_target'), 'by name')">>,
                   #{pool => nest}),
    unregister(erpy_port_suite_target),
    receive <<"by name">> -> ok after 2000 -> ct:fail(no_message_by_name) end.

nested({Pool, X}) ->
    {ok, V} = erpy:eval(<<"x * 2">>, #{x => X}, #{pool => Pool, timeout => 5000}),
    V;
nested(X) ->
    nested({nest, X}).

twice(X, N) ->
    {ok, V} = erpy:eval(<<"erlang.call('erpy_port_SUITE', 'nested', x) * n">>, #{x => X, n => N},
                        #{pool => nest, timeout => 5000}),
    V.

%% ---- 5. output -------------------------------------------------------------------------

%% print() and stderr output reach the logger with pool/worker metadata and never corrupt replies.
output_to_logger(_Config) ->
    start(p_log, #{size => 1}),
    [W] = worker_pids(p_log),
    {ok, #{level := OldLevel}} = {ok, logger:get_primary_config()},
    ok = logger:set_primary_config(level, all),
    ok = logger:add_handler(erpy_port_suite, ?MODULE,
                            #{config => #{pid => self()}, level => all,
                              filters => [{erpy, {fun only_python/2, []}}]}),
    try
        Code = <<"import sys, os\n"
                 "print('hello out')\n"
                 "sys.stderr.write('hello err\\n')\n"
                 "os.write(1, b'raw fd one\\n')\n"
                 "for i in range(2000): print('line', i)\n"
                 "result = 7">>,
        ?assertEqual({ok, #{status => ok, result => 7}},
                     erpy:run(#{code => Code, pool => p_log})),
        Ev1 = wait_log(<<"hello out">>),
        ?assertMatch(#{meta := #{pool := p_log, worker := W, stream := stdout, os_pid := _}}, Ev1),
        Ev2 = wait_log(<<"hello err">>),
        ?assertMatch(#{meta := #{pool := p_log, worker := W, stream := stderr}}, Ev2),
        _ = wait_log(<<"raw fd one">>),
        _ = wait_log(<<"line 1999">>),
        %% A partial line (no newline) shows up too, and replies stay intact meanwhile.
        {ok, undefined} = erpy:eval(<<"print('no newline', end='', flush=True)">>, #{}, #{pool => p_log}),
        _ = wait_log(<<"no newline">>),
        [?assertEqual({ok, I}, erpy:eval(<<"print('x' * 100000) or i">>, #{i => I}, #{pool => p_log}))
         || I <- lists:seq(1, 20)]
    after
        logger:remove_handler(erpy_port_suite),
        logger:set_primary_config(level, OldLevel)
    end.

only_python(#{meta := #{domain := [erpy, python]}} = Event, _) -> Event;
only_python(_, _) -> stop.

%% logger handler callback: forwards events to the test process.
log(Event, #{config := #{pid := Pid}}) ->
    Pid ! {log_event, Event}.

wait_log(Text) ->
    receive
        {log_event, #{msg := {"~ts", [Text]}} = Ev} -> Ev
    after 5000 ->
        ct:fail({no_log, Text})
    end.

%% ---- 6. limits -------------------------------------------------------------------------

%% max_message_size in both directions gives {message_too_large, Size, Max} and the worker stays healthy; an unencodable result is a clear error.
limits(_Config) ->
    Max = 100000,
    start(p_limits, #{size => 1, max_message_size => Max, allowed => [erlang]}),
    O = #{pool => p_limits},
    [W] = worker_pids(p_limits),
    OsPid = gen_server:call(W, os_pid),
    Big = binary:copy(<<"x">>, 2 * Max),
    ?assertMatch({error, {message_too_large, S, Max}} when S > Max, erpy:call(builtins, len, [Big], O)),
    ?assertMatch({error, {message_too_large, S, Max}} when S > Max,
                 erpy:run(#{code => <<"result = 1">>, arguments => Big, pool => p_limits})),
    %% Just under the limit passes.
    ?assertEqual({ok, Max - 300}, erpy:eval(<<"len(b)">>, #{b => binary:copy(<<"x">>, Max - 300)}, O)),
    ?assertMatch({error, {message_too_large, S, Max}} when S > Max,
                 erpy:eval(<<"b'x' * 200000">>, #{}, O)),
    ?assertMatch({error, {message_too_large, S, Max}} when S > Max,
                 erpy:run(#{code => <<"result = 'y' * 200000">>, pool => p_limits})),
    %% A callback whose argument or answer is too large: ErlangError in Python.
    {ok, #{status := error, error := #{type := <<"ErlangError">>}}} =
        erpy:run(#{code => <<"erlang.call('erlang', 'byte_size', b'z' * 200000)">>, pool => p_limits}),
    {ok, #{status := error, error := #{type := <<"ErlangError">>}}} =
        erpy:run(#{code => <<"erlang.apply('erlang', 'make_tuple', [200000, 1])">>, pool => p_limits}),
    %% Unencodable results.
    ?assertMatch({error, #{type := <<"EncodeError">>, message := _}}, erpy:eval(<<"object()">>, #{}, O)),
    ?assertMatch({ok, #{status := error, error := #{type := <<"EncodeError">>}}},
                 erpy:run(#{code => <<"result = {1: object()}">>, pool => p_limits})),
    ?assertMatch({error, #{type := _}}, erpy:eval(<<"float('nan')">>, #{}, O)),
    %% Still the same, healthy worker.
    ?assertEqual({ok, OsPid}, erpy:eval(<<"__import__('os').getpid()">>, #{}, O)),
    ?assertEqual([W], worker_pids(p_limits)).

%% ---- 7. crashes ------------------------------------------------------------------------

%% os._exit fails only the request in flight with worker_exit; the pool gets back to its size, others untouched.
crash_exit(_Config) ->
    crash(<<"import os\nos._exit(3)">>, 5000, fun(R) -> ?assertMatch({error, {worker_exit, _}}, R) end).

%% A segfault fails only the request in flight with worker_exit; the pool gets back to its size, others untouched.
crash_segfault(_Config) ->
    crash(<<"import ctypes\nctypes.string_at(0)">>, 5000,
          fun(R) -> ?assertMatch({error, {worker_exit, _}}, R) end).

%% A hang that swallows KeyboardInterrupt times out, is killed after kill_grace_ms and replaced; others untouched.
crash_hang(_Config) ->
    Code = <<"import time\nwhile True:\n    try:\n        time.sleep(1)\n"
             "    except KeyboardInterrupt:\n        pass">>,
    crash(Code, 300, fun(R) -> ?assertEqual({error, timeout}, R) end),
    %% Also when it keeps printing (a stream of log frames must not postpone the kill).
    Noisy = <<"import time\nwhile True:\n    try:\n        print('still here', flush=True)\n"
              "        time.sleep(0.005)\n    except KeyboardInterrupt:\n        pass">>,
    crash(Noisy, 300, fun(R) -> ?assertEqual({error, timeout}, R) end).

crash(Code, Timeout, Check) ->
    start(p_crash, #{size => 2, kill_grace_ms => 300}),
    Before = worker_pids(p_crash),
    Self = self(),
    Bystander = spawn_link(fun() -> bystander(Self, p_crash, 0, []) end),
    timer:sleep(50),
    {T, R} = tc(fun() -> erpy:run(#{code => Code, pool => p_crash}, Timeout) end),
    ct:log("crash answer after ~p ms: ~p", [T, R]),
    Check(R),
    ?assert(T < Timeout + 2000, {slow, T}),
    wait_until(fun() ->
                       #{ready := Ready, size := Size} = erpy_pool:info(p_crash),
                       Ready =:= Size andalso worker_pids(p_crash) =/= Before
               end, 5000),
    ?assertEqual({ok, 2}, erpy:eval(<<"1 + 1">>, #{}, #{pool => p_crash})),
    Bystander ! {stop, self()},
    receive
        {bystander, N, Bad} ->
            ct:log("bystander made ~p calls", [N]),
            ?assertEqual([], Bad),
            ?assert(N > 5)
    after 10000 -> ct:fail(bystander_stuck)
    end,
    ok = erpy:stop_pool(p_crash).

bystander(Parent, Pool, N, Bad) ->
    receive
        {stop, From} -> From ! {bystander, N, Bad}
    after 10 ->
        R = erpy:call(operator, add, [N, 1], #{pool => Pool, timeout => 5000}),
        Bad1 = case R of {ok, V} when V =:= N + 1 -> Bad; _ -> [{N, R} | Bad] end,
        bystander(Parent, Pool, N + 1, Bad1)
    end.

%% ---- 8. a caller dying mid-call --------------------------------------------------------

%% A caller killed while Python runs gets its worker interrupted and returned: with a pool of 1 the next call succeeds within ~1 s.
caller_dies(_Config) ->
    start(p_dies, #{size => 1, kill_grace_ms => 5000}),
    [W] = worker_pids(p_dies),
    OsPid = gen_server:call(W, os_pid),
    Self = self(),
    {C, Mon} = spawn_monitor(fun() ->
                                     Self ! started,
                                     erpy:exec(<<"import time\ntime.sleep(30)">>,
                                               #{pool => p_dies, timeout => infinity})
                             end),
    receive started -> ok end,
    timer:sleep(300),
    exit(C, kill),
    receive {'DOWN', Mon, _, _, _} -> ok end,
    {T, R} = tc(fun() -> erpy:eval(<<"__import__('os').getpid()">>, #{},
                                         #{pool => p_dies, timeout => 3000})
                      end),
    ?assertEqual({ok, OsPid}, R),
    ?assert(T < 1000, {slow, T}),
    %% Also when it dies while Python waits in a callback.
    erpy:stop_pool(p_dies),
    start(p_dies, #{size => 1, allowed => [timer]}),
    {C2, Mon2} = spawn_monitor(fun() ->
                                       erpy:run(#{code => <<"erlang.call('timer', 'sleep', 30000)">>,
                                                  pool => p_dies}, infinity)
                               end),
    timer:sleep(300),
    exit(C2, kill),
    receive {'DOWN', Mon2, _, _, _} -> ok end,
    ?assertMatch({ok, 1}, erpy:eval(<<"1">>, #{}, #{pool => p_dies, timeout => 3000})).

%% ---- 9. queueing -----------------------------------------------------------------------

%% With all workers busy callers queue in order; a queued caller that times out disturbs nobody.
queueing(_Config) ->
    start(p_queue, #{size => 1}),
    Self = self(),
    Go = fun(Tag, Code, Timeout) ->
                 spawn_link(fun() ->
                                    R = erpy:eval(Code, #{}, #{pool => p_queue, timeout => Timeout}),
                                    Self ! {done, Tag, R}
                            end)
         end,
    Go(slow, <<"__import__('time').sleep(0.5) or 'slow'">>, 5000),
    timer:sleep(100),
    [begin
         case I of
             3 -> Go(impatient, <<"'impatient'">>, 100);
             _ -> ok
         end,
         Go(I, iolist_to_binary(integer_to_list(I)), 5000),
         timer:sleep(20)
     end || I <- lists:seq(1, 6)],
    Order = [receive {done, Tag, R} -> {Tag, R} after 5000 -> ct:fail(lost) end
             || _ <- lists:seq(1, 8)],
    ct:log("completion order: ~p", [Order]),
    ?assertEqual([{impatient, {error, timeout}}, {slow, {ok, <<"slow">>}} |
                  [{I, {ok, I}} || I <- lists:seq(1, 6)]], Order),
    #{queued := 0, ready := 1} = erpy_pool:info(p_queue),
    ?assertEqual({ok, 1}, erpy:eval(<<"1">>, #{}, #{pool => p_queue})).

%% A checkout that waits longer than its timeout gets {error, timeout} and leaves the pool working.
checkout_timeout(_Config) ->
    start(p_queue, #{size => 1}),
    {ok, W} = erpy:checkout(p_queue, 1000),
    {T, R} = tc(fun() -> erpy:checkout(p_queue, 200) end),
    ?assertEqual({error, timeout}, R),
    ?assert(T < 700),
    %% A request queued behind the checkout also times out.
    ?assertEqual({error, timeout}, erpy:eval(<<"1">>, #{}, #{pool => p_queue, timeout => 200})),
    ok = erpy:checkin(W),
    ?assertEqual({ok, 1}, erpy:eval(<<"1">>, #{}, #{pool => p_queue, timeout => 2000})),
    %% Checkout while a call runs: served after it.
    Self = self(),
    spawn_link(fun() -> Self ! {slow, erpy:eval(<<"__import__('time').sleep(0.3)">>, #{},
                                                #{pool => p_queue})} end),
    %% The slow call holds the worker's slot before the checkout asks.
    {ok, #{slots := Slots}} = erpy_pool:lookup(p_queue),
    wait_until(fun() -> atomics:get(Slots, 1) =:= 1 end, 5000),
    {ok, W2} = erpy:checkout(p_queue, 2000),
    receive {slow, {ok, undefined}} -> ok after 0 -> ct:fail(checkout_before_call_ended) end,
    ?assertEqual({ok, 5}, erpy:eval(<<"5">>, #{}, #{worker => W2})),
    ok = erpy:checkin(W2),
    wait_idle(p_queue),
    #{queued := 0, held := 0} = erpy_pool:info(p_queue),
    ?assertEqual({ok, 1}, erpy:eval(<<"1">>, #{}, #{pool => p_queue, timeout => 2000})).

%% ---- 10. recycling and memory ----------------------------------------------------------

%% recycle_after N: the OS process changes after N calls.
recycle_after(_Config) ->
    start(p_recycle, #{size => 1, recycle_after => 3}),
    Pid = fun() -> {ok, P} = erpy:eval(<<"__import__('os').getpid()">>, #{},
                                       #{pool => p_recycle, timeout => 5000}),
                   P end,
    [P1, P2, P3, P4, P5, P6, P7] = [Pid() || _ <- lists:seq(1, 7)],
    ?assertEqual([P1, P1], [P2, P3]),
    ?assertNotEqual(P1, P4),
    ?assertEqual([P4, P4], [P5, P6]),
    ?assertNotEqual(P4, P7).

%% max_memory_mb: a worker that grows beyond it answers, then leaves; the next call gets a new worker.
max_memory(_Config) ->
    start(p_mem, #{size => 1, max_memory_mb => 100}),
    O = #{pool => p_mem, timeout => 10000},
    {ok, P1} = erpy:eval(<<"__import__('os').getpid()">>, #{}, O),
    ?assertEqual({ok, 150},
                 erpy:eval(<<"__import__('builtins').__dict__.setdefault('_erpy_hog', "
                             "b'x' * (150 * 1024 * 1024)) and 150">>, #{}, O)),
    {ok, P2} = erpy:eval(<<"__import__('os').getpid()">>, #{}, O),
    ?assertNotEqual(P1, P2),
    ?assertEqual({ok, 1}, erpy:eval(<<"1">>, #{}, O)),
    wait_until(fun() -> maps:get(ready, erpy_pool:info(p_mem)) =:= 1 end, 5000).

%% ---- 11. crash injection under load ----------------------------------------------------

%% 4 concurrent callers x 250 calls, one in 25 kills its worker: every other answer correct, none lost.
crash_injection_under_load(_Config) ->
    start(p_load, #{size => 4}),
    Self = self(),
    Callers = 4,
    PerCaller = 250,
    [spawn_link(fun() -> Self ! {results, C, load_caller(C, PerCaller)} end)
     || C <- lists:seq(1, Callers)],
    Results = lists:append([receive {results, C, Rs} -> Rs after 50000 -> ct:fail({lost, C}) end
                            || C <- lists:seq(1, Callers)]),
    Total = length(Results),
    Oks = [R || {_, ok} = R <- Results],
    Kills = [R || {_, killed} = R <- Results],
    Wrong = [R || {_, What} = R <- Results, What =/= ok, What =/= killed],
    ct:log("total ~p, ok ~p, killed ~p, wrong ~p", [Total, length(Oks), length(Kills), Wrong]),
    ?assertEqual([], Wrong),
    ?assertEqual(Callers * PerCaller, Total),
    ?assertEqual(Callers * (PerCaller - PerCaller div 25), length(Oks)),
    ?assertEqual(Callers * (PerCaller div 25), length(Kills)),
    wait_until(fun() -> maps:get(ready, erpy_pool:info(p_load)) =:= 4 end, 10000).

load_caller(C, N) ->
    [case I rem 25 of
         0 ->
             case erpy:exec(<<"import os\nos._exit(1)">>, #{pool => p_load, timeout => 10000}) of
                 {error, {worker_exit, _}} -> {I, killed};
                 Other -> {I, {kill_answer, Other}}
             end;
         _ ->
             case erpy:call(operator, add, [I, C * 1000], #{pool => p_load, timeout => 10000}) of
                 {ok, V} when V =:= I + C * 1000 -> {I, ok};
                 Other -> {I, Other}
             end
     end || I <- lists:seq(1, N)].

%% ---- 12. venv + requirements -----------------------------------------------------------

%% A pool with venv + requirements installs a wheel the test builds, offline; a restart skips pip (stamp unchanged).
venv_requirements(Config) ->
    Priv = ?config(priv_dir, Config),
    WheelDir = filename:join(Priv, "wheels"),
    Venv = filename:join(Priv, "venv"),
    ok = filelib:ensure_dir(filename:join(WheelDir, "x")),
    build_wheel(WheelDir),
    Opts = #{size => 1, venv => Venv,
             requirements => ["--no-index", "--find-links", WheelDir, "mypkg"]},
    {T1, {ok, _}} = tc(fun() -> erpy:start_pool(p_venv, Opts) end),
    wait_ready(p_venv),
    ?assertEqual({ok, 84}, erpy:call('mypkg', f, [42], #{pool => p_venv, timeout => 5000})),
    {ok, Exe} = erpy:eval(<<"__import__('sys').executable">>, #{}, #{pool => p_venv}),
    ?assertEqual(filename:join([Venv, "bin", "python"]), binary_to_list(Exe)),
    Stamp = filename:join(Venv, ".erpy-requirements"),
    {ok, #file_info{mtime = Mtime}} = file:read_file_info(Stamp, [{time, posix}]),
    ok = erpy:stop_pool(p_venv),
    timer:sleep(1100),  % so a rewritten stamp would have a different mtime
    {T2, {ok, _}} = tc(fun() -> erpy:start_pool(p_venv, Opts) end),
    wait_ready(p_venv),
    ct:log("first start (venv + pip) ~p ms, restart ~p ms", [T1, T2]),
    ?assertMatch({ok, #file_info{mtime = Mtime}}, file:read_file_info(Stamp, [{time, posix}])),
    ?assert(T2 < 500, {pip_not_skipped, T2}),
    ?assertEqual({ok, 84}, erpy:call('mypkg', f, [42], #{pool => p_venv, timeout => 5000})).

build_wheel(Dir) ->
    Files = [{"mypkg/__init__.py", <<"def f(x):\n    return x * 2\n">>},
             {"mypkg-0.1.dist-info/METADATA",
              <<"Metadata-Version: 2.1\nName: mypkg\nVersion: 0.1\n">>},
             {"mypkg-0.1.dist-info/WHEEL",
              <<"Wheel-Version: 1.0\nGenerator: erpy-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n">>}],
    Record = [[Name, ",sha256=", urlsafe_b64(crypto:hash(sha256, Data)),
               ",", integer_to_list(byte_size(Data)), "\n"] || {Name, Data} <- Files],
    All = Files ++ [{"mypkg-0.1.dist-info/RECORD",
                     iolist_to_binary([Record, "mypkg-0.1.dist-info/RECORD,,\n"])}],
    Wheel = filename:join(Dir, "mypkg-0.1-py3-none-any.whl"),
    {ok, _} = zip:create(Wheel, All),
    ok.

%% ---- protocol version ----------------------------------------------------------------

%% A worker answering the handshake with another protocol version is refused, and restarts back off.
protocol_version(Config) ->
    %% priv is a link into the source tree, so its parent holds test/.
    Fake1 = filename:join([code:priv_dir(erpy), "..", "test", "py", "old_protocol_worker.py"]),
    true = filelib:is_regular(Fake1),
    LogDir = filename:join(?config(priv_dir, Config), "erpy_fake_log"),
    ok = filelib:ensure_dir(filename:join(LogDir, "x")),
    {ok, _} = erpy:start_pool(p_version, #{size => 1, python => Fake1, pythonpath => [LogDir]}),
    ?assertEqual({error, timeout}, erpy:eval(<<"1">>, #{}, #{pool => p_version, timeout => 1000})),
    #{ready := 0} = erpy_pool:info(p_version),
    {ok, Starts} = file:read_file(filename:join(LogDir, "starts")),
    N = length(binary:matches(Starts, <<"start">>)),
    ct:log("~p starts in about 1 s", [N]),
    ?assert(N >= 2),
    ?assert(N < 20),
    ok = erpy:stop_pool(p_version).

%% ---- helpers ---------------------------------------------------------------------------

%% Runs Fun, returns {Milliseconds, Result}.
tc(Fun) ->
    {Us, R} = timer:tc(Fun),
    {Us div 1000, R}.

urlsafe_b64(Bin) ->
    B = string:trim(base64:encode_to_string(Bin), trailing, "="),
    [case C of $+ -> $-; $/ -> $_; _ -> C end || C <- B].

start(Name, Opts) ->
    {ok, _} = erpy:start_pool(Name, Opts),
    wait_ready(Name).

wait_ready(Name) ->
    wait_until(fun() ->
                       #{ready := R, size := S} = erpy_pool:info(Name),
                       R =:= S
               end, 10000).

%% Ready and not lent out or releasing: the next request can go straight to a worker.
wait_idle(Name) ->
    wait_until(fun() -> maps:get(held, erpy_pool:info(Name)) =:= 0 end, 5000),
    timer:sleep(50).

worker_pids(Name) ->
    maps:get(worker_pids, erpy_pool:info(Name)).

wait_until(Fun, Ms) when Ms =< 0 ->
    ?assert(Fun());
wait_until(Fun, Ms) ->
    case Fun() of
        true -> ok;
        false -> timer:sleep(20), wait_until(Fun, Ms - 20)
    end.

ensure_python_path() ->
    Root = filename:dirname(code:priv_dir(erpy)),
    File = filename:join([Root, "priv", "python.path"]),
    case filelib:is_regular(File) of
        true -> ok;
        false -> file:write_file(File, "/usr/bin/python3\n")
    end.

%% ---- 13. the worker's process: its pipes, its children, its signals, its limits -------

%% A child forked without exec (os.fork) finds /dev/null on fds 3 and 4: garbage it writes and reads it tries change nothing, and erlang.* raise there.
fork_child_cannot_use_protocol(_Config) ->
    start(p_fork, #{size => 1}),
    O = #{pool => p_fork, timeout => 5000},
    try
        {ok, OsPid} = erpy:eval(<<"__import__('os').getpid()">>, #{}, O),
        Code = <<"import os\n"
                 "pid = os.fork()\n"
                 "if pid == 0:\n"
                 "    status = 0\n"
                 "    try:\n"
                 "        os.write(4, b'\\x00\\x00\\x00\\x07garbage' * 10)\n"
                 "        if os.read(3, 100) != b'':\n"
                 "            status |= 1\n"
                 "        try:\n"
                 "            erlang.call('lists', 'sort', [2, 1])\n"
                 "            status |= 2\n"
                 "        except erlang.ErlangPortError:\n"
                 "            pass\n"
                 "    except BaseException:\n"
                 "        status |= 4\n"
                 "    os._exit(status)\n"
                 "result = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])">>,
        ?assertEqual({ok, #{status => ok, result => 0}}, erpy:run(#{code => Code, pool => p_fork}, 5000)),
        [?assertEqual({ok, I * 2}, erpy:call(operator, mul, [I, 2], O)) || I <- lists:seq(1, 20)],
        ?assertEqual({ok, OsPid}, erpy:eval(<<"__import__('os').getpid()">>, #{}, O))
    after
        erpy:stop_pool(p_fork)
    end.

%% Code that writes its own frame to the protocol fd, claiming more than the limit (up to
%% 4 GiB), is refused when the header arrives: the VM never buffers the claimed frame
%% (with the driver's {packet, 4} it allocated and filled it, and the call hung). The
%% request fails as too large, the worker is replaced, and the VM's memory stays put.
forged_frame_header_refused(_Config) ->
    Max = 1 bsl 20,
    start(p_forge, #{size => 1, max_message_size => Max}),
    O = #{pool => p_forge, timeout => 10000},
    try
        Before = erlang:memory(total),
        Code = <<"import os, struct\n"
                 "chunk = b'x' * (1 << 20)\n"
                 "os.write(4, struct.pack('>I', 0xFFFFFFF0))\n"
                 "for _ in range(64):\n"
                 "    os.write(4, chunk)\n"
                 "result = 1">>,
        T0 = erlang:monotonic_time(millisecond),
        ?assertEqual({error, {message_too_large, 16#FFFFFFF0, Max}},
                     erpy:run(#{code => Code, pool => p_forge}, 10000)),
        ?assert(erlang:monotonic_time(millisecond) - T0 < 5000),
        ?assert(erlang:memory(total) - Before < 32 bsl 20),
        wait_ready(p_forge),
        [?assertEqual({ok, I * 2}, erpy:call(operator, mul, [I, 2], O)) || I <- lists:seq(1, 20)]
    after
        erpy:stop_pool(p_forge)
    end.

%% The same for a program pool (`program => {python_script, _}`) with 4-byte headers.
program_frame_header_refused(Config) ->
    Script = filename:join(?config(priv_dir, Config), "forger.py"),
    ok = file:write_file(Script, <<"import os, struct, sys\n"
                                   "while True:\n"
                                   "    n = os.read(0, 4)\n"
                                   "    if len(n) < 4:\n"
                                   "        sys.exit(0)\n"
                                   "    body = os.read(0, struct.unpack('>I', n)[0])\n"
                                   "    if body.endswith(b'forge'):\n"
                                   "        os.write(1, struct.pack('>I', 0xFFFFFFF0))\n"
                                   "        for _ in range(64):\n"
                                   "            os.write(1, b'x' * (1 << 20))\n"
                                   "    else:\n"
                                   "        os.write(1, n + body)\n">>),
    Max = 1 bsl 20,
    {ok, _} = erpy:start_pool(p_forge_prog, #{program => {python_script, Script}, size => 1,
                                              max_message_size => Max}),
    try
        Before = erlang:memory(total),
        Echo = erpy_port_program:call(p_forge_prog, {echo, 1}, 5000),
        ?assertEqual({ok, {echo, 1}}, Echo),
        ?assertEqual({error, {message_too_large, 16#FFFFFFF0, Max}},
                     erpy_port_program:call(p_forge_prog, forge, 5000)),
        ?assert(erlang:memory(total) - Before < 32 bsl 20),
        ?assertEqual({ok, {echo, 2}}, retry_send(p_forge_prog, {echo, 2}, 50))
    after
        erpy:stop_pool(p_forge_prog)
    end.

retry_send(Pool, Term, 0) ->
    erpy_port_program:call(Pool, Term, 5000);
retry_send(Pool, Term, N) ->
    case erpy_port_program:call(Pool, Term, 5000) of
        {ok, _} = Ok -> Ok;
        _ -> timer:sleep(100), retry_send(Pool, Term, N - 1)
    end.

%% Exec'd children (subprocess with close_fds=False, os.system) do not even have fds 3 and 4: the protocol is untouched.
exec_child_has_no_protocol_fds(_Config) ->
    start(p_exec, #{size => 1}),
    O = #{pool => p_exec, timeout => 5000},
    try
        {ok, OsPid} = erpy:eval(<<"__import__('os').getpid()">>, #{}, O),
        Code = <<"import subprocess, sys\n"
                 "probe = 'import os\\nfor fd in (3, 4):\\n    try:\\n        os.fstat(fd)\\n        print(fd)\\n"
                 "    except OSError:\\n        pass'\n"
                 "p = subprocess.run([sys.executable, '-c', probe], close_fds=False, capture_output=True, text=True)\n"
                 "result = p.stdout.split()">>,
        ?assertEqual({ok, #{status => ok, result => []}}, erpy:run(#{code => Code, pool => p_exec}, 5000)),
        %% Would write garbage into the answers and swallow the next requests if it could.
        {ok, Status} = erpy:eval(<<"__import__('os').system('printf garbage >&4; cat <&3')">>, #{}, O),
        ?assertNotEqual(0, Status),
        [?assertEqual({ok, I + 1}, erpy:call(operator, add, [I, 1], O)) || I <- lists:seq(1, 20)],
        ?assertEqual({ok, OsPid}, erpy:eval(<<"__import__('os').getpid()">>, #{}, O))
    after
        erpy:stop_pool(p_exec)
    end.

%% A multiprocessing pool with the fork start method works inside a worker and leaves the protocol intact.
multiprocessing_fork_pool(_Config) ->
    start(p_mp, #{size => 1}),
    O = #{pool => p_mp, timeout => 20000},
    try
        {ok, OsPid} = erpy:eval(<<"__import__('os').getpid()">>, #{}, O),
        Code = <<"import multiprocessing, operator\n"
                 "with multiprocessing.get_context('fork').Pool(3) as p:\n"
                 "    result = sum(p.map(operator.neg, range(1000)))\n"
                 "    print('from the pool', flush=True)">>,
        [?assertEqual({ok, #{status => ok, result => -499500}},
                      erpy:run(#{code => Code, pool => p_mp}, 20000)) || _ <- lists:seq(1, 3)],
        [?assertEqual({ok, I + 1}, erpy:call(operator, add, [I, 1], O)) || I <- lists:seq(1, 20)],
        ?assertEqual({ok, OsPid}, erpy:eval(<<"__import__('os').getpid()">>, #{}, O))
    after
        erpy:stop_pool(p_mp)
    end.

%% os.system('sleep 20 &') then a crash (os._exit, a segfault): the caller hears worker_exit at once, the pool is full again within ~1-2 s, and the sleep is gone with the worker's process group.
background_child_then_crash(Config) ->
    Dir = ?config(priv_dir, Config),
    Crashes = [<<"import os\nos._exit(1)">>, <<"import ctypes\nctypes.string_at(0)">>],
    lists:foreach(
      fun({N, Crash}) ->
              File = filename:join(Dir, "bg_child_" ++ integer_to_list(N)),
              Code = iolist_to_binary(
                       ["import os\n",
                        "os.system('sleep 20 & echo $! > ", File, "')\n",
                        Crash]),
              crash_with_child(p_bgchild, Code, File)
      end, lists:zip(lists:seq(1, length(Crashes)), Crashes)).

%% A child that holds a copy of the worker's pipe keeps the port open after the worker dies: the dead worker is seen by its OS pid all the same, in its group or out of it.
child_holding_pipe_then_crash(Config) ->
    Dir = ?config(priv_dir, Config),
    lists:foreach(
      fun(NewSession) ->
              File = filename:join(Dir, "holder_" ++ atom_to_list(NewSession)),
              Code = iolist_to_binary(
                       ["import os, subprocess\n",
                        "fds = [os.dup(3), os.dup(4), os.dup(1)]\n",
                        "p = subprocess.Popen(['sleep', '20'], pass_fds=fds, start_new_session=",
                        case NewSession of true -> "True"; false -> "False" end, ")\n",
                        "open('", File, "', 'w').write(str(p.pid))\n",
                        "os._exit(1)"]),
              crash_with_child(p_holder, Code, File)
      end, [false, true]).

%% Starts a pool of 2, runs Code (which leaves a child whose pid is in File, then crashes
%% the worker) and checks the pool's recovery. A child that left the worker's process
%% group (its own session) survives the worker; the test ends it.
crash_with_child(Pool, Code, File) ->
    start(Pool, #{size => 2}),
    try
        Before = worker_pids(Pool),
        {T, R} = tc(fun() -> erpy:run(#{code => Code, pool => Pool}, 15000) end),
        ct:log("crash answer after ~p ms: ~p", [T, R]),
        ?assertMatch({error, {worker_exit, _}}, R),
        ?assert(T < 2500, {slow_crash_answer, T}),
        {T2, R2} = tc(fun() -> erpy:eval(<<"1 + 1">>, #{}, #{pool => Pool, timeout => 5000}) end),
        ?assertEqual({ok, 2}, R2),
        ?assert(T2 < 2000, {slow_next_call, T2}),
        wait_until(fun() ->
                           #{ready := Ready, size := Size} = erpy_pool:info(Pool),
                           Ready =:= Size andalso length(worker_pids(Pool) -- Before) =:= 1
                   end, 3000),
        [?assertEqual({ok, I + 1}, erpy:call(operator, add, [I, 1], #{pool => Pool, timeout => 2000}))
         || I <- lists:seq(1, 10)],
        {ok, PidText} = file:read_file(File),
        ChildPid = string:trim(binary_to_list(PidText)),
        Sid = string:trim(os:cmd("ps -o sid= -p " ++ ChildPid)),
        case Sid of
            ChildPid -> os:cmd("kill -KILL " ++ ChildPid);  % its own session: out of reach
            _ -> wait_until(fun() -> not child_alive(ChildPid) end, 2000)
        end
    after
        erpy:stop_pool(Pool)
    end.

%% Gone, or a zombie nobody reaped yet.
child_alive(Pid) ->
    case string:trim(os:cmd("ps -o stat= -p " ++ Pid)) of
        "" -> false;
        [$Z | _] -> false;
        _ -> true
    end.

%% In a VM started with SIGINT ignored (inherited by its port programs), a timed-out call is still interrupted in place: port mode (same OS pid), embedded mode (same context thread) and node mode (same Python node).
timeouts_with_sigint_ignored(_Config) ->
    _ = os:cmd("epmd -daemon"),
    Paths = [filename:dirname(code:which(M)) || M <- [erpy, ?MODULE]],
    Host = "127.0.0.1",
    {ok, Peer, _Node} = peer:start_link(#{name => peer:random_name(sigint), host => Host, longnames => true,
                                          connection => standard_io,
                                          exec => {"/bin/sh", ["-c", "trap '' INT; exec erl +Bi \"$@\"", "sh"]},
                                          args => lists:append([["-pa", P] || P <- Paths])}),
    try
        [begin
             R = peer:call(Peer, ?MODULE, sigint_probe, [Mode], 30000),
             ct:log("~p: ~p", [Mode, R]),
             ?assertMatch(#{timeout := {error, timeout}, after_timeout := {ok, _}, same := true}, R),
             ?assert(maps:get(ms, R) < 1500, {slow, Mode, R})
         end || Mode <- [port, embedded, node]],
        ?assertEqual(true, peer:call(Peer, ?MODULE, sigint_probe, [sigint_ignored_in_worker])),
        %% The pools' Pythons leave before the peer does (a node's would complain).
        ok = peer:call(Peer, application, stop, [erpy], 30000)
    after
        peer:stop(Peer)
    end.

sigint_probe(sigint_ignored_in_worker) ->
    %% The condition under test really holds: the port worker inherited SIG_IGN for SIGINT.
    {ok, Ign} = erpy:eval(<<"__import__('signal').getsignal(2) == __import__('signal').SIG_IGN">>, #{},
                          #{pool => p_sigint}),
    Ign;
sigint_probe(Mode) ->
    {ok, _} = application:ensure_all_started(erpy),
    {Pool, Opts, Id, Work} =
        case Mode of
            port -> {p_sigint, #{size => 1, kill_grace_ms => 10000},
                     <<"__import__('os').getpid()">>, <<"import time\ntime.sleep(20)">>};
            embedded -> {p_sigint_emb, #{mode => embedded, size => 1},
                         <<"__import__('threading').get_ident()">>, <<"while True: pass">>};
            node -> {p_sigint_node, #{mode => node, start => 1},
                     <<"__import__('os').getpid()">>, <<"while True: pass">>}
        end,
    {ok, _} = erpy:start_pool(Pool, Opts),
    O = #{pool => Pool, timeout => 10000},
    {ok, Before} = wait_answer(fun() -> erpy:eval(Id, #{}, O) end, 100),
    T0 = erlang:monotonic_time(millisecond),
    Timeout = erpy:exec(Work, O#{timeout => 300}),
    After = erpy:eval(Id, #{}, O),
    #{timeout => Timeout, after_timeout => After, same => After =:= {ok, Before},
      ms => erlang:monotonic_time(millisecond) - T0}.

wait_answer(Fun, 0) ->
    Fun();
wait_answer(Fun, N) ->
    case Fun() of
        {ok, _} = Ok -> Ok;
        _ -> timer:sleep(100), wait_answer(Fun, N - 1)
    end.

%% rlimits => #{cpu => Seconds}: a worker over its CPU time dies, its caller gets worker_exit, and the pool replaces it.
rlimits_cpu(_Config) ->
    start(p_cpu, #{size => 1, rlimits => #{cpu => 1}}),
    try
        [W] = worker_pids(p_cpu),
        ?assertEqual({ok, [1, 1]}, erpy:eval(<<"list(__import__('resource').getrlimit(__import__('resource').RLIMIT_CPU))">>,
                                             #{}, #{pool => p_cpu})),
        R = erpy:exec(<<"while True: pass">>, #{pool => p_cpu, timeout => 20000}),
        ct:log("over the CPU limit: ~p", [R]),
        ?assertMatch({error, {worker_exit, _}}, R),
        wait_until(fun() -> maps:get(ready, erpy_pool:info(p_cpu)) =:= 1 andalso worker_pids(p_cpu) =/= [W] end, 5000),
        ?assertEqual({ok, 2}, erpy:eval(<<"1 + 1">>, #{}, #{pool => p_cpu}))
    after
        erpy:stop_pool(p_cpu)
    end.

%% rlimits => #{as => Bytes}: an allocation beyond it is a MemoryError in Python, and the same worker goes on.
rlimits_as(_Config) ->
    start(p_as, #{size => 1, rlimits => #{as => 1 bsl 30}}),
    O = #{pool => p_as, timeout => 10000},
    try
        {ok, OsPid} = erpy:eval(<<"__import__('os').getpid()">>, #{}, O),
        ?assertMatch({error, #{type := <<"MemoryError">>}}, erpy:eval(<<"len(b'x' * (2 << 30))">>, #{}, O)),
        ?assertEqual({ok, 1 bsl 20}, erpy:eval(<<"len(b'x' * (1 << 20))">>, #{}, O)),
        ?assertEqual({ok, OsPid}, erpy:eval(<<"__import__('os').getpid()">>, #{}, O))
    after
        erpy:stop_pool(p_as)
    end.

%% rlimits => #{nofile => N}: opening more files is an OSError (EMFILE) in Python; the worker goes on.
rlimits_nofile(_Config) ->
    start(p_nofile, #{size => 1, rlimits => #{nofile => 32}}),
    O = #{pool => p_nofile, timeout => 10000},
    try
        {error, #{type := <<"OSError">>, message := Msg}} =
            erpy:exec(<<"fs = [open('/dev/null') for _ in range(100)]">>, O),
        ?assertNotEqual(nomatch, string:find(Msg, <<"Too many open files">>)),
        ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], O))
    after
        erpy:stop_pool(p_nofile)
    end.

%% rlimits fsize (writing beyond: OSError, EFBIG), nproc and core are set as soft and hard limits; user code cannot raise them (unless root).
rlimits_fsize_nproc_core(Config) ->
    Limits = #{fsize => 4096, nproc => 2000, core => 0},
    start(p_fsize, #{size => 1, rlimits => Limits}),
    O = #{pool => p_fsize, timeout => 10000},
    File = filename:join(?config(priv_dir, Config), "fsize_probe"),
    try
        [?assertEqual({ok, [V, V]},
                      erpy:eval(<<"list(__import__('resource').getrlimit(getattr(__import__('resource'), n)))">>,
                                #{n => <<"RLIMIT_", (string:uppercase(atom_to_binary(K)))/binary>>}, O))
         || {K, V} <- maps:to_list(Limits)],
        {error, #{type := <<"OSError">>, message := Msg}} =
            erpy:eval(<<"open(path, 'wb').write(b'x' * 10000)">>, #{path => unicode:characters_to_binary(File)}, O),
        ?assertNotEqual(nomatch, string:find(Msg, <<"File too large">>)),
        ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], O))
    after
        erpy:stop_pool(p_fsize)
    end.

%% A bad rlimits option is the start_pool caller's clear error.
rlimits_badarg(_Config) ->
    ?assertEqual({error, {badarg, {rlimits, 5}}}, erpy:start_pool(p_bad, #{rlimits => 5})),
    ?assertEqual({error, {badarg, {rlimits, {bogus, 1}}}}, erpy:start_pool(p_bad, #{rlimits => #{bogus => 1}})),
    ?assertEqual({error, {badarg, {rlimits, {cpu, -1}}}}, erpy:start_pool(p_bad, #{rlimits => #{cpu => -1}})),
    ?assertEqual({error, {badarg, {rlimits, {as, 1.5}}}}, erpy:start_pool(p_bad, #{rlimits => #{as => 1.5}})),
    ?assertEqual({error, {badarg, {rlimits, {mode, embedded}}}},
                 erpy:start_pool(p_bad, #{mode => embedded, rlimits => #{cpu => 1}})),
    %% infinity: as high as the worker may set it (its hard limit).
    start(p_bad, #{size => 1, rlimits => #{core => infinity}}),
    erpy:stop_pool(p_bad).

%% What a worker's code started ends with the worker: when the pool stops (after kill_grace_ms), and when a hung request gets its worker killed.
children_end_with_their_worker(Config) ->
    Dir = ?config(priv_dir, Config),
    Spawn = fun(Pool, Name) ->
                    File = filename:join(Dir, Name),
                    ok = erpy:exec(iolist_to_binary(
                                          ["import subprocess\n",
                                           "p = subprocess.Popen(['sleep', '30'])\n",
                                           "open('", File, "', 'w').write(str(p.pid))"]),
                                        #{pool => Pool, timeout => 5000}),
                    {ok, Pid} = file:read_file(File),
                    ChildPid = binary_to_list(Pid),
                    ?assert(child_alive(ChildPid)),
                    ChildPid
            end,
    start(p_children, #{size => 1, kill_grace_ms => 300}),
    Idle = Spawn(p_children, "idle_child"),
    ok = erpy:stop_pool(p_children),
    wait_until(fun() -> not child_alive(Idle) end, 3000),
    start(p_children, #{size => 1, kill_grace_ms => 300}),
    try
        Busy = Spawn(p_children, "busy_child"),
        Hang = <<"import time\nwhile True:\n    try:\n        time.sleep(1)\n"
                 "    except KeyboardInterrupt:\n        pass">>,
        ?assertEqual({error, timeout}, erpy:exec(Hang, #{pool => p_children, timeout => 200})),
        wait_until(fun() -> not child_alive(Busy) end, 3000)
    after
        erpy:stop_pool(p_children)
    end.

%% ---- map keys (issue 10) -------------------------------------------------------------------

%% Map keys Python cannot hash (strings, lists, maps, improper lists) reach a worker as erpy.FrozenList/FrozenMap/FrozenImproperList and come back equal.
map_keys(_Config) ->
    start(p_keys, #{size => 1}),
    try
        O = #{pool => p_keys},
        Terms = [#{"name" => 1}, #{[1, [2]] => x}, #{#{a => 1} => b}, #{[] => 1, {[1], 2} => 2},
                 #{[1 | 2] => 3}, #{#{[1] => [2]} => 3}, #{a => #{"k" => "v"}},
                 maps:from_list([{[I], I} || I <- lists:seq(1, 40)])],
        [?assertEqual({ok, T}, erpy:eval(<<"x">>, #{x => T}, O)) || T <- Terms],
        ?assertEqual({ok, [<<"FrozenList">>, <<"FrozenMap">>, <<"FrozenImproperList">>]},
                     erpy:eval(<<"[type(next(iter(k))).__name__ for k in (a, b, c)]">>,
                               #{a => #{"name" => 1}, b => #{#{a => 1} => b}, c => #{[1 | 2] => 3}}, O)),
        %% Python code makes such keys for Erlang.
        ?assertEqual({ok, #{status => ok, result => #{"name" => 1, #{1 => [2]} => 2}}},
                     erpy:run(#{code => <<"import erpy as e\n"
                                          "result = {e.FrozenList(b'name'): 1, e.freeze({1: [2]}): 2}">>,
                                pool => p_keys}))
    after
        erpy:stop_pool(p_keys)
    end.

%% Map keys that are different terms but equal in Python (1 and 1.0, true and 1, ok and <<"ok">>, [1] and [1.0], inside keys too) reach a worker as erpy.Key and come back =:=.
keys_equal_in_python(_Config) ->
    start(p_keys, #{size => 1}),
    try
        O = #{pool => p_keys},
        Terms = [#{1 => a, 1.0 => b}, #{ok => 1, <<"ok">> => 2}, #{true => 1, 1 => 2},
                 #{true => a, 1 => b, 1.0 => c, 2 => d}, #{[1] => a, [1.0] => b},
                 #{{a} => 1, {<<"a">>} => 2}, #{#{1 => a} => x, #{1.0 => a} => y},
                 #{#{1 => a, 1.0 => b} => x}, #{m => [#{ok => 1, <<"ok">> => 2}]},
                 maps:from_list([{list_to_atom("k" ++ integer_to_list(I)), I} || I <- lists:seq(1, 30)]
                                ++ [{list_to_binary("k" ++ integer_to_list(I)), -I} || I <- lists:seq(1, 30)])],
        [?assertEqual({ok, T}, erpy:eval(<<"x">>, #{x => T}, O)) || T <- Terms],
        ?assertEqual({ok, #{status => ok, result => {[<<"Key">>, <<"Key">>, <<"int">>], b, c}}},
                     erpy:run(#{code => <<"from erpy import Key as K\n"
                                          "x = arguments\n"
                                          "result = (sorted(type(k).__name__ for k in x), x[K(1)], x[K(1.0)])">>,
                                arguments => #{1 => b, 1.0 => c, 2 => d}, pool => p_keys})),
        ?assertEqual({ok, #{status => ok, result => #{1 => <<"a">>, 1.0 => <<"b">>, ok => 1, <<"ok">> => 2}}},
                     erpy:run(#{code => <<"from erpy import Key as K, Atom as A\n"
                                          "result = {K(1): 'a', K(1.0): 'b', K(A('ok')): 1, K('ok'): 2}">>,
                                pool => p_keys}))
    after
        erpy:stop_pool(p_keys)
    end.

%% A checked-out worker's requests queue behind each other in Python (written ahead) but
%% are never withdrawn: they have no other worker to go to.
checked_out_requests_never_withdrawn(_Config) ->
    start(p_held, #{size => 1}),
    {ok, W} = erpy:checkout(p_held, 2000),
    Self = self(),
    Slow = spawn_link(fun() ->
                              Self ! {slow, erpy:eval(<<"__import__('time').sleep(0.2) or 'slow'">>, #{},
                                                      #{worker => W, timeout => 5000})}
                      end),
    timer:sleep(20),
    Quick = [spawn_link(fun() -> Self ! {quick, I, erpy:eval(<<"n">>, #{<<"n">> => I},
                                                             #{worker => W, timeout => 5000})} end)
             || I <- lists:seq(1, 3)],
    ?assertEqual({ok, <<"slow">>}, receive {slow, R} -> R after 5000 -> ct:fail({lost, Slow}) end),
    [?assertEqual({ok, I}, receive {quick, I, R} -> R after 5000 -> ct:fail({lost, I}) end)
     || {I, _} <- lists:zip(lists:seq(1, 3), Quick)],
    ok = erpy:checkin(W),
    erpy:stop_pool(p_held).
