%% erpy_frame: frames split from a stream however its reads cut it, and a length over the
%% limit refused as soon as its header is complete.
-module(erpy_frame_tests).
-include_lib("eunit/include/eunit.hrl").

frame(H, Bin) -> <<(byte_size(Bin)):H/unit:8, Bin/binary>>.

%% Feeds `Stream` to a reader in pieces cut at `Cuts`; returns every frame read.
feed(Reader, Stream, Cuts) ->
    feed(Reader, Stream, lists:usort(Cuts), 0, []).

feed(R, Stream, [], At, Acc) ->
    {ok, Frames, _} = erpy_frame:input(binary:part(Stream, At, byte_size(Stream) - At), R),
    lists:append(lists:reverse([Frames | Acc]));
feed(R, Stream, [Cut | Cuts], At, Acc) ->
    {ok, Frames, R1} = erpy_frame:input(binary:part(Stream, At, Cut - At), R),
    feed(R1, Stream, Cuts, Cut, [Frames | Acc]).

any_cuts_test_() ->
    [fun() ->
             rand:seed(exsss, {H, N, 7}),
             Bodies = [crypto:strong_rand_bytes(rand:uniform(300) - 1) || _ <- lists:seq(1, N)],
             Stream = iolist_to_binary([frame(H, B) || B <- Bodies]),
             Cuts = [rand:uniform(byte_size(Stream) - 1) || _ <- lists:seq(1, rand:uniform(40))],
             ?assertEqual(Bodies, feed(erpy_frame:reader(H, 1000), Stream, Cuts))
     end || H <- [2, 4], N <- [1, 5, 50]].

every_single_byte_cut_test() ->
    Bodies = [<<"a">>, <<>>, <<"hello">>, binary:copy(<<"x">>, 200)],
    Stream = iolist_to_binary([frame(4, B) || B <- Bodies]),
    ?assertEqual(Bodies, feed(erpy_frame:reader(4, 1000), Stream, lists:seq(1, byte_size(Stream) - 1))).

one_byte_headers_test() ->
    ?assertMatch({ok, [<<"ab">>, <<"c">>], _}, erpy_frame:input(<<2, "ab", 1, "c">>, erpy_frame:reader(1, 255))).

claim_over_limit_refused_at_its_header_test() ->
    R = erpy_frame:reader(4, 100),
    ?assertEqual({error, {frame_too_large, 16#FFFFFFF0, 100}}, erpy_frame:input(<<16#FFFFFFF0:32>>, R)),
    %% After frames that fit, and with the header cut in two.
    {ok, [<<"ok">>], R1} = erpy_frame:input(<<2:32, "ok", 0, 0>>, R),
    ?assertEqual({error, {frame_too_large, 101, 100}}, erpy_frame:input(<<0, 101>>, R1)),
    %% The limit itself fits.
    ?assertMatch({ok, [_], _}, erpy_frame:input(frame(4, binary:copy(<<"z">>, 100)), R)).

write_refuses_what_the_header_cannot_say_test() ->
    Port = open_port({spawn, "cat"}, [stream, binary]),
    try
        ?assertEqual({error, {frame_too_large, 256}}, erpy_frame:write(Port, 1, binary:copy(<<1>>, 256))),
        ?assertEqual(ok, erpy_frame:write(Port, 2, [<<"he">>, <<"llo">>])),
        receive {Port, {data, D}} -> ?assertEqual(<<5:16, "hello">>, D) after 5000 -> error(no_echo) end
    after
        port_close(Port)
    end,
    ?assertEqual({error, closed}, erpy_frame:write(Port, 4, <<"x">>)).

%% Several frames in one port command: each gets its header, in order; one the header
%% cannot say is left out and reported, the others still go.
write_all_frames_each_test() ->
    Port = open_port({spawn, "cat"}, [stream, binary]),
    try
        ?assertEqual(ok, erpy_frame:write_all(Port, 2, [<<"ab">>, [<<"c">>, <<"de">>], <<>>])),
        ?assertEqual(ok, erpy_frame:write_all(Port, 2, [])),
        ?assertEqual({error, {frame_too_large, 256}},
                     erpy_frame:write_all(Port, 1, [binary:copy(<<1>>, 256), <<"x">>])),
        Want = <<2:16, "ab", 3:16, "cde", 0:16, 1:8, "x">>,
        ?assertEqual(Want, echoed(Port, byte_size(Want), <<>>))
    after
        port_close(Port)
    end,
    ?assertEqual({error, closed}, erpy_frame:write_all(Port, 4, [<<"x">>])).

echoed(_Port, Size, Acc) when byte_size(Acc) >= Size ->
    Acc;
echoed(Port, Size, Acc) ->
    receive {Port, {data, D}} -> echoed(Port, Size, <<Acc/binary, D/binary>>)
    after 5000 -> error({no_echo, Acc})
    end.
