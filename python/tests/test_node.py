"""erpy.node from the Python side: the node object, mailboxes, the allow-list, error maps,
and Python reaching a real Erlang node (started here with `erl -name`), a wrong cookie
included. The Erlang -> Python direction is covered by test/erpy_node_SUITE.erl."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from erpy import Atom, ImproperList, Pid, Ref
from erpy import node as node_module
from erpy.node import (ErlangError, ErlangTimeoutError, GenServer, Node, NotAllowed,
                        ensure_epmd, format_error)

COOKIE = "erpy_pytest_cookie"


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}@127.0.0.1"


@pytest.fixture(scope="module")
def epmd() -> None:
    if shutil.which("epmd") is None and shutil.which("erl") is None:
        pytest.skip("epmd is not installed (erlang-base)")
    ensure_epmd()


@pytest.fixture
def node(epmd):
    n = Node(unique("pyt"), COOKIE, allow=["operator"]).start()
    yield n
    n.stop()


# An Erlang node with a registered echo gen_server-like process `srv` and a registered
# process `relay` that forwards {To, Msg} as Msg to To.
ERL_PROGRAM = """
register(srv, spawn(fun Loop() ->
    receive {'$gen_call', From, Req} -> gen:reply(From, {echo, Req}), Loop() end end)),
register(relay, spawn(fun Loop() -> receive {To, M} -> To ! M, Loop() end end)),
receive stop -> ok after 60000 -> ok end,
halt().
"""


@pytest.fixture(scope="module")
def erlang_node(epmd):
    erl = shutil.which("erl")
    if erl is None:
        pytest.skip("erl is not installed")
    name = unique("erl")
    proc = subprocess.Popen([erl, "-noshell", "-name", name, "-setcookie", COOKIE,
                             "-eval", ERL_PROGRAM], stdin=subprocess.DEVNULL)
    probe = Node(unique("probe"), COOKIE).start()
    try:
        deadline = time.monotonic() + 20
        while not probe.ping(name):
            if time.monotonic() > deadline:
                pytest.fail("the Erlang node did not come up")
            time.sleep(0.1)
    finally:
        probe.stop()
    yield name
    proc.kill()
    proc.wait()


def test_format_error_is_erpy_error_map():
    import traceback
    try:
        1 / 0
    except ZeroDivisionError as e:
        m = format_error(e)
        chunks = traceback.format_exception(e)
    assert m["type"] == "ZeroDivisionError"
    assert m["message"] == "division by zero"
    # The executor every mode shares made it: format_exception's chunks, as port and
    # embedded mode give them.
    assert m["traceback"] == chunks and m["traceback"][0] == "Traceback (most recent call last):\n"
    assert set(m) == {"type", "message", "traceback"} and all(type(k) is Atom for k in m)


def test_allow_list_resolution(node):
    import operator
    assert node._resolve("operator", "add") is operator.add
    with pytest.raises(NotAllowed):
        node._resolve("os", "system")
    with pytest.raises(NotAllowed):
        node._resolve("operator", "__dict__")
    node.set_allow(["os.path"])
    assert node._resolve("os.path", "join")("a", "b") == "a/b"
    with pytest.raises(NotAllowed):
        node._resolve("os", "getcwd")
    assert node.allowed("os.path.sub")  # submodules of an allowed module
    node.expose("shop", "price", lambda item: 3)
    assert node._resolve("shop", "price")("x") == 3


def test_service_code_needs_allow_code(node):
    with pytest.raises(NotAllowed):
        node._service_eval("1 + 1")
    node.allow_code = True
    assert node._service_eval("x * 2", {"x": 21}) == 42
    node._service_exec("y = 5")
    # Without a session every call has a fresh namespace, as in the other modes.
    with pytest.raises(NameError):
        node._service_eval("y")
    assert node._service_run("result = arguments + 1", 1) == 2


def test_service_sessions_keep_a_namespace_each(node):
    from erpy.node import SessionClosed
    node.allow_code = True
    a, b = node._service_session_open(), node._service_session_open()
    assert a != b
    node._request(_req("exec", code="x = 41\ndef f(v): return v + x", session=a))
    assert node._request(_req("eval", code="f(1)", session=a)) == 42
    assert node._request(_req("run", code="result = f(arguments)", args=2, session=a)) == 43
    with pytest.raises(NameError):
        node._request(_req("eval", code="x", session=b))
    with pytest.raises(NameError):
        node._service_eval("f(1)")  # the node's shared namespace does not see it
    assert node._service_session_close(a) == "ok"
    with pytest.raises(SessionClosed):
        node._request(_req("eval", code="x", session=a))
    with pytest.raises(SessionClosed):
        node._request(_req("call", module="operator", function="add", args=[1, 2], session=a))
    assert node._request(_req("call", module="operator", function="add", args=[1, 2],
                              max_size=100, session=b)) == 3
    # Cancelling a request that is not running is harmless.
    node._service_cancel(node._native.make_ref())


def test_node_registers_at_epmd_and_unregisters(epmd):
    name = unique("reg")
    n = Node(name, COOKIE).start()
    alive = name.split("@")[0]
    assert alive in subprocess.run(["epmd", "-names"], capture_output=True, text=True).stdout
    n.stop()
    time.sleep(0.2)
    assert alive not in subprocess.run(["epmd", "-names"], capture_output=True, text=True).stdout


def test_local_mailboxes(node):
    a, b = node.mailbox(), node.mailbox()
    assert isinstance(a.pid, Pid) and a.pid.node == node.name
    a.send(b.pid, ("hello", [1, 2.5, b"\xff"], {"k": None}))
    assert b.receive(1.0) == ("hello", [1, 2.5, b"\xff"], {"k": None})
    assert b.register("bee")
    node.send("bee", 1)
    node.send(("bee", node.name), 2)
    assert b.receive_many(10, 1.0) == [1, 2]
    with pytest.raises(TimeoutError):
        b.receive(0.05)
    assert b.receive_many(10, 0.05) == []
    b.close()
    assert b.closed
    with pytest.raises(EOFError):
        b.receive(0.1)
    node.send("bee", 3)  # a dead name: dropped, as in Erlang
    assert node._native.whereis("bee") is None


def test_genserver_locally(node):
    class Adder(GenServer):
        def init(self):
            self.total = 0

        def handle_call(self, request, from_):
            self.total += request
            return self.total

    pid = node.spawn(Adder(), "adder")
    mb = node.mailbox()
    ref = node._native.make_ref()
    mb.send(pid, (Atom("$gen_call"), (mb.pid, ref), 5))
    assert mb.receive(2.0) == (ref, 5)
    # The OTP 24+ alias form of the tag is answered to the alias (a Ref).
    tag = ImproperList([Atom("alias")], ref)
    mb.send("adder", (Atom("$gen_call"), (mb.pid, tag), 1))
    # A local alias is not a process: the reply is dropped, the server keeps its state.
    mb.send(pid, (Atom("$gen_call"), (mb.pid, ref), 0))
    assert mb.receive(2.0) == (ref, 6)


def test_python_to_erlang(node, erlang_node):
    assert node.ping(erlang_node)
    assert erlang_node in node.nodes()
    assert node.rpc(erlang_node, "erlang", "abs", [-3]) == 3
    assert node.rpc(erlang_node, "lists", "sort", [[3, 1, 2]]) == [1, 2, 3]
    with pytest.raises(ErlangError) as e:
        node.rpc(erlang_node, "erlang", "error", [Atom("oops")])
    assert e.value.args[0] == ("error", "oops")
    with pytest.raises(ErlangTimeoutError):
        node.rpc(erlang_node, "timer", "sleep", [2000], timeout=0.2)
    assert node.call(("srv", erlang_node), "hi") == ("echo", "hi")
    # Output of the Erlang code goes to its group leader, the calling Python process,
    # which answers it (the call does not hang).
    assert node.rpc(erlang_node, "io", "format", ["hello from Erlang~n"], timeout=5) == "ok"
    mb = node.mailbox()
    mb.send(("relay", erlang_node), (mb.pid, "back"))
    assert mb.receive(5.0) == "back"
    big = os.urandom(3 * 1024 * 1024)
    mb.send(("relay", erlang_node), (mb.pid, big))
    assert mb.receive(10.0) == big
    with pytest.raises(ErlangError):
        node.call(("no_such_server", erlang_node), "hi", timeout=2.0)


def test_monitor_of_erlang_process(node, erlang_node):
    pid = node.rpc(erlang_node, "erlang", "whereis", [Atom("relay")])
    assert isinstance(pid, Pid)
    mb = node.mailbox()
    ref = mb.monitor(pid)
    assert isinstance(ref, Ref)
    node.rpc(erlang_node, "erlang", "exit", [pid, Atom("kill")])
    msg = mb.receive(5.0)
    assert msg[:3] == ("DOWN", ref, "process") and msg[4] == "killed"


def test_wrong_cookie_is_refused(erlang_node):
    n = Node(unique("bad"), "not-the-cookie").start()
    try:
        assert not n.ping(erlang_node)
        with pytest.raises(ErlangError):
            n.rpc(erlang_node, "erlang", "node", [], timeout=2.0)
    finally:
        n.stop()


def test_unknown_node_fails_fast(node):
    with pytest.raises(ErlangError):
        node.rpc("nobody_here@127.0.0.1", "erlang", "node", [], timeout=2.0)
    mb = node.mailbox()
    ref = mb.monitor(("x", "nobody_here@127.0.0.1"))
    msg = mb.receive(2.0)
    assert msg[0] == "DOWN" and msg[1] == ref and msg[4] == "noconnection"


def test_command_line_env_fallbacks(epmd, erlang_node):
    env = dict(os.environ, BPY_BEAM_NODE=unique("cli").split("@")[0], BPY_BEAM_COOKIE=COOKIE,
               ERPY_NODE_MAX_MESSAGE_SIZE="50000",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__))]))
    proc = subprocess.Popen([sys.executable, "-m", "erpy.node", "--exit-on-eof"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    try:
        line = proc.stdout.readline()
        assert "ready" in line, line
        name = line.split()[1]
        probe = Node(unique("probe"), COOKIE).start()
        try:
            assert probe.ping(name)
            with pytest.raises(ErlangError) as e:  # the limit came from the environment
                probe.rpc(name, "operator", "add", [b"x" * 60000, b""])
            assert e.value.args[0][1][0] == "message_too_large" and e.value.args[0][1][2] == 50000
        finally:
            probe.stop()
    finally:
        proc.stdin.close()
        assert proc.wait(10) == 0


def _cli_node(*args: str) -> subprocess.Popen:
    env = dict(os.environ, ERPY_COOKIE=COOKIE,
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__))]))
    return subprocess.Popen([sys.executable, "-m", "erpy.node", "--exit-on-eof", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)


def test_command_line_connect_is_done_when_ready_is_said(epmd, node):
    """--connect NODE (what a node pool passes, with its own VM): the node is connected to
    NODE by the time it prints its ready line."""
    proc = _cli_node("--name", unique("cc"), "--connect", node.name)
    try:
        line = proc.stdout.readline()
        assert "ready" in line, line
        assert line.split()[1] in node.nodes()
    finally:
        proc.stdin.close()
        assert proc.wait(10) == 0


def test_command_line_connect_that_fails_still_starts_the_node(epmd):
    """A --connect that cannot be made (no such node, not a node name) leaves the node
    running and saying it is ready: the other side may still connect to it."""
    proc = _cli_node("--name", unique("cf"), "--connect", unique("nobody"), "--connect", "not a node")
    try:
        line = proc.stdout.readline()
        assert "ready" in line, line
        probe = Node(unique("probe"), COOKIE).start()
        try:
            assert probe.ping(line.split()[1])
        finally:
            probe.stop()
    finally:
        proc.stdin.close()
        assert proc.wait(10) == 0


def test_node_module_imports_little_until_needed():
    """A node starts without threading, signal, weakref, importlib or argparse (a node
    pool waits for that start); they come when first needed, and erpy.node.threading is
    the threading module."""
    code = ("import sys, erpy.node\n"
            "heavy = ('threading', 'signal', 'weakref', 'importlib', 'argparse')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n"
            "import threading\n"
            "assert erpy.node.threading is threading\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__))]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_process_with_genservers_and_no_stop_exits(epmd):
    """A node left running with a GenServer thread (non-daemon) does not keep its process
    from exiting: the node stops before Python joins its threads."""
    code = ("import sys\n"
            "from erpy.node import Node, GenServer\n"
            f"n = Node({unique('gx')!r}, {COOKIE!r}, allow_code=True).start()\n"
            "class S(GenServer):\n"
            "    pass\n"
            "n.spawn(S(), 'keeper')\n"
            "print('up', flush=True)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__))]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "up"


def test_ensure_epmd_starts_one_and_waits_until_it_answers(monkeypatch):
    # `epmd -daemon` returns before epmd listens: ensure_epmd waits for it to answer.
    calls: list[list[str]] = []
    answers = iter([False, False, False, True])
    monkeypatch.setattr(node_module, "_epmd_answers", lambda timeout=0.5: next(answers))
    monkeypatch.setattr(node_module.subprocess, "run",
                        lambda argv, **kw: calls.append(list(argv)))
    ensure_epmd()
    assert len(calls) == 1 and calls[0][0].endswith("epmd") and calls[0][1:] == ["-daemon"]


def test_ensure_epmd_says_why_when_epmd_never_answers(monkeypatch):
    monkeypatch.setattr(node_module, "_epmd_answers", lambda timeout=0.5: False)
    monkeypatch.setattr(node_module.subprocess, "run", lambda argv, **kw: None)
    with pytest.raises(OSError, match="nothing answered on 127.0.0.1:4369"):
        ensure_epmd(wait_s=0.1)


def test_ensure_epmd_does_nothing_when_epmd_runs(epmd, monkeypatch):
    monkeypatch.setattr(node_module.subprocess, "run",
                        lambda argv, **kw: pytest.fail("epmd started twice"))
    ensure_epmd()


def test_max_message_size_must_be_sensible(epmd):
    with pytest.raises(ValueError, match="max_message_size"):
        Node(unique("tiny"), COOKIE, max_message_size=10)
    with pytest.raises(ValueError, match="max_message_size"):
        Node(unique("huge"), COOKIE, max_message_size=1 << 31)


def test_inbound_messages_over_the_limit_are_refused(node):
    # erpy's node sends a large message as one frame (no fragments): the receiving node
    # reads its start, skips the rest unread, and the connection goes on.
    small = Node(unique("small"), COOKIE, allow=["operator"], max_message_size=100_000).start()
    try:
        inbox = small.mailbox()
        assert inbox.register("inbox")
        dest = ("inbox", small.name)
        node.send(dest, "before")
        node.send(dest, b"x" * 300_000)
        node.send(dest, "after")
        assert inbox.receive(5.0) == "before"
        assert inbox.receive(5.0) == "after"
        assert small.stats()["refused"] == 1
        # An rpc over the limit is answered at once, as erpc expects, with the reason.
        with pytest.raises(ErlangError) as e:
            node.rpc(small.name, "operator", "add", [b"y" * 150_000, b"z"], timeout=5.0)
        kind, (tag, size, limit) = e.value.args[0]
        assert (kind, tag, limit) == ("error", "message_too_large", 100_000) and size > 100_000
        assert node.rpc(small.name, "operator", "add", [1, 2], timeout=5.0) == 3
        assert small.name in node.nodes()
        assert small.stats()["refused"] == 2
    finally:
        small.stop()


def _wait_for(pred, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail("condition not met in time")
        time.sleep(0.02)


def test_mailbox_over_max_queued_messages_drops(node):
    # A mailbox nobody reads holds at most max_queued_messages: the rest, from another
    # node or from this one, is dropped and counted; once read, it takes messages again.
    small = Node(unique("small"), COOKIE, max_queued_messages=10).start()
    try:
        inbox = small.mailbox()
        assert inbox.register("inbox")
        for i in range(25):
            node.send(("inbox", small.name), i)
        _wait_for(lambda: small.stats()["dropped"] == 15)
        assert inbox.pending == 10
        local = small.mailbox()
        local.send(inbox.pid, "local")  # a local send obeys the same limit
        assert small.stats()["dropped"] == 16
        assert [inbox.receive(1.0) for _ in range(10)] == list(range(10))
        with pytest.raises(TimeoutError):
            inbox.receive(0.1)
        node.send(("inbox", small.name), "again")
        assert inbox.receive(5.0) == "again"
        assert small.stats()["dropped"] == 16
        # The connection and other mailboxes were not affected.
        assert small.name in node.nodes()
    finally:
        small.stop()


def test_mailbox_over_max_queued_bytes_drops(node):
    small = Node(unique("small"), COOKIE, max_queued_bytes=1000).start()
    try:
        inbox = small.mailbox()
        assert inbox.register("inbox")
        for tag in ("a", "b", "c"):  # 600 bytes each: the third finds 1200 queued
            node.send(("inbox", small.name), (tag, b"x" * 600))
        _wait_for(lambda: small.stats()["dropped"] == 1)
        assert [inbox.receive(1.0)[0] for _ in range(2)] == ["a", "b"]
        with pytest.raises(TimeoutError):
            inbox.receive(0.1)
        node.send(("inbox", small.name), ("d", b"x" * 600))
        assert inbox.receive(5.0)[0] == "d"
    finally:
        small.stop()


def test_monitors_from_other_nodes_are_capped(node):
    # Monitors another node sets on one process cost memory too: beyond
    # max_queued_messages the monitor fires at once with system_limit.
    small = Node(unique("small"), COOKIE, max_queued_messages=3).start()
    try:
        target = small.mailbox()
        watcher = node.mailbox()
        refs = [watcher.monitor(target.pid) for _ in range(4)]
        msg = watcher.receive(5.0)
        assert msg[0] == "DOWN" and msg[1] == refs[3] and msg[4] == "system_limit"
        assert small.stats()["dropped"] == 1
        target.close()
        downs = {watcher.receive(5.0)[1] for _ in range(3)}
        assert downs == set(refs[:3])
    finally:
        small.stop()


def test_max_queued_must_be_positive(epmd):
    with pytest.raises(ValueError, match="max_queued"):
        Node(unique("q"), COOKIE, max_queued_messages=0)
    with pytest.raises(ValueError, match="max_queued"):
        Node(unique("q"), COOKIE, max_queued_bytes=0)


def test_command_line_queue_limits(monkeypatch):
    seen = {}

    class Stop(Exception):
        pass

    def fake_node(*args, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(node_module, "Node", fake_node)
    monkeypatch.setenv("ERPY_NODE_MAX_QUEUED_MESSAGES", "77")
    monkeypatch.setenv("ERPY_NODE_MAX_QUEUED_BYTES", "88888")
    with pytest.raises(Stop):
        node_module.main(["--name", "q@127.0.0.1", "--cookie", "c"])
    assert (seen["max_queued_messages"], seen["max_queued_bytes"]) == (77, 88888)
    with pytest.raises(Stop):
        node_module.main(["--name", "q@127.0.0.1", "--cookie", "c", "--max-queued-messages", "5",
                          "--max-queued-bytes", "6000"])
    assert (seen["max_queued_messages"], seen["max_queued_bytes"]) == (5, 6000)
    monkeypatch.delenv("ERPY_NODE_MAX_QUEUED_MESSAGES")
    monkeypatch.delenv("ERPY_NODE_MAX_QUEUED_BYTES")
    with pytest.raises(Stop):
        node_module.main(["--name", "q@127.0.0.1", "--cookie", "c"])
    assert (seen["max_queued_messages"], seen["max_queued_bytes"]) == (100_000, 1 << 30)
    assert seen["max_send_queue"] == 256 << 20
    monkeypatch.setenv("ERPY_NODE_MAX_SEND_QUEUE", "12345")
    with pytest.raises(Stop):
        node_module.main(["--name", "q@127.0.0.1", "--cookie", "c"])
    assert seen["max_send_queue"] == 12345
    with pytest.raises(Stop):
        node_module.main(["--name", "q@127.0.0.1", "--cookie", "c", "--max-send-queue", "99999"])
    assert seen["max_send_queue"] == 99999


def test_service_code_sees_its_caller_through_erpy_erlang(node):
    from erpy import erlang
    node.allow_code = True
    caller, tag = node.mailbox().pid, node._native.make_ref()
    assert node._request(_req("run", code="result = erlang.self()", caller=caller, reply_to=tag)) == caller
    assert node._request(_req("eval", code="erlang.self()", caller=caller, reply_to=tag)) == caller
    # Only for the request's own code: outside it there is no Erlang caller.
    with pytest.raises(erlang.ErlangPortError):
        erlang.self()
    with pytest.raises(erlang.ErlangPortError):
        node._service_eval("erlang.self()")
    with pytest.raises(TypeError, match="caller"):
        node._request(_req("eval", code="1", caller="not a caller", reply_to=tag))


def test_service_request_schema_errors(node):
    """A request map that breaks the schema is refused with a clear ValueError."""
    node.allow_code = True
    with pytest.raises(ValueError, match="version 2 is not 1"):
        node._request({"v": 2, "kind": "eval", "code": "1"})
    with pytest.raises(ValueError, match="no version"):
        node._request({"kind": "eval", "code": "1"})
    with pytest.raises(ValueError, match="kind must be"):
        node._request({"v": 1, "kind": "spawn", "code": "1"})
    with pytest.raises(ValueError, match="call needs function"):
        node._request({"v": 1, "kind": "call", "module": "operator", "args": []})
    with pytest.raises(ValueError, match="unknown field colour"):
        node._request({"v": 1, "kind": "eval", "code": "1", "colour": 3})
    with pytest.raises(ValueError, match="deadline must be an integer"):
        node._request({"v": 1, "kind": "eval", "code": "1", "deadline": "soon"})
    with pytest.raises(ValueError, match="must be a map"):
        node._request([1, 2])
    with pytest.raises(TypeError, match="one argument"):
        node._request({"v": 1}, 2)
    assert node._request(_req("eval", code="x + 1", locals={"x": 1})) == 2


def _req(kind, **fields):
    return {"v": 1, "kind": kind, **fields}


# --- a peer written by hand -----------------------------------------------------------------

# The distribution flags OTP 25 offers that erpy's node needs (and a few it offers too).
_PEER_FLAGS = (0x04 | 0x08 | 0x10 | 0x20 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800 | 0x1000 | 0x4000
               | 0x10000 | 0x20000 | 0x40000 | 0x80000 | 0x100000 | 0x400000 | 0x1000000
               | 0x2000000 | 0x4000000 | (1 << 32) | (1 << 34) | (1 << 35))


class RawPeer:
    """Another node, written here on a plain socket: it shakes hands (OTP 23+ handshake),
    sends spawn requests when told to, and reads nothing, so whatever the node sends it
    piles up (a small receive buffer makes that quick)."""

    def __init__(self, node: Node, cookie: str = COOKIE) -> None:
        import hashlib
        import socket
        import struct
        self.name = unique("raw")
        self._struct = struct
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", node.port))
        name = self.name.encode()
        self._send_hs(b"N" + struct.pack(">QIH", _PEER_FLAGS, 1, len(name)) + name)
        assert self._recv_hs() == b"sok"
        challenge = struct.unpack(">I", self._recv_hs()[9:13])[0]
        digest = hashlib.md5(f"{cookie}{challenge}".encode()).digest()
        self._send_hs(b"r" + struct.pack(">I", 42) + digest)
        assert self._recv_hs()[:1] == b"a"
        self.pid = Pid(self.name, 1, 0, 1)
        self._ids = iter(range(1, 1 << 30))

    def _send_hs(self, data: bytes) -> None:
        self.sock.sendall(self._struct.pack(">H", len(data)) + data)

    def _recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            assert chunk, "the node closed the connection during the handshake"
            out += chunk
        return out

    def _recv_hs(self) -> bytes:
        (n,) = self._struct.unpack(">H", self._recv_exact(2))
        return self._recv_exact(n)

    def call(self, module: str, function: str, args: list) -> None:
        """erpc:call's spawn request (monitored), in a pass-through frame; no answer is read."""
        from erpy import encode
        ref = Ref(self.name, 1, (next(self._ids), 0, 0))
        res = Ref(self.name, 1, (next(self._ids), 1, 0))
        ctl = (29, ref, self.pid, self.pid, (Atom("erpc"), Atom("execute_call"), 4), [Atom("monitor")])
        payload = [res, Atom(module), Atom(function), args]
        body = b"p" + encode(ctl) + encode(payload)
        self.sock.sendall(self._struct.pack(">I", len(body)) + body)

    def close(self) -> None:
        self.sock.close()


def test_a_peer_that_stops_reading_holds_up_no_other_peer(epmd):
    """A node that stops reading what it is sent (its socket full) stalls nothing but its
    own frames: another node's calls go on, the reader hand-over included. Before each
    connection had its own send queue, the call whose answer filled the socket held the
    connection's write lock in a blocked write, the watchdog blocked on it while sending a
    slow call's early reply, and with it every hand-over of every connection."""
    import threading
    a = Node(unique("pya"), COOKIE).start()
    c = Node(unique("pyc"), COOKIE).start()
    entered, gate = threading.Event(), threading.Event()

    def blocker():
        entered.set()
        return gate.wait(20)

    a.expose("t", "big", lambda n: bytes(n))
    a.expose("t", "slow", lambda s: time.sleep(s) or Atom("slept"))
    a.expose("t", "blocker", blocker)
    a.expose("t", "release", lambda: gate.set() or Atom("released"))
    peer = RawPeer(a)
    result = {}
    try:
        peer.call("t", "big", [64 * 1024 * 1024])  # its answer fills the socket: never read
        time.sleep(0.3)  # the answer is being written by now
        peer.call("t", "slow", [1.0])  # slow: its SPAWN_REPLY goes early, to that socket
        time.sleep(0.05)
        # Another node: its first call waits for its second, which only a new reader of
        # its connection (the watchdog's hand-over) can read.
        t = threading.Thread(target=lambda: result.update(b=c.rpc(a.name, "t", "blocker", [], timeout=20)))
        t.start()
        assert entered.wait(10)
        assert c.rpc(a.name, "t", "release", [], timeout=5) == "released"
        t.join(20)
        assert result.get("b") is True
        assert c.rpc(a.name, "t", "slow", [0], timeout=5) == "slept"
    finally:
        gate.set()
        peer.close()
        c.stop()
        a.stop()


def test_a_peer_over_max_send_queue_is_disconnected(epmd):
    """What a peer does not read is held for it up to max_send_queue bytes; beyond, the
    connection is closed (logged) and the node forgets it."""
    a = Node(unique("pya"), COOKIE, max_send_queue=1024 * 1024).start()
    a.expose("t", "big", lambda n: bytes(n))
    peer = RawPeer(a)
    try:
        deadline = time.monotonic() + 10
        while peer.name not in a.nodes():
            assert time.monotonic() < deadline, "the raw peer never showed up"
            time.sleep(0.01)
        peer.call("t", "big", [16 * 1024 * 1024])  # most of it waits for the peer
        # More answers, while that is over the limit: the peer is dropped.
        deadline = time.monotonic() + 10
        while peer.name in a.nodes():
            assert time.monotonic() < deadline, "a peer over max_send_queue stayed connected"
            try:
                peer.call("t", "big", [10])
            except OSError:
                break  # closed already
            time.sleep(0.05)
    finally:
        peer.close()
        a.stop()
    with pytest.raises(ValueError):
        Node(unique("pya"), COOKIE, max_send_queue=0)


def test_a_call_owns_its_function_while_the_cache_is_cleared(epmd):
    """The function a call runs is referenced by the call itself, not only by the handler
    cache, which another thread may clear meanwhile (set_allow, expose): the core used to
    call through a pointer that only the cache owned."""
    a = Node(unique("pya"), COOKIE).start()
    c = Node(unique("pyc"), COOKIE).start()
    seen = {}

    class Handler:
        def __call__(self):
            a._exposed.clear()
            a.set_allow([])  # clears the cache, as any other thread could now
            # Ours (the frame's self), getrefcount's argument, and the call's own.
            seen["refs"] = sys.getrefcount(self)
            return Atom("ok")

    a.expose("t", "h", Handler())
    try:
        assert c.rpc(a.name, "t", "h", [], timeout=5) == "ok"
        assert seen["refs"] >= 3
    finally:
        c.stop()
        a.stop()


def test_stop_interrupts_calls_still_in_python(epmd):
    """A node's stop() ends calls still running Python (KeyboardInterrupt in their
    threads, as a cancel does) instead of waiting for them forever."""
    import threading
    a = Node(unique("pya"), COOKIE).start()
    c = Node(unique("pyc"), COOKIE).start()
    entered = threading.Event()

    def spin():
        entered.set()
        i = 0
        while True:
            i += 1

    a.expose("t", "spin", spin)
    caller = threading.Thread(target=lambda: pytest.raises(ErlangError, c.rpc, a.name, "t", "spin", [], 60),
                              daemon=True)
    caller.start()
    try:
        assert entered.wait(10)
        stopper = threading.Thread(target=a.stop, daemon=True)
        stopper.start()
        stopper.join(20)
        assert not stopper.is_alive(), "stop() waited for a call that never returns"
        caller.join(20)
    finally:
        c.stop()


# --- a call that waits for a message reads its own connection -------------------------------

def test_a_call_waiting_for_its_answer_reads_its_connection_itself(epmd):
    """A call run by its connection's reader that waits for a message (a callback's reply,
    an rpc's result) goes on reading that connection meanwhile: the answer that comes
    over it is read by the waiting thread itself, with no hand-over to another reader,
    and other calls from the same node are served meanwhile (by worker threads)."""
    import threading
    # slow_ms: the watchdog never hands the connection over by itself here.
    a = Node(unique("pya"), COOKIE, slow_ms=60_000).start()
    c = Node(unique("pyc"), COOKIE).start()
    c.expose("t", "echo", lambda x: x)
    waiting = threading.Event()

    def ask(other, value):
        # Into the caller's node and back, over the connection this call came on.
        return a.rpc(other, "t", "echo", [value], timeout=10)

    def gate():
        mb = a.mailbox()
        mb.register("erpy_gate")
        waiting.set()
        try:
            return mb.receive(20)
        finally:
            mb.close()

    a.expose("t", "ask", ask)
    a.expose("t", "gate", gate)
    a.expose("t", "add", lambda x, y: x + y)
    try:
        assert c.rpc(a.name, "t", "add", [1, 2], timeout=10) == 3
        before = a.stats()["handovers"]
        assert [c.rpc(a.name, "t", "ask", [c.name, i], timeout=10) for i in range(20)] == list(range(20))
        assert a.stats()["handovers"] == before
        # A call that waits: other calls, and their own waits, go on meanwhile.
        result = {}
        t = threading.Thread(target=lambda: result.update(g=c.rpc(a.name, "t", "gate", [], timeout=20)))
        t.start()
        assert waiting.wait(10)
        assert c.rpc(a.name, "t", "add", [2, 3], timeout=10) == 5
        assert c.rpc(a.name, "t", "ask", [c.name, "x"], timeout=10) == "x"
        c.send(("erpy_gate", a.name), Atom("go"))
        t.join(20)
        assert result.get("g") == "go"
        assert a.stats()["handovers"] == before
    finally:
        c.stop()
        a.stop()


def test_a_reading_call_is_woken_by_messages_from_elsewhere(epmd):
    """A call that reads its connection while it waits is woken all the same by a message
    that does not come over that connection: from a Python thread of its own node, from
    another node; by its timeout; and by its caller giving up (KeyboardInterrupt)."""
    import threading
    a = Node(unique("pya"), COOKIE).start()
    c = Node(unique("pyc"), COOKIE).start()
    d = Node(unique("pyd"), COOKIE).start()
    seen = {}

    def receive(name, timeout):
        mb = a.mailbox()
        mb.register(name)
        try:
            return mb.receive(timeout)
        except TimeoutError:
            return Atom("timeout")
        except KeyboardInterrupt:
            seen[name] = "interrupted"
            raise
        finally:
            mb.close()

    a.expose("t", "receive", receive)
    try:
        def when_registered(name, then):
            def run():
                deadline = time.monotonic() + 10
                while a._native.whereis(name) is None and time.monotonic() < deadline:
                    time.sleep(0.005)
                then()
            threading.Thread(target=run).start()

        when_registered("g1", lambda: a.send("g1", Atom("local")))
        assert c.rpc(a.name, "t", "receive", ["g1", 20], timeout=20) == "local"
        when_registered("g2", lambda: d.send(("g2", a.name), Atom("remote")))
        assert c.rpc(a.name, "t", "receive", ["g2", 20], timeout=20) == "remote"
        assert c.rpc(a.name, "t", "receive", ["g3", 0.05], timeout=20) == "timeout"
        with pytest.raises(ErlangTimeoutError):
            c.rpc(a.name, "t", "receive", ["g4", 30], timeout=0.2)
        deadline = time.monotonic() + 10
        while seen.get("g4") != "interrupted":
            assert time.monotonic() < deadline, "the waiting call was not interrupted"
            time.sleep(0.01)
        assert c.rpc(a.name, "t", "receive", ["g3", 0], timeout=20) == "timeout"
    finally:
        d.stop()
        c.stop()
        a.stop()


def test_command_line_read_without_argparse_as_argparse_reads_it(monkeypatch):
    """A command line made of the node's own flags (what a node pool passes) is read
    without importing argparse, to the same options argparse gives; anything else
    (--help, abbreviations, --flag=value, bad values) goes to argparse."""
    monkeypatch.setenv("ERPY_NODE_TICKTIME", "9")
    lines = [
        ["--name", "a@h", "--cookie", "c"],
        ["--name", "a@h", "--cookie", "c", "--allow", "operator", "--allow", "math,os", "--allow-code",
         "--load", "x", "--load", "y", "--exit-on-eof", "--no-start-epmd", "--port", "123",
         "--connect", "b@h", "--connect", "c@h",
         "--spin-us", "5", "--max-send-queue", "99"],
        ["--name", "a", "--listen", "0.0.0.0", "--ticktime", "7", "--coalesce-us", "0",
         "--max-message-size", "5000", "--max-queued-messages", "3", "--max-queued-bytes", "4"],
        [],
    ]
    for line in lines:
        assert vars(node_module._cli_plain(line)) == vars(node_module._cli_parser().parse_args(line)), line
    assert node_module._cli_plain([]).ticktime == 9
    for line in (["--na", "x"], ["--name=x"], ["--port", "x"], ["--cookie", "-x"], ["-h"], ["--name"]):
        assert node_module._cli_plain(line) is None, line
    with pytest.raises(SystemExit):
        node_module.main(["--port", "not-a-number"])
