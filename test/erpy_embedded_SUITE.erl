%% Embedded mode end to end (issue 5): CPython inside this VM through the NIF. The same
%% API, errors and type mapping as port mode; timeouts that interrupt and leave the
%% context usable; callbacks that nest; handles; checkout; schedulers that stay free while
%% Python works; NIF reload; application restart.
-module(erpy_embedded_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([seed_examples/1, api_calls/1, same_mapping_as_port/1, errors/1,
         timeout_interrupts/1, stuck_in_c_replaced/1, caller_dies/1, concurrent_mix/1, concurrent_timeouts/1,
         long_calls_watched/1, stop_pool_in_flight/1,
         nested_callbacks/1,
         allow_list/1, send_and_self/1, handles/1, handles_no_leak/1, checkout_state/1,
         checkout_holder_dies/1, output_to_logger/1, schedulers_stay_free/1,
         nif_reload/1, python_info/1, app_restart/1, queueing_in_order/1,
         large_binaries/1, busy_core/1]).
-export([map_keys/1, deep_nesting/1, result_size_limit/1, callback_size_limit/1,
         no_new_atoms/1, new_atoms_budget/1, flags_for_checks/1, send_is_a_callback/1,
         keys_equal_in_python/1]).
-export([async_stop_pool/1, async_callbacks_unawaited/1, async_cancel_and_death/1,
         async_held_worker/1]).
%% Called from Python through the allow-list, and the logger handler.
-export([nested/2, deeper/1, log/2, give_fun/1]).

-define(P, emb).
%% What Python sees, as text: types and values, dicts in a sorted order (a map's
%% iteration order is not part of the mapping).
-define(CANON, <<"def c(v):\n"
                 "    t = type(v)\n"
                 "    if t is dict:\n"
                 "        return '{' + ','.join(sorted(c(k) + ':' + c(w) for k, w in v.items())) + '}'\n"
                 "    if t in (list, tuple):\n"
                 "        return t.__name__ + '(' + ','.join(c(w) for w in v) + ')'\n"
                 "    if t.__name__ == 'ImproperList':\n"
                 "        return 'IL(' + c(v.elements) + '|' + c(v.tail) + ')'\n"
                 "    return t.__name__ + ':' + repr(v)\n"
                 "result = c(arguments)\n">>).

all() ->
    [seed_examples, api_calls, same_mapping_as_port, errors, timeout_interrupts,
     stuck_in_c_replaced, caller_dies, concurrent_mix, busy_core, concurrent_timeouts, long_calls_watched, stop_pool_in_flight,
     nested_callbacks, allow_list, send_and_self,
     handles,
     handles_no_leak, checkout_state, checkout_holder_dies, output_to_logger,
     schedulers_stay_free, queueing_in_order, large_binaries, python_info, nif_reload,
     app_restart,
     map_keys, deep_nesting, result_size_limit, callback_size_limit, no_new_atoms,
     new_atoms_budget, flags_for_checks, send_is_a_callback, keys_equal_in_python,
     async_stop_pool, async_callbacks_unawaited, async_cancel_and_death, async_held_worker].

suite() ->
    [{timetrap, {seconds, 90}}].

init_per_suite(Config) ->
    %% The port pool of same_mapping_as_port needs the interpreter file `make` writes.
    ok = erpy_test_env:start_erpy(),
    Config.

end_per_suite(_Config) ->
    application:stop(erpy),
    application:unload(erpy),
    ok.

init_per_testcase(_Case, Config) ->
    {ok, _} = erpy:start_pool(?P, #{mode => embedded, size => 4,
                                    allowed => [lists, {erlang, abs}, {?MODULE, nested, 2},
                                                {?MODULE, deeper, 1}],
                                    send_allowed => [erpy_emb_test_name, nobody_has_this_name]}),
    Config.

end_per_testcase(_Case, _Config) ->
    [erpy:stop_pool(P) || P <- [?P, emb_one, emb_port, emb_q, emb_nospin]],
    ok.

opts() -> #{pool => ?P}.
opts(More) -> maps:merge(opts(), More).

%% ---- the seed's contract and the API -------------------------------------------------

%% erl_py_runner's examples give the same shapes in embedded mode as in port mode.
seed_examples(_Config) ->
    ?assertEqual({ok, #{status => ok, result => 6}},
                 erpy:run(#{code => <<"result = sum(arguments)">>, arguments => [1, 2, 3], pool => ?P})),
    ?assertEqual({ok, #{status => ok, result => [1, 5, 9]}},
                 erpy:run(#{code => <<"result = erlang.call('lists', 'sort', [9, 1, 5])">>, pool => ?P})),
    {ok, #{status := error, error := #{type := <<"ZeroDivisionError">>, message := <<"division by zero">>,
                                       traceback := [_ | _]}}} =
        erpy:run(#{code => <<"result = 1 / 0">>, pool => ?P}),
    ?assertEqual({error, timeout},
                 erpy:run(#{code => <<"while True: pass">>, pool => ?P}, 100)),
    ?assertEqual({ok, #{status => ok, result => undefined}}, erpy:run(#{code => <<"x = 1">>, pool => ?P})).

%% call/eval/exec with kwargs, locals, dotted names; exec namespaces are fresh per call.
api_calls(_Config) ->
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], opts())),
    ?assertEqual({ok, <<"a/b">>}, erpy:call(<<"os.path">>, join, [<<"a">>, <<"b">>],
                                             opts(#{kwargs => #{}}))),
    ?assertEqual({ok, <<"1,2">>}, erpy:call(builtins, 'str.join', [<<",">>, [<<"1">>, <<"2">>]], opts())),
    ?assertEqual({ok, [3, 2, 1]}, erpy:call(builtins, sorted, [[1, 3, 2]], opts(#{kwargs => #{reverse => true}}))),
    ?assertEqual({ok, 42}, erpy:eval(<<"a * b">>, #{a => 6, b => 7}, opts())),
    ?assertEqual(ok, erpy:exec(<<"y = 1">>, opts())),
    {error, #{type := <<"NameError">>}} = erpy:eval(<<"y">>, #{}, opts()),
    ?assertEqual({error, {badarg, module}}, erpy:call(42, f, [], opts())),
    {error, #{type := <<"ModuleNotFoundError">>}} = erpy:call(no_such_module_xyz, f, [], opts()),
    ?assertEqual({error, {no_pool, nope}}, erpy:call(operator, add, [1, 2], #{pool => nope})).

%% Every kind of term comes back exact, and Python sees it as port mode's worker does.
same_mapping_as_port(_Config) ->
    {ok, _} = erpy:start_pool(emb_port, #{mode => port, size => 1}),
    erpy_term_gen:seed(5),
    Kinds = erpy_term_gen:kinds() -- [big_map],
    Terms = [erpy_term_gen:term(K) || K <- Kinds, _ <- lists:seq(1, 40)],
    wait_port_ready(emb_port),
    lists:foreach(
      fun(T) ->
              ?assertEqual({ok, T}, erpy:eval(<<"x">>, #{x => T}, opts())),
              Req = #{code => ?CANON, arguments => T},
              ?assertEqual(erpy:run(Req#{pool => emb_port}), erpy:run(Req#{pool => ?P}))
      end, Terms),
    %% Big maps: same content (iteration order may differ).
    [begin
         M = erpy_term_gen:term(big_map),
         ?assertEqual({ok, M}, erpy:eval(<<"x">>, #{x => M}, opts()))
     end || _ <- lists:seq(1, 20)],
    ?assertEqual({ok, {<<"abc">>, <<255, 0>>, 'héllo', 'ünïcødé_アトム'}},
                 erpy:eval(<<"(x, y, z, w)">>, #{x => <<"abc">>, y => <<255, 0>>, z => 'héllo',
                                                  w => 'ünïcødé_アトム'}, opts())),
    ?assertEqual({ok, [<<"str">>, <<"bytes">>, <<"Atom">>, <<"Atom">>, <<"NoneType">>, <<"bool">>]},
                 erpy:eval(<<"[type(v).__name__ for v in (x, y, z, w, n, b)]">>,
                           #{x => <<"abc">>, y => <<255>>, z => 'héllo', w => 'ünïcødé_アトム',
                             n => undefined, b => true}, opts())).

%% Python exceptions, unencodable results and bad requests become error terms.
errors(_Config) ->
    {error, #{type := <<"ValueError">>, message := <<"boom">>, traceback := TB}} =
        erpy:exec(<<"raise ValueError('boom')">>, opts()),
    ?assert(lists:any(fun(L) -> binary:match(L, <<"ValueError: boom">>) =/= nomatch end, TB)),
    {error, #{type := <<"EncodeError">>}} = erpy:eval(<<"object()">>, #{}, opts()),
    {error, #{type := <<"EncodeError">>}} = erpy:eval(<<"float('nan')">>, #{}, opts()),
    {error, #{type := <<"SyntaxError">>}} = erpy:eval(<<"1 +">>, #{}, opts()),
    %% A map key Python cannot hash comes back as it went (issue 10: an erpy.FrozenList).
    ?assertEqual({ok, #{[1] => 2}}, erpy:eval(<<"x">>, #{x => #{[1] => 2}}, opts())),
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], opts())).

%% ---- timeouts and cancellation ---------------------------------------------------------

%% A timeout interrupts running Python code (also code that catches Exception), answers {error, timeout} on time and leaves the context usable.
timeout_interrupts(_Config) ->
    {ok, _} = erpy:start_pool(emb_one, #{mode => embedded, size => 1}),
    O = #{pool => emb_one, timeout => 150},
    {T, R} = timer:tc(fun() -> erpy:exec(<<"while True: pass">>, O) end),
    ?assertEqual({error, timeout}, R),
    ?assert(T < 1000000, T),
    ?assertEqual({error, timeout},
                 erpy:exec(<<"try:\n    while True: pass\nexcept Exception:\n    pass\n">>, O)),
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], #{pool => emb_one, timeout => 2000})),
    %% A request that waited in the queue past its deadline never runs.
    Self = self(),
    spawn_link(fun() -> Self ! {slow, erpy:eval(<<"__import__('time').sleep(0.3)">>, #{}, #{pool => emb_one})} end),
    timer:sleep(50),
    ?assertEqual({error, timeout}, erpy:exec(<<"import builtins; builtins.ran_late = True">>,
                                             #{pool => emb_one, timeout => 50})),
    receive {slow, S} -> ?assertEqual({ok, undefined}, S) end,
    ?assertEqual({ok, false}, erpy:eval(<<"hasattr(__import__('builtins'), 'ran_late')">>, #{},
                                        #{pool => emb_one})),
    %% No late answer reaches the mailbox.
    receive Late -> ct:fail({late_message, Late}) after 200 -> ok end.

%% A call blocked in a C function that releases the GIL (time.sleep here, a read in life)
%% cannot take an interrupt until it returns: kill_grace_ms after its timeout the context
%% gets a fresh thread, so the pool keeps serving; the old thread ends when the call
%% returns. A held context keeps its thread (its namespace is its holder's).
stuck_in_c_replaced(_Config) ->
    {ok, _} = erpy:start_pool(emb_one, #{mode => embedded, size => 1, kill_grace_ms => 200}),
    {ok, erpy_embedded, #{pool := Pool}} = erpy_transport:lookup(emb_one),
    Threads = length(context_threads()),
    ?assertEqual({error, timeout}, erpy:call(time, sleep, [3], #{pool => emb_one, timeout => 100})),
    %% Queued behind the stuck call, answered once the context is replaced (not after 3 s).
    {T, R} = timer:tc(fun() -> erpy:call(operator, add, [1, 2], #{pool => emb_one, timeout => 2500}) end),
    ?assertEqual({ok, 3}, R),
    ?assert(T < 2000000, T),
    ?assertMatch(#{replaced := 1, stuck := 1, size := 1}, erpy_nif:pool_info(Pool)),
    %% Its state is gone with the thread's call, the new one works as any context.
    ?assertEqual({ok, 5}, erpy:eval(<<"2 + 3">>, #{}, #{pool => emb_one})),
    %% The old thread ends once time.sleep returns (and takes the interrupt then).
    ok = wait_until(fun() -> maps:get(stuck, erpy_nif:pool_info(Pool)) =:= 0 end, 6000),
    ?assertEqual(Threads, length(context_threads())),
    %% Held: not replaced, the holder's call times out and the context stays with it.
    {ok, W} = erpy:checkout(emb_one),
    ?assertEqual({error, timeout}, erpy:call(time, sleep, [1], #{worker => W, timeout => 100})),
    timer:sleep(500),
    ?assertMatch(#{replaced := 1, held := 1}, erpy_nif:pool_info(Pool)),
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], #{worker => W, timeout => 3000})),
    ok = erpy:checkin(W),
    receive Late -> ct:fail({late_message, Late}) after 100 -> ok end.

context_threads() ->
    Dir = "/proc/" ++ os:getpid() ++ "/task",
    {ok, Tasks} = file:list_dir(Dir),
    [T || T <- Tasks,
          case file:read_file(filename:join([Dir, T, "comm"])) of
              {ok, <<"erpy_ctx_", _/binary>>} -> true;
              _ -> false
          end].

%% A caller that dies mid-call has its Python interrupted and the context freed.
caller_dies(_Config) ->
    {ok, _} = erpy:start_pool(emb_one, #{mode => embedded, size => 1}),
    Pid = spawn(fun() -> erpy:exec(<<"while True: pass">>, #{pool => emb_one, timeout => infinity}) end),
    timer:sleep(100),
    exit(Pid, kill),
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], #{pool => emb_one, timeout => 3000})).

%% 8 concurrent callers mix fast calls, slow calls, timeouts and exceptions: every answer is the right one and none is lost.
concurrent_mix(_Config) ->
    Self = self(),
    N = 40,
    Pids = [spawn_link(fun() -> Self ! {done, C, [mix(C, I) || I <- lists:seq(1, N)]} end)
            || C <- lists:seq(1, 8)],
    Results = [receive {done, C, Rs} -> {C, Rs} after 60000 -> ct:fail(lost) end
               || C <- lists:seq(1, length(Pids))],
    lists:foreach(
      fun({C, Rs}) ->
              lists:foreach(fun({I, R}) -> check_mix(C, I, R) end, lists:zip(lists:seq(1, N), Rs))
      end, Results),
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], opts())).

%% With one core held by a busy loop (waiters that spin adapt and block), and with spinning off (spin_us => 0), every call, callback and timeout of a concurrent mix still gets its own answer.
busy_core(_Config) ->
    {ok, _} = erpy:start_pool(emb_nospin, #{mode => embedded, size => 2, spin_us => 0,
                                            allowed => [{erlang, abs}]}),
    Busy = busy_loop(),
    try
        Self = self(),
        Callers = [spawn_link(fun() -> Self ! {done, C, [mix(C, I) || I <- lists:seq(1, 24)]} end)
                   || C <- lists:seq(1, 4)],
        Seq = [erpy:call(operator, add, [I, 1], #{pool => P}) || P <- [?P, emb_nospin], I <- lists:seq(1, 300)],
        ?assertEqual([{ok, I + 1} || _ <- [?P, emb_nospin], I <- lists:seq(1, 300)], Seq),
        Cb = [erpy:eval(<<"erlang.call('erlang', 'abs', -i)">>, #{i => I}, #{pool => P})
              || P <- [?P, emb_nospin], I <- lists:seq(1, 50)],
        ?assertEqual([{ok, I} || _ <- [?P, emb_nospin], I <- lists:seq(1, 50)], Cb),
        [receive {done, C, Rs} ->
                 lists:foreach(fun({I, R}) -> check_mix(C, I, R) end, lists:zip(lists:seq(1, 24), Rs))
         after 60000 -> ct:fail(lost)
         end || C <- lists:seq(1, length(Callers))]
    after
        stop_busy_loop(Busy)
    end.

%% An OS process spinning on one core until its stdin closes (the port closing, or this VM dying).
busy_loop() ->
    Python = os:getenv("ERPY_PYTHON", "/usr/bin/python3"),
    open_port({spawn_executable, Python},
              [{args, ["-c", "import os, threading\n"
                             "threading.Thread(target=lambda: (os.read(0, 1), os._exit(0)), daemon=True).start()\n"
                             "while True: pass\n"]}, use_stdio, binary]).

stop_busy_loop(Port) ->
    {os_pid, OsPid} = erlang:port_info(Port, os_pid),
    port_close(Port),
    _ = os:cmd("kill -9 " ++ integer_to_list(OsPid) ++ " 2>/dev/null"),
    ok.

%% Many calls timing out at once on every context are all interrupted: afterwards no context is still busy.
concurrent_timeouts(_Config) ->
    Self = self(),
    Ps = [spawn_link(fun() ->
                             Rs = [erpy:exec(<<"while True: pass">>, opts(#{timeout => 30}))
                                   || _ <- lists:seq(1, 10)],
                             Self ! {done, Rs}
                     end) || _ <- lists:seq(1, 8)],
    [receive {done, Rs} -> ?assertEqual(lists:duplicate(10, {error, timeout}), Rs) end || _ <- Ps],
    {ok, erpy_embedded, #{pool := Pool}} = erpy_transport:lookup(?P),
    ok = wait_until(fun() -> maps:get(busy, erpy_nif:pool_info(Pool)) =:= 0 end, 3000),
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], opts(#{timeout => 1000}))).

%% Calls long enough to have their callers watched finish normally, and those callers may exit afterwards (their monitors end quietly).
long_calls_watched(_Config) ->
    Self = self(),
    Ps = [spawn(fun() ->
                        Rs = [erpy:eval(<<"__import__('time').sleep(0.04) or i">>, #{i => I}, opts())
                              || I <- lists:seq(1, 8)],
                        Self ! {done, self(), Rs}
                end) || _ <- lists:seq(1, 4)],
    [receive {done, P, Rs} -> ?assertEqual([{ok, I} || I <- lists:seq(1, 8)], Rs) end || P <- Ps],
    timer:sleep(100),
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], opts())),
    %% The same with held contexts given back.
    [begin {ok, W} = erpy:checkout(?P), ok = erpy:exec(<<"__import__('time').sleep(0.03)">>, #{worker => W}),
           ok = erpy:checkin(W) end || _ <- lists:seq(1, 3)],
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], opts())).

%% Stopping a pool answers its running and waiting requests {error, {no_pool, Name}} at once, as in every mode.
stop_pool_in_flight(_Config) ->
    {ok, _} = erpy:start_pool(emb_one, #{mode => embedded, size => 1}),
    Self = self(),
    Slow = spawn_link(fun() -> Self ! {slow, erpy:exec(<<"while True: pass">>, #{pool => emb_one, timeout => 30000})} end),
    timer:sleep(50),
    Queued = [spawn_link(fun() -> Self ! {queued, erpy:call(operator, add, [1, 2], #{pool => emb_one, timeout => 30000})} end)
              || _ <- lists:seq(1, 3)],
    timer:sleep(50),
    {T, ok} = timer:tc(fun() -> erpy:stop_pool(emb_one) end),
    [receive {queued, R} -> ?assertEqual({error, {no_pool, emb_one}}, R) after 5000 -> ct:fail(queued_lost) end
     || _ <- Queued],
    receive {slow, R} -> ?assertEqual({error, {no_pool, emb_one}}, R) after 5000 -> ct:fail({slow_lost, Slow}) end,
    ct:log("stop_pool took ~p us", [T]).

mix(C, I) ->
    case I rem 4 of
        0 -> erpy:call(operator, add, [C, I], opts());
        1 -> erpy:eval(<<"__import__('time').sleep(0.02) or c * i">>, #{c => C, i => I}, opts());
        2 when I rem 8 =:= 2 -> erpy:exec(<<"while True: pass">>, opts(#{timeout => 30}));
        2 -> erpy:eval(<<"c / 0">>, #{c => C}, opts());
        3 -> erpy:eval(<<"[c] * i">>, #{c => C, i => I}, opts(#{timeout => 10000}))
    end.

check_mix(C, I, R) ->
    case I rem 4 of
        0 -> ?assertEqual({ok, C + I}, R);
        1 -> ?assertEqual({ok, C * I}, R);
        2 when I rem 8 =:= 2 -> ?assertEqual({error, timeout}, R);
        2 -> ?assertMatch({error, #{type := <<"ZeroDivisionError">>}}, R);
        3 -> ?assertEqual({ok, lists:duplicate(I, C)}, R)
    end.

%% ---- callbacks ---------------------------------------------------------------------------

%% Python -> Erlang -> Python nests on a pool of one context without deadlock, several levels deep.
nested_callbacks(_Config) ->
    {ok, _} = erpy:start_pool(emb_one, #{mode => embedded, size => 1,
                                         allowed => [{?MODULE, nested, 2}, {?MODULE, deeper, 1}]}),
    ?assertEqual({ok, 42}, erpy:eval(<<"erlang.apply('erpy_embedded_SUITE', 'nested', [emb_one, 21])">>,
                                     #{emb_one => emb_one}, #{pool => emb_one})),
    ?assertEqual({ok, 8}, erpy:eval(<<"erlang.call('erpy_embedded_SUITE', 'deeper', 3)">>, #{},
                                    #{pool => emb_one})),
    %% An Erlang exception in the callback is an ErlangError in Python.
    {error, #{type := <<"ErlangError">>}} =
        erpy:eval(<<"erlang.call('erpy_embedded_SUITE', 'deeper', 'x')">>, #{}, #{pool => emb_one}).

nested(Pool, N) ->
    {ok, V} = erpy:eval(<<"n * 2">>, #{n => N}, #{pool => Pool}),
    V.

%% deeper(N): Python calls deeper(N - 1) through Erlang until 0, doubling on the way back.
deeper(0) -> 1;
deeper(N) ->
    {ok, V} = erpy:eval(<<"2 * erlang.call('erpy_embedded_SUITE', 'deeper', n - 1)">>, #{n => N},
                        #{pool => emb_one}),
    V.

%% The allow-list is enforced in Erlang: anything not listed raises ErlangError with not_allowed.
allow_list(_Config) ->
    {ok, 1} = erpy:eval(<<"erlang.call('erlang', 'abs', -1)">>, #{}, opts()),
    {error, #{type := <<"ErlangError">>, message := Msg}} =
        erpy:eval(<<"erlang.call('os', 'cmd', 'ls')">>, #{}, opts()),
    ?assertNotEqual(nomatch, binary:match(Msg, <<"not_allowed">>)),
    {error, #{type := <<"ErlangError">>}} =
        erpy:eval(<<"erlang.apply('no_such_module_at_all', 'f', [])">>, #{}, opts()),
    %% Outside a request (a thread of the user's own) there is no caller: ErlangPortError.
    Code = <<"import threading\n"
             "out = []\n"
             "def f():\n"
             "    try:\n"
             "        erlang.self()\n"
             "    except Exception as e:\n"
             "        out.append(type(e).__name__)\n"
             "t = threading.Thread(target=f)\n"
             "t.start()\n"
             "t.join()\n"
             "result = out[0]\n">>,
    ?assertEqual({ok, #{status => ok, result => <<"ErlangPortError">>}},
                 erpy:run(#{code => Code, pool => ?P})).

%% erlang.send reaches the caller, pids it was given and the names send_allowed lists;
%% erlang.self() is the caller.
send_and_self(_Config) ->
    Me = self(),
    ?assertEqual({ok, Me}, erpy:eval(<<"erlang.self()">>, #{}, opts())),
    {ok, undefined} = erpy:eval(<<"erlang.send(p, ('hello', 1))">>, #{p => Me}, opts()),
    receive {<<"hello">>, 1} -> ok after 2000 -> ct:fail(no_message) end,
    true = register(erpy_emb_test_name, self()),
    {ok, undefined} = erpy:eval(<<"erlang.send(__import__('erpy').Atom('erpy_emb_test_name'), 'hi')">>, #{},
                                opts()),
    receive <<"hi">> -> ok after 2000 -> ct:fail(no_message) end,
    unregister(erpy_emb_test_name),
    {error, #{type := <<"ErlangError">>}} =
        erpy:eval(<<"erlang.send(__import__('erpy').Atom('nobody_has_this_name'), 1)">>, #{}, opts()).

%% ---- handles -----------------------------------------------------------------------------

%% A Python object returned as a handle can be called, passed back as an argument and read.
handles(_Config) ->
    {ok, H} = erpy:call(collections, 'Counter', [], opts(#{handle => true})),
    ?assert(is_reference(H)),
    ?assert(erpy_nif:is_handle(H)),
    {ok, undefined} = erpy:call(H, update, [[<<"a">>, <<"b">>, <<"a">>]], opts()),
    ?assertEqual({ok, 2}, erpy:call(H, '__getitem__', [<<"a">>], opts())),
    ?assertEqual({ok, 2}, erpy:call(builtins, len, [H], opts())),
    ?assertEqual({ok, [<<"a">>, 2]}, erpy:eval(<<"list(h.most_common(1)[0])">>, #{h => H}, opts())),
    ?assertEqual({ok, <<"Counter">>}, erpy:eval(<<"type(h).__name__">>, #{h => H}, opts())),
    {ok, Doc} = erpy:getattr(H, '__doc__', opts()),
    ?assert(is_binary(Doc)),
    %% Port pools have no handles: a clear error.
    ?assertEqual({error, {not_supported, {handle, default}}},
                 erpy:call(collections, 'Counter', [], #{pool => default, handle => true})),
    %% A handle from one embedded pool works in another (one interpreter per VM).
    {ok, _} = erpy:start_pool(emb_one, #{mode => embedded, size => 1}),
    ?assertEqual({ok, 2}, erpy:call(builtins, len, [H], #{pool => emb_one})).

%% 100k handles that Erlang drops are released in Python (no leak); the decref runs on a Python thread.
handles_no_leak(_Config) ->
    ok = erpy:exec(<<"import sys, types\n"
                     "m = types.ModuleType('erpy_probe')\n"
                     "class Probe:\n"
                     "    live = 0\n"
                     "    def __init__(self): Probe.live += 1\n"
                     "    def __del__(self): Probe.live -= 1\n"
                     "m.Probe = Probe\n"
                     "sys.modules['erpy_probe'] = m\n">>, opts()),
    Loop = fun L(0) -> ok;
               L(K) -> {ok, _H} = erpy:call(erpy_probe, 'Probe', [], opts(#{handle => true})), L(K - 1)
           end,
    Pids = [spawn_monitor(fun() -> Loop(25000) end) || _ <- lists:seq(1, 4)],
    [receive {'DOWN', M, process, _, Why} -> ?assertEqual(normal, Why) after 60000 -> ct:fail(slow) end
     || {_, M} <- Pids],
    erlang:garbage_collect(),
    ok = wait_until(fun() ->
                            {ok, Live} = erpy:eval(<<"__import__('erpy_probe').Probe.live">>, #{}, opts()),
                            Live < 100
                    end, 10000),
    {ok, Live} = erpy:eval(<<"__import__('erpy_probe').Probe.live">>, #{}, opts()),
    ct:log("live Probe objects after 100k handles were dropped: ~p", [Live]).

%% ---- contexts ----------------------------------------------------------------------------

%% A checked-out context keeps its namespace across calls; checkin clears it.
checkout_state(_Config) ->
    {ok, W} = erpy:checkout(?P),
    ok = erpy:exec(<<"counter = 41">>, #{worker => W}),
    ok = erpy:exec(<<"counter += 1">>, #{worker => W}),
    ?assertEqual({ok, 42}, erpy:eval(<<"counter">>, #{}, #{worker => W})),
    ?assertEqual({ok, #{status => ok, result => 43}},
                 erpy:run(#{code => <<"result = counter + 1">>, worker => W})),
    ok = erpy:checkin(W),
    Result = erpy:with_worker(?P, fun(W2) -> erpy:eval(<<"'counter' in globals()">>, #{}, #{worker => W2}) end),
    ?assertEqual({ok, false}, Result),
    %% All contexts held: a checkout waits, and times out cleanly.
    Held = [begin {ok, X} = erpy:checkout(?P), X end || _ <- lists:seq(1, 4)],
    ?assertEqual({error, timeout}, erpy:checkout(?P, 100)),
    [erpy:checkin(X) || X <- Held],
    {ok, W3} = erpy:checkout(?P, 2000),
    erpy:checkin(W3).

%% A context whose holder dies goes back to the pool with its namespace cleared.
checkout_holder_dies(_Config) ->
    {ok, _} = erpy:start_pool(emb_one, #{mode => embedded, size => 1}),
    Self = self(),
    Holder = spawn(fun() ->
                           {ok, W} = erpy:checkout(emb_one),
                           ok = erpy:exec(<<"secret = 1">>, #{worker => W}),
                           Self ! held,
                           receive stop -> ok end
                   end),
    receive held -> ok end,
    ?assertEqual({error, timeout}, erpy:call(operator, add, [1, 2], #{pool => emb_one, timeout => 100})),
    exit(Holder, kill),
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], #{pool => emb_one, timeout => 2000})),
    {ok, W} = erpy:checkout(emb_one, 2000),
    ?assertEqual({ok, false}, erpy:eval(<<"'secret' in globals()">>, #{}, #{worker => W})),
    erpy:checkin(W).

%% Requests wait in order when every context is busy.
queueing_in_order(_Config) ->
    {ok, _} = erpy:start_pool(emb_q, #{mode => embedded, size => 1}),
    ok = erpy:exec(<<"import builtins; builtins.erpy_order = []">>, #{pool => emb_q}),
    Self = self(),
    spawn_link(fun() -> Self ! {first, erpy:exec(<<"__import__('time').sleep(0.2)">>, #{pool => emb_q})} end),
    timer:sleep(50),
    [begin
         spawn_link(fun() -> Self ! {n, I, erpy:eval(<<"erpy_order.append(i)">>, #{i => I}, #{pool => emb_q})} end),
         timer:sleep(5)
     end || I <- lists:seq(1, 5)],
    [receive {n, I, {ok, undefined}} -> ok after 5000 -> ct:fail({lost, I}) end || I <- lists:seq(1, 5)],
    receive {first, ok} -> ok end,
    ?assertEqual({ok, [1, 2, 3, 4, 5]}, erpy:eval(<<"erpy_order">>, #{}, #{pool => emb_q})).

%% A 1 MiB binary crosses both ways intact; bytes results are lent to Erlang, not copied.
large_binaries(_Config) ->
    Bin = crypto:strong_rand_bytes(1 bsl 20),
    ?assertEqual({ok, Bin}, erpy:eval(<<"x">>, #{x => Bin}, opts())),
    {ok, Big} = erpy:eval(<<"b'\\x01' * (1 << 22)">>, #{}, opts()),
    ?assertEqual(1 bsl 22, byte_size(Big)),
    ?assertEqual(binary:copy(<<1>>, 1 bsl 22), Big),
    Text = unicode:characters_to_binary(lists:duplicate(100000, $é)),
    ?assertEqual({ok, Text}, erpy:eval(<<"x">>, #{x => Text}, opts())).

%% ---- output ------------------------------------------------------------------------------

%% print() and stderr reach the Erlang logger with the pool's name, not the VM's stdout.
output_to_logger(_Config) ->
    ok = logger:add_handler(erpy_emb_log, ?MODULE, #{config => #{pid => self()}}),
    try
        {ok, undefined} = erpy:eval(<<"print('hello from python')">>, #{}, opts()),
        ok = erpy:exec(<<"import sys\nsys.stderr.write('oops\\n')">>, opts()),
        receive {log, notice, <<"hello from python">>, #{pool := ?P, stream := stdout}} -> ok
        after 2000 -> ct:fail(no_stdout_log) end,
        receive {log, warning, <<"oops">>, #{pool := ?P, stream := stderr}} -> ok
        after 2000 -> ct:fail(no_stderr_log) end
    after
        logger:remove_handler(erpy_emb_log)
    end.

log(#{level := Level, msg := {Fmt, Args}, meta := #{domain := [erpy, python]} = Meta},
    #{config := #{pid := Pid}}) ->
    Pid ! {log, Level, iolist_to_binary(io_lib:format(Fmt, Args)), Meta};
log(_Event, _Config) ->
    ok.

%% ---- schedulers, lifecycle -----------------------------------------------------------------

%% While Python spins and sleeps on every context, an Erlang ping-pong keeps its latency (measured).
schedulers_stay_free(_Config) ->
    Base = pingpong_latency(300),
    Self = self(),
    Busy = [spawn_link(fun() ->
                               Self ! {busy, erpy:exec(<<"import time\nend = time.time() + 1.0\n"
                                                         "while time.time() < end: pass\n">>,
                                                       opts(#{timeout => 10000}))}
                       end) || _ <- lists:seq(1, 3)],
    Sleeper = spawn_link(fun() -> Self ! {busy, erpy:exec(<<"__import__('time').sleep(1.0)">>, opts())} end),
    timer:sleep(100),
    Loaded = pingpong_latency(300),
    [receive {busy, ok} -> ok after 15000 -> ct:fail(busy_lost) end || _ <- [Sleeper | Busy]],
    ct:log("Erlang ping-pong latency, median/p99 us: idle ~p, while Python runs ~p", [Base, Loaded]),
    {BaseMed, _} = Base,
    {LoadMed, LoadP99} = Loaded,
    %% A scheduler blocked by Python would show as milliseconds here.
    ?assert(LoadMed < max(10 * BaseMed, 500), {Base, Loaded}),
    ?assert(LoadP99 < 20000, {Base, Loaded}).

pingpong_latency(N) ->
    Echo = spawn_link(fun Loop() -> receive {P, T} -> P ! {pong, T}, Loop(); stop -> ok end end),
    Ts = [begin
              timer:sleep(1),
              T0 = erlang:monotonic_time(microsecond),
              Echo ! {self(), T0},
              receive {pong, T0} -> ok end,
              erlang:monotonic_time(microsecond) - T0
          end || _ <- lists:seq(1, N)],
    Echo ! stop,
    Sorted = lists:sort(Ts),
    {lists:nth(N div 2, Sorted), lists:nth(N * 99 div 100, Sorted)}.

%% What the interpreter offers is detected and reported: 3.11 shares one GIL, no own-GIL subinterpreters.
python_info(Config) ->
    Info = erpy_nif:python_info(),
    ct:log("~p", [Info]),
    #{version := V, gil := Gil, own_gil_subinterpreters := Sub, initialized := true} = Info,
    [Major, Minor | _] = [binary_to_integer(X) || X <- binary:split(V, <<".">>, [global])],
    ?assertEqual(Sub, {Major, Minor} >= {3, 12}),
    ?assert(lists:member(Gil, [shared, free_threaded])),
    %% One interpreter per VM: a pool asking for another one is refused clearly.
    Other = filename:join(?config(priv_dir, Config), "python3"),
    ok = file:make_symlink(os:find_executable("python3", "/usr/bin"), Other),
    ?assertMatch({error, {python_already_running, _}},
                 erpy:start_pool(emb_one, #{mode => embedded, python => Other})),
    %% Asking for subinterpreters where the Python cannot give them is a clear error.
    case Sub of
        false ->
            ?assertMatch({error, {unsupported, _}},
                         erpy:start_pool(emb_one, #{mode => embedded, contexts => subinterpreters}));
        true ->
            ok
    end.

%% Loading the NIF module again (upgrade), purging and reloading keep Python and running pools usable.
nif_reload(_Config) ->
    {ok, 3} = erpy:call(operator, add, [1, 2], opts()),
    {module, erpy_nif} = code:load_file(erpy_nif),      % upgrade: old and new code
    {ok, 3} = erpy:call(operator, add, [1, 2], opts()),
    true = code:soft_purge(erpy_nif),
    {module, erpy_nif} = code:load_file(erpy_nif),
    true = code:soft_purge(erpy_nif),
    {ok, 5} = erpy:call(operator, add, [2, 3], opts()),
    {ok, _} = erpy:start_pool(emb_one, #{mode => embedded, size => 1}),
    {ok, 7} = erpy:call(operator, add, [3, 4], #{pool => emb_one}).

%% Stopping the application closes every embedded pool; starting it again reuses the interpreter.
app_restart(_Config) ->
    {ok, _} = erpy:eval(<<"__import__('builtins').__dict__.setdefault('erpy_mark', 7)">>, #{}, opts()),
    ok = application:stop(erpy),
    {ok, _} = application:ensure_all_started(erpy),
    {ok, _} = erpy:start_pool(emb_one, #{mode => embedded, size => 2}),
    ?assertEqual({ok, 7}, erpy:eval(<<"__import__('builtins').erpy_mark">>, #{}, #{pool => emb_one})).

%% ---- helpers -----------------------------------------------------------------------------

wait_port_ready(Name) ->
    ok = wait_until(fun() ->
                            #{ready := R, size := S} = erpy_pool:info(Name),
                            R =:= S
                    end, 10000).

wait_until(Fun, Timeout) when Timeout =< 0 ->
    case Fun() of true -> ok; false -> timeout end;
wait_until(Fun, Timeout) ->
    case Fun() of
        true -> ok;
        false -> timer:sleep(50), wait_until(Fun, Timeout - 50)
    end.

%% ---- issue 10: every term in, only what the pool allows out --------------------------------

%% Map keys Python cannot hash (strings, lists, maps, improper lists, inside tuples too) are erpy.FrozenList/FrozenMap/FrozenImproperList in Python and come back equal; Python can make such keys.
map_keys(_Config) ->
    Terms = [#{"name" => 1}, #{[1, [2]] => x}, #{#{a => 1} => b}, #{[] => 1, {[1], 2} => 2},
             #{[1 | 2] => 3}, #{#{[1] => [2]} => 3}, #{a => #{"k" => "v"}},
             #{[#{a => "b"}] => [#{"c" => d}]},
             maps:from_list([{[I], I} || I <- lists:seq(1, 40)])],
    [?assertEqual({ok, T}, erpy:eval(<<"x">>, #{x => T}, opts())) || T <- Terms],
    ?assertEqual({ok, [<<"FrozenList">>, <<"FrozenMap">>, <<"FrozenImproperList">>]},
                 erpy:eval(<<"[type(next(iter(k))).__name__ for k in (a, b, c)]">>,
                           #{a => #{"name" => 1}, b => #{#{a => 1} => b}, c => #{[1 | 2] => 3}}, opts())),
    ?assertEqual({ok, 1}, erpy:eval(<<"x[__import__('erpy').FrozenList(b'name')]">>,
                                    #{x => #{"name" => 1}}, opts())),
    ?assertEqual({ok, #{"name" => 1, #{1 => [2]} => 2, [1 | 2] => 3}},
                 erpy:eval(<<"(lambda e: {e.FrozenList(b'name'): 1, e.freeze({1: [2]}): 2,"
                             " e.FrozenImproperList([1], 2): 3})(__import__('erpy'))">>, #{}, opts())).

%% Nesting deeper than the stack holds is a clean error both ways, and erpy.decode/encode with max_depth=10**7 on a context thread raise instead of crashing the VM.
deep_nesting(_Config) ->
    Deep = lists:foldl(fun(_, A) -> [A] end, [], lists:seq(1, 1000000)),
    {error, #{type := <<"DecodeError">>}} = erpy:eval(<<"x">>, #{x => Deep}, opts()),
    DeepMap = lists:foldl(fun(_, A) -> #{A => 1} end, [], lists:seq(1, 100000)),
    {error, #{type := <<"DecodeError">>}} = erpy:eval(<<"x">>, #{x => DeepMap}, opts()),
    ok = erpy:exec(<<"x = []\nfor _ in range(10**6): x = [x]\n"
                     "import builtins; builtins.erpy_deep = x">>, opts()),
    {error, #{type := <<"EncodeError">>}} =
        erpy:eval(<<"__import__('builtins').erpy_deep">>, #{}, opts()),
    Code = <<"import erpy\n"
             "data = b'\\x83' + b'h\\x01' * 10**6 + b'j'\n"
             "out = []\n"
             "try:\n    erpy.decode(data, max_depth=10**7)\nexcept erpy.DecodeError as e:\n    out.append(str(e))\n"
             "try:\n    erpy.encode(__import__('builtins').erpy_deep, max_depth=10**7)\n"
             "except erpy.EncodeError as e:\n    out.append(str(e)[:60])\n"
             "del __import__('builtins').erpy_deep\n"
             "result = out">>,
    {ok, #{status := ok, result := [D, E]}} = erpy:run(#{code => Code, pool => ?P}),
    ct:log("~ts~n~ts", [D, E]),
    ?assertNotEqual(nomatch, binary:match(D, <<"stack">>)),
    ?assertNotEqual(nomatch, binary:match(E, <<"stack">>)),
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], opts())).

%% A result is bounded by max_message_size as ETF sizes it, checked while it converts: a huge str is refused without being copied.
result_size_limit(_Config) ->
    {ok, _} = erpy:start_pool(emb_one, #{mode => embedded, size => 1, max_message_size => 100000}),
    O = #{pool => emb_one},
    %% A binary of N bytes is 5 + N bytes of ETF.
    {ok, B} = erpy:eval(<<"'x' * 99995">>, #{}, O),
    ?assertEqual(99995, byte_size(B)),
    ?assertEqual({error, {message_too_large, 100001, 100000}}, erpy:eval(<<"'x' * 99996">>, #{}, O)),
    ?assertEqual({error, {message_too_large, 100001, 100000}}, erpy:eval(<<"'\\u00e9' * 49998">>, #{}, O)),
    ?assertEqual({error, {message_too_large, 100001, 100000}}, erpy:eval(<<"b'x' * 99996">>, #{}, O)),
    {error, {message_too_large, S1, 100000}} = erpy:eval(<<"list(range(10**7))">>, #{}, O),
    ?assert(S1 > 100000),
    {error, {message_too_large, _, 100000}} = erpy:eval(<<"{'a': [('x' * 60000, 'y' * 60000)]}">>, #{}, O),
    %% 200 MB: refused at once (Python makes the str; erpy copies nothing of it).
    ok = erpy:exec(<<"import builtins; builtins.erpy_big = 'x' * (200 * 1024 * 1024)">>, O),
    {T, R} = timer:tc(fun() -> erpy:eval(<<"__import__('builtins').erpy_big">>, #{}, O) end),
    {error, {message_too_large, S2, 100000}} = R,
    ?assert(S2 > 200 * 1024 * 1024),
    ?assert(T < 2000000, T),
    ok = erpy:exec(<<"del __import__('builtins').erpy_big">>, O),
    %% Through the codec too (a BitBinary, a custom encoder).
    {error, {message_too_large, _, 100000}} =
        erpy:eval(<<"__import__('erpy').BitBinary(b'x' * 200000, 3)">>, #{}, O),
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], O)).

%% Callback requests from Python count against max_message_size as well: ErlangError({message_too_large, Size, Max}) in Python.
callback_size_limit(_Config) ->
    {ok, _} = erpy:start_pool(emb_one, #{mode => embedded, size => 1, max_message_size => 100000,
                                         allowed => [{erlang, byte_size, 1}]}),
    Code = <<"try:\n"
             "    erlang.call('erlang', 'byte_size', 'x' * arguments)\n"
             "    result = 1\n"
             "except erlang.ErlangError as e:\n"
             "    result = e.args[0]\n">>,
    ?assertEqual({ok, #{status => ok, result => 1}}, erpy:run(#{code => Code, arguments => 1000, pool => emb_one})),
    {ok, #{status := ok, result := {message_too_large, S, 100000}}} =
        erpy:run(#{code => Code, arguments => 200000, pool => emb_one}),
    ?assert(S > 100000).

%% Python creates no atoms by default: an unknown one is {unknown_atom, Name} for a result and ErlangError(('unknown_atom', Name)) for a callback or a send; atoms in pids, ports, refs and funs count.
no_new_atoms(_Config) ->
    N = fun() -> <<"erpy_no_such_atom_", (integer_to_binary(erlang:unique_integer([positive])))/binary>> end,
    A = N(),
    ?assertEqual({error, {unknown_atom, A}}, erpy:eval(<<"__import__('erpy').Atom(n)">>, #{n => A}, opts())),
    ?assertEqual({error, {unknown_atom, A}},
                 erpy:eval(<<"[1, {'k': (__import__('erpy').Atom(n),)}]">>, #{n => A}, opts())),
    ?assertEqual({error, {unknown_atom, A}}, erpy:eval(<<"__import__('erpy').Pid(n, 1, 0, 0)">>, #{n => A}, opts())),
    ?assertEqual({error, {unknown_atom, A}},
                 erpy:eval(<<"__import__('erpy').Ref(n, 0, (1, 2, 3))">>, #{n => A}, opts())),
    %% fun n:f/0, written by hand: its module is a new atom.
    ?assertEqual({error, {unknown_atom, A}},
                 erpy:eval(<<"__import__('erpy').Fun(bytes([113, 119, len(n)]) + n.encode() + b'w\\x01fa\\x00')">>,
                           #{n => A}, opts())),
    U = <<"erpy_アトム_"/utf8, (integer_to_binary(erlang:unique_integer([positive])))/binary>>,
    ?assertEqual({error, {unknown_atom, U}}, erpy:eval(<<"__import__('erpy').Atom(n)">>, #{n => U}, opts())),
    ?assertError(badarg, binary_to_existing_atom(A, utf8)),
    ?assertError(badarg, binary_to_existing_atom(U, utf8)),
    %% Atoms that exist are fine, Latin-1 and not.
    ?assertEqual({ok, [ok, 'héllo', 'ünïcødé_アトム']},
                 erpy:eval(<<"[__import__('erpy').Atom(a) for a in ('ok', 'h\\u00e9llo', w)]">>,
                           #{w => 'ünïcødé_アトム'}, opts())),
    Code = <<"A = __import__('erpy').Atom\n"
             "out = []\n"
             "for f in (lambda: erlang.call('erlang', 'abs', A(arguments)),\n"
             "          lambda: erlang.send(erlang.self(), [A(arguments)])):\n"
             "    try:\n        f()\n    except erlang.ErlangError as e:\n        out.append(e.args[0])\n"
             "result = out">>,
    ?assertEqual({ok, #{status => ok, result => [{unknown_atom, A}, {unknown_atom, A}]}},
                 erpy:run(#{code => Code, arguments => A, pool => ?P})),
    ?assertError(badarg, binary_to_existing_atom(A, utf8)).

%% new_atoms => N lets a pool make N atoms over its life, no more.
new_atoms_budget(_Config) ->
    {ok, _} = erpy:start_pool(emb_one, #{mode => embedded, size => 1, new_atoms => 2}),
    O = #{pool => emb_one},
    [A1, A2, A3] = [<<"erpy_budget_atom_", (integer_to_binary(erlang:unique_integer([positive])))/binary>>
                    || _ <- [1, 2, 3]],
    Make = <<"__import__('erpy').Atom(n)">>,
    {ok, R1} = erpy:eval(Make, #{n => A1}, O),
    ?assertEqual(A1, atom_to_binary(R1)),
    {ok, R1} = erpy:eval(Make, #{n => A1}, O),  % exists now: free
    {ok, R2} = erpy:eval(Make, #{n => A2}, O),
    ?assertEqual(A2, atom_to_binary(R2)),
    ?assertEqual({error, {unknown_atom, A3}}, erpy:eval(Make, #{n => A3}, O)),
    ?assertError(badarg, binary_to_existing_atom(A3, utf8)),
    %% Other pools have their own budget (0 by default).
    ?assertEqual({error, {unknown_atom, A3}}, erpy:eval(Make, #{n => A3}, opts())).

%% The NIF flags what Erlang must check: {ok_check, R} when a result holds a pid, port, reference or fun, {callback_check, ...} when a callback's terms do; anything else keeps its plain shape.
flags_for_checks(_Config) ->
    Me = self(),
    Fun = fun() -> ok end,
    Port = hd(erlang:ports()),
    Ref = make_ref(),
    ?assertEqual({ok, [1, #{<<"a">> => {2, <<"x">>}}]}, raw_answer(erpy_request:eval(<<"[1, {'a': (2, 'x')}]">>, #{}))),
    ?assertEqual({ok_check, Me}, raw_answer(erpy_request:eval(<<"erlang.self()">>, #{}))),
    ?assertEqual({ok_check, [1, #{<<"k">> => {Ref}}]}, raw_answer(erpy_request:eval(<<"[1, {'k': (x,)}]">>, #{x => Ref}))),
    ?assertEqual({ok_check, Fun}, raw_answer(erpy_request:eval(<<"x">>, #{x => Fun}))),
    ?assertEqual({ok_check, Port}, raw_answer(erpy_request:eval(<<"x">>, #{x => Port}))),
    ?assertEqual({ok_check, [fun lists:sort/1]}, raw_answer(erpy_request:eval(<<"[x]">>, #{x => fun lists:sort/1}))),
    %% Callbacks: the plain shape, then with a pid inside the arguments.
    {Job1, Ref1, {callback, _, call, <<"erlang">>, <<"abs">>, [-1]}} =
        raw_start(erpy_request:eval(<<"erlang.call('erlang', 'abs', -1)">>, #{})),
    ?assertEqual({ok, 1}, raw_reply(Job1, Ref1, {ok, 1})),
    {Job2, Ref2, {callback_check, _, call, <<"erlang">>, <<"abs">>, [{Me}]}} =
        raw_start(erpy_request:eval(<<"erlang.call('erlang', 'abs', (erlang.self(),))">>, #{})),
    {error, #{type := <<"ErlangError">>, message := Msg}} = raw_reply(Job2, Ref2, {error, {badarg, x}}),
    ct:log("~ts", [Msg]).

%% erlang.send is a callback like erlang.call: {callback | callback_check, Ctx, send, Dest, undefined, [Msg]}, answered by Erlang (ok: None; error: ErlangError), and never a message sent from the context thread.
send_is_a_callback(_Config) ->
    Me = self(),
    {Job, Ref, {callback_check, _, send, Me, undefined, [<<"hi">>]}} =
        raw_start(erpy_request:eval(<<"erlang.send(erlang.self(), 'hi')">>, #{})),
    receive <<"hi">> -> ct:fail(sent_by_the_nif) after 100 -> ok end,
    ?assertEqual({ok, undefined}, raw_reply(Job, Ref, {ok, ok})),
    {Job2, Ref2, {callback, _, send, ok, undefined, [1]}} =
        raw_start(erpy_request:eval(<<"erlang.send(__import__('erpy').Atom('ok'), 1)">>, #{})),
    {error, #{type := <<"ErlangError">>}} = raw_reply(Job2, Ref2, {error, noproc}),
    Code = <<"try:\n    erlang.send(erlang.self(), 1)\n    result = None\n"
             "except erlang.ErlangError as e:\n    result = e.args[0]\n">>,
    {Job3, Ref3, {callback_check, _, send, Me, undefined, [1]}} = raw_start(erpy_request:run(Code, undefined)),
    ?assertEqual({ok, {not_allowed, x}}, raw_reply(Job3, Ref3, {error, {not_allowed, x}})).

%% The NIF's raw answers and callbacks for a request on ?P, without erpy_embedded.
raw_start(Req) ->
    {ok, erpy_embedded, #{pool := Pool}} = erpy_transport:lookup(?P),
    Ref = make_ref(),
    {ok, Job} = erpy_nif:submit(Pool, Ref, Req),
    {Job, Ref, raw_next(Job, Ref)}.

raw_answer(Req) ->
    {_Job, _Ref, Answer} = raw_start(Req),
    Answer.

raw_reply(Job, Ref, Reply) ->
    ok = erpy_nif:callback_reply(Job, Reply),
    raw_next(Job, Ref).

raw_next(Job, Ref) ->
    case erpy_nif:poll(Job, true) of
        {done, Answer} -> Answer;
        wait -> receive {Ref, Msg} -> Msg after 5000 -> ct:fail(no_answer) end;
        Callback when is_tuple(Callback) -> Callback
    end.

%% Map keys that are different terms but equal in Python (1 and 1.0, true and 1, ok and <<"ok">>, [1] and [1.0], inside keys too) are erpy.Key in Python, all of them whatever the order, and come back =:=; Python can make and look up such keys.
keys_equal_in_python(_Config) ->
    Terms = [#{1 => a, 1.0 => b}, #{ok => 1, <<"ok">> => 2}, #{true => 1, 1 => 2},
             #{true => a, 1 => b, 1.0 => c, 2 => d}, #{false => a, 0 => b, 0.0 => c, x => y},
             #{[1] => a, [1.0] => b}, #{"ok" => 1, [111, 107.0] => 2, "no" => 3},
             #{{a} => 1, {<<"a">>} => 2}, #{#{1 => a} => x, #{1.0 => a} => y},
             #{#{1 => a, 1.0 => b} => x}, #{[1 | 2] => a, [1 | 2.0] => b},
             #{[[[{1, [true]}]]] => a, [[[{1, [1]}]]] => b},
             #{m => #{ok => 1, <<"ok">> => 2}, n => [#{1 => a, 1.0 => b}]},
             #{1 bsl 70 => a, float(1 bsl 70) => b}, #{'héllo' => 1, <<"héllo"/utf8>> => 2},
             maps:from_list([{list_to_atom("k" ++ integer_to_list(I)), I} || I <- lists:seq(1, 30)]
                            ++ [{list_to_binary("k" ++ integer_to_list(I)), -I} || I <- lists:seq(1, 30)]),
             maps:from_list([{I, i} || I <- lists:seq(1, 40)] ++ [{float(I), f} || I <- lists:seq(1, 40, 2)])],
    [?assertEqual({ok, T}, erpy:eval(<<"x">>, #{x => T}, opts())) || T <- Terms],
    %% erpy.decode and erpy.encode inside the context: the same keys, the same bytes.
    Code = <<"import erpy\n"
             "x = erpy.decode(arguments)\n"
             "result = (sorted(type(k).__name__ for k in x), x[erpy.Key(1)], x[erpy.Key(1.0)], x[2],\n"
             "          x[erpy.Key(erpy.Atom('ok'))], x[erpy.Key(b'ok')], erpy.encode(x) == arguments)\n">>,
    ?assertEqual({ok, #{status => ok, result => {[<<"Key">>, <<"Key">>, <<"Key">>, <<"Key">>, <<"int">>],
                                                 a, b, c, 1, 2, true}}},
                 erpy:run(#{code => Code, arguments => term_to_binary(#{1 => a, 1.0 => b, 2 => c, ok => 1,
                                                                        <<"ok">> => 2}, [{minor_version, 2}]),
                            pool => ?P})),
    ?assertEqual({ok, [<<"Key">>, <<"Key">>, <<"Key">>]},
                 erpy:eval(<<"sorted(type(k).__name__ for k in x)">>, #{x => #{true => a, 1 => b, 1.0 => c}}, opts())),
    ?assertEqual({ok, #{status => ok, result => {a, b, c}}},
                 erpy:run(#{code => <<"from erpy import Key as K\n"
                                      "result = (arguments[K(True)], arguments[K(1)], arguments[K(1.0)])">>,
                            arguments => #{true => a, 1 => b, 1.0 => c}, pool => ?P})),
    %% Python makes such maps for Erlang.
    ?assertEqual({ok, #{1 => <<"a">>, 1.0 => <<"b">>, ok => 1, <<"ok">> => 2, [1] => 3, [1.0] => 4}},
                 erpy:eval(<<"(lambda K, A: {K(1): 'a', K(1.0): 'b', K(A('ok')): 1, K('ok'): 2,"
                             " K([1]): 3, K([1.0]): 4})(__import__('erpy').Key, __import__('erpy').Atom)">>,
                           #{}, opts())).

%% ---- asynchronous requests (the NIF answers the caller itself) ----------------------------

-define(ASYNC_ALLOWED, [{timer, sleep}, {?MODULE, give_fun, 1}]).

give_fun(X) -> fun() -> X end.

%% Stopping a pool answers its asynchronous requests {error, {no_pool, Name}} as erpy:call
%% would: a running one, queued ones, one whose callback runs in Erlang (its runner), one
%% with a result to check; none is lost, none answers twice.
async_stop_pool(_Config) ->
    {ok, _} = erpy:start_pool(emb_one, #{mode => embedded, size => 1, allowed => ?ASYNC_ALLOWED}),
    O = #{pool => emb_one, timeout => 30000},
    {ok, InCallback} = erpy:async_eval(<<"erlang.call('timer', 'sleep', 300)">>, #{}, O),
    timer:sleep(50),
    {ok, Running} = erpy:async_eval(<<"next(x for x in iter(int, 1) if x)">>, #{}, O),
    Queued = [element(2, erpy:async_call(operator, add, [1, 2], O)) || _ <- lists:seq(1, 3)],
    {ok, Checked} = erpy:async_eval(<<"p">>, #{p => self()}, O),
    ok = erpy:stop_pool(emb_one),
    [?assertEqual({error, {no_pool, emb_one}}, erpy:await(Id, 5000))
     || Id <- [InCallback, Running, Checked | Queued]],
    timer:sleep(100),
    ?assertEqual({messages, []}, process_info(self(), messages)),
    %% A pool that is gone answers at once, as a message too.
    {ok, Gone} = erpy:async_call(operator, add, [1, 2], #{pool => emb_one}),
    ?assertEqual({error, {no_pool, emb_one}}, erpy:await(Gone, 1000)).

%% Callbacks of requests nobody awaits run under the caller's policy: an allowed one runs,
%% a refused one is refused exactly as for erpy:call, a fun a callback returned may come
%% back in the result (the runner remembers it), a callback slower than the request's
%% timeout ends in {error, timeout} and the context serves again.
async_callbacks_unawaited(_Config) ->
    {ok, _} = erpy:start_pool(emb_one, #{mode => embedded, size => 1, allowed => ?ASYNC_ALLOWED}),
    O = #{pool => emb_one},
    Sleep = <<"erlang.call('timer', 'sleep', 1) or 5">>,
    Refused = <<"erlang.call('os', 'cmd', 'ls')">>,
    Fun = <<"erlang.call('erpy_embedded_SUITE', 'give_fun', 3)">>,
    Ids = [{C, element(2, erpy:async_eval(C, #{}, O))} || C <- [Sleep, Refused, Fun]],
    timer:sleep(200),  % all answered by now, nobody waiting
    Got = [{C, receive {erpy_reply, Id, A} -> A after 5000 -> ct:fail({lost, C}) end} || {C, Id} <- Ids],
    [?assertEqual({C, erpy:eval(C, #{}, O)}, {C, A}) || {C, A} <- Got, C =/= Fun],
    {Fun, {ok, F}} = lists:keyfind(Fun, 1, Got),
    ?assertEqual(3, F()),
    {error, #{message := Msg}} = element(2, lists:keyfind(Refused, 1, Got)),
    ?assertNotEqual(nomatch, binary:match(Msg, <<"not_allowed">>)),
    %% A callback outlives the request's timeout.
    {ok, Late} = erpy:async_eval(<<"erlang.call('timer', 'sleep', 1000)">>, #{}, O#{timeout => 200}),
    receive {erpy_reply, Late, LateAnswer} -> ?assertEqual({error, timeout}, LateAnswer)
    after 5000 -> ct:fail(no_timeout)
    end,
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], O#{timeout => 5000})),
    ?assertEqual({messages, []}, process_info(self(), messages)).

%% cancel/1 of a request whose callback runs (its runner is stopped, Python interrupted),
%% of a queued one and of one already answered; a caller killed while its request's
%% callback runs: the context serves again each time, and no answer comes after cancel.
async_cancel_and_death(_Config) ->
    {ok, _} = erpy:start_pool(emb_one, #{mode => embedded, size => 1, allowed => ?ASYNC_ALLOWED,
                                         kill_grace_ms => 500}),
    O = #{pool => emb_one, timeout => 20000},
    {ok, InCallback} = erpy:async_eval(<<"erlang.call('timer', 'sleep', 5000)">>, #{}, O),
    {ok, Queued} = erpy:async_call(operator, add, [1, 2], O),
    timer:sleep(100),
    ok = erpy:cancel(InCallback),
    ok = erpy:cancel(Queued),
    ?assertEqual({ok, 2}, erpy:eval(<<"1 + 1">>, #{}, O#{timeout => 3000})),
    {ok, Done} = erpy:async_call(operator, add, [1, 2], O),
    timer:sleep(100),
    ok = erpy:cancel(Done),  % its answer had come: dropped
    ?assertEqual({error, {badarg, {async_id, Done}}}, erpy:cancel(Done)),
    ?assertEqual({error, {badarg, {async_id, Done}}}, erpy:await(Done, 100)),
    %% Another process can neither take an answer nor stop a request, also while a runner
    %% runs its callback.
    {ok, Mine} = erpy:async_eval(<<"erlang.call('timer', 'sleep', 200) and 7">>, #{}, O),
    Self = self(),
    _ = spawn_link(fun() -> timer:sleep(50), Self ! {other, erpy:cancel(Mine), erpy:await(Mine, 100)} end),
    receive {other, C2, A2} -> ?assertEqual({{error, {badarg, {async_id, Mine}}}, {error, {badarg, {async_id, Mine}}}}, {C2, A2})
    after 5000 -> ct:fail(no_other)
    end,
    ?assertEqual({ok, 7}, erpy:await(Mine, 5000)),
    receive {erpy_reply, _, _} = M -> ct:fail({answer_after_cancel, M}) after 300 -> ok end,
    Caller = spawn(fun() ->
                           {ok, _} = erpy:async_eval(<<"erlang.call('timer', 'sleep', 5000)">>, #{}, O),
                           {ok, _} = erpy:async_eval(<<"next(x for x in iter(int, 1) if x)">>, #{}, O),
                           receive never -> ok end
                   end),
    timer:sleep(100),
    exit(Caller, kill),
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], O#{timeout => 4000})),
    %% Nothing left behind (the context leaves its job just after the answer).
    ok = wait_idle(emb_one, 100).

wait_idle(Pool, N) ->
    case maps_with(erpy:pool_info(Pool), [queued, held, busy]) of
        {ok, #{queued := 0, held := 0, busy := 0}} -> ok;
        Other when N =:= 0 -> ct:fail({not_idle, Other});
        _ -> timer:sleep(20), wait_idle(Pool, N - 1)
    end.

%% A held context takes asynchronous requests too (its namespace persists).
async_held_worker(_Config) ->
    erpy:with_worker(?P, fun(W) ->
        ok = erpy:exec(<<"x = 21">>, #{worker => W}),
        {ok, Id} = erpy:async_eval(<<"x * 2">>, #{}, #{worker => W}),
        ?assertEqual({ok, 42}, erpy:await(Id, 5000))
    end).

maps_with({ok, M}, Keys) -> {ok, maps:with(Keys, M)}.
