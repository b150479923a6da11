"""erpy.function: the function API and its handler contract, with a recording host."""

from __future__ import annotations

import gc

import pytest

from erpy import function as fn


class RecordingHost(fn.Host):
    def __init__(self):
        self.log = []
        self.errors = []

    def cast(self, alias, msg):
        self.log.append(("cast", alias, msg))

    def cast_raw(self, dst, msg):
        self.log.append(("cast_raw", dst, msg))

    def call(self, alias, msg):
        self.log.append(("call", alias, msg))
        return b"reply-from-" + alias.encode()

    def call_raw(self, dst, msg):
        self.log.append(("call_raw", dst, msg))
        return fn.NoReply

    def delayed_cast(self, delay_ms, alias, msg):
        self.log.append(("delayed_cast", delay_ms, alias, msg))

    def sync(self, state):
        self.log.append(("sync", state))

    def telemetry_log(self, level, target, msg):
        self.log.append(("telemetry_log", level, target, msg))

    def slf(self):
        return fn.InstanceId("node", "me")

    def handler_error(self, handler, exc):
        self.errors.append((handler, exc))


SRC = fn.InstanceId("n", "src")


def make(spec="function_samples"):
    host = RecordingHost()
    inst = fn.Instance(fn.load(spec), host)
    return inst, host


def test_module_instances_do_not_share_globals():
    a, _ = make()
    b, _ = make()
    a.init("pa", b"sa")
    b.init("pb", b"")
    assert a.handlers.events == [("init", "pa", b"sa")]
    assert b.handlers.events == [("init", "pb", b"")]
    import function_samples
    assert a.handlers is not function_samples and function_samples.events == []


def test_host_api_goes_to_the_instance_host():
    inst, host = make()
    inst.init(None, None)
    inst.cast(SRC, b"fwd hello")
    inst.cast(("n", "x"), "sync st")
    inst.cast(SRC, b"later m")
    inst.cast(SRC, b"log")
    assert host.log == [("cast", "next", b"hello"), ("sync", b"st"),
                        ("delayed_cast", 5, "next", b"m"),
                        ("telemetry_log", fn.LOG_WARN, "samples", "hello")]
    assert inst.call(SRC, b"ask q") == b"reply-from-next"
    assert inst.call(SRC, b"whoami") == b"node/me"
    assert inst.call(SRC, b"state") == b"st"
    assert inst.handlers.events[1] == ("cast", SRC, b"fwd hello")


def test_call_replies():
    inst, _ = make()
    assert inst.call(SRC, b"x") == b"echo:x"
    assert inst.call(SRC, b"noret") is fn.NoReply
    assert inst.call(SRC, b"none") is fn.NoReply


def test_handler_error_is_reported_then_raised():
    inst, host = make()
    with pytest.raises(RuntimeError, match="cast exploded"):
        inst.cast(SRC, b"boom")
    assert [(h, type(e)) for h, e in host.errors] == [("handle_cast", RuntimeError)]
    with pytest.raises(TypeError, match="handle_call returned int"):
        inst.call(SRC, b"bad")
    assert host.errors[-1][0] == "handle_call"


def test_class_function():
    inst, host = make("function_samples:Counter")
    inst.init("", b"5")
    inst.cast(SRC, b"3")
    assert inst.call(SRC, b"") == b"8"
    assert host.log == [("sync", b"8")]
    inst.stop()  # no handle_stop: nothing happens


def test_missing_handler_is_an_error():
    class OnlyCast:
        def handle_cast(self, src, msg):
            pass
    host = RecordingHost()
    inst = fn.Instance(fn.load(OnlyCast), host)
    inst.init("", b"")
    with pytest.raises(NotImplementedError):
        inst.call(SRC, b"")
    assert host.errors[0][0] == "handle_call"


def test_load_refuses_non_functions():
    with pytest.raises(TypeError):
        fn.load("json:JSONDecoder")
    with pytest.raises(ModuleNotFoundError):
        fn.load("no_such_module_xyz")
    with pytest.raises(ValueError):
        fn.load(":x")


def test_host_api_outside_a_handler():
    with pytest.raises(fn.NoInstanceError):
        fn.cast("a", b"x")
    with pytest.raises(fn.NoInstanceError):
        fn.slf()


def test_argument_checks():
    inst, host = make()

    class BadArgs:
        def handle_cast(self, src, msg):
            if msg == b"delay":
                fn.delayed_cast(-1, "a", b"")
            elif msg == b"level":
                fn.telemetry_log(9, "t", "m")
            else:
                fn.cast("a", 12)
    inst = fn.Instance(fn.load(BadArgs), host)
    for m, exc in [(b"delay", ValueError), (b"level", ValueError), (b"x", TypeError)]:
        with pytest.raises(exc):
            inst.cast(SRC, m)
    with pytest.raises(TypeError):
        inst.cast(SRC, 5)
    assert fn.log_level("TRACE") == fn.LOG_TRACE


def test_erlang_hosted_instances_live_as_long_as_the_namespace():
    ns = {}
    assert fn.erlang_start(ns, b"k1", "function_samples", ("node", "f1"), "p", b"s") == "ok"
    assert b"k1" in fn._erlang_instances
    assert fn.erlang_call(b"k1", b"state", ("node", "x")) == b"s"
    assert fn.erlang_call(b"k1", b"noret", ("node", "x")) == "noreply"
    assert fn.erlang_call(b"k1", b"whoami", ("node", "x")) == b"node/f1"
    # Without a source: the default one, Erlang on the instance's node.
    assert fn.erlang_call(b"k1", b"src") == b"node/erlang"
    ns.clear()
    gc.collect()
    assert b"k1" not in fn._erlang_instances
    with pytest.raises(LookupError):
        fn.erlang_cast(b"k1", ("n", "x"), b"")


def test_erlang_shared_instances_are_dropped_explicitly():
    # Embedded pools: no held namespace; the entry lives until erlang_stop / erlang_drop,
    # and a new start of the same instance drops an entry a crash left behind.
    assert fn.erlang_start_shared("s1", "function_samples", ("node", "f2"), "p", b"s") == "ok"
    assert fn.erlang_call("s1", b"whoami", ("node", "x")) == b"node/f2"
    assert fn.erlang_start_shared("s2", "function_samples", ("node", "f2"), "p", b"t") == "ok"
    assert "s1" not in fn._erlang_instances
    assert fn.erlang_call("s2", b"state", ("node", "x")) == b"t"
    assert fn.erlang_drop("s2") == "ok"
    assert "s2" not in fn._erlang_instances
    assert fn.erlang_drop("s2") == "ok"
    with pytest.raises(LookupError):
        fn.erlang_call("s2", b"", ("n", "x"))
    # A failing init leaves nothing behind.
    with pytest.raises(Exception):
        fn.erlang_start_shared("s3", "no_such_module_xyz", ("node", "f3"), "", b"")
    assert "s3" not in fn._erlang_instances


def test_erlang_running_counts_calls_in_progress():
    # Erlang asks this after a direct caller died holding an instance's turn: a call that
    # runs counts, one that returned or raised no longer does.
    assert fn.erlang_start_shared("r1", "function_samples", ("node", "f4"), "p", b"s") == "ok"
    assert fn.erlang_running("r1") == 0
    assert fn.erlang_call("r1", b"running r1", ("node", "x")) == b"1"
    assert fn.erlang_call("r1", b"running r1") == b"1"
    assert fn.erlang_running("r1") == 0
    with pytest.raises(ValueError):
        fn.erlang_call("r1", b"raise", ("node", "x"))
    assert fn.erlang_running("r1") == 0
    assert fn.erlang_drop("r1") == "ok"
    assert fn.erlang_running("r1") == 0


def test_erlang_src_ids():
    sid = fn._erlang_src(("n", "f"))
    assert sid == fn.InstanceId("n", "f") and type(sid) is fn.InstanceId
    assert fn._erlang_src(("n", "f")) is sid
    assert fn._erlang_src((b"n", b"f")) == sid
    assert fn._erlang_src(["n", "f"]) == sid  # unhashable: converted, not cached
    with pytest.raises(TypeError):
        fn._erlang_src(("n", "f", "g"))


def test_erlang_host_answers():
    h = fn.ErlangHost(fn.InstanceId("n", "f"))
    assert h._answer(fn._atom("ok")) is None
    assert h._answer(fn._atom("noreply")) is fn.NoReply
    assert h._answer((fn._atom("reply"), "text")) == b"text"
    with pytest.raises(fn.FunctionCallError) as ei:
        h._answer((fn._atom("error"), fn._atom("no_alias")))
    assert ei.value.args[0] == "no_alias"
    with pytest.raises(fn.FunctionCallError):
        h._answer(123)
