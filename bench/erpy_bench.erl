%% The benchmark driver: runs every workload module, prints a markdown table and
%% rewrites bench/RESULTS.md from all of them.
%%
%% A workload module exports `rows(Ctx) -> [row()]`; add it to workloads/0. Each row is
%% one figure of erpy beside a reference measured in the same run (alternate
%% A B A B, quote the median of the per-pair ratios). Helpers for that live here:
%% alternate/3, median/1, python_port/2, request/2, and loaded/2 for the same figures
%% measured with one core held by a busy loop.
%%
%% Every W1-W4 figure is measured twice, quiet and loaded: loaded/2 starts a busy loop
%% (an OS process that spins on one core) and runs the measurement beside it, erpy and
%% its reference alike, then stops the loop. The loop is a Python process that ends when
%% its stdin closes, that is when the port closes: when loaded/2 returns or throws, when
%% the bench process dies, and when the VM dies (also by SIGKILL); it is also started
%% with setpriv --pdeathsig KILL where setpriv exists.
%%
%% The run also draws one picture per mode, bench/<mode>.svg (latency and throughput,
%% erpy beside its reference, quiet and loaded), written here as plain SVG, which
%% README.md shows next to the table.
-module(erpy_bench).

-export([main/1, workloads/0]).
-export([alternate/3, median/1, python_port/2, request/2, calibrate/2]).
-export([loaded/2, busy_loop/1, stop_busy_loop/1, svg/2]).

-type ctx() :: #{root := file:filename(), python := file:filename(), pairs := pos_integer(),
                 seconds := float()}.
-type row() :: #{id := binary(), workload := binary(), erpy := binary(),
                 reference := binary(), ratio := float(), target := binary(),
                 pass := boolean(), notes => [binary()]}.
-export_type([ctx/0, row/0]).

%% API.

-spec workloads() -> [module()].
workloads() ->
    [erpy_bench_w5, erpy_bench_port, erpy_bench_embedded, erpy_bench_node, erpy_bench_async,
     erpy_bench_reactor, erpy_bench_function, erpy_bench_soak, erpy_bench_netns].

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
            Pictures = pictures(Root, Rows),
            readme_table(filename:join(Root, "README.md"), Table, Facts, Pictures);
        Only ->
            %% A partial run (BENCH_ONLY=erpy_bench_embedded,...) prints its rows only.
            Mods = [list_to_atom(M) || M <- string:lexemes(Only, ", ")],
            Rows = lists:append([Mod:rows(Ctx) || Mod <- Mods]),
            io:put_chars(["\n", table(Rows), "\n"]),
            %% BENCH_SVG_DIR=Dir: also draw the pictures there (bench/ is left alone).
            case os:getenv("BENCH_SVG_DIR") of
                false -> ok;
                Dir -> pictures_in(Dir, Rows)
            end
    end.

%% Runs `Measure()` with one core held by a busy loop (see the module doc): its rows come
%% back as the loaded variants (id `W1 loaded`, workload "..., one core busy"), erpy and
%% the reference both measured under that load.
-spec loaded(ctx(), fun(() -> [row()])) -> [row()].
loaded(Ctx, Measure) ->
    Busy = busy_loop(Ctx),
    try
        [R#{id := <<Id/binary, " loaded">>,
            workload := <<W/binary, ", one core busy">>,
            notes => maps:get(notes, R, []) ++
                [<<"one core held by a busy loop that the bench started; the reference "
                   "was measured under the same load">>]}
         || #{id := Id, workload := W} = R <- Measure()]
    after
        stop_busy_loop(Busy)
    end.

%% An OS process that keeps one core busy until its port closes.
-spec busy_loop(ctx()) -> port().
busy_loop(#{python := Python}) ->
    Loop = "import os, threading\n"
           "threading.Thread(target=lambda: (os.read(0, 1), os._exit(0)), daemon=True).start()\n"
           "while True: pass\n",
    {Exe, Args} = case os:find_executable("setpriv") of
                      false -> {Python, ["-c", Loop]};
                      Setpriv -> {Setpriv, ["--pdeathsig", "KILL", "--", Python, "-c", Loop]}
                  end,
    Port = open_port({spawn_executable, Exe}, [{args, Args}, binary, use_stdio, exit_status]),
    timer:sleep(200),                                     % up and spinning
    Port.

-spec stop_busy_loop(port()) -> ok.
stop_busy_loop(Port) ->
    OsPid = case erlang:port_info(Port, os_pid) of
                {os_pid, P} -> P;
                undefined -> undefined
            end,
    catch port_close(Port),
    %% Closing stdin ends it; a kill makes sure, should its reader thread be starved.
    _ = [os:cmd("kill -9 " ++ integer_to_list(OsPid) ++ " 2>/dev/null") || is_integer(OsPid)],
    ok.

%% README.md carries the same table and the pictures between two markers, rewritten with
%% every run so it never drifts from bench/RESULTS.md.
readme_table(File, Table, Facts, Pictures) ->
    {ok, Readme} = file:read_file(File),
    case re:run(Readme, "(?s)^(.*<!-- bench:begin -->\n)(.*)(<!-- bench:end -->.*)$",
                [{capture, [1, 3], binary}]) of
        {match, [Before, After]} ->
            {_, Date} = lists:keyfind("date", 1, Facts),
            Images = [io_lib:format("![~s](~s)~n", [Alt, Path]) || {Alt, Path} <- Pictures],
            Body = [io_lib:format("Measured ~s on this project's 2-core machine (details and the "
                                  "machine in bench/RESULTS.md):~n~n", [Date]),
                    Images, [$\n || Images =/= []], Table],
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

%% ---- pictures --------------------------------------------------------------------------

%% bench/<mode>.svg for every mode with charted rows: [{Alt, README-relative path}].
pictures(Root, Rows) ->
    [{Alt, "bench/" ++ File} || {Alt, File} <- pictures_in(filename:join(Root, "bench"), Rows)].

pictures_in(Dir, Rows) ->
    lists:append(
      [begin
           File = Mode ++ ".svg",
           ok = file:write_file(filename:join(Dir, File), svg(list_to_binary(Mode), Rows)),
           [{Mode ++ " mode: latency and throughput, quiet and with one core busy", File}]
       end || Mode <- ["port", "embedded", "node"], charted(list_to_binary(Mode), Rows) =/= []]).

%% The rows of `Mode` a picture shows: W1-W4 latencies (us) and W2 rates (calls/s), each
%% with its reference, read back from the rows' own text.
charted(Mode, Rows) ->
    Prefix = <<Mode/binary, ":">>,
    [C || #{workload := W} = R <- Rows, binary:match(W, Prefix) =:= {0, byte_size(Prefix)},
          C <- [chart_point(R)], C =/= none].

chart_point(#{id := Id, erpy := E, reference := Ref}) ->
    Label = hd(binary:split(Ref, <<":">>)),
    Lat = fun(T) -> num(T, "median ([0-9.]+) us") end,
    Rate = fun(T) -> num(T, "([0-9]+) (?:calls|echoes)/s") end,
    case {Lat(E), Lat(Ref), Rate(E), Rate(Ref)} of
        {X, Y, _, _} when X =/= none, Y =/= none -> {latency, Id, X, Y, Label};
        {_, _, X, Y} when X =/= none, Y =/= none -> {throughput, Id, X, Y, Label};
        _ -> none
    end.

num(Text, Re) ->
    case re:run(Text, Re, [{capture, [1], list}]) of
        {match, [N]} -> case string:to_float(N) of
                            {F, []} -> F;
                            _ -> float(list_to_integer(N))
                        end;
        nomatch -> none
    end.

%% One SVG: a panel per kind (latency, throughput), a pair of bars per row (erpy in
%% colour, its reference in grey), values written at the bars' ends.
-spec svg(binary(), [row()]) -> binary().
svg(Mode, Rows) ->
    Points = charted(Mode, Rows),
    Panels = [{K, Title, [P || {K2, _, _, _, _} = P <- Points, K2 =:= K]}
              || {K, Title} <- [{latency, "latency, µs per call (lower is better)"},
                                {throughput, "throughput, calls/s (higher is better)"}]],
    Width = 1000, BarH = 14, LabelW = 90, ValueW = 330,
    {Body, Height} = lists:foldl(
        fun({_, _, []}, Acc) -> Acc;
           ({_Kind, Title, Ps}, {Out, Y0}) ->
                Max = lists:max([max(E, R) || {_, _, E, R, _} <- Ps]),
                Scale = (Width - LabelW - ValueW - 20) / max(Max, 1.0e-9),
                Head = text(10, Y0 + 18, 14, "bold", Title),
                {Groups, Y1} = lists:foldl(
                    fun({_, Id, E, R, RefLabel}, {G, Y}) ->
                            Bar = fun(V, Yb, Colour, Name) ->
                                          W = max(1, round(V * Scale)),
                                          [io_lib:format("<rect x=\"~b\" y=\"~b\" width=\"~b\" height=\"~b\" fill=\"~s\"/>~n",
                                                         [LabelW, Yb, W, BarH, Colour]),
                                           text(LabelW + W + 4, Yb + BarH - 3, 11, "normal",
                                                io_lib:format("~s ~s", [value(V), Name]))]
                                  end,
                            {[G, text(10, Y + BarH, 12, "normal", Id),
                              Bar(E, Y + 2, "#d9534f", "erpy"),
                              Bar(R, Y + 2 + BarH + 2, "#9e9e9e", RefLabel)],
                             Y + 2 * BarH + 14}
                    end, {[], Y0 + 28}, Ps),
                {[Out, Head, Groups], Y1 + 10}
        end, {[], 30}, Panels),
    unicode:characters_to_binary(
    [io_lib:format("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"~b\" height=\"~b\" "
                   "font-family=\"sans-serif\">~n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>~n",
                   [Width, Height]),
     text(10, 20, 16, "bold", ["erpy ", Mode, " mode (make bench; loaded: one core held by a busy loop)"]),
     Body, "</svg>\n"]).

text(X, Y, Size, Weight, Text) ->
    io_lib:format("<text x=\"~b\" y=\"~b\" font-size=\"~b\" font-weight=\"~s\">~ts</text>~n",
                  [X, Y, Size, Weight, esc(Text)]).

value(V) when V >= 1000 -> io_lib:format("~b", [round(V)]);
value(V) -> io_lib:format("~.1f", [V]).

esc(T) ->
    B = unicode:characters_to_binary(T),
    lists:foldl(fun({C, R}, Acc) -> binary:replace(Acc, C, R, [global]) end, B,
                [{<<"&">>, <<"&amp;">>}, {<<"<">>, <<"&lt;">>}, {<<">">>, <<"&gt;">>}]).
