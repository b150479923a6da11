%% Drop-ins for the seed projects' users (doc/dropin.md), each seed's own examples run
%% unchanged: erl_py_runner's API and configuration (erl_py_runner), port programs of
%% one's own with erpy.port (seed 001's porttest/my_protocol), and Beam-BPy's
%% BeamServer from Erlang and Elixir (erpy.beam over node mode).
%%
%% The beam group needs a distributed node: run with `--name ct_dropin@127.0.0.1` (else
%% the suite starts distribution itself under that name).
-module(erpy_dropin_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, groups/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2, init_per_testcase/2, end_per_testcase/2]).
-export([seed_readme_examples/1, seed_output_shapes/1, run1_has_no_timeout/1,
         app_starts_pool/1, config_nested/1, config_seed_layout/1, config_flat/1,
         config_timeout/1, config_erlang_modules/1, config_python_modules/1,
         config_all_modules_refused/1]).
-export([seed_porttest_unchanged/1, program_pool_seed_messages/1, program_pool_bert/1,
         program_packets/1, program_timeout_replaces/1, program_crash_replaces/1,
         program_caller_death/1, program_policy/1, program_too_large/1,
         program_not_supported/1, program_checkout/1, program_info_stop/1,
         program_bad_options/1]).
-export([beam_seed_server_from_erlang/1, beam_seed_client_elixir/1, beam_env/1]).

-define(NODE_NAME, 'ct_dropin@127.0.0.1').

suite() ->
    [{timetrap, {minutes, 3}}].

all() ->
    [{group, erl_py_runner}, {group, program}, {group, beam}].

groups() ->
    [{erl_py_runner, [],
      [seed_readme_examples, seed_output_shapes, run1_has_no_timeout, app_starts_pool,
       config_nested, config_seed_layout, config_flat, config_timeout,
       config_erlang_modules, config_python_modules, config_all_modules_refused]},
     {program, [],
      [seed_porttest_unchanged, program_pool_seed_messages, program_pool_bert,
       program_packets, program_timeout_replaces, program_crash_replaces,
       program_caller_death, program_policy, program_too_large, program_not_supported,
       program_checkout, program_info_stop, program_bad_options]},
     {beam, [],
      [beam_seed_server_from_erlang, beam_seed_client_elixir, beam_env]}].

init_per_suite(Config) ->
    ok = erpy_test_env:start_erpy(),
    Python = erpy_config:built_python(),
    PyPath = python_path(),
    [{python, Python}, {pythonpath, PyPath} | Config].

end_per_suite(_Config) ->
    _ = application:stop(erl_py_runner),
    ok.

init_per_group(beam, Config) ->
    _ = os:cmd("epmd -daemon"),
    case node() of
        nonode@nohost -> {ok, _} = net_kernel:start([?NODE_NAME, longnames]);
        _ -> ok
    end,
    Config;
init_per_group(_Group, Config) ->
    Config.

end_per_group(_Group, _Config) ->
    ok.

init_per_testcase(_Case, Config) ->
    Config.

end_per_testcase(Case, _Config) when Case =:= config_nested; Case =:= config_seed_layout;
                                      Case =:= config_flat; Case =:= config_timeout;
                                      Case =:= config_erlang_modules;
                                      Case =:= config_python_modules;
                                      Case =:= config_all_modules_refused ->
    _ = application:stop(erl_py_runner),
    [application:unset_env(erl_py_runner, K) || {K, _} <- application:get_all_env(erl_py_runner)],
    ok;
end_per_testcase(_Case, _Config) ->
    ok.

%% erl_py_runner ---------------------------------------------------------------------

%% The seed README's examples, as written there (and its "Inside the Python Script").
seed_readme_examples(_Config) ->
    %% Basic script execution call without timeout
    {ok, Response} = erl_py_runner:run(#{
      code => <<"result = arguments['x'] + arguments['y']">>,
      arguments => #{<<"x">> => 10, <<"y">> => 20}
    }),
    %% Expected response: #{status => ok, result => 30}
    ?assertEqual(#{status => ok, result => 30}, Response),

    %% Basic script execution call with explicit timeout
    {ok, Response2} = erl_py_runner:run(#{
      code => <<"result = arguments['x'] + arguments['y']">>,
      arguments => #{<<"x">> => 10, <<"y">> => 20}
    }, 10000),
    ?assertEqual(#{status => ok, result => 30}, Response2),

    %% Example: Python calling lists:sort/1
    {ok, Response3} = erl_py_runner:run(#{
      code => <<"result = erlang.call('lists', 'sort', [9, 1, 5])">>,
      arguments => #{}
    }),
    ?assertEqual(#{status => ok, result => [1, 5, 9]}, Response3),

    %% import math / result = math.sqrt(arguments['value'])
    {ok, #{status := ok, result := 3.0}} =
        erl_py_runner:run(#{code => <<"import math\nresult = math.sqrt(arguments['value'])">>,
                            arguments => #{<<"value">> => 9}}),
    %% `result` defaults to None.
    {ok, #{status := ok, result := undefined}} = erl_py_runner:run(#{code => <<"x = 1">>}),
    ok.

%% The four output shapes of the seed README.
seed_output_shapes(_Config) ->
    {ok, #{status := ok, result := 2}} =
        erl_py_runner:run(#{code => <<"result = 1 + 1">>, arguments => #{}}),
    {ok, #{status := error, error := #{type := <<"ZeroDivisionError">>}}} =
        erl_py_runner:run(#{code => <<"result = 1 / 0">>, arguments => #{}}),
    {error, timeout} =
        erl_py_runner:run(#{code => <<"import time\ntime.sleep(10)">>, arguments => #{}}, 300),
    {error, {badarg, code}} = erl_py_runner:run(#{arguments => #{}}),
    {error, {badarg, code}} = erl_py_runner:run(not_a_map, 1000),
    %% The erlang object raises the seed's exception classes.
    {ok, #{status := ok, result := <<"ErlangError">>}} =
        erl_py_runner:run(#{code => <<"try:\n    erlang.call('os', 'cmd', 'id')\n"
                                      "except erlang.ErlangError as e:\n"
                                      "    result = type(e).__name__">>}),
    ok.

%% run/1 has no timeout (the seed's words): longer than erpy's own default passes.
run1_has_no_timeout(_Config) ->
    {ok, Old} = application:get_env(erpy, timeout),
    ok = application:set_env(erpy, timeout, 100),
    try
        {ok, #{status := ok, result := <<"done">>}} =
            erl_py_runner:run(#{code => <<"import time\ntime.sleep(0.5)\nresult = 'done'">>,
                                arguments => #{}})
    after
        application:set_env(erpy, timeout, Old)
    end,
    ok.

%% The application erl_py_runner is loadable (its .app beside erpy's) and starts the
%% pool, of the seed's default size 3, as an application listing it would.
app_starts_pool(_Config) ->
    _ = application:stop(erl_py_runner),
    {error, {no_pool, erl_py_runner}} = erpy:pool_info(erl_py_runner),
    {ok, Started} = application:ensure_all_started(erl_py_runner),
    true = lists:member(erl_py_runner, Started),
    {ok, #{size := 3}} = erpy:pool_info(erl_py_runner),
    {ok, #{status := ok, result := 30}} =
        erl_py_runner:run(#{code => <<"result = arguments['x'] + arguments['y']">>,
                            arguments => #{<<"x">> => 10, <<"y">> => 20}}),
    ok = application:stop(erl_py_runner),
    {error, {no_pool, erl_py_runner}} = erpy:pool_info(erl_py_runner),
    %% A call starts it again by itself.
    {ok, #{status := ok, result := 1}} = erl_py_runner:run(#{code => <<"result = 1">>}),
    ok.

%% The seed's documented layout: `environment` and `worker` groups.
config_nested(_Config) ->
    ok = application:stop(erl_py_runner),
    ok = application:set_env(erl_py_runner, environment,
                             #{requirements => "python/requirements.txt",
                               runner => "python/runner.py",
                               venv_dir => ".venv",
                               python => environment}),
    ok = application:set_env(erl_py_runner, worker,
                             #{supervisor => #{intensity => 5, period => 30},
                               config => #{timeout => 60000, pool_size => 2,
                                           max_pending => infinity},
                               modules_whitelist => #{erlang_modules => [math, lists],
                                                      python_modules => [<<"math">>, <<"re">>]}}),
    Priv = code:priv_dir(erpy),
    #{mode := port, size := 2, allowed := [math, lists], venv := Venv, requirements := Reqs} =
        Opts = erl_py_runner:options(),
    ?assertEqual(filename:join(Priv, ".venv"), Venv),
    ?assertEqual(filename:join(Priv, "python/requirements.txt"), Reqs),
    false = maps:is_key(python, Opts),
    ok.

%% The layout of the seed's own sys.config at the README's time: `environment` inside
%% `worker`; `python` a base interpreter.
config_seed_layout(Config) ->
    ok = application:set_env(erl_py_runner, worker,
                             #{environment => #{venv_dir => "/tmp/erpy-dropin-venv",
                                                python => ?config(python, Config),
                                                requirements => ["six"]},
                               config => #{pool_size => 1}}),
    Python = ?config(python, Config),
    #{size := 1, venv := "/tmp/erpy-dropin-venv", python := Python, requirements := ["six"],
      allowed := [math, lists, maps, binary, string]} = erl_py_runner:options(),
    ok.

%% The same keys flat, and `system` python (no venv).
config_flat(_Config) ->
    ok = application:set_env(erl_py_runner, pool_size, 2),
    ok = application:set_env(erl_py_runner, erlang_modules, [lists]),
    ok = application:set_env(erl_py_runner, venv_dir, ".venv"),
    ok = application:set_env(erl_py_runner, python, system),
    Opts = erl_py_runner:options(),
    #{size := 2, allowed := [lists]} = Opts,
    false = maps:is_key(venv, Opts),
    {ok, _} = application:ensure_all_started(erl_py_runner),
    {ok, #{size := 2}} = erpy:pool_info(erl_py_runner),
    ok.

%% worker.config.timeout is run/1's timeout.
config_timeout(_Config) ->
    ok = application:set_env(erl_py_runner, worker, #{config => #{timeout => 200}}),
    {error, timeout} = erl_py_runner:run(#{code => <<"import time\ntime.sleep(5)">>}),
    {ok, #{status := ok}} = erl_py_runner:run(#{code => <<"import time\ntime.sleep(0.5)">>}, 5000),
    ok.

%% modules_whitelist.erlang_modules is the pool's allow-list.
config_erlang_modules(_Config) ->
    ok = application:set_env(erl_py_runner, worker,
                             #{modules_whitelist => #{erlang_modules => [lists]}}),
    {ok, #{status := ok, result := [1, 2]}} =
        erl_py_runner:run(#{code => <<"result = erlang.call('lists', 'sort', [2, 1])">>}),
    {ok, #{status := error, error := #{type := <<"ErlangError">>}}} =
        erl_py_runner:run(#{code => <<"result = erlang.call('math', 'sqrt', 4)">>}),
    ok.

%% modules_whitelist.python_modules (or the flat allowed_modules of the seed's init
%% message) limits imports, and takes the builtins the seed took.
config_python_modules(_Config) ->
    ok = application:set_env(erl_py_runner, worker,
                             #{modules_whitelist => #{python_modules => [<<"math">>]}}),
    {ok, #{status := ok, result := 2.0}} =
        erl_py_runner:run(#{code => <<"import math\nresult = math.sqrt(arguments)">>,
                            arguments => 4}),
    {ok, #{status := error, error := #{type := <<"ImportError">>}}} =
        erl_py_runner:run(#{code => <<"import os\nresult = os.getpid()">>}),
    {ok, #{status := error, error := #{type := <<"NameError">>}}} =
        erl_py_runner:run(#{code => <<"result = open('/etc/passwd').read()">>}),
    {ok, #{status := ok, result := [1, 5, 9]}} =
        erl_py_runner:run(#{code => <<"result = erlang.call('lists', 'sort', [9, 1, 5])">>}),
    {error, timeout} = erl_py_runner:run(#{code => <<"while True: pass">>}, 300),
    ok = application:unset_env(erl_py_runner, worker),
    ok = application:set_env(erl_py_runner, allowed_modules, ["json"]),
    {ok, #{status := ok, result := <<"[1]">>}} =
        erl_py_runner:run(#{code => <<"import json\nresult = json.dumps([1])">>}),
    {ok, #{status := error, error := #{type := <<"ImportError">>}}} =
        erl_py_runner:run(#{code => <<"import math">>}),
    ok.

%% `erlang_modules => all` does not open every module: the seed's default list instead.
config_all_modules_refused(_Config) ->
    ok = application:set_env(erl_py_runner, worker,
                             #{modules_whitelist => #{erlang_modules => all}}),
    #{allowed := [math, lists, maps, binary, string]} = erl_py_runner:options(),
    {ok, #{status := error, error := #{type := <<"ErlangError">>}}} =
        erl_py_runner:run(#{code => <<"result = erlang.call('os', 'cmd', 'id')">>}),
    ok.

%% Port programs -----------------------------------------------------------------------

%% The seed's porttest.erl, unchanged, opens the seed's my_protocol.py, whose only change
%% is `from erpy.port import Protocol` instead of its own codec and loop.
seed_porttest_unchanged(Config) ->
    Data = ?config(data_dir, Config),
    %% Kept as .erl.txt, else rebar3 eunit takes it for a module of the project.
    Src = filename:join(?config(priv_dir, Config), "porttest.erl"),
    {ok, _} = file:copy(filename:join(Data, "porttest.erl.txt"), Src),
    {ok, porttest, Bin} = compile:file(Src, [binary, nowarn_export_all, return_errors]),
    {module, porttest} = code:load_binary(porttest, "porttest.erl", Bin),
    {ok, Cwd} = file:get_cwd(),
    OldPath = os:getenv("PYTHONPATH"),
    ok = file:set_cwd(Data),
    true = os:putenv("PYTHONPATH", ?config(pythonpath, Config)),
    try
        Pid = porttest:start(),
        ok = wait_registered(porttest, 100),
        ct:capture_start(),
        porttest:twice(3),
        porttest:sum(1, 2),
        porttest:hello(taro),
        ct:capture_stop(),
        Lines = ct:capture_get(),
        ct:log("~p", [Lines]),
        [L1, L2, L3] = Lines,
        {match, _} = re:run(L1, "^received: '6' "),
        {match, _} = re:run(L2, "^received: '3' "),
        {match, _} = re:run(L3, "^received: '<<\"Hello, taro\">>' "),
        exit(Pid, kill)
    after
        ok = file:set_cwd(Cwd),
        case OldPath of
            false -> os:unsetenv("PYTHONPATH");
            _ -> os:putenv("PYTHONPATH", OldPath)
        end
    end,
    ok.

%% The same program as a supervised pool: the seed's messages, raw.
program_pool_seed_messages(Config) ->
    Script = filename:join([?config(data_dir, Config), "erlang_port", "my_protocol.py"]),
    {ok, _} = erpy:start_pool(seed_port, #{program => {python_script, Script}, packet => 2,
                                           size => 2}),
    {ok, 6} = erpy_port_program:call(seed_port, {twice, 3}),
    {ok, 3} = erpy_port_program:call(seed_port, {sum, 1, 2}, 5000),
    {ok, <<"Hello, taro">>} = erpy_port_program:call(seed_port, {hello, taro}),
    %% Several callers at once, on two programs.
    Self = self(),
    [spawn_link(fun() -> Self ! {I, erpy_port_program:call(seed_port, {twice, I})} end)
     || I <- lists:seq(1, 20)],
    [receive {I, {ok, R}} -> R = 2 * I end || I <- lists:seq(1, 20)],
    ok = erpy:stop_pool(seed_port).

%% erpy:call on a program pool is BERT-RPC's {call, M, F, A}; errors as erpy's maps.
program_pool_bert(Config) ->
    ok = start_test_pool(bert_port, 2, 1, Config),
    {ok, 42} = erpy:call(my_protocol, twice, [21], #{pool => bert_port}),
    {ok, 7} = erpy:call(<<"any">>, <<"sum">>, [3, 4], #{pool => bert_port}),
    {error, #{type := <<"NameError">>, message := _}} =
        erpy:call(m, no_such_handler, [], #{pool => bert_port}),
    {error, #{type := <<"TypeError">>, message := Arity}} =
        erpy:call(m, twice, [1, 2], #{pool => bert_port}),
    {match, _} = re:run(Arity, "twice/2"),
    {error, #{type := <<"ZeroDivisionError">>, traceback := [_ | _]}} =
        erpy:call(m, fail, [], #{pool => bert_port}),
    {error, {badarg, kwargs}} = erpy:call(m, twice, [1], #{pool => bert_port, kwargs => #{a => 1}}),
    %% Raw BERT-RPC through call/2.
    {ok, {reply, 10}} = erpy_port_program:call(bert_port, {call, m, twice, [5]}),
    {ok, {error, {server, 2, <<"NameError">>, _, []}}} =
        erpy_port_program:call(bert_port, {call, m, nope, []}),
    {ok, {error, {protocol, 0, <<"BadRequest">>, _, []}}} = erpy_port_program:call(bert_port, 42),
    {ok, 4} = erpy:call(m, twice, [2], #{pool => bert_port}),
    ok = erpy:stop_pool(bert_port).

program_packets(Config) ->
    [begin
         Pool = list_to_atom("packet_" ++ integer_to_list(N)),
         ok = start_test_pool(Pool, N, 1, Config),
         {ok, 6} = erpy_port_program:call(Pool, {twice, 3}),
         {ok, 8} = erpy:call(m, twice, [4], #{pool => Pool}),
         Echo = binary:copy(<<"y">>, 200),
         {ok, Echo} = erpy_port_program:call(Pool, {echo, Echo}),
         #{packet := N} = element(2, erpy:pool_info(Pool)),
         ok = erpy:stop_pool(Pool)
     end || N <- [1, 2, 4]],
    ok.

%% A request that times out kills its program (a user's protocol cannot be interrupted);
%% the pool starts another and goes on.
program_timeout_replaces(Config) ->
    ok = start_test_pool(slow_port, 4, 1, Config),
    {ok, Pid1} = erpy_port_program:call(slow_port, {pid}),
    {error, timeout} = erpy_port_program:call(slow_port, {sleep, 10}, 300),
    {ok, 2} = erpy_port_program:call(slow_port, {twice, 1}, 5000),
    {ok, Pid2} = erpy_port_program:call(slow_port, {pid}),
    true = Pid1 =/= Pid2,
    false = os_alive(Pid1),
    %% The pool's timeout option is call/2's.
    {error, timeout} = erpy:call(m, sleep, [10], #{pool => slow_port, timeout => 200}),
    {ok, slept} = erpy:call(m, sleep, [0.01], #{pool => slow_port}),
    ok = erpy:stop_pool(slow_port).

program_crash_replaces(Config) ->
    ok = start_test_pool(crash_port, 4, 1, Config),
    {error, {worker_exit, {exit_status, 3}}} = erpy_port_program:call(crash_port, {crash, 3}),
    {ok, 2} = erpy_port_program:call(crash_port, {twice, 1}, 5000),
    ok = erpy:stop_pool(crash_port).

%% A caller that dies while its request runs: the program is replaced, the pool serves.
program_caller_death(Config) ->
    ok = start_test_pool(death_port, 4, 1, Config),
    {ok, Pid1} = erpy_port_program:call(death_port, {pid}),
    Caller = spawn(fun() -> erpy_port_program:call(death_port, {sleep, 30}, infinity) end),
    timer:sleep(300),
    exit(Caller, kill),
    {ok, 2} = erpy_port_program:call(death_port, {twice, 1}, 5000),
    {ok, Pid2} = erpy_port_program:call(death_port, {pid}),
    true = Pid1 =/= Pid2,
    ok = erpy:stop_pool(death_port).

%% Replies are decoded under the pool's policy: no new atoms.
program_policy(Config) ->
    ok = start_test_pool(policy_port, 4, 1, Config),
    {error, {unknown_atom, <<"erpy_dropin_no_such_atom_4f1d">>}} =
        erpy_port_program:call(policy_port, {new_atom}),
    {ok, {reply, ok}} = erpy_port_program:call(policy_port, {call, m, remember, [1]}),
    ok = erpy:stop_pool(policy_port).

program_too_large(Config) ->
    ok = start_test_pool(small_port, 1, 1, Config),
    {error, {message_too_large, _, 255}} =
        erpy_port_program:call(small_port, {echo, binary:copy(<<"z">>, 300)}),
    %% A reply too large to frame: the program answers an error that fits.
    {ok, {error, {server, 0, <<"ValueError">>, _, _}}} =
        erpy_port_program:call(small_port, {call, m, big, [300]}),
    {ok, 2} = erpy_port_program:call(small_port, {twice, 1}),
    ok = erpy:stop_pool(small_port).

program_not_supported(Config) ->
    ok = start_test_pool(ns_port, 4, 1, Config),
    {error, {not_supported, {eval, ns_port}}} = erpy:eval(<<"1">>, #{}, #{pool => ns_port}),
    {error, {not_supported, {run, ns_port}}} = erpy:run(#{code => <<"1">>, pool => ns_port}),
    {error, {not_supported, {exec, ns_port}}} = erpy:exec(<<"1">>, #{pool => ns_port}),
    {error, {no_pool, nope_port}} = erpy_port_program:call(nope_port, x),
    {error, {not_supported, {program, default}}} = erpy_port_program:call(default, x),
    ok = erpy:stop_pool(ns_port).

%% A held program keeps its state across requests (erpy:with_worker/checkout).
program_checkout(Config) ->
    ok = start_test_pool(held_port, 4, 2, Config),
    {ok, 7} = erpy:with_worker(held_port, fun(W) ->
        {ok, ok} = erpy:call(m, remember, [7], #{worker => W}),
        erpy:call(m, recall, [], #{worker => W})
    end),
    {ok, #{held := 0}} = erpy:pool_info(held_port),
    %% A holder that dies gives its program back.
    Self = self(),
    Holder = spawn(fun() -> {ok, W} = erpy:checkout(held_port), Self ! {held, W},
                            receive never -> ok end end),
    receive {held, _} -> ok end,
    {ok, #{held := 1}} = erpy:pool_info(held_port),
    exit(Holder, kill),
    ok = poll(fun() -> {ok, #{held := H}} = erpy:pool_info(held_port), H =:= 0 end, 250),
    {ok, #{held := 0, workers := 2}} = erpy:pool_info(held_port),
    ok = erpy:stop_pool(held_port).

program_info_stop(Config) ->
    ok = start_test_pool(info_port, 4, 2, Config),
    {ok, #{mode := program, size := 2, workers := 2, worker_pids := [W1, W2]}} =
        erpy:pool_info(info_port),
    OsPids = [gen_server:call(W, os_pid) || W <- [W1, W2]],
    ok = erpy:stop_pool(info_port),
    {error, {no_pool, info_port}} = erpy_port_program:call(info_port, x),
    ok = poll(fun() -> not lists:any(fun os_alive/1, OsPids) end, 250),
    ok.

program_bad_options(Config) ->
    Script = filename:join(?config(data_dir, Config), "dropin_protocol.py"),
    {error, {badarg, {packet, 3}}} =
        erpy:start_pool(bad1, #{program => {python_script, Script}, packet => 3}),
    {error, {badarg, {program, nonsense}}} = erpy:start_pool(bad2, #{program => nonsense}),
    {error, {program_not_found, "/no/such/exe"}} =
        erpy:start_pool(bad3, #{program => {executable, "/no/such/exe", []}}),
    {error, {badarg, program}} = erpy:start_pool(bad4, #{mode => program}),
    ok.

%% Beam-BPy ----------------------------------------------------------------------------

%% The seed's Python server example, unchanged, answers the seed's Erlang entry points.
beam_seed_server_from_erlang(Config) ->
    {Port, Node} = start_beam_example(Config),
    try
        {ok, Out} = wait_line(Port, "Server started at ", 20000),
        ct:log("~ts", [Out]),
        {match, _} = re:run(Out, "Server started at beam_bpy@127.0.0.1:[1-9][0-9]*"),
        true = erlang:set_cookie(Node, beam_bpy_cookie),
        <<"pong">> = rpc:call(Node, 'Elixir.MyModule', call_handler, ["ping", []]),
        #{<<"status">> := <<"processed">>, <<"data">> := ["arg1", "arg2"]} =
            rpc:call(Node, 'Elixir.BeamServer', handle_rpc, ["my_operation", ["arg1", "arg2"]]),
        <<"pong">> = rpc:call(Node, any_module, handle_rpc, [<<"ping">>, []]),
        {error, <<"Unknown function: nope">>} = rpc:call(Node, 'Elixir.BeamServer', handle_rpc,
                                                         [nope, []]),
        %% Nothing else is reachable.
        {badrpc, _} = rpc:call(Node, os, getpid, [])
    after
        stop_port(Port)
    end,
    ok.

%% The seed's Elixir client example, unchanged, against the seed's server example.
beam_seed_client_elixir(Config) ->
    {Port, _Node} = start_beam_example(Config),
    try
        {ok, _} = wait_line(Port, "Server started at ", 20000),
        Exs = filename:join(?config(data_dir, Config), "seed_client.exs"),
        {Status, Out} = run_cmd(os:find_executable("elixir"), [Exs], [], 120000),
        ct:log("elixir ~ts: ~p~n~ts", [Exs, Status, Out]),
        0 = Status,
        {match, _} = re:run(Out, "seed client: ok")
    after
        stop_port(Port)
    end,
    ok.

%% BPY_BEAM_NODE/COOKIE/HOST/PORT are read by the library: BeamServer() with none of
%% the constructor's arguments.
beam_env(Config) ->
    {ok, Listen} = gen_tcp:listen(0, [{ip, {127, 0, 0, 1}}]),
    {ok, Free} = inet:port(Listen),
    ok = gen_tcp:close(Listen),
    Code = "from beam_bpy import BeamServer\n"
           "s = BeamServer()\n"
           "s.register_handler('add', lambda args: args[0] + args[1])\n"
           "s.register_handler('none', lambda args: None)\n"
           "assert s.start()\n"
           "print('address', s.get_address(), flush=True)\n",
    Env = [{"BPY_BEAM_NODE", "ct_dropin_env"}, {"BPY_BEAM_COOKIE", "dropin_env_cookie"},
           {"BPY_BEAM_HOST", "127.0.0.1"}, {"BPY_BEAM_PORT", integer_to_list(Free)}],
    Port = open_python(["-c", Code], Env, Config),
    Node = 'ct_dropin_env@127.0.0.1',
    try
        {ok, Out} = wait_line(Port, "address ", 20000),
        Expected = "address ct_dropin_env@127.0.0.1:" ++ integer_to_list(Free),
        {match, _} = re:run(Out, Expected),
        {ok, [{_, Free}]} = {ok, [{N, P} || {N, P} <- element(2, erl_epmd:names("127.0.0.1")),
                                             N =:= "ct_dropin_env"]},
        true = erlang:set_cookie(Node, dropin_env_cookie),
        5 = rpc:call(Node, 'Elixir.BeamServer', handle_rpc, [<<"add">>, [2, 3]]),
        nil = rpc:call(Node, 'Elixir.BeamServer', handle_rpc, [<<"none">>, []])
    after
        stop_port(Port)
    end,
    ok.

%% Internal.

%% Until Fun() holds, 20 ms apart, at most Tries times.
poll(_Fun, 0) ->
    {error, never};
poll(Fun, Tries) ->
    case Fun() of
        true -> ok;
        false -> timer:sleep(20), poll(Fun, Tries - 1)
    end.

%% porttest:start/0 registers its process from inside it, a moment after it returns.
wait_registered(_Name, 0) ->
    {error, not_registered};
wait_registered(Name, Tries) ->
    case whereis(Name) of
        undefined -> timer:sleep(20), wait_registered(Name, Tries - 1);
        _ -> ok
    end.

start_test_pool(Name, Packet, Size, Config) ->
    Script = filename:join(?config(data_dir, Config), "dropin_protocol.py"),
    {ok, _} = erpy:start_pool(Name, #{program => {python_script, Script,
                                                  [integer_to_list(Packet)]},
                                      packet => Packet, size => Size}),
    ok.

start_beam_example(Config) ->
    Script = filename:join(?config(data_dir, Config), "beam_server_example.py"),
    {open_python([Script], [], Config), 'beam_bpy@127.0.0.1'}.

open_python(Args, Env, Config) ->
    open_port({spawn_executable, ?config(python, Config)},
              [{args, Args}, {line, 4096}, use_stdio, stderr_to_stdout, exit_status, binary,
               {env, [{"PYTHONPATH", ?config(pythonpath, Config)},
                      {"PYTHONUNBUFFERED", "1"} | Env]}]).

wait_line(Port, Prefix, Timeout) ->
    receive
        {Port, {data, {eol, Line}}} ->
            ct:log("python: ~ts", [Line]),
            case string:find(Line, Prefix) of
                nomatch -> wait_line(Port, Prefix, Timeout);
                _ -> {ok, Line}
            end;
        {Port, {data, {noeol, _}}} ->
            wait_line(Port, Prefix, Timeout);
        {Port, {exit_status, S}} ->
            {error, {exit_status, S}}
    after Timeout ->
        {error, timeout}
    end.

stop_port(Port) ->
    case erlang:port_info(Port, os_pid) of
        {os_pid, OsPid} ->
            _ = os:cmd("kill -TERM " ++ integer_to_list(OsPid)),
            receive {Port, {exit_status, _}} -> ok after 5000 -> ok end;
        undefined ->
            ok
    end,
    catch port_close(Port),
    ok.

run_cmd(Exe, Args, Env, Timeout) ->
    Port = open_port({spawn_executable, Exe},
                     [{args, Args}, {env, Env}, exit_status, stderr_to_stdout, binary, use_stdio]),
    collect(Port, [], Timeout).

collect(Port, Acc, Timeout) ->
    receive
        {Port, {data, D}} -> collect(Port, [Acc, D], Timeout);
        {Port, {exit_status, S}} -> {S, iolist_to_binary(Acc)}
    after Timeout ->
        stop_port(Port),
        {timeout, iolist_to_binary(Acc)}
    end.

os_alive(OsPid) ->
    case file:read_file("/proc/" ++ integer_to_list(OsPid) ++ "/stat") of
        {ok, Stat} ->
            [_, Rest] = string:split(Stat, <<")">>, trailing),
            [State | _] = string:lexemes(Rest, " "),
            State =/= <<"Z">>;
        {error, _} ->
            false
    end.

python_path() ->
    Py = erpy_config:python_dir(),
    case os:getenv("PYTHONPATH") of
        false -> Py;
        "" -> Py;
        Other -> Py ++ ":" ++ Other
    end.
