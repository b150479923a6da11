%% erpy_policy:decode/2 finds every fun in what Python sends, however its bytes look:
%% the fast scan for fun tags must never let one through unchecked.
-module(erpy_policy_tests).

-include_lib("eunit/include/eunit.hrl").

ctx(Opts) ->
    erpy_policy:request_ctx(erpy_policy:new(t, Opts#{allowed => []}), self(), nothing).

ctx() ->
    ctx(#{}).

decode(Bin) ->
    erpy_policy:decode(ctx(), Bin).

plain_terms_pass_test() ->
    T = [#{<<"id">> => I, <<"name">> => <<"item">>, <<"score">> => 1.5} || I <- lists:seq(1, 10000)],
    ?assertEqual({ok, {ok, 1, T}}, erpy_policy:decode(ctx(), term_to_binary({ok, 1, T}))),
    %% Many bytes that start a fun's tag (q = 113, p = 112), none of them a fun.
    Text = binary:copy(<<"pq qp pp qq p q ">>, 1000),
    ?assertEqual({ok, {ok, 1, Text}}, erpy_policy:decode(ctx(), term_to_binary({ok, 1, Text}))).

export_fun_refused_test() ->
    ?assertEqual({error, {not_allowed, {'fun', os, cmd, 1}}},
                 decode(term_to_binary({ok, 1, fun os:cmd/1}))).

local_fun_refused_test() ->
    ?assertMatch({error, {not_allowed, {'fun', ?MODULE, local, 1}}},
                 decode(term_to_binary({ok, 1, fun(X) -> X end}))).

%% Past the lone tag bytes the fast scan looks at, the fun is still found, whichever
%% tag byte is frequent.
fun_after_many_tag_bytes_test() ->
    [begin
         Noise = binary:copy(Bytes, 2000),
         ?assertEqual({error, {not_allowed, {'fun', os, cmd, 1}}},
                      decode(term_to_binary({ok, 1, [Noise, fun os:cmd/1]}))),
         ?assertMatch({error, {not_allowed, {'fun', ?MODULE, local, 1}}},
                      decode(term_to_binary({ok, 1, [Noise, fun(X) -> X end]}))),
         ?assertEqual({ok, {ok, 1, Noise}}, decode(term_to_binary({ok, 1, Noise})))
     end || Bytes <- [<<"qp">>, <<"q.">>, <<"p.">>]].

%% A compressed term's bytes hold no tags to find: it is walked.
compressed_fun_refused_test() ->
    Padding = binary:copy(<<0>>, 10000),
    Bin = term_to_binary({ok, 1, [Padding, fun os:cmd/1]}, [compressed]),
    ?assertMatch(<<131, 80, _/binary>>, Bin),
    ?assertEqual({error, {not_allowed, {'fun', os, cmd, 1}}}, decode(Bin)).

%% binary_to_term checks a local fun's size only against the bytes after it, so in a
%% term over 16 MiB its first byte need not be 0.
fun_size_high_byte_test() ->
    Padding = binary:copy(<<1>>, 17 bsl 20),
    Bin = term_to_binary({ok, 1, [fun(X) -> X end, Padding]}),
    {At, 2} = binary:match(Bin, <<112, 0>>),
    <<Pre:At/binary, 112, Size:32, Rest/binary>> = Bin,
    Forged = <<Pre/binary, 112, (Size + 16#01000000):32, Rest/binary>>,
    ?assertMatch({ok, 1, [F, _]} when is_function(F), binary_to_term(Forged)),
    ?assertMatch({error, {not_allowed, {'fun', ?MODULE, local, 1}}},
                 erpy_policy:decode(ctx(#{max_message_size => 32 bsl 20}), Forged)).

export_fun_allowed_test() ->
    Ctx = erpy_policy:request_ctx(erpy_policy:new(t, #{allowed => [lists]}), self(), nothing),
    ?assertEqual({ok, {ok, 1, fun lists:sort/1}},
                 erpy_policy:decode(Ctx, term_to_binary({ok, 1, fun lists:sort/1}))).

%% Small answers (up to 256 bytes) are scanned byte by byte, larger ones with
%% binary:match: a fun is found at every offset in both, and tag bytes that start no fun
%% (ids, integers, text) let the term through in both.
small_and_large_scans_agree_test() ->
    Funs = [fun os:cmd/1, fun(X) -> X end],
    [begin
         Pad = binary:copy(<<"q">>, N),
         [?assertMatch({error, {not_allowed, _}}, decode(term_to_binary({ok, Id, [Pad, F]})))
          || F <- Funs],
         Plain = {ok, Id, [Pad, 112, 113, <<"pq">>, p, q]},
         ?assertEqual({ok, Plain}, decode(term_to_binary(Plain)))
     end || N <- lists:seq(0, 300, 7), Id <- [1, 112, 113, 16#70717071]].
