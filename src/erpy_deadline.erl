%% Deadlines in monotonic milliseconds, as every request path counts them: a timeout
%% becomes a deadline once, when the request starts, and what is left of it is asked
%% at each wait.
-module(erpy_deadline).

-export([at/1, remaining/1]).
-export_type([deadline/0]).

-type deadline() :: integer() | infinity.

%% @doc The deadline `Timeout` milliseconds from now.
-spec at(timeout()) -> deadline().
at(infinity) -> infinity;
at(Timeout) -> erlang:monotonic_time(millisecond) + Timeout.

%% @doc What is left until `Deadline`, in milliseconds (0 once it has passed).
-spec remaining(deadline()) -> timeout().
remaining(infinity) -> infinity;
remaining(Deadline) -> max(0, Deadline - erlang:monotonic_time(millisecond)).
