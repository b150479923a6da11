%% Hostile Python code against a pool's policy (doc/security.md), in port and embedded
%% mode (node mode's cases are in erpy_node_SUITE). Every case is what an attacker tried:
%% the snippet must be refused with a clear error and the VM must be unchanged.
-module(erpy_security_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, groups/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2]).
-export([send_by_name_refused/1, send_allowed_names/1, send_to_given_pids/1,
         forged_pid_refused/1, forged_pid_in_callback_args_refused/1,
         export_fun_checked/1, local_fun_refused/1, apply_forms_checked/1,
         new_atoms_refused/1, new_atoms_budget/1, undecodable_answer/1,
         no_stray_messages/1, crash_injection_soak/1]).
%% Called from Python.
-export([echo/1, make_pid/0]).

all() ->
    [{group, port}, {group, embedded}].

groups() ->
    Cases = [send_by_name_refused, send_allowed_names, send_to_given_pids,
             forged_pid_refused, forged_pid_in_callback_args_refused,
             export_fun_checked, local_fun_refused, apply_forms_checked,
             new_atoms_refused, new_atoms_budget, undecodable_answer, no_stray_messages,
             crash_injection_soak],
    [{port, [], Cases}, {embedded, [], Cases}].

suite() ->
    [{timetrap, {seconds, 120}}].

init_per_suite(Config) ->
    ok = erpy_test_env:start_erpy(),
    Config.

end_per_suite(_Config) ->
    ok.

init_per_group(Mode, Config) ->
    Base = #{mode => Mode, size => 1},
    ok = start(sec_none, Base#{allowed => []}),
    ok = start(sec_lists, Base#{allowed => [lists, {?MODULE, echo, 1}, {?MODULE, make_pid, 0}]}),
    ok = start(sec_apply, Base#{allowed => [{erlang, apply}, {erlang, spawn}, {rpc, call},
                                            {timer, apply_after}, {erlang, abs}]}),
    ok = start(sec_send, Base#{allowed => [], send_allowed => [sec_target]}),
    ok = start(sec_atoms, Base#{allowed => [{?MODULE, echo, 1}], new_atoms => 2}),
    [{mode, Mode} | Config].

end_per_group(_Mode, _Config) ->
    [erpy:stop_pool(P) || P <- [sec_none, sec_lists, sec_apply, sec_send, sec_atoms]],
    ok.

%% Item 1: messages obey the policy.

send_by_name_refused(Config) ->
    register(sec_target, self()),
    %% What the attack would create: a path of this run's own, not a shared fixed one.
    Pwned = filename:join(?config(priv_dir, Config), "erpy_pwned"),
    try
        %% The attack of the issue: a $gen_call to rex runs os:cmd as the VM's user.
        Code = <<"import erpy\n"
                 "erlang.send(erpy.Atom('rex'), (erpy.Atom('$gen_call'), (erlang.self(), erpy.Ref('nonode@nohost', 0, (1, 2, 3))),"
                 " (erpy.Atom('call'), erpy.Atom('os'), erpy.Atom('cmd'), ['touch ' + arguments], erpy.Atom('user'))))\n">>,
        {ok, #{status := error, error := #{type := <<"ErlangError">>, message := Msg}}} =
            erpy:run(#{code => Code, arguments => unicode:characters_to_binary(Pwned), pool => sec_none}),
        ?assertMatch({_, _}, binary:match(Msg, <<"not_allowed">>)),
        ?assertNot(filelib:is_regular(Pwned)),
        %% A name that is registered, but not listed.
        {ok, #{status := error, error := #{type := <<"ErlangError">>}}} =
            erpy:run(#{code => <<"import erpy\nerlang.send(erpy.Atom('sec_target'), 1)">>,
                       pool => sec_none}),
        %% Names as str too.
        {ok, #{status := error, error := #{type := <<"ErlangError">>}}} =
            erpy:run(#{code => <<"erlang.send('sec_target', 1)">>, pool => sec_none}),
        %% {Name, Node} too.
        {ok, #{status := error, error := #{type := <<"ErlangError">>}}} =
            erpy:run(#{code => <<"import erpy\nerlang.send((erpy.Atom('sec_target'), erpy.Atom('nonode@nohost')), 1)">>,
                       pool => sec_none}),
        receive Unexpected -> ct:fail({unexpected, Unexpected}) after 200 -> ok end
    after
        unregister(sec_target)
    end.

send_allowed_names(_Config) ->
    register(sec_target, self()),
    try
        {ok, #{status := ok}} =
            erpy:run(#{code => <<"import erpy\nerlang.send(erpy.Atom('sec_target'), 'hello')">>,
                       pool => sec_send}),
        receive <<"hello">> -> ok after 2000 -> ct:fail(no_message) end,
        {ok, #{status := error, error := #{type := <<"ErlangError">>}}} =
            erpy:run(#{code => <<"import erpy\nerlang.send(erpy.Atom('rex'), 'hello')">>,
                       pool => sec_send})
    after
        unregister(sec_target)
    end,
    %% Listed but not registered: a clear error, not a crash.
    {ok, #{status := error, error := #{type := <<"ErlangError">>, message := M}}} =
        erpy:run(#{code => <<"import erpy\nerlang.send(erpy.Atom('sec_target'), 'hello')">>,
                   pool => sec_send}),
    ?assertMatch({_, _}, binary:match(M, <<"noproc">>)).

send_to_given_pids(_Config) ->
    Self = self(),
    Other = spawn_link(fun() -> receive {From, M} -> From ! {relayed, M} end end),
    %% The caller and the pids in this call's arguments may be reached.
    {ok, #{status := ok}} =
        erpy:run(#{code => <<"erlang.send(erlang.self(), 'me')\n"
                             "erlang.send(arguments[0], (arguments[1], 'you'))">>,
                   arguments => [Other, Self], pool => sec_none}),
    receive <<"me">> -> ok after 2000 -> ct:fail(no_message_to_self) end,
    receive {relayed, <<"you">>} -> ok after 2000 -> ct:fail(no_message_to_given) end.

%% A pid Python kept from an earlier call, built with erpy.Pid(...) or decoded from bytes,
%% reaches nothing.
forged_pid_refused(_Config) ->
    Victim = spawn_link(fun() -> receive M -> exit({reached, M}) after 10000 -> ok end end),
    Bytes = term_to_binary(Victim),
    {ok, #{status := error, error := #{type := <<"ErlangError">>, message := M1}}} =
        erpy:run(#{code => <<"import erpy\nerlang.send(erpy.decode(arguments), 'x')">>,
                   arguments => Bytes, pool => sec_none}),
    ?assertMatch({_, _}, binary:match(M1, <<"not_allowed">>)),
    {ok, #{status := error, error := #{type := <<"ErlangError">>}}} =
        erpy:run(#{code => <<"import erpy\np = erpy.decode(arguments)\n"
                             "erlang.send(erpy.Pid(p.node, p.id, p.serial, p.creation), 'x')">>,
                   arguments => Bytes, pool => sec_none}),
    %% Kept from an earlier call on the same worker (the pool has one).
    {ok, _} = erpy:run(#{code => <<"import builtins\nbuiltins._kept = arguments">>,
                         arguments => Victim, pool => sec_none}),
    {ok, #{status := error, error := #{type := <<"ErlangError">>}}} =
        erpy:run(#{code => <<"import builtins\nerlang.send(builtins._kept, 'x')">>, pool => sec_none}),
    %% A reference as an alias, too.
    {ok, #{status := error, error := #{type := <<"ErlangError">>}}} =
        erpy:run(#{code => <<"import erpy\nerlang.send(erpy.decode(arguments), 'x')">>,
                   arguments => term_to_binary(make_ref()), pool => sec_none}),
    ?assert(is_process_alive(Victim)),
    unlink(Victim),
    exit(Victim, kill).

forged_pid_in_callback_args_refused(_Config) ->
    Victim = spawn(fun() -> receive _ -> ok after 10000 -> ok end end),
    {ok, #{status := error, error := #{type := <<"ErlangError">>, message := M}}} =
        erpy:run(#{code => <<"import erpy\nerlang.call('erpy_security_SUITE', 'echo', erpy.decode(arguments))">>,
                   arguments => term_to_binary(Victim), pool => sec_lists}),
    ?assertMatch({_, _}, binary:match(M, <<"not_allowed">>)),
    %% Given in the arguments, or returned by a callback: usable.
    {ok, #{status := ok, result := Victim}} =
        erpy:run(#{code => <<"result = erlang.call('erpy_security_SUITE', 'echo', arguments)">>,
                   arguments => Victim, pool => sec_lists}),
    {ok, #{status := ok, result := P}} =
        erpy:run(#{code => <<"p = erlang.apply('erpy_security_SUITE', 'make_pid', [])\n"
                             "result = erlang.call('erpy_security_SUITE', 'echo', p)">>,
                   pool => sec_lists}),
    ?assert(is_pid(P)),
    exit(Victim, kill).

%% Item 2: funs obey the allow-list.

export_fun_checked(_Config) ->
    Cmd = term_to_binary(fun os:cmd/1),
    %% Handed to an allowed higher-order function: refused as os:cmd/1.
    {ok, #{status := error, error := #{type := <<"ErlangError">>, message := M}}} =
        erpy:run(#{code => <<"import erpy\nerlang.apply('lists', 'map', [erpy.decode(arguments), ['id']])">>,
                   arguments => Cmd, pool => sec_lists}),
    ?assertMatch({_, _}, binary:match(M, <<"cmd">>)),
    %% Returned: refused too.
    ?assertEqual({error, {not_allowed, {'fun', os, cmd, 1}}},
                 erpy:eval(<<"__import__('erpy').decode(x)">>, #{x => Cmd}, #{pool => sec_lists})),
    %% Sent in a message: refused.
    {ok, #{status := error, error := #{type := <<"ErlangError">>}}} =
        erpy:run(#{code => <<"import erpy\nerlang.send(erlang.self(), erpy.decode(arguments))">>,
                   arguments => Cmd, pool => sec_none}),
    %% The very export fun Erlang sent comes back.
    ?assertEqual({ok, fun os:cmd/1}, erpy:eval(<<"f">>, #{f => fun os:cmd/1}, #{pool => sec_none})),
    %% An allowed export fun passes.
    {ok, #{status := ok, result := [[1, 2]]}} =
        erpy:run(#{code => <<"import erpy\nresult = erlang.apply('lists', 'map', [erpy.decode(arguments), [[2, 1]]])">>,
                   arguments => term_to_binary(fun lists:sort/1), pool => sec_lists}),
    receive Unexpected -> ct:fail({unexpected, Unexpected}) after 100 -> ok end.

local_fun_refused(_Config) ->
    Fun = fun(X) -> X + 1 end,
    %% The very fun Erlang sent comes back and may be used.
    ?assertEqual({ok, Fun}, erpy:eval(<<"f">>, #{f => Fun}, #{pool => sec_lists})),
    {ok, #{status := ok, result := [2, 3]}} =
        erpy:run(#{code => <<"result = erlang.apply('lists', 'map', [arguments, [1, 2]])">>,
                   arguments => Fun, pool => sec_lists}),
    %% Its bytes, decoded in Python, in another call: refused.
    Bytes = term_to_binary(Fun),
    ?assertMatch({error, {not_allowed, {'fun', ?MODULE, local, 1}}},
                 erpy:eval(<<"__import__('erpy').decode(x)">>, #{x => Bytes}, #{pool => sec_lists})),
    {ok, #{status := error, error := #{type := <<"ErlangError">>}}} =
        erpy:run(#{code => <<"import erpy\nerlang.apply('lists', 'map', [erpy.decode(arguments), [1]])">>,
                   arguments => Bytes, pool => sec_lists}).

apply_forms_checked(_Config) ->
    %% {erlang, apply} is allowed; os:cmd is not, in any form that names it.
    Forms = [<<"erlang.apply('erlang', 'apply', ['os', 'cmd', ['id']])">>,
             <<"erlang.apply('erlang', 'spawn', ['os', 'cmd', ['id']])">>,
             <<"erlang.apply('rpc', 'call', [erpy.Atom('nonode@nohost'), 'os', 'cmd', ['id']])">>,
             <<"erlang.apply('timer', 'apply_after', [0, 'os', 'cmd', ['id']])">>,
             <<"erlang.apply('erlang', 'apply', ['erlang', 'apply', ['os', 'cmd', [['id']]]])">>],
    [begin
         {ok, #{status := error, error := #{type := <<"ErlangError">>, message := M}}} =
             erpy:run(#{code => <<"import erpy\n", F/binary>>, pool => sec_apply}),
         ?assertMatch({_, _}, binary:match(M, <<"not_allowed">>), F)
     end || F <- Forms],
    %% What the list allows still runs through apply.
    {ok, #{status := ok, result := 5}} =
        erpy:run(#{code => <<"result = erlang.apply('erlang', 'apply', ['erlang', 'abs', [-5]])">>,
                   pool => sec_apply}).

%% Item 3: atoms.

new_atoms_refused(_Config) ->
    Name = fresh_name(),
    Count = erlang:system_info(atom_count),
    ?assertEqual({error, {unknown_atom, Name}},
                 erpy:eval(<<"__import__('erpy').Atom(n)">>, #{n => Name}, #{pool => sec_none})),
    %% Deep inside a result, as a map key, in a pid's node name.
    ?assertEqual({error, {unknown_atom, Name}},
                 erpy:eval(<<"[1, {__import__('erpy').Atom(n): 2}]">>, #{n => Name}, #{pool => sec_none})),
    ?assertMatch({error, {unknown_atom, _}},
                 erpy:eval(<<"__import__('erpy').Pid(n + '@host', 1, 0, 0)">>, #{n => Name}, #{pool => sec_none})),
    %% In callback arguments: ErlangError in Python.
    {ok, #{status := error, error := #{type := <<"ErlangError">>, message := M}}} =
        erpy:run(#{code => <<"import erpy\nerlang.call('erpy_security_SUITE', 'echo', erpy.Atom(arguments))">>,
                   arguments => Name, pool => sec_lists}),
    ?assertMatch({_, _}, binary:match(M, <<"unknown_atom">>)),
    ?assertError(badarg, binary_to_existing_atom(Name, utf8)),
    %% A flood of them creates none either.
    {error, {unknown_atom, _}} =
        erpy:eval(<<"(lambda n: [__import__('erpy').Atom(n + str(i)) for i in range(100000)])(n)">>, #{n => Name},
                  #{pool => sec_none, timeout => 30000}),
    ?assert(erlang:system_info(atom_count) - Count < 100).

new_atoms_budget(_Config) ->
    [A, B, C] = [fresh_name() || _ <- [1, 2, 3]],
    {ok, _} = erpy:eval(<<"__import__('erpy').Atom(n)">>, #{n => A}, #{pool => sec_atoms}),
    {ok, Atom} = erpy:eval(<<"__import__('erpy').Atom(n)">>, #{n => B}, #{pool => sec_atoms}),
    ?assertEqual(B, atom_to_binary(Atom)),
    ?assertEqual({error, {unknown_atom, C}},
                 erpy:eval(<<"__import__('erpy').Atom(n)">>, #{n => C}, #{pool => sec_atoms})),
    %% Atoms that exist are no new atoms.
    ?assertEqual({ok, [ok, Atom]},
                 erpy:eval(<<"[__import__('erpy').Atom('ok'), __import__('erpy').Atom(n)]">>, #{n => B}, #{pool => sec_atoms})).

%% Item 5: an answer Erlang cannot decode is an error value.
undecodable_answer(_Config) ->
    R = erpy:eval(<<"1 << (8 * 9 * 2 ** 20)">>, #{}, #{pool => sec_none, timeout => 20000}),
    ?assertMatch({error, _}, R),
    {ok, 3} = erpy:eval(<<"1 + 2">>, #{}, #{pool => sec_none}).

%% Item 8: after every kind of answer (value, exception, timeout, crash), nothing is left
%% in the caller's mailbox.
no_stray_messages(Config) ->
    Mode = ?config(mode, Config),
    Pool = sec_stray,
    ok = start(Pool, #{mode => Mode, size => 2, allowed => [], kill_grace_ms => 200}),
    try
        Crash = case Mode of
                    port -> <<"import os\nos._exit(3)">>;
                    embedded -> <<"raise SystemExit(3)">>
                end,
        [begin
             _ = erpy:run(#{code => C, pool => Pool}, 300),
             receive Stray -> ct:fail({stray, C, Stray}) after 0 -> ok end
         end || _ <- lists:seq(1, 10),
                C <- [<<"result = 1">>, <<"1/0">>, <<"import time\ntime.sleep(1)">>, Crash]],
        timer:sleep(500),
        receive Stray -> ct:fail({late_stray, Stray}) after 0 -> ok end
    after
        erpy:stop_pool(Pool)
    end.

%% 8 callers, mixed values / exceptions / timeouts / crashes: nothing wrong, lost or stray,
%% and the pool is back to full size. (`make bench` runs it for 2 minutes per mode.)
crash_injection_soak(Config) ->
    Mode = ?config(mode, Config),
    Seconds = list_to_integer(os:getenv("ERPY_SOAK_SECONDS", "15")),
    ok = start(sec_soak, #{mode => Mode, size => 4, allowed => [], kill_grace_ms => 300}),
    try
        R = erpy_soak:run(sec_soak, Mode, 8, Seconds),
        ct:pal("soak ~p: ~p", [Mode, R]),
        ?assertMatch(#{wrong := 0, lost := 0, stray := 0, full_size := true}, R),
        #{calls := Calls, ok := Ok, exceptions := Ex, timeouts := To, crashes := Cr} = R,
        ?assert(Ok > 0 andalso Ex > 0 andalso To > 0 andalso Cr > 0),
        ?assertEqual(Calls, Ok + Ex + To + Cr)
    after
        erpy:stop_pool(sec_soak)
    end.

%% Helpers.

echo(X) -> X.

make_pid() -> spawn(fun() -> ok end).

fresh_name() ->
    iolist_to_binary(io_lib:format("erpy_sec_~b_~b", [erlang:unique_integer([positive]),
                                                        erlang:system_time()])).

start(Name, Opts) ->
    {ok, _} = erpy:start_pool(Name, Opts),
    ok = erpy_test_env:wait_serves(Name, 200).
