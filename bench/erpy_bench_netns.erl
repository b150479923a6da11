%% Node mode across hosts (issue 16): W1 (sequential rpc:call of operator.add, us/call)
%% and W3a (1 MiB binary echo, MB/s) into a Python node on another host, plain TCP and
%% TLS distribution, each beside the same calls into an Erlang node on a third host over
%% the same link and protocol, measured alternately in the same run.
%%
%% The hosts are network namespaces (test/erpy_netns.erl, test/netns/netns.sh): h0 runs
%% the calling Erlang node, h1 the Python node, h2 the Erlang reference; each its own
%% EPMD. The calling node is a peer controlled over its standard input (this VM is not on
%% that network) and runs measure/5. TLS: one CA, one certificate for the three hosts
%% (made with the openssl command), verify_peer both ways. Without root (no namespaces)
%% or without openssl the rows say skipped.
-module(erpy_bench_netns).

-export([rows/1]).
%% Run on the calling node.
-export([measure/5]).

-spec rows(erpy_bench:ctx()) -> [erpy_bench:row()].
rows(Ctx) ->
    case code:ensure_loaded(erpy_netns) of
        {module, _} -> ok;
        _ -> code:add_patha(filename:join(maps:get(root, Ctx), "_build/test/lib/erpy/test")),
             load_netns(Ctx)
    end,
    case erpy_netns:available() of
        ok ->
            erpy_netns:clean(),
            {ok, Net} = erpy_netns:up(3),
            try
                lists:append([proto(Ctx, Net, tcp), proto(Ctx, Net, tls)])
            after
                erpy_netns:down(Net)
            end;
        {skip, Why} ->
            skipped(tcp, Why) ++ skipped(tls, Why)
    end.

%% test/erpy_netns.erl, compiled here when the tests' build is not there.
load_netns(#{root := Root}) ->
    Src = filename:join([Root, "test", "erpy_netns.erl"]),
    {ok, erpy_netns, Beam} = compile:file(Src, [binary]),
    {module, erpy_netns} = code:load_binary(erpy_netns, Src, Beam),
    ok.

skipped(Proto, Why) ->
    [#{id => Id, workload => workload(Id, Proto), erpy => <<"skipped">>,
       reference => iolist_to_binary(Why), ratio => 0.0, target => target(Id, Proto), pass => true,
       notes => [<<"skipped: ", (iolist_to_binary(Why))/binary>>]}
     || Id <- [<<"W1-net">>, <<"W3a-net">>]].

workload(<<"W1-net">>, P) ->
    iolist_to_binary(["node across namespaces (", proto_name(P), "): sequential rpc:call(PyNode, operator, add, [1, 2]), us/call"]);
workload(<<"W3a-net">>, P) ->
    iolist_to_binary(["node across namespaces (", proto_name(P), "): rpc:call echo of a 1 MiB binary, MB/s"]).

proto_name(tcp) -> "TCP";
proto_name(tls) -> "TLS".

target(<<"W1-net">>, tls) -> <<"<= 1.2x">>;
target(<<"W1-net">>, tcp) -> <<"<= 1.2x">>;
target(<<"W3a-net">>, _) -> <<">= 0.83x (1/1.2)">>.

proto(Ctx, Net, Proto) ->
    case tls_files(Ctx, Proto) of
        {skip, Why} -> skipped(Proto, Why);
        {ok, Erl, PyArgs} -> run(Ctx, Net, Proto, Erl, PyArgs)
    end.

tls_files(_Ctx, tcp) -> {ok, [], []};
tls_files(_Ctx, tls) ->
    case os:find_executable("openssl") of
        false -> {skip, "the openssl command is missing"};
        OpenSSL ->
            Dir = filename:join(["/tmp", "erpy_bench_tls_" ++ os:getpid()]),
            ok = filelib:ensure_path(Dir),
            F = fun(N) -> filename:join(Dir, N) end,
            ok = file:write_file(F("san.ext"), ["subjectAltName=",
                                                lists:join(",", [["IP:", erpy_netns:addr(I), ",DNS:", erpy_netns:addr(I)]
                                                                 || I <- [0, 1, 2]]), "\n"]),
            Q = fun(N) -> " " ++ F(N) end,
            _ = os:cmd(OpenSSL ++ " req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=bench-ca -keyout" ++ Q("ca.key")
                       ++ " -out" ++ Q("ca.pem") ++ " 2>&1"),
            _ = os:cmd(OpenSSL ++ " req -newkey rsa:2048 -nodes -subj /CN=node -keyout" ++ Q("node.key")
                       ++ " -out" ++ Q("node.csr") ++ " 2>&1"),
            _ = os:cmd(OpenSSL ++ " x509 -req -in" ++ Q("node.csr") ++ " -CA" ++ Q("ca.pem") ++ " -CAkey" ++ Q("ca.key")
                       ++ " -CAcreateserial -days 2 -extfile" ++ Q("san.ext") ++ " -out" ++ Q("node.pem") ++ " 2>&1"),
            Opts = [{certfile, F("node.pem")}, {keyfile, F("node.key")}, {cacertfile, F("ca.pem")},
                    {verify, verify_peer}],
            ok = file:write_file(F("ssl_dist.conf"),
                                 io_lib:format("~p.~n", [[{server, Opts ++ [{fail_if_no_peer_cert, true}]},
                                                          {client, Opts}]])),
            case filelib:is_file(F("node.pem")) of
                true -> {ok, ["-proto_dist", "inet_tls", "-ssl_dist_optfile", F("ssl_dist.conf")],
                         ["--ssl-dist-optfile", F("ssl_dist.conf")]};
                false -> {skip, "openssl failed to make the certificates"}
            end
    end.

run(#{root := Root, python := Python} = Ctx, Net, Proto, ErlArgs, PyArgs) ->
    [ok = epmd(Net, I) || I <- [0, 1, 2]],
    Cookie = atom_to_list(erlang:get_cookie()),
    Tag = atom_to_list(Proto),
    Py = list_to_atom("bpy" ++ Tag ++ "@" ++ erpy_netns:addr(1)),
    PyProc = erpy_netns:spawn_in(Net, 1, Python,
                                 ["-m", "erpy.node", "--name", atom_to_list(Py), "--listen", erpy_netns:addr(1),
                                  "--allow", "operator,bench_node", "--load", "bench_node", "--no-start-epmd"
                                  | PyArgs],
                                 [{"PYTHONPATH", filename:join(Root, "python") ++ ":" ++ filename:join([Root, "bench", "py"])},
                                  {"ERPY_COOKIE", Cookie}]),
    {RefPeer, Ref} = start_erlang(Net, 2, "bref" ++ Tag, ErlArgs, Cookie),
    {Client, _} = start_erlang(Net, 0, "bcall" ++ Tag, ErlArgs, Cookie),
    try
        %% The client runs measure/5, which uses erpy_bench_node's wait_pong/2.
        [begin
             %% Loaded by run_bench.escript from its source: compiled again for the peer.
             {ok, Mod, Beam} = compile:file(code:which(Mod), [binary]),
             {module, Mod} = peer:call(Client, code, load_binary, [Mod, code:which(Mod), Beam])
         end || Mod <- [?MODULE, erpy_bench_node]],
        ok = peer:call(Client, ?MODULE, measure, [wait, Py, Ref, 0, 0], 60000),
        Pairs = maps:get(pairs, Ctx),
        {W1P, W1E} = peer:call(Client, ?MODULE, measure, [w1, Py, Ref, Pairs, 20000 div Pairs + 1], 600000),
        {W3P, W3E} = peer:call(Client, ?MODULE, measure, [w3a, Py, Ref, Pairs, 20], 600000),
        W1Ratio = median([median(A) / median(B) || {A, B} <- lists:zip(W1P, W1E)]),
        MBs = fun(L) -> (1 bsl 20) / median(L) end,
        W3Ratio = median([MBs(A) / MBs(B) || {A, B} <- lists:zip(W3P, W3E)]),
        All = fun(Runs) -> lists:append(Runs) end,
        [#{id => <<"W1-net">>, workload => workload(<<"W1-net">>, Proto),
           erpy => fmt("median ~.1f us, p99 ~.1f us", [median(All(W1P)), p99(All(W1P))]),
           reference => fmt("rpc:call into an Erlang node on a third host, same protocol (erlang:'+'): "
                            "median ~.1f us, p99 ~.1f us", [median(All(W1E)), p99(All(W1E))]),
           ratio => W1Ratio, target => target(<<"W1-net">>, Proto), pass => W1Ratio =< 1.2,
           notes => [fmt("~b pairs; ratio = Python median / Erlang median per pair; veth + bridge between "
                         "namespaces", [Pairs])]},
         #{id => <<"W3a-net">>, workload => workload(<<"W3a-net">>, Proto),
           erpy => fmt("~.1f MB/s", [median([MBs(L) || L <- W3P])]),
           reference => fmt("the same into an Erlang node on a third host, same protocol (erlang:hd([Bin])): ~.1f MB/s",
                            [median([MBs(L) || L <- W3E])]),
           ratio => W3Ratio, target => target(<<"W3a-net">>, Proto), pass => W3Ratio >= 1 / 1.2,
           notes => [<<"ratio = Python MB/s / Erlang MB/s per pair">>]}]
    after
        catch peer:stop(Client),
        catch peer:stop(RefPeer),
        erpy_netns:stop(PyProc)
    end.

epmd(Net, I) ->
    _ = os:cmd("ip netns exec " ++ erpy_netns:ns(Net, I) ++ " epmd -daemon"),
    ok.

start_erlang(Net, I, Name, ErlArgs, Cookie) ->
    Ip = os:find_executable("ip"),
    {ok, Peer, Node} = peer:start_link(#{name => list_to_atom(Name), host => erpy_netns:addr(I), longnames => true,
                                         exec => {Ip, ["netns", "exec", erpy_netns:ns(Net, I),
                                                       os:find_executable("erl")]},
                                         connection => standard_io,
                                         args => ["-setcookie", Cookie | ErlArgs]}),
    {Peer, Node}.

%% On the calling node: alternate Python and Erlang runs, `Pairs` of each.
measure(wait, Py, Ref, _, _) ->
    wait_pong(Py, 200),
    wait_pong(Ref, 200);
measure(w1, Py, Ref, Pairs, Calls) ->
    PyCall = fun() -> 3 = rpc:call(Py, operator, add, [1, 2]) end,
    ErlCall = fun() -> 3 = rpc:call(Ref, erlang, '+', [1, 2]) end,
    _ = [{PyCall(), ErlCall()} || _ <- lists:seq(1, 1000)],
    lists:unzip([{lat(PyCall, Calls), lat(ErlCall, Calls)} || _ <- lists:seq(1, Pairs)]);
measure(w3a, Py, Ref, Pairs, N) ->
    Bin = crypto:strong_rand_bytes(1 bsl 20),
    PyEcho = fun() -> Bin = rpc:call(Py, bench_node, echo, [Bin]) end,
    ErlEcho = fun() -> Bin = rpc:call(Ref, erlang, hd, [[Bin]]) end,
    _ = [{PyEcho(), ErlEcho()} || _ <- lists:seq(1, 5)],
    lists:unzip([{lat(PyEcho, N), lat(ErlEcho, N)} || _ <- lists:seq(1, Pairs)]).

lat(F, N) ->
    [begin
         T0 = erlang:monotonic_time(nanosecond),
         F(),
         (erlang:monotonic_time(nanosecond) - T0) / 1000
     end || _ <- lists:seq(1, N)].

wait_pong(Node, N) -> erpy_bench_node:wait_pong(Node, N).

median(Xs) -> erpy_bench:median(Xs).

p99(L) ->
    S = lists:sort(L),
    lists:nth(max(1, round(length(S) * 0.99)), S).

fmt(F, A) -> iolist_to_binary(io_lib:format(F, A)).
