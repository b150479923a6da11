"""erpy.edgeless: the function guest over gRPC, driven by the node emulator over loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

grpc = pytest.importorskip("grpc", reason="python3-grpcio is not installed")
pytest.importorskip("erpy.edgeless._gen.services_pb2_grpc", reason="stubs not generated (make native)")

from erpy import function as fn  # noqa: E402
from erpy.edgeless import guest  # noqa: E402
from erpy.edgeless._proto import pb  # noqa: E402
from erpy.edgeless.node_cli import NodeEmulator  # noqa: E402

HERE = Path(__file__).resolve().parent
PYDIR = HERE.parent


class Crashy:
    def handle_init(self, payload, serialized_state):
        if payload == "fail":
            raise ValueError("bad payload")

    def handle_cast(self, src, msg):
        if msg == b"boom":
            raise RuntimeError("cast exploded")
        if msg.startswith(b"delays "):
            for i, ms in enumerate(msg[7:].split(b",")):
                fn.delayed_cast(int(ms), "out", b"%d:%s" % (i, ms))
        if msg == b"ask":
            fn.cast("out", fn.call("peer", b"q"))

    def handle_call(self, src, msg):
        if msg == b"boom":
            raise KeyError("call exploded")
        if msg == b"raw":
            return fn.call_raw(fn.InstanceId("n2", "f2"), b"r")
        if msg == b"src":
            return "/".join(src)
        return b"echo:" + msg


@pytest.fixture
def in_process():
    made = []

    def start(spec):
        server, port, servicer = guest.serve(spec, port=0, address="127.0.0.1", max_workers=4)
        out = []
        node = NodeEmulator(f"127.0.0.1:{port}", "127.0.0.1:0", "node-1", "fn-1", out=out.append)
        made.append((server, servicer, node))
        return node, out, port
    yield start
    for server, servicer, node in made:
        node.close()
        server.stop(0).wait()
        servicer.close()


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(PYDIR), str(HERE)] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


@pytest.fixture
def guest_process():
    procs = []

    def start(*args, env_extra=None):
        env = _env()
        env.update(env_extra or {})
        proc = subprocess.Popen([sys.executable, "-m", "erpy.edgeless", *args], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline()
        assert "serving" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        return proc, int(line.rsplit(" ", 1)[1])
    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_end_to_end_in_a_guest_process(guest_process):
    proc, port = guest_process("--module", "erpy.edgeless.example", "--port", "0",
                               "--log-level", "warning")
    out = []
    node = NodeEmulator(f"127.0.0.1:{port}", "127.0.0.1:0", "n", "f", out=out.append)
    try:
        node.boot()
        node.init("hello", b"")
        assert node.command("cast recast another-function-alias new-message")
        assert node.command("cast sync inner-function-state")
        assert node.command("call noret")
        assert node.command("call hi")
        assert node.command("call slf")
        assert node.command("call state")
        assert node.command("stop")
        events = [e[1:] for e in node.host.wait_events(4)]
        assert ("cast", "another-function-alias", b"new-message") in events
        assert ("sync", b"inner-function-state") in events
        assert node.host.state == b"inner-function-state"
        assert "noreply" in out and "reply b'hi'" in out and "reply b'n/f'" in out
        assert "reply b'inner-function-state'" in out
        assert any(e[0] == "telemetry_log" and e[3] == "stopping" for e in events)
        # A restarted instance gets the state the node kept.
        node.init("again")
        assert node.call(b"state").msg == b"inner-function-state"
    finally:
        node.close()
    assert proc.poll() is None


def test_call_answers_and_host_calls(in_process):
    node, out, _ = in_process(Crashy)
    node.boot()
    node.init()
    ret = node.call(b"x")
    assert (ret.type, ret.msg) == (pb.CALL_RET_REPLY, b"echo:x")
    assert node.call(b"src", src=pb.InstanceId(node_id="a", function_id="b")).msg == b"a/b"
    # The emulator answers the function's calls with the message back.
    assert node.call(b"raw").msg == b"r"
    assert ("call_raw", "n2/f2", b"r") in [e[1:] for e in node.host.events]
    node.host.call_reply = lambda target, msg: pb.CallReturn(type=pb.CALL_RET_REPLY, msg=b"A")
    node.cast(b"ask")
    assert ("cast", "out", b"A") in [e[1:] for e in node.host.events]


def test_handler_crash_is_reported_and_the_guest_serves_on(in_process):
    node, out, _ = in_process(Crashy)
    node.boot()
    with pytest.raises(grpc.RpcError) as ei:
        node.init("fail")
    assert ei.value.code() == grpc.StatusCode.INTERNAL
    assert "ValueError: bad payload" in ei.value.details()
    node.init()
    with pytest.raises(grpc.RpcError) as ei:
        node.cast(b"boom")
    assert ei.value.code() == grpc.StatusCode.INTERNAL
    assert "handle_cast: RuntimeError: cast exploded" in ei.value.details()
    ret = node.call(b"boom")
    assert ret.type == pb.CALL_RET_ERR
    errors = [e for e in node.host.events if e[1] == "telemetry_log" and e[2] == fn.LOG_ERROR]
    assert [e[4].split(":")[0] for e in errors] == ["handle_init", "handle_cast", "handle_call"]
    assert node.call(b"ok").msg == b"echo:ok"


def test_malformed_input_gets_an_error_status(in_process):
    node, out, port = in_process(Crashy)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    raw = {m: channel.unary_unary(f"/edgeless_api.GuestAPIFunction/{m}")
           for m in ("Boot", "Init", "Cast", "Call", "Stop")}
    try:
        # Before Boot and Init.
        with pytest.raises(grpc.RpcError) as ei:
            node.call(b"x")
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as ei:
            node.init()
        assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as ei:
            node.function.Boot(pb.BootData(), timeout=10)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        node.boot()
        node.init()
        bad_utf8 = b"\x0a\x02\xff\xfe"  # init_payload (a string) that is not UTF-8
        for method, body in [("Call", b"\xff\xff\xff"), ("Cast", b"\x0a\x05ab"),
                             ("Init", bad_utf8), ("Boot", b"\x12\xff"), ("Stop", b"\x08")]:
            with pytest.raises(grpc.RpcError) as ei:
                raw[method](body, timeout=10)
            assert ei.value.code() != grpc.StatusCode.OK
        # Unknown method.
        with pytest.raises(grpc.RpcError) as ei:
            channel.unary_unary("/edgeless_api.GuestAPIFunction/Nope")(b"", timeout=10)
        assert ei.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert node.call(b"alive").msg == b"echo:alive"
    finally:
        channel.close()


def test_delayed_casts_in_order_and_not_early(in_process):
    node, out, _ = in_process(Crashy)
    node.boot()
    node.init()
    t0 = time.monotonic()
    node.cast(b"delays 120,40,80,40,0")
    events = node.host.wait_events(10)
    # Events are (time, kind, ...): "delayed_cast" when asked, "delayed" when delivered.
    delivered = [(ev[0], ev[3]) for ev in events if ev[1] == "delayed"]
    assert [m for _, m in delivered] == [b"4:0", b"1:40", b"3:40", b"2:80", b"0:120"]
    requested = {ev[4]: ev[0] for ev in events if ev[1] == "delayed_cast"}
    for t, m in delivered:
        ms = int(m.split(b":")[1])
        assert t >= requested[m] + ms / 1000.0
        assert t - t0 >= ms / 1000.0


def test_node_cli_commands(guest_process):
    proc, port = guest_process("--port", "0")
    cli = subprocess.run(
        [sys.executable, "-m", "erpy.edgeless.node_cli", "--function-endpoint", f"127.0.0.1:{port}",
         "--host-endpoint", "127.0.0.1:0", "--init-payload", "p"],
        input="cast recast another-function-alias new-message\ncast sync inner-function-state\n"
              "call noret\ncall hello\nbogus\nstop\n",
        env=_env(), capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stderr
    lines = cli.stdout.splitlines()
    assert "cast another-function-alias b'new-message'" in lines
    assert "sync b'inner-function-state'" in lines
    assert "noreply" in lines and "reply b'hello'" in lines
    assert any(line.startswith("unknown command 'bogus'") for line in lines)
    assert "telemetry INFO example: stopping" in lines
    helptext = subprocess.run([sys.executable, "-m", "erpy.edgeless.node_cli", "-h"], env=_env(),
                              capture_output=True, text=True, timeout=30)
    assert "--function-endpoint" in helptext.stdout and "--host-endpoint" in helptext.stdout


def test_guest_settings_from_the_environment(guest_process):
    proc, port = guest_process(env_extra={"PORT": "0", "MAX_WORKERS": "2", "LOG_LEVEL": "ERROR",
                                          "FUNCTION": "function_samples"})
    assert port > 0
    bad = subprocess.run([sys.executable, "-m", "erpy.edgeless", "--module", "no_such_module_xyz",
                          "--port", "0"], env=_env(), capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "no_such_module_xyz" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "erpy.edgeless"], env={**_env(), "PORT": "x"},
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode != 0 and "PORT" in bad.stderr
