%% The supervisor of one pool: its worker supervisor and its pool server, restarted
%% together (one_for_all), so a pool never outlives its workers or the other way round.
-module(erpy_pool_sup).
-behaviour(supervisor).

-export([start_link/2]).
-export([init/1]).

%% API.

-spec start_link(atom(), map()) -> {ok, pid()} | {error, term()}.
start_link(Name, Opts) ->
    supervisor:start_link(?MODULE, {Name, Opts}).

%% supervisor.

-spec init({atom(), map()}) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init({Name, #{mode := embedded} = Opts}) ->
    %% Python runs in this VM: one server owns the pool's contexts.
    {ok, {#{strategy => one_for_one, intensity => 5, period => 10},
          [#{id => pool, start => {erpy_embedded, start_link, [Name, Opts]}, type => worker}]}};
init({Name, #{mode := node} = Opts}) ->
    {ok, {#{strategy => one_for_one, intensity => 5, period => 10},
          [#{id => pool, start => {erpy_node_pool, start_link, [Name, Opts]}, type => worker}]}};
init({Name, Opts}) ->
    Flags = #{strategy => one_for_all, intensity => 5, period => 10},
    Children = [#{id => workers,
                  start => {erpy_worker_sup, start_link, []},
                  type => supervisor},
                #{id => pool,
                  start => {erpy_pool, start_link, [Name, Opts, self()]},
                  type => worker}],
    {ok, {Flags, Children}}.
