"""erpy.port: a port program's loop, driven through real pipes as an Erlang port would
(length-prefixed frames on stdin/stdout, {packet, 1 | 2 | 4})."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import erpy
import erpy.port
from erpy import Atom

PYTHON_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The seed's handlers (fujimisakari's my_protocol.py), unchanged; only the import of
# Protocol is erpy's.
SCRIPT = textwrap.dedent('''\
    import sys
    from erpy.port import Protocol


    class MyProtocol(Protocol):

        def handler_twice(self, x):
            return 2 * int(x)

        def handler_sum(self, x, y):
            return int(x) + int(y)

        def handler_hello(self, name):
            return 'Hello, {}'.format(name)

        # Beyond the seed: what the tests below need.
        def handler_fail(self):
            return 1 / 0

        def handler_shout(self, text):
            print("this goes to stderr, not into a frame")
            return text.upper()

        def handler_big(self, n):
            return "x" * n

        def handler_remember(self, v):
            self.memory = v

        def handler_recall(self):
            return getattr(self, "memory", None)


    if __name__ == '__main__':
        packet = int(sys.argv[1]) if len(sys.argv) > 1 else None
        proto = MyProtocol(packet=packet)
        proto.register("add3", lambda a, b, c: a + b + c)
        proto.register("where", lambda: "calc module", module="calc")
        proto.run()
    ''')


class Program:
    def __init__(self, path: str, packet: int | None) -> None:
        self.packet = packet or 2
        args = [sys.executable, path] + ([str(packet)] if packet else [])
        env = dict(os.environ, PYTHONPATH=PYTHON_DIR)
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)

    def send_frame(self, data: bytes) -> None:
        self.proc.stdin.write(len(data).to_bytes(self.packet, "big") + data)
        self.proc.stdin.flush()

    def read_frame(self) -> bytes:
        size = int.from_bytes(self._read(self.packet), "big")
        return self._read(size)

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.proc.stdout.read(n - len(data))
            assert chunk, "the program closed its stdout"
            data += chunk
        return data

    def ask(self, term):
        self.send_frame(erpy.encode(term))
        return erpy.decode(self.read_frame())

    def close(self) -> int:
        if self.proc.stdin.closed:
            return self.proc.returncode
        self.proc.stdin.close()
        rc = self.proc.wait(10)
        self.stderr = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "my_protocol.py"
    path.write_text(SCRIPT)
    return str(path)


@pytest.fixture
def prog(script):
    p = Program(script, None)
    yield p
    p.close()


def test_seed_example_twice_sum_hello(prog):
    assert prog.ask((Atom("twice"), 3)) == 6
    assert prog.ask((Atom("sum"), 1, 2)) == 3
    assert prog.ask((Atom("hello"), "taro")) == "Hello, taro"


def test_bert_rpc_call_reply(prog):
    assert prog.ask((Atom("call"), Atom("my_protocol"), Atom("twice"), [21])) == (Atom("reply"), 42)
    assert prog.ask((Atom("call"), Atom("any"), Atom("add3"), [1, 2, 3])) == (Atom("reply"), 6)


def test_unknown_handler_is_a_server_error(prog):
    err = prog.ask((Atom("call"), Atom("m"), Atom("nope"), []))
    assert err[0] == "error"
    assert err[1][:3] == ("server", 2, "NameError")
    # The old form answers the same error, and the loop goes on.
    assert prog.ask((Atom("nope"), 1))[1][:2] == ("server", 2)
    assert prog.ask((Atom("twice"), 1)) == 2


def test_wrong_arity_is_a_server_error(prog):
    err = prog.ask((Atom("call"), Atom("m"), Atom("twice"), [1, 2]))
    assert err[0] == "error" and err[1][:3] == ("server", 2, "TypeError")
    assert "twice/2" in err[1][3]
    err = prog.ask((Atom("sum"), 1))
    assert err[1][:3] == ("server", 2, "TypeError")


def test_exception_is_a_user_error_with_backtrace(prog):
    err = prog.ask((Atom("call"), Atom("m"), Atom("fail"), []))
    kind, code, cls, detail, backtrace = err[1]
    assert (err[0], kind, code, cls) == ("error", "user", 0, "ZeroDivisionError")
    assert "division by zero" in detail
    assert any("handler_fail" in line for line in backtrace)


def test_bad_frames_do_not_kill_the_loop(prog):
    prog.send_frame(b"\x83\x00garbage")
    err = erpy.decode(prog.read_frame())
    assert err[1][:3] == ("protocol", 2, "DecodeError")
    prog.send_frame(b"")
    assert erpy.decode(prog.read_frame())[1][:2] == ("protocol", 2)
    # A term that is no request.
    assert prog.ask(42)[1][:3] == ("protocol", 0, "BadRequest")
    assert prog.ask(())[1][:2] == ("protocol", 0)
    assert prog.ask((Atom("call"), Atom("m"), Atom("twice"), "notalist"))[1][:2] == ("protocol", 0)
    assert prog.ask((Atom("twice"), 5)) == 10


def test_print_goes_to_stderr_not_the_channel(prog):
    assert prog.ask((Atom("call"), Atom("m"), Atom("shout"), ["hi"])) == (Atom("reply"), "HI")
    assert prog.close() == 0
    assert b"this goes to stderr" in prog.stderr


def test_cast_answers_noreply_then_runs(prog):
    assert prog.ask((Atom("cast"), Atom("m"), Atom("remember"), [7])) == (Atom("noreply"),)
    assert prog.ask((Atom("call"), Atom("m"), Atom("recall"), [])) == (Atom("reply"), 7)


def test_info_packets_get_no_answer(prog):
    prog.send_frame(erpy.encode((Atom("info"), Atom("callback"), [])))
    assert prog.ask((Atom("call"), Atom("m"), Atom("twice"), [4])) == (Atom("reply"), 8)


def test_module_specific_handler(prog):
    assert prog.ask((Atom("call"), Atom("calc"), Atom("where"), [])) == (Atom("reply"), "calc module")
    assert prog.ask((Atom("call"), Atom("other"), Atom("where"), []))[1][:2] == ("server", 2)


@pytest.mark.parametrize("packet", [1, 2, 4])
def test_packet_sizes(script, packet):
    p = Program(script, packet)
    try:
        assert p.ask((Atom("twice"), 3)) == 6
        assert p.ask((Atom("call"), Atom("m"), Atom("hello"), ["x"])) == (Atom("reply"), "Hello, x")
        if packet == 1:
            # A reply over 255 bytes cannot be framed: an error that fits, and the loop goes on.
            err = p.ask((Atom("call"), Atom("m"), Atom("big"), [300]))
            assert err[1][:3] == ("server", 0, "ValueError")
        else:
            assert p.ask((Atom("call"), Atom("m"), Atom("big"), [300])) == (Atom("reply"), "x" * 300)
        assert p.ask((Atom("sum"), 2, 2)) == 4
    finally:
        assert p.close() == 0


def test_eof_ends_the_loop(script):
    p = Program(script, None)
    assert p.ask((Atom("twice"), 1)) == 2
    assert p.close() == 0


def test_port_class_directly():
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    a = erpy.port.Port(4, in_fd=r1, out_fd=w2)
    os.write(w1, (3).to_bytes(4, "big") + b"\x83a\x07")
    assert a.read() == 7
    a.write((Atom("ok"), 1))
    size = int.from_bytes(os.read(r2, 4), "big")
    assert erpy.decode(os.read(r2, size)) == (Atom("ok"), 1)
    os.close(w1)
    with pytest.raises(EOFError):
        a.read_frame()
    a.close()
    os.close(r2)
    with pytest.raises(ValueError):
        erpy.port.Port(3, in_fd=0, out_fd=1)

