%% The workers of one pool. The pool server starts and replaces them itself (with
%% back-off), so they are temporary here.
-module(erpy_worker_sup).
-behaviour(supervisor).

-export([start_link/0]).
-export([init/1]).

%% API.

-spec start_link() -> {ok, pid()} | {error, term()}.
start_link() ->
    supervisor:start_link(?MODULE, []).

%% supervisor.

-spec init([]) -> {ok, {supervisor:sup_flags(), [supervisor:child_spec()]}}.
init([]) ->
    Flags = #{strategy => simple_one_for_one, intensity => 0, period => 1},
    Worker = #{id => worker,
               start => {erpy_port_worker, start_link, []},
               restart => temporary,
               shutdown => 5000},
    {ok, {Flags, [Worker]}}.
