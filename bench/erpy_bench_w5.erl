%% W5: ETF encode+decode of W3b's term inside Python (erpy.decode + erpy.encode), beside
%% the fastest serializer CPython has, marshal (dumps + loads of the same objects), and
%% beside pickle (protocol 5), Debian's msgpack and Erlang's own term_to_binary +
%% binary_to_term, all in the same run.
-module(erpy_bench_w5).

-export([rows/1, term/0]).

-define(TARGET, 1.0).

%% The codecs of bench/py/bench_port.py: request byte, name as it answers, label.
-define(PY_CODECS, [{$e, <<"erpy">>, "erpy.encode+decode"},
                    {$m, <<"marshal">>, "marshal.dumps+loads"},
                    {$p, <<"pickle">>, "pickle (protocol 5) dumps+loads"},
                    {$g, <<"msgpack">>, "msgpack (Debian's C extension) packb+unpackb"}]).

%% API.

%% W3b's term: a list of 10,000 small maps.
-spec term() -> [map()].
term() ->
    [#{<<"id">> => I, <<"name">> => <<"item">>, <<"score">> => 1.5} || I <- lists:seq(1, 10000)].

-spec rows(erpy_bench:ctx()) -> [erpy_bench:row()].
rows(#{pairs := Pairs, seconds := Seconds} = Ctx) ->
    T = term(),
    Bytes = term_to_binary(T, [{minor_version, 2}]),
    Size = byte_size(Bytes),
    Port = erpy_bench:python_port(Ctx, "bench_port.py"),
    <<"ok ", Loaded/binary>> = erpy_bench:request(Port, [<<"L">>, Bytes]),
    Names = binary:split(Loaded, <<" ">>, [global]),
    Py = [{Name, Label, py_run(Port, Code), own_size(Port, Code)}
          || {Code, Name, Label} <- ?PY_CODECS, lists:member(Name, Names)],
    Erl = {<<"erlang">>, "Erlang term_to_binary+binary_to_term", fun(K) -> erlang_run(T, K) end, Size},
    Codecs = [{Name, Label, Run, Own, calibrate(Run, Seconds)}
              || {Name, Label, Run, Own} <- Py ++ [Erl]],
    io:format("W5: ~b-byte term, ~b pairs, rounds per run: ~s~n",
              [Size, Pairs, lists:join(", ", [[Name, " ", integer_to_list(K)]
                                               || {Name, _, _, _, K} <- Codecs])]),
    %% Every codec once per pair, erpy first and marshal right after it.
    Runs = [[{Name, K, Run(K)} || {Name, _, Run, _, K} <- Codecs] || _ <- lists:seq(1, Pairs)],
    port_close(Port),
    MBs = fun(K, {Wall, _}) -> Size * K / Wall * 1000 end,          % bytes/ns * 1000 = MB/s
    CpuUs = fun(K, {_, Cpu}) -> Cpu / K / 1000 end,
    Series = fun(Name, F) -> [F(K, R) || Pair <- Runs, {N, K, R} <- Pair, N =:= Name] end,
    Ratios = fun(Name) -> [E / O || {E, O} <- lists:zip(Series(<<"erpy">>, MBs), Series(Name, MBs))] end,
    Figure = fun(Name) ->
                 fmt("~.1f MB/s, ~b us CPU/op", [erpy_bench:median(Series(Name, MBs)),
                                                 round(erpy_bench:median(Series(Name, CpuUs)))])
             end,
    Ratio = erpy_bench:median(Ratios(<<"marshal">>)),
    [MarshalSize] = [Own || {<<"marshal">>, _, _, Own, _} <- Codecs],
    Beside = [fmt("beside ~s: ~s (~b bytes of its own form), erpy/it ~.2fx (per-pair min ~.2f, max ~.2f)",
                  [Label, Figure(Name), Own, erpy_bench:median(Ratios(Name)),
                   lists:min(Ratios(Name)), lists:max(Ratios(Name))])
              || {Name, Label, _, Own, _} <- Codecs, Name =/= <<"erpy">>, Name =/= <<"marshal">>],
    Missing = [fmt("~s is not installed for this Python: not measured", [Label])
               || {_, Name, Label} <- ?PY_CODECS, not lists:member(Name, Names)],
    [#{id => <<"W5">>,
       workload => <<"ETF encode+decode of W3b's term (10,000 maps) inside Python">>,
       erpy => Figure(<<"erpy">>),
       reference => iolist_to_binary(["marshal.dumps+loads of the same objects: ",
                                      Figure(<<"marshal">>)]),
       ratio => Ratio,
       target => fmt(">= ~.1fx", [?TARGET]),
       pass => Ratio >= ?TARGET,
       notes => [fmt("term of ~b ETF bytes; ~b pairs, every codec once a pair; a round is "
                     "decode then encode of the objects (erpy.encode(erpy.decode(b)), "
                     "marshal.dumps(marshal.loads(b)), ..., binary_to_term(term_to_binary(T))), "
                     "each run about ~.1f s; MB/s = ETF bytes x rounds / wall time, for every "
                     "codec; CPU: Python process_time, Erlang VM runtime; ratio: median of the "
                     "per-pair ratios erpy/marshal, min ~.2f, max ~.2f; marshal's own form: ~b bytes",
                     [Size, Pairs, Seconds, lists:min(Ratios(<<"marshal">>)),
                      lists:max(Ratios(<<"marshal">>)), MarshalSize])
                 | Beside ++ Missing]} | instructions(Ctx, Bytes)].

%% Internal.

%% W5 in instructions (valgrind's callgrind): per map of the term, a round trip of erpy
%% beside one of marshal. Each codec runs K1 and K2 rounds in a fresh Python; the
%% difference of the two counts is K2 - K1 rounds without start-up and loading.
instructions(#{root := Root, python := Python}, Bytes) ->
    case os:find_executable("valgrind") of
        false ->
            [];
        Valgrind ->
            File = filename:join(Root, "_build/w5_term.etf"),
            ok = file:write_file(File, Bytes),
            Script = filename:join([Root, "bench", "py", "w5_count.py"]),
            {K1, K2} = {1, 3},
            Count = fun(Codec, K) ->
                            Cmd = io_lib:format("PYTHONPATH=~s ~s --tool=callgrind --callgrind-out-file=/dev/null "
                                                "~s ~s ~s ~b ~s 2>&1",
                                                [filename:join(Root, "python"), Valgrind, Python, Script,
                                                 Codec, K, File]),
                            Out = os:cmd(lists:flatten(Cmd)),
                            case re:run(Out, "Collected : ([0-9]+)", [{capture, all_but_first, list}]) of
                                {match, [N]} -> list_to_integer(N);
                                nomatch -> error({callgrind, Codec, Out})
                            end
                    end,
            Maps = length(term()),
            PerMap = fun(Codec) -> (Count(Codec, K2) - Count(Codec, K1)) / (K2 - K1) / Maps end,
            Erpy = PerMap("erpy"),
            Marshal = PerMap("marshal"),
            _ = file:delete(File),
            Ratio = Marshal / Erpy,
            [#{id => <<"W5 instr">>,
               workload => <<"W5 in instructions: a round trip (decode + encode) per map of W3b's term, callgrind">>,
               erpy => fmt("~b instructions/map", [round(Erpy)]),
               reference => fmt("marshal.dumps+loads of the same objects: ~b instructions/map", [round(Marshal)]),
               ratio => Ratio,
               target => fmt(">= ~.1fx", [?TARGET]),
               pass => Ratio >= ?TARGET,
               notes => [fmt("ratio = marshal's instructions / erpy's (higher is better for erpy), "
                             "as the W5 MB/s ratio; counts of ~b and ~b rounds in a fresh Python "
                             "each, differenced", [K2, K1])]}]
    end.

py_run(Port, Code) ->
    fun(K) ->
        <<Wall:64, Cpu:64>> = erpy_bench:request(Port, <<"R", Code, K:32>>),
        {Wall, Cpu}
    end.

own_size(Port, Code) ->
    binary_to_integer(erpy_bench:request(Port, <<"S", Code>>)).

calibrate(Run, Seconds) ->
    erpy_bench:calibrate(fun(K) -> element(1, Run(K)) end, Seconds).

%% K rounds of Erlang's own codec in a fresh process: {wall ns, CPU ns of the VM}.
erlang_run(T, K) ->
    {Pid, MRef} = spawn_monitor(
        fun() ->
            {R0, _} = erlang:statistics(runtime),
            W0 = erlang:monotonic_time(nanosecond),
            Check = loop(T, K, 0),
            W1 = erlang:monotonic_time(nanosecond),
            {R1, _} = erlang:statistics(runtime),
            exit({done, W1 - W0, (R1 - R0) * 1000000, Check})
        end),
    receive
        {'DOWN', MRef, process, Pid, {done, Wall, Cpu, _}} -> {Wall, Cpu};
        {'DOWN', MRef, process, Pid, Why} -> error({erlang_run, Why})
    end.

%% The sizes are summed so that no round can be optimised away.
loop(_, 0, Acc) ->
    Acc;
loop(T, K, Acc) ->
    B = term_to_binary(T, [{minor_version, 2}]),
    T2 = binary_to_term(B),
    loop(T, K - 1, Acc + byte_size(B) + length(T2)).

fmt(F, A) ->
    iolist_to_binary(io_lib:format(F, A)).
