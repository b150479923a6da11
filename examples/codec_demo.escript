#!/usr/bin/env escript
%%! -noshell +pc unicode
%% `make demo`: an Erlang term crosses to Python through erpy's codec and comes back.
%% Python (examples/py/codec_demo_port.py, a {packet, 4} port) prints what it received;
%% this side prints what it sent, what came back, and whether they are equal.
%% Environment: ERPY_PYTHON (default /usr/bin/python3), ERPY_ROOT (default: the
%% directory above this script's folder).
-mode(compile).

main(_) ->
    ok = io:setopts([{encoding, unicode}]),
    Root = os:getenv("ERPY_ROOT", filename:dirname(filename:dirname(
                                     filename:absname(escript:script_name())))),
    Python = os:getenv("ERPY_PYTHON", "/usr/bin/python3"),
    Term = #{name => <<"erpy"/utf8>>,
             greeting => <<"h\x{e9}llo, w\x{f6}rld \x{4e16}\x{754c}"/utf8>>,
             raw => <<0, 255, 1>>,
             big => 1 bsl 100 + 7,
             pi => 3.141592653589793,
             owner => self(),
             ok => true,
             nothing => undefined,
             point => {1, -2, 3.5},
             items => [1, two, <<"three">>, [4.0]],
             'caf\x{e9}' => 'unicode atom',
             ref => make_ref()},
    io:format("erlang sent:     ~tp~n~n", [Term]),
    Port = open_port({spawn_executable, Python},
                     [{args, [filename:join([Root, "examples", "py", "codec_demo_port.py"])]},
                      {packet, 4}, binary, exit_status, use_stdio,
                      {env, [{"PYTHONPATH", filename:join(Root, "python")}]}]),
    true = port_command(Port, term_to_binary(Term)),
    Back = receive
               {Port, {data, Bytes}} -> binary_to_term(Bytes);
               {Port, {exit_status, S}} -> io:format("python exited with ~p~n", [S]), halt(1)
           after 10000 -> io:format("no answer from python~n"), halt(1)
           end,
    port_close(Port),
    io:format("~nerlang got back: ~tp~n~n", [Back]),
    case Back =:= Term of
        true -> io:format("equal: true (the term made the round trip exactly)~n");
        false -> io:format("equal: false~n"), halt(1)
    end.
