%% The exact textual form of a term that the C++ golden tests also produce.
%%
%% No spaces anywhere. Integers `i+hex`/`i-hex`; floats `f` + the 16 hex digits of the
%% IEEE-754 pattern; atoms `a` + hex of the UTF-8 name; binaries `b` + hex; bitstrings
%% `B<bits in last byte>:hex`; lists `[a,b]`, `[a|t]`; tuples `{a,b}`; maps `#{k=>v}` sorted
%% bytewise by the dump of the key; pids `P(node,id,serial,creation)`; ports
%% `O(node,id,creation)`; references `R(node,creation,id1.id2...)`; funs `F` + hex of
%% their encoding without the leading 131. Pid, port and reference fields are read from
%% the term's own `term_to_binary` bytes, so they are what travels on the wire.
-module(erpy_term_dump).

-export([dump/1, hex/1]).

%% API.

-spec dump(term()) -> binary().
dump(T) ->
    iolist_to_binary(d(T)).

-spec hex(binary()) -> binary().
hex(Bin) ->
    << <<(hex_digit(N))>> || <<N:4>> <= Bin >>.

%% Internal.

d(I) when is_integer(I), I >= 0 -> ["i+", int_hex(I)];
d(I) when is_integer(I) -> ["i-", int_hex(-I)];
d(F) when is_float(F) ->
    <<Bits:64>> = <<F/float>>,
    [$f, hex(<<Bits:64>>)];
d(A) when is_atom(A) -> [$a, hex(atom_to_binary(A, utf8))];
d(B) when is_binary(B) -> [$b, hex(B)];
d(B) when is_bitstring(B) ->
    Used = bit_size(B) rem 8,
    Padded = <<B/bitstring, 0:(8 - Used)>>,
    [$B, integer_to_list(Used), $:, hex(Padded)];
d([]) -> "[]";
d(L) when is_list(L) -> [$[, list_items(L), $]];
d(T) when is_tuple(T) -> [${, join([d(E) || E <- tuple_to_list(T)]), $}];
d(M) when is_map(M) ->
    Entries = lists:sort([{dump(K), d(V)} || {K, V} <- maps:to_list(M)]),
    ["#{", join([[K, "=>", V] || {K, V} <- Entries]), $}];
d(P) when is_pid(P) ->
    {Node, <<Id:32, Serial:32, Creation:32>>} = wire(P, 88),
    ["P(", Node, $,, integer_to_list(Id), $,, integer_to_list(Serial), $,,
     integer_to_list(Creation), $)];
d(P) when is_port(P) ->
    {Node, Id, Creation} =
        case term_to_binary(P, [{minor_version, 2}]) of
            <<131, 120, _/binary>> ->
                {N, <<I:64, C:32>>} = wire(P, 120),
                {N, I, C};
            _ ->
                {N, <<I:32, C:32>>} = wire(P, 89),
                {N, I, C}
        end,
    ["O(", Node, $,, integer_to_list(Id), $,, integer_to_list(Creation), $)];
d(R) when is_reference(R) ->
    <<131, 90, Len:16, Rest0/binary>> = term_to_binary(R, [{minor_version, 2}]),
    {Node, <<Creation:32, IdBytes/binary>>} = node_atom(Rest0),
    Len = byte_size(IdBytes) div 4,
    Ids = [integer_to_list(Id) || <<Id:32>> <= IdBytes],
    ["R(", Node, $,, integer_to_list(Creation), $,, lists:join($., Ids), $)];
d(F) when is_function(F) ->
    <<131, Rest/binary>> = term_to_binary(F, [{minor_version, 2}]),
    [$F, hex(Rest)].

list_items([H | T]) when is_list(T) ->
    case T of
        [] -> d(H);
        _ -> [d(H), $, | list_items(T)]
    end;
list_items([H | T]) ->
    [d(H), $|, d(T)].

join(Items) -> lists:join($,, Items).

%% The node atom (as its dump) and the bytes after it, for a pid or port encoded with `Tag`.
wire(T, Tag) ->
    <<131, Tag, Rest/binary>> = term_to_binary(T, [{minor_version, 2}]),
    node_atom(Rest).

node_atom(<<119, Len, Name:Len/binary, Rest/binary>>) -> {[$a, hex(Name)], Rest};
node_atom(<<118, Len:16, Name:Len/binary, Rest/binary>>) -> {[$a, hex(Name)], Rest};
node_atom(<<115, Len, Name:Len/binary, Rest/binary>>) -> {[$a, hex(latin1_utf8(Name))], Rest};
node_atom(<<100, Len:16, Name:Len/binary, Rest/binary>>) -> {[$a, hex(latin1_utf8(Name))], Rest}.

latin1_utf8(Bin) -> unicode:characters_to_binary(Bin, latin1, utf8).

int_hex(I) -> string:lowercase(integer_to_list(I, 16)).

hex_digit(N) when N < 10 -> $0 + N;
hex_digit(N) -> $a + N - 10.
