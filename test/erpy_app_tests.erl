%% The application starts, has its documented defaults, and stops.
-module(erpy_app_tests).

-include_lib("eunit/include/eunit.hrl").

start_stop_test() ->
    {ok, Started} = application:ensure_all_started(erpy),
    try
        ?assert(lists:member(erpy, [A || {A, _, _} <- application:which_applications()])),
        ?assert(is_pid(whereis(erpy_sup)))
    after
        [ok = application:stop(A) || A <- lists:reverse(Started)]
    end,
    ?assertEqual(undefined, whereis(erpy_sup)).

defaults_test() ->
    _ = application:load(erpy),
    Env = maps:from_list(application:get_all_env(erpy)),
    ?assertMatch(#{python := undefined, venv := undefined, requirements := [], pools := [],
                   allowed := [], max_message_size := 10485760, timeout := 5000}, Env).
