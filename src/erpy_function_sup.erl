%% Supervision of function instances (erpy_function).
%%
%%   erpy_sup
%%    └─ erpy_function_sup            (top: simple_one_for_one, started on first use)
%%        └─ erpy_function_sup        (one per instance: its restart limit)
%%            └─ erpy_function        (the instance, transient and significant)
%%
%% Each instance has a supervisor of its own, so that its restart limit is its own: an
%% instance that keeps crashing goes away alone (its supervisor gives up and, being
%% temporary, is not restarted) and the others carry on. A normal stop of the instance
%% ends its supervisor too (auto_shutdown). The top supervisor owns the registry of
%% running instances by id.
-module(erpy_function_sup).
-behaviour(supervisor).

-export([ensure_started/0, start_instance/1, start_link/1]).
-export([init/1]).

-define(REGISTRY, erpy_function_registry).

%% API.

%% @doc Starts the top supervisor under erpy_sup unless it runs.
-spec ensure_started() -> ok.
ensure_started() ->
    case whereis(?MODULE) of
        undefined ->
            Spec = #{id => ?MODULE, start => {?MODULE, start_link, [top]},
                     type => supervisor, shutdown => infinity},
            case supervisor:start_child(erpy_sup, Spec) of
                {ok, _} -> ok;
                {error, {already_started, _}} -> ok;
                {error, already_present} ->
                    %% Stopped earlier (its restart limit): start it again.
                    case supervisor:restart_child(erpy_sup, ?MODULE) of
                        {ok, _} -> ok;
                        {error, running} -> ok;
                        {error, {already_started, _}} -> ok
                    end
            end;
        _ ->
            ok
    end.

%% @doc Starts an instance (checked options, see erpy_function:start/1) with its own
%% supervisor; answers the instance's pid.
-spec start_instance(map()) -> {ok, pid()} | {error, term()}.
start_instance(Opts) ->
    ok = ensure_started(),
    case supervisor:start_child(?MODULE, [{instance, Opts}]) of
        {ok, Sup} ->
            case supervisor:which_children(Sup) of
                [{_, Pid, _, _}] when is_pid(Pid) -> {ok, Pid};
                Other -> {error, {no_instance, Other}}
            end;
        {error, {shutdown, {failed_to_start_child, _, Why}}} ->
            {error, unwrap(Why)};
        {error, Why} ->
            {error, Why}
    end.

-spec start_link(top | {instance, map()}) -> {ok, pid()} | ignore | {error, term()}.
start_link(top) ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, top);
start_link({instance, Opts}) ->
    supervisor:start_link(?MODULE, {instance, Opts}).

%% supervisor.

-spec init(top | {instance, map()}) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init(top) ->
    ?REGISTRY = ets:new(?REGISTRY, [named_table, public, set, {read_concurrency, true}]),
    {ok, {#{strategy => simple_one_for_one, intensity => 10, period => 10},
          [#{id => instance, start => {?MODULE, start_link, []}, restart => temporary,
             type => supervisor, shutdown => infinity}]}};
init({instance, #{max_restarts := {Intensity, Period}} = Opts}) ->
    {ok, {#{strategy => one_for_one, intensity => Intensity, period => Period,
            auto_shutdown => any_significant},
          [#{id => instance, start => {gen_server, start_link, [erpy_function, Opts, []]},
             restart => transient, significant => true, shutdown => 10000,
             type => worker, modules => [erpy_function]}]}}.

%% Internal.

%% gen_server's {stop, Why} from init arrives as Why (or {Why, Stack}).
unwrap({error, Why}) -> Why;
unwrap(Why) -> Why.
