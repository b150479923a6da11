%% The caller's side of a request: encode it once, send it to a pool (or straight to a
%% held or nesting worker), wait for the answer, and run the callbacks Python makes while
%% it works. Callbacks run in the caller's own process, so `self()` inside them is the
%% caller and a nested erpy call from a callback reuses the worker that is waiting for it.
-module(erpy_call).

-export([request/3, request_worker/4, nested_worker/1]).
-export([encode_request/4, encode_request/5, apply_callback/3, nesting/0, set_nesting/1]).
-export([callback_reply/6]).

-define(NESTED, '$erpy_nested').

%% API.

%% A request to the pool of `Handle` (erpy_pool:lookup/1, as the caller found it).
-spec request(erpy_pool:handle(), erpy_transport:request(), timeout()) -> {ok, term()} | {error, term()}.
request(#{name := Pool, max_message_size := Max, policy := Policy} = Handle, Req, Timeout) ->
    %% Encoded and size-checked before a slot is claimed: a refused request holds nothing.
    case nested_worker(Pool) of
        {ok, Worker} ->
            with_frame(nested, Max, Policy, Req, Timeout,
                       fun(Frame, Ctx, Deadline) ->
                               send_and_wait(erpy_nested, Worker, Pool, Ctx, Frame, Deadline)
                       end);
        error ->
            with_frame(request, Max, Policy, Req, Timeout,
                       fun(Frame, Ctx, Deadline) -> via_pool(Handle, Ctx, Frame, Deadline) end)
    end.

-spec request_worker(erpy:pool(), pid(), erpy_request:t(), timeout()) -> {ok, term()} | {error, term()}.
request_worker(Pool, Pid, Req, Timeout) ->
    case erpy_pool:lookup(Pool) of
        {ok, #{max_message_size := Max, policy := Policy}} ->
            %% Made inside a callback of that same worker: it nests there.
            Kind = case nested_worker(Pool) of
                       {ok, Pid} -> nested;
                       _ -> request
                   end,
            with_frame(Kind, Max, Policy, Req, Timeout,
                       fun(Frame, Ctx, Deadline) ->
                               send_and_wait(erpy_request, Pid, Pool, Ctx, Frame, Deadline)
                       end);
        error ->
            {error, {no_pool, Pool}}
    end.

with_frame(Kind, Max, Policy, Req, Timeout, Fun) ->
    Id = erlang:unique_integer([positive]),
    Frame = encode_request(Kind, Req, Id, Timeout, self()),
    case erlang:iolist_size(Frame) of
        Size when Size > Max ->
            {error, {message_too_large, Size, Max}};
        _ ->
            Ctx = erpy_policy:request_ctx(Policy, self(), Req),
            Reply = try Fun({Id, Frame}, Ctx, erpy_deadline:at(Timeout))
                    catch Class:Reason:Stack ->
                        _ = erpy_policy:finish(Ctx),
                        erlang:raise(Class, Reason, Stack)
                    end,
            %% The answer is decoded last: nothing runs between its decoding and the
            %% return to the caller, which would make the VM collect garbage (a BIF call
            %% does, with the just decoded term's heap fragment pending) while the whole
            %% answer is live, copying it (W3b: 2 MB, a millisecond or more).
            decode_reply(erpy_policy:finish(Ctx), Reply)
    end.

%% The frame a port worker receives: {request, Id, Request}, Request the request map
%% (erpy_request) with its caller and deadline; {nested, Id, Request} for a request made
%% inside a callback of the worker's running request (Python runs it inside that
%% callback's wait, and only those: a pipelined request waits for the running one to
%% end). An iovec: large binaries in the arguments are referenced, not copied, on their
%% way to the port (a 1 MiB argument costs microseconds instead of a copy).
-spec encode_request(erpy_request:t(), integer(), timeout(), pid()) -> erlang:iovec().
encode_request(Req, Id, Timeout, Caller) ->
    encode_request(request, Req, Id, Timeout, Caller).

-spec encode_request(request | nested, erpy_request:t(), integer(), timeout(), pid()) -> erlang:iovec().
encode_request(Kind, Req, Id, Timeout, Caller) ->
    erlang:term_to_iovec({Kind, Id, erpy_request:for_caller(Req, Caller, Timeout)},
                         [{minor_version, 2}]).

%% Internal.

%% A free slot: straight to its worker. None: to the pool server, which queues it.
via_pool(#{name := Pool, pid := PoolPid, queued := Queued} = Handle, Ctx, Frame, Deadline) ->
    Target = case erpy_pool:claim(Handle) of
                 {ok, Slot} ->
                     case erpy_pool:worker_pid(Pool, Slot) of
                         undefined -> erpy_pool:unclaim(Handle, Slot), undefined;
                         Pid -> Pid
                     end;
                 none -> undefined
             end,
    Reply = case Target of
                undefined ->
                    counters:add(Queued, 1, 1),
                    send_and_wait(erpy_request, PoolPid, Pool, Ctx, Frame, Deadline);
                Worker ->
                    case send_and_wait(erpy_request, Worker, Pool, Ctx, Frame, Deadline) of
                        {error, {worker_exit, Why}} when Why =:= noproc;
                                                         element(1, Why) =:= shutdown ->
                            %% The worker was gone, or left without this request (it
                            %% answers every request it took before it leaves): nothing
                            %% ran, so the pool may place it again.
                            counters:add(Queued, 1, 1),
                            send_and_wait(erpy_request, PoolPid, Pool, Ctx, Frame, Deadline);
                        Answer ->
                            Answer
                    end
            end,
    case Reply of
        {retry, _} ->
            %% Its worker gave it back unstarted (it left, or it was busy longer while
            %% another one is free): placed again, with what is left of the deadline.
            via_pool(Handle, Ctx, Frame, Deadline);
        _ ->
            Reply
    end.

%% erpy_nested: a request made inside a callback, for the worker that waits for it.
send_and_wait(Tag, Target, Pool, Ctx, {Id, Bin}, Deadline) ->
    %% The monitor is also the alias the worker answers to: once we demonitor, a late
    %% answer (after a timeout) is dropped by the runtime, not queued here.
    Mref = erlang:monitor(process, Target, [{alias, demonitor}]),
    Target ! {Tag, Mref, self(), Id, Bin, Deadline},
    Reply = wait(Mref, Pool, Ctx, Deadline),
    %% Whatever else was sent to the alias before it went inactive (a crashing worker's
    %% answer and its pool's, a callback that raced the deadline) is dropped here, so no
    %% stray message outlives the call.
    flush(Mref),
    Reply.

%% Python's answer, undecoded (a binary), {error, Reason}, or {retry, Reason} when the
%% worker gave the request back without starting it.
wait(Mref, Pool, Ctx, Deadline) ->
    receive
        {erpy_reply, Mref, Reply} ->
            erlang:demonitor(Mref, [flush]),
            Reply;
        {erpy_callback, Mref, Worker, Port, CbId, Frame} ->
            run_callback(Pool, Ctx, Worker, Port, CbId, Frame),
            case erpy_deadline:remaining(Deadline) of
                0 ->
                    %% The deadline passed while the callback ran here: whatever Python
                    %% answers now comes from being interrupted.
                    erlang:demonitor(Mref, [flush]),
                    {error, timeout};
                _ ->
                    wait(Mref, Pool, Ctx, Deadline)
            end;
        {'DOWN', Mref, process, _, Why} ->
            {error, {worker_exit, Why}}
    after erpy_deadline:remaining(Deadline) ->
        erlang:demonitor(Mref, [flush]),
        %% An answer that arrived just now still counts.
        receive
            {erpy_reply, Mref, Reply} -> Reply
        after 0 ->
            {error, timeout}
        end
    end.

flush(Mref) ->
    receive
        {erpy_reply, Mref, _} -> flush(Mref);
        {erpy_callback, Mref, _, _, _, _} -> flush(Mref)
    after 0 ->
        ok
    end.

decode_reply(_Ctx, {error, _} = Error) ->
    Error;
decode_reply(_Ctx, {retry, Reason}) ->
    %% Given back unstarted where it cannot be placed again (a held or nesting worker).
    {error, Reason};
decode_reply(_Ctx, <<131, 104, 3, 119, 2, "ok", 97, _Id, 109, Len:32, Result:Len/binary>>) ->
    %% A result that is one binary (bytes, or a str as a binary) is the frame's tail as it
    %% is: no second copy by binary_to_term (the worker checked the frame's size).
    {ok, Result};
decode_reply(_Ctx, <<131, 104, 3, 119, 2, "ok", 98, _Id:32, 109, Len:32, Result:Len/binary>>) ->
    {ok, Result};
decode_reply(Ctx, Bin) when is_binary(Bin) ->
    case erpy_policy:decode(Ctx, Bin) of
        {ok, {ok, _Id, Result}} -> {ok, Result};
        {ok, {error, _Id, Reason}} -> {error, Reason};
        {ok, _Other} -> {error, {undecodable, <<"not an answer">>}};
        {error, _} = Error -> Error
    end.

%% Python called erlang.call/apply/send: the frame {callback, CbId, Kind, M, F, A} comes
%% undecoded from the worker; the policy decodes and checks it here.
run_callback(Pool, Ctx, Worker, Port, CbId, Frame) ->
    %% Any process may write to a port; if Python's worker died meanwhile, the pending
    %% request fails through the worker, so a failed write needs no handling here.
    erpy_port_worker:write(Port, callback_reply(Ctx, Pool, Pool, Worker, CbId, Frame)).

%% A callback frame from a port worker ({callback, CbId, Kind, M, F, A}), decoded and run
%% under the policy of `Ctx`, answered as the frame to write back. `Nest` is the pool an
%% erpy call made by the callback nests in (with `Worker` as its target); `Pool` bounds
%% the answer's size. Request callbacks and port-mode reactor callbacks both come here.
-spec callback_reply(erpy_policy:ctx(), atom(), atom(), term(), term(), binary()) -> binary().
callback_reply(Ctx, Pool, Nest, Worker, CbId, Frame) ->
    Result = case erpy_policy:decode(Ctx, Frame) of
                 {ok, {callback, CbId, call, M, F, A}} ->
                     erpy_policy:run_callback(Ctx, Nest, Worker, call, M, F, {check, [A]});
                 {ok, {callback, CbId, Kind, M, F, A}} when is_list(A) ->
                     erpy_policy:run_callback(Ctx, Nest, Worker, Kind, M, F, {check, A});
                 {ok, {callback, CbId, Kind, _, _, _}} ->
                     {error, {badarg, Kind}};
                 {ok, _} ->
                     {error, {badarg, callback}};
                 {error, _} = Error ->
                     Error
             end,
    encode_callback_reply(case Result of
                              {ok, Value} -> {reply, CbId, ok, Value};
                              {error, Error1} -> {reply, CbId, error, Error1}
                          end, Pool).

%% Runs an allowed callback in the calling process, with `Worker` as the target of the
%% erpy calls it makes (so they nest instead of waiting for a second worker). Every
%% mode's callbacks go through here.
-spec apply_callback(erpy:pool(), term(), {module(), atom(), [term()]}) ->
    {ok, term()} | {error, #{class := atom(), reason := term(), stacktrace := [binary()]}}.
apply_callback(Pool, Worker, {M, F, Args}) ->
    Saved = get(?NESTED),
    put(?NESTED, [{Pool, Worker} | stack(Saved)]),
    try apply(M, F, Args) of
        Value -> {ok, Value}
    catch
        Class:Reason:Stack ->
            {error, #{class => Class, reason => Reason, stacktrace => format_stack(Stack)}}
    after
        restore(Saved)
    end.

encode_callback_reply({reply, CbId, _, _} = Reply, Pool) ->
    Max = erpy_pool:max_message_size(Pool),
    Bin = try term_to_binary(Reply, [{minor_version, 2}])
          catch error:_ -> term_to_binary({reply, CbId, error, #{class => error, reason => unencodable}})
          end,
    case byte_size(Bin) of
        Size when Size > Max ->
            term_to_binary({reply, CbId, error, #{class => error,
                                                  reason => {message_too_large, Size, Max}}},
                           [{minor_version, 2}]);
        _ ->
            Bin
    end.

format_stack(Stack) ->
    [iolist_to_binary(io_lib:format("~p:~p/~p", [M, F, arity(A)])) || {M, F, A, _} <- Stack].

arity(A) when is_list(A) -> length(A);
arity(A) -> A.

%% Inside a callback of `Pool`'s Python, the worker that waits for it (a nested request
%% goes there): every mode's callbacks push it (apply_callback/3).
-spec nested_worker(erpy:pool()) -> {ok, term()} | error.
nested_worker(Pool) ->
    case get(?NESTED) of
        [{Pool, Worker} | _] -> {ok, Worker};
        _ -> error
    end.

%% The calling process's nesting stack, for a process that makes requests on its behalf
%% (erpy_async's runners), so that those nest as the caller's own would.
-spec nesting() -> term().
nesting() ->
    get(?NESTED).

-spec set_nesting(term()) -> ok.
set_nesting(undefined) ->
    ok;
set_nesting(Stack) ->
    put(?NESTED, Stack),
    ok.

stack(undefined) -> [];
stack(S) -> S.

restore(undefined) -> erase(?NESTED);
restore(Saved) -> put(?NESTED, Saved).


