#!/usr/bin/env escript
%%! -noshell
%% Writes the golden cases of the C++ tests, produced by this VM's term_to_binary.
%%
%% Usage: gen_golden.escript OUTFILE [--corpus DIR]
%%
%% OUTFILE gets one case per line, TAB-separated: name, lowercase hex of the ETF bytes
%% (with the leading 131), the dump of the term (see erpy_term_dump) and `canonical` or
%% `noncanonical`. `canonical` bytes come from term_to_binary(T, [{minor_version, 2}]) and
%% must re-encode to themselves; `noncanonical` ones (old minor versions, compressed,
%% hand-made old tags) must only decode to the same dump. With --corpus, every case no
%% larger than 4 KiB is also written to DIR as a seed for the fuzzers.
-mode(compile).

main(Args) ->
    {Out, Corpus} = case Args of
        [O] -> {O, undefined};
        [O, "--corpus", D] -> {O, D};
        _ -> usage()
    end,
    load_helpers(),
    erpy_term_gen:seed(20240503),
    Cases = lists:flatmap(fun variants/1, named_terms()) ++ old_forms(),
    check_unique([N || {N, _, _, _} <- Cases]),
    ok = filelib:ensure_dir(Out),
    Lines = [[Name, $\t, erpy_term_dump:hex(Bytes), $\t, Dump, $\t, atom_to_list(Kind), $\n]
             || {Name, Bytes, Dump, Kind} <- Cases],
    ok = file:write_file(Out, Lines),
    write_corpus(Corpus, Cases),
    io:format("gen_golden: ~b cases in ~s~n", [length(Cases), Out]).

usage() ->
    io:format(standard_error, "usage: gen_golden.escript OUTFILE [--corpus DIR]~n", []),
    halt(2).

load_helpers() ->
    TestDir = filename:dirname(filename:dirname(filename:absname(escript:script_name()))),
    lists:foreach(
      fun(Mod) ->
          Src = filename:join(TestDir, atom_to_list(Mod) ++ ".erl"),
          {ok, Mod, Beam} = compile:file(Src, [binary, report, debug_info]),
          {module, Mod} = code:load_binary(Mod, Src, Beam)
      end, [erpy_term_gen, erpy_term_dump]).

%% The canonical case of each term, plus its old-form and compressed encodings where
%% they differ from the canonical bytes.
variants({Name, T}) ->
    Canonical = term_to_binary(T, [{minor_version, 2}]),
    Dump = erpy_term_dump:dump(T),
    Others = [{Name ++ "__" ++ Suffix, term_to_binary(T, Opts)}
              || {Suffix, Opts} <- [{"v0", [{minor_version, 0}]},
                                    {"v1", [{minor_version, 1}]},
                                    {"z", [compressed]},
                                    {"z9", [{compressed, 9}]}]],
    Distinct = lists:ukeysort(2, [{N, B} || {N, B} <- Others, B =/= Canonical]),
    [{Name, Canonical, Dump, canonical}
     | [{N, B, Dump, noncanonical} || {N, B} <- lists:keysort(1, Distinct)]].

named_terms() ->
    Self = self(),
    Ref = make_ref(),
    Port = hd(erlang:ports()),
    X = {captured, 42, <<"free">>},
    Closure = fun() -> X end,
    Closure2 = fun(A) -> {A, Self} end,
    Big = fun(Bytes) -> (1 bsl (8 * Bytes - 1)) + Bytes end,
    lists:append([
      [{"int_" ++ tag_int(I), I}
       || I <- [0, 1, 42, 255, 256, 1000, -1, -255, -256, -257, 16#7ffffff, -16#8000000,
                16#7fffffff, -16#80000000, 16#80000000, -16#80000001, 16#ffffffff,
                -16#ffffffff, 16#100000000, 16#7fffffffffffffff, -16#8000000000000000,
                16#ffffffffffffffff, 16#10000000000000000]],
      [{"bignum_pos_" ++ integer_to_list(B), Big(B)} || B <- [1, 2, 5, 8, 9, 16, 100, 255, 256, 257, 300]],
      [{"bignum_neg_" ++ integer_to_list(B), -Big(B)} || B <- [1, 2, 5, 8, 9, 16, 100, 255, 256, 257, 300]],
      [{"float_" ++ integer_to_list(N), F}
       || {N, F} <- enumerate([0.0, -0.0, 1.0, -1.0, 0.1, 1.5, 1.0e308, -1.0e308, 5.0e-324,
                               2.2250738585072014e-308, 1.7976931348623157e308, 3.141592653589793,
                               1.0e16, 123456789.0, -2.5e-10])],
      [{"atom_" ++ N, A}
       || {N, A} <- [{"ok", ok}, {"true", true}, {"false", false}, {"undefined", undefined},
                     {"nil", nil}, {"empty", ''}, {"latin1", 'caf\x{e9}'},
                     {"latin1_ff", list_to_atom([255, 254, 192])},
                     {"unicode", list_to_atom([16#4e2d, 16#6587])},
                     {"emoji", list_to_atom([16#1f600, $x])},
                     {"ascii_255", list_to_atom(lists:duplicate(255, $z))},
                     {"latin1_255", list_to_atom(lists:duplicate(255, 16#e9))},
                     {"unicode_255", list_to_atom(lists:duplicate(255, 16#20ac))},
                     {"node", 'a@b'}]],
      [{"binary_" ++ N, B}
       || {N, B} <- [{"empty", <<>>}, {"ascii", <<"hello">>}, {"utf8", <<"h\xc3\xa9llo \xe2\x82\xac">>},
                     {"non_utf8", <<255, 0, 128, 1>>}, {"surrogate", <<16#ed, 16#a0, 16#80>>},
                     {"zeros", <<0:800>>}, {"large_70000", binary:copy(<<"abcdefg">>, 10000)}]],
      [{"bits_" ++ integer_to_list(N), B}
       || {N, B} <- enumerate([<<1:1>>, <<0:7>>, <<255, 3:2>>, <<"abc", 5:3>>,
                               <<(binary:copy(<<7>>, 300))/binary, 1:1>>])],
      [{"string_" ++ N, S}
       || {N, S} <- [{"ascii", "hello"}, {"one", [0]}, {"bytes", lists:seq(0, 255)},
                     {"max", lists:duplicate(65535, $x)}]],
      [{"list_" ++ N, L}
       || {N, L} <- [{"nil", []}, {"ints", [1, 256, -1]}, {"mixed", [a, <<"b">>, 1.5, {c}]},
                     {"nested", [[], [[]], [[1, 2], [3]], "ab"]}, {"with_255", [255, 256]},
                     {"long_small_ints", lists:duplicate(65536, 7)},
                     {"long_ints", lists:seq(1, 70000)},
                     {"improper", [1, 2 | 3]}, {"improper_atom", [a | b]},
                     {"improper_string", [$a, $b | <<"c">>]}, {"improper_nil_head", [[] | x]}]],
      [{"tuple_" ++ N, T}
       || {N, T} <- [{"empty", {}}, {"one", {ok}}, {"pair", {ok, 1}},
                     {"255", list_to_tuple(lists:seq(1, 255))},
                     {"256", list_to_tuple(lists:seq(1, 256))},
                     {"1000", list_to_tuple([I * 1000 || I <- lists:seq(1, 1000)])},
                     {"nested", {{}, {{a}}, [{b, c}]}}]],
      [{"map_" ++ N, M}
       || {N, M} <- [{"empty", #{}}, {"small", #{a => 1, <<"b">> => 2.5, 3 => [x]}},
                     {"nested", #{m => #{n => #{}}, l => [#{}]}},
                     {"32", maps:from_list([{I, I * I} || I <- lists:seq(1, 32)])},
                     {"33", maps:from_list([{I, I * I} || I <- lists:seq(1, 33)])},
                     {"100", maps:from_list([{list_to_atom("k" ++ integer_to_list(I)), I}
                                             || I <- lists:seq(1, 100)])},
                     {"tuple_keys", #{{a, 1} => x, {b, <<"c">>} => y}},
                     {"opaque_keys", #{Self => pid, Ref => ref, Port => port}}]],
      [{"pid_local", Self}, {"ref_local", Ref}, {"port_local", Port},
       {"pid_foreign", erpy_term_gen:foreign_pid('a@b', 1, 2, 16#12345678)},
       {"pid_foreign_max", erpy_term_gen:foreign_pid('a@b', 16#7fff, 16#1fff, 16#ffffffff)},
       {"pid_foreign_unicode_node", erpy_term_gen:foreign_pid(list_to_atom([16#e9, $@, 16#4e2d]), 5, 0, 7)},
       {"ref_foreign", erpy_term_gen:foreign_ref('a@b', 16#12345678, [1, 2, 3])},
       {"ref_foreign_5", erpy_term_gen:foreign_ref('a@b', 16#12345678, [16#3ffff, 1, 2, 3, 4])},
       {"ref_foreign_1", erpy_term_gen:foreign_ref('a@b', 3, [9])},
       {"port_foreign", erpy_term_gen:foreign_port('a@b', 77, 16#12345678)},
       {"port_foreign_v4", erpy_term_gen:foreign_port('a@b', 16#123456789abcdef, 16#12345678)},
       {"fun_closure", Closure}, {"fun_closure_pid", Closure2},
       {"fun_export", fun lists:sort/1}, {"fun_export_unicode", fun erpy_term_gen:term/2},
       {"fun_in_list", [fun erlang:abs/1, Closure]}],
      [{"kind_" ++ atom_to_list(K) ++ "_" ++ integer_to_list(I), erpy_term_gen:term(K)}
       || K <- erpy_term_gen:kinds(), K =/= long_string, I <- [1, 2]],
      [{"random_" ++ integer_to_list(I), erpy_term_gen:term()} || I <- lists:seq(1, 150)]
    ]).

%% Forms this VM reads but no longer writes: hand-made bytes, kept when binary_to_term
%% accepts them (the dump is that of the decoded term).
old_forms() ->
    Node = <<100, 3:16, "a@b">>,
    Cases = [
      {"old_atom_ext", <<131, 100, 2:16, "ok">>},
      {"old_small_atom_ext", <<131, 115, 2, "ok">>},
      {"old_atom_ext_latin1", <<131, 100, 2:16, 16#e9, 16#ff>>},
      {"old_atom_utf8_long_tag", <<131, 118, 2:16, "ok">>},
      {"old_pid_ext", <<131, 103, Node/binary, 1:32, 2:32, 3>>},
      {"old_port_ext", <<131, 102, Node/binary, 5:32, 2>>},
      {"old_reference_ext", <<131, 101, Node/binary, 9:32, 1>>},
      {"old_new_reference_ext", <<131, 114, 3:16, Node/binary, 1, 1:32, 2:32, 3:32>>},
      {"old_new_pid_small_creation", <<131, 88, Node/binary, 1:32, 0:32, 3:32>>},
      {"old_float_ext", <<131, 99, (iolist_to_binary(io_lib:format("~.20e", [1.5])))/binary,
                          0:((31 - length(io_lib:format("~.20e", [1.5]))) * 8)>>},
      {"old_int_ext_small", <<131, 98, 5:32>>},
      {"old_small_big_small_value", <<131, 110, 1, 0, 5>>},
      {"old_large_big", <<131, 111, 2:32, 1, 1, 1>>},
      {"old_list_of_small_ints", <<131, 108, 2:32, 97, 1, 97, 2, 106>>},
      {"old_binary_bits_8", <<131, 77, 1:32, 8, 255>>},
      {"old_compressed_small", compress_anyway(<<131, 107, 3:16, "abc">>)},
      {"old_map_unsorted", <<131, 116, 2:32, 100, 1:16, "b", 97, 2, 100, 1:16, "a", 97, 1>>}
    ],
    lists:flatmap(
      fun({Name, Bytes}) ->
          try binary_to_term(Bytes) of
              T -> [{Name, Bytes, erpy_term_dump:dump(T), noncanonical}]
          catch error:badarg ->
              io:format(standard_error, "gen_golden: skipping ~s (not accepted here)~n", [Name]),
              []
          end
      end, Cases).

%% A COMPRESSED term (tag 80) even when compression does not pay.
compress_anyway(<<131, Rest/binary>>) ->
    <<131, 80, (byte_size(Rest)):32, (zlib:compress(Rest))/binary>>.

write_corpus(undefined, _) ->
    ok;
write_corpus(Dir, Cases) ->
    ok = filelib:ensure_dir(filename:join(Dir, "x")),
    [ok = file:write_file(filename:join(Dir, "golden_" ++ Name), Bytes)
     || {Name, Bytes, _, _} <- Cases, byte_size(Bytes) =< 4096],
    ok.

check_unique(Names) ->
    case Names -- lists:usort(Names) of
        [] -> ok;
        Dups -> error({duplicate_case_names, Dups})
    end.

tag_int(I) when I < 0 -> "m" ++ integer_to_list(-I, 16);
tag_int(I) -> integer_to_list(I, 16).

enumerate(L) -> lists:zip(lists:seq(1, length(L)), L).
