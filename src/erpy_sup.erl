%% The top supervisor of erpy: one child per pool (an erpy_pool_sup), the default pool
%% and those of the `pools` env started with the application, others by start_pool/2.
-module(erpy_sup).
-behaviour(supervisor).

-export([start_link/0, start_pool/2, stop_pool/1]).
-export([init/1]).

%% API.

-spec start_link() -> {ok, pid()} | ignore | {error, term()}.
start_link() ->
    case supervisor:start_link({local, ?MODULE}, ?MODULE, []) of
        {ok, Pid} ->
            [start_configured(Name, Opts) || {Name, Opts} <- erpy_config:default_pools()],
            {ok, Pid};
        Other ->
            Other
    end.

-spec start_pool(atom(), map()) -> {ok, pid()} | {error, term()}.
start_pool(Name, Opts) ->
    case erpy_config:pool_opts(Opts) of
        {ok, Full} ->
            Spec = #{id => {pool, Name},
                     start => {erpy_pool_sup, start_link, [Name, Full]},
                     type => supervisor,
                     shutdown => infinity},
            case supervisor:start_child(?MODULE, Spec) of
                {error, {already_started, _}} -> {error, {already_started, Name}};
                {error, already_present} -> {error, {already_started, Name}};
                Other -> Other
            end;
        Error ->
            Error
    end.

-spec stop_pool(atom()) -> ok | {error, not_found}.
stop_pool(Name) ->
    case supervisor:terminate_child(?MODULE, {pool, Name}) of
        ok -> supervisor:delete_child(?MODULE, {pool, Name});
        {error, not_found} -> {error, not_found}
    end.

%% supervisor.

-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    %% Slot -> worker pid of every pool, read by callers; owned here so it outlives pools.
    erpy_workers = ets:new(erpy_workers, [named_table, public, set, {read_concurrency, true}]),
    {ok, {#{strategy => one_for_one, intensity => 10, period => 10}, []}}.

%% Internal.

start_configured(Name, Opts) ->
    case start_pool(Name, Opts) of
        {ok, _} -> ok;
        {error, Why} ->
            logger:error("erpy: pool ~p did not start: ~p", [Name, Why], #{domain => [erpy]})
    end.
