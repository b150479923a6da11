%% Hostile Python code against a pool's policy (doc/security.md), in port, embedded and
%% node mode (a node pool's Python code calls back through its caller as the other modes'
%% do; erpy_node_SUITE has the node-only cases). Every case is what an attacker tried: the
%% snippet must be refused with a clear error and the VM must be unchanged.
-module(erpy_security_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, groups/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2]).
-export([send_by_name_refused/1, send_allowed_names/1, send_to_given_pids/1,
         forged_pid_refused/1, forged_pid_in_callback_args_refused/1,
         export_fun_checked/1, local_fun_refused/1, apply_forms_checked/1,
         new_atoms_refused/1, new_atoms_budget/1, undecodable_answer/1,
         no_stray_messages/1, crash_injection_soak/1,
         names_in_arguments_refused/1, indirect_funs_refused/1, many_handles_answered_in_time/1,
         hostile_exceptions/1, async_ids_are_the_callers/1, output_lines_bounded/1]).
%% Called from Python.
-export([echo/1, make_pid/0]).
%% A logger handler that captures Python's output lines.
-export([log/2]).

all() ->
    [{group, port}, {group, embedded}, {group, node}].

groups() ->
    Cases = [send_by_name_refused, send_allowed_names, send_to_given_pids,
             forged_pid_refused, forged_pid_in_callback_args_refused,
             names_in_arguments_refused,
             export_fun_checked, local_fun_refused, apply_forms_checked, indirect_funs_refused,
             new_atoms_refused, new_atoms_budget, undecodable_answer, hostile_exceptions,
             many_handles_answered_in_time, async_ids_are_the_callers, output_lines_bounded,
             no_stray_messages,
             crash_injection_soak],
    [{port, [], Cases}, {embedded, [], Cases}, {node, [], Cases}].

suite() ->
    [{timetrap, {seconds, 120}}].

init_per_suite(Config) ->
    ok = erpy_test_env:start_erpy(),
    Config.

end_per_suite(_Config) ->
    ok.

init_per_group(Mode, Config) ->
    Mode =:= node andalso distributed(),
    Base = base(Mode, 1),
    ok = start(sec_none, Base#{allowed => []}),
    ok = start(sec_lists, Base#{allowed => [lists, maps, {?MODULE, echo, 1}, {?MODULE, make_pid, 0}]}),
    ok = start(sec_apply, Base#{allowed => [{erlang, apply}, {erlang, spawn}, {rpc, call},
                                            {timer, apply_after}, {erlang, abs}, lists, maps]}),
    ok = start(sec_send, Base#{allowed => [], send_allowed => [sec_target]}),
    ok = start(sec_atoms, Base#{allowed => [{?MODULE, echo, 1}], new_atoms => 2}),
    %% Functions that reach a process their arguments name.
    ok = start(sec_dest, Base#{allowed => [{gen_server, call}, {gen_server, cast}, {erlang, apply},
                                           {erlang, send}, {erlang, whereis}, {io, format},
                                           {timer, send_after}, {sys, get_state}, lists],
                               send_allowed => [sec_target]}),
    [{mode, Mode} | Config].

end_per_group(_Mode, _Config) ->
    [erpy:stop_pool(P) || P <- [sec_none, sec_lists, sec_apply, sec_send, sec_atoms, sec_dest]],
    ok.

base(node, N) -> #{mode => node, start => N};
base(Mode, N) -> #{mode => Mode, size => N}.

%% Node pools need this VM to be a distributed node (a name of this run's own).
distributed() ->
    _ = os:cmd("epmd -daemon"),
    case is_alive() of
        true -> ok;
        false -> {ok, _} = net_kernel:start([list_to_atom("ct_sec_" ++ os:getpid() ++ "@127.0.0.1"), longnames])
    end.

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

%% An allowed function that reaches a process named in its arguments (gen_server:call,
%% erlang:send, timers, io to a device, sys, whereis) reaches only what erlang.send may:
%% the issue's attack again, through an allowed gen_server:call to rex.
names_in_arguments_refused(Config) ->
    Pwned = filename:join(?config(priv_dir, Config), "erpy_pwned_by_name"),
    Victim = spawn(fun() -> receive M -> exit({reached, M}) after 30000 -> ok end end),
    register(sec_victim, Victim),
    try
        Prelude = <<"import erpy\nA = erpy.Atom\ncmd = list(map(ord, 'touch ' + arguments))\n">>,
        Attacks = [<<"erlang.apply('gen_server', 'call', [A('rex'), (A('call'), A('os'), A('cmd'), [cmd], A('user'))])">>,
                   <<"erlang.apply('erlang', 'apply', ['gen_server', 'call', [A('rex'), (A('call'), A('os'), A('cmd'), [cmd], A('user'))]])">>,
                   <<"erlang.apply('gen_server', 'cast', [A('sec_victim'), 1])">>,
                   <<"erlang.apply('gen_server', 'call', [(A('sec_victim'), erlang.self().node), 1])">>,
                   <<"erlang.apply('gen_server', 'call', [(A('global'), A('sec_victim')), 1])">>,
                   <<"erlang.apply('gen_server', 'call', [(A('via'), A('global'), A('sec_victim')), 1])">>,
                   <<"erlang.apply('erlang', 'send', [A('sec_victim'), 1])">>,
                   <<"erlang.apply('timer', 'send_after', [0, A('sec_victim'), 1])">>,
                   <<"erlang.apply('io', 'format', [A('user'), 'pwned~n', []])">>,
                   <<"erlang.apply('sys', 'get_state', [A('rex')])">>,
                   %% A pid looked up by name is a pid handed over: not for a name Python may not reach.
                   <<"erlang.send(erlang.apply('erlang', 'whereis', [A('sec_victim')]), 1)">>],
        [begin
             {ok, #{status := error, error := #{type := <<"ErlangError">>, message := M}}} =
                 erpy:run(#{code => <<Prelude/binary, C/binary>>, pool => sec_dest,
                            arguments => unicode:characters_to_binary(Pwned)}),
             ?assertMatch({_, _}, binary:match(M, <<"not_allowed">>), C)
         end || C <- Attacks],
        ?assertNot(filelib:is_regular(Pwned)),
        ?assert(is_process_alive(Victim)),
        %% A pid Erlang handed, and a listed name, are reached.
        Server = spawn_link(fun() -> receive {'$gen_call', From, Req} -> gen_server:reply(From, {got, Req}) end end),
        {ok, #{status := ok, result := {got, <<"hi">>}}} =
            erpy:run(#{code => <<"result = erlang.apply('gen_server', 'call', [arguments, 'hi'])">>,
                       arguments => Server, pool => sec_dest}),
        register(sec_target, self()),
        {ok, #{status := ok}} =
            erpy:run(#{code => <<"import erpy\nerlang.apply('gen_server', 'cast', [erpy.Atom('sec_target'), 'hello'])">>,
                       pool => sec_dest}),
        receive {'$gen_cast', <<"hello">>} -> ok after 5000 -> ct:fail(no_cast) end,
        Self = self(),
        {ok, #{status := ok, result := Self}} =
            erpy:run(#{code => <<"import erpy\nresult = erlang.apply('erlang', 'whereis', [erpy.Atom('sec_target')])">>,
                       pool => sec_dest})
    after
        catch unregister(sec_target),
        unregister(sec_victim),
        exit(Victim, kill)
    end,
    receive Unexpected -> ct:fail({unexpected, Unexpected}) after 100 -> ok end.

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

%% A fun of an allowed function that runs, or reaches, what its arguments name is refused:
%% whatever calls the fun picks those arguments, unchecked.
indirect_funs_refused(_Config) ->
    Prelude = <<"import erpy\nA = erpy.Atom\nf = erpy.decode(bytes(arguments))\nid = list(map(ord, 'id'))\n">>,
    Attacks = [{sec_apply, fun erlang:apply/3, <<"erlang.apply('lists', 'zipwith3', [f, [A('os')], [A('cmd')], [[id]]])">>},
               {sec_apply, fun erlang:apply/3, <<"erlang.apply('maps', 'fold', [f, [id], {A('os'): A('cmd')}])">>},
               {sec_dest, fun gen_server:call/2,
                <<"erlang.apply('lists', 'foldl', [f, (A('call'), A('os'), A('cmd'), [id], A('user')), [A('rex')]])">>},
               {sec_dest, fun erlang:send/2, <<"erlang.apply('lists', 'foldl', [f, 1, [A('rex')]])">>}],
    [begin
         {ok, #{status := error, error := #{type := <<"ErlangError">>, message := M}}} =
             erpy:run(#{code => <<Prelude/binary, C/binary>>, arguments => term_to_binary(Fun), pool => Pool}),
         ?assertMatch({_, _}, binary:match(M, <<"not_allowed">>), C)
     end || {Pool, Fun, C} <- Attacks],
    %% The very fun Erlang handed is Erlang's choice: it runs.
    {ok, #{status := ok, result := [3]}} =
        erpy:run(#{code => <<"import erpy\nA = erpy.Atom\n"
                             "result = erlang.apply('lists', 'zipwith3', [arguments, [A('erlang')], [A('abs')], [[-3]]])">>,
                   arguments => fun erlang:apply/3, pool => sec_apply}).

%% Python naming a pid Erlang handed 20,000 times, in a request with large arguments, is
%% answered: each check is a lookup (walking the arguments for each one held the caller
%% for minutes, past its timeout).
many_handles_answered_in_time(_Config) ->
    Pid = spawn(fun() -> receive after 60000 -> ok end end),
    Big = lists:seq(1, 200000),
    ?assertMatch({ok, #{status := ok, result := 20000}},
                 erpy:run(#{code => <<"p = arguments[1]\n"
                                      "result = len(erlang.call('erpy_security_SUITE', 'echo', [p] * 20000))">>,
                            arguments => [Big, Pid], pool => sec_lists}, 30000)),
    exit(Pid, kill).

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

%% An exception whose text is hostile (a __str__ or __repr__ that raises or never returns,
%% text that is no UTF-8, a cycle of causes, a huge message) is an error value, and the
%% pool goes on serving.
hostile_exceptions(_Config) ->
    Run = fun(Code) -> erpy:run(#{code => Code, pool => sec_none}, 10000) end,
    {ok, #{status := error, error := #{type := <<"ValueError">>, message := <<"<unprintable>">>}}} =
        Run(<<"class E:\n    def __repr__(self): raise RuntimeError('no')\n    __str__ = __repr__\nraise ValueError(E())">>),
    {ok, #{status := error, error := #{type := <<"E">>}}} =
        Run(<<"class E(Exception):\n    def __eq__(s, o): raise RuntimeError('eq')\n"
              "    def __hash__(s): raise RuntimeError('h')\n    def __str__(s): raise RuntimeError('s')\n"
              "raise E(E())">>),
    %% Lone surrogates in the message and the traceback.
    {ok, #{status := error, error := #{type := <<"ValueError">>, message := M1, traceback := [_ | _]}}} =
        Run(<<"raise ValueError('bad \\udc80 text')">>),
    ?assertMatch({_, _}, binary:match(M1, <<"bad ">>)),
    ?assert(is_binary(unicode:characters_to_binary(M1))),
    %% __str__ giving a str subclass.
    {ok, #{status := error, error := #{type := <<"ValueError">>, message := <<"sub">>}}} =
        Run(<<"class S(str):\n    def __repr__(self): raise RuntimeError('r')\n"
              "class E:\n    def __str__(self): return S('sub')\nraise ValueError(E())">>),
    {ok, #{status := error, error := #{type := <<"ValueError">>, message := <<"a">>}}} =
        Run(<<"a = ValueError('a'); b = ValueError('b'); a.__cause__ = b; b.__cause__ = a\nraise a">>),
    %% A __str__ that never returns: the request times out.
    ?assertEqual({error, timeout},
                 erpy:run(#{code => <<"class E:\n    def __str__(self):\n        while True: pass\n"
                                      "    __repr__ = __str__\nraise ValueError(E())">>,
                            pool => sec_none}, 2000)),
    %% Larger than the pool takes.
    ?assertMatch({error, {message_too_large, _, _}},
                 erpy:run(#{code => <<"raise ValueError('x' * 20000000)">>, pool => sec_none}, 20000)),
    {ok, 3} = erpy:eval(<<"1 + 2">>, #{}, #{pool => sec_none}).

%% Only the process that started an asynchronous request may cancel or await it: another
%% one cannot take its answer or stop it.
async_ids_are_the_callers(_Config) ->
    {ok, Id} = erpy:async_eval(<<"__import__('time').sleep(1) or 7">>, #{}, #{pool => sec_none}),
    Self = self(),
    _ = spawn_link(fun() -> Self ! {other, erpy:cancel(Id), erpy:await(Id, 100)} end),
    receive
        {other, Cancel, Await} ->
            ?assertEqual({error, {badarg, {async_id, Id}}}, Cancel),
            ?assertEqual({error, {badarg, {async_id, Id}}}, Await)
    after 5000 -> ct:fail(no_answer_from_other)
    end,
    ?assertEqual({ok, 7}, erpy:await(Id, 10000)).

%% print() output reaches the logger in lines of at most 64 KiB, however long the line
%% Python writes (embedded mode sent it as one message of its size into the VM). Node
%% pools read their nodes' output through a port in lines of 4096 bytes.
output_lines_bounded(Config) ->
    case ?config(mode, Config) of
        node ->
            {skip, "a node's output comes through a {line, 4096} port"};
        _ ->
            ok = logger:add_handler(sec_capture, ?MODULE, #{config => #{pid => self()}, level => all}),
            try
                {ok, #{status := ok}} =
                    erpy:run(#{code => <<"print('z' * 1000000 + '\\u00e9' * 100000)">>, pool => sec_none}),
                Lines = output_lines(1200000, []),
                ?assert(lists:all(fun(L) -> byte_size(L) =< 65536 end, Lines)),
                All = iolist_to_binary(Lines),
                ?assertEqual(1200000, byte_size(All)),
                ?assertEqual(100000, string:length(binary:part(All, 1000000, 200000)))
            after
                logger:remove_handler(sec_capture)
            end
    end.

output_lines(Left, Acc) when Left =< 0 ->
    lists:reverse(Acc);
output_lines(Left, Acc) ->
    receive
        {sec_log, Line} -> output_lines(Left - byte_size(Line), [Line | Acc])
    after 10000 ->
        ct:fail({output_missing, Left})
    end.

log(#{msg := {"~ts", [Text]}, meta := #{domain := [erpy, python], pool := sec_none}},
    #{config := #{pid := Pid}}) ->
    Pid ! {sec_log, unicode:characters_to_binary(Text)};
log(_Event, _Config) ->
    ok.

%% Item 8: after every kind of answer (value, exception, timeout, crash), nothing is left
%% in the caller's mailbox.
no_stray_messages(Config) ->
    Mode = ?config(mode, Config),
    Pool = sec_stray,
    ok = start(Pool, (base(Mode, 2))#{allowed => [], kill_grace_ms => 200}),
    try
        Crash = case Mode of
                    embedded -> <<"raise SystemExit(3)">>;
                    _ -> <<"import os\nos._exit(3)">>
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
    %% Node mode: two Python nodes (each runs many calls at once).
    Size = case Mode of node -> 2; _ -> 4 end,
    ok = start(sec_soak, (base(Mode, Size))#{allowed => [], kill_grace_ms => 300}),
    try
        R = erpy_soak:run(sec_soak, Mode, 8, Seconds),
        ct:pal("soak ~p: ~p", [Mode, R]),
        ?assertMatch(#{wrong := 0, lost := 0, stray := 0, full_size := true}, R),
        #{calls := Calls, ok := Ok, exceptions := Ex, timeouts := To, crashes := Cr} = R,
        ?assert(Ok > 0 andalso Ex > 0 andalso To > 0 andalso Cr > 0),
        %% Node mode: a crash also ends the calls in flight on that node (collateral).
        ?assertEqual(Calls, Ok + Ex + To + Cr + maps:get(collateral, R, 0))
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
