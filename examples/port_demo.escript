#!/usr/bin/env escript
%%! -noshell +pc unicode
%% `make demo`, part two: erpy's port mode doing what erl_py_runner's README shows (the
%% sum of `arguments`, a callback to lists:sort/1, a Python exception, a timeout), then
%% erpy:call/eval, a checkout, print() reaching the logger, and a crashed worker replaced.
-mode(compile).
-export([log/2]).

main(_) ->
    Root = os:getenv("ERPY_ROOT", filename:dirname(filename:dirname(
                                     filename:absname(escript:script_name())))),
    true = code:add_patha(filename:join([Root, "_build", "default", "lib", "erpy", "ebin"])),
    logger:set_primary_config(level, info),
    logger:add_primary_filter(no_progress, {fun logger_filters:progress/2, stop}),
    %% What Python prints arrives as logger events (domain [erpy, python]); show them.
    logger:add_handler(python_output, ?MODULE, #{filter_default => stop,
                                                   filters => [{python, {fun logger_filters:domain/2,
                                                                         {log, sub, [erpy, python]}}}]}),
    ok = application:load(erpy),
    ok = application:set_env(erpy, allowed, [lists, {erlang, abs}]),
    T0 = erlang:monotonic_time(millisecond),
    {ok, _} = application:ensure_all_started(erpy),
    show("erpy:call(operator, add, [1, 2])  (first call, pool just started)",
         erpy:call(operator, add, [1, 2])),
    io:format("   started and answered in ~b ms~n~n", [erlang:monotonic_time(millisecond) - T0]),
    show("erpy:run(#{code => <<\"result = arguments['x'] + arguments['y']\">>, ...})",
         erpy:run(#{code => <<"result = arguments['x'] + arguments['y']">>,
                    arguments => #{<<"x">> => 10, <<"y">> => 20}})),
    show("erpy:run(#{code => <<\"result = erlang.call('lists', 'sort', [9, 1, 5])\">>})",
         erpy:run(#{code => <<"result = erlang.call('lists', 'sort', [9, 1, 5])">>,
                    arguments => #{}})),
    show("erpy:run(#{code => <<\"result = 1 / 0\">>})",
         erpy:run(#{code => <<"result = 1 / 0">>, arguments => #{}})),
    show("erpy:run(#{code => <<\"import time; time.sleep(10)\">>}, 500)",
         erpy:run(#{code => <<"import time; time.sleep(10)">>, arguments => #{}}, 500)),
    show("erpy:run(#{code => <<\"erlang.call('os', 'cmd', 'ls')\">>})  (not in the allow-list)",
         erpy:run(#{code => <<"result = erlang.call('os', 'cmd', 'ls')">>})),
    show("erpy:eval(<<\"sum(x) / len(x)\">>, #{x => [1, 2, 3, 4]})",
         erpy:eval(<<"sum(x) / len(x)">>, #{x => [1, 2, 3, 4]})),
    show("erpy:call('os.path', join, [<<\"a\">>, <<\"b\">>])",
         erpy:call('os.path', join, [<<"a">>, <<"b">>])),
    show("erpy:with_worker(default, fun(W) -> exec x = 21, eval x * 2 end)",
         erpy:with_worker(default, fun(W) ->
                                           ok = erpy:exec(<<"x = 21">>, #{worker => W}),
                                           erpy:eval(<<"x * 2">>, #{}, #{worker => W})
                                   end)),
    show("erpy:run(#{code => <<\"print('hello from Python')\">>})  (print goes to the logger)",
         erpy:run(#{code => <<"print('hello from Python')">>})),
    timer:sleep(100),
    show("erpy:run(#{code => <<\"import os; os._exit(1)\">>})  (the worker dies)",
         erpy:run(#{code => <<"import os; os._exit(1)">>})),
    show("erpy:call(operator, add, [1, 2])  (a new worker answers)",
         erpy:call(operator, add, [1, 2], #{timeout => 10000})),
    application:stop(erpy),
    ok.

%% A logger handler: one line per line Python printed.
log(#{msg := {Format, Args}, meta := Meta}, _Config) ->
    io:format("   [python ~p, worker ~p] ~ts~n",
              [maps:get(stream, Meta, stdout), maps:get(os_pid, Meta, '?'),
               io_lib:format(Format, Args)]);
log(_Event, _Config) ->
    ok.

show(What, Result) ->
    io:format("~s~n   -> ~tp~n~n", [What, Result]).
