%% The NIF's boundary (embedded mode): a failure in its C++ becomes an Erlang error and
%% never ends the VM. The failure provoked here is the system refusing a thread, for the
%% NIF that starts a pool's threads and for the service thread that replaces a stuck one:
%% uncaught, either would have reached std::terminate.
-module(erpy_nif_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1, end_per_testcase/2]).
-export([pool_threads_refused/1, replacement_thread_refused/1, bad_arguments/1]).

%% Sets the default stack size of new threads in this process (glibc's
%% pthread_setattr_default_np, which std::thread uses) to `arguments`, and answers the
%% old size and whether a thread can still start. A size no system can map makes every
%% thread that uses the default fail to start (EAGAIN), as when the system is out of
%% threads or memory.
-define(SET_STACK, <<"import ctypes, threading\n"
                     "libc = ctypes.CDLL(None)\n"
                     "attr = ctypes.create_string_buffer(256)\n"
                     "assert libc.pthread_getattr_default_np(attr) == 0\n"
                     "old = ctypes.c_size_t()\n"
                     "libc.pthread_attr_getstacksize(attr, ctypes.byref(old))\n"
                     "assert libc.pthread_attr_setstacksize(attr, ctypes.c_size_t(arguments)) == 0\n"
                     "assert libc.pthread_setattr_default_np(attr) == 0\n"
                     "libc.pthread_attr_destroy(attr)\n"
                     "try:\n"
                     "    t = threading.Thread(target=lambda: None)\n"
                     "    t.start()\n"
                     "    t.join()\n"
                     "    starts = True\n"
                     "except RuntimeError:\n"
                     "    starts = False\n"
                     "result = (old.value, starts)\n">>).
-define(HUGE, 1 bsl 46).

all() ->
    [pool_threads_refused, replacement_thread_refused, bad_arguments].

suite() ->
    [{timetrap, {seconds, 60}}].

init_per_suite(Config) ->
    _ = application:load(erpy),
    {ok, _} = application:ensure_all_started(erpy),
    %% The pool that changes the thread defaults (its own thread exists already).
    {ok, _} = erpy:start_pool(nif_ctl, #{mode => embedded, size => 1}),
    Config.

end_per_suite(_Config) ->
    _ = erpy:stop_pool(nif_ctl),
    application:stop(erpy),
    ok.

end_per_testcase(_Case, _Config) ->
    [erpy:stop_pool(P) || P <- [nif_refused, nif_stuck]],
    ok.

%% Threads refused while a pool starts: the pool does not start (an error, not a crash),
%% and once threads can start again, it does.
pool_threads_refused(_Config) ->
    doc("A pool whose threads the system refuses fails to start; the VM carries on."),
    with_threads_refused(fun() ->
        ?assertMatch({error, _}, erpy:start_pool(nif_refused, #{mode => embedded, size => 2}))
    end),
    {ok, _} = erpy:start_pool(nif_refused, #{mode => embedded, size => 2}),
    ?assertEqual({ok, 3}, erpy:eval(<<"1 + 2">>, #{}, #{pool => nif_refused})).

%% A stuck context's replacement thread refused: the service thread keeps going and
%% starts the replacement once it can.
replacement_thread_refused(_Config) ->
    doc("The service thread survives a refused replacement thread and retries it."),
    {ok, _} = erpy:start_pool(nif_stuck, #{mode => embedded, size => 1, kill_grace_ms => 50}),
    with_threads_refused(fun() ->
        %% Stuck in C past the grace time: replaced, but no thread can start now.
        ?assertEqual({error, timeout},
                     erpy:call(time, sleep, [1.0], #{pool => nif_stuck, timeout => 20})),
        timer:sleep(300),
        %% Python and the pool's other work are unaffected (this runs on nif_ctl).
        ?assertEqual({ok, 2}, erpy:eval(<<"1 + 1">>, #{}, #{pool => nif_ctl}))
    end),
    %% The replacement starts at a later tick and serves.
    ?assertEqual({ok, 3}, erpy:eval(<<"1 + 2">>, #{}, #{pool => nif_stuck, timeout => 5000})).

%% Arguments the NIFs do not accept raise badarg (the VM's own error), never crash.
bad_arguments(_Config) ->
    doc("Bad arguments to the NIFs are badarg."),
    ?assertError(badarg, erpy_nif:pool_new(0, self(), #{})),
    ?assertError(badarg, erpy_nif:pool_info(make_ref())),
    ?assertError(badarg, erpy_nif:submit(make_ref(), make_ref(), erpy_request:eval(<<"1">>, #{}))),
    ?assertError(badarg, erpy_nif:poll(make_ref(), true)),
    ?assertError(badarg, erpy_nif:cancel(self())),
    ?assertError(badarg, erpy_nif:checkin(undefined)),
    ?assertError(badarg, erpy_nif:callback_reply(1, {ok, 1})).

%% ---- helpers -------------------------------------------------------------------------

doc(Text) -> ct:comment(Text).

%% Runs Fun while no thread can start in this VM (skipped where that cannot be arranged).
with_threads_refused(Fun) ->
    case erpy:run(#{code => ?SET_STACK, arguments => ?HUGE, pool => nif_ctl}) of
        {ok, #{status := ok, result := {Old, false}}} ->
            try Fun() after allow_threads(Old) end;
        {ok, #{status := ok, result := {Old, true}}} ->
            %% This system maps even that (overcommit without limits): nothing to test.
            allow_threads(Old),
            exit({skip, "threads start with any stack size here"})
    end.

allow_threads(Old) ->
    {ok, #{status := ok, result := {_, true}}} =
        erpy:run(#{code => ?SET_STACK, arguments => Old, pool => nif_ctl}),
    ok.
