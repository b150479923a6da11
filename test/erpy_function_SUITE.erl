%% Stateful Python functions hosted by Erlang (erpy_function, issue 14), in every pool
%% mode: the workflow example (A casts to B, B calls C), the handler contract (replies,
%% no reply, errors), the host API through the pool's policy, delayed casts, state synced
%% to Mnesia and given back to a restarted instance (crash, lost worker, Mnesia restart),
%% supervision with restart limits, and telemetry to logger.
-module(erpy_function_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, groups/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2, init_per_testcase/2, end_per_testcase/2]).
-export([workflow/1, call_answers/1, cast_error_reported/1, calls_out/1, cast_raw/1,
         restart_restores_state/1, worker_lost_restores_state/1, delayed_casts_in_order/1,
         stop_runs_handle_stop/1, restart_limit/1, init_failure/1, duplicate_id/1,
         bad_options/1, host_needs_policy/1, host_outside_instance/1, telemetry_to_logger/1,
         state_on_disc/1, one_handler_at_a_time/1, embedded_holds_no_context/1,
         store_of_another_node/1, one_instance_hammered/1, direct_call_timeout/1,
         killed_direct_caller/1]).
%% logger handler callback (telemetry_to_logger).
-export([log/2]).

-define(ALLOW, [{erpy_function, host, 1}]).

all() ->
    [{group, port}, {group, embedded}, {group, node}, state_on_disc, store_of_another_node].

groups() ->
    Cases = [workflow, call_answers, cast_error_reported, calls_out, cast_raw,
             restart_restores_state, delayed_casts_in_order, stop_runs_handle_stop,
             restart_limit, init_failure, duplicate_id, bad_options, host_needs_policy,
             host_outside_instance, telemetry_to_logger, one_handler_at_a_time,
             one_instance_hammered, direct_call_timeout, killed_direct_caller],
    [{port, [], Cases ++ [worker_lost_restores_state]},
     {embedded, [], Cases ++ [embedded_holds_no_context]},
     {node, [], Cases ++ [worker_lost_restores_state]}].

suite() ->
    [{timetrap, {seconds, 120}}].

init_per_suite(Config) ->
    %% Distribution first: Mnesia's schema belongs to the node's name.
    case is_alive() of
        true -> ok;
        false -> {ok, _} = net_kernel:start(['ct_func@127.0.0.1', longnames])
    end,
    ok = erpy_test_env:start_erpy(),
    Store = filename:join(?config(priv_dir, Config), "mnesia"),
    ok = application:set_env(erpy, function_store_dir, Store),
    ok = erpy_function:ensure_store(),
    Root = os:getenv("ERPY_ROOT", filename:dirname(code:priv_dir(erpy))),
    Dirs = [filename:join(Root, "examples/py"), filename:join(Root, "test/py")],
    [{pydirs, Dirs}, {store, Store} | Config].

end_per_suite(_Config) ->
    _ = application:stop(mnesia),
    application:stop(erpy),
    ok.

init_per_group(Mode, Config) ->
    Dirs = ?config(pydirs, Config),
    Base = #{mode => Mode, timeout => 5000, allowed => ?ALLOW},
    Pool = list_to_atom("fn_" ++ atom_to_list(Mode)),
    Bare = list_to_atom("fn_bare_" ++ atom_to_list(Mode)),
    Extra = case Mode of
                port -> #{size => 8, pythonpath => Dirs};
                embedded -> #{size => 8};
                node -> #{start => 1, pythonpath => Dirs}
            end,
    {ok, _} = erpy:start_pool(Pool, maps:merge(Base, Extra)),
    {ok, _} = erpy:start_pool(Bare, maps:merge(Base#{allowed => []}, Extra#{size => 2})),
    ok = erpy_test_env:wait_serves(Pool, 200),
    ok = erpy_test_env:wait_serves(Bare, 200),
    %% Embedded: one interpreter in the VM, the suite's functions join its path.
    [ok = erpy:exec(iolist_to_binary(["import sys; sys.path.insert(0, '", D, "')"]),
                    #{pool => Pool}) || Mode =:= embedded, D <- Dirs],
    [{mode, Mode}, {pool, Pool}, {bare, Bare} | Config].

end_per_group(_Mode, Config) ->
    _ = erpy:stop_pool(?config(pool, Config)),
    _ = erpy:stop_pool(?config(bare, Config)),
    ok.

init_per_testcase(Case, Config) ->
    Prefix = iolist_to_binary([atom_to_list(Case), "_",
                               atom_to_list(proplists:get_value(mode, Config, none)), "_"]),
    [{prefix, Prefix} | Config].

end_per_testcase(store_of_another_node, _Config) ->
    ok;
end_per_testcase(_Case, Config) ->
    Prefix = ?config(prefix, Config),
    %% Every instance the case started goes, with its state.
    [begin _ = erpy_function:stop(Id), _ = erpy_function:delete_state(Id) end
     || {Id, _, _} <- ets:tab2list(erpy_function_registry), is_binary(Id),
        binary:longest_common_prefix([Id, Prefix]) =:= byte_size(Prefix)],
    ok.

%% ---- cases ------------------------------------------------------------------------------

workflow(Config) ->
    ct:comment("A casts to B, B calls C, B casts the answer out; B's count survives a crash"),
    [A, B, C] = [id(Config, N) || N <- [<<"a">>, <<"b">>, <<"c">>]],
    {ok, _} = start(Config, C, <<"function_workflow:StageC">>, #{}),
    {ok, _} = start(Config, B, <<"function_workflow:StageB">>,
                    #{aliases => #{<<"lookup">> => C, <<"out">> => self()},
                      init_payload => <<"demo">>}),
    {ok, _} = start(Config, A, <<"function_workflow:StageA">>, #{aliases => #{<<"next">> => B}}),
    ok = erpy_function:cast(A, <<"  Hello ">>),
    ok = erpy_function:cast(A, "World"),
    Node = atom_to_binary(node()),
    ?assertEqual({{Node, B}, <<"1:5/olleh">>}, out()),
    ?assertEqual({{Node, B}, <<"2:5/dlrow">>}, out()),
    exit(erpy_function:whereis(B), kill),
    wait_restarted(B),
    ?assertEqual({reply, <<"2">>}, erpy_function:call(B, <<"count">>)),
    ok = erpy_function:cast(A, <<"again">>),
    ?assertEqual({{Node, B}, <<"3:5/niaga">>}, out()).

call_answers(Config) ->
    Id = id(Config, <<"kv">>),
    {ok, Pid} = start(Config, Id, <<"function_cases:Kv">>, #{init_payload => <<"hello">>}),
    ?assertEqual({reply, <<"echo:x">>}, erpy_function:call(Id, <<"x">>)),
    ?assertEqual({reply, <<"echo:y">>}, erpy_function:call(Pid, [<<"y">>], 2000)),
    ?assertEqual(noreply, erpy_function:call(Id, <<"noret">>)),
    ?assertEqual({reply, <<"hello">>}, erpy_function:call(Id, <<"payload">>)),
    ?assertMatch({error, #{type := <<"KeyError">>}}, erpy_function:call(Id, <<"boom">>)),
    ?assertEqual({reply, <<"n1/f9">>},
                 erpy_function:call(Id, <<"src">>, #{src => {<<"n1">>, <<"f9">>}})),
    Slf = iolist_to_binary([atom_to_binary(node()), "/", Id]),
    ?assertEqual({reply, Slf}, erpy_function:call(Id, <<"slf">>)),
    ?assertEqual({error, {no_instance, <<"nobody">>}}, erpy_function:call(<<"nobody">>, <<"x">>)),
    ?assertEqual({error, {badarg, msg}}, erpy_function:call(Id, 42)),
    %% A handler that outlives its timeout is interrupted; the instance carries on.
    ?assertEqual({error, timeout}, erpy_function:call(Id, <<"spin 10">>, 300)),
    ?assertEqual({reply, <<"echo:z">>}, erpy_function:call(Id, <<"z">>)),
    ?assertEqual(Pid, erpy_function:whereis(Id)).

cast_error_reported(Config) ->
    Id = id(Config, <<"kv">>),
    {ok, Pid} = start(Config, Id, <<"function_cases:Kv">>, #{}),
    ok = erpy_function:cast(Id, <<"boom">>),
    ok = erpy_function:cast(Id, <<"4">>),
    ?assertEqual({reply, <<"4">>}, erpy_function:call(Id, <<"get">>)),
    {ok, #{errors := 1}} = erpy_function:info(Id),
    ?assertEqual(Pid, erpy_function:whereis(Id)).

calls_out(Config) ->
    ct:comment("call to an instance, to an Erlang process, to nothing, to itself"),
    [Kv, Other] = [id(Config, N) || N <- [<<"kv">>, <<"other">>]],
    Erl = spawn_link(fun erl_function/0),
    {ok, _} = start(Config, Other, <<"function_cases:Kv">>, #{}),
    {ok, _} = start(Config, Kv, <<"function_cases:Kv">>,
                    #{aliases => #{<<"other">> => Other, <<"erl">> => Erl, <<"self">> => Kv,
                                   <<"gone">> => <<"no_such_instance">>}}),
    ?assertEqual({reply, <<"echo:q">>}, erpy_function:call(Kv, <<"ask other q">>)),
    ?assertEqual({reply, <<"noreply">>}, erpy_function:call(Kv, <<"ask other noret">>)),
    ?assertEqual({reply, <<"erl:q">>}, erpy_function:call(Kv, <<"ask erl q">>)),
    ?assertMatch({reply, <<"error:", _/binary>>}, erpy_function:call(Kv, <<"ask other boom">>)),
    ?assertEqual({reply, <<"error:(Atom('no_alias'), 'nope')">>},
                 erpy_function:call(Kv, <<"ask nope q">>)),
    ?assertEqual({reply, <<"error:(Atom('no_instance'), 'no_such_instance')">>},
                 erpy_function:call(Kv, <<"ask gone q">>)),
    ?assertEqual({reply, <<"error:Atom('self_call')">>}, erpy_function:call(Kv, <<"ask self q">>)),
    %% set_alias rewires a running instance.
    ok = erpy_function:set_alias(Kv, <<"nope">>, Erl),
    ?assertEqual({reply, <<"erl:r">>}, erpy_function:call(Kv, <<"ask nope r">>)).

cast_raw(Config) ->
    [Kv, Other] = [id(Config, N) || N <- [<<"kv">>, <<"other">>]],
    {ok, _} = start(Config, Other, <<"function_cases:Kv">>, #{aliases => #{<<"out">> => self()}}),
    {ok, _} = start(Config, Kv, <<"function_cases:Kv">>, #{}),
    ok = erpy_function:cast(Kv, <<"raw ", Other/binary>>),
    ?assertEqual({{atom_to_binary(node()), Other}, <<"got-raw">>}, out()).

restart_restores_state(Config) ->
    Id = id(Config, <<"kv">>),
    {ok, Pid} = start(Config, Id, <<"function_cases:Kv">>, #{}),
    ok = erpy_function:cast(Id, <<"5">>),
    ok = erpy_function:cast(Id, <<"7">>),
    ?assertEqual({reply, <<"12">>}, erpy_function:call(Id, <<"get">>)),
    ?assertEqual({ok, <<"12">>}, erpy_function:read_state(Id)),
    exit(Pid, kill),
    New = wait_restarted(Id),
    ?assertNotEqual(Pid, New),
    ?assertEqual({reply, <<"12">>}, erpy_function:call(Id, <<"get">>)).

worker_lost_restores_state(Config) ->
    ct:comment("the worker's Python dies under the instance: restarted with its state"),
    Id = id(Config, <<"kv">>),
    {ok, Pid} = start(Config, Id, <<"function_cases:Kv">>, #{}),
    ok = erpy_function:cast(Id, <<"3">>),
    ?assertEqual({reply, <<"3">>}, erpy_function:call(Id, <<"get">>)),
    Ref = monitor(process, Pid),
    ok = erpy_function:cast(Id, <<"die">>),
    receive {'DOWN', Ref, process, Pid, _} -> ok after 20000 -> ct:fail(not_down) end,
    wait_restarted(Id, 300),
    ?assertEqual({reply, <<"3">>}, erpy_function:call(Id, <<"get">>, 10000)).

delayed_casts_in_order(Config) ->
    ct:comment("delayed casts arrive by due time, then request order, never early"),
    Id = id(Config, <<"kv">>),
    {ok, _} = start(Config, Id, <<"function_cases:Kv">>, #{aliases => #{<<"out">> => self()}}),
    T0 = erlang:monotonic_time(millisecond),
    ok = erpy_function:cast(Id, <<"delay 120,40,80,40,0">>),
    Got = [begin {_, M} = out(), {M, erlang:monotonic_time(millisecond) - T0} end
           || _ <- lists:seq(1, 5)],
    ?assertEqual([<<"4:0">>, <<"1:40">>, <<"3:40">>, <<"2:80">>, <<"0:120">>],
                 [M || {M, _} <- Got]),
    [?assert(Elapsed >= binary_to_integer(lists:last(binary:split(M, <<":">>))))
     || {M, Elapsed} <- Got],
    {ok, #{delayed := 0}} = erpy_function:info(Id).

stop_runs_handle_stop(Config) ->
    Id = id(Config, <<"kv">>),
    {ok, Pid} = start(Config, Id, <<"function_cases:Kv">>, #{aliases => #{<<"out">> => self()}}),
    ok = erpy_function:cast(Id, <<"2">>),
    {reply, <<"2">>} = erpy_function:call(Id, <<"get">>),
    Ref = monitor(process, Pid),
    ok = erpy_function:stop(Id),
    ?assertMatch({_, <<"stopped">>}, out()),
    receive {'DOWN', Ref, process, Pid, normal} -> ok after 5000 -> ct:fail(not_stopped) end,
    timer:sleep(100),
    ?assertEqual(undefined, erpy_function:whereis(Id)),
    ?assertEqual({error, not_found}, erpy_function:stop(Id)),
    ?assertEqual({ok, <<"2">>}, erpy_function:read_state(Id)),
    %% Its worker went back to the pool, namespace cleared: the pool still serves.
    ?assertEqual({ok, 2}, erpy:eval(<<"1 + 1">>, #{}, #{pool => ?config(pool, Config)})).

restart_limit(Config) ->
    Id = id(Config, <<"kv">>),
    {ok, P1} = start(Config, Id, <<"function_cases:Kv">>, #{max_restarts => {1, 60}}),
    exit(P1, kill),
    P2 = wait_restarted(Id),
    Ref = monitor(process, P2),
    exit(P2, kill),
    receive {'DOWN', Ref, process, P2, killed} -> ok end,
    timer:sleep(300),
    ?assertEqual(undefined, erpy_function:whereis(Id)).

init_failure(Config) ->
    Id = id(Config, <<"kv">>),
    ?assertMatch({error, {init_failed, #{type := <<"ValueError">>}}},
                 start(Config, Id, <<"function_cases:Kv">>, #{init_payload => <<"fail-init">>})),
    ?assertMatch({error, {init_failed, #{type := <<"ModuleNotFoundError">>}}},
                 start(Config, Id, <<"no_such_module_xyz">>, #{})),
    ?assertEqual(undefined, erpy_function:whereis(Id)),
    %% The workers it held went back: the pool serves.
    ?assertEqual({ok, 2}, erpy:eval(<<"1 + 1">>, #{}, #{pool => ?config(pool, Config)})).

duplicate_id(Config) ->
    Id = id(Config, <<"kv">>),
    {ok, Pid} = start(Config, Id, <<"function_cases:Kv">>, #{}),
    ?assertEqual({error, {already_started, Pid}}, start(Config, Id, <<"function_cases:Kv">>, #{})).

bad_options(Config) ->
    Id = id(Config, <<"kv">>),
    M = <<"function_cases:Kv">>,
    ?assertEqual({error, {badarg, id}}, erpy_function:start(#{module => M})),
    ?assertEqual({error, {badarg, {id, <<>>}}}, erpy_function:start(#{id => <<>>, module => M})),
    ?assertEqual({error, {badarg, module}}, erpy_function:start(#{id => Id})),
    ?assertMatch({error, {badarg, {aliases, _}}}, start(Config, Id, M, #{aliases => #{a => 1}})),
    ?assertMatch({error, {badarg, {timeout, _}}}, start(Config, Id, M, #{timeout => -1})),
    ?assertMatch({error, {badarg, {max_restarts, _}}}, start(Config, Id, M, #{max_restarts => 3})),
    ?assertMatch({error, {no_worker, {no_pool, nopool}}},
                 erpy_function:start(#{id => Id, module => M, pool => nopool})).

host_needs_policy(Config) ->
    ct:comment("a pool that does not allow erpy_function:host/1: the host API is refused"),
    Id = id(Config, <<"kv">>),
    {ok, _} = erpy_function:start(#{id => Id, module => <<"function_cases:Kv">>,
                                    pool => ?config(bare, Config), store => none,
                                    aliases => #{<<"out">> => self()}}),
    %% Handlers that use no host API work; those that do fail with not_allowed.
    ?assertEqual({reply, <<"echo:x">>}, erpy_function:call(Id, <<"x">>)),
    ?assertMatch({error, #{type := <<"ErlangError">>, message := <<"(Atom('not_allowed')", _/binary>>}},
                 erpy_function:call(Id, <<"ask out x">>)),
    ok = erpy_function:cast(Id, <<"to x">>),
    {reply, _} = erpy_function:call(Id, <<"get">>),
    {ok, #{errors := 2}} = erpy_function:info(Id),
    receive {erpy_function, cast, _, _} = M -> ct:fail({arrived, M}) after 100 -> ok end.

host_outside_instance(Config) ->
    ct:comment("host/1 reached from a request that is not an instance's acts for nobody"),
    Code = <<"erlang.call('erpy_function', 'host', (__import__('erpy').Atom('sync'), b'x'))">>,
    ?assertEqual({ok, {error, not_an_instance}},
                 erpy:eval(Code, #{}, #{pool => ?config(pool, Config)})),
    ?assertEqual({error, not_an_instance}, erpy_function:host({sync, <<"x">>})).

telemetry_to_logger(Config) ->
    Id = id(Config, <<"kv">>),
    HandlerId = list_to_atom("fn_log_" ++ atom_to_list(?config(mode, Config))),
    ok = logger:add_handler(HandlerId, ?MODULE, #{config => #{pid => self()},
                                                  filter_default => log,
                                                  filters => []}),
    try
        {ok, _} = start(Config, Id, <<"function_cases:Kv">>, #{}),
        ok = erpy_function:cast(Id, <<"log hello there">>),
        receive
            {logged, warning, #{erpy_function := Id, target := <<"kv">>}, Text} ->
                ?assertEqual(<<"kv: hello there">>, Text)
        after 5000 -> ct:fail(no_log)
        end
    after
        logger:remove_handler(HandlerId)
    end.

state_on_disc(Config) ->
    ct:comment("the store is disc_copies and keeps state across a Mnesia restart"),
    ?assertEqual(disc_copies, mnesia:table_info(erpy_function_state, storage_type)),
    {ok, _} = erpy:start_pool(fn_disc, #{size => 1, allowed => ?ALLOW,
                                         pythonpath => ?config(pydirs, Config)}),
    ok = erpy_test_env:wait_serves(fn_disc, 100),
    Id = <<"disc_kv">>,
    Opts = #{id => Id, module => <<"function_cases:Kv">>, pool => fn_disc},
    try
        {ok, _} = erpy_function:start(Opts),
        ok = erpy_function:cast(Id, <<"41">>),
        {reply, <<"41">>} = erpy_function:call(Id, <<"get">>),
        ok = erpy_function:stop(Id),
        stopped = mnesia:stop(),
        ok = erpy_function:ensure_store(),
        {ok, _} = erpy_function:start(Opts),
        ?assertEqual({reply, <<"41">>}, erpy_function:call(Id, <<"get">>))
    after
        _ = erpy_function:stop(Id),
        _ = erpy_function:delete_state(Id),
        erpy:stop_pool(fn_disc)
    end.

%% A store directory that a node of another name wrote: its table lives on that node, so
%% ensure_store/0 says so at once instead of waiting for it (30 s) and timing out.
store_of_another_node(Config) ->
    Dir = filename:join(?config(priv_dir, Config), "store_other_node"),
    Ebin = filename:dirname(code:which(erpy_function)),
    Erl = os:find_executable("erl"),
    Run = fun(Name, Eval) ->
                  os:cmd(Erl ++ " -noshell -name " ++ Name ++ "_" ++ os:getpid() ++ "@127.0.0.1 -pa "
                         ++ Ebin ++ " -eval 'application:set_env(erpy, function_store_dir, \""
                         ++ Dir ++ "\"), " ++ Eval ++ ", halt().'")
          end,
    ?assertMatch("ok" ++ _, Run("store_a", "io:format(\"~p\", [erpy_function:ensure_store()])")),
    Out = Run("store_b", "T0 = erlang:monotonic_time(millisecond), R = erpy_function:ensure_store(), "
                         "io:format(\"~w ~w\", [R, erlang:monotonic_time(millisecond) - T0])"),
    {match, [Ms]} = re:run(Out, "held_by_other_nodes.* (\\d+)$", [{capture, [1], list}]),
    ?assert(list_to_integer(Ms) < 10000).

one_handler_at_a_time(Config) ->
    ct:comment("several callers of one instance: handlers run one at a time, in order with "
               "casts; the instance killed mid-call: its callers get an error, never hang"),
    Id = id(Config, <<"kv">>),
    {ok, Pid} = start(Config, Id, <<"function_cases:Kv">>, #{}),
    Self = self(),
    Callers = [spawn_link(fun() -> Self ! {self(), erpy_function:call(Id, <<"excl 0.05">>)} end)
               || _ <- lists:seq(1, 4)],
    ?assertEqual([{reply, <<"alone">>} || _ <- Callers],
                 [receive {C, A} -> A after 20000 -> ct:fail(no_answer) end || C <- Callers]),
    %% A cast then a call from one process: the call sees the cast.
    ok = erpy_function:cast(Id, <<"6">>),
    ?assertEqual({reply, <<"6">>}, erpy_function:call(Id, <<"get">>)),
    Busy = [spawn_link(fun() -> Self ! {self(), erpy_function:call(Id, <<"excl 2">>, 10000)} end)
            || _ <- lists:seq(1, 3)],
    timer:sleep(200),
    exit(Pid, kill),
    [receive {C, A} -> ?assertMatch({error, _}, A) after 15000 -> ct:fail(hung) end
     || C <- Busy],
    wait_restarted(Id),
    ?assertEqual({reply, <<"6">>}, erpy_function:call(Id, <<"get">>)).

one_instance_hammered(Config) ->
    ct:comment("many callers hammer one instance with calls, casts and delayed casts: the "
               "count is exact, no two handlers overlap, and each caller's call sees its "
               "own earlier cast"),
    Id = id(Config, <<"hammer">>),
    {ok, _} = start(Config, Id, <<"function_cases:Hammer">>, #{aliases => #{<<"me">> => Id}}),
    Self = self(),
    Callers = 8,
    Rounds = 40,
    %% Calls only, spaced out: callers often find the instance idle and run their call
    %% themselves, and often not (the instance process then runs it): both at once would
    %% show as an overlap.
    Calls = fun(_I) ->
                    [begin
                         {reply, _} = erpy_function:call(Id, <<"inc">>),
                         timer:sleep(rand:uniform(2) - 1)
                     end || _ <- lists:seq(1, Rounds)]
            end,
    %% Casts, calls and delayed casts mixed.
    Mixed = fun(I) ->
                    IB = integer_to_binary(I),
                    [begin
                         KB = integer_to_binary(K),
                         ok = erpy_function:cast(Id, <<"mark ", IB/binary, " ", KB/binary>>),
                         {reply, KB} = erpy_function:call(Id, <<"last ", IB/binary>>),
                         {reply, _} = erpy_function:call(Id, <<"inc">>),
                         _ = K rem 8 =:= 0 andalso erpy_function:cast(Id, <<"delay">>)
                     end || K <- lists:seq(1, Rounds)]
            end,
    Hammer = fun(Run) ->
                     Pids = [spawn_link(fun() -> Run(I), Self ! {done, self()} end)
                             || I <- lists:seq(1, Callers)],
                     [receive {done, P} -> ok after 60000 -> ct:fail(hammer_hung) end
                      || P <- Pids]
             end,
    Hammer(Calls),
    Hammer(Mixed),
    %% Calls count once; mixed rounds twice (mark, inc), every 8th two delayed incs more.
    Expected = Callers * Rounds + Callers * (2 * Rounds + 2 * (Rounds div 8)),
    ?assertEqual(iolist_to_binary([integer_to_binary(Expected), " 0"]),
                 wait_count(Id, Expected, 200)),
    {ok, #{errors := 0}} = erpy_function:info(Id).

wait_count(Id, Expected, Tries) ->
    {reply, Got} = erpy_function:call(Id, <<"get">>),
    [N, _] = binary:split(Got, <<" ">>),
    case binary_to_integer(N) < Expected andalso Tries > 0 of
        true -> timer:sleep(20), wait_count(Id, Expected, Tries - 1);
        false -> Got
    end.

direct_call_timeout(Config) ->
    ct:comment("a call that times out leaves the instance usable: later calls and casts "
               "run, from the same and from other processes"),
    Id = id(Config, <<"kv">>),
    {ok, Pid} = start(Config, Id, <<"function_cases:Kv">>, #{}),
    ?assertMatch({error, _}, erpy_function:call(Id, <<"spin 2">>, 300)),
    ok = erpy_function:cast(Id, <<"4">>),
    ?assertEqual({reply, <<"4">>}, erpy_function:call(Id, <<"get">>, 5000)),
    Self = self(),
    _ = spawn_link(fun() -> Self ! {got, erpy_function:call(Id, <<"get">>)} end),
    ?assertEqual({reply, <<"4">>}, receive {got, A} -> A after 10000 -> hung end),
    %% A caller killed in the middle of a call: the instance goes on.
    Doomed = spawn(fun() -> erpy_function:call(Id, <<"spin 0.5">>, 5000) end),
    timer:sleep(100),
    exit(Doomed, kill),
    ok = erpy_function:cast(Id, <<"1">>),
    ?assertEqual({reply, <<"5">>}, erpy_function:call(Id, <<"get">>, 10000)),
    ?assertEqual(Pid, erpy_function:whereis(Id)).

killed_direct_caller(Config) ->
    ct:comment("a caller killed while its direct call runs: the next call is answered "
               "once the killed one has stopped in Python, well within its own timeout, "
               "and never beside it"),
    Id = id(Config, <<"kv">>),
    {ok, Pid} = start(Config, Id, <<"function_cases:Kv">>, #{}),
    %% Idle: the call runs in the caller's process, which holds the instance's turn.
    Doomed = spawn(fun() -> erpy_function:call(Id, <<"excl 1.5">>, 5000) end),
    timer:sleep(200),
    exit(Doomed, kill),
    %% Within 3 s: the instance no longer waits its timeout plus a grace (7 s) for the
    %% dead holder.
    ?assertEqual({reply, <<"alone">>}, erpy_function:call(Id, <<"excl 0.05">>, 3000)),
    ?assertEqual({reply, <<"alone">>}, erpy_function:call(Id, <<"excl 0.05">>, 3000)),
    ?assertEqual(Pid, erpy_function:whereis(Id)).

embedded_holds_no_context(Config) ->
    ct:comment("embedded: an instance holds no context, and its Python entry goes with it "
               "(stop, kill, failed init)"),
    Pool = ?config(pool, Config),
    Id = id(Config, <<"kv">>),
    {ok, #{held := Held0}} = erpy:pool_info(Pool),
    {ok, P1} = start(Config, Id, <<"function_cases:Kv">>, #{}),
    ?assertMatch({ok, #{held := Held0}}, erpy:pool_info(Pool)),
    ?assertEqual(1, py_entries(Pool, Id)),
    exit(P1, kill),
    P2 = wait_restarted(Id),
    ?assertNotEqual(P1, P2),
    {reply, _} = erpy_function:call(Id, <<"get">>),
    ?assertEqual(1, py_entries(Pool, Id)),
    %% Over its restart limit, killed: nobody restarts it; its janitor drops the entry.
    ok = erpy_function:stop(Id),
    ?assertEqual(0, py_entries(Pool, Id)),
    {ok, P3} = start(Config, Id, <<"function_cases:Kv">>, #{max_restarts => {0, 1}}),
    exit(P3, kill),
    ok = wait_entries(Pool, Id, 0, 100),
    ?assertMatch({error, {init_failed, _}},
                 start(Config, Id, <<"function_cases:Kv">>, #{init_payload => <<"fail-init">>})),
    ok = wait_entries(Pool, Id, 0, 100).

py_entries(Pool, Id) ->
    Code = <<"(lambda f: sum(1 for i in list(__import__('erpy.function').function"
             "._erlang_instances.values()) if i.host.slf().function_id == f))(fid)">>,
    {ok, N} = erpy:eval(Code, #{fid => Id}, #{pool => Pool}),
    N.

wait_entries(Pool, Id, N, 0) ->
    ?assertEqual(N, py_entries(Pool, Id));
wait_entries(Pool, Id, N, Tries) ->
    case py_entries(Pool, Id) of
        N -> ok;
        _ -> timer:sleep(50), wait_entries(Pool, Id, N, Tries - 1)
    end.

%% ---- helpers ----------------------------------------------------------------------------

id(Config, Name) ->
    <<(?config(prefix, Config))/binary, Name/binary>>.

start(Config, Id, Module, Extra) ->
    erpy_function:start(maps:merge(#{id => Id, module => Module, pool => ?config(pool, Config)},
                                   Extra)).

out() ->
    receive {erpy_function, cast, Src, Msg} -> {Src, Msg}
    after 10000 -> ct:fail(nothing_out)
    end.

wait_restarted(Id) ->
    wait_restarted(Id, 100).

wait_restarted(Id, 0) ->
    ct:fail({not_restarted, Id});
wait_restarted(Id, N) ->
    case erpy_function:whereis(Id) of
        undefined -> timer:sleep(50), wait_restarted(Id, N - 1);
        Pid -> Pid
    end.

%% An Erlang process as a function: it answers calls with "erl:" ++ Msg.
erl_function() ->
    receive
        {'$gen_call', From, {erpy_function, call, _Src, Msg}} ->
            gen_server:reply(From, {reply, <<"erl:", Msg/binary>>}),
            erl_function()
    end.

%% logger handler: forwards erpy function telemetry to the test process.
log(#{level := Level, meta := #{domain := [erpy, function]} = Meta, msg := {Fmt, Args}},
    #{config := #{pid := Pid}}) ->
    Pid ! {logged, Level, Meta, iolist_to_binary(io_lib:format(Fmt, Args))};
log(_Event, _Config) ->
    ok.
