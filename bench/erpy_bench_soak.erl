%% The crash-injection soak of issue 10 in every mode (test/erpy_soak.erl): 8 callers for
%% SOAK_SECONDS (default 120) per mode, values, exceptions, timeouts and crashes mixed.
%% The figure is the count of wrong, lost and stray answers (must be 0) beside the calls
%% made; the reference is the calls of each kind.
-module(erpy_bench_soak).

-export([rows/1]).

rows(#{root := Root}) ->
    %% Run alone (BENCH_ONLY=erpy_bench_soak) nothing else has loaded and started erpy;
    %% the other workloads stop it when they are done.
    true = code:add_patha(filename:join([Root, "_build", "default", "lib", "erpy", "ebin"])),
    {ok, _} = application:ensure_all_started(erpy),
    Seconds = list_to_integer(os:getenv("SOAK_SECONDS", "120")),
    [row(Mode, Seconds) || Mode <- [port, embedded, node]].

row(Mode, Seconds) ->
    Pool = list_to_atom("soak_" ++ atom_to_list(Mode)),
    Opts = case Mode of
               node -> #{mode => node, start => 2, allowed => [], kill_grace_ms => 300};
               _ -> #{mode => Mode, size => 4, allowed => [], kill_grace_ms => 300}
           end,
    ok = ensure_dist(Mode),
    {ok, _} = erpy:start_pool(Pool, Opts),
    ok = erpy_test_env:wait_serves(Pool, 200),
    R = try erpy_soak:run(Pool, Mode, 8, Seconds)
        after erpy:stop_pool(Pool)
        end,
    #{calls := Calls, ok := Ok, exceptions := Ex, timeouts := To, crashes := Cr,
      wrong := Wrong, lost := Lost, stray := Stray, full_size := Full} = R,
    Bad = Wrong + Lost + Stray,
    #{id => <<"S1">>,
      workload => iolist_to_binary(io_lib:format(
                    "~s: crash-injection soak, 8 callers x ~b s, wrong / lost / stray answers",
                    [Mode, Seconds])),
      erpy => iolist_to_binary(io_lib:format("~b wrong, ~b lost, ~b stray of ~b calls; pool back to full size: ~s",
                                             [Wrong, Lost, Stray, Calls, Full])),
      reference => iolist_to_binary([io_lib:format("~b ok, ~b exceptions, ~b timeouts, ~b crashes",
                                                   [Ok, Ex, To, Cr]),
                                     %% Node mode: calls in flight on a node another call crashed.
                                     case maps:get(collateral, R, 0) of
                                         0 -> [];
                                         Co -> io_lib:format(", ~b node_down beside a crash", [Co])
                                     end]),
      ratio => float(Bad), target => <<"0 wrong, 0 lost, 0 stray, full size">>,
      pass => Bad =:= 0 andalso Full,
      notes => [iolist_to_binary(io_lib:format("examples: ~0p", [maps:get(examples, R)]))
                || maps:get(examples, R) =/= []]}.

ensure_dist(node) ->
    _ = os:cmd("epmd -daemon"),
    case is_alive() of
        true -> ok;
        false -> {ok, _} = net_kernel:start(['erpy_bench@127.0.0.1', longnames]), ok
    end;
ensure_dist(_) ->
    ok.
