%% erpy_etf_atoms finds the atoms a term would create, without creating them, in every
%% place the external term format can hold one.
-module(erpy_etf_atoms_tests).

-include_lib("eunit/include/eunit.hrl").

%% An external term naming atom `Name` (which must not exist) in `Where`.
with_atom(Name, Where) ->
    A = <<119, (byte_size(Name)), Name/binary>>,
    Body = case Where of
               top -> A;
               tuple -> <<104, 2, 97, 1, A/binary>>;
               list -> <<108, 2:32, 97, 1, A/binary, 106>>;
               tail -> <<108, 1:32, 97, 1, A/binary>>;
               map_key -> <<116, 1:32, A/binary, 97, 1>>;
               map_value -> <<116, 1:32, 97, 1, A/binary>>;
               pid_node -> <<88, A/binary, 1:32, 0:32, 0:32>>;
               ref_node -> <<90, 1:16, A/binary, 0:32, 1:32>>;
               export -> <<113, A/binary, 119, 2, "ok", 97, 1>>;
               old_atom -> <<100, (byte_size(Name)):16, Name/binary>>
           end,
    <<131, Body/binary>>.

fresh() ->
    iolist_to_binary(io_lib:format("erpy_etf_atoms_tests_~b", [erlang:unique_integer([positive])])).

unknown_everywhere_test_() ->
    [?_test(begin
                Name = fresh(),
                ?assertEqual({ok, [Name]}, erpy_etf_atoms:unknown(with_atom(Name, Where))),
                ?assertError(badarg, binary_to_existing_atom(Name, utf8))
            end)
     || Where <- [top, tuple, list, tail, map_key, map_value, pid_node, ref_node, export, old_atom]].

known_atoms_are_not_listed_test() ->
    ?assertEqual({ok, []}, erpy_etf_atoms:unknown(term_to_binary({ok, [error, #{a => self()}], make_ref(),
                                                                   fun lists:sort/1, <<"x">>, 1.5,
                                                                   1 bsl 300, "str"}))).

each_once_in_order_test() ->
    [A, B] = [fresh(), fresh()],
    Bin = <<131, 104, 3, 119, (byte_size(A)), A/binary, 119, (byte_size(B)), B/binary,
            119, (byte_size(A)), A/binary>>,
    ?assertEqual({ok, [A, B]}, erpy_etf_atoms:unknown(Bin)).

compressed_test() ->
    Name = fresh(),
    <<131, Plain/binary>> = with_atom(Name, list),
    Z = zlib:compress(Plain),
    ?assertEqual({ok, [Name]}, erpy_etf_atoms:unknown(<<131, 80, (byte_size(Plain)):32, Z/binary>>)),
    ?assertMatch({error, _}, erpy_etf_atoms:unknown(<<131, 80, 5:32, Z/binary>>)).

malformed_test_() ->
    [?_assertMatch({error, _}, erpy_etf_atoms:unknown(B))
     || B <- [<<>>, <<131>>, <<131, 104, 2, 97, 1>>, <<131, 200>>, <<1, 2, 3>>,
              <<131, 108, 255:32, 97, 1>>, <<131, 97, 1, 0>>]].
