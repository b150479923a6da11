%% Port mode's transport (erpy_transport): a pool of Python worker processes, each behind
%% a port (ETF frames with 4-byte lengths on fds 3 and 4, split by erpy_frame). The pool
%% server is erpy_pool, a worker is erpy_port_worker, the caller's side of a request is
%% erpy_call.
-module(erpy_port).
-behaviour(erpy_transport).

-export([prepare/1, child_specs/2, request/4, request_worker/3, checkout/2, checkin/1, info/1, interpreter/1, reactor/5]).

-type ref() :: {erpy:pool(), pid()}.

-spec prepare(map()) -> {ok, map()} | {error, term()}.
prepare(Opts) ->
    case erpy_config:check_rlimits(Opts) of
        ok -> {ok, Opts};
        Error -> Error
    end.

-spec child_specs(atom(), map()) -> {supervisor:sup_flags(), [supervisor:child_spec()]}.
child_specs(Name, Opts) ->
    %% The workers' supervisor and the pool server are restarted together (one_for_all),
    %% so a pool never outlives its workers or the other way round.
    {#{strategy => one_for_all, intensity => 5, period => 10},
     [#{id => workers, start => {erpy_worker_sup, start_link, []}, type => supervisor},
      %% The pool server asks its supervisor (the caller of child_specs/2) for its sibling.
      #{id => pool, start => {erpy_pool, start_link, [Name, Opts, self()]}, type => worker}]}.

-spec request(erpy_pool:handle(), erpy_transport:request(), timeout(), erpy:call_opts()) ->
    erpy_transport:result().
request(#{name := Pool}, #{result := handle}, _Timeout, _Opts) ->
    %% Handles are Python objects living in this VM: embedded mode only.
    {error, {not_supported, {handle, Pool}}};
request(Handle, Req, Timeout, _Opts) ->
    erpy_call:request(Handle, Req, Timeout).

-spec request_worker(ref(), erpy_transport:request(), timeout()) -> erpy_transport:result().
request_worker({Pool, _Pid}, #{result := handle}, _Timeout) ->
    {error, {not_supported, {handle, Pool}}};
request_worker({Pool, Pid}, Req, Timeout) ->
    erpy_call:request_worker(Pool, Pid, Req, Timeout).

-spec checkout(erpy_pool:handle(), timeout()) -> {ok, ref()} | {error, erpy:error_reason()}.
checkout(#{name := Pool}, Timeout) ->
    erpy_pool:checkout(Pool, Timeout).

-spec checkin(ref()) -> ok.
checkin(Ref) ->
    erpy_pool:checkin(Ref).

-spec interpreter(term()) -> shared | per_worker.
interpreter(_Handle) -> per_worker.

-spec info(erpy_pool:handle()) -> #{mode := port, size := non_neg_integer(), atom() => term()}.
info(#{name := Pool}) ->
    (erpy_pool:info(Pool))#{mode => port}.

%% The fd reactor sends the fd to a worker, whose own loop runs the protocol.
-spec reactor(map(), atom(), non_neg_integer(), map(), map()) -> {ok, term()} | {error, term()}.
reactor(Handle, Pool, Fd, Info, Config) ->
    erpy_reactor:port(Pool, Handle, Fd, Info, Config).
