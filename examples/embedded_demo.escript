#!/usr/bin/env escript
%%! -noshell +pc unicode
%% `make demo`, part three: the same requests in embedded mode (CPython inside this VM)
%% beside port mode (Python in worker processes), with the time each answer took (best of
%% 5); then
%% what only embedded mode has: a Python object kept as a handle.
-mode(compile).

main(_) ->
    Root = os:getenv("ERPY_ROOT", filename:dirname(filename:dirname(
                                     filename:absname(escript:script_name())))),
    true = code:add_patha(filename:join([Root, "_build", "default", "lib", "erpy", "ebin"])),
    logger:set_primary_config(level, warning),
    ok = application:load(erpy),
    ok = application:set_env(erpy, allowed, [lists]),
    {ok, _} = application:ensure_all_started(erpy),
    T0 = erlang:monotonic_time(microsecond),
    {ok, _} = erpy:start_pool(emb, #{mode => embedded, size => 2}),
    {ok, 3} = erpy:call(operator, add, [1, 2], #{pool => emb}),
    io:format("embedded pool started (Python initialized in this VM) and answered in ~.1f ms~n~n",
              [(erlang:monotonic_time(microsecond) - T0) / 1000]),
    {ok, _} = erpy:call(operator, add, [1, 2], #{pool => default, timeout => 10000}),
    Mib = crypto:strong_rand_bytes(1 bsl 20),
    Requests =
        [{"erpy:call(operator, add, [1, 2])",
          fun(P) -> erpy:call(operator, add, [1, 2], #{pool => P}) end},
         {"erpy:run(#{code => <<\"result = sum(arguments)\">>, arguments => [1, 2, 3]})",
          fun(P) -> erpy:run(#{code => <<"result = sum(arguments)">>, arguments => [1, 2, 3], pool => P}) end},
         {"erpy:run(#{code => <<\"result = erlang.call('lists', 'sort', [9, 1, 5])\">>})",
          fun(P) -> erpy:run(#{code => <<"result = erlang.call('lists', 'sort', [9, 1, 5])">>, pool => P}) end},
         {"erpy:eval(<<\"1 / 0\">>)",
          fun(P) -> erpy:eval(<<"1 / 0">>, #{}, #{pool => P}) end},
         {"erpy:run(#{code => <<\"while True: pass\">>}, 200)",
          fun(P) -> erpy:run(#{code => <<"while True: pass">>, pool => P}, 200) end},
         {"erpy:call(copy, copy, [<<1 MiB of random bytes>>])  (size of the answer)",
          fun(P) -> case erpy:call(copy, copy, [Mib], #{pool => P}) of
                        {ok, B} -> {ok, byte_size(B)};
                        E -> E
                    end end}],
    lists:foreach(
      fun({Text, F}) ->
              io:format("~s~n", [Text]),
              [begin
                   %% The best of 5: the first run of a snippet also compiles it.
                   Runs = [timer:tc(fun() -> F(P) end) || _ <- lists:seq(1, 5)],
                   {Us, R} = lists:min(Runs),
                   io:format("   ~-9s ~9.1f us  ~0tp~n", [Name, Us / 1.0, short(R)])
               end || {Name, P} <- [{embedded, emb}, {port, default}]]
      end, Requests),
    io:format("~nA Python object as a handle (embedded mode only):~n", []),
    {ok, H} = erpy:call(collections, 'Counter', [[a, b, a]], #{pool => emb, handle => true}),
    io:format("   {ok, H} = erpy:call(collections, 'Counter', [[a, b, a]], #{handle => true})  -> ~p~n", [H]),
    io:format("   erpy:call(H, most_common, [1])  -> ~p~n", [erpy:call(H, most_common, [1], #{pool => emb})]),
    io:format("   erpy:eval(<<\"len(h)\">>, #{h => H})  -> ~p~n", [erpy:eval(<<"len(h)">>, #{h => H}, #{pool => emb})]),
    application:stop(erpy),
    ok.

short({error, #{type := T, message := M}}) -> {error, #{type => T, message => M, traceback => '...'}};
short({ok, #{status := error, error := #{type := T}}}) -> {ok, #{status => error, error => #{type => T, '...' => '...'}}};
short(R) -> R.
