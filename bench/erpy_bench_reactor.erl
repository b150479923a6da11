%% R1, R2: the reactor (erpy_reactor) serving TCP from Python protocols, beside a plain
%% Python asyncio server (asyncio.start_server, /usr/bin/python3, no erpy) and an Erlang
%% gen_tcp server, measured alternately in the same run with the same Erlang client:
%% 64 connections, each a process that sends a request and waits for its answer.
%% R1: echo of 1 KiB messages; R2: HTTP/1.1 keep-alive GET (requests/s and p99).
-module(erpy_bench_reactor).

-export([rows/1]).

-define(CONNS, 64).
-define(MSG, 1024).
-define(GET, <<"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: erpy-bench\r\nAccept: */*\r\n\r\n">>).
-define(RESPONSE, <<"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
                    "Connection: keep-alive\r\n\r\nHello, World!">>).

-spec rows(erpy_bench:ctx()) -> [erpy_bench:row()].
rows(#{root := Root, python := Python} = Ctx) ->
    true = code:add_patha(filename:join([Root, "_build", "default", "lib", "erpy", "ebin"])),
    {ok, _} = application:ensure_all_started(erpy),
    PyDir = filename:join([Root, "bench", "py"]),
    {ok, _} = erpy:start_pool(bench_remb, #{mode => embedded, size => 1, timeout => 10000}),
    ok = erpy:exec(iolist_to_binary(["import sys; sys.path.insert(0, '", PyDir, "')"]),
                   #{pool => bench_remb}),
    {ok, _} = erpy:start_pool(bench_rport, #{mode => port, size => 1, timeout => 10000,
                                             pythonpath => [PyDir]}),
    wait_serves(bench_rport, 300),
    try
        [r1(Ctx, Python, PyDir), r2(Ctx, Python, PyDir)]
    after
        erpy:stop_pool(bench_remb),
        erpy:stop_pool(bench_rport)
    end.

r1(Ctx, Python, PyDir) ->
    Servers = #{embedded => reactor_server(bench_remb, {bench_reactor, 'Echo'}),
                port => reactor_server(bench_rport, {bench_reactor, 'Echo'}),
                asyncio => asyncio_server(Python, PyDir, "echo"),
                gen_tcp => gen_tcp_server(echo)},
    Msg = binary:copy(<<"x">>, ?MSG),
    Req = fun(S) -> ok = gen_tcp:send(S, Msg), {ok, _} = gen_tcp:recv(S, ?MSG, 10000) end,
    R = measure(Ctx, Servers, Req),
    stop_servers(Servers),
    row(Ctx, <<"R1">>, "reactor echo, 64 TCP connections, 1 KiB messages: requests/s", R, false).

r2(Ctx, Python, PyDir) ->
    Servers = #{embedded => reactor_server(bench_remb, {bench_reactor, 'Http'}),
                port => reactor_server(bench_rport, {bench_reactor, 'Http'}),
                asyncio => asyncio_server(Python, PyDir, "http"),
                gen_tcp => gen_tcp_server(http)},
    N = byte_size(?RESPONSE),
    Req = fun(S) -> ok = gen_tcp:send(S, ?GET), {ok, _} = gen_tcp:recv(S, N, 10000) end,
    R = measure(Ctx, Servers, Req),
    stop_servers(Servers),
    row(Ctx, <<"R2">>, "reactor HTTP/1.1 keep-alive GET, 64 connections: requests/s (p99)", R, true).

row(Ctx, Id, What, #{embedded := E, port := P, asyncio := A, gen_tcp := G, pairs := Pairs}, P99) ->
    Rate = fun(Runs) -> erpy_bench:median([N / S || #{n := N, s := S} <- Runs]) end,
    Lat = fun(Runs) -> erpy_bench:median([L || #{p99 := L} <- Runs]) end,
    Pair = fun(X, Y) -> erpy_bench:median([Rate([A1]) / Rate([B1]) || {A1, B1} <- lists:zip(X, Y)]) end,
    VsAsyncio = Pair(E, A),
    VsGen = Pair(E, G),
    PortVsEmb = Pair(P, E),
    Show = fun(Runs) ->
                   case P99 of
                       true -> fmt("~b/s (p99 ~.2f ms)", [round(Rate(Runs)), Lat(Runs) / 1000]);
                       false -> fmt("~b/s", [round(Rate(Runs))])
                   end
           end,
    #{id => Id,
      workload => list_to_binary(What),
      erpy => fmt("embedded ~s; port ~s", [Show(E), Show(P)]),
      reference => fmt("asyncio.start_server ~s; gen_tcp ~s", [Show(A), Show(G)]),
      ratio => VsAsyncio,
      target => <<">= 1.0x asyncio, >= 0.8x gen_tcp; port >= 0.7x embedded">>,
      pass => VsAsyncio >= 1.0 andalso VsGen >= 0.8 andalso PortVsEmb >= 0.7,
      notes => [fmt("embedded/asyncio ~.2fx, embedded/gen_tcp ~.2fx, port/embedded ~.2fx "
                    "(medians of per-round ratios)", [VsAsyncio, VsGen, PortVsEmb]),
                fmt("~b rounds, each server in turn for ~.1f s; pools of one context / one worker; "
                    "client: 64 Erlang processes in this VM", [Pairs, seconds(Ctx)])]}.

%% Each round runs every server in turn (alternated; the order rotates), the same client.
measure(#{pairs := Pairs0} = Ctx, Servers, Req) ->
    Pairs = max(3, Pairs0 div 3),
    Names = [embedded, asyncio, gen_tcp, port],
    Rounds = [begin
                  Order = rotate(Names, I rem length(Names)),
                  maps:from_list([{Name, run(maps:get(Name, Servers), Req, seconds(Ctx))} || Name <- Order])
              end || I <- lists:seq(1, Pairs)],
    maps:from_list([{Name, [maps:get(Name, R) || R <- Rounds]} || Name <- Names] ++ [{pairs, Pairs}]).

seconds(#{seconds := S}) -> max(1.0, S * 3).

rotate(L, 0) -> L;
rotate([H | T], N) -> rotate(T ++ [H], N - 1).

%% 64 connections, then every client loops for `Secs`; requests counted and timed.
run(#{port := Port}, Req, Secs) ->
    Self = self(),
    Socks = [begin
                 {ok, S} = gen_tcp:connect({127, 0, 0, 1}, Port, [binary, {active, false}, {nodelay, true}]),
                 S
             end || _ <- lists:seq(1, ?CONNS)],
    %% Every connection answers once before the clock starts.
    [Req(S) || S <- Socks],
    Until = erlang:monotonic_time(microsecond) + round(Secs * 1000000),
    Pids = [spawn_link(fun() -> Self ! {done, self(), client(S, Req, Until, 0, [])} end) || S <- Socks],
    T0 = erlang:monotonic_time(microsecond),
    Results = [receive {done, P, R} -> R end || P <- Pids],
    T1 = erlang:monotonic_time(microsecond),
    [gen_tcp:close(S) || S <- Socks],
    N = lists:sum([C || {C, _} <- Results]),
    Lats = lists:sort(lists:append([L || {_, L} <- Results])),
    P99 = case Lats of
              [] -> 0;
              _ -> lists:nth(max(1, round(length(Lats) * 0.99)), Lats)
          end,
    #{n => N, s => (T1 - T0) / 1.0e6, p99 => P99}.

client(S, Req, Until, N, Lats) ->
    T = erlang:monotonic_time(microsecond),
    case T >= Until of
        true -> {N, Lats};
        false ->
            Req(S),
            %% Every 8th latency is kept: enough for a p99, cheap to sort.
            Lats1 = case N band 7 of 0 -> [erlang:monotonic_time(microsecond) - T | Lats]; _ -> Lats end,
            client(S, Req, Until, N + 1, Lats1)
    end.

%% ---- servers -----------------------------------------------------------------------------

reactor_server(Pool, Factory) ->
    listener(fun(S) ->
                     {ok, _} = erpy_reactor:handoff_socket(Pool, S, #{factory => Factory}),
                     gen_tcp:close(S)
             end).

gen_tcp_server(Kind) ->
    listener(fun(S) ->
                     Pid = spawn(fun() -> receive go -> gen_loop(Kind, S, <<>>) end end),
                     ok = gen_tcp:controlling_process(S, Pid),
                     Pid ! go
             end).

gen_loop(echo, S, _) ->
    case gen_tcp:recv(S, 0) of
        {ok, Data} -> ok = gen_tcp:send(S, Data), gen_loop(echo, S, <<>>);
        {error, _} -> gen_tcp:close(S)
    end;
gen_loop(http, S, Buf) ->
    case gen_tcp:recv(S, 0) of
        {ok, Data} ->
            {N, Rest} = requests(<<Buf/binary, Data/binary>>, 0),
            _ = N > 0 andalso gen_tcp:send(S, binary:copy(?RESPONSE, N)),
            gen_loop(http, S, Rest);
        {error, _} -> gen_tcp:close(S)
    end.

requests(Buf, N) ->
    case binary:match(Buf, <<"\r\n\r\n">>) of
        {At, 4} -> requests(binary:part(Buf, At + 4, byte_size(Buf) - At - 4), N + 1);
        nomatch -> {N, Buf}
    end.

listener(OnAccept) ->
    {ok, L} = gen_tcp:listen(0, [binary, {active, false}, {reuseaddr, true}, {ip, {127, 0, 0, 1}},
                                 {backlog, 1024}, {nodelay, true}]),
    {ok, Port} = inet:port(L),
    Pid = spawn(fun() -> accept_loop(L, OnAccept) end),
    ok = gen_tcp:controlling_process(L, Pid),
    #{port => Port, stop => fun() -> exit(Pid, kill), gen_tcp:close(L) end}.

accept_loop(L, OnAccept) ->
    case gen_tcp:accept(L) of
        {ok, S} -> OnAccept(S), accept_loop(L, OnAccept);
        {error, _} -> ok
    end.

asyncio_server(Python, PyDir, Kind) ->
    Port = open_port({spawn_executable, Python},
                     [{args, [filename:join(PyDir, "asyncio_servers.py"), Kind]}, {line, 100},
                      binary, use_stdio]),
    receive
        {Port, {data, {eol, Line}}} ->
            #{port => binary_to_integer(Line), stop => fun() -> catch port_close(Port) end}
    after 10000 ->
        error(asyncio_server_did_not_start)
    end.

stop_servers(Servers) ->
    _ = [(maps:get(stop, S))() || S <- maps:values(Servers)],
    ok.

wait_serves(Pool, 0) -> error({not_serving, Pool});
wait_serves(Pool, N) ->
    case erpy:eval(<<"1">>, #{}, #{pool => Pool}) of
        {ok, 1} -> ok;
        _ -> timer:sleep(100), wait_serves(Pool, N - 1)
    end.

fmt(F, A) -> iolist_to_binary(io_lib:format(F, A)).
