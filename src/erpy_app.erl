%% The erpy OTP application: starts the top supervisor.
-module(erpy_app).
-behaviour(application).

-export([start/2, stop/1]).

%% application.

-spec start(application:start_type(), term()) -> {ok, pid()} | {error, term()}.
start(_Type, _Args) ->
    erpy_sup:start_link().

-spec stop(term()) -> ok.
stop(_State) ->
    ok.
