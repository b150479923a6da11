%% Length-prefixed frames on a port opened in stream mode, framed here instead of by the
%% port driver.
%%
%% With `{packet, 4}` the driver reads a frame's 4-byte length and buffers that many bytes
%% before erpy sees any of it: Python code that writes its own header to the protocol fd
%% (a claim of up to 4 GiB) makes the VM allocate and fill that buffer. Here a frame's
%% length is checked against the reader's limit as soon as its header arrives, and a frame
%% over it is refused before anything of its body is kept. Both port pools use it: erpy's
%% own workers (4-byte headers) and `mode => program` pools (1, 2 or 4).
%%
%% A frame that arrives whole in one read is a sub-binary of what the port delivered (no
%% copy); one that spans reads is joined once, when its last byte arrives.
-module(erpy_frame).

-export([reader/2, input/2, write/3, write_all/3]).

-record(reader, {
    head :: 1 | 2 | 4,
    max :: non_neg_integer(),
    %% Bytes of a header not yet complete (or of frames not yet split).
    buf = <<>> :: binary(),
    %% A frame's body being collected: its length, the bytes so far, and the parts.
    need = 0 :: non_neg_integer(),
    got = 0 :: non_neg_integer(),
    parts = [] :: [binary()]
}).

-opaque reader() :: #reader{}.
-export_type([reader/0]).

%% A reader of frames with `Head`-byte big-endian lengths of at most `Max` bytes.
-spec reader(1 | 2 | 4, non_neg_integer()) -> reader().
reader(Head, Max) when Head =:= 1; Head =:= 2; Head =:= 4 ->
    #reader{head = Head, max = Max}.

%% The frames completed by `Data` (in order), or the first frame's claim over the limit.
-spec input(binary(), reader()) ->
    {ok, [binary()], reader()} | {error, {frame_too_large, non_neg_integer(), non_neg_integer()}}.
input(Data, #reader{need = 0, buf = <<>>} = R) ->
    split(Data, R, []);
input(Data, #reader{need = 0, buf = Buf} = R) ->
    split(<<Buf/binary, Data/binary>>, R#reader{buf = <<>>}, []);
input(Data, #reader{need = Need, got = Got, parts = Parts} = R) ->
    case Got + byte_size(Data) of
        Got1 when Got1 < Need ->
            {ok, [], R#reader{got = Got1, parts = [Data | Parts]}};
        _ ->
            <<Frame:Need/binary, Rest/binary>> = iolist_to_binary(lists:reverse(Parts, [Data])),
            split(Rest, R#reader{need = 0, got = 0, parts = []}, [Frame])
    end.

split(Bin, #reader{head = H, max = Max} = R, Acc) ->
    case Bin of
        <<Len:H/unit:8, _/binary>> when Len > Max ->
            {error, {frame_too_large, Len, Max}};
        <<Len:H/unit:8, Frame:Len/binary, Rest/binary>> ->
            split(Rest, R, [Frame | Acc]);
        <<Len:H/unit:8, Body/binary>> ->
            {ok, lists:reverse(Acc), R#reader{need = Len, got = byte_size(Body), parts = [Body]}};
        _ ->
            {ok, lists:reverse(Acc), R#reader{buf = Bin}}
    end.

%% Writes `Data` as one frame. A port already closed is not an error here: its owner
%% learns of the exit and fails what was pending.
-spec write(port(), 1 | 2 | 4, iodata()) -> ok | {error, closed | {frame_too_large, non_neg_integer()}}.
write(Port, Head, Data) ->
    write_all(Port, Head, [Data]).

%% Writes each of `Frames` as a frame, all with one port command (one system call where
%% the pipe takes them). A frame too large for the header is refused and left out; the
%% others are written.
-spec write_all(port(), 1 | 2 | 4, [iodata()]) -> ok | {error, closed | {frame_too_large, non_neg_integer()}}.
write_all(Port, Head, Frames) ->
    Limit = 1 bsl (8 * Head),
    {Data, Refused} = lists:foldr(fun(F, {D, R}) ->
                                          case iolist_size(F) of
                                              Size when Size >= Limit -> {D, {frame_too_large, Size}};
                                              %% Flat: the header, then the frame's parts.
                                              Size when is_list(F) -> {[<<Size:Head/unit:8>> | F ++ D], R};
                                              Size -> {[<<Size:Head/unit:8>>, F | D], R}
                                          end
                                  end, {[], none}, Frames),
    Written = Data =:= [] orelse
        try port_command(Port, Data)
        catch error:badarg -> closed
        end,
    case {Written, Refused} of
        {closed, _} -> {error, closed};
        {true, none} -> ok;
        {true, _} -> {error, Refused}
    end.
