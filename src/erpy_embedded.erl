%% An embedded pool: Python inside this VM (c_src/nif), `size` contexts with their own
%% namespaces, each served by a thread of its own. This server owns the pool (it closes
%% with the server) and logs what Python prints; requests do not pass through it: the
%% caller submits to the NIF and waits in its own process for the answer, running the
%% callbacks Python makes into Erlang meanwhile, as in port mode.
-module(erpy_embedded).
-behaviour(gen_server).
-behaviour(erpy_transport).

-export([start_link/2]).
-export([prepare/1, child_specs/2, request/4, request_worker/3, checkout/2, checkin/1, info/1, interpreter/1, reactor/5]).
-export([async_request/4, async_request_worker/3, async_await/2, async_cancel/1, adopt/3]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

%% At most this many polls before a caller blocks; the NIF ends the spin sooner, after
%% spin_us or at once when spinning does not pay (c_src/common/spin_wait.hpp).
-define(SPIN, 200).
%% The longest a context and a caller spin before they block (adaptive, see above).
-define(DEFAULT_SPIN_US, 50).

%% A held context: the pool's name and the NIF's context.
-type ref() :: {atom(), reference()}.

%% API.

-spec start_link(atom(), map()) -> {ok, pid()} | {error, term()}.
start_link(Name, Opts) ->
    gen_server:start_link(?MODULE, {Name, Opts}, []).

%% erpy_transport.

%% Contexts are threads sharing the interpreter (and, before 3.12, its GIL);
%% subinterpreters with a GIL each need Python 3.12+ (PEP 684): asked for where the
%% interpreter cannot give them, the pool does not start. The VM's one Python starts with
%% the first embedded pool, here, so that a failure is start_pool/2's clear error.
-spec prepare(map()) -> {ok, map()} | {error, term()}.
prepare(#{python := Python} = Opts) ->
    maybe_ok([fun() -> erpy_config:no_rlimits(Opts) end,
              fun() -> erpy_nif:init(unicode:characters_to_binary(Python),
                                     unicode:characters_to_binary(erpy_config:python_dir()))
              end,
              fun() -> check_contexts(maps:get(contexts, Opts, threads)) end], Opts).

maybe_ok([], Opts) -> {ok, Opts};
maybe_ok([Step | Rest], Opts) ->
    case Step() of
        ok -> maybe_ok(Rest, Opts);
        {error, _} = Error -> Error
    end.

check_contexts(threads) ->
    ok;
check_contexts(subinterpreters) ->
    #{version := V, own_gil_subinterpreters := Own} = erpy_nif:python_info(),
    Why = case Own of
              false -> {needs_python, <<"3.12">>, V};
              true -> {not_implemented, V}
          end,
    {error, {unsupported, {contexts, subinterpreters, Why}}};
check_contexts(Other) ->
    {error, {badarg, {contexts, Other}}}.

-spec child_specs(atom(), map()) -> {supervisor:sup_flags(), [supervisor:child_spec()]}.
child_specs(Name, Opts) ->
    %% Python runs in this VM: one server owns the pool's contexts.
    {#{strategy => one_for_one, intensity => 5, period => 10},
     [#{id => pool, start => {?MODULE, start_link, [Name, Opts]}, type => worker}]}.

%% A request to any free context of the pool (queued in order when all are busy), or,
%% inside a callback of this pool's Python, to the context that waits for it.
-spec request(map(), erpy_transport:request(), timeout(), erpy:call_opts()) ->
    erpy_transport:result().
request(#{name := Name, pool := Pool} = Handle, Req, Timeout, _Opts) ->
    Target = case erpy_call:nested_worker(Name) of
                 {ok, Ctx} -> Ctx;
                 error -> Pool
             end,
    submit_and_wait(Target, Handle, Req, Timeout).

-spec request_worker(ref(), erpy_transport:request(), timeout()) -> erpy_transport:result().
request_worker({Name, Ctx}, Req, Timeout) ->
    case erpy_transport:lookup(Name) of
        {ok, ?MODULE, Handle} -> submit_and_wait(Ctx, Handle, Req, Timeout);
        _ -> {error, {no_pool, Name}}
    end.

%% Asynchronous requests (erpy_async): the NIF answers the caller itself, as
%% {erpy_reply, {erpy_async, Ref, {erpy_embedded, Job}}, Answer} with Answer what erpy:call returns, nobody
%% waiting for it; and {error, timeout} at the request's deadline (the NIF's service
%% thread keeps it), {error, {no_pool, Name}} if the pool stops first. A job that needs
%% Erlang (a callback from Python, a result holding funs, pids or references to check) is
%% handed to this pool's server, which starts a runner for it (adopt/2).
-spec async_request(map(), erpy_transport:request(), timeout(), erpy:call_opts()) ->
    {ok, reference(), erpy_nif:job()} | {error, erpy:error_reason()}.
async_request(#{name := Name, pool := Pool} = Handle, Req, Timeout, _Opts) ->
    Target = case erpy_call:nested_worker(Name) of
                 {ok, Ctx} -> Ctx;
                 error -> Pool
             end,
    async_submit(Target, Handle, Req, Timeout).

-spec async_request_worker(ref(), erpy_transport:request(), timeout()) ->
    {ok, reference(), erpy_nif:job()} | {error, erpy:error_reason()}.
async_request_worker({Name, Ctx}, Req, Timeout) ->
    case erpy_transport:lookup(Name) of
        {ok, ?MODULE, Handle} -> async_submit(Ctx, Handle, Req, Timeout);
        _ -> {error, {no_pool, Name}}
    end.

%% Its caller awaits the job: {done, Answer} (polled for while that pays, with `Spin`, as
%% submit_and_wait does), wait (the answer comes as the message), answered (it came
%% already), {runner, Pid} (that process answers), or not_yours (not the caller's job).
-spec async_await(erpy_nif:job(), boolean()) ->
    {done, term()} | wait | answered | {runner, pid()} | not_yours.
async_await(Job, Spin) ->
    async_spin(Job, case Spin of true -> ?SPIN; false -> 0 end).

async_spin(Job, N) ->
    case erpy_nif:async_poll(Job, N =:= 0) of
        pending -> erlang:yield(), async_spin(Job, N - 1);
        Other -> Other
    end.

%% canceled (no answer comes), sent (it is in the caller's mailbox unless taken), {runner,
%% Pid}: the job's runner may still answer (erpy_async stops it), not_yours: nothing done.
-spec async_cancel(erpy_nif:job()) -> canceled | sent | {runner, pid()} | not_yours.
async_cancel(Job) ->
    erpy_nif:async_cancel(Job).

%% The runner of an asynchronous job that needs Erlang: it takes the job over and ends it
%% as a synchronous caller would (submit_and_wait): callbacks run here, checked by the
%% policy context the caller's own call would have (the caller's pid, the request as
%% given), under the caller's nesting; the answer is checked and translated the same way;
%% the deadline is the request's. Linked to the caller as erpy_async's runners are, from
%% before it takes the job until after it answered (so the caller knows it runs for it).
-spec adopt(erpy_nif:job(), pid(), map()) -> ok.
adopt(Job, Caller, Handle) ->
    try link(Caller) of
        true ->
            case erpy_nif:async_adopt(Job) of
                {ok, Ref, Caller, Req, Nesting, Left} ->
                    run_adopted(Job, Handle, Ref, Caller, Req, Nesting, erpy_deadline:at(Left));
                gone -> unlink(Caller), ok
            end
    catch
        error:noproc ->
            %% Nobody to answer: the job ends here.
            _ = erpy_nif:async_adopt(Job) =:= gone orelse erpy_nif:cancel(Job),
            ok
    end.

run_adopted(Job, #{name := Name, policy := Policy} = Handle, Ref, Caller, Req, Nesting, Deadline) ->
    erpy_call:set_nesting(Nesting),
    Ctx = erpy_policy:request_ctx(Policy, Caller, Req),
    Answer = try answer(Name, Ctx, spin(Ref, Job, Handle#{ctx => Ctx}, Deadline, ?SPIN))
             catch
                 error:{erpy_nif, Why} ->
                     _ = (catch erpy_nif:cancel(Job)),
                     flush(Ref),
                     {error, Why};
                 Class:Reason ->
                     _ = (catch erpy_nif:cancel(Job)),
                     {error, {Class, Reason}}
             after
                 erpy_policy:done(Ctx)
             end,
    Caller ! {erpy_reply, {erpy_async, Ref, {?MODULE, Job}}, Answer},
    unlink(Caller),
    ok.

-spec checkout(map(), timeout()) -> {ok, ref()} | {error, erpy:error_reason()}.
checkout(#{name := Name, pool := Pool} = Handle, Timeout) ->
    case submit_and_wait(Pool, Handle, hold, Timeout) of
        {ok, Ctx} -> {ok, {Name, Ctx}};
        Error -> Error
    end.

-spec checkin(ref()) -> ok.
checkin({_Name, Ctx}) ->
    erpy_nif:checkin(Ctx).

%% Its contexts are threads of the VM's one interpreter (subinterpreters are refused).
-spec interpreter(term()) -> shared | per_worker.
interpreter(_Handle) -> shared.

-spec info(map()) -> #{mode := embedded, size := non_neg_integer(), atom() => term()}.
info(#{pid := Pid}) ->
    (gen_server:call(Pid, info))#{mode => embedded}.

%% gen_server.

-spec init({atom(), map()}) -> {ok, map()} | {stop, term()}.
init({Name, Opts}) ->
    process_flag(trap_exit, true),
    Python = unicode:characters_to_binary(maps:get(python, Opts)),
    case erpy_nif:init(Python, unicode:characters_to_binary(erpy_config:python_dir())) of
        ok ->
            NifOpts = #{none => maps:get(none, Opts, undefined),
                        binary => maps:get(binary, Opts, str),
                        spin_us => maps:get(spin_us, Opts, ?DEFAULT_SPIN_US),
                        kill_grace_ms => maps:get(kill_grace_ms, Opts, 2000),
                        %% What Python sends (results, callbacks) is bounded as port mode's
                        %% frames are; it makes new atoms only as the pool allows, and never
                        %% in the last 5% of the atom table.
                        max_message_size => maps:get(max_message_size, Opts),
                        new_atoms => maps:get(new_atoms, Opts, 0),
                        atom_headroom => erlang:system_info(atom_limit) * 95 div 100
                                         - erlang:system_info(atom_count)},
            Pool = erpy_nif:pool_new(maps:get(size, Opts), self(), NifOpts),
            Handle = #{mode => embedded, name => Name, pid => self(), pool => Pool,
                       size => maps:get(size, Opts), policy => erpy_policy:new(Name, Opts),
                       max_message_size => maps:get(max_message_size, Opts)},
            ok = erpy_transport:register(Name, ?MODULE, Handle),
            {ok, #{name => Name, pool => Pool, handle => Handle}};
        {error, Why} ->
            {stop, Why}
    end.

-spec handle_call(term(), gen_server:from(), map()) -> {reply, term(), map()}.
handle_call(info, _From, #{pool := Pool} = St) ->
    {reply, erpy_nif:pool_info(Pool), St};
handle_call(_Msg, _From, St) ->
    {reply, {error, unknown_call}, St}.

-spec handle_cast(term(), map()) -> {noreply, map()}.
handle_cast(_Msg, St) ->
    {noreply, St}.

-spec handle_info(term(), map()) -> {noreply, map()}.
handle_info({erpy_log, Stream, Text}, #{name := Name} = St) ->
    %% notice: shown by a default logger setup, as print() output is expected to be.
    Level = case Stream of stderr -> warning; _ -> notice end,
    logger:log(Level, "~ts", [Text], #{domain => [erpy, python], pool => Name, stream => Stream}),
    {noreply, St};
handle_info({erpy_async_adopt, Job, Caller}, #{handle := Handle} = St) ->
    %% An asynchronous job needs Erlang: a process of its own takes it over, so that a
    %% slow callback holds up no other request (and never this server).
    _ = spawn(?MODULE, adopt, [Job, Caller, Handle]),
    {noreply, St};
handle_info(_Msg, St) ->
    {noreply, St}.

-spec terminate(term(), map()) -> ok.
terminate(_Why, #{name := Name, pool := Pool}) ->
    ok = erpy_transport:unregister(Name),
    %% Running jobs are interrupted; their callers get {error, {no_pool, _}} or time out.
    erpy_nif:pool_close(Pool).

%% The fd reactor runs a process per connection that waits with enif_select.
-spec reactor(map(), atom(), non_neg_integer(), map(), map()) -> {ok, pid()} | {error, term()}.
reactor(Handle, Pool, Fd, Info, Config) ->
    erpy_reactor:embedded(Pool, Handle, Fd, Info, Config).

%% Internal.

async_submit(Target, #{name := Name}, Req, Timeout) ->
    Ref = make_ref(),
    Closed = {error, {no_pool, Name}},
    try erpy_nif:async_submit(Target, Ref, for_caller(Req, Timeout), Timeout, Closed, erpy_call:nesting()) of
        {ok, Job} -> {ok, Ref, Job};
        {error, closed} -> Closed
    catch
        error:{erpy_nif, Why} -> {error, Why}
    end.

submit_and_wait(Target, #{name := Name, policy := Policy} = Handle, Req, Timeout) ->
    Ref = make_ref(),
    %% A NIF whose C++ failed raises error:{erpy_nif, Reason}: a value here, as every error.
    try erpy_nif:submit(Target, Ref, for_caller(Req, Timeout)) of
        {ok, Job} ->
            Ctx = erpy_policy:request_ctx(Policy, self(), Req),
            try answer(Name, Ctx, spin(Ref, Job, Handle#{ctx => Ctx}, erpy_deadline:at(Timeout), ?SPIN))
            catch
                error:{erpy_nif, Why} ->
                    _ = (catch erpy_nif:cancel(Job)),
                    flush(Ref),
                    {error, Why}
            after
                erpy_policy:done(Ctx)
            end;
        {error, closed} ->
            {error, {no_pool, Name}}
    catch
        error:{erpy_nif, Why} -> {error, Why}
    end.

%% The NIF flags a result that holds funs, pids, references or ports (ok_check): the
%% policy checks its funs before the caller gets it.
%% A pool stopped while the job waited or ran answers as a stopped pool does in every mode.
answer(_Name, Ctx, {ok_check, Result}) ->
    case erpy_policy:check_result(Ctx, Result) of
        ok -> {ok, Result};
        Error -> Error
    end;
answer(Name, _Ctx, {error, pool_closed}) ->
    {error, {no_pool, Name}};
answer(_Name, _Ctx, Answer) ->
    Answer.

%% A short call answers within microseconds, sooner than this scheduler could go to sleep
%% and be woken by a message: poll for the answer a little (it waits in the job, so
%% Python's thread sends nothing), yielding between polls so that the other processes of
%% this scheduler (other callers, say) run meanwhile; then wait for it as a message. The
%% NIF says `wait` once spinning stops paying (adaptive: a busy machine makes callers
%% block at once).
spin(Ref, Job, Handle, Deadline, N) ->
    case erpy_nif:poll(Job, N =:= 0) of
        {done, Answer} -> Answer;
        pending -> erlang:yield(), spin(Ref, Job, Handle, Deadline, N - 1);
        wait -> wait(Ref, Job, Handle, Deadline);
        {Tag, Ctx, Kind, M, F, Args} when Tag =:= callback; Tag =:= callback_check ->
            callback(Ref, Job, Handle, Deadline, Tag, {Ctx, Kind, M, F, Args})
    end.

wait(Ref, Job, Handle, Deadline) ->
    receive
        {Ref, {Tag, Ctx, Kind, M, F, Args}} when Tag =:= callback; Tag =:= callback_check ->
            callback(Ref, Job, Handle, Deadline, Tag, {Ctx, Kind, M, F, Args});
        {Ref, Answer} ->
            Answer
    after erpy_deadline:remaining(Deadline) ->
        give_up(Ref, Job)
    end.

%% Runs a callback for Python, answers it, and goes back to polling for what follows.
callback(Ref, Job, Handle, Deadline, Tag, Call) ->
    erpy_nif:callback_reply(Job, run_callback(Handle, Tag, Call)),
    case erpy_deadline:remaining(Deadline) of
        0 -> give_up(Ref, Job);
        _ -> spin(Ref, Job, Handle, Deadline, ?SPIN)
    end.

%% The deadline passed: the job is cancelled (and interrupted, if it runs), unless its
%% answer came in the meantime, which then still counts.
give_up(Ref, Job) ->
    case erpy_nif:cancel(Job) of
        canceled ->
            flush(Ref),
            {error, timeout};
        {done, Answer} ->
            Answer;
        sent ->
            flush_answer(Ref)
    end.

flush_answer(Ref) ->
    receive {Ref, {Tag, _, _, _, _, _}} when Tag =:= callback; Tag =:= callback_check ->
                flush_answer(Ref);
            {Ref, Answer} -> Answer
    end.

flush(Ref) ->
    receive {Ref, _} -> flush(Ref)
    after 0 -> ok
    end.

%% Python called erlang.call/apply/send: checked by the pool's policy, then run in this
%% process (so self() is the caller, and a nested erpy call goes back to the waiting
%% context). `callback_check`: the NIF saw funs, pids, references or ports in it.
run_callback(#{name := Name, ctx := Ctx}, Tag, {PyCtx, Kind, M, F, Args}) ->
    Mode = case Tag of
               callback -> trusted;
               callback_check -> check
           end,
    erpy_policy:run_callback(Ctx, Name, PyCtx, Kind, M, F, {Mode, Args}).


for_caller(hold, _Timeout) -> hold;
for_caller(Req, Timeout) -> erpy_request:for_caller(Req, self(), Timeout).

