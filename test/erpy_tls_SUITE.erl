%% TLS distribution (issue 16): a Python node (`python3 -m erpy.node --ssl-dist-optfile F`)
%% in a cluster whose Erlang nodes run `-proto_dist inet_tls -ssl_dist_optfile F`.
%%
%% The certificates (a CA, node certificates it signed, a rogue self-signed one) are made
%% with the openssl command into priv_dir. The Erlang nodes are peers started with TLS
%% distribution and controlled over their standard input (this node runs plain TCP, so it
%% cannot reach them by distribution). Checked: calls into the Python node over TLS with
%% the connection set up by Erlang and by Python, a rogue certificate refused either way,
%% a wrong cookie refused, and each refusal logged by the Python node.
-module(erpy_tls_SUITE).

-include_lib("common_test/include/ct.hrl").
-include_lib("stdlib/include/assert.hrl").

-export([all/0, suite/0, init_per_suite/1, end_per_suite/1]).
-export([erlang_connects/1, python_connects/1, flags_instead_of_optfile/1,
         rogue_erlang_refused/1, rogue_python_refused/1, python_refuses_rogue_server/1,
         wrong_cookie_refused/1, plain_tcp_node_refused/1, node_pool_in_tls_cluster/1]).

suite() -> [{timetrap, {minutes, 3}}].

all() ->
    [erlang_connects, python_connects, flags_instead_of_optfile, rogue_erlang_refused,
     rogue_python_refused, python_refuses_rogue_server, wrong_cookie_refused,
     plain_tcp_node_refused, node_pool_in_tls_cluster].

init_per_suite(Config) ->
    case os:find_executable("openssl") of
        false ->
            {skip, "the openssl command is missing: no certificates for TLS distribution tests"};
        OpenSSL ->
            Dir = ?config(priv_dir, Config),
            ok = make_certs(OpenSSL, Dir),
            [{certs, Dir} | Config]
    end.

end_per_suite(_Config) -> ok.

%% ---- cases ---------------------------------------------------------------------------------

%% An Erlang node sets up the connection: rpc, erpc, a large binary, over TLS.
erlang_connects(Config) ->
    Py = start_python(tls_py1, optfile(Config, "py", verify), Config),
    {Peer, _E} = start_erlang(tls_e1, optfile(Config, "erl", verify), cookie()),
    try
        ?assertEqual(pong, peer:call(Peer, net_adm, ping, [node_of(Py)])),
        ?assertEqual(3, peer:call(Peer, rpc, call, [node_of(Py), operator, add, [1, 2]])),
        ?assertEqual(<<"a/b">>, peer:call(Peer, erpc, call, [node_of(Py), 'os.path', join, [<<"a">>, <<"b">>]])),
        Big = crypto:strong_rand_bytes(3 * 1024 * 1024),
        ?assertEqual(Big, peer:call(Peer, erpc, call, [node_of(Py), node_handlers, echo, [Big], 30000])),
        %% Many calls at once over the one connection.
        Many = peer:call(Peer, erpc, multicall, [lists:duplicate(50, node_of(Py)), operator, mul, [6, 7]]),
        ?assertEqual(lists:duplicate(50, {ok, 42}), Many)
    after
        peer:stop(Peer),
        stop_python(Py)
    end.

%% The Python node sets up the connection (as a TLS client) to an Erlang node it has not
%% met: its call into Erlang goes over TLS.
python_connects(Config) ->
    Py = start_python(tls_py2, optfile(Config, "py", verify), Config),
    {P1, _E1} = start_erlang(tls_e2, optfile(Config, "erl", verify), cookie()),
    {P2, E2} = start_erlang(tls_e3, optfile(Config, "erl", verify), cookie()),
    try
        ?assertEqual([], peer:call(P2, erlang, nodes, [hidden])),
        ?assertEqual(E2, peer:call(P1, rpc, call, [node_of(Py), node_handlers, erlang_rpc,
                                                    [E2, erlang, node, []]])),
        ?assertEqual([node_of(Py)], peer:call(P2, erlang, nodes, [hidden])),
        %% And back over the connection Python made.
        ?assertEqual(5, peer:call(P2, rpc, call, [node_of(Py), operator, add, [2, 3]]))
    after
        peer:stop(P1),
        peer:stop(P2),
        stop_python(Py)
    end.

%% --tls-cert/--tls-key/--tls-ca instead of a file: the same, both directions verified.
flags_instead_of_optfile(Config) ->
    Dir = ?config(certs, Config),
    Args = ["--tls-cert", filename:join(Dir, "py.pem"), "--tls-key", filename:join(Dir, "py.key"),
            "--tls-ca", filename:join(Dir, "ca.pem")],
    Py = start_python(tls_py3, Args, Config),
    {Peer, _} = start_erlang(tls_e4, optfile(Config, "erl", verify), cookie()),
    {Rogue, _} = start_erlang(tls_r4, optfile(Config, "rogue", noverify), cookie()),
    try
        ?assertEqual(7, peer:call(Peer, rpc, call, [node_of(Py), operator, add, [3, 4]])),
        ?assertEqual(pang, peer:call(Rogue, net_adm, ping, [node_of(Py)]))
    after
        peer:stop(Peer),
        peer:stop(Rogue),
        stop_python(Py)
    end.

%% An Erlang node whose certificate the CA did not sign is refused, and the Python node
%% logs why.
rogue_erlang_refused(Config) ->
    Py = start_python(tls_py4, optfile(Config, "py", verify), Config),
    {Peer, _} = start_erlang(tls_r1, optfile(Config, "rogue", noverify), cookie()),
    try
        ?assertEqual(pang, peer:call(Peer, net_adm, ping, [node_of(Py)])),
        ?assertEqual({badrpc, nodedown}, peer:call(Peer, rpc, call, [node_of(Py), operator, add, [1, 2]])),
        ok = wait_log(Py, "TLS connection refused")
    after
        peer:stop(Peer),
        stop_python(Py)
    end.

%% A Python node whose certificate the CA did not sign is refused by the Erlang node.
rogue_python_refused(Config) ->
    Py = start_python(tls_py5, optfile(Config, "rogue", noverify), Config),
    {Peer, _} = start_erlang(tls_e5, optfile(Config, "erl", verify), cookie()),
    try
        ?assertEqual(pang, peer:call(Peer, net_adm, ping, [node_of(Py)])),
        ok = wait_log(Py, "TLS connection refused")
    after
        peer:stop(Peer),
        stop_python(Py)
    end.

%% The Python node, as client, refuses an Erlang node whose certificate the CA did not
%% sign, and logs it.
python_refuses_rogue_server(Config) ->
    Py = start_python(tls_py6, optfile(Config, "py", verify), Config),
    {Good, _} = start_erlang(tls_e6, optfile(Config, "erl", verify), cookie()),
    {Rogue, R} = start_erlang(tls_r6, optfile(Config, "rogue", noverify), cookie()),
    try
        Got = peer:call(Good, rpc, call, [node_of(Py), node_handlers, erlang_rpc, [R, erlang, node, []]]),
        ?assertMatch({badrpc, _}, Got),
        ?assertEqual([], peer:call(Rogue, erlang, nodes, [hidden])),
        ok = wait_log(Py, "TLS connection to " ++ atom_to_list(R) ++ " refused")
    after
        peer:stop(Good),
        peer:stop(Rogue),
        stop_python(Py)
    end.

%% Right certificate, wrong cookie: refused inside TLS, logged.
wrong_cookie_refused(Config) ->
    Py = start_python(tls_py7, optfile(Config, "py", verify), Config),
    {Peer, _} = start_erlang(tls_e7, optfile(Config, "erl", verify), "not_the_cookie"),
    try
        ?assertEqual(pang, peer:call(Peer, net_adm, ping, [node_of(Py)])),
        ok = wait_log(Py, "wrong cookie")
    after
        peer:stop(Peer),
        stop_python(Py)
    end.

%% A node without TLS cannot talk to a TLS Python node (nothing falls back to plain TCP).
plain_tcp_node_refused(Config) ->
    Py = start_python(tls_py8, optfile(Config, "py", verify), Config),
    try
        ?assertEqual(pang, net_adm:ping(node_of(Py)))
    after
        stop_python(Py)
    end.

%% A node pool in a VM running TLS distribution starts Python nodes that speak it (the
%% VM's own -ssl_dist_optfile by default, or the pool's `tls` option).
node_pool_in_tls_cluster(Config) ->
    {Peer, _} = start_erlang(tls_pool, optfile(Config, "erl", verify), cookie()),
    {optfile, PyFile} = optfile(Config, "py", verify),
    try
        [peer:call(Peer, code, add_patha, [D]) || D <- code:get_path(), string:find(D, "erpy") =/= nomatch],
        {ok, _} = peer:call(Peer, application, ensure_all_started, [erpy]),
        {ok, _} = peer:call(Peer, erpy, start_pool, [tp_default, #{mode => node, start => 1}], 60000),
        ?assertEqual({ok, 3}, peer:call(Peer, erpy, call, [operator, add, [1, 2], #{pool => tp_default}], 30000)),
        {ok, _} = peer:call(Peer, erpy, start_pool, [tp_file, #{mode => node, start => 1, tls => PyFile}], 60000),
        ?assertEqual({ok, 7}, peer:call(Peer, erpy, call, [operator, add, [3, 4], #{pool => tp_file}], 30000)),
        %% The peer speaks TLS only: both pools' nodes are connected over it.
        ?assertEqual(2, length(peer:call(Peer, erlang, nodes, [hidden])))
    after
        peer:stop(Peer)
    end.

%% ---- certificates and options files --------------------------------------------------------

make_certs(OpenSSL, Dir) ->
    Q = fun(F) -> "'" ++ filename:join(Dir, F) ++ "'" end,
    Ext = filename:join(Dir, "san.ext"),
    %% Names both ways: OpenSSL checks an address against IP entries, OTP's ssl the
    %% server_name_indication string against DNS entries.
    ok = file:write_file(Ext, "subjectAltName=IP:127.0.0.1,DNS:127.0.0.1,DNS:localhost\n"),
    Run = fun(Args) ->
                  Cmd = OpenSSL ++ " " ++ Args ++ " 2>&1",
                  Out = os:cmd(Cmd ++ "; echo \"exit=$?\""),
                  case string:find(Out, "exit=0") of
                      nomatch -> ct:fail({openssl, Cmd, Out});
                      _ -> ok
                  end
          end,
    Run("req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=erpy-test-ca -keyout " ++ Q("ca.key")
        ++ " -out " ++ Q("ca.pem")),
    Run("req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=rogue -addext "
        "subjectAltName=IP:127.0.0.1,DNS:127.0.0.1 -keyout " ++ Q("rogue.key") ++ " -out " ++ Q("rogue.pem")),
    [begin
         Run("req -newkey rsa:2048 -nodes -subj /CN=" ++ N ++ " -keyout " ++ Q(N ++ ".key")
             ++ " -out " ++ Q(N ++ ".csr")),
         Run("x509 -req -in " ++ Q(N ++ ".csr") ++ " -CA " ++ Q("ca.pem") ++ " -CAkey " ++ Q("ca.key")
             ++ " -CAcreateserial -days 2 -extfile " ++ Q("san.ext") ++ " -out " ++ Q(N ++ ".pem"))
     end || N <- ["py", "erl"]],
    ok.

%% An ssl_dist options file for `Who`'s certificate; `verify`: peers must chain to the CA
%% (both sides), `noverify`: it checks nobody (a rogue node).
optfile(Config, Who, Verify) ->
    Dir = ?config(certs, Config),
    F = fun(N) -> filename:join(Dir, N) end,
    Common = [{certfile, F(Who ++ ".pem")}, {keyfile, F(Who ++ ".key")}, {cacertfile, F("ca.pem")}],
    V = case Verify of
            verify -> [{verify, verify_peer}];
            noverify -> [{verify, verify_none}]
        end,
    Server = Common ++ V ++ [{fail_if_no_peer_cert, Verify =:= verify}],
    Terms = [{server, Server}, {client, Common ++ V}],
    Path = F(Who ++ "_" ++ atom_to_list(Verify) ++ ".conf"),
    ok = file:write_file(Path, io_lib:format("~p.~n", [Terms])),
    {optfile, Path}.

%% ---- nodes ---------------------------------------------------------------------------------

cookie() -> atom_to_list(erlang:get_cookie()).

start_erlang(Name, {optfile, File}, Cookie) ->
    {ok, Peer, Node} = peer:start_link(#{name => Name, host => "127.0.0.1", longnames => true,
                                         connection => standard_io,
                                         args => ["-proto_dist", "inet_tls", "-ssl_dist_optfile", File,
                                                  "-setcookie", Cookie]}),
    {Peer, Node}.

start_python(Name, {optfile, File}, Config) ->
    start_python(Name, ["--ssl-dist-optfile", File], Config);
start_python(Name, TlsArgs, _Config) ->
    Node = list_to_atom(atom_to_list(Name) ++ "@127.0.0.1"),
    Path = filename:join(root(), "python") ++ ":" ++ filename:join(root(), "test/py"),
    Args = ["-m", "erpy.node", "--name", atom_to_list(Node), "--allow", "operator,os.path,node_handlers",
            "--load", "node_handlers", "--exit-on-eof" | TlsArgs],
    Self = self(),
    Holder = spawn(fun() ->
                           Port = open_port({spawn_executable, python()},
                                            [{args, Args}, {env, [{"PYTHONPATH", Path}, {"ERPY_COOKIE", cookie()}]},
                                             exit_status, use_stdio, stderr_to_stdout, {line, 4096}]),
                           Self ! {self(), started},
                           hold(Port, [])
                   end),
    receive {Holder, started} -> ok end,
    ok = wait_log({Node, Holder}, "ready on port"),
    {Node, Holder}.

node_of({Node, _Holder}) -> Node.

stop_python({_Node, Holder}) -> Holder ! stop, ok.

hold(Port, Lines) ->
    receive
        stop -> catch port_close(Port);
        {lines, From} -> From ! {self(), lists:reverse(Lines)}, hold(Port, Lines);
        {Port, {data, {_, Line}}} -> ct:log("python: ~ts", [Line]), hold(Port, [Line | Lines]);
        {Port, {exit_status, S}} -> ct:log("python exited: ~p", [S]), hold_exited(Lines)
    end.

hold_exited(Lines) ->
    receive
        stop -> ok;
        {lines, From} -> From ! {self(), lists:reverse(Lines)}, hold_exited(Lines)
    end.

%% Waits until the Python node has printed a line containing Text.
wait_log(Py, Text) -> wait_log(Py, Text, 200).

wait_log({_Node, _Holder} = Py, Text, 0) ->
    ct:fail({not_logged, Text, lines(Py)});
wait_log({_Node, Holder} = Py, Text, N) ->
    case [L || L <- lines(Py), string:find(L, Text) =/= nomatch] of
        [_ | _] -> ok;
        [] ->
            case is_process_alive(Holder) of
                true -> timer:sleep(50), wait_log(Py, Text, N - 1);
                false -> ct:fail({python_gone, Text})
            end
    end.

lines({_Node, Holder}) ->
    Holder ! {lines, self()},
    receive {Holder, Lines} -> Lines after 5000 -> [] end.

root() ->
    case os:getenv("ERPY_ROOT") of
        false -> filename:dirname(filename:dirname(proplists:get_value(source, module_info(compile))));
        R -> R
    end.

python() ->
    case os:getenv("ERPY_PYTHON") of
        false -> "/usr/bin/python3";
        P -> P
    end.
