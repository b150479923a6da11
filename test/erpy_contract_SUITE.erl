%% The API contract, once, against each mode: the same calls must give the same answers
%% in port, embedded and node mode (values of every type, every error row, timeouts,
%% callbacks, nested calls, checkout, a stopped pool, an unknown pool, bad arguments).
-module(erpy_contract_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, groups/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_group/2, end_per_group/2]).
-export([values/1, call_forms/1, eval_exec_run/1, python_errors/1, timeouts/1,
         callbacks/1, nested/1, checkout/1, unknown_pool/1, stopped_pool/1,
         bad_arguments/1, policy_refusals/1, async/1, async_cancel/1, async_no_await/1,
         coroutines/1]).
%% async_no_await's gen_server.
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).
%% Called from Python.
-export([twice/1, again/1, again_async/1]).

-define(P, contract).

all() ->
    [{group, port}, {group, embedded}, {group, node}].

groups() ->
    Cases = [values, call_forms, eval_exec_run, python_errors, timeouts, callbacks, nested,
             checkout, unknown_pool, stopped_pool, bad_arguments, policy_refusals, async,
             async_cancel, async_no_await, coroutines],
    [{Mode, [], Cases} || Mode <- [port, embedded, node]].

suite() ->
    [{timetrap, {seconds, 90}}].

init_per_suite(Config) ->
    ok = erpy_test_env:start_erpy(),
    Config.

end_per_suite(_Config) ->
    ok.

init_per_group(node, Config) ->
    _ = os:cmd("epmd -daemon"),
    case is_alive() of
        true -> ok;
        false -> {ok, _} = net_kernel:start(['ct_contract@127.0.0.1', longnames])
    end,
    start_pool(node, Config);
init_per_group(Mode, Config) ->
    start_pool(Mode, Config).

end_per_group(_Mode, _Config) ->
    _ = erpy:stop_pool(?P),
    ok.

start_pool(Mode, Config) ->
    Size = case Mode of node -> #{start => 1}; _ -> #{size => 1} end,
    {ok, _} = erpy:start_pool(?P, Size#{mode => Mode, kill_grace_ms => 500,
                                        allowed => [{?MODULE, twice, 1}, {?MODULE, again, 1},
                                                    {?MODULE, again_async, 1}]}),
    ok = erpy_test_env:wait_serves(?P, 300),
    [{mode, Mode} | Config].

-define(O, #{pool => ?P}).

%% Every kind of term, both ways.
values(_Config) ->
    erpy_term_gen:seed(7),
    [?assertEqual({ok, T}, erpy:eval(<<"x">>, #{x => T}, ?O))
     || K <- erpy_term_gen:kinds(), _ <- lists:seq(1, 10), T <- [erpy_term_gen:term(K)]],
    ?assertEqual({ok, #{"name" => 1, <<"k">> => [1.5, true, undefined]}},
                 erpy:eval(<<"x">>, #{x => #{"name" => 1, <<"k">> => [1.5, true, undefined]}}, ?O)),
    B = binary:copy(<<7>>, 1 bsl 20),
    ?assertEqual({ok, B}, erpy:call(copy, copy, [B], ?O)).

call_forms(_Config) ->
    ?assertEqual({ok, 3}, erpy:call(operator, add, [1, 2], ?O)),
    ?assertEqual({ok, <<"a/b">>}, erpy:call('os.path', join, [<<"a">>, <<"b">>], ?O)),
    ?assertEqual({ok, [3, 2, 1]}, erpy:call(builtins, sorted, [[1, 3, 2]], ?O#{kwargs => #{reverse => true}})),
    %% Dotted function names: an attribute path inside the module.
    ?assertEqual({ok, #{1 => undefined, 2 => undefined}}, erpy:call(builtins, 'dict.fromkeys', [[1, 2]], ?O)),
    ?assertEqual({ok, <<"ab">>}, erpy:call(builtins, 'str.join', [<<>>, [<<"a">>, <<"b">>]], ?O)),
    ?assertMatch({error, #{type := <<"ModuleNotFoundError">>}}, erpy:call(no_such_module_x, f, [], ?O)),
    ?assertMatch({error, #{type := <<"AttributeError">>}}, erpy:call(operator, no_such_fun, [], ?O)).

eval_exec_run(_Config) ->
    ?assertEqual({ok, 42}, erpy:eval(<<"x * 2">>, #{x => 21}, ?O)),
    ?assertEqual(ok, erpy:exec(<<"y = 1">>, ?O)),
    %% A fresh namespace per call without a held worker.
    ?assertMatch({error, #{type := <<"NameError">>}}, erpy:eval(<<"y">>, #{}, ?O)),
    ?assertEqual({ok, #{status => ok, result => 30}},
                 erpy:run(#{code => <<"result = arguments['x'] + arguments['y']">>,
                            arguments => #{<<"x">> => 10, <<"y">> => 20}, pool => ?P})),
    ?assertEqual({ok, #{status => ok, result => undefined}}, erpy:run(#{code => <<"pass">>, pool => ?P})).

python_errors(_Config) ->
    {error, #{type := Type, message := Msg, traceback := TB}} = erpy:eval(<<"1 / 0">>, #{}, ?O),
    ?assertEqual({<<"ZeroDivisionError">>, <<"division by zero">>}, {Type, Msg}),
    ?assert(is_list(TB) andalso lists:all(fun is_binary/1, TB)),
    ?assertEqual(<<"Traceback (most recent call last):\n">>, hd(TB)),
    ?assertEqual(<<"ZeroDivisionError: division by zero\n">>, lists:last(TB)),
    {ok, #{status := error, error := #{type := <<"ValueError">>, message := <<"bad">>}}} =
        erpy:run(#{code => <<"raise ValueError('bad')">>, pool => ?P}),
    %% A result Python cannot encode.
    ?assertMatch({error, #{type := <<"EncodeError">>}}, erpy:eval(<<"object()">>, #{}, ?O)).

timeouts(_Config) ->
    ?assertEqual({error, timeout}, erpy:exec(<<"import time\ntime.sleep(5)">>, ?O#{timeout => 200})),
    ?assertEqual({error, timeout}, erpy:exec(<<"while True: pass">>, ?O#{timeout => 200})),
    %% The worker is usable again.
    ok = erpy_test_env:wait_serves(?P, 100),
    ?assertEqual({ok, 2}, erpy:eval(<<"1 + 1">>, #{}, ?O)).

callbacks(_Config) ->
    ?assertEqual({ok, #{status => ok, result => 42}},
                 erpy:run(#{code => <<"result = erlang.call('erpy_contract_SUITE', 'twice', 21)">>, pool => ?P})),
    ?assertEqual({ok, #{status => ok, result => 8}},
                 erpy:run(#{code => <<"result = erlang.apply('erpy_contract_SUITE', 'twice', [4])">>, pool => ?P})),
    Me = self(),
    ?assertEqual({ok, Me}, erpy:eval(<<"erlang.self()">>, #{}, ?O)),
    {ok, #{status := ok}} = erpy:run(#{code => <<"erlang.send(erlang.self(), ('hi', arguments))">>,
                                       arguments => 5, pool => ?P}),
    receive {<<"hi">>, 5} -> ok after 2000 -> ct:fail(no_message) end,
    {ok, #{status := error, error := #{type := <<"ErlangError">>}}} =
        erpy:run(#{code => <<"erlang.call('os', 'cmd', 'id')">>, pool => ?P}).

%% Python -> Erlang -> Python on a pool of one worker.
nested(_Config) ->
    ?assertEqual({ok, #{status => ok, result => 12}},
                 erpy:run(#{code => <<"result = erlang.call('erpy_contract_SUITE', 'again', 6)">>, pool => ?P})).

%% Asynchronous requests: the same answers as the synchronous ones, as messages a
%% gen_server could match, many in flight from one process with none lost, callbacks and
%% nesting inside them, await's own timeout.
async(_Config) ->
    {ok, Id} = erpy:async_call(operator, add, [1, 2], ?O),
    ?assertEqual({ok, 3}, erpy:await(Id)),
    {ok, Id2} = erpy:async_eval(<<"1 / 0">>, #{}, ?O),
    ?assertEqual(erpy:eval(<<"1 / 0">>, #{}, ?O), erpy:await(Id2, 5000)),
    {ok, Id3} = erpy:async_run(#{code => <<"result = erlang.call('erpy_contract_SUITE', 'twice', arguments)">>,
                                 arguments => 4, pool => ?P}),
    ?assertEqual({ok, #{status => ok, result => 8}}, erpy:await(Id3)),
    %% The answer is a message: {erpy_reply, Id, Answer}.
    {ok, Id4} = erpy:async_call(operator, mul, [6, 7], ?O),
    receive {erpy_reply, Id4, Answer} -> ?assertEqual({ok, 42}, Answer)
    after 5000 -> ct:fail(no_reply)
    end,
    %% Many in flight from one process: every one answered, with its own value.
    Ids = [{I, element(2, erpy:async_call(operator, add, [I, 1], ?O))} || I <- lists:seq(1, 1000)],
    [?assertEqual({ok, I + 1}, erpy:await(Id5, 30000)) || {I, Id5} <- Ids],
    %% Nested: an async request made and awaited inside a callback reaches the worker
    %% that waits for the callback (a pool of one would deadlock otherwise).
    ?assertEqual({ok, #{status => ok, result => 12}},
                 erpy:run(#{code => <<"result = erlang.call('erpy_contract_SUITE', 'again_async', 6)">>, pool => ?P})),
    %% await/2 gives up on its own; the request goes on and still answers.
    {ok, Slow} = erpy:async_eval(<<"__import__('time').sleep(0.3) or 5">>, #{}, ?O),
    ?assertEqual({error, timeout}, erpy:await(Slow, 10)),
    ?assertEqual({ok, 5}, erpy:await(Slow, 5000)),
    ?assertMatch({error, {badarg, _}}, erpy:await(not_an_id, 10)),
    %% Nothing left behind in the mailbox.
    ?assertEqual({messages, []}, process_info(self(), messages)).

%% cancel/1 interrupts the Python call (the worker serves again at once) and no answer
%% comes after it; a caller that dies interrupts its requests too.
async_cancel(_Config) ->
    {ok, Id} = erpy:async_eval(<<"__import__('time').sleep(10)">>, #{}, ?O#{timeout => 20000}),
    timer:sleep(100),
    ok = erpy:cancel(Id),
    T0 = erlang:monotonic_time(millisecond),
    ?assertEqual({ok, 2}, erpy:eval(<<"1 + 1">>, #{}, ?O#{timeout => 5000})),
    ?assert(erlang:monotonic_time(millisecond) - T0 < 4000),
    receive {erpy_reply, Id, _} -> ct:fail(answer_after_cancel) after 200 -> ok end,
    Caller = spawn(fun() -> {ok, _} = erpy:async_eval(<<"__import__('time').sleep(10)">>, #{}, ?O#{timeout => 20000}), receive never -> ok end end),
    timer:sleep(100),
    exit(Caller, kill),
    T1 = erlang:monotonic_time(millisecond),
    ?assertEqual({ok, 3}, erpy:eval(<<"1 + 2">>, #{}, ?O#{timeout => 5000})),
    ?assert(erlang:monotonic_time(millisecond) - T1 < 4000),
    ?assertEqual({messages, []}, process_info(self(), messages)).

%% A gen_server that never awaits gets its answers in handle_info: exactly what the
%% synchronous call returns, with the callbacks Python makes meanwhile checked as for the
%% server's own call (an allowed one runs, a refused one is refused, a message to a pid
%% the request handed over goes), a result holding a pid, a request past its timeout
%% answered {error, timeout} by itself (and interrupted: the worker serves again), and
%% 10,000 in flight from the server with every answer its own and none lost.
async_no_await(_Config) ->
    Evals = [{twice, <<"erlang.call('erpy_contract_SUITE', 'twice', 21)">>, #{}},
             {refused, <<"erlang.call('os', 'cmd', 'ls')">>, #{}},
             {refused_apply, <<"erlang.call('erlang', 'apply', ['os', 'cmd', ['ls']])">>, #{}},
             {sends, <<"erlang.send(p, 'hi') or 7">>, #{p => self()}},
             {pid, <<"p">>, #{p => self()}},
             {raises, <<"1 / 0">>, #{}}],
    {ok, Srv} = gen_server:start_link(?MODULE, self(), []),
    [ok = gen_server:call(Srv, {eval, Key, Code, Locals, ?O}) || {Key, Code, Locals} <- Evals],
    Got = maps:from_list([receive {answer, Key, A} -> {Key, A} after 10000 -> ct:fail({lost, Key}) end
                          || {Key, _, _} <- Evals]),
    receive <<"hi">> -> ok after 5000 -> ct:fail(no_message) end,
    [?assertEqual({Key, erpy:eval(Code, Locals, ?O)}, {Key, maps:get(Key, Got)}) || {Key, Code, Locals} <- Evals],
    receive <<"hi">> -> ok after 5000 -> ct:fail(no_message) end,
    ?assertEqual({ok, 42}, maps:get(twice, Got)),
    {error, #{type := <<"ErlangError">>, message := Refused}} = maps:get(refused, Got),
    ?assertNotEqual(nomatch, binary:match(Refused, <<"not_allowed">>)),
    %% Past its timeout, nobody waiting.
    ok = gen_server:call(Srv, {eval, slow, <<"__import__('time').sleep(10)">>, #{}, ?O#{timeout => 300}}),
    receive {answer, slow, Slow} -> ?assertEqual({error, timeout}, Slow) after 10000 -> ct:fail(no_timeout) end,
    T0 = erlang:monotonic_time(millisecond),
    ?assertEqual({ok, 2}, erpy:eval(<<"1 + 1">>, #{}, ?O#{timeout => 5000})),
    ?assert(erlang:monotonic_time(millisecond) - T0 < 4000),
    %% 10,000 in flight from one process.
    N = 10000,
    ok = gen_server:call(Srv, {many, N, ?O#{timeout => 60000}}, 60000),
    receive {many, Right} -> ?assertEqual(N, Right) after 60000 -> ct:fail(many_lost) end,
    ?assertEqual(#{}, gen_server:call(Srv, pending)),
    unlink(Srv),
    gen_server:stop(Srv),
    ?assertEqual({messages, []}, process_info(self(), messages)).

init(Test) ->
    {ok, #{test => Test, ids => #{}}}.

handle_call({eval, Key, Code, Locals, Opts}, _From, #{ids := Ids} = St) ->
    {ok, Id} = erpy:async_eval(Code, Locals, Opts),
    {reply, ok, St#{ids := Ids#{Id => Key}}};
handle_call({many, N, Opts}, _From, #{ids := Ids} = St) ->
    New = maps:from_list([{element(2, erpy:async_call(operator, add, [I, 1], Opts)), {many, I}}
                          || I <- lists:seq(1, N)]),
    {reply, ok, St#{ids := maps:merge(Ids, New), many => {N, 0}}};
handle_call(pending, _From, #{ids := Ids} = St) ->
    {reply, Ids, St}.

handle_cast(_Msg, St) ->
    {noreply, St}.

handle_info({erpy_reply, Id, Answer}, #{test := Test, ids := Ids} = St) ->
    St1 = St#{ids := maps:remove(Id, Ids)},
    case maps:get(Id, Ids) of
        {many, I} ->
            #{many := {Left, Right}} = St1,
            Right1 = case Answer of {ok, V} when V =:= I + 1 -> Right + 1; _ -> Right end,
            case Left - 1 of
                0 -> Test ! {many, Right1}, {noreply, maps:remove(many, St1)};
                Left1 -> {noreply, St1#{many := {Left1, Right1}}}
            end;
        Key ->
            Test ! {answer, Key, Answer},
            {noreply, St1}
    end.

%% A request whose result is awaitable runs on the worker's event loop; a timeout
%% cancels the task (CancelledError in Python) and answers timeout; Python awaits Erlang
%% with erlang.acall/aapply under the same allow-list.
coroutines(Config) ->
    ?assertEqual({ok, 5}, erpy:call(asyncio, sleep, [0.01, 5], ?O)),
    ?assertEqual({ok, 7}, erpy:eval(<<"__import__('asyncio').sleep(0, 7)">>, #{}, ?O)),
    ?assertEqual({ok, #{status => ok, result => 42}},
                 erpy:run(#{code => <<"result = erlang.acall('erpy_contract_SUITE', 'twice', 21)">>, pool => ?P})),
    ?assertEqual({ok, 16}, erpy:eval(<<"erlang.aapply('erpy_contract_SUITE', 'twice', [8])">>, #{}, ?O)),
    {error, #{type := <<"ErlangError">>}} = erpy:eval(<<"erlang.acall('os', 'cmd', 'id')">>, #{}, ?O),
    {ok, #{status := error, error := #{type := <<"ValueError">>, message := <<"no">>}}} =
        erpy:run(#{code => <<"async def f():\n    raise ValueError('no')\nresult = f()">>, pool => ?P}),
    %% Several coroutines on the loop at once: gather.
    ?assertEqual({ok, #{status => ok, result => [1, 2, 3]}},
                 erpy:run(#{code => <<"import asyncio\n"
                                      "async def main():\n"
                                      "    return await asyncio.gather(*[asyncio.sleep(0.01, i) for i in (1, 2, 3)])\n"
                                      "result = main()">>, pool => ?P})),
    %% Once the worker has a loop, futures made outside a coroutine belong to it (node
    %% mode runs requests on several threads: there, write async def).
    [?assertEqual({ok, [1, 2]},
                  erpy:eval(<<"__import__('asyncio').gather(*[__import__('asyncio').sleep(0.01, i) for i in (1, 2)])">>, #{}, ?O))
     || ?config(mode, Config) =/= node],
    {ok, W} = erpy:checkout(?P),
    try
        ok = erpy:exec(<<"import asyncio\nseen = []\n"
                         "async def waits():\n"
                         "    try:\n        await asyncio.sleep(10)\n"
                         "    except asyncio.CancelledError:\n        seen.append('cancelled')\n        raise\n">>,
                       #{worker => W}),
        T0 = erlang:monotonic_time(millisecond),
        ?assertEqual({error, timeout}, erpy:eval(<<"waits()">>, #{}, #{worker => W, timeout => 300})),
        %% The loop was woken: the task saw CancelledError well before its sleep's end
        %% (node mode may answer the next request while the cancel still runs).
        ok = until(fun() -> erpy:eval(<<"seen">>, #{}, #{worker => W}) =:= {ok, [<<"cancelled">>]} end, 100),
        ?assert(erlang:monotonic_time(millisecond) - T0 < 5000),
        %% The loop is usable again.
        ?assertEqual({ok, 9}, erpy:eval(<<"asyncio.sleep(0, 9)">>, #{}, #{worker => W}))
    after
        erpy:checkin(W)
    end.

checkout(_Config) ->
    {ok, W} = erpy:checkout(?P),
    ok = erpy:exec(<<"kept = 5">>, #{worker => W}),
    ?assertEqual({ok, 10}, erpy:eval(<<"kept * 2">>, #{}, #{worker => W})),
    ok = erpy:checkin(W),
    ?assertEqual({ok, 42}, erpy:with_worker(?P, fun(W2) ->
                                                    ok = erpy:exec(<<"z = 21">>, #{worker => W2}),
                                                    erpy:eval(<<"z * 2">>, #{}, #{worker => W2})
                                                end)),
    ok = erpy_test_env:wait_serves(?P, 100),
    ?assertMatch({error, #{type := <<"NameError">>}}, erpy:eval(<<"kept">>, #{}, ?O)).

unknown_pool(_Config) ->
    ?assertEqual({error, {no_pool, no_such_pool}}, erpy:call(operator, add, [1, 2], #{pool => no_such_pool})),
    ?assertEqual({error, {no_pool, no_such_pool}}, erpy:checkout(no_such_pool)),
    ?assertEqual({error, {no_pool, no_such_pool}}, erpy:pool_info(no_such_pool)).

stopped_pool(Config) ->
    Mode = ?config(mode, Config),
    Size = case Mode of node -> #{start => 1}; _ -> #{size => 1} end,
    {ok, _} = erpy:start_pool(contract_stop, Size#{mode => Mode}),
    ok = erpy_test_env:wait_serves(contract_stop, 300),
    {ok, #{mode := Mode}} = erpy:pool_info(contract_stop),
    Self = self(),
    spawn(fun() -> Self ! {in_flight, erpy:exec(<<"import time\ntime.sleep(3)">>,
                                                #{pool => contract_stop, timeout => 10000})}
          end),
    timer:sleep(300),
    ok = erpy:stop_pool(contract_stop),
    receive {in_flight, R} -> ?assertEqual({error, {no_pool, contract_stop}}, R)
    after 8000 -> ct:fail(in_flight_lost)
    end,
    ?assertEqual({error, {no_pool, contract_stop}}, erpy:eval(<<"1">>, #{}, #{pool => contract_stop})).

bad_arguments(_Config) ->
    ?assertMatch({error, {badarg, _}}, erpy:call(1, f, [], ?O)),
    ?assertMatch({error, {badarg, _}}, erpy:call(m, f, not_a_list, ?O)),
    ?assertMatch({error, {badarg, _}}, erpy:eval(<<"1">>, not_a_map, ?O)),
    ?assertMatch({error, {badarg, _}}, erpy:eval(123, #{}, ?O)),
    ?assertMatch({error, {badarg, _}}, erpy:run(#{code => 123, pool => ?P})),
    ?assertMatch({error, {badarg, _}}, erpy:eval(<<"1">>, #{}, ?O#{worker => not_a_worker})),
    %% An allow-list that is not a list of entries: refused, never "everything".
    ?assertEqual({error, {badarg, {allowed, all}}},
                 erpy:start_pool(contract_bad_allowed, #{allowed => all})),
    ?assertEqual({error, {badarg, {allowed, {lists, "reverse"}}}},
                 erpy:start_pool(contract_bad_allowed, #{allowed => [{lists, "reverse"}]})),
    ?assertEqual({error, {no_pool, contract_bad_allowed}},
                 erpy:call(lists, reverse, [[]], #{pool => contract_bad_allowed})).

policy_refusals(_Config) ->
    Name = iolist_to_binary(io_lib:format("contract_no_atom_~b", [erlang:unique_integer([positive])])),
    ?assertEqual({error, {unknown_atom, Name}}, erpy:eval(<<"__import__('erpy').Atom(n)">>, #{n => Name}, ?O)),
    ?assertEqual({error, {not_allowed, {'fun', os, cmd, 1}}},
                 erpy:eval(<<"__import__('erpy').decode(b)">>, #{b => term_to_binary(fun os:cmd/1)}, ?O)),
    {ok, #{status := error, error := #{type := <<"ErlangError">>}}} =
        erpy:run(#{code => <<"import erpy\nerlang.send(erpy.Atom('rex'), 1)">>, pool => ?P}).

%% Helpers.

twice(X) -> 2 * X.

until(F, 0) -> F() orelse ct:fail(never_true), ok;
until(F, N) ->
    case F() of
        true -> ok;
        false -> timer:sleep(20), until(F, N - 1)
    end.

again_async(X) ->
    {ok, Id} = erpy:async_eval(<<"x * 2">>, #{x => X}, #{pool => ?P}),
    {ok, V} = erpy:await(Id),
    V.

again(X) ->
    {ok, V} = erpy:eval(<<"x * 2">>, #{x => X}, #{pool => ?P}),
    V.
