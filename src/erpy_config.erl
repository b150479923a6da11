%% Pool options: what the caller gave, else the application env, else erpy's defaults.
%% Also where the Python side of erpy lives and which interpreter it was built for.
-module(erpy_config).

-export([pool_opts/1, default_pools/0, python_dir/0, built_python/0]).
-export([check_rlimits/1, no_rlimits/1]).

-define(MODES, [port, embedded, node, program]).
-define(RLIMITS, [as, cpu, nofile, nproc, fsize, core]).

%% API.

%% Completes and checks the options of a pool; the venv is made ready here too, since
%% no worker can start without it.
-spec pool_opts(map()) -> {ok, map()} | {error, term()}.
pool_opts(Opts) when is_map(Opts) ->
    Env = fun(Key, Default) -> maps:get(Key, Opts, application:get_env(erpy, Key, Default)) end,
    %% A pool running the user's own program (erpy_port_program) needs no `mode`.
    Mode = maps:get(mode, Opts, case Opts of #{program := _} -> program; _ -> port end),
    Size = maps:get(size, Opts, max(2, erlang:system_info(schedulers_online))),
    Full = Opts#{mode => Mode,
                 size => Size,
                 python => Env(python, undefined),
                 venv => Env(venv, undefined),
                 requirements => Env(requirements, []),
                 max_message_size => Env(max_message_size, 10485760),
                 timeout => Env(timeout, 5000),
                 none => Env(none, undefined),
                 new_atoms => Env(new_atoms, 0),
                 send_allowed => Env(send_allowed, [])},
    try
        check(lists:member(Mode, ?MODES), {unsupported_mode, Mode}),
        check(is_integer(Size) andalso Size > 0, {badarg, size}),
        check(pipeline(maps:get(pipeline, Opts, auto)), {badarg, pipeline}),
        check(is_integer(maps:get(max_message_size, Full)), {badarg, max_message_size}),
        check(is_atom(maps:get(none, Full)), {badarg, none}),
        check(erpy_reactor:valid_factory(maps:get(reactor, Opts, undefined)), {badarg, reactor}),
        %% A pool without its own `allowed` follows the application env, also when it
        %% changes later (erpy_port_worker reads it at each callback).
        _ = erpy_allow:compile(Env(allowed, [])),
        ok = check_policy(maps:get(send_allowed, Full), maps:get(new_atoms, Full)),
        {ok, Python} = interpreter(Full),
        %% What only the mode knows (erpy_transport:prepare/1).
        (erpy_transport:module(Mode)):prepare(Full#{python => Python,
                                                    pythonpath => pythonpath(Full)})
    catch
        throw:{bad, Why} -> {error, Why};
        error:{badarg, _} = Why -> {error, Why};
        error:{badmatch, {error, Why}} -> {error, Why}
    end.

%% The pools the application starts: `pools` from the env, and a `default` port pool
%% unless that names one.
-spec default_pools() -> [{atom(), map()}].
default_pools() ->
    Pools = application:get_env(erpy, pools, []),
    case lists:keymember(default, 1, Pools) of
        true -> Pools;
        false -> [{default, #{mode => port}} | Pools]
    end.

%% The folder holding the Python package `erpy`.
-spec python_dir() -> file:filename().
python_dir() ->
    filename:join(code:priv_dir(erpy), "python").

%% The interpreter the extension module was built for (recorded by the build).
-spec built_python() -> string().
built_python() ->
    File = filename:join(code:priv_dir(erpy), "python.path"),
    case file:read_file(File) of
        {ok, Bin} -> string:trim(binary_to_list(Bin));
        {error, _} -> "/usr/bin/python3"
    end.

%% Internal.

%% rlimits => #{as | cpu | nofile | nproc | fsize | core => non_neg_integer() | infinity}:
%% each port worker sets them on itself (c_src/worker/process.hpp).
-spec check_rlimits(map()) -> ok | {error, {badarg, {rlimits, term()}}}.
check_rlimits(#{rlimits := Limits}) when not is_map(Limits) ->
    {error, {badarg, {rlimits, Limits}}};
check_rlimits(#{rlimits := Limits}) ->
    Good = fun(K, V) ->
                   lists:member(K, ?RLIMITS) andalso
                       (V =:= infinity orelse (is_integer(V) andalso V >= 0 andalso V < 1 bsl 63))
           end,
    case [KV || {K, V} = KV <- lists:sort(maps:to_list(Limits)), not Good(K, V)] of
        [] -> ok;
        [Bad | _] -> {error, {badarg, {rlimits, Bad}}}
    end;
check_rlimits(_Opts) ->
    ok.

%% Modes that run Python in the VM or in a shared node cannot apply rlimits.
-spec no_rlimits(map()) -> ok | {error, {badarg, {rlimits, term()}}}.
no_rlimits(#{rlimits := Limits, mode := Mode}) when is_map(Limits), map_size(Limits) > 0 ->
    {error, {badarg, {rlimits, {mode, Mode}}}};
no_rlimits(#{rlimits := Limits}) when not is_map(Limits) ->
    {error, {badarg, {rlimits, Limits}}};
no_rlimits(_Opts) ->
    ok.

%% `send_allowed`: registered names, {Name, Node} and pids Python may send to besides the
%% caller and the pids of its request; `new_atoms`: how many atoms Python may create.
check_policy(Send, NewAtoms) ->
    check(is_list(Send) andalso lists:all(fun send_target/1, Send), {badarg, {send_allowed, Send}}),
    check(is_integer(NewAtoms) andalso NewAtoms >= 0, {badarg, {new_atoms, NewAtoms}}).

send_target(Name) when is_atom(Name) -> true;
send_target({Name, Node}) when is_atom(Name), is_atom(Node) -> true;
send_target(Pid) when is_pid(Pid) -> true;
send_target(_) -> false.

%% `pipeline`: auto (adaptive, the default), or how many requests a port worker may be
%% written at once (1: no pipelining).
pipeline(auto) -> true;
pipeline(N) -> is_integer(N) andalso N > 0.

check(true, _Why) -> ok;
check(false, Why) -> throw({bad, Why}).

interpreter(#{venv := Venv} = Opts) when Venv =/= undefined ->
    Base = case maps:get(python, Opts) of
               undefined -> built_python();
               P -> to_list(P)
           end,
    erpy_venv:ensure(to_list(Venv), Base, maps:get(requirements, Opts));
interpreter(#{python := undefined}) ->
    {ok, built_python()};
interpreter(#{python := Python}) ->
    Path = to_list(Python),
    case os:find_executable(Path) of
        false -> {error, {python_not_found, Path}};
        Found -> {ok, Found}
    end.

pythonpath(Opts) ->
    Extra = [to_list(P) || P <- maps:get(pythonpath, Opts, [])],
    Inherited = case os:getenv("PYTHONPATH") of
                    false -> [];
                    "" -> [];
                    P -> [P]
                end,
    lists:join(":", [python_dir() | Extra ++ Inherited]).

to_list(B) when is_binary(B) -> binary_to_list(B);
to_list(A) when is_atom(A) -> atom_to_list(A);
to_list(L) when is_list(L) -> L.
