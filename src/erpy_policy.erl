%% The pool's policy: what Python code run by a pool may do to the VM, checked in one
%% place for every mode. Python is untrusted by default; it gets exactly this:
%%
%% - calls (`erlang.call/apply`): what the allow-list permits (erpy_allow), also when the
%%   call is an apply/spawn/rpc form that names another function (checked as that one);
%% - messages (`erlang.send`): the calling process, pids and references Erlang handed to
%%   Python in this request (its arguments, and the results of its callbacks so far), and
%%   what the pool's `send_allowed` lists (registered names, `{Name, Node}`, pids);
%% - pids and references in callback arguments: the same set as messages may reach;
%% - funs (in results, callback arguments and messages): a fun Erlang itself handed to
%%   Python in this request, or an external `fun M:F/A` that the allow-list permits;
%% - atoms: none that do not exist yet, unless the pool's `new_atoms` budget allows (and
%%   never when the VM's atom table is within 5% of its limit);
%% - sizes: `max_message_size` on every term that comes in; a compressed term is refused
%%   if it claims to inflate beyond it.
%%
%% A term from Python that Erlang cannot decode is an error value, never an exception.
%% Every refusal is `{error, Reason}`; a callback's refusal is raised in Python as
%% `erlang.ErlangError(Reason)`.
-module(erpy_policy).

-export([new/2, request_ctx/3, done/1, finish/1, decode/2, check_result/2,
         callback/7, run_callback/7, protocol_atoms/0]).
-export_type([policy/0, ctx/0, reason/0]).

-record(policy, {pool :: atom(),
                 allowed :: erpy_allow:rules() | env,
                 send_allowed :: [send_target()],
                 atoms :: atomics:atomics_ref(),
                 max :: non_neg_integer(),
                 %% ?FUN_TAGS compiled once (an uncompiled pattern costs ~1 us per match).
                 fun_tags :: binary:cp(),
                 %% The highest first byte of a fun's size in a term of at most `max` bytes.
                 fun_size_high :: 0..255,
                 %% The first bytes of ?FUN_TAGS, each a pattern of its own (see has_fun/2).
                 export_tag :: binary:cp(),
                 new_fun_tag :: binary:cp(),
                 %% Either tag byte: a binary with neither (most answers) is done in one scan.
                 any_fun_tag :: binary:cp()}).

-opaque policy() :: #policy{}.
-opaque ctx() :: #{policy := policy(), caller := pid(), given := term(), key := reference(),
                    handles => #{term() => true}, finished => true}.
-type send_target() :: atom() | {atom(), node()} | pid().
-type reason() :: {not_allowed, {module(), atom(), arity()}}
                | {not_allowed, {send, term()}}
                | {not_allowed, {'fun', module(), atom() | local, arity()}}
                | {not_allowed, {pid | reference | port, term()}}
                | {unknown_atom, binary()}
                | {message_too_large, non_neg_integer(), non_neg_integer()}
                | {undecodable, binary()}
                | {noproc, term()}
                | {badarg, term()}.

%% How funs begin in the external term format: EXPORT_EXT (113) and its module atom's
%% tag; NEW_FUN_EXT (112) and the high byte of its size, which binary_to_term only
%% checks against the bytes left, so it is at most the high byte of `max_message_size`
%% (0 below 16 MiB). A binary without any of these holds no fun, so most results are
%% never walked; a compressed one is always walked, its bytes say nothing.
%% (FUN_EXT, 117, is refused by binary_to_term itself since OTP 23.)
-define(EXPORT_EXT, 113).
-define(NEW_FUN_EXT, 112).
%% ATOM_EXT, SMALL_ATOM_EXT, ATOM_UTF8_EXT, SMALL_ATOM_UTF8_EXT.
-define(ATOM_TAGS, [100, 115, 118, 119]).
-define(FUN_TAGS(SizeHigh), [<<?EXPORT_EXT, A>> || A <- ?ATOM_TAGS]
                            ++ [<<?NEW_FUN_EXT, H>> || H <- lists:seq(0, SizeHigh)]).
%% How many lone fun tag bytes has_fun/2 looks past (~0.3 us each) before it scans the
%% rest for ?FUN_TAGS.
-define(TAG_HITS, 1024).
%% Binaries up to this size (most answers) are scanned for funs in Erlang (has_fun/2).
-define(SMALL_SCAN, 256).
-define(GIVEN(Key), {'$erpy_given', Key}).
%% The io functions whose first argument is the device (a process) they write to or read from.
-define(IO_DEVICE_FIRST, [{columns, 1}, {format, 3}, {fwrite, 3}, {fread, 3}, {get_chars, 3},
                          {get_line, 2}, {get_password, 1}, {getopts, 1}, {nl, 1},
                          {parse_erl_exprs, 2}, {parse_erl_exprs, 3}, {parse_erl_exprs, 4},
                          {parse_erl_form, 2}, {parse_erl_form, 3}, {parse_erl_form, 4},
                          {put_chars, 2}, {read, 2}, {read, 3}, {read, 4}, {request, 2},
                          {requests, 2}, {rows, 1}, {scan_erl_exprs, 2}, {scan_erl_exprs, 3},
                          {scan_erl_exprs, 4}, {scan_erl_form, 2}, {scan_erl_form, 3},
                          {scan_erl_form, 4}, {setopts, 2}, {write, 2}]).

%% API.

%% The policy of pool `Pool` from its options (`allowed`, `send_allowed`, `new_atoms`,
%% `max_message_size`).
-spec new(atom(), map()) -> policy().
new(Pool, Opts) ->
    Atoms = atomics:new(1, [{signed, true}]),
    Max = maps:get(max_message_size, Opts, application:get_env(erpy, max_message_size, 10485760)),
    SizeHigh = min(255, Max bsr 24),
    atomics:put(Atoms, 1, maps:get(new_atoms, Opts, application:get_env(erpy, new_atoms, 0))),
    #policy{pool = Pool,
            allowed = case maps:find(allowed, Opts) of
                          {ok, Allowed} -> erpy_allow:compile(Allowed);
                          error -> env
                      end,
            send_allowed = maps:get(send_allowed, Opts, application:get_env(erpy, send_allowed, [])),
            atoms = Atoms,
            max = Max,
            fun_tags = binary:compile_pattern(?FUN_TAGS(SizeHigh)),
            fun_size_high = SizeHigh,
            export_tag = binary:compile_pattern(<<?EXPORT_EXT>>),
            new_fun_tag = binary:compile_pattern(<<?NEW_FUN_EXT>>),
            any_fun_tag = binary:compile_pattern([<<?EXPORT_EXT>>, <<?NEW_FUN_EXT>>])}.

%% What one request may reach: made in the caller's process, before the request is sent.
%% `Given` is what Erlang hands to Python (the request, with its arguments).
-spec request_ctx(policy(), pid(), term()) -> ctx().
request_ctx(Policy, Caller, Given) ->
    #{policy => Policy, caller => Caller, given => Given, key => make_ref()}.

%% The request is over: forget what its callbacks handed to Python.
-spec done(ctx()) -> ok.
done(#{key := Key}) ->
    _ = erase(?GIVEN(Key)),
    ok.

%% As done/1, for a caller that decodes the answer afterwards: the context returned still
%% knows what the callbacks handed to Python (a fun a callback returned may come back).
-spec finish(ctx()) -> ctx().
finish(#{key := Key} = Ctx) ->
    case erase(?GIVEN(Key)) of
        undefined -> Ctx#{finished => true};
        Handles -> Ctx#{handles => Handles}
    end.

%% A term Python sent (ETF): safe atoms, size limit, funs checked. Never raises.
-spec decode(ctx(), binary()) -> {ok, term()} | {error, reason()}.
decode(#{policy := #policy{max = Max}}, Bin) when byte_size(Bin) > Max ->
    {error, {message_too_large, byte_size(Bin), Max}};
decode(#{policy := #policy{max = Max}}, <<131, 80, Size:32, _/binary>>) when Size > Max ->
    %% binary_to_term would inflate it first: refused on its claim.
    {error, {message_too_large, Size, Max}};
decode(#{policy := Policy} = Ctx, Bin) when is_binary(Bin) ->
    %% The bytes are scanned before they are decoded: a large term just decoded would
    %% otherwise be live while the scan yields, and be copied by a garbage collection.
    HasFun = case Bin of
                 <<131, 80, _/binary>> -> true;
                 _ -> has_fun(Policy, Bin)
             end,
    try binary_to_term(Bin, [safe]) of
        Term when HasFun -> checked(check_funs(Ctx, Term), Term);
        Term -> {ok, Term}
    catch
        error:badarg -> decode_unsafe(Ctx, Bin)
    end;
decode(_Ctx, _Other) ->
    {error, {undecodable, <<"not a binary">>}}.

%% A result built by the NIF that holds funs (embedded mode flags those).
-spec check_result(ctx(), term()) -> ok | {error, reason()}.
check_result(Ctx, Term) ->
    check_funs(Ctx, Term).

%% Python called back: `Kind` is call, apply or send; `Args` is the argument list (for
%% send, `[Message]` with `M` the destination), as a term or as its ETF from Python.
%% Checked here, then run in this (the caller's) process with `Worker` as the target of
%% nested erpy calls. `Checked`: whether `Args`/`M` may hold funs, pids, references or
%% ports (false when the producer knows they hold none).
-spec callback(ctx(), erpy:pool(), term(), atom(), term(), term(), binary() | list()) ->
    {ok, term()} | {error, term()}.
callback(Ctx, Pool, Worker, Kind, M, F, ArgsBin) when is_binary(ArgsBin) ->
    case decode_args(Ctx, ArgsBin) of
        {ok, Args} -> run_callback(Ctx, Pool, Worker, Kind, M, F, {check, Args});
        {error, _} = Error -> Error
    end;
callback(Ctx, Pool, Worker, Kind, M, F, Args) ->
    run_callback(Ctx, Pool, Worker, Kind, M, F, {check, Args}).

%% As callback/7 with decoded arguments: `{check, Args}` walks them for funs, pids and
%% references; `{trusted, Args}` when the producer saw none (embedded mode flags them).
-spec run_callback(ctx(), erpy:pool(), term(), atom(), term(), term(),
                   {check | trusted, term()}) -> {ok, term()} | {error, term()}.
run_callback(Ctx, Pool, Worker, Kind, M, F, {Mode, Args}) when is_list(Args) ->
    try
        ok = walk_if(Mode, Ctx, [M | Args]),
        Result = case Kind of
                     send when length(Args) =:= 1 -> send(Ctx, M, hd(Args));
                     send -> {error, {badarg, send}};
                     call when length(Args) =:= 1 -> apply_checked(Ctx, Pool, Worker, M, F, Args);
                     apply -> apply_checked(Ctx, Pool, Worker, M, F, Args);
                     _ -> {error, {badarg, Kind}}
                 end,
        case Result of
            {ok, Value} -> remember(Ctx, Value);
            _ -> ok
        end,
        Result
    catch
        throw:{refused, Why} -> {error, Why}
    end;
run_callback(_Ctx, _Pool, _Worker, Kind, _M, _F, _Args) ->
    {error, {badarg, Kind}}.

%% The atoms erpy's own Python side names in answers and control frames. They exist
%% because this module names them, so binary_to_term(_, [safe]) accepts those frames.
-spec protocol_atoms() -> [atom()].
protocol_atoms() ->
    [ok, error, ready, version, python, pid, gil, free_threaded, shared, timeout,
     message_too_large, memory_limit, unencodable_error, exiting, log, stdout, stderr,
     callback, reply, type, message, traceback, undefined, nil, true, false].

%% Internal: decoding.

%% Whether `Bin` holds the start of a fun (?FUN_TAGS). A one-byte pattern is found by
%% memchr (~0.2 us a call) where the set of two-byte patterns takes an Aho-Corasick pass
%% (~1.2 ns a byte) that yields, and cost W3b's callers ~5 ms of VM CPU for its 540 KB
%% (not the 0.65 ms it takes alone). So each tag's first byte is looked for alone and the
%% byte after each hit checked here; past ?TAG_HITS hits that start no fun (text full of
%% `p`, say) the rest is scanned for ?FUN_TAGS, so the cost stays linear in the size.
has_fun(#policy{fun_size_high = High}, Bin) when byte_size(Bin) =< ?SMALL_SCAN ->
    small_has_fun(Bin, High);
has_fun(#policy{any_fun_tag = Any} = Policy, Bin) ->
    binary:match(Bin, Any) =/= nomatch andalso has_fun_tag(Policy, Bin).

%% has_fun/2 of a small binary, byte by byte. No binary:match here: measured with 4
%% callers on a pool of one worker, that BIF in every answer's decode made the callers
%% spread over both schedulers of a 2-core VM (a quarter of their runs on the second,
%% every answer a wake-up across cores), and the throughput fell by a quarter.
small_has_fun(<<Tag, _/binary>> = Bin, High) when Tag =:= ?EXPORT_EXT; Tag =:= ?NEW_FUN_EXT ->
    fun_start(Bin, 0, High) orelse small_has_fun(rest(Bin), High);
small_has_fun(<<_, Rest/binary>>, High) ->
    small_has_fun(Rest, High);
small_has_fun(<<>>, _High) ->
    false.

rest(<<_, Rest/binary>>) -> Rest.

has_fun_tag(#policy{export_tag = Export, new_fun_tag = NewFun, fun_tags = FunTags,
                    fun_size_high = High}, Bin) ->
    case tag_follows(Bin, Export, High, 0, ?TAG_HITS) of
        true ->
            true;
        Export1 ->
            case {Export1, tag_follows(Bin, NewFun, High, 0, ?TAG_HITS)} of
                {_, true} -> true;
                {false, false} -> false;
                %% Many hits: both tags are checked up to `From` (numbers sort before
                %% atoms, so it is the lower position given).
                {Many1, Many2} ->
                    From = min(Many1, Many2),
                    binary:match(Bin, FunTags, [{scope, {From, byte_size(Bin) - From}}]) =/= nomatch
            end
    end.

%% true: a hit of the one-byte `Tag` is followed by a byte that makes it a fun's start;
%% false: none is; At: `Hits` hits were not, the last at `At` (nothing before it is one).
tag_follows(Bin, Tag, High, Pos, Hits) ->
    case binary:match(Bin, Tag, [{scope, {Pos, byte_size(Bin) - Pos}}]) of
        nomatch ->
            false;
        {At, 1} ->
            case fun_start(Bin, At, High) of
                true -> true;
                false when Hits =:= 0 -> At;
                false -> tag_follows(Bin, Tag, High, At + 1, Hits - 1)
            end
    end.

%% The bytes at `At` are one of ?FUN_TAGS(High).
fun_start(Bin, At, High) ->
    case Bin of
        <<_:At/binary, ?EXPORT_EXT, Next, _/binary>> -> lists:member(Next, ?ATOM_TAGS);
        <<_:At/binary, ?NEW_FUN_EXT, SizeHigh, _/binary>> -> SizeHigh =< High;
        _ -> false
    end.

checked(ok, Term) -> {ok, Term};
checked({error, _} = Error, _Term) -> Error.

decode_args(Ctx, Bin) ->
    case decode(Ctx, Bin) of
        {ok, Args} when is_list(Args) -> {ok, Args};
        {ok, _} -> {error, {badarg, arguments}};
        Error -> Error
    end.

%% binary_to_term(_, [safe]) refused it: new atoms (allowed up to the pool's budget), or a
%% term this VM cannot hold at all.
decode_unsafe(#{policy := #policy{atoms = Budget}} = Ctx, Bin) ->
    case erpy_etf_atoms:unknown(Bin) of
        {ok, []} ->
            {error, {undecodable, <<"not a term this VM accepts from Python">>}};
        {ok, [First | _] = Unknown} ->
            N = length(Unknown),
            case take_atoms(Budget, N) of
                true ->
                    try binary_to_term(Bin) of
                        Term -> checked(check_funs(Ctx, Term), Term)
                    catch
                        error:badarg -> {error, {undecodable, <<"malformed term">>}}
                    end;
                false ->
                    {error, {unknown_atom, First}}
            end;
        {error, Why} ->
            {error, {undecodable, Why}}
    end.

take_atoms(Budget, N) ->
    Limit = erlang:system_info(atom_limit),
    Room = erlang:system_info(atom_count) + N < Limit - Limit div 20,
    case Room andalso atomics:sub_get(Budget, 1, N) of
        false -> false;
        Left when Left >= 0 -> true;
        _ -> atomics:add(Budget, 1, N), false
    end.

%% Internal: funs, pids, references.

walk_if(trusted, _Ctx, _Term) -> ok;
walk_if(check, Ctx, Term) -> walk(Ctx, Term, all).

check_funs(Ctx, Term) ->
    try walk(Ctx, Term, funs)
    catch throw:{refused, Why} -> {error, Why}
    end.

%% Throws {refused, Why} at the first thing Python may not hand to Erlang.
walk(Ctx, T, What) when is_list(T) -> walk_list(Ctx, T, What);
walk(Ctx, T, What) when is_tuple(T) -> walk_tuple(Ctx, T, tuple_size(T), What);
walk(Ctx, T, What) when is_map(T) ->
    maps:fold(fun(K, V, ok) -> walk(Ctx, K, What), walk(Ctx, V, What) end, ok, T);
walk(Ctx, T, _What) when is_function(T) -> check_fun(Ctx, T);
walk(Ctx, T, all) when is_pid(T); is_reference(T); is_port(T) -> check_given(Ctx, T);
walk(_Ctx, _T, _What) -> ok.

walk_list(Ctx, [H | T], What) -> walk(Ctx, H, What), walk_list(Ctx, T, What);
walk_list(_Ctx, [], _What) -> ok;
walk_list(Ctx, Tail, What) -> walk(Ctx, Tail, What).

walk_tuple(_Ctx, _T, 0, _What) -> ok;
walk_tuple(Ctx, T, I, What) -> walk(Ctx, element(I, T), What), walk_tuple(Ctx, T, I - 1, What).

check_fun(#{policy := #policy{allowed = Allowed}} = Ctx, Fun) ->
    case erlang:fun_info(Fun, type) of
        {type, external} ->
            {module, M} = erlang:fun_info(Fun, module),
            {name, F} = erlang:fun_info(Fun, name),
            {arity, A} = erlang:fun_info(Fun, arity),
            %% An allowed function that runs another function named in its arguments,
            %% or reaches a process named there, is checked with those arguments when
            %% Python calls it; as a fun, whatever calls it (lists:zipwith3 with
            %% `fun erlang:apply/3`, lists:foldl with `fun gen_server:call/2`) picks its
            %% arguments unchecked: refused.
            Allows = case erpy_allow:resolve(Allowed, M, F, A) of
                         {ok, _, _} -> not indirect(M, F, A);
                         {error, _} -> false
                     end,
            Allows orelse given(Ctx, Fun) orelse throw({refused, {not_allowed, {'fun', M, F, A}}}),
            ok;
        {type, local} ->
            case given(Ctx, Fun) of
                true -> ok;
                false ->
                    {module, M} = erlang:fun_info(Fun, module),
                    {arity, A} = erlang:fun_info(Fun, arity),
                    throw({refused, {not_allowed, {'fun', M, local, A}}})
            end
    end.

check_given(#{caller := Caller}, Caller) ->
    ok;
check_given(#{policy := #policy{send_allowed = Listed}} = Ctx, T) ->
    case lists:member(T, Listed) orelse given(Ctx, T) of
        true -> ok;
        false -> throw({refused, {not_allowed, {kind(T), T}}})
    end.

kind(T) when is_pid(T) -> pid;
kind(T) when is_reference(T) -> reference;
kind(T) when is_port(T) -> port.

%% Did Erlang hand `X` to Python in this request (its arguments, or a callback result)?
%% The handles (pids, references, ports, funs) of what was handed are collected once per
%% request into a set, so a check costs the same however large the arguments and however
%% many handles Python names (walking the arguments for each one was quadratic: a
%% callback naming a given pid 20,000 times, with 200,000 arguments, held the caller
%% for minutes, past its timeout).
given(#{handles := Handles}, X) ->
    maps:is_key(X, Handles);
given(#{finished := true, given := Given}, X) ->
    %% The answer of a finished request: nothing is remembered any more.
    maps:is_key(X, handles(Given, #{}));
given(Ctx, X) ->
    maps:is_key(X, given_handles(Ctx)).

given_handles(#{given := Given, key := Key}) ->
    case get(?GIVEN(Key)) of
        undefined ->
            Handles = handles(Given, #{}),
            put(?GIVEN(Key), Handles),
            Handles;
        Handles ->
            Handles
    end.

%% Callback results Python may use later in the request (pids, references, funs only).
remember(#{key := Key} = Ctx, Value) ->
    case handles(Value, #{}) of
        New when map_size(New) =:= 0 -> ok;
        New -> put(?GIVEN(Key), maps:merge(given_handles(Ctx), New))
    end.

%% The pids, references, ports and funs in `T` (not inside funs: a fun's environment is
%% not handed to Python), added to the set `Acc`.
handles(T, Acc) when is_pid(T); is_reference(T); is_port(T); is_function(T) -> Acc#{T => true};
handles([H | T], Acc) -> handles(T, handles(H, Acc));
handles(T, Acc) when is_tuple(T) -> handles_tuple(T, tuple_size(T), Acc);
handles(T, Acc) when is_map(T) -> maps:fold(fun(K, V, A) -> handles(V, handles(K, A)) end, Acc, T);
handles(_T, Acc) -> Acc.

handles_tuple(_T, 0, Acc) -> Acc;
handles_tuple(T, I, Acc) -> handles_tuple(T, I - 1, handles(element(I, T), Acc)).

%% Internal: messages.

send(Ctx, Dest, Msg) when is_pid(Dest); is_reference(Dest) ->
    check_given(Ctx, Dest),
    erlang:send(Dest, Msg),
    {ok, ok};
send(Ctx, Name, Msg) when is_binary(Name) ->
    case existing_atom(Name) of
        {ok, Atom} -> send(Ctx, Atom, Msg);
        error -> {error, {not_allowed, {send, Name}}}
    end;
send(#{policy := #policy{send_allowed = Listed}}, Dest, Msg)
  when is_atom(Dest); is_tuple(Dest), tuple_size(Dest) =:= 2 ->
    case lists:member(Dest, Listed) of
        false ->
            {error, {not_allowed, {send, Dest}}};
        true ->
            try erlang:send(Dest, Msg) of
                _ -> {ok, ok}
            catch error:badarg -> {error, {noproc, Dest}}
            end
    end;
send(_Ctx, Dest, _Msg) ->
    {error, {badarg, {send, Dest}}}.

%% A process an allowed function is asked to reach (see dests/3): what erlang.send may
%% reach. A name, {Name, Node}, {global, Name} or {via, Module, Name} must be listed in
%% `send_allowed` as it is written.
check_dest(Ctx, Dest) when is_pid(Dest); is_reference(Dest); is_port(Dest) ->
    check_given(Ctx, Dest);
check_dest(#{policy := #policy{send_allowed = Listed}}, Dest) ->
    lists:member(Dest, Listed) orelse throw({refused, {not_allowed, {send, Dest}}}),
    ok.

existing_atom(B) ->
    try {ok, binary_to_existing_atom(B, utf8)} catch error:badarg -> error end.

%% Internal: calls.

apply_checked(#{policy := #policy{allowed = Allowed}} = Ctx, Pool, Worker, M, F, Args) ->
    case erpy_allow:resolve(Allowed, M, F, length(Args)) of
        {ok, Mod, Fun} ->
            Args1 = check_call(Ctx, Allowed, Mod, Fun, Args),
            erpy_call:apply_callback(Pool, Worker, {Mod, Fun, Args1});
        {error, _} = NotAllowed ->
            NotAllowed
    end.

%% An allowed call's arguments may still name a process or another function:
%% - processes (gen_server:call(rex, ...), io:format(user, ...), erlang:whereis(rex)):
%%   checked as erlang.send's destination is (dests/3);
%% - functions to run (erlang:apply, spawn, rpc, timer:apply_after, ...): the allow-list
%%   is asked about that one too (and its arguments checked the same way), so allowing
%%   `{erlang, apply}` does not allow `os:cmd` through it;
%% - lists of functions (rpc:parallel_eval/1, rpc:pmap/3): refused, they are not checked.
%% (Funs, pids and references among the arguments were checked by walk/3.) Returns the
%% arguments with the inner module and function as the atoms the allow-list resolved
%% (Python may name them as str).
check_call(Ctx, Allowed, Mod, Fun, Args) ->
    lists:foreach(fun(Dest) -> check_dest(Ctx, Dest) end, dests(Mod, Fun, Args)),
    unchecked(Mod, Fun, length(Args)) andalso
        throw({refused, {not_allowed, {Mod, Fun, length(Args)}}}),
    case inner(Mod, Fun, Args) of
        none ->
            Args;
        {Before, [M, F, A | After]} when is_list(A) ->
            case erpy_allow:resolve(Allowed, M, F, length(A)) of
                {ok, M1, F1} -> Before ++ [M1, F1, check_call(Ctx, Allowed, M1, F1, A) | After];
                {error, Why} -> throw({refused, Why})
            end;
        {_, [M, F, A | _]} ->
            throw({refused, {not_allowed, {M, F, A}}})
    end.

%% Whether `fun M:F/A` is a function whose arguments name a function to run or a process
%% to reach (so it cannot be let through as a fun, its arguments unseen).
indirect(M, F, A) ->
    Args = lists:duplicate(A, []),
    inner(M, F, Args) =/= none orelse dests(M, F, Args) =/= [] orelse unchecked(M, F, A).

unchecked(rpc, parallel_eval, 1) -> true;
unchecked(rpc, pmap, 3) -> true;
unchecked(_, _, _) -> false.

%% {Arguments before the module, [Module, Function, Args | the rest]} for the forms that
%% name a function to run.
inner(Mod, Fun, Args) ->
    case skip(Mod, Fun, Args) of
        N when is_integer(N), length(Args) >= N + 3 -> lists:split(N, Args);
        _ -> none
    end.

%% How many arguments come before {M, F, A}.
skip(erlang, apply, [_, _, _]) -> 0;
skip(erlang, hibernate, [_, _, _]) -> 0;
skip(erlang, S, [_, _, _]) when S =:= spawn; S =:= spawn_link; S =:= spawn_monitor -> 0;
skip(erlang, S, [_, _, _, _]) when S =:= spawn; S =:= spawn_link; S =:= spawn_monitor -> 1;
skip(erlang, spawn_opt, [_, _, _, _]) -> 0;
skip(erlang, spawn_opt, [_, _, _, _, _]) -> 1;
skip(erlang, spawn_request, [_, _, _]) -> 0;
skip(erlang, spawn_request, [_, _, A, _]) when is_list(A) -> 0;
skip(erlang, spawn_request, [_, _, _ | _]) -> 1;
skip(proc_lib, S, [_, _, A | _]) when is_list(A), S =/= stop -> 0;
skip(proc_lib, S, [_, _, _, _ | _]) when S =/= stop -> 1;
skip(rpc, _, [_, _, A | _]) when is_list(A) -> 0;
skip(rpc, _, [_, _, _, _ | _]) -> 1;
skip(erpc, _, [_, _, _, _ | _]) -> 1;
skip(timer, tc, [_, _, _ | _]) -> 0;
skip(timer, S, [_, _, _, _]) when S =:= apply_after; S =:= apply_interval;
                                 S =:= apply_repeatedly -> 1;
skip(_, _, _) -> none.

%% The processes an OTP function reaches that its arguments name (a pid, a registered
%% name, {Name, Node}, {global, Name}, {via, Module, Name}): messages, calls, timers,
%% name lookups, I/O to a device, process control (sys, supervisor, stop).
dests(erlang, F, [D | _]) when F =:= send; F =:= send_nosuspend; F =:= '!';
                               F =:= whereis; F =:= unregister -> [D];
dests(erlang, F, [_, D | _]) when F =:= send_after; F =:= start_timer -> [D];
dests(timer, F, [_, D, _]) when F =:= send_after; F =:= send_interval; F =:= exit_after -> [D];
dests(timer, kill_after, [_, D]) -> [D];
dests(gen_server, F, [_, D, _ | _]) when F =:= multi_call; F =:= abcast -> [D];  % Nodes first
dests(gen_server, F, [D | _]) when F =:= call; F =:= cast; F =:= send_request; F =:= stop;
                                   F =:= multi_call; F =:= abcast -> [D];
dests(gen_statem, F, [D | _]) when F =:= call; F =:= cast; F =:= send_request; F =:= stop -> [D];
dests(gen_event, F, [D | _]) when F =/= start, F =/= start_link, F =/= start_monitor -> [D];
dests(gen, F, [D | _]) when F =:= call; F =:= stop; F =:= send_request -> [D];
dests(sys, _, [D | _]) -> [D];
dests(proc_lib, stop, [D | _]) -> [D];
dests(supervisor, F, [D | _]) when F =/= start_link, F =/= check_childspecs -> [D];
dests(global, F, [Name | _]) when F =:= send; F =:= whereis_name -> [{global, Name}];
dests(rpc, F, [D, _]) when F =:= sbcast; F =:= abcast; F =:= multi_server_call -> [D];
dests(rpc, F, [_, D, _]) when F =:= sbcast; F =:= abcast; F =:= multi_server_call -> [D];
dests(rpc, server_call, [_, D, _, _]) -> [D];
dests(io, F, [D | _] = Args) ->
    case lists:member({F, length(Args)}, ?IO_DEVICE_FIRST) of
        true when D =:= standard_io -> [];  % the caller's own group leader, as io:format/2
        true -> [D];
        false -> []
    end;
dests(_, _, _) ->
    [].
