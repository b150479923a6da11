%% Asynchronous requests: erpy:async_call/4 (and async_eval, async_run) answer at once with
%% an id; the answer comes later as the message {erpy_reply, Id, Answer}, which
%% erpy:await/2 waits for and a gen_server can match in handle_info. Each request runs in
%% a process of its own (a "runner"), which makes the ordinary synchronous call, so every
%% mode, every option, the policy and callbacks behave exactly as for erpy:call;
%% callbacks run in the runner, with the caller's nesting (a request made inside a
%% callback still reaches the worker that waits for it).
%%
%% The runner is linked to the caller: a caller that crashes or is killed takes its
%% runners with it, and their Python calls are interrupted as for a dead caller. A runner
%% never crashes (it catches everything and answers it) and unlinks before it exits, so a
%% caller that traps exits sees no 'EXIT' message from it. cancel/1 stops a runner and
%% drops its answer if it already came.
-module(erpy_async).

-export([start/2, await/2, cancel/1]).
-export_type([id/0]).

-opaque id() :: {erpy_async, reference(), pid()}.

%% Starts `Request` (a fun making one synchronous erpy request) for the calling process.
-spec start(fun(() -> term()), map()) -> {ok, id()}.
start(Request, _Opts) ->
    Caller = self(),
    Ref = make_ref(),
    Nesting = erpy_call:nesting(),
    Pid = spawn_link(fun() -> run(Caller, Ref, Nesting, Request) end),
    {ok, {erpy_async, Ref, Pid}}.

%% Waits up to `Timeout` for the answer of `Id`: the answer, or {error, timeout} (the
%% request goes on: await again or cancel it). Only its caller can await it.
%% Another process (or a second await of an answer already taken) gets
%% {error, {badarg, {async_id, Id}}} at once: it would wait for nothing.
-spec await(id(), timeout()) -> term().
await({erpy_async, _Ref, Pid} = Id, Timeout) when is_pid(Pid) ->
    receive
        {erpy_reply, Id, Answer} -> Answer
    after 0 ->
        case running_for_me(Pid) of
            true ->
                receive
                    {erpy_reply, Id, Answer} -> Answer
                after Timeout ->
                    {error, timeout}
                end;
            false ->
                receive
                    {erpy_reply, Id, Answer} -> Answer
                after 0 ->
                    {error, {badarg, {async_id, Id}}}
                end
        end
    end;
await(Id, _Timeout) ->
    {error, {badarg, {async_id, Id}}}.

%% Stops the request (its Python call is interrupted, as for a caller that gave up);
%% no answer comes after this returns.
%% Only the caller may: another process gets {error, {badarg, {async_id, Id}}} and the
%% request goes on (killing the runner would also kill the caller it is linked to).
-spec cancel(id()) -> ok | {error, {badarg, term()}}.
cancel({erpy_async, _Ref, Pid} = Id) when is_pid(Pid) ->
    case running_for_me(Pid) orelse not is_process_alive(Pid) of
        true ->
            unlink(Pid),
            exit(Pid, kill),
            %% The runner may have answered before it was killed.
            receive {erpy_reply, Id, _} -> ok after 0 -> ok end;
        false ->
            %% Not linked to us: it answered already (the answer came before its unlink),
            %% or it runs for another process.
            receive
                {erpy_reply, Id, _} -> ok
            after 0 ->
                {error, {badarg, {async_id, Id}}}
            end
    end;
cancel(Id) ->
    {error, {badarg, {async_id, Id}}}.

%% Whether the runner `Pid` still runs a request of the calling process: it is linked to
%% its caller until it has sent the answer.
running_for_me(Pid) ->
    case erlang:process_info(Pid, links) of
        {links, Links} -> lists:member(self(), Links);
        undefined -> false
    end.

run(Caller, Ref, Nesting, Request) ->
    erpy_call:set_nesting(Nesting),
    Answer = try Request()
             catch Class:Reason -> {error, {Class, Reason}}
             end,
    Caller ! {erpy_reply, {erpy_async, Ref, self()}, Answer},
    unlink(Caller).
