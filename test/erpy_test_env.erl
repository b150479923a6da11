%% What the Common Test suites and the soak bench share to get erpy going: the
%% application started (with the interpreter file `make` writes, in case this checkout
%% has not been built by `make`), and a wait until a pool answers.
-module(erpy_test_env).

-export([start_erpy/0, wait_serves/2]).

-spec start_erpy() -> ok.
start_erpy() ->
    _ = application:load(erpy),  % another suite of this run may have loaded it
    Root = filename:dirname(code:priv_dir(erpy)),
    File = filename:join([Root, "priv", "python.path"]),
    case filelib:is_regular(File) of
        true -> ok;
        false -> ok = file:write_file(File, "/usr/bin/python3\n")
    end,
    {ok, _} = application:ensure_all_started(erpy),
    ok.

%% Polls `Pool` with a trivial eval, at most `Tries` times 100 ms apart.
-spec wait_serves(atom(), non_neg_integer()) -> ok | {error, not_serving}.
wait_serves(_Pool, 0) ->
    {error, not_serving};
wait_serves(Pool, Tries) ->
    case erpy:eval(<<"1">>, #{}, #{pool => Pool, timeout => 2000}) of
        {ok, 1} -> ok;
        _ -> timer:sleep(100), wait_serves(Pool, Tries - 1)
    end.
