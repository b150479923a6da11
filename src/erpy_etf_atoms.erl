%% The atoms an external term names that this VM does not have yet, found without
%% creating them. Used only when binary_to_term(_, [safe]) refused a term from Python,
%% to name the unknown atom in the error (or to count it against the pool's budget).
%% A reader of the term format's structure only: values are skipped, not built.
-module(erpy_etf_atoms).

-export([unknown/1]).

%% Unknown atoms (UTF-8), each once, in order of appearance.
-spec unknown(binary()) -> {ok, [binary()]} | {error, binary()}.
unknown(<<131, 80, Size:32, Z/binary>>) ->
    try zlib:uncompress(Z) of
        Bin when byte_size(Bin) =:= Size -> unknown_plain(Bin);
        _ -> {error, <<"compressed size does not match">>}
    catch error:_ -> {error, <<"bad compressed term">>}
    end;
unknown(<<131, Bin/binary>>) ->
    unknown_plain(Bin);
unknown(_) ->
    {error, <<"not an external term">>}.

unknown_plain(Bin) ->
    try terms(1, Bin, {[], #{}}) of
        {<<>>, {Atoms, _}} -> {ok, lists:reverse(Atoms)};
        {_, _} -> {error, <<"bytes after the term">>}
    catch throw:Why -> {error, Why};
          error:_ -> {error, <<"malformed term">>}
    end.

%% N terms from Bin: {Rest, UnknownAcc}.
terms(0, Bin, Acc) ->
    {Bin, Acc};
terms(N, Bin, Acc) ->
    {Rest, Acc1} = term(Bin, Acc),
    terms(N - 1, Rest, Acc1).

term(<<70, _:8/binary, R/binary>>, A) -> {R, A};                         % NEW_FLOAT
term(<<77, L:32, _, _:L/binary, R/binary>>, A) -> {R, A};                % BIT_BINARY
term(<<88, R/binary>>, A) -> skip(12, node(R, A));                       % NEW_PID
term(<<89, R/binary>>, A) -> skip(8, node(R, A));                        % NEW_PORT
term(<<90, L:16, R/binary>>, A) -> skip(4 + 4 * L, node(R, A));          % NEWER_REFERENCE
term(<<97, _, R/binary>>, A) -> {R, A};                                  % SMALL_INTEGER
term(<<98, _:32, R/binary>>, A) -> {R, A};                               % INTEGER
term(<<99, _:31/binary, R/binary>>, A) -> {R, A};                        % FLOAT
term(<<100, L:16, N:L/binary, R/binary>>, A) -> {R, atom(N, latin1, A)}; % ATOM
term(<<101, R/binary>>, A) -> skip(5, node(R, A));                       % REFERENCE
term(<<102, R/binary>>, A) -> skip(5, node(R, A));                       % PORT
term(<<103, R/binary>>, A) -> skip(9, node(R, A));                       % PID
term(<<104, N, R/binary>>, A) -> terms(N, R, A);                         % SMALL_TUPLE
term(<<105, N:32, R/binary>>, A) -> terms(N, R, A);                      % LARGE_TUPLE
term(<<106, R/binary>>, A) -> {R, A};                                    % NIL
term(<<107, L:16, _:L/binary, R/binary>>, A) -> {R, A};                  % STRING
term(<<108, N:32, R/binary>>, A) -> terms(N + 1, R, A);                  % LIST (+ tail)
term(<<109, L:32, _:L/binary, R/binary>>, A) -> {R, A};                  % BINARY
term(<<110, N, _, _:N/binary, R/binary>>, A) -> {R, A};                  % SMALL_BIG
term(<<111, N:32, _, _:N/binary, R/binary>>, A) -> {R, A};               % LARGE_BIG
term(<<112, _Size:32, _Arity, _:16/binary, _Index:32, Free:32, R/binary>>, A) ->
    %% NEW_FUN: module, old index, old uniq, pid, then the free variables.
    terms(4 + Free, R, A);
term(<<113, R/binary>>, A) -> terms(3, R, A);                            % EXPORT
term(<<114, L:16, R/binary>>, A) -> skip(1 + 4 * L, node(R, A));         % NEW_REFERENCE
term(<<115, L, N:L/binary, R/binary>>, A) -> {R, atom(N, latin1, A)};    % SMALL_ATOM
term(<<116, N:32, R/binary>>, A) -> terms(2 * N, R, A);                  % MAP
term(<<117, Free:32, R/binary>>, A) -> terms(4 + Free, R, A);            % FUN (old)
term(<<118, L:16, N:L/binary, R/binary>>, A) -> {R, atom(N, utf8, A)};   % ATOM_UTF8
term(<<119, L, N:L/binary, R/binary>>, A) -> {R, atom(N, utf8, A)};      % SMALL_ATOM_UTF8
term(<<120, R/binary>>, A) -> skip(12, node(R, A));                      % V4_PORT
term(<<Tag, _/binary>>, _A) -> throw(iolist_to_binary(io_lib:format("unexpected tag ~b", [Tag])));
term(<<>>, _A) -> throw(<<"truncated term">>).

node(Bin, A) -> term(Bin, A).

skip(N, {Bin, A}) ->
    <<_:N/binary, R/binary>> = Bin,
    {R, A}.

atom(Name, Enc, {List, Seen} = Acc) ->
    try binary_to_existing_atom(Name, Enc) of
        _ -> Acc
    catch error:badarg ->
        Utf8 = case Enc of
                   utf8 -> Name;
                   latin1 -> unicode:characters_to_binary(Name, latin1)
               end,
        case Seen of
            #{Utf8 := _} -> Acc;
            _ -> {[Utf8 | List], Seen#{Utf8 => true}}
        end
    end.
