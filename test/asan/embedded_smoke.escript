#!/usr/bin/env escript
%%! -noshell
%% `make test-asan`, embedded part: the NIF built with AddressSanitizer and
%% UndefinedBehaviorSanitizer (ERPY_NIF_DIR, libasan preloaded by the Makefile) runs a
%% short workout of every path: conversions of every kind of term, errors, timeouts and
%% interrupts, a stuck context replaced, callbacks and nesting, handles and their release, checkout, pool close.
%% Any sanitizer report aborts the VM, which fails this step.
-module(embedded_smoke).
-mode(compile).
-export([main/1]).
-export([nested/1]).

main(_) ->
    Root = os:getenv("ERPY_ROOT"),
    true = code:add_patha(filename:join([Root, "_build", "default", "lib", "erpy", "ebin"])),
    ok = application:load(erpy),
    ok = application:set_env(erpy, pools, [{default, #{mode => embedded, size => 2}}]),
    {ok, _} = application:ensure_all_started(erpy),
    {ok, _} = erpy:start_pool(one, #{mode => embedded, size => 1, allowed => [{?MODULE, nested, 1}]}),
    %% Every kind of term, both ways (the generator is the property tests').
    {ok, Gen, Beam} = compile:file(filename:join([Root, "test", "erpy_term_gen.erl"]), [binary]),
    {module, Gen} = code:load_binary(Gen, "erpy_term_gen.erl", Beam),
    erpy_term_gen:seed(11),
    [{ok, T} = erpy:eval(<<"x">>, #{x => T}) || K <- erpy_term_gen:kinds(), _ <- lists:seq(1, 30),
                                               T <- [erpy_term_gen:term(K)]],
    {ok, B} = erpy:eval(<<"bytes(range(256)) * 4096">>, #{}),
    1048576 = byte_size(B),
    {ok, B} = erpy:call(copy, copy, [B]),
    {error, #{type := <<"ZeroDivisionError">>}} = erpy:eval(<<"1/0">>, #{}),
    {error, #{type := <<"EncodeError">>}} = erpy:eval(<<"object()">>, #{}),
    %% Issue 10: unhashable keys frozen, atoms refused, sizes and depth bounded.
    Keys = #{[1] => 2, "k" => #{#{a => 1} => [1 | 2]}},
    {ok, Keys} = erpy:eval(<<"x">>, #{x => Keys}),
    {error, {unknown_atom, <<"erpy_asan_no_such_atom">>}} =
        erpy:eval(<<"__import__('erpy').Pid('erpy_asan_no_such_atom', 1, 0, 0)">>, #{}),
    {error, {message_too_large, _, _}} = erpy:eval(<<"['x' * 1000] * 20000">>, #{}),
    {error, #{type := <<"DecodeError">>}} =
        erpy:eval(<<"x">>, #{x => lists:foldl(fun(_, A) -> [A] end, [], lists:seq(1, 100000))}),
    {error, #{type := <<"DecodeError">>}} =
        erpy:eval(<<"__import__('erpy').decode(b'\\x83' + b'h\\x01' * 10**6 + b'j', max_depth=10**7)">>, #{}),
    Self = self(),
    [spawn(fun() -> Self ! {t, erpy:exec(<<"while True: pass">>, #{timeout => 20})} end) || _ <- lists:seq(1, 6)],
    [receive {t, {error, timeout}} -> ok end || _ <- lists:seq(1, 6)],
    {ok, 8} = erpy:eval(<<"erlang.call('embedded_smoke', 'nested', 3)">>, #{}, #{pool => one}),
    %% A context stuck in time.sleep is replaced; its thread ends after the sleep.
    {ok, _} = erpy:start_pool(stuck, #{mode => embedded, size => 1, kill_grace_ms => 50}),
    {error, timeout} = erpy:call(time, sleep, [0.6], #{pool => stuck, timeout => 20}),
    {ok, 3} = erpy:call(operator, add, [1, 2], #{pool => stuck, timeout => 2000}),
    timer:sleep(800),
    {ok, #{replaced := 1, stuck := 0}} = erpy:pool_info(stuck),
    ok = erpy:stop_pool(stuck),
    [begin {ok, H} = erpy:call(collections, 'OrderedDict', [], #{handle => true}),
           {ok, 0} = erpy:call(builtins, len, [H]) end || _ <- lists:seq(1, 2000)],
    erlang:garbage_collect(),
    {ok, W} = erpy:checkout(default),
    ok = erpy:exec(<<"v = [1] * 1000">>, #{worker => W}),
    {ok, 1000} = erpy:eval(<<"len(v)">>, #{}, #{worker => W}),
    ok = erpy:checkin(W),
    ok = erpy:stop_pool(one),
    timer:sleep(100),
    ok = application:stop(erpy),
    io:format("embedded smoke test under ASan/UBSan: ok~n").

nested(0) -> 1;
nested(N) ->
    {ok, V} = erpy:eval(<<"2 * erlang.call('embedded_smoke', 'nested', n - 1)">>, #{n => N}, #{pool => one}),
    V.
