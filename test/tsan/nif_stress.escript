#!/usr/bin/env escript
%%! -noshell +Mea min
%% `make test-tsan`: the NIF built with ThreadSanitizer (ERPY_NIF_DIR, libtsan preloaded
%% by the Makefile) under a concurrent workout of the embedded pool: many callers at
%% once with plain calls, callbacks into Erlang and nested calls, timeouts and callers
%% that die mid-call (cancels and interrupts), handles made and dropped, checkout and
%% checkin (and holders that die), contexts stuck in C and replaced, pool info read
%% while all that runs, and pools stopped under load. Every answer is checked; a data
%% race in the NIF makes TSan report it, and the VM's exit code then fails this step.
-module(nif_stress).
-mode(compile).
-export([main/1]).
-export([cb/1, nested/2, slow_cb/1]).

-define(CALLERS, 32).
-define(ROUNDS, 200).

main(_) ->
    %% Children of the VM (a shell, a resolver) must not start under TSan.
    os:unsetenv("LD_PRELOAD"),
    Root = os:getenv("ERPY_ROOT"),
    true = code:add_patha(filename:join([Root, "_build", "default", "lib", "erpy", "ebin"])),
    ok = application:load(erpy),
    ok = application:set_env(erpy, pools, []),
    {ok, _} = application:ensure_all_started(erpy),
    Allowed = [{?MODULE, cb, 1}, {?MODULE, nested, 2}, {?MODULE, slow_cb, 1}],
    {ok, _} = erpy:start_pool(stress, #{mode => embedded, size => 3, allowed => Allowed,
                                        kill_grace_ms => 100}),
    Self = self(),
    Churn = spawn_link(fun() -> churn(Allowed, 60), Self ! churn_done end),
    Info = spawn_link(fun() -> info_loop() end),
    _ = [spawn_link(fun() -> rand:seed(exsss, {I, I, I}), caller(?ROUNDS), Self ! {done, I} end)
               || I <- lists:seq(1, ?CALLERS)],
    [receive {done, I} -> ok end || I <- lists:seq(1, ?CALLERS)],
    receive churn_done -> ok end,
    _ = [Churn],
    unlink(Info),
    exit(Info, kill),
    %% Everything still answers after the storm, and a stuck context's thread has ended.
    {ok, 3} = erpy:eval(<<"a + b">>, #{a => 1, b => 2}, #{pool => stress}),
    ok = erpy:stop_pool(stress),
    timer:sleep(300),
    ok = application:stop(erpy),
    io:format("NIF pool stress under ThreadSanitizer: ok~n"),
    halt(0).

%% One caller: a random mix of every kind of request.
caller(0) -> ok;
caller(N) ->
    step(rand:uniform(13)),
    caller(N - 1).

step(1) ->
    {ok, 3} = erpy:eval(<<"a + b">>, #{a => 1, b => 2}, #{pool => stress});
step(2) ->
    {ok, [1, 2]} = erpy:call(builtins, list, [[1, 2]], #{pool => stress});
step(3) ->
    %% A callback into Erlang, which answers.
    {ok, 8} = erpy:eval(<<"erlang.call('nif_stress', 'cb', 4)">>, #{}, #{pool => stress});
step(4) ->
    %% A callback whose Erlang side calls Python again (nested on the same context).
    {ok, 4} = erpy:eval(<<"erlang.apply('nif_stress', 'nested', [2, 'stress'])">>, #{}, #{pool => stress});
step(5) ->
    %% Timeouts: a busy loop interrupted, and a job cancelled while Erlang works for it.
    {error, timeout} = erpy:exec(<<"while True: pass">>, #{pool => stress, timeout => 5}),
    {error, timeout} = erpy:eval(<<"erlang.call('nif_stress', 'slow_cb', 30)">>, #{},
                                 #{pool => stress, timeout => 10});
step(6) ->
    %% Handles: made, used, dropped (the janitor frees them under the GIL).
    {ok, H} = erpy:call(collections, 'OrderedDict', [], #{pool => stress, handle => true}),
    {ok, 0} = erpy:call(builtins, len, [H], #{pool => stress}),
    erlang:garbage_collect();
step(7) ->
    %% A held context: its namespace lasts until checkin.
    {ok, W} = erpy:checkout(stress),
    ok = erpy:exec(<<"v = [1] * 10">>, #{worker => W}),
    {ok, 10} = erpy:eval(<<"len(v)">>, #{}, #{worker => W}),
    ok = erpy:checkin(W);
step(8) ->
    %% A holder that dies without checkin, and a caller killed mid-call.
    {Pid, Ref} = spawn_monitor(fun() -> {ok, _} = erpy:checkout(stress) end),
    receive {'DOWN', Ref, process, Pid, _} -> ok end,
    Victim = spawn(fun() -> erpy:call(time, sleep, [0.05], #{pool => stress}) end),
    timer:sleep(rand:uniform(20)),
    exit(Victim, kill);
step(9) ->
    %% Stuck in C (time.sleep), so the interrupt waits: the context is replaced.
    {error, timeout} = erpy:call(time, sleep, [0.3], #{pool => stress, timeout => 10});
step(10) ->
    {error, #{type := <<"ZeroDivisionError">>}} = erpy:eval(<<"1/0">>, #{}, #{pool => stress});
step(11) ->
    %% Asynchronous requests the NIF answers: awaited (polled), and as messages; a result
    %% to check and a callback go through a runner.
    O = #{pool => stress},
    Ids = [erpy:async_call(operator, add, [I, 1], O) || I <- lists:seq(1, 20)],
    {ok, C} = erpy:async_eval(<<"erlang.call('nif_stress', 'cb', 4)">>, #{}, O),
    {ok, P} = erpy:async_eval(<<"p">>, #{p => self()}, O),
    Sums = [I + 1 || I <- lists:seq(1, 20)],
    Sums = [begin {ok, V} = erpy:await(Id), V end || {ok, Id} <- Ids],
    {ok, 8} = erpy:await(C),
    {ok, _} = erpy:await(P);
step(12) ->
    %% Deadlines kept by the service thread (nobody awaits), and cancels racing answers.
    O = #{pool => stress, timeout => 5},
    {ok, T1} = erpy:async_eval(<<"next(x for x in iter(int, 1) if x)">>, #{}, O),  % never ends
    {ok, T2} = erpy:async_eval(<<"erlang.call('nif_stress', 'slow_cb', 30)">>, #{}, O),
    {ok, X} = erpy:async_call(operator, add, [1, 2], #{pool => stress}),
    {ok, Y} = erpy:async_eval(<<"erlang.call('nif_stress', 'cb', 4)">>, #{}, #{pool => stress}),
    timer:sleep(rand:uniform(3)),
    ok = erpy:cancel(X),
    ok = erpy:cancel(Y),
    {error, timeout} = erpy:await(T1),
    {error, timeout} = erpy:await(T2);
step(13) ->
    %% A caller that dies with asynchronous requests in flight.
    Victim = spawn(fun() ->
                           _ = erpy:async_eval(<<"erlang.call('nif_stress', 'slow_cb', 20)">>, #{}, #{pool => stress}),
                           _ = erpy:async_call(time, sleep, [0.05], #{pool => stress}),
                           receive never -> ok end
                   end),
    timer:sleep(rand:uniform(20)),
    exit(Victim, kill).

cb(X) -> 2 * X.

nested(X, Pool) ->
    {ok, V} = erpy:eval(<<"x * 2">>, #{x => X}, #{pool => binary_to_atom(Pool)}),
    V.

slow_cb(Ms) ->
    timer:sleep(Ms),
    ok.

%% Pools started and stopped while callers use them: queued, running and held work meets
%% the close.
churn(_Allowed, 0) -> ok;
churn(Allowed, N) ->
    {ok, _} = erpy:start_pool(churn, #{mode => embedded, size => 2, allowed => Allowed}),
    Self = self(),
    Users = [spawn(fun() -> churn_user(Self) end) || _ <- lists:seq(1, 6)],
    timer:sleep(10 + rand:uniform(50)),
    ok = erpy:stop_pool(churn),
    [receive {churn_user, U, R} -> ok = R end || U <- Users],
    churn(Allowed, N - 1).

churn_user(Parent) ->
    R = try
            churn_calls(1000)
        catch
            C:E:S -> {C, E, S}
        end,
    Parent ! {churn_user, self(), R}.

churn_calls(0) -> ok;
churn_calls(N) ->
    Answer = case N rem 5 of
                 4 -> {ok, Id} = erpy:async_eval(<<"erlang.call('nif_stress', 'cb', 1)">>, #{}, #{pool => churn}),
                      erpy:await(Id);
                 0 -> erpy:call(time, sleep, [0.002], #{pool => churn, timeout => 500});
                 1 -> erpy:eval(<<"erlang.call('nif_stress', 'cb', 1)">>, #{}, #{pool => churn});
                 2 -> case erpy:checkout(churn) of
                          {ok, W} ->
                              R = erpy:eval(<<"erlang.call('nif_stress', 'cb', 1)">>, #{}, #{worker => W}),
                              erpy:checkin(W),
                              R;
                          Other -> Other
                      end;
                 3 -> erpy:eval(<<"sum(range(1000))">>, #{}, #{pool => churn})
             end,
    case Answer of
        {ok, _} -> churn_calls(N - 1);
        ok -> churn_calls(N - 1);
        {error, _} -> ok  % the pool stopped (each mode says so in its way)
    end.

%% The pool's counters, read while it works.
info_loop() ->
    _ = (catch erpy:pool_info(stress)),
    timer:sleep(5),
    info_loop().
