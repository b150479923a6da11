%% The Python codec tested through a real boundary: Erlang generates terms, a Python
%% port helper (test/py/roundtrip_port.py) decodes and re-encodes each one with erpy,
%% and the answer must be exactly what term_to_binary gives.
-module(erpy_codec_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1,
         init_per_testcase/2, end_per_testcase/2]).
-export([random_terms/1, every_kind/1, old_forms_and_compressed/1, hostile_input/1,
         any_term_as_map_key/1, keys_equal_in_python/1]).

-define(REPLY_TIMEOUT, 20000).
-define(RANDOM_TERMS, 5000).
-define(PER_KIND, 250).

all() ->
    [random_terms, every_kind, old_forms_and_compressed, hostile_input, any_term_as_map_key,
     keys_equal_in_python].

suite() ->
    [{timetrap, {minutes, 5}}].

init_per_suite(Config) ->
    Root = repo_root(),
    Python = os:getenv("ERPY_PYTHON", "/usr/bin/python3"),
    Env = [{"PYTHONPATH", python_path(Root)}],
    Check = open_port({spawn_executable, Python},
                      [{args, ["-c", "import erpy"]}, {env, Env}, exit_status,
                       stderr_to_stdout, binary]),
    case collect_exit(Check, <<>>) of
        {0, _} ->
            ct:log("Python ~s, PYTHONPATH ~s", [Python, python_path(Root)]),
            [{python, Python}, {root, Root}, {env, Env} | Config];
        {Status, Out} ->
            {fail, lists:flatten(io_lib:format(
                     "~s cannot import erpy (status ~p); build it with `make native`:~n~s",
                     [Python, Status, Out]))}
    end.

end_per_suite(_Config) ->
    ok.

init_per_testcase(_Case, Config) ->
    Script = filename:join([?config(root, Config), "test", "py", "roundtrip_port.py"]),
    Port = open_port({spawn_executable, ?config(python, Config)},
                     [{args, [Script]}, {packet, 4}, binary, exit_status, use_stdio,
                      {env, ?config(env, Config)}]),
    [{port, Port} | Config].

end_per_testcase(_Case, Config) ->
    Port = ?config(port, Config),
    catch port_close(Port),
    ok.

%% Test cases.

random_terms(Config) ->
    doc("Erlang generates 5,000 random terms of every kind; Python decodes and re-encodes "
        "each one byte-identically to term_to_binary(T, [{minor_version, 2}])."),
    Seed = erlang:unique_integer([positive]) + erlang:system_time(),
    ct:log("seed ~p", [Seed]),
    Terms = erpy_term_gen:terms(Seed, ?RANDOM_TERMS),
    roundtrip_all(?config(port, Config), Terms).

every_kind(Config) ->
    doc("For each kind of term (integers, bignums, floats, unicode atoms, binaries, "
        "bitstrings, strings, lists, improper lists, large tuples, maps over 32 keys, pids, "
        "refs, ports, funs), 250 random terms of that kind come back byte-identical."),
    Seed = erlang:unique_integer([positive]) + erlang:system_time(),
    ct:log("seed ~p", [Seed]),
    erpy_term_gen:seed(Seed),
    Terms = [erpy_term_gen:term(Kind)
             || Kind <- erpy_term_gen:kinds(),
                _ <- lists:seq(1, case Kind of long_string -> 10; _ -> ?PER_KIND end)],
    roundtrip_all(?config(port, Config), Terms).

old_forms_and_compressed(Config) ->
    doc("Compressed terms and the old forms of minor version 0 (FLOAT_EXT, Latin-1 "
        "ATOM_EXT) decode in Python to terms that encode back to the same Erlang term."),
    Seed = erlang:unique_integer([positive]) + erlang:system_time(),
    ct:log("seed ~p", [Seed]),
    Terms = erpy_term_gen:terms(Seed, 2000),
    Port = ?config(port, Config),
    Failures = lists:append(
                 [[{Opts, T, Reply}
                   || {Opts, Reply} <- [{Opts, request(Port, term_to_binary(T, Opts))}
                                        || Opts <- [[compressed], [{compressed, 9}],
                                                    [{minor_version, 0}],
                                                    [{minor_version, 1}]]],
                      not same_term(Reply, T)]
                  || T <- Terms]),
    report_failures(Failures),
    ?assertEqual([], Failures).

hostile_input(Config) ->
    doc("Truncated, unknown-tag, oversized-length, deeply nested and lying compressed "
        "input all give a DecodeError quickly, and the helper keeps answering."),
    Port = ?config(port, Config),
    Valid = term_to_binary([#{a => <<"b">>, 1 => 1.5}, {self(), make_ref()},
                            "str", 1 bsl 100, fun lists:sort/1], [{minor_version, 2}]),
    Truncated = [binary:part(Valid, 0, N) || N <- lists:seq(0, byte_size(Valid) - 1)],
    Hostile = [<<131, 200>>,                                  % unknown tag
               <<131, 108, 16#ffffffff:32>>,                  % 2^32-1 elements in 6 bytes
               <<131, 109, 16#ffffffff:32, 1, 2>>,            % binary longer than input
               <<131, 105, 16#ffffffff:32>>,                  % LARGE_TUPLE_EXT, same
               <<131, 116, 16#ffffffff:32>>,                  % map, same
               <<131, 111, 16#ffffffff:32, 0, 1>>,            % bignum, same
               <<131, 80, 16#80000000:32, (zlib:compress(<<0:8000>>))/binary>>,
               <<131, 80, 10:32, "not zlib at all">>,
               %% Valid but 10^6 deep: lists [[[...]]] and tuples {{{...}}}.
               iolist_to_binary([131, lists:duplicate(1000000, <<108, 1:32>>), 106,
                                 lists:duplicate(1000000, 106)]),
               iolist_to_binary([131, lists:duplicate(1000000, <<104, 1>>), 106]),
               <<>>, <<131>>, <<130, 97, 1>>],
    Results = [{Bytes, timer:tc(fun() -> request(Port, Bytes) end)}
               || Bytes <- Truncated ++ Hostile],
    Bad = [{abbrev(Bytes), Micros, Reply}
           || {Bytes, {Micros, Reply}} <- Results, not is_decode_error(Reply)],
    ct:log("slowest answer: ~b us", [lists:max([M || {_, {M, _}} <- Results])]),
    ?assertEqual([], Bad),
    %% Still alive and correct after all that.
    ?assertEqual(Valid, request(Port, Valid)).

any_term_as_map_key(Config) ->
    doc("Random terms of every kind are map keys, strings, lists, maps and improper lists "
        "included, at any depth (erpy.FrozenList, FrozenMap, FrozenImproperList in Python): "
        "1,000 maps of them come back byte-identical, plain and compressed."),
    Seed = erlang:unique_integer([positive]) + erlang:system_time(),
    ct:log("seed ~p", [Seed]),
    erpy_term_gen:seed(Seed),
    Kinds = erpy_term_gen:kinds() -- [big_map, big_tuple, long_string],
    %% The kinds Python cannot hash, twice as often.
    Weighted = Kinds ++ [string, list, improper_list, map],
    Maps = [key_map(rand:uniform(12), Weighted) || _ <- lists:seq(1, 1000)]
           ++ [key_map(40, Weighted) || _ <- lists:seq(1, 20)],  % hash-ordered maps
    Port = ?config(port, Config),
    roundtrip_all(Port, Maps),
    Compressed = [T || T <- lists:sublist(Maps, 200),
                       binary_to_term(request(Port, term_to_binary(T, [compressed]))) =/= T],
    ?assertEqual([], Compressed).

keys_equal_in_python(Config) ->
    doc("Maps whose keys are different terms but equal in Python (1, 1.0 and true; an atom "
        "and its name as a binary; the same inside lists, tuples, improper lists and map "
        "values), random keys of every kind around them and such maps as values: 1,000 "
        "maps come back =:= and byte-identical, plain and compressed (erpy.Key in Python)."),
    Seed = erlang:unique_integer([positive]) + erlang:system_time(),
    ct:log("seed ~p", [Seed]),
    erpy_term_gen:seed(Seed),
    Kinds = erpy_term_gen:kinds() -- [big_map, big_tuple, long_string],
    Maps = [twins_map(rand:uniform(8), Kinds, 2) || _ <- lists:seq(1, 1000)]
           ++ [twins_map(25, Kinds, 1) || _ <- lists:seq(1, 20)],  % hash-ordered maps
    Colliding = length([M || M <- Maps, has_twins(M)]),
    ct:log("~b of ~b maps hold keys equal in Python", [Colliding, length(Maps)]),
    ?assert(Colliding > 500),
    Port = ?config(port, Config),
    Failures = [{T, Reply} || T <- Maps,
                              Reply <- [request(Port, term_to_binary(T, [{minor_version, 2}]))],
                              not same_term(Reply, T)],
    report_failures(Failures),
    ?assertEqual([], Failures),
    roundtrip_all(Port, Maps),  % the bytes too: the dict keeps the map's order
    Compressed = [T || T <- lists:sublist(Maps, 200),
                       not same_term(request(Port, term_to_binary(T, [compressed])), T)],
    ?assertEqual([], Compressed).

%% Internal.

%% Up to N groups of keys, each a random key and up to two of its twins.
twins_map(N, Kinds, Depth) ->
    maps:from_list(
      lists:append([begin
                        K = twin_base(Kinds),
                        [{Key, twins_value(Kinds, Depth)} || Key <- [K, twin(K), twin(K)]]
                    end || _ <- lists:seq(1, N)])).

twin_base(Kinds) ->
    case rand:uniform(4) of
        1 -> lists:nth(rand:uniform(8), [0, 1, 0.0, 1.0, true, false, -3, 255.0]);
        2 -> lists:nth(rand:uniform(4), [ok, <<"ok">>, 'héllo', <<"key"/utf8>>]);
        _ -> erpy_term_gen:term(lists:nth(rand:uniform(length(Kinds)), Kinds))
    end.

twins_value(Kinds, Depth) when Depth > 0 ->
    case rand:uniform(4) of
        1 -> twins_map(rand:uniform(3), Kinds, Depth - 1);
        _ -> erpy_term_gen:term(any)
    end;
twins_value(_Kinds, _Depth) ->
    erpy_term_gen:term(any).

%% Another term equal to T in Python, when there is one (else T itself).
twin(true) -> pick([1, 1.0]);
twin(false) -> pick([0, 0.0]);
twin(undefined) -> undefined;  % None equals nothing else
twin(A) when is_atom(A) -> atom_to_binary(A, utf8);
twin(I) when is_integer(I) ->
    case catch float(I) of
        F when is_float(F) ->
            case trunc(F) =:= I of
                true when I =:= 0; I =:= 1 -> pick([F, I =:= 1]);
                true -> F;
                false -> I
            end;
        _ -> I
    end;
twin(F) when is_float(F), F == trunc(F) -> trunc(F);
twin(B) when is_binary(B), byte_size(B) =< 20 ->
    %% A str in Python when it is UTF-8: the atom of that name equals it.
    case unicode:characters_to_binary(B, utf8, utf8) of
        B when B =/= <<"true">>, B =/= <<"false">>, B =/= <<"undefined">> -> binary_to_atom(B, utf8);
        _ -> B
    end;
twin(L) when is_list(L) -> twin_list(L);
twin(T) when is_tuple(T) -> list_to_tuple(twin_list(tuple_to_list(T)));
twin(M) when is_map(M) -> maps:map(fun(_, V) -> twin(V) end, M);
twin(T) -> T.

twin_list([H | T]) -> [twin(H) | twin_list(T)];
twin_list([]) -> [];
twin_list(Tail) -> twin(Tail).

has_twins(M) when is_map(M) ->
    lists:any(fun({K, V}) -> twin(K) =/= K orelse has_twins(V) end, maps:to_list(M));
has_twins(_) ->
    false.

pick(L) -> lists:nth(rand:uniform(length(L)), L).

%% A map of up to N keys of random kinds, none equal in Python to another (a dict could
%% not hold both: 1 and 1.0, a and <<"a">>, [1] and [1.0]).
key_map(N, Kinds) ->
    key_map(N, Kinds, #{}, #{}).

key_map(0, _Kinds, _Seen, Map) ->
    Map;
key_map(N, Kinds, Seen, Map) ->
    K = erpy_term_gen:term(lists:nth(rand:uniform(length(Kinds)), Kinds)),
    Class = key_class(K),
    case maps:is_key(Class, Seen) of
        true -> key_map(N - 1, Kinds, Seen, Map);
        false -> key_map(N - 1, Kinds, Seen#{Class => true}, Map#{K => erpy_term_gen:term(any)})
    end.

%% What decides equality in Python for the frozen forms; the rest as erpy_term_gen has it.
key_class(L) when is_list(L) -> key_list(L, []);
key_class(M) when is_map(M) -> {map, lists:sort([{key_class(K), key_class(V)} || {K, V} <- maps:to_list(M)])};
key_class(T) when is_tuple(T) -> {tuple, [key_class(E) || E <- tuple_to_list(T)]};
key_class(B) when is_bitstring(B), not is_binary(B) -> {bits, B};
key_class(F) when is_function(F) -> {fun_, F};
key_class(T) -> erpy_term_gen:py_key(T).

key_list([], Acc) -> {list, lists:reverse(Acc)};
key_list([H | T], Acc) -> key_list(T, [key_class(H) | Acc]);
key_list(Tail, Acc) -> {improper, lists:reverse(Acc), key_class(Tail)}.

doc(Text) ->
    ct:comment(Text).

roundtrip_all(Port, Terms) ->
    {Sent, Failures} = lists:foldl(
        fun(T, {N, Acc}) ->
            Expected = term_to_binary(T, [{minor_version, 2}]),
            case request(Port, Expected) of
                Expected -> {N + 1, Acc};
                Other -> {N + 1, [{T, Other} | Acc]}
            end
        end, {0, []}, Terms),
    ct:log("~b terms sent, ~b answered identically", [Sent, Sent - length(Failures)]),
    report_failures(lists:reverse(Failures)),
    ?assertEqual(length(Terms), Sent),
    ?assertEqual(0, length(Failures)).

%% Sends one frame and waits for its answer: the helper answers every frame in order,
%% so a missing answer is a timeout and a dead helper an exit_status, never a skip.
request(Port, Bytes) ->
    true = port_command(Port, Bytes),
    receive
        {Port, {data, Reply}} -> Reply;
        {Port, {exit_status, Status}} -> ct:fail({python_exited, Status})
    after ?REPLY_TIMEOUT ->
        ct:fail({no_answer_within_ms, ?REPLY_TIMEOUT, abbrev(Bytes)})
    end.

same_term(Reply, T) ->
    try binary_to_term(Reply) =:= T
    catch error:badarg -> false
    end.

is_decode_error(Reply) ->
    case catch binary_to_term(Reply) of
        {error, <<"DecodeError">>, Message} when is_binary(Message) -> true;
        _ -> false
    end.

report_failures([]) ->
    ok;
report_failures(Failures) ->
    ct:pal("~b failures; the first ones:", [length(Failures)]),
    [ct:pal("term ~P~n  answer ~P", [element(tuple_size(F) - 1, F), 30,
                                      decoded(element(tuple_size(F), F)), 30])
     || F <- lists:sublist(Failures, 10)],
    ok.

decoded(Reply) ->
    try binary_to_term(Reply)
    catch error:badarg -> {undecodable, abbrev(Reply)}
    end.

abbrev(Bytes) when byte_size(Bytes) > 64 ->
    {binary:part(Bytes, 0, 64), '...', byte_size(Bytes), bytes};
abbrev(Bytes) ->
    Bytes.

collect_exit(Port, Acc) ->
    receive
        {Port, {data, D}} -> collect_exit(Port, <<Acc/binary, D/binary>>);
        {Port, {exit_status, S}} -> {S, Acc}
    after 30000 -> {timeout, Acc}
    end.

%% The repository root: $ERPY_ROOT, else the nearest parent of this module's beam that
%% holds python/erpy (rebar3 runs the suite from _build/test/lib/erpy/test).
repo_root() ->
    case os:getenv("ERPY_ROOT") of
        Root when is_list(Root), Root =/= "" -> Root;
        _ -> find_root(filename:dirname(filename:absname(code:which(?MODULE))))
    end.

find_root("/") ->
    error(erpy_root_not_found);
find_root(Dir) ->
    case filelib:is_dir(filename:join([Dir, "python", "erpy"])) of
        true -> Dir;
        false -> find_root(filename:dirname(Dir))
    end.

python_path(Root) ->
    Own = filename:join(Root, "python"),
    case os:getenv("PYTHONPATH") of
        Path when is_list(Path), Path =/= "" -> Own ++ ":" ++ Path;
        _ -> Own
    end.
