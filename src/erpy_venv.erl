%% Virtual environments for pools: created when missing, requirements installed with pip
%% and skipped when unchanged (a stamp in the venv remembers what was installed).
%% Offline installs work with pip's own options in the requirements, e.g.
%% ["--no-index", "--find-links", "/path/to/wheels", "mypkg"].
-module(erpy_venv).

-export([ensure/3]).

-define(STAMP, ".erpy-requirements").

%% API.

%% Returns the venv's interpreter.
-spec ensure(file:filename(), file:filename(), [iodata()] | file:filename()) ->
    {ok, file:filename()} | {error, term()}.
ensure(Venv, BasePython, Requirements) ->
    Python = filename:join([Venv, "bin", "python"]),
    maybe_create(Venv, Python, BasePython),
    case filelib:is_regular(Python) of
        false -> {error, {venv_failed, Venv}};
        true -> install(Venv, Python, requirement_args(Requirements))
    end.

%% Internal.

maybe_create(Venv, Python, BasePython) ->
    case filelib:is_regular(Python) of
        true -> ok;
        false ->
            Out = run(BasePython, ["-m", "venv", Venv]),
            logger:notice("erpy: created venv ~ts~n~ts", [Venv, Out], #{domain => [erpy]})
    end.

install(_Venv, Python, []) ->
    {ok, Python};
install(Venv, Python, Args) ->
    Stamp = filename:join(Venv, ?STAMP),
    Want = term_to_binary(Args),
    case file:read_file(Stamp) of
        {ok, Want} ->
            {ok, Python};
        _ ->
            {Status, Out} = run_status(Python, ["-m", "pip", "install", "--disable-pip-version-check",
                                                "-q" | Args]),
            case Status of
                0 ->
                    ok = file:write_file(Stamp, Want),
                    {ok, Python};
                _ ->
                    {error, {pip_failed, Status, unicode:characters_to_binary(Out)}}
            end
    end.

%% A list of requirement lines, or the path of a requirements.txt.
requirement_args([]) -> [];
requirement_args(Path) when is_list(Path), is_integer(hd(Path)) -> ["-r", Path];
requirement_args(Path) when is_binary(Path) -> ["-r", binary_to_list(Path)];
requirement_args(Lines) when is_list(Lines) -> [unicode:characters_to_list(L) || L <- Lines].

run(Exe, Args) ->
    {_, Out} = run_status(Exe, Args),
    Out.

run_status(Exe, Args) ->
    Port = open_port({spawn_executable, Exe},
                     [{args, Args}, exit_status, stderr_to_stdout, binary, use_stdio]),
    collect(Port, []).

collect(Port, Acc) ->
    receive
        {Port, {data, D}} -> collect(Port, [Acc, D]);
        {Port, {exit_status, S}} -> {S, iolist_to_binary(Acc)}
    end.
