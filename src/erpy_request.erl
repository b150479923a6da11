%% The one request schema (doc/protocol.md, "Requests"): what erpy asks Python to run, in
%% every mode. erpy.erl makes a request with call/4, eval/2, exec/1 or run/2; the
%% transport that carries it adds where it comes from (for_caller/3) and, node mode, what
%% only a node needs (max_size, session, reply_to). Python reads it with one C++ type
%% (c_src/py/request.hpp) whatever carried it: a port frame, a NIF term, a node's call.
-module(erpy_request).

-export([call/4, eval/2, exec/1, run/2, for_caller/3, with/2, version/0]).
-export_type([t/0, kind/0]).

-define(VERSION, 1).

-type kind() :: call | eval | exec | run.
-type t() :: #{v := ?VERSION,
               kind := kind(),
               module => binary() | reference(),
               function => binary(),
               args => term(),
               kwargs => map(),
               code => binary(),
               locals => map(),
               result => value | handle,
               deadline => non_neg_integer(),
               caller => pid(),
               max_size => non_neg_integer(),
               session => term(),
               reply_to => reference() | pid()}.

-spec version() -> pos_integer().
version() -> ?VERSION.

%% Module.Function(*Args, **Kwargs). `Module` may be a handle (embedded mode).
-spec call(binary() | reference(), binary(), [term()], map()) -> t().
call(Module, Function, Args, Kwargs) ->
    #{v => ?VERSION, kind => call, module => Module, function => Function, args => Args,
      kwargs => Kwargs}.

%% eval(Code) with Locals in scope.
-spec eval(binary(), map()) -> t().
eval(Code, Locals) ->
    #{v => ?VERSION, kind => eval, code => Code, locals => Locals}.

-spec exec(binary()) -> t().
exec(Code) ->
    #{v => ?VERSION, kind => exec, code => Code}.

%% erl_py_runner's contract: `arguments` in scope, `result` out.
-spec run(binary(), term()) -> t().
run(Code, Arguments) ->
    #{v => ?VERSION, kind => run, code => Code, args => Arguments}.

%% The request as sent by `Caller` with `Timeout` left: the deadline is wall-clock
%% milliseconds (a port's worker and the VM share the clock), 0 for none.
-spec for_caller(t(), pid(), timeout()) -> t().
for_caller(Req, Caller, Timeout) ->
    Deadline = case Timeout of
                   infinity -> 0;
                   _ -> os:system_time(millisecond) + Timeout
               end,
    Req#{caller => Caller, deadline => Deadline}.

%% Adds fields only some transports need (result, max_size, session, reply_to).
-spec with(t(), map()) -> t().
with(Req, Fields) ->
    maps:merge(Req, Fields).
