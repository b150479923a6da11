#!/usr/bin/env escript
%%! -noshell
%% `make bench`: compiles the bench/*.erl modules and runs every workload
%% (erpy_bench:workloads/0), printing a table and rewriting bench/RESULTS.md.
%% Environment: ERPY_ROOT, ERPY_PYTHON (set by the Makefile), BENCH_PAIRS (default 15),
%% BENCH_SECONDS (time per measured run, default 0.3), BENCH_ONLY (comma-separated workload
%% modules: run just those and print their rows, without rewriting RESULTS.md).
-mode(compile).

main(Args) ->
    BenchDir = filename:dirname(filename:absname(escript:script_name())),
    [begin
         {ok, Mod, Beam} = compile:file(Src, [binary, report, warnings_as_errors]),
         {module, Mod} = code:load_binary(Mod, Src, Beam)
     end || Src <- filelib:wildcard(filename:join(BenchDir, "*.erl"))
                ++ [filename:join([BenchDir, "..", "test", M]) || M <- ["erpy_soak.erl", "erpy_test_env.erl"]]],
    erpy_bench:main(Args).
