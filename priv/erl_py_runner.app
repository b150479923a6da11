%% The application erl_py_runner as erpy provides it (src/erl_py_runner.erl): listed in
%% an application's `applications`, it starts the `erl_py_runner` pool as the seed did.
%% rebar.config's post-compile hook copies this file next to erpy.app in ebin/.
{application, erl_py_runner, [
    {description, "erl_py_runner's API on erpy (doc/dropin.md)"},
    {vsn, "0.1.0"},
    {registered, [erl_py_runner_sup]},
    {mod, {erl_py_runner, []}},
    {applications, [kernel, stdlib, erpy]},
    {env, []},
    {modules, [erl_py_runner]},
    {licenses, ["MIT"]},
    {links, []}
]}.
