%% A1: asynchronous requests (erpy:async_call + erpy:await) in each mode, beside
%% erpy:call of the same request on the same pool, alternated in the same run; and
%% 10,000 requests in flight from one process, every answer checked.
-module(erpy_bench_async).

-export([rows/1]).

-define(POOL, erpy_bench_async).
-define(IN_FLIGHT, 10000).

-spec rows(erpy_bench:ctx()) -> [erpy_bench:row()].
rows(#{root := Root} = Ctx) ->
    true = code:add_patha(filename:join([Root, "_build", "default", "lib", "erpy", "ebin"])),
    {ok, _} = application:ensure_all_started(erpy),
    case is_alive() of
        true -> ok;
        false ->
            _ = os:cmd("epmd -daemon"),
            {ok, _} = net_kernel:start(['erpy_bench_async@127.0.0.1', longnames])
    end,
    lists:append([mode(Ctx, Mode) || Mode <- [port, embedded, node]]).

mode(#{pairs := Pairs}, Mode) ->
    Size = case Mode of node -> #{start => 1}; _ -> #{size => 1} end,
    {ok, _} = erpy:start_pool(?POOL, Size#{mode => Mode}),
    try
        O = #{pool => ?POOL, timeout => 30000},
        wait_serves(O, 300),
        Sync = fun() -> {ok, 3} = erpy:call(operator, add, [1, 2], O) end,
        Async = fun() -> {ok, Id} = erpy:async_call(operator, add, [1, 2], O), {ok, 3} = erpy:await(Id) end,
        N = 1000,
        _ = [Async() || _ <- lists:seq(1, 200)],
        {A, S} = erpy_bench:alternate(Pairs, fun() -> latencies(Async, N) end, fun() -> latencies(Sync, N) end),
        Ratio = erpy_bench:median([erpy_bench:median(X) / erpy_bench:median(Y) || {X, Y} <- lists:zip(A, S)]),
        AMed = erpy_bench:median([erpy_bench:median(X) || X <- A]),
        SMed = erpy_bench:median([erpy_bench:median(Y) || Y <- S]),
        {Us, Ok} = in_flight(O),
        [#{id => <<"A1">>,
           workload => fmt("~s: erpy:async_call + erpy:await of operator.add(1, 2), us/round trip", [Mode]),
           erpy => fmt("median ~.1f us; ~b of ~b in flight from one process answered right in ~b ms",
                       [AMed, Ok, ?IN_FLIGHT, round(Us / 1000)]),
           reference => fmt("erpy:call of the same on the same pool: median ~.1f us", [SMed]),
           ratio => Ratio, target => <<"<= 1.2x, none lost">>,
           pass => Ratio =< 1.2 andalso Ok =:= ?IN_FLIGHT,
           notes => [fmt("~b pairs of ~b calls; ratio = async median / call median per pair; "
                         "pool of one worker", [Pairs, N])]}]
    after
        erpy:stop_pool(?POOL)
    end.

%% 10,000 requests started at once from this process, then awaited: wall time, and how
%% many answered with their own value.
in_flight(O) ->
    T0 = erlang:monotonic_time(microsecond),
    Ids = [{I, element(2, erpy:async_call(operator, add, [I, 1], O))} || I <- lists:seq(1, ?IN_FLIGHT)],
    Ok = length([ok || {I, Id} <- Ids, erpy:await(Id) =:= {ok, I + 1}]),
    {erlang:monotonic_time(microsecond) - T0, Ok}.

latencies(F, N) ->
    [begin
         T0 = erlang:monotonic_time(nanosecond),
         F(),
         (erlang:monotonic_time(nanosecond) - T0) / 1000
     end || _ <- lists:seq(1, N)].

wait_serves(O, Tries) ->
    case erpy:call(operator, add, [1, 2], O#{timeout => 1000}) of
        {ok, 3} -> ok;
        _ when Tries > 0 -> timer:sleep(100), wait_serves(O, Tries - 1);
        Other -> error({pool_not_serving, Other})
    end.

fmt(F, A) -> iolist_to_binary(io_lib:format(F, A)).
