%% The benchmark driver: runs every workload module, prints a markdown table and
%% rewrites bench/RESULTS.md from all of them.
%%
%% A workload module exports `rows(Ctx) -> [row()]`; add it to workloads/0. Each row is
%% one figure of erpy beside a reference measured in the same run (alternate
%% A B A B, quote the median of the per-pair ratios). Helpers for that live here:
%% alternate/3, median/1, python_port/2, request/2.
-module(erpy_bench).

-export([main/1, workloads/0]).
-export([alternate/3, median/1, python_port/2, request/2, calibrate/2]).

-type ctx() :: #{root := file:filename(), python := file:filename(), pairs := pos_integer(),
                 seconds := float()}.
-type row() :: #{id := binary(), workload := binary(), erpy := binary(),
                 reference := binary(), ratio := float(), target := binary(),
                 pass := boolean(), notes => [binary()]}.
-export_type([ctx/0, row/0]).

%% API.

-spec workloads() -> [module()].
workloads() ->
    [erpy_bench_w5, erpy_bench_port, erpy_bench_embedded, erpy_bench_node, erpy_bench_soak].

-spec main([string()]) -> ok.
main(_Args) ->
    Root = os:getenv("ERPY_ROOT", filename:absname(".")),
    Ctx = #{root => Root,
            python => os:getenv("ERPY_PYTHON", "/usr/bin/python3"),
            pairs => list_to_integer(os:getenv("BENCH_PAIRS", "15")),
            seconds => list_to_float(os:getenv("BENCH_SECONDS", "0.3"))},
    case os:getenv("BENCH_ONLY") of
        false ->
            Rows = lists:append([Mod:rows(Ctx) || Mod <- workloads()]),
            Table = table(Rows),
            io:put_chars(["\n", Table, "\n"]),
            Facts = machine_facts(Ctx),
            Out = filename:join([Root, "bench", "RESULTS.md"]),
            ok = file:write_file(Out, results_md(Rows, Table, Facts)),
            io:format("wrote ~s~n", [Out]),
            readme_table(filename:join(Root, "README.md"), Table, Facts);
        Only ->
            %% A partial run (BENCH_ONLY=erpy_bench_embedded,...) prints its rows only.
            Mods = [list_to_atom(M) || M <- string:lexemes(Only, ", ")],
            io:put_chars(["\n", table(lists:append([Mod:rows(Ctx) || Mod <- Mods])), "\n"])
    end.

%% README.md carries the same table between two markers, rewritten with every run so it
%% never drifts from bench/RESULTS.md.
readme_table(File, Table, Facts) ->
    {ok, Readme} = file:read_file(File),
    case re:run(Readme, "(?s)^(.*<!-- bench:begin -->\n)(.*)(<!-- bench:end -->.*)$",
                [{capture, [1, 3], binary}]) of
        {match, [Before, After]} ->
            {_, Date} = lists:keyfind("date", 1, Facts),
            Body = [io_lib:format("Measured ~s on this project's 2-core machine (details and the "
                                  "machine in bench/RESULTS.md):~n~n", [Date]), Table],
            ok = file:write_file(File, [Before, Body, After]),
            io:format("updated the table in ~s~n", [File]);
        nomatch ->
            io:format("~s has no bench markers; table not copied~n", [File])
    end.

%% Runs `A()` and `B()` alternately `Pairs` times (A B A B ...). Each returns a
%% measurement; the two lists come back in run order.
-spec alternate(pos_integer(), fun(() -> T), fun(() -> U)) -> {[T], [U]}.
alternate(Pairs, A, B) ->
    lists:unzip([{A(), B()} || _ <- lists:seq(1, Pairs)]).

-spec median([number()]) -> number().
median(Xs) ->
    S = lists:sort(Xs),
    N = length(S),
    case N rem 2 of
        1 -> lists:nth(N div 2 + 1, S);
        0 -> (lists:nth(N div 2, S) + lists:nth(N div 2 + 1, S)) / 2
    end.

%% A Python helper script under bench/py, spoken to with {packet, 4} frames.
-spec python_port(ctx(), string()) -> port().
python_port(#{root := Root, python := Python}, Script) ->
    PyPath = filename:join(Root, "python") ++
        case os:getenv("PYTHONPATH") of false -> ""; "" -> ""; P -> ":" ++ P end,
    open_port({spawn_executable, Python},
              [{args, [filename:join([Root, "bench", "py", Script])]}, {packet, 4}, binary,
               exit_status, use_stdio, {env, [{"PYTHONPATH", PyPath}]}]).

-spec request(port(), iodata()) -> binary().
request(Port, Frame) ->
    true = port_command(Port, Frame),
    receive
        {Port, {data, Reply}} -> Reply;
        {Port, {exit_status, S}} -> error({python_exited, S})
    after 120000 -> error(python_timeout)
    end.

%% The iteration count for which `Run(K)` (returning wall ns) takes about `Seconds`.
-spec calibrate(fun((pos_integer()) -> non_neg_integer()), float()) -> pos_integer().
calibrate(Run, Seconds) ->
    calibrate(Run, Seconds, 1).

calibrate(Run, Seconds, K) ->
    Ns = Run(K),
    if
        Ns >= 50000000; K >= 1 bsl 24 -> max(1, round(K * Seconds * 1.0e9 / max(Ns, 1)));
        true -> calibrate(Run, Seconds, K * 4)
    end.

%% Internal.

table(Rows) ->
    Header = ["| id | workload | erpy | reference (same run) | ratio (median of pairs) "
              "| target | result |\n|---|---|---|---|---|---|---|\n"],
    [Header | [io_lib:format("| ~s | ~s | ~s | ~s | ~.2fx | ~s | ~s |~n",
                             [Id, W, E, R, Ratio, T, case P of true -> "pass"; false -> "FAIL" end])
               || #{id := Id, workload := W, erpy := E, reference := R, ratio := Ratio,
                    target := T, pass := P} <- Rows]].

results_md(Rows, Table, Facts) ->
    Notes = [[io_lib:format("- **~s**: ~s~n", [Id, N]) || N <- maps:get(notes, Row, [])]
             || #{id := Id} = Row <- Rows],
    ["# erpy benchmark results\n\n",
     "Written by `make bench` (bench/run_bench.escript); do not edit by hand. Each erpy figure\n"
     "is measured alternately with its reference in the same run (A B A B ...); the ratio is\n"
     "the median of the per-pair ratios (bench/erpy_bench.erl). MB = 10^6 bytes.\n\n",
     Table, "\n## Details\n\n", Notes,
     "\n## Machine\n\n", [io_lib:format("- ~s: ~s~n", [K, V]) || {K, V} <- Facts]].

machine_facts(Ctx) ->
    Port = python_port(Ctx, "bench_port.py"),
    PyVersion = request(Port, <<"V">>),
    port_close(Port),
    {{Y, Mo, D}, {H, Mi, _}} = calendar:universal_time(),
    [{"date", io_lib:format("~4..0b-~2..0b-~2..0b ~2..0b:~2..0b UTC", [Y, Mo, D, H, Mi])},
     {"nproc", integer_to_list(erlang:system_info(logical_processors_available))},
     {"cpu", cpu_model()},
     {"Erlang/OTP", [erlang:system_info(otp_release), " (erts ",
                     erlang:system_info(version), ")"]},
     {"python", PyVersion},
     {"os", os_name()}].

cpu_model() ->
    case file:read_file("/proc/cpuinfo") of
        {ok, Info} ->
            case re:run(Info, "model name\\s*:\\s*(.*)", [{capture, [1], binary}]) of
                {match, [Model]} -> Model;
                nomatch -> "unknown"
            end;
        _ -> "unknown"
    end.

os_name() ->
    case file:read_file("/etc/os-release") of
        {ok, Rel} ->
            case re:run(Rel, "PRETTY_NAME=\"?([^\"\\n]*)", [{capture, [1], binary}]) of
                {match, [Name]} -> Name;
                nomatch -> "unknown"
            end;
        _ -> "unknown"
    end.
