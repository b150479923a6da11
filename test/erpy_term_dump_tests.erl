%% The dump format the C++ golden tests compare against, by example.
-module(erpy_term_dump_tests).

-include_lib("eunit/include/eunit.hrl").

d(T) -> binary_to_list(erpy_term_dump:dump(T)).

integers_test() ->
    ?assertEqual("i+0", d(0)),
    ?assertEqual("i-1f", d(-31)),
    ?assertEqual("i+ff", d(255)),
    ?assertEqual("i+100000000000000000000", d(1 bsl 80)).

floats_test() ->
    ?assertEqual("f0000000000000000", d(0.0)),
    ?assertEqual("f8000000000000000", d(-0.0)),
    ?assertEqual("f3ff0000000000000", d(1.0)),
    ?assertEqual("f0000000000000001", d(5.0e-324)).

atoms_test() ->
    ?assertEqual("a", d('')),
    ?assertEqual("a6f6b", d(ok)),
    ?assertEqual("ac3a9", d('\x{e9}')),
    ?assertEqual("ae4b8ad", d(list_to_atom([16#4e2d]))).

binaries_test() ->
    ?assertEqual("b", d(<<>>)),
    ?assertEqual("b00ff", d(<<0, 255>>)),
    ?assertEqual("B1:80", d(<<1:1>>)),
    ?assertEqual("B3:ffe0", d(<<255, 7:3>>)).

lists_test() ->
    ?assertEqual("[]", d([])),
    ?assertEqual("[i+61,i+62]", d("ab")),
    ?assertEqual("[i+1,[]|a78]", d([1, [] | x])),
    ?assertEqual("[[i+1]|b]", d([[1] | <<>>])).

tuples_and_maps_test() ->
    ?assertEqual("{}", d({})),
    ?assertEqual("{i+1,{}}", d({1, {}})),
    ?assertEqual("#{}", d(#{})),
    %% Sorted by the key's dump: "a61" < "b61" < "i+1".
    ?assertEqual("#{a61=>i+1,b61=>i+2,i+1=>#{}}", d(#{<<"a">> => 2, 1 => #{}, a => 1})).

opaque_test() ->
    Pid = erpy_term_gen:foreign_pid('a@b', 1, 2, 16#12345678),
    ?assertEqual("P(a614062,1,2,305419896)", d(Pid)),
    Ref = erpy_term_gen:foreign_ref('a@b', 7, [1, 2, 3]),
    ?assertEqual("R(a614062,7,1.2.3)", d(Ref)),
    ?assertEqual("O(a614062,77,9)", d(erpy_term_gen:foreign_port('a@b', 77, 9))),
    ?assertEqual("O(a614062,4294967296,9)", d(erpy_term_gen:foreign_port('a@b', 1 bsl 32, 9))),
    F = fun lists:sort/1,
    <<131, Rest/binary>> = term_to_binary(F, [{minor_version, 2}]),
    ?assertEqual("F" ++ binary_to_list(erpy_term_dump:hex(Rest)), d(F)),
    ?assertMatch("F70" ++ _, d(fun() -> Pid end)).
