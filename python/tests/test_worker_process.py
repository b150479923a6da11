"""The port worker's process (c_src/worker/process.hpp, watchdog.cpp): its pipes are its
own (children, forked or exec'd, cannot use them), its interrupts work whatever signal
settings it inherited or user code made, and it sets the pool's rlimits on itself.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from test_worker_protocol import A, Worker


def deadline_in(ms: int) -> int:
    return int(time.time() * 1000) + ms


def assert_interrupts(w: Worker, rid: int) -> None:
    w.request("exec", rid, "import time\ntime.sleep(10)", deadline_ms=deadline_in(200))
    assert w.recv() == (A("error"), rid, A("timeout"))
    # And a busy loop (no system call to break), in place: the same process answers.
    w.request("exec", rid + 1, "while True: pass", deadline_ms=deadline_in(200))
    assert w.recv() == (A("error"), rid + 1, A("timeout"))
    w.request("eval", rid + 2, "__import__('os').getpid()", {})
    assert w.recv() == (A("ok"), rid + 2, w.proc.pid)


def ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def block_signals() -> None:
    # What a launcher may leave behind: every signal blocked (the mask survives exec).
    signal.pthread_sigmask(signal.SIG_BLOCK, set(range(1, signal.NSIG)) - {signal.SIGKILL, signal.SIGSTOP})


@pytest.mark.parametrize("preexec", [ignore_sigint, block_signals], ids=["sigint_ignored", "signals_blocked"])
def test_deadline_interrupts_whatever_the_worker_inherited(preexec):
    w = Worker(preexec=preexec)
    try:
        assert_interrupts(w, 1)
        w.send((A("cancel"), 99))  # harmless
        w.request("exec", 10, "import time\ntime.sleep(10)")
        time.sleep(0.2)
        w.send((A("cancel"), 10))
        assert w.recv() == (A("error"), 10, A("timeout"))
    finally:
        w.close()


def test_user_code_ignoring_sigint_does_not_stop_interrupts():
    w = Worker()
    try:
        w.request("exec", 1, "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)")
        assert w.recv() == (A("ok"), 1, None)
        assert_interrupts(w, 2)
    finally:
        w.close()


def test_protocol_fds_are_close_on_exec():
    w = Worker()
    try:
        code = ("import subprocess, sys\n"
                "p = subprocess.run([sys.executable, '-c', 'import os\\nfor fd in (3, 4):\\n"
                "    try:\\n        os.fstat(fd)\\n        print(fd)\\n    except OSError:\\n        pass'],"
                " close_fds=False, capture_output=True, text=True)\n"
                "result = p.stdout.split()")
        w.request("run", 1, code, None)
        assert w.recv() == (A("ok"), 1, [])
        # os.system too (posix_spawn: no fork handlers, only close-on-exec protects).
        w.request("eval", 2, "__import__('os').system('echo garbage >&4; cat <&3')", {})
        tag, rid, status = w.recv()
        assert (tag, rid) == ("ok", 2) and status != 0
        w.request("eval", 3, "6 * 7", {})
        assert w.recv() == (A("ok"), 3, 42)
    finally:
        w.close()


def test_forked_child_cannot_use_the_protocol():
    w = Worker()
    try:
        code = """
import os
pid = os.fork()
if pid == 0:
    status = 0
    try:
        os.write(4, b'\\x00\\x00\\x00\\x07garbage')   # goes to /dev/null
        if os.read(3, 100) != b'':                     # /dev/null: EOF at once
            status |= 1
        try:
            erlang.call('lists', 'sort', [2, 1])
            status |= 2
        except erlang.ErlangPortError:
            pass
    except BaseException:
        status |= 4
    os._exit(status)
_, st = os.waitpid(pid, 0)
result = os.waitstatus_to_exitcode(st)
"""
        w.request("run", 1, code, None)
        assert w.recv() == (A("ok"), 1, 0)
        w.request("eval", 2, "'still' + ' fine'", {})
        assert w.recv() == (A("ok"), 2, "still fine")
    finally:
        w.close()


def test_multiprocessing_fork_pool():
    w = Worker()
    try:
        code = ("import multiprocessing, operator\n"
                "with multiprocessing.get_context('fork').Pool(2) as p:\n"
                "    result = p.map(operator.neg, range(200))\n")
        w.request("run", 1, code, None)
        assert w.recv() == (A("ok"), 1, [-i for i in range(200)])
        w.request("eval", 2, "1 + 1", {})
        assert w.recv() == (A("ok"), 2, 2)
    finally:
        w.close()


def test_worker_leads_its_own_process_group():
    # Started without a session of its own (as another launcher than Erlang might).
    w = Worker()
    try:
        w.request("eval", 1, "(__import__('os').getpgid(0), __import__('os').getsid(0))", {})
        assert w.recv() == (A("ok"), 1, (w.proc.pid, w.proc.pid))
    finally:
        w.close()


def test_rlimits_are_set_before_any_request():
    limits = {A("nofile"): 64, A("fsize"): 1 << 20, A("core"): 0, A("cpu"): 100,
              A("as"): 4 << 30, A("nproc"): 4096}
    w = Worker(init={A("rlimits"): limits})
    try:
        code = ("import resource\n"
                "result = {n: resource.getrlimit(getattr(resource, 'RLIMIT_' + n.upper()))"
                " for n in ['nofile', 'fsize', 'core', 'cpu', 'as', 'nproc']}")
        w.request("run", 1, code, None)
        tag, rid, got = w.recv()
        assert (tag, rid) == ("ok", 1)
        assert got == {str(k): (v, v) for k, v in limits.items()}
        # User code cannot raise them again.
        w.request("exec", 2, "import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, (65, 65))")
        tag, rid, err = w.recv()
        if os.geteuid() != 0:  # root may
            assert (tag, rid) == ("error", 2) and err[A("type")] == "ValueError"
        # Over nofile: OSError (EMFILE) in Python, and the worker goes on.
        w.request("exec", 3, "fs = [open('/dev/null') for _ in range(100)]")
        tag, rid, err = w.recv()
        assert (tag, rid) == ("error", 3) and err[A("type")] == "OSError", err
        assert "Too many open files" in err[A("message")]
        w.request("eval", 4, "1", {})
        assert w.recv() == (A("ok"), 4, 1)
    finally:
        w.close()


def test_rlimit_infinity_means_the_hard_limit():
    import resource
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)

    def lower_soft() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 256), hard))

    w = Worker(preexec=lower_soft, init={A("rlimits"): {A("nofile"): A("infinity")}})
    try:
        w.request("eval", 1, "__import__('resource').getrlimit(__import__('resource').RLIMIT_NOFILE)", {})
        assert w.recv() == (A("ok"), 1, (hard, hard))
    finally:
        w.close()


def test_rlimit_that_cannot_be_set_stops_the_worker():
    w = Worker(init={A("rlimits"): {A("bogus"): 1}}, ready=False)
    try:
        log = w.recv(skip_logs=False)
        assert log[:2] == (A("log"), A("stderr")) and "unknown rlimit bogus" in log[2]
        assert w.proc.wait(timeout=5) == 4
    finally:
        w.close()


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_children_end_with_the_worker():
    # Also when Erlang is gone without a word (the VM died): EOF on the request pipe.
    w = Worker()
    try:
        w.request("run", 1, "import subprocess\nresult = subprocess.Popen(['sleep', '30']).pid", None)
        tag, rid, child = w.recv()
        assert (tag, rid) == ("ok", 1) and process_alive(child)
    finally:
        assert w.close() == 0
    deadline = time.monotonic() + 5
    while process_alive(child) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not process_alive(child)
