%% The crash-injection soak (issue 10): `Callers` processes call one pool for `Seconds`,
%% each call at random a value, a Python exception, a timeout or a crash of what runs it
%% (a worker process, a context, a Python node). Every answer is checked against what the
%% call must give; a call that never returns is lost; anything left in a caller's mailbox
%% after its call returned is a stray message. In node mode one Python node runs many
%% calls at once, so a crash also ends the other calls in flight on that node, with
%% {error, {node_down, Node}} as documented (doc/node.md): such an answer to a call of
%% another kind is counted as `collateral`, not wrong (always 0 in the other modes). Used by erpy_security_SUITE (short) and by
%% `make bench` (2 minutes per mode, bench/RESULTS.md).
-module(erpy_soak).

-export([run/4]).

-type result() :: #{calls := non_neg_integer(), ok := non_neg_integer(),
                    exceptions := non_neg_integer(), timeouts := non_neg_integer(),
                    crashes := non_neg_integer(), collateral := non_neg_integer(),
                    wrong := non_neg_integer(),
                    lost := non_neg_integer(), stray := non_neg_integer(),
                    examples := [term()], full_size := boolean(),
                    size := pos_integer(), seconds := number()}.
-export_type([result/0]).

%% How long past its timeout a call may take before it counts as lost.
-define(LOST_MS, 10000).
-define(TIMEOUT_MS, 150).

-spec run(atom(), port | embedded | node, pos_integer(), number()) -> result().
run(Pool, Mode, Callers, Seconds) ->
    Self = self(),
    Size = size(Pool, Mode),
    Until = erlang:monotonic_time(millisecond) + round(Seconds * 1000),
    Pids = [spawn_link(fun() -> Self ! {soak_done, self(), caller(Pool, Mode, Until, rand_seed(C))} end)
            || C <- lists:seq(1, Callers)],
    Results = [receive {soak_done, P, R} -> R
               after round(Seconds * 1000) + 2 * ?LOST_MS + 5000 ->
                   unlink(P), exit(P, kill), #{lost => 1}
               end || P <- Pids],
    Sum = lists:foldl(fun(R, Acc) -> maps:fold(fun add/3, Acc, R) end, zero(), Results),
    {Full, Size} = back_to_size(Pool, Mode, Size, 20000),
    Sum#{full_size => Full, size => Size, seconds => Seconds}.

zero() ->
    #{calls => 0, ok => 0, exceptions => 0, timeouts => 0, crashes => 0, collateral => 0, wrong => 0,
      lost => 0, stray => 0, examples => []}.

add(examples, E, #{examples := Es} = Acc) -> Acc#{examples => lists:sublist(Es ++ E, 5)};
add(K, V, Acc) -> Acc#{K => maps:get(K, Acc, 0) + V}.

rand_seed(C) ->
    rand:seed(exsss, {C, erlang:unique_integer([positive]), erlang:system_time()}).

caller(Pool, Mode, Until, Seed) ->
    put(rand_seed, Seed),
    loop(Pool, Mode, Until, zero()).

loop(Pool, Mode, Until, Acc) ->
    case erlang:monotonic_time(millisecond) >= Until of
        true -> Acc;
        false -> loop(Pool, Mode, Until, one(Pool, Mode, Acc))
    end.

one(Pool, Mode, Acc) ->
    X = rand:uniform(1000000),
    Kind = case rand:uniform(100) of
               N when N =< 70 -> ok;
               N when N =< 85 -> exceptions;
               N when N =< 95 -> timeouts;
               _ -> crashes
           end,
    {Code, Timeout} = code(Kind, Mode),
    Started = erlang:monotonic_time(millisecond),
    Answer = erpy:run(#{code => Code, arguments => X, pool => Pool}, Timeout),
    Took = erlang:monotonic_time(millisecond) - Started,
    Stray = receive M -> [M] after 0 -> [] end,
    Acc1 = Acc#{calls => maps:get(calls, Acc) + 1},
    Acc2 = case Stray of
               [] -> Acc1;
               [S] -> note(stray, {stray, Kind, S}, Acc1)
           end,
    case {Took > Timeout + ?LOST_MS, right(Kind, X, Answer)} of
        {true, _} -> note(lost, {late, Kind, Took}, Acc2);
        {false, true} -> Acc2#{Kind => maps:get(Kind, Acc2) + 1};
        {false, false} ->
            case collateral(Mode, Answer) of
                true -> Acc2#{collateral => maps:get(collateral, Acc2) + 1};
                false -> note(wrong, {wrong, Kind, X, Answer}, Acc2)
            end
    end.

note(Key, Example, #{examples := Es} = Acc) ->
    Acc#{Key => maps:get(Key, Acc) + 1, examples => lists:sublist([Example | Es], 5)}.

code(ok, _Mode) ->
    {<<"result = arguments * 2">>, 5000};
code(exceptions, _Mode) ->
    {<<"raise ValueError(str(arguments))">>, 5000};
code(timeouts, _Mode) ->
    {<<"import time\ntime.sleep(2)">>, ?TIMEOUT_MS};
code(crashes, embedded) ->
    %% A C call that ignores the interrupt: the context is replaced (kill_grace_ms).
    {<<"import time\ntime.sleep(1.5)">>, ?TIMEOUT_MS};
code(crashes, _Mode) ->
    {<<"import os\nos._exit(7)">>, 5000}.

right(ok, X, {ok, #{status := ok, result := R}}) -> R =:= 2 * X;
right(exceptions, X, {ok, #{status := error, error := #{type := <<"ValueError">>, message := M}}}) ->
    M =:= integer_to_binary(X);
right(timeouts, _X, {error, timeout}) -> true;
right(crashes, _X, {error, timeout}) -> true;
right(crashes, _X, {error, {worker_exit, _}}) -> true;
right(crashes, _X, {error, {node_down, _}}) -> true;
right(_Kind, _X, _Answer) -> false.

%% A call in flight on a Python node that another call crashed.
collateral(node, {error, {node_down, _}}) -> true;
collateral(_Mode, _Answer) -> false.

%% After the storm the pool serves again with all its workers.
back_to_size(Pool, Mode, Size, Ms) ->
    Deadline = erlang:monotonic_time(millisecond) + Ms,
    wait_size(Pool, Mode, Size, Deadline).

wait_size(Pool, Mode, Size, Deadline) ->
    Ready = ready(Pool, Mode),
    Serves = erpy:eval(<<"1 + 1">>, #{}, #{pool => Pool, timeout => 2000}) =:= {ok, 2},
    case Ready >= Size andalso Serves of
        true -> {true, Size};
        false ->
            case erlang:monotonic_time(millisecond) > Deadline of
                true -> {false, Size};
                false -> timer:sleep(100), wait_size(Pool, Mode, Size, Deadline)
            end
    end.

size(Pool, node) -> maps:get(configured, info(Pool));
size(Pool, _Mode) -> maps:get(size, info(Pool)).

ready(Pool, port) -> maps:get(ready, info(Pool));
ready(Pool, embedded) ->
    #{size := S, busy := Busy} = info(Pool),
    S - Busy;
ready(Pool, node) -> length(erpy_node_pool:nodes(Pool)).

info(Pool) ->
    {ok, Info} = erpy:pool_info(Pool),
    Info.
