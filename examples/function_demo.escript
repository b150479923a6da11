#!/usr/bin/env escript
%%! -noshell +pc unicode
%% A workflow of stateful Python functions hosted by Erlang (erpy_function,
%% doc/function.md), in one pool mode (argument: port, the default; embedded; node):
%%
%%   stage_a --cast--> stage_b --call--> stage_c
%%                        \--cast--> this process ("out")
%%
%% The functions are examples/py/function_workflow.py; the same code runs as an EDGELESS
%% guest (python3 -m erpy.edgeless --module function_workflow:StageB). stage_b's count is
%% synced to Mnesia: the demo kills it and shows the restarted instance carry on.
-mode(compile).

main(Args) ->
    Mode = case Args of [M] -> list_to_atom(M); [] -> port end,
    Root = os:getenv("ERPY_ROOT", filename:dirname(filename:dirname(
                                     filename:absname(escript:script_name())))),
    true = code:add_patha(filename:join([Root, "_build", "default", "lib", "erpy", "ebin"])),
    logger:set_primary_config(level, info),
    logger:add_primary_filter(no_progress, {fun logger_filters:progress/2, stop}),
    %% The kill below makes supervisor reports: expected here, not shown.
    logger:add_primary_filter(no_sasl, {fun logger_filters:domain/2, {stop, sub, [otp, sasl]}}),
    Mode =:= node andalso begin
        _ = os:cmd("epmd -daemon"),
        {ok, _} = net_kernel:start(['function_demo@127.0.0.1', longnames])
    end,
    {ok, _} = application:ensure_all_started(erpy),
    %% State on disc: Mnesia's directory (created on first use).
    ok = application:set_env(erpy, function_store_dir,
                             filename:join([Root, "_build", "function_demo_mnesia"])),
    Py = filename:join(Root, "examples/py"),
    Opts = #{mode => Mode, allowed => [{erpy_function, host, 1}]},
    {ok, _} = erpy:start_pool(functions, case Mode of
                                             node -> Opts#{start => 1, pythonpath => [Py]};
                                             embedded -> Opts#{size => 3};
                                             port -> Opts#{size => 3, pythonpath => [Py]}
                                         end),
    [ok = erpy:exec(iolist_to_binary(["import sys; sys.path.insert(0, '", Py, "')"]),
                    #{pool => functions}) || Mode =:= embedded],
    Start = fun(Id, Class, Aliases) ->
                    {ok, _} = erpy_function:start(#{id => Id, pool => functions,
                                                    module => <<"function_workflow:", Class/binary>>,
                                                    aliases => Aliases, init_payload => <<"demo">>})
            end,
    Start(<<"stage_c">>, <<"StageC">>, #{}),
    Start(<<"stage_b">>, <<"StageB">>, #{<<"lookup">> => <<"stage_c">>, <<"out">> => self()}),
    Start(<<"stage_a">>, <<"StageA">>, #{<<"next">> => <<"stage_b">>}),
    io:format("~s mode: stage_a -> stage_b -> stage_c~n", [Mode]),
    Send = fun(Msg) ->
                   ok = erpy_function:cast(<<"stage_a">>, Msg),
                   receive {erpy_function, cast, {_, From}, Out} ->
                           io:format("  cast ~p to stage_a -> ~s sends ~p~n", [Msg, From, Out])
                   after 10000 -> error(no_answer)
                   end
           end,
    Send(<<"  Hello ">>),
    Send(<<"World">>),
    io:format("  stage_b count: ~p~n", [erpy_function:call(<<"stage_b">>, <<"count">>)]),
    exit(erpy_function:whereis(<<"stage_b">>), kill),
    io:format("  killed stage_b; restarted with its synced state~n"),
    timer:sleep(500),
    io:format("  stage_b count: ~p~n", [erpy_function:call(<<"stage_b">>, <<"count">>)]),
    Send(<<"again">>),
    [ok = erpy_function:stop(Id) || Id <- [<<"stage_a">>, <<"stage_b">>, <<"stage_c">>]],
    ok = erpy_function:delete_state(<<"stage_b">>),
    halt(0).
