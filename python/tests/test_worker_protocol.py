"""The port worker (``python -m erpy.worker``) driven frame by frame, as Erlang would.

These tests play Erlang's side of doc/protocol.md over two pipes (fds 3 and 4 of the
worker), so they can send what the Erlang code never sends: malformed frames, unknown
kinds, cancels for finished requests, replies to nobody.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import erpy
from erpy import Atom, Pid

A = Atom
CALLER = Pid("nonode@nohost", 80, 0, 0)
PYTHON_DIR = Path(erpy.__file__).resolve().parent.parent


class Worker:
    """A worker process with the protocol on its fds 3 and 4. `preexec` runs in the child
    before exec (to start it as a VM with odd signal settings would); `init` adds keys to
    the init map; with `ready=False` the handshake is left to the test."""

    def __init__(self, max_message_size: int = 10 * 1024 * 1024, max_memory_mb=None,
                 preexec=None, init=None, ready: bool = True) -> None:
        to_py_r, self.to_py = os.pipe()
        self.from_py, from_py_w = os.pipe()
        # The child sees them as fds 3 and 4; moved above 10 first so dup2 cannot clobber.
        high_r = fcntl.fcntl(to_py_r, fcntl.F_DUPFD, 10)
        high_w = fcntl.fcntl(from_py_w, fcntl.F_DUPFD, 10)
        os.close(to_py_r)
        os.close(from_py_w)

        def setup() -> None:
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)
            if preexec is not None:
                preexec()

        env = dict(os.environ, PYTHONPATH=str(PYTHON_DIR), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "erpy.worker"], preexec_fn=setup,
            pass_fds=(3, 4, high_r, high_w), env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(high_r)
        os.close(high_w)
        self.logs: list[tuple] = []
        init_map = {A("version"): 1, A("pool"): A("test"),
                    A("max_message_size"): max_message_size,
                    A("max_memory_mb"): max_memory_mb, A("none"): None}
        init_map.update(init or {})
        self.send((A("init"), init_map))
        if not ready:
            return
        ready = self.recv()
        assert ready[0] == "ready", ready
        self.info = ready[1]

    def send_raw(self, payload: bytes) -> None:
        os.write(self.to_py, struct.pack(">I", len(payload)) + payload)

    def send(self, term) -> None:
        self.send_raw(erpy.encode(term))

    def _read(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = os.read(self.from_py, n - len(out))
            if not chunk:
                raise EOFError
            out += chunk
        return out

    def recv(self, skip_logs: bool = True):
        while True:
            (n,) = struct.unpack(">I", self._read(4))
            term = erpy.decode(self._read(n))
            if skip_logs and isinstance(term, tuple) and term and term[0] == "log":
                self.logs.append(term)
                continue
            return term

    # The request map (doc/protocol.md), its fields after the kind in the order the
    # erpy_request constructors take them.
    FIELDS = {"call": ("module", "function", "args", "kwargs"), "eval": ("code", "locals"),
              "exec": ("code",), "run": ("code", "args")}

    def request(self, kind: str, rid: int, *payload, deadline_ms: int = 0, nested: bool = False):
        """A request frame; `nested`: made inside a callback of the running request."""
        req = {A("v"): 1, A("kind"): A(kind), A("deadline"): deadline_ms, A("caller"): CALLER}
        req.update({A(k): v for k, v in zip(self.FIELDS[kind], payload)})
        self.send((A("nested" if nested else "request"), rid, req))

    def close(self) -> int:
        if self.to_py >= 0:
            os.close(self.to_py)
            self.to_py = -1
        try:
            return self.proc.wait(timeout=5)
        finally:
            if self.from_py >= 0:
                os.close(self.from_py)
                self.from_py = -1


@pytest.fixture
def worker():
    w = Worker()
    yield w
    w.close()


def test_handshake(worker):
    assert worker.info["version"] == 2
    assert worker.info["pid"] == worker.proc.pid
    assert worker.info["gil"] in ("shared", "free_threaded")


def test_call_eval_exec_run(worker):
    worker.request("call", 1, "operator", "add", [1, 2], {})
    assert worker.recv() == (A("ok"), 1, 3)
    worker.request("eval", 2, "x * 2", {A("x"): 21})
    assert worker.recv() == (A("ok"), 2, 42)
    worker.request("exec", 3, "y = 1")
    assert worker.recv() == (A("ok"), 3, None)
    worker.request("run", 4, "result = arguments + 1", 41)
    assert worker.recv() == (A("ok"), 4, 42)
    worker.request("call", 5, "os.path", "join", ["a", "b"], {})
    assert worker.recv() == (A("ok"), 5, "a/b")


def test_python_error_map(worker):
    worker.request("eval", 7, "1/0", {})
    tag, rid, err = worker.recv()
    assert (tag, rid) == ("error", 7)
    assert err[A("type")] == "ZeroDivisionError"
    assert err[A("traceback")] and all(isinstance(l, str) for l in err[A("traceback")])


def test_bad_frames_do_not_kill_the_worker(worker):
    worker.send_raw(b"\x83garbage")
    worker.send_raw(b"not even a version byte")
    worker.send((A("nosuchframe"), 8, 0, CALLER, 1, 2))  # not a frame of the protocol: dropped
    worker.send((A("request"), 9, {A("v"): 1, A("kind"): A("nosuchkind")}))
    tag, rid, err = worker.recv()
    assert (tag, rid) == ("error", 9)
    assert err[A("type")] == "ValueError"
    assert err[A("message")] == "request: kind must be call, eval, exec or run"
    worker.send((A("request"), 10, {A("v"): 1, A("kind"): A("call"), A("module"): "operator"}))
    tag, rid, err = worker.recv()
    assert (tag, rid, err[A("message")]) == ("error", 10, "request: call needs function")
    worker.send((A("reply"), 12345, A("ok"), 1))  # a reply to no callback: dropped
    worker.send((A("cancel"), 999))  # a cancel for nothing: dropped
    # A request whose payload does not decode: DecodeError for that id.
    good = erpy.encode((A("request"), 10, {A("v"): 1, A("kind"): A("eval"), A("code"): "1",
                                          A("locals"): {}}))
    worker.send_raw(good[:-3])
    tag, rid, err = worker.recv()
    assert (tag, rid) == ("error", 10) and err[A("type")] == "DecodeError"
    worker.request("eval", 11, "1 + 1", {})
    assert worker.recv() == (A("ok"), 11, 2)


def test_unencodable_result(worker):
    worker.request("eval", 1, "object()", {})
    tag, rid, err = worker.recv()
    assert (tag, rid) == ("error", 1) and err[A("type")] == "EncodeError"


def test_result_too_large():
    w = Worker(max_message_size=1000)
    try:
        w.request("eval", 1, "'x' * 5000", {})
        tag, rid, (what, size, limit) = w.recv()
        assert (tag, rid, what, limit) == ("error", 1, "message_too_large", 1000)
        assert size > 5000
        w.request("eval", 2, "1", {})
        assert w.recv() == (A("ok"), 2, 1)
    finally:
        w.close()


def test_deadline_interrupts_and_says_timeout(worker):
    deadline = int(time.time() * 1000) + 200
    t0 = time.monotonic()
    worker.request("exec", 1, "import time\ntime.sleep(10)", deadline_ms=deadline)
    assert worker.recv() == (A("error"), 1, A("timeout"))
    assert time.monotonic() - t0 < 2
    worker.request("eval", 2, "1", {})
    assert worker.recv() == (A("ok"), 2, 1)


def test_cancel_interrupts(worker):
    worker.request("exec", 1, "import time\ntime.sleep(10)")
    time.sleep(0.2)
    worker.send((A("cancel"), 1))
    assert worker.recv() == (A("error"), 1, A("timeout"))


def test_user_code_catching_keyboardinterrupt_is_not_timeout(worker):
    # Only the watchdog's interrupt means `timeout`; a KeyboardInterrupt the code raises
    # itself is a plain Python error.
    worker.request("exec", 1, "raise KeyboardInterrupt")
    tag, rid, err = worker.recv()
    assert (tag, rid) == ("error", 1) and err[A("type")] == "KeyboardInterrupt"


def test_callback_round_trip_and_nesting(worker):
    worker.request("run", 1, "result = erlang.call('lists', 'sort', [3, 1, 2])", None)
    cb = worker.recv()
    assert cb[0] == "callback" and cb[2:] == (A("call"), "lists", "sort", [3, 1, 2])
    # While Python waits, a nested request runs on the same worker.
    worker.request("eval", 2, "40 + 2", {}, nested=True)
    assert worker.recv() == (A("ok"), 2, 42)
    # A top-level (pipelined) request waits until the running one has ended.
    worker.request("eval", 3, "1 + 1", {})
    worker.send((A("reply"), cb[1], A("ok"), [1, 2, 3]))
    assert worker.recv() == (A("ok"), 1, [1, 2, 3])
    assert worker.recv() == (A("ok"), 3, 2)


def test_callback_error_raises_erlang_error(worker):
    worker.request("run", 1, "try:\n    erlang.call('os', 'cmd', 'ls')\n"
                            "except erlang.ErlangError as e:\n    result = e.args[0]", None)
    cb = worker.recv()
    reason = (A("not_allowed"), (A("os"), A("cmd"), 1))
    worker.send((A("reply"), cb[1], A("error"), reason))
    assert worker.recv() == (A("ok"), 1, reason)


def test_send_self_and_output(worker):
    worker.request("exec", 1, "erlang.send(erlang.self(), 'hi')\nprint('printed')")
    # erlang.send is a callback: Erlang checks the destination and answers.
    cb = worker.recv()
    assert cb[0] == "callback" and cb[2:] == (A("send"), CALLER, None, ["hi"])
    worker.send((A("reply"), cb[1], A("ok"), A("ok")))
    assert worker.recv() == (A("ok"), 1, None)
    deadline = time.monotonic() + 5
    while not any(t[2] == "printed" for t in worker.logs) and time.monotonic() < deadline:
        worker.request("eval", 2, "1", {})
        while worker.recv() != (A("ok"), 2, 1):
            pass
    assert (A("log"), A("stdout"), "printed") in worker.logs


def test_answers_are_written_without_the_gil(tmp_path):
    """A write that waits for Erlang to read (a large answer on a full pipe) must not
    stop the worker's other Python threads: the main thread writes without the GIL."""
    ticks = tmp_path / "ticks"
    ticks.touch()
    w = Worker(max_message_size=64 * 1024 * 1024)
    try:
        # A thread of the user's own, which makes progress only when it gets the GIL.
        w.request("exec", 1, "import os, threading, time\n"
                             "def tick(path):\n"
                             "    fd = os.open(path, os.O_WRONLY | os.O_APPEND)\n"
                             "    while True:\n"
                             "        os.write(fd, b'x')\n"
                             "        time.sleep(0.001)\n"
                             f"threading.Thread(target=tick, args=({str(ticks)!r},), daemon=True).start()")
        assert w.recv() == (A("ok"), 1, None)
        # Far more than a pipe holds: the worker's write blocks until we read.
        w.request("eval", 2, "b'y' * (32 * 1024 * 1024)", {})
        select.select([w.from_py], [], [])  # the answer has started: the pipe is full
        before = ticks.stat().st_size
        deadline = time.monotonic() + 10
        while ticks.stat().st_size < before + 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        moved = ticks.stat().st_size - before
        tag, rid, value = w.recv()
        assert (tag, rid, len(value)) == ("ok", 2, 32 * 1024 * 1024)
        assert moved >= 20, "the other thread stood still while the worker wrote"
    finally:
        w.close()


def test_erlang_functions_only_on_the_serving_thread(worker):
    """A thread of the user's own runs for no request: erlang.* raise ErlangPortError
    there, as in embedded mode (it would otherwise read the request pipe beside the
    serving thread)."""
    code = ("import threading\n"
            "out = []\n"
            "def f():\n"
            "    for g in (lambda: erlang.self(), lambda: erlang.call('erlang', 'abs', -1)):\n"
            "        try:\n"
            "            g()\n"
            "            out.append('ran')\n"
            "        except Exception as e:\n"
            "            out.append(type(e).__name__)\n"
            "t = threading.Thread(target=f)\n"
            "t.start()\n"
            "t.join(5)\n"
            "result = out")
    worker.request("run", 1, code, None)
    assert worker.recv() == (A("ok"), 1, ["ErlangPortError", "ErlangPortError"])
    worker.request("eval", 2, "erlang.self()", {})
    assert worker.recv() == (A("ok"), 2, CALLER)


def test_hold_keeps_namespace_until_reset(worker):
    worker.send((A("hold"),))
    worker.request("exec", 1, "kept = 5")
    assert worker.recv() == (A("ok"), 1, None)
    worker.request("eval", 2, "kept", {})
    assert worker.recv() == (A("ok"), 2, 5)
    worker.send((A("reset"),))
    worker.request("eval", 3, "kept", {})
    tag, rid, err = worker.recv()
    assert (tag, rid) == ("error", 3) and err[A("type")] == "NameError"


def test_memory_limit_announced_before_the_answer():
    w = Worker(max_memory_mb=50)
    try:
        w.request("exec", 1, "import builtins\nbuiltins.hog = b'x' * (80 * 1024 * 1024)")
        assert w.recv() == (A("exiting"), A("memory_limit"))
        assert w.recv() == (A("ok"), 1, None)
        assert w.proc.wait(timeout=5) == 0
    finally:
        w.close()


def test_exits_on_eof(worker):
    assert worker.close() == 0


def test_withdraw_takes_back_a_request_not_started(worker):
    # Written behind a running request, request 2 has not started: a withdraw frame
    # takes it back (the watchdog reads frames while Python runs) and it never runs.
    worker.request("exec", 1, "import time\ntime.sleep(0.5)")
    worker.request("exec", 2, "import builtins\nbuiltins.ran_2 = True")
    time.sleep(0.1)
    worker.send((A("withdraw"), 2))
    assert worker.recv() == (A("withdrawn"), 2)
    assert worker.recv() == (A("ok"), 1, None)
    # Too late for request 1 (answered) and for one that never came: no frame at all.
    worker.send((A("withdraw"), 1))
    worker.send((A("withdraw"), 99))
    worker.request("eval", 3, "getattr(__import__('builtins'), 'ran_2', False)", {})
    assert worker.recv() == (A("ok"), 3, False)


def test_withdraw_during_a_callback_wait(worker):
    # A top-level request read while the running one waits for Erlang is kept for later;
    # a withdraw frame takes it back from there too.
    worker.request("run", 1, "result = erlang.call('erlang', 'abs', -1)", None)
    cb = worker.recv()
    assert cb[0] == "callback"
    worker.request("eval", 2, "2", {})
    worker.send((A("withdraw"), 2))
    assert worker.recv() == (A("withdrawn"), 2)
    worker.send((A("reply"), cb[1], A("ok"), 1))
    assert worker.recv() == (A("ok"), 1, 1)
    worker.request("eval", 3, "3", {})
    assert worker.recv() == (A("ok"), 3, 3)


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def test_a_write_after_the_worker_died_still_lands():
    # The worker answers, then dies. A frame written after that (Erlang has not seen the
    # death yet) must not fail with EPIPE: the VM would close the port at once and drop
    # the answer it had not read. The answer is still there to read, and once the writer
    # closes its end, nothing of the worker is left.
    w = Worker()
    pgid = w.proc.pid
    try:
        w.request("eval", 1, "1", {})
        w.request("exec", 2, "import os\nos._exit(7)")
        assert w.proc.wait(timeout=5) == 7
        w.request("eval", 3, "3", {})  # no BrokenPipeError
        assert w.recv() == (A("ok"), 1, 1)
        with pytest.raises(EOFError):
            w.recv()
    finally:
        w.close()
    deadline = time.monotonic() + 5
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _group_members(pgid) == []
