%% The allow-list: what Python may call in Erlang. `[lists, {erlang, abs},
%% {my_mod, f, 1}]` allows a whole module, a function of any arity, or one arity.
%% Nothing is allowed unless listed. Names from Python are matched without creating atoms.
-module(erpy_allow).

-export([compile/1, resolve/4]).
-export_type([rules/0]).

-opaque rules() :: #{module() => all | #{atom() => all | [arity()]}}.

%% API.

-spec compile([module() | {module(), atom()} | {module(), atom(), arity()}]) -> rules().
compile(Entries) when is_list(Entries) ->
    lists:foldl(fun add/2, #{}, Entries);
compile(Other) ->
    %% `all` and the like: there is no "everything" (doc/security.md).
    error({badarg, {allowed, Other}}).

%% `env`: the rules of the application env `allowed` as they are now (a pool without its
%% own allow-list follows it, also when it changes; a malformed env allows nothing).
-spec resolve(rules() | env, atom() | binary(), atom() | binary(), arity()) ->
    {ok, module(), atom()} | {error, {not_allowed, {term(), term(), arity()}}}.
resolve(env, M, F, Arity) ->
    Rules = try compile(application:get_env(erpy, allowed, []))
            catch error:_ -> compile([])
            end,
    resolve(Rules, M, F, Arity);
resolve(Rules, M, F, Arity) ->
    case {existing_atom(M), existing_atom(F)} of
        {{ok, Mod}, {ok, Fun}} ->
            case allowed(Rules, Mod, Fun, Arity) of
                true -> {ok, Mod, Fun};
                false -> {error, {not_allowed, {Mod, Fun, Arity}}}
            end;
        _ ->
            {error, {not_allowed, {M, F, Arity}}}
    end.

%% Internal.

add(Mod, Rules) when is_atom(Mod) ->
    Rules#{Mod => all};
add({Mod, Fun}, Rules) when is_atom(Mod), is_atom(Fun) ->
    add_fun(Mod, Fun, all, Rules);
add({Mod, Fun, Arity}, Rules) when is_atom(Mod), is_atom(Fun), is_integer(Arity), Arity >= 0 ->
    add_fun(Mod, Fun, [Arity], Rules);
add(Other, _Rules) ->
    error({badarg, {allowed, Other}}).

add_fun(Mod, Fun, Arities, Rules) ->
    case maps:get(Mod, Rules, #{}) of
        all -> Rules;
        Funs ->
            New = case {maps:get(Fun, Funs, []), Arities} of
                      {all, _} -> all;
                      {_, all} -> all;
                      {Old, _} -> lists:usort(Old ++ Arities)
                  end,
            Rules#{Mod => Funs#{Fun => New}}
    end.

allowed(Rules, Mod, Fun, Arity) ->
    case maps:get(Mod, Rules, none) of
        all -> true;
        none -> false;
        Funs ->
            case maps:get(Fun, Funs, none) of
                all -> true;
                none -> false;
                Arities -> lists:member(Arity, Arities)
            end
    end.

existing_atom(A) when is_atom(A) -> {ok, A};
existing_atom(B) when is_binary(B) ->
    try {ok, binary_to_existing_atom(B, utf8)} catch error:badarg -> error end;
existing_atom(_) -> error.
