%% A tiny HTTP/1.1 server with keep-alive: Erlang accepts, a Python protocol
%%   erpy_reactor example: reactor_http:start(7000, embedded) or (7000, port), then
%%   `curl -v http://127.0.0.1:7000/a http://127.0.0.1:7000/b` (one connection). Run from `make shell` after c("examples/reactor_http").
-module(reactor_http).
-export([start/2, stop/0]).

-spec start(inet:port_number(), embedded | port) -> {ok, pid()}.
start(Port, Mode) ->
    Root = os:getenv("ERPY_ROOT", filename:dirname(code:priv_dir(erpy))),
    Py = filename:join(Root, "examples/py"),
    {ok, _} = erpy:start_pool(reactor_http, #{mode => Mode, size => 1, pythonpath => [Py],
                                              reactor => {reactor_http, 'Http'}}),
    %% Embedded pools share the VM's one interpreter: its path gets the folder too.
    ok = erpy:exec(iolist_to_binary(["import sys; sys.path.insert(0, '", Py, "')"]),
                   #{pool => reactor_http}),
    {ok, L} = gen_tcp:listen(Port, [binary, {active, false}, {reuseaddr, true}]),
    Pid = spawn(fun() -> accept(L) end),
    ok = gen_tcp:controlling_process(L, Pid),
    register(reactor_http_acceptor, Pid),
    {ok, Pid}.

-spec stop() -> ok.
stop() ->
    exit(whereis(reactor_http_acceptor), kill),
    erpy:stop_pool(reactor_http).

accept(L) ->
    {ok, S} = gen_tcp:accept(L),
    %% Python gets a copy of the fd; this socket stays ours, and we are done with it.
    case erpy_reactor:handoff_socket(reactor_http, S) of
        {ok, _Conn} -> ok;
        {error, Why} -> logger:warning("reactor_http: ~p", [Why])
    end,
    gen_tcp:close(S),
    accept(L).
