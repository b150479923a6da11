%% Random Erlang terms of every kind, for property tests and golden files.
%%
%% The generator uses the process's `rand` state; `seed/1` makes runs repeatable.
%% Map keys are restricted to kinds Python can hash, and a key is dropped when a key
%% Python considers equal is already in the map (atom 'a' and binary <<"a">> are both
%% the str 'a'; true/false equal 1/0; 2.0 equals 2; `undefined` is None), so every
%% generated map survives a trip through a Python dict unchanged.
-module(erpy_term_gen).

-export([seed/1, term/0, term/1, term/2, kinds/0, terms/2]).
-export([foreign_pid/0, foreign_ref/0, foreign_port/0, foreign_v4_port/0]).
-export([foreign_pid/4, foreign_ref/3, foreign_port/3]).
-export([py_key/1]).

-type kind() :: small_int | neg_int | int32 | bignum | float | atom | binary | bitstring
              | string | long_string | list | improper_list | tuple | big_tuple | map
              | big_map | pid | ref | port | fun_closure | fun_export.
-export_type([kind/0]).

-define(MAX_DEPTH, 4).

%% API.

-spec seed(integer()) -> ok.
seed(Seed) ->
    _ = rand:seed(exsss, {Seed, Seed bxor 16#5bd1e995, 16#2545f491}),
    ok.

-spec kinds() -> [kind()].
kinds() ->
    [small_int, neg_int, int32, bignum, float, atom, binary, bitstring, string, long_string,
     list, improper_list, tuple, big_tuple, map, big_map, pid, ref, port, fun_closure,
     fun_export].

%% A random term of a random kind.
-spec term() -> term().
term() ->
    term(any, ?MAX_DEPTH).

%% A random term of the given kind (`any` for a random one).
-spec term(kind() | any) -> term().
term(Kind) ->
    term(Kind, ?MAX_DEPTH).

-spec term(kind() | any, non_neg_integer()) -> term().
term(any, Depth) ->
    term(pick_kind(Depth), Depth);
term(small_int, _) -> rand:uniform(256) - 1;
term(neg_int, _) -> -rand:uniform(1 bsl 27);
term(int32, _) ->
    pick([-(1 bsl 31), -(1 bsl 31) + 1, (1 bsl 31) - 1, 1 bsl 31, -(1 bsl 31) - 1,
          255, 256, -1, -256, -257, 1 bsl 27, -(1 bsl 27), (1 bsl 27) - 1,
          rand:uniform(1 bsl 32) - (1 bsl 31) - 1]);
term(bignum, _) -> bignum(rand:uniform(pick([8, 40, 300])));
term(float, _) -> float();
term(atom, _) -> atom();
term(binary, _) -> binary();
term(bitstring, _) ->
    Bits = rand:uniform(7),
    <<(rand:bytes(rand:uniform(40) - 1))/binary, (rand:uniform(1 bsl Bits) - 1):Bits>>;
term(string, _) -> [rand:uniform(256) - 1 || _ <- lists:seq(1, rand:uniform(300))];
term(long_string, _) ->
    %% Longer than STRING_EXT allows (65535), so Erlang writes a LIST_EXT of small ints.
    [rand:uniform(256) - 1 || _ <- lists:seq(1, 65536 + rand:uniform(2000))];
term(list, Depth) -> [term(any, Depth - 1) || _ <- lists:seq(1, length_small())];
term(improper_list, Depth) ->
    Tail = term(pick_tail_kind(), Depth - 1),
    lists:foldl(fun(E, Acc) -> [E | Acc] end, Tail,
                [term(any, Depth - 1) || _ <- lists:seq(1, rand:uniform(5))]);
term(tuple, Depth) -> list_to_tuple([term(any, Depth - 1) || _ <- lists:seq(1, length_small())]);
term(big_tuple, _) ->
    list_to_tuple([term(any, 0) || _ <- lists:seq(1, 256 + rand:uniform(200))]);
term(map, Depth) -> map(length_small(), Depth);
term(big_map, Depth) -> map(33 + rand:uniform(60), min(Depth, 1));
term(pid, _) -> pick([self(), spawn(fun() -> ok end), foreign_pid()]);
term(ref, _) -> pick([make_ref(), foreign_ref(), foreign_ref()]);
term(port, _) -> pick([local_port(), foreign_port(), foreign_v4_port()]);
term(fun_closure, Depth) -> closure(Depth);
term(fun_export, _) -> pick([fun lists:sort/1, fun erlang:abs/1, fun ?MODULE:term/2]).

%% `N` terms from seed `Seed`, each of a random kind.
-spec terms(integer(), non_neg_integer()) -> [term()].
terms(Seed, N) ->
    seed(Seed),
    [term() || _ <- lists:seq(1, N)].

%% A pid of node 'a@b' with a creation that only NEW_PID_EXT can carry.
-spec foreign_pid() -> pid().
foreign_pid() ->
    foreign_pid('a@b', rand:uniform(1 bsl 15) - 1, rand:uniform(8) - 1, 16#12345678).

-spec foreign_pid(atom(), non_neg_integer(), non_neg_integer(), non_neg_integer()) -> pid().
foreign_pid(Node, Id, Serial, Creation) ->
    binary_to_term(<<131, 88, (node_atom(Node))/binary, Id:32, Serial:32, Creation:32>>).

%% A NEWER_REFERENCE_EXT reference of node 'a@b'.
-spec foreign_ref() -> reference().
foreign_ref() ->
    Ids = [rand:uniform(1 bsl 18) - 1 | [rand:uniform(1 bsl 32) - 1 || _ <- lists:seq(1, 2)]],
    foreign_ref('a@b', 16#12345678, Ids).

-spec foreign_ref(atom(), non_neg_integer(), [non_neg_integer()]) -> reference().
foreign_ref(Node, Creation, Ids) ->
    binary_to_term(<<131, 90, (length(Ids)):16, (node_atom(Node))/binary, Creation:32,
                     (<< <<Id:32>> || Id <- Ids >>)/binary>>).

%% A NEW_PORT_EXT port of node 'a@b'.
-spec foreign_port() -> port().
foreign_port() ->
    foreign_port('a@b', rand:uniform(1 bsl 28) - 1, 16#12345678).

%% A V4_PORT_EXT port of node 'a@b' whose id needs 64 bits.
-spec foreign_v4_port() -> port().
foreign_v4_port() ->
    foreign_port('a@b', (1 bsl 32) + rand:uniform(1 bsl 40), 16#12345678).

-spec foreign_port(atom(), non_neg_integer(), non_neg_integer()) -> port().
foreign_port(Node, Id, Creation) when Id < 1 bsl 32 ->
    binary_to_term(<<131, 89, (node_atom(Node))/binary, Id:32, Creation:32>>);
foreign_port(Node, Id, Creation) ->
    binary_to_term(<<131, 120, (node_atom(Node))/binary, Id:64, Creation:32>>).

%% The Python equivalence class of a map key: two keys with the same class collide in
%% a Python dict.
-spec py_key(term()) -> term().
py_key(true) -> {num, 1};
py_key(false) -> {num, 0};
py_key(undefined) -> none;
py_key(A) when is_atom(A) -> {str, atom_to_binary(A, utf8)};
py_key(I) when is_integer(I) -> {num, I};
py_key(F) when is_float(F), F == trunc(F) -> {num, trunc(F)};
py_key(F) when is_float(F) -> {float, F};
py_key(B) when is_binary(B) ->
    case unicode:characters_to_binary(B, utf8, utf8) of
        B -> {str, B};
        _ -> {bytes, B}
    end;
py_key(T) when is_tuple(T) -> {tuple, [py_key(E) || E <- tuple_to_list(T)]};
py_key(T) when is_pid(T); is_reference(T); is_port(T) -> {opaque, T}.

%% Internal.

pick(L) -> lists:nth(rand:uniform(length(L)), L).

pick_kind(Depth) when Depth =< 0 ->
    pick([small_int, neg_int, int32, bignum, float, atom, atom, binary, bitstring, pid, ref,
          port, fun_export]);
pick_kind(_) ->
    %% Weighted: scalars often, containers often enough to nest, the costly kinds rarely.
    case rand:uniform(100) of
        N when N =< 60 -> pick_kind(0);
        N when N =< 66 -> string;
        N when N =< 76 -> list;
        N when N =< 80 -> improper_list;
        N when N =< 88 -> tuple;
        N when N =< 96 -> map;
        97 -> big_tuple;
        98 -> big_map;
        _ -> fun_closure
    end.

pick_tail_kind() ->
    pick([small_int, atom, binary, float, pid, tuple, map]).

length_small() ->
    case rand:uniform(10) of
        1 -> 0;
        N when N =< 8 -> rand:uniform(4);
        _ -> rand:uniform(20)
    end.

bignum(Bytes) ->
    %% Magnitude of exactly `Bytes` bytes, at least 2^27 so it is not a small integer.
    Mag0 = binary:decode_unsigned(rand:bytes(Bytes)) bor (1 bsl (8 * Bytes - 1)),
    Mag = max(Mag0, (1 bsl 31) + rand:uniform(1000)),
    pick([Mag, -Mag]).

float() ->
    case rand:uniform(6) of
        1 -> pick([0.0, -0.0, 1.0, -1.0, 1.0e308, -1.0e308, 5.0e-324, -5.0e-324, 0.5,
                   1.5, 2.2250738585072014e-308, 1.7976931348623157e308, 3.0, 1.0e16]);
        2 -> (rand:uniform() - 0.5) * 1.0e6;
        3 -> float(rand:uniform(1 bsl 20) - (1 bsl 19));
        _ -> random_bits_float()
    end.

random_bits_float() ->
    <<Bits:64>> = rand:bytes(8),
    case <<Bits:64>> of
        <<F/float>> -> F;
        _ -> random_bits_float() % NaN or infinity: Erlang has neither.
    end.

atom() ->
    case rand:uniform(12) of
        1 -> '';
        2 -> pick([true, false, undefined, ok, error, nil]);
        3 -> list_to_atom([$a + rand:uniform(26) - 1 || _ <- lists:seq(1, 255)]);
        4 -> list_to_atom([pick([16#e9, 16#ff, 16#c0, 16#df]) || _ <- lists:seq(1, rand:uniform(10))]);
        5 -> list_to_atom([code_point() || _ <- lists:seq(1, rand:uniform(255))]);
        6 -> list_to_atom([code_point() || _ <- lists:seq(1, rand:uniform(8))]);
        7 -> list_to_atom([rand:uniform(255) || _ <- lists:seq(1, rand:uniform(12))]);
        _ -> list_to_atom([$a + rand:uniform(26) - 1 || _ <- lists:seq(1, rand:uniform(12))])
    end.

code_point() ->
    case rand:uniform(4) of
        1 -> rand:uniform(16#7f);
        2 -> 16#80 + rand:uniform(16#7ff - 16#80);
        3 -> pick([16#20ac, 16#4e2d, 16#fffd, 16#3b1]) + rand:uniform(50);
        4 -> 16#10000 + rand:uniform(16#10000)
    end.

binary() ->
    case rand:uniform(8) of
        1 -> <<>>;
        2 -> unicode:characters_to_binary([code_point() || _ <- lists:seq(1, rand:uniform(40))]);
        3 -> list_to_binary([$a + rand:uniform(26) - 1 || _ <- lists:seq(1, rand:uniform(20))]);
        4 -> rand:bytes(rand:uniform(pick([100, 2000])));
        5 -> pick([<<"a">>, <<"ok">>, <<"undefined">>, <<255>>, <<16#ed, 16#a0, 16#80>>]);
        _ -> rand:bytes(rand:uniform(16))
    end.

map(N, Depth) ->
    Keys = keys(N, Depth, #{}, []),
    maps:from_list([{K, term(any, Depth - 1)} || K <- Keys]).

keys(0, _, _, Acc) ->
    Acc;
keys(N, Depth, Seen, Acc) ->
    K = key(Depth),
    PK = py_key(K),
    case maps:is_key(PK, Seen) of
        true -> keys(N - 1, Depth, Seen, Acc);
        false -> keys(N - 1, Depth, Seen#{PK => true}, [K | Acc])
    end.

key(Depth) ->
    Kind = pick([small_int, neg_int, int32, bignum, float, atom, atom, binary, binary, pid,
                 ref, port, tuple]),
    case Kind of
        tuple when Depth > 1 -> list_to_tuple([key(Depth - 1) || _ <- lists:seq(1, rand:uniform(3))]);
        tuple -> {term(atom, 0), term(small_int, 0)};
        binary -> pick([binary(), list_to_binary([$a + rand:uniform(26) - 1])]);
        _ -> term(Kind, 0)
    end.

closure(Depth) ->
    X = term(any, max(Depth - 1, 0)),
    Y = rand:uniform(1000),
    pick([fun() -> X end,
          fun(A) -> {A, X, Y} end,
          fun(A, B) -> A + B + Y end,
          fun() -> ok end]).

local_port() ->
    case erlang:ports() of
        [] -> foreign_port();
        Ports -> pick(Ports)
    end.

node_atom(Node) ->
    Bin = atom_to_binary(Node, utf8),
    <<119, (byte_size(Bin)), Bin/binary>>.
