%% The random term generator: kinds, repeatability and Python-safe map keys.
-module(erpy_term_gen_tests).

-include_lib("eunit/include/eunit.hrl").

seed_repeats_test() ->
    %% Funs and local pids aside, a seed gives the same terms.
    Strip = fun(Ts) -> [erpy_term_dump:dump(T) || T <- Ts, not has_local(T)] end,
    ?assertEqual(Strip(erpy_term_gen:terms(7, 200)), Strip(erpy_term_gen:terms(7, 200))).

kinds_test_() ->
    erpy_term_gen:seed(1),
    Checks = #{small_int => fun(T) -> is_integer(T) andalso T >= 0 andalso T < 256 end,
               neg_int => fun(T) -> is_integer(T) andalso T < 0 end,
               int32 => fun is_integer/1,
               bignum => fun(T) -> is_integer(T) andalso abs(T) >= 1 bsl 31 end,
               float => fun is_float/1,
               atom => fun is_atom/1,
               binary => fun is_binary/1,
               bitstring => fun(T) -> is_bitstring(T) andalso bit_size(T) rem 8 =/= 0 end,
               string => fun(T) -> is_list(T) andalso lists:all(fun(C) -> C < 256 end, T) end,
               long_string => fun(T) -> length(T) > 65535 end,
               list => fun is_list/1,
               improper_list => fun(T) -> is_list(T) andalso T =/= [] andalso not is_proper(T) end,
               tuple => fun is_tuple/1,
               big_tuple => fun(T) -> is_tuple(T) andalso tuple_size(T) > 255 end,
               map => fun is_map/1,
               big_map => fun(T) -> is_map(T) andalso map_size(T) > 32 end,
               pid => fun is_pid/1,
               ref => fun is_reference/1,
               port => fun is_port/1,
               fun_closure => fun is_function/1,
               fun_export => fun is_function/1},
    ?assertEqual(lists:sort(maps:keys(Checks)), lists:sort(erpy_term_gen:kinds())),
    [{atom_to_list(K), ?_assert(lists:all(maps:get(K, Checks),
                                          [erpy_term_gen:term(K) || _ <- lists:seq(1, 5)]))}
     || K <- erpy_term_gen:kinds()].

%% Every generated map keeps its size in Python: no two keys share a Python class.
map_keys_distinct_in_python_test() ->
    erpy_term_gen:seed(2),
    Maps = [erpy_term_gen:term(K) || K <- [map, big_map], _ <- lists:seq(1, 200)],
    [?assertEqual(map_size(M), length(lists:usort([erpy_term_gen:py_key(K) || K <- maps:keys(M)])))
     || M <- Maps].

py_key_classes_test() ->
    ?assertEqual(erpy_term_gen:py_key(a), erpy_term_gen:py_key(<<"a">>)),
    ?assertEqual(erpy_term_gen:py_key(true), erpy_term_gen:py_key(1)),
    ?assertEqual(erpy_term_gen:py_key(2.0), erpy_term_gen:py_key(2)),
    ?assertEqual(erpy_term_gen:py_key(-0.0), erpy_term_gen:py_key(0)),
    ?assertNotEqual(erpy_term_gen:py_key(<<255>>), erpy_term_gen:py_key(255)),
    ?assertEqual(none, erpy_term_gen:py_key(undefined)).

foreign_terms_test() ->
    Pid = erpy_term_gen:foreign_pid(),
    ?assertEqual('a@b', node(Pid)),
    ?assertMatch(<<131, 88, _/binary>>, term_to_binary(Pid, [{minor_version, 2}])),
    ?assertMatch(<<131, 90, _/binary>>, term_to_binary(erpy_term_gen:foreign_ref())),
    ?assertMatch(<<131, 89, _/binary>>, term_to_binary(erpy_term_gen:foreign_port())),
    ?assertMatch(<<131, 120, _/binary>>, term_to_binary(erpy_term_gen:foreign_v4_port())).

is_proper([]) -> true;
is_proper([_ | T]) -> is_proper(T);
is_proper(_) -> false.

has_local(T) when is_pid(T); is_port(T); is_reference(T); is_function(T) -> true;
has_local(T) when is_list(T) -> has_local_list(T);
has_local(T) when is_tuple(T) -> has_local(tuple_to_list(T));
has_local(T) when is_map(T) -> has_local(maps:to_list(T));
has_local(_) -> false.

has_local_list([H | T]) -> has_local(H) orelse has_local_list(T);
has_local_list([]) -> false;
has_local_list(T) -> has_local(T).
