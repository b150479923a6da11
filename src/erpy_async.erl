%% Asynchronous requests: erpy:async_call/4 (and async_eval, async_run) answer at once with
%% an id; the answer comes later as the message {erpy_reply, Id, Answer}, which
%% erpy:await/2 waits for and a gen_server can match in handle_info. The answer is exactly
%% what the synchronous function would return.
%%
%% Two ways, one behaviour:
%% - A pool whose transport makes asynchronous requests itself (`async_request/4`,
%%   `async_request_worker/3`: embedded mode) gets the request straight from the caller,
%%   with its timeout, and answers the caller without anyone waiting (erpy_embedded). What
%%   needs Erlang on the way (callbacks, results to check) is done by a runner process the
%%   transport starts for that request only, under the caller's policy context.
%% - Otherwise each request runs in a process of its own (a "runner"), which makes the
%%   ordinary synchronous call, so every mode, every option, the policy and callbacks
%%   behave exactly as for erpy:call.
%% Either way callbacks run in a runner, with the caller's nesting (a request made inside a
%% callback still reaches the worker that waits for it).
%%
%% A runner is linked to the caller: a caller that crashes or is killed takes its runners
%% with it, and their Python calls are interrupted as for a dead caller (as are requests
%% without a runner: the pool watches their caller). A runner never crashes (it catches
%% everything and answers it) and unlinks before it exits, so a caller that traps exits
%% sees no 'EXIT' message from it. cancel/1 stops the request (and its runner) and drops
%% its answer if it already came.
-module(erpy_async).

-export([start/2, start/5, await/2, cancel/1]).
-export_type([id/0]).

-opaque id() :: {erpy_async, reference(), pid() | {module(), erpy_nif:job()}}.

%% Starts `Request` (a fun making one synchronous erpy request) for the calling process.
-spec start(fun(() -> term()), map()) -> {ok, id()}.
start(Request, _Opts) ->
    Caller = self(),
    Ref = make_ref(),
    Nesting = erpy_call:nesting(),
    Pid = spawn_link(fun() -> run(Caller, Ref, Nesting, Request) end),
    {ok, {erpy_async, Ref, Pid}}.

%% Starts the request `Req` (erpy_request) on `Pool` (or the held worker of `Opts`) with
%% `Timeout`: by the pool's transport where it can, else as start/2 with `Sync`, the
%% synchronous request.
-spec start(fun(() -> term()), erpy_request:t(), atom(), timeout(), map()) -> {ok, id()}.
start(Sync, Req, Pool, Timeout, Opts) ->
    case valid_timeout(Timeout) andalso direct(Req, Pool, Timeout, Opts) of
        {ok, Ref, Job} -> {ok, {erpy_async, Ref, Job}};
        {error, _} = Error -> start(fun() -> Error end, Opts);
        _ -> start(Sync, Opts)
    end.

direct(Req, Pool, Timeout, Opts) ->
    case maps:find(worker, Opts) of
        {ok, {erpy_worker, Module, Ref}} ->
            via(Module, async_request_worker, [Ref, Req, Timeout]);
        {ok, _} ->
            none;  % the runner answers what erpy:call does
        error ->
            case erpy_transport:lookup(Pool) of
                {ok, Module, Handle} -> via(Module, async_request, [Handle, Req, Timeout, Opts]);
                error -> none
            end
    end.

%% The transport that took the request answers for it later: the id names it.
via(Module, F, Args) ->
    case erlang:function_exported(Module, F, length(Args)) andalso apply(Module, F, Args) of
        {ok, Ref, Job} -> {ok, Ref, {Module, Job}};
        false -> none;
        Other -> Other
    end.

%% What a transport takes; anything else is left to the synchronous call to refuse.
valid_timeout(infinity) -> true;
valid_timeout(T) -> is_integer(T) andalso T >= 0 andalso T < 1 bsl 40.

%% Waits up to `Timeout` for the answer of `Id`: the answer, or {error, timeout} (the
%% request goes on: await again or cancel it). Only its caller can await it.
%% Another process (or a second await of an answer already taken) gets
%% {error, {badarg, {async_id, Id}}} at once: it would wait for nothing.
-spec await(id(), timeout()) -> term().
await({erpy_async, _Ref, Pid} = Id, Timeout) when is_pid(Pid) ->
    receive
        {erpy_reply, Id, Answer} -> Answer
    after 0 ->
        await_runner(Id, Pid, Timeout)
    end;
await({erpy_async, _Ref, {Module, Job}} = Id, Timeout) when is_atom(Module) ->
    %% A short request answers within microseconds, sooner than this process could sleep
    %% and be woken by the message: the transport lets its caller poll a little first.
    try Module:async_await(Job, Timeout =/= 0) of
        {done, Answer} -> Answer;
        wait -> receive_reply(Id, Timeout);
        {runner, Pid} -> await_runner(Id, Pid, Timeout);
        _ -> taken(Id)  % answered, or not the caller's
    catch
        error:badarg -> {error, {badarg, {async_id, Id}}}
    end;
await(Id, _Timeout) ->
    {error, {badarg, {async_id, Id}}}.

await_runner(Id, Pid, Timeout) ->
    case running_for_me(Pid) of
        true -> receive_reply(Id, Timeout);
        false -> taken(Id)
    end.

receive_reply(Id, Timeout) ->
    receive
        {erpy_reply, Id, Answer} -> Answer
    after Timeout ->
        {error, timeout}
    end.

%% The answer came before (it is in the mailbox, or was taken) or the request is another
%% process's.
taken(Id) ->
    receive
        {erpy_reply, Id, Answer} -> Answer
    after 0 ->
        {error, {badarg, {async_id, Id}}}
    end.

%% Stops the request (its Python call is interrupted, as for a caller that gave up);
%% no answer comes after this returns.
%% Only the caller may: another process gets {error, {badarg, {async_id, Id}}} and the
%% request goes on (killing the runner would also kill the caller it is linked to).
-spec cancel(id()) -> ok | {error, {badarg, term()}}.
cancel({erpy_async, _Ref, Pid} = Id) when is_pid(Pid) ->
    cancel_runner(Id, Pid);
cancel({erpy_async, _Ref, {Module, Job}} = Id) when is_atom(Module) ->
    try Module:async_cancel(Job) of
        canceled -> flush(Id);
        sent -> flush_taken(Id);
        {runner, Pid} -> cancel_runner(Id, Pid);
        not_yours -> {error, {badarg, {async_id, Id}}}
    catch
        error:badarg -> {error, {badarg, {async_id, Id}}}
    end;
cancel(Id) ->
    {error, {badarg, {async_id, Id}}}.

cancel_runner(Id, Pid) ->
    case running_for_me(Pid) orelse not is_process_alive(Pid) of
        true ->
            stop(Pid),
            flush(Id);
        false ->
            %% Not linked to us: it answered already (the answer came before its unlink),
            %% or it runs for another process.
            flush_taken(Id)
    end.

%% Whether the runner `Pid` still runs a request of the calling process: it is linked to
%% its caller until it has sent the answer.
running_for_me(Pid) ->
    case erlang:process_info(Pid, links) of
        {links, Links} -> lists:member(self(), Links);
        undefined -> false
    end.

%% Kills a runner and waits for it to be gone, so that an answer it sent first is in the
%% mailbox now.
stop(Pid) ->
    unlink(Pid),
    Mref = monitor(process, Pid),
    exit(Pid, kill),
    receive {'DOWN', Mref, process, Pid, _} -> ok end.

flush(Id) ->
    receive {erpy_reply, Id, _} -> ok after 0 -> ok end.

flush_taken(Id) ->
    receive {erpy_reply, Id, _} -> ok after 0 -> {error, {badarg, {async_id, Id}}} end.

run(Caller, Ref, Nesting, Request) ->
    erpy_call:set_nesting(Nesting),
    Answer = try Request()
             catch Class:Reason -> {error, {Class, Reason}}
             end,
    Caller ! {erpy_reply, {erpy_async, Ref, self()}, Answer},
    unlink(Caller).
