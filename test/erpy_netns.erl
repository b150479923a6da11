%% Test hosts as network namespaces (test/netns/netns.sh): for suites that need several
%% machines (the partition suite). Each host has its own address (10.77.0.I+1), loopback
%% and EPMD; the hosts meet on a bridge in a namespace of its own, so no traffic leaves
%% them. Everything is keyed by a prefix holding this VM's OS pid, so `clean/0` can remove
%% what a crashed run left (its VM is gone) without touching a run still going.
-module(erpy_netns).

-export([available/0, clean/0, up/1, down/1, cut/2, heal/2, addr/1, ns/2,
         spawn_in/5, stop/1, signal/2]).

-type net() :: #{prefix := string(), hosts := non_neg_integer()}.
-export_type([net/0]).

%% ok, or {skip, Why} when namespaces cannot be made here (not root, no iproute2, a
%% container without CAP_SYS_ADMIN).
-spec available() -> ok | {skip, string()}.
available() ->
    case sh(["probe", prefix()]) of
        {0, _} -> ok;
        {_, Out} -> {skip, "network namespaces unavailable: " ++ string:trim(Out)}
    end.

%% Removes the namespaces (and every process in them) of earlier runs whose VM is gone.
-spec clean() -> ok.
clean() ->
    {_, _} = sh(["clean"]),
    ok.

-spec up(pos_integer()) -> {ok, net()} | {error, string()}.
up(Hosts) ->
    Net = #{prefix => prefix(), hosts => Hosts},
    ok = down(Net),
    case sh(["up", prefix(), integer_to_list(Hosts)]) of
        {0, _} -> {ok, Net};
        {_, Out} -> ok = down(Net), {error, Out}
    end.

%% Kills every process in the net's namespaces and deletes them (their links go with them).
-spec down(net()) -> ok.
down(#{prefix := P}) ->
    {_, _} = sh(["down", P]),
    ok.

%% Unplugs host I's cable: its port on the bridge goes down; the host itself sees its
%% carrier go.
-spec cut(net(), non_neg_integer()) -> ok.
cut(#{prefix := P}, I) -> {0, _} = sh(["cut", P, integer_to_list(I)]), ok.

-spec heal(net(), non_neg_integer()) -> ok.
heal(#{prefix := P}, I) -> {0, _} = sh(["heal", P, integer_to_list(I)]), ok.

-spec addr(non_neg_integer()) -> string().
addr(I) -> "10.77.0." ++ integer_to_list(I + 1).

-spec ns(net(), non_neg_integer()) -> string().
ns(#{prefix := P}, I) -> P ++ "-h" ++ integer_to_list(I).

%% Runs Exe with Args on host I, under a process of its own that owns the port (so the
%% caller may be short-lived) and logs its output through Log (fun((binary()) -> any())).
%% Returns the holder and the OS pid; stop/1 kills the OS process and closes the port.
-spec spawn_in(net(), non_neg_integer(), string(), [string()], [{string(), string()}]) ->
          {pid(), integer()}.
spawn_in(Net, I, Exe, Args, Env) ->
    Self = self(),
    Tag = filename:basename(Exe) ++ "@h" ++ integer_to_list(I),
    Holder = spawn(fun() ->
                           %% `ip netns exec` execs the command: the port's OS pid is its pid.
                           Port = open_port({spawn_executable, ip()},
                                            [{args, ["netns", "exec", ns(Net, I), Exe | Args]},
                                             {env, Env}, exit_status, use_stdio,
                                             stderr_to_stdout, {line, 4096}]),
                           {os_pid, Pid} = erlang:port_info(Port, os_pid),
                           Self ! {self(), started, Pid},
                           hold(Port, Pid, Tag)
                   end),
    receive {Holder, started, Pid} -> {Holder, Pid} end.

-spec stop({pid(), integer()}) -> ok.
stop({Holder, Pid}) ->
    ok = signal(Pid, "KILL"),
    Holder ! stop,
    ok.

%% kill -Sig Pid.
-spec signal(integer(), string()) -> ok.
signal(Pid, Sig) ->
    _ = os:cmd("kill -" ++ Sig ++ " " ++ integer_to_list(Pid) ++ " 2>/dev/null"),
    ok.

hold(Port, Pid, Tag) ->
    receive
        stop -> catch port_close(Port);
        {Port, {data, {_, Line}}} -> log("~ts[~p]: ~ts", [Tag, Pid, Line]), hold(Port, Pid, Tag);
        {Port, {exit_status, S}} -> log("~ts[~p] exited: ~p", [Tag, Pid, S])
    end.

log(Fmt, Args) ->
    catch ct:log(Fmt, Args),
    ok.

prefix() -> "erpyt" ++ os:getpid().

ip() ->
    case os:find_executable("ip") of
        false -> "/usr/sbin/ip";
        Path -> Path
    end.

script() ->
    filename:join([root(), "test", "netns", "netns.sh"]).

%% The checkout: ERPY_ROOT (the Makefile sets it), else where this module's source is.
root() ->
    case os:getenv("ERPY_ROOT") of
        false -> filename:dirname(filename:dirname(proplists:get_value(source, module_info(compile))));
        R -> R
    end.

%% The script's exit status and output.
sh(Args) ->
    Script = script(),
    Port = open_port({spawn_executable, "/bin/sh"},
                     [{args, [Script | Args]}, {env, [{"IP", ip()}]}, exit_status,
                      stderr_to_stdout, binary]),
    collect(Port, []).

collect(Port, Acc) ->
    receive
        {Port, {data, D}} -> collect(Port, [Acc, D]);
        {Port, {exit_status, S}} -> {S, unicode:characters_to_list(iolist_to_binary(Acc))}
    end.
