%% The supervisor of one pool: what runs under it is its mode's (erpy_transport).
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
init({Name, #{mode := Mode} = Opts}) ->
    ok = erpy_reactor:configure(Name, Opts),
    %% What runs under a pool is its mode's (erpy_transport:child_specs/2).
    {ok, (erpy_transport:module(Mode)):child_specs(Name, Opts)}.
