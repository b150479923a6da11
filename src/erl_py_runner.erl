%% erl_py_runner's API on erpy: a drop-in for users of erl_py_runner (doc/dropin.md).
%%
%% `run/1,2` take the seed's request map (`code`, `arguments`) and give its answers
%% (`{ok, #{status := ok, result := R}}`, `{ok, #{status := error, error := E}}`,
%% `{error, timeout}`, `{error, Reason}`), on an erpy port pool named `erl_py_runner`.
%% The pool is the application `erl_py_runner`'s (priv/erl_py_runner.app, copied next
%% to erpy's own .app by the build), so listing `erl_py_runner` in an application's
%% `applications` starts it as it did; a call made before that starts it too.
%%
%% Its settings are the seed's, read from the `erl_py_runner` application env and
%% mapped onto erpy's pool options (options/0): `pool_size` -> `size`,
%% `modules_whitelist.erlang_modules` -> `allowed`, `environment.venv_dir` -> `venv`,
%% `environment.requirements` -> `requirements`, `environment.python` -> `python`,
%% `config.timeout` -> the timeout of run/1, `modules_whitelist.python_modules`: the
%% modules a snippet may import. Both of the seed's layouts are read (`environment`
%% inside `worker` or beside it), and the same keys flat.
-module(erl_py_runner).
-behaviour(application).
-behaviour(supervisor).

-export([run/1, run/2, options/0]).
-export([start/2, stop/1]).
-export([init/1]).

-define(POOL, erl_py_runner).
-define(APP, erl_py_runner).
%% The seed's defaults: three workers, and these Erlang modules callable from Python.
-define(DEFAULT_POOL_SIZE, 3).
-define(DEFAULT_ERLANG_MODULES, [math, lists, maps, binary, string]).
%% A snippet run with its imports limited (python_modules): see restricted/4.
-define(RESTRICTED_RUN,
        <<"from erpy._dropin import run_restricted\n"
          "result = run_restricted(arguments, erlang)\n">>).

-type request() :: #{code := iodata(), arguments => term()}.
-type answer() :: {ok, #{status := ok, result := term()}}
                | {ok, #{status := error, error := erpy:python_error()}}
                | {error, timeout}
                | {error, term()}.
-export_type([request/0, answer/0]).

%% API.

%% @doc Runs `code` with `arguments` in scope; `result` is the answer. No timeout, as
%% the seed documents, unless the env sets one (`worker.config.timeout`, or `timeout`).
-spec run(request()) -> answer().
run(Request) ->
    run(Request, default_timeout()).

-spec run(request(), timeout()) -> answer().
run(#{code := Code} = Request, Timeout) ->
    case ensure_pool() of
        ok ->
            Arguments = maps:get(arguments, Request, undefined),
            case python_modules() of
                all ->
                    erpy:run(#{code => Code, arguments => Arguments, pool => ?POOL}, Timeout);
                Modules ->
                    restricted(Code, Arguments, Modules, Timeout)
            end;
        {error, _} = Error ->
            Error
    end;
run(_Request, _Timeout) ->
    {error, {badarg, code}}.

%% @doc The erpy pool options the `erl_py_runner` env maps to (what the pool runs with).
-spec options() -> map().
options() ->
    Env = env(),
    Venv = setting(Env, venv_dir, [environment], undefined),
    Python = setting(Env, python, [environment], system),
    Base = #{mode => port,
             size => setting(Env, pool_size, [config], ?DEFAULT_POOL_SIZE),
             allowed => erlang_modules(setting(Env, erlang_modules, [modules_whitelist],
                                               ?DEFAULT_ERLANG_MODULES))},
    WithPython = case Python of
                     system -> Base;
                     environment -> Base;
                     Path -> Base#{python => Path}
                 end,
    %% A venv only when one is named (the seed's later default, `python => system`, has
    %% none); the seed's relative paths are relative to its priv dir, here erpy's.
    case Venv =/= undefined andalso Python =/= system of
        true ->
            Reqs = setting(Env, requirements, [environment], []),
            WithPython#{venv => priv_path(Venv),
                        requirements => case Reqs of
                                            [] -> [];
                                            [C | _] when is_integer(C) -> priv_path(Reqs);
                                            B when is_binary(B) -> priv_path(B);
                                            Lines -> Lines
                                        end};
        false ->
            WithPython
    end.

%% application.

-spec start(application:start_type(), term()) -> {ok, pid()} | {error, term()}.
start(_Type, _Args) ->
    case erpy_config:pool_opts(options()) of
        {ok, Opts} -> supervisor:start_link({local, erl_py_runner_sup}, ?MODULE, Opts);
        {error, Why} -> {error, {erl_py_runner_config, Why}}
    end.

-spec stop(term()) -> ok.
stop(_State) ->
    ok.

%% supervisor.

-spec init(map()) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init(Opts) ->
    {ok, {#{strategy => one_for_one, intensity => 5, period => 30},
          [#{id => pool,
             start => {erpy_pool_sup, start_link, [?POOL, Opts]},
             type => supervisor,
             shutdown => infinity}]}}.

%% Internal.

%% The pool is there, or started here: by the application when it can be loaded, else
%% under erpy's own supervisor (an application built without priv/erl_py_runner.app).
ensure_pool() ->
    case erpy_transport:lookup(?POOL) of
        {ok, _, _} ->
            ok;
        error ->
            case application:ensure_all_started(?APP) of
                {ok, _} -> ok;
                {error, {?APP, {"no such file or directory", _}}} -> start_under_erpy();
                {error, _} = Error -> Error
            end
    end.

start_under_erpy() ->
    case application:ensure_all_started(erpy) of
        {ok, _} ->
            case erpy:start_pool(?POOL, options()) of
                {ok, _} -> ok;
                {error, {already_started, _}} -> ok;
                {error, _} = Error -> Error
            end;
        {error, _} = Error ->
            Error
    end.

%% Imports limited to `Modules` (the seed's python_modules): erpy._dropin runs the code
%% with its builtins narrowed as the seed did. A convenience, not a security boundary:
%% what contains Python is the worker process and the pool's policy (doc/security.md).
restricted(Code, Arguments, Modules, Timeout) ->
    case unicode:characters_to_binary(Code) of
        Bin when is_binary(Bin) ->
            erpy:run(#{code => ?RESTRICTED_RUN, arguments => {Bin, Arguments, Modules},
                       pool => ?POOL}, Timeout);
        _ ->
            {error, {badarg, code}}
    end.

default_timeout() ->
    setting(env(), timeout, [config], infinity).

python_modules() ->
    case setting(env(), python_modules, [modules_whitelist], all) of
        all -> all;
        Modules when is_list(Modules) -> [unicode:characters_to_binary(to_chars(M)) || M <- Modules]
    end.

%% `all` is not an allow-list erpy has: Python gets the seed's default modules instead.
erlang_modules(all) ->
    logger:warning("erl_py_runner: erlang_modules => all is not supported (erpy allows only "
                   "what is listed); allowing ~p", [?DEFAULT_ERLANG_MODULES], #{domain => [erpy]}),
    ?DEFAULT_ERLANG_MODULES;
erlang_modules(Modules) when is_list(Modules) ->
    Modules.

env() ->
    maps:from_list(application:get_all_env(?APP)).

%% A setting: flat in the env (`Key`, or the seed's `allowed_modules` for
%% python_modules), else in the `worker` group's sub-map `Group`, else (`environment`)
%% in the top-level group of that name.
setting(Env, Key, [Group], Default) ->
    Flat = case {Key, Env} of
               {_, #{Key := V}} -> {ok, V};
               {python_modules, #{allowed_modules := V}} -> {ok, V};
               _ -> error
           end,
    case Flat of
        {ok, Value} ->
            Value;
        error ->
            Worker = map_env(maps:get(worker, Env, #{})),
            Nested = maps:merge(map_env(maps:get(Group, Env, #{})),
                                map_env(maps:get(Group, Worker, #{}))),
            maps:get(Key, Nested, Default)
    end.

map_env(M) when is_map(M) -> M;
map_env(L) when is_list(L) -> maps:from_list([KV || {_, _} = KV <- L]);
map_env(_) -> #{}.

priv_path(Path) ->
    P = to_chars(Path),
    case filename:pathtype(P) of
        relative -> filename:join(code:priv_dir(erpy), P);
        _ -> P
    end.

to_chars(A) when is_atom(A) -> atom_to_list(A);
to_chars(B) when is_binary(B) -> unicode:characters_to_list(B);
to_chars(L) when is_list(L) -> L.
