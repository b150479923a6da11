"""erpy.reactor: the protocol contract, the zero-copy buffer, and the port-mode loop, over
socketpairs and pipes (the Erlang side is test/erpy_reactor_SUITE.erl)."""

from __future__ import annotations

import gc
import os
import socket
import threading
import time

import pytest

import erpy
from erpy import _native, reactor


@pytest.fixture(autouse=True)
def clean_reactor():
    yield
    for fd in list(reactor._conns):
        reactor._abort(fd)
    reactor._factories.clear()
    reactor._spec_cache.clear()
    reactor._module_factory.clear()


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def buffer_of(data: bytes):
    r, w = os.pipe()
    try:
        os.write(w, data)
        return _native.reactor_read(r, 1 << 16)
    finally:
        os.close(r)
        os.close(w)


# -- ReactorBuffer ------------------------------------------------------------------------

def test_buffer_behaves_like_bytes():
    b = buffer_of(b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
    assert isinstance(b, reactor.ReactorBuffer)
    assert len(b) == 37
    assert b[0] == ord("G") and b[-1] == ord("\n")
    assert b[0:3] == b"GET" and b[4:5] == b"/" and b[::-1][:2] == b"\n\r"
    assert b.startswith(b"GET") and b.startswith((b"POST", b"GET")) and not b.startswith(b"POST")
    assert b.startswith(b"/", 4) and b.endswith(b"\r\n\r\n")
    assert b.find(b"\r\n") == 24 and b.find(b"nope") == -1 and b.find(ord("/")) == 4
    assert b.rfind(b"\r\n") == 35 and b.index(b"Host") == 26
    with pytest.raises(ValueError):
        b.index(b"nope")
    assert b.count(b"\r\n") == 3 and b.count(b"/") == 2
    assert b.decode() == "GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n"
    assert b.decode("latin-1", errors="strict").startswith("GET")
    assert b == b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n" and b != b"x"
    assert b == bytearray(b"GET /index.html HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"HTTP" in b and b"SMTP" not in b and ord("G") in b
    assert bytes(b) == b.tobytes() and isinstance(bytes(b), bytes)
    assert memoryview(b)[:3] == b"GET" and b.memoryview()[:3].tobytes() == b"GET"
    ba = bytearray()
    ba.extend(b)
    assert ba == bytes(b)
    # Other bytes methods work on a copy.
    assert b.split(b"\r\n")[0] == b"GET /index.html HTTP/1.1" and b.upper().startswith(b"GET /INDEX")
    with pytest.raises(TypeError):
        hash(b)
    b.release()


def test_buffer_after_release_is_an_error_not_a_crash():
    b = buffer_of(b"hello")
    view = memoryview(b)  # taken during the call: keeps the memory alive
    b.release()
    assert b.released
    for use in (len, bytes, lambda x: x[0], lambda x: x[1:], lambda x: x.find(b"l"),
                lambda x: x.startswith(b"h"), lambda x: x.decode(), lambda x: x == b"hello",
                lambda x: b"h" in x, memoryview, lambda x: x.memoryview(), lambda x: x.count(b"l")):
        with pytest.raises(reactor.BufferReleasedError):
            use(b)
    assert view.tobytes() == b"hello"
    del view
    gc.collect()
    assert "released" in repr(b)


def test_read_results():
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        assert _native.reactor_read(r, 10) is None
        os.write(w, b"abc")
        b = _native.reactor_read(r, 2)
        assert b == b"ab"
        os.close(w)
        w = -1
        assert _native.reactor_read(r, 10) == b"c"
        assert _native.reactor_read(r, 10) == b""
        with pytest.raises(ValueError):
            _native.reactor_read(r, 0)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_write_to_a_reset_peer_is_an_oserror_not_sigpipe():
    a, b = socket.socketpair()
    b.close()
    with pytest.raises(OSError):
        _native.reactor_write(a.fileno(), b"x")
    a.close()


# -- the protocol contract, driven as erpy's pollers drive it -----------------------------

class Echo(reactor.Protocol):
    events: list = []

    def connection_made(self, fd, client_info):
        super().connection_made(fd, client_info)
        Echo.events.append(("made", client_info.get("type")))

    def data_received(self, data):
        self.write_buffer.extend(data)
        return "write_pending"

    def connection_lost(self):
        Echo.events.append(("lost", self.fd))


def drive(fd, event):
    return reactor._ready(fd, event)


def test_echo_round_trip_and_close_by_peer():
    Echo.events = []
    reactor.set_protocol_factory(Echo)
    a, b = socket.socketpair()
    a.setblocking(False)
    assert reactor._open(a.fileno(), {"addr": "local", "port": 0, "type": "unix"}) == "read"
    proto = reactor.get_protocol(a.fileno())
    assert isinstance(proto, Echo) and proto.client_info["type"] == "unix"
    b.sendall(b"ping")
    assert drive(a.fileno(), "read") == "read"  # written at once, back to reading
    assert b.recv(10) == b"ping"
    b.close()
    assert drive(a.fileno(), "read") == "close"  # end of file: closed
    assert reactor.get_protocol(a.fileno()) is None and proto.closed
    assert Echo.events == [("made", "unix"), ("lost", a.fileno())]
    with pytest.raises(reactor.ReactorError):
        proto.write(b"x")
    a.close()


def test_every_action():
    script = []

    class P(reactor.Protocol):
        def data_received(self, data):
            return script.pop(0)

        def write_ready(self):
            return script.pop(0)

    reactor.set_protocol_factory(P)
    a, b = socket.socketpair()
    a.setblocking(False)
    fd = a.fileno()
    reactor._open(fd, {})
    b.sendall(b"1")
    script[:] = ["continue"]
    assert drive(fd, "read") == "read"
    b.sendall(b"2")
    script[:] = ["write_pending", "continue"]  # write_ready at once, wants more
    assert drive(fd, "read") == "write"
    script[:] = ["continue"]
    assert drive(fd, "write") == "write"
    script[:] = ["read_pending"]
    assert drive(fd, "write") == "read"
    b.sendall(b"3")
    script[:] = ["read_pending"]
    assert drive(fd, "read") == "read"
    b.sendall(b"4")
    script[:] = ["close"]
    assert drive(fd, "read") == "close"
    assert reactor.get_protocol(fd) is None
    a.close()
    b.close()


def test_unknown_action_is_a_clear_error_for_that_connection_only():
    class Bad(reactor.Protocol):
        def data_received(self, data):
            return "explode" if data == b"bad" else "continue"

    reactor.set_protocol_factory(Bad)
    (a1, b1), (a2, b2) = socket.socketpair(), socket.socketpair()
    for s in (a1, a2):
        s.setblocking(False)
        reactor._open(s.fileno(), {})
    b1.sendall(b"bad")
    with pytest.raises(reactor.ReactorError, match="'explode'.*expected one of"):
        drive(a1.fileno(), "read")
    reactor._abort(a1.fileno())  # what erpy does next
    assert reactor.get_protocol(a1.fileno()) is None
    b2.sendall(b"fine")
    assert drive(a2.fileno(), "read") == "read"
    assert reactor.get_protocol(a2.fileno()) is not None
    for s in (a1, b1, a2, b2):
        s.close()


def test_buffer_is_released_after_data_received():
    kept = []

    class Keeper(reactor.Protocol):
        def data_received(self, data):
            kept.append(data)
            kept.append(bytes(data))
            return "continue"

    reactor.set_protocol_factory(Keeper)
    a, b = socket.socketpair()
    a.setblocking(False)
    reactor._open(a.fileno(), {})
    b.sendall(b"payload")
    drive(a.fileno(), "read")
    with pytest.raises(reactor.BufferReleasedError):
        kept[0].decode()
    assert kept[1] == b"payload"
    a.close()
    b.close()


def test_half_close_still_answers():
    class Http(reactor.Protocol):
        def data_received(self, data):
            self.write_buffer.extend(b"reply:" + bytes(data))
            return "write_pending"

    reactor.set_protocol_factory(Http)
    a, b = socket.socketpair()
    a.setblocking(False)
    reactor._open(a.fileno(), {})
    b.sendall(b"req")
    b.shutdown(socket.SHUT_WR)
    assert drive(a.fileno(), "read") == "read"
    assert drive(a.fileno(), "read") == "close"
    assert b.recv(100) == b"reply:req"
    a.close()
    b.close()


def test_eof_received_may_flush_before_closing():
    class Flush(reactor.Protocol):
        def data_received(self, data):
            self.write_buffer.extend(data)
            return "continue"  # answered only at the end

        def eof_received(self):
            return "write_pending"

    reactor.set_protocol_factory(Flush)
    a, b = socket.socketpair()
    a.setblocking(False)
    reactor._open(a.fileno(), {})
    b.sendall(b"all of it")
    b.shutdown(socket.SHUT_WR)
    drive(a.fileno(), "read")
    assert drive(a.fileno(), "read") == "close"
    assert b.recv(100) == b"all of it"
    a.close()
    b.close()


def test_peer_reset_raises_for_erpy_to_close():
    reactor.set_protocol_factory(Echo)
    a, b = socket.socket(), None
    srv = socket.create_server(("127.0.0.1", 0))
    a.connect(srv.getsockname())
    b, _ = srv.accept()
    b.setblocking(False)
    reactor._open(b.fileno(), {"type": "tcp"})
    a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    a.close()  # RST
    time.sleep(0.05)
    with pytest.raises(ConnectionResetError):
        drive(b.fileno(), "read")
    assert reactor._abort(b.fileno())
    b.close()
    srv.close()


def test_pipe_and_udp():
    got = []

    class Sink(reactor.Protocol):
        def data_received(self, data):
            got.append(bytes(data))
            return "continue"

    reactor.set_protocol_factory(Sink)
    r, w = os.pipe()
    os.set_blocking(r, False)
    reactor._open(r, {"type": "pipe"})
    os.write(w, b"through a pipe")
    assert drive(r, "read") == "read"
    os.close(w)
    assert drive(r, "read") == "close"
    os.close(r)
    u1 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u1.bind(("127.0.0.1", 0))
    u1.setblocking(False)
    u2 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u2.connect(u1.getsockname())
    u1.connect(u2.getsockname())
    reactor._open(u1.fileno(), {"type": "udp"})
    u2.send(b"datagram one")
    u2.send(b"two")
    assert drive(u1.fileno(), "read") == "read"
    assert drive(u1.fileno(), "read") == "read"
    assert got == [b"through a pipe", b"datagram one", b"two"]
    assert reactor.get_protocol(u1.fileno()).write(b"back") == 4
    assert u2.recv(10) == b"back"
    reactor._abort(u1.fileno())
    u1.close()
    u2.close()


def test_factories_per_pool():
    class A(reactor.Protocol):
        pass

    class B(reactor.Protocol):
        pass

    reactor.set_protocol_factory(A)
    reactor.set_protocol_factory(B, pool="other")
    s1, s2, s3 = socket.socketpair(), socket.socketpair(), socket.socketpair()
    reactor._open(s1[0].fileno(), {}, "any")
    reactor._open(s2[0].fileno(), {}, "other")
    reactor._open(s3[0].fileno(), {}, "x", ("erpy.reactor", "Protocol"))
    assert type(reactor.get_protocol(s1[0].fileno())) is A
    assert type(reactor.get_protocol(s2[0].fileno())) is B
    assert type(reactor.get_protocol(s3[0].fileno())) is reactor.Protocol
    for p in (s1, s2, s3):
        reactor._abort(p[0].fileno())
        p[0].close()
        p[1].close()


def test_no_factory_is_a_clear_error():
    a, b = socket.socketpair()
    with pytest.raises(reactor.ReactorError, match="no protocol factory"):
        reactor._open(a.fileno(), {}, "nopool")
    assert reactor.get_protocol(a.fileno()) is None
    with pytest.raises(TypeError):
        reactor.set_protocol_factory(42)
    a.close()
    b.close()


def test_connection_made_that_raises_leaves_nothing_registered():
    class Boom(reactor.Protocol):
        def connection_made(self, fd, info):
            raise RuntimeError("no")

    reactor.set_protocol_factory(Boom)
    a, b = socket.socketpair()
    with pytest.raises(RuntimeError):
        reactor._open(a.fileno(), {})
    assert reactor.get_protocol(a.fileno()) is None
    a.close()
    b.close()


# -- port mode: fds over SCM_RIGHTS to the worker's own loop ------------------------------

def send_fd(name, fd, scope, info, spec):
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect("\0" + name)
    socket.send_fds(c, [erpy.encode((scope, info, spec))], [fd])
    answer = c.recv(4096)
    c.close()
    return answer


def test_port_loop_echo_and_timeout():
    name, pid = reactor._port_channel(300)
    assert pid == os.getpid()
    before = fd_count()
    pairs = []
    for _ in range(20):
        a, b = socket.socketpair()
        assert send_fd(name, a.fileno(), "p", {"type": "unix"}, ("erpy.reactor", "Protocol")) == b"K"
        a.close()  # ours; the loop has its own copy
        pairs.append(b)

    class PortEcho(reactor.Protocol):
        def data_received(self, data):
            if data == b"hang":
                while True:
                    pass
            self.write_buffer.extend(data)
            return "write_pending"

    reactor.set_protocol_factory(PortEcho, pool="echo")
    a, b = socket.socketpair()
    assert send_fd(name, a.fileno(), "echo", {}, None) == b"K"
    a.close()
    b.settimeout(5)
    b.sendall(b"hi")
    assert b.recv(10) == b"hi"
    a2, b2 = socket.socketpair()
    assert send_fd(name, a2.fileno(), "echo", {}, None) == b"K"
    a2.close()
    b2.settimeout(5)
    b2.sendall(b"hang")  # runs past 300 ms: ReactorTimeout closes that connection only
    assert b2.recv(10) == b""
    b.sendall(b"still")
    assert b.recv(10) == b"still"
    b2.close()
    b.close()
    # A factory that fails: the error comes back, the fd is closed.
    a3, b3 = socket.socketpair()
    assert send_fd(name, a3.fileno(), "nofactory", {}, ("no_such_module_x", "f")).startswith(b"E")
    a3.close()
    b3.settimeout(5)
    assert b3.recv(1) == b""
    b3.close()
    for b in pairs:
        b.close()
    deadline = time.time() + 5
    while time.time() < deadline and (fd_count() > before or reactor._count()):
        time.sleep(0.02)
    assert reactor._count() == 0
    assert fd_count() <= before


def test_port_loop_callback_channel_outside_a_worker():
    """The callback channel Erlang sends a worker's loop is taken by the port worker only
    (port_worker.cpp): elsewhere a clear error, the fd closed; erlang.call from the loop's
    thread stays an ErlangPortError, never a hang."""
    from erpy import erlang
    name, _pid = reactor._port_channel(300)
    before = fd_count()
    a, b = socket.socketpair()
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect("\0" + name)
    socket.send_fds(c, [erpy.encode((erpy.Atom("erpy_callback_channel"), "p"))], [a.fileno()])
    answer = c.recv(4096)
    c.close()
    a.close()
    assert answer.startswith(b"EErlangPortError")
    b.settimeout(5)
    assert b.recv(1) == b""  # the worker's end was closed
    b.close()

    seen = []

    class Caller(reactor.Protocol):
        def data_received(self, data):
            try:
                erlang.call("lists", "reverse", [[1]])
            except erlang.ErlangPortError as e:
                seen.append(type(e).__name__)
            return "close"

    reactor.set_protocol_factory(Caller, pool="cb")
    a, b = socket.socketpair()
    assert send_fd(name, a.fileno(), "cb", {}, None) == b"K"
    a.close()
    b.settimeout(5)
    b.sendall(b"x")
    assert b.recv(1) == b""
    b.close()
    assert seen == ["ErlangPortError"]
    deadline = time.time() + 5
    while time.time() < deadline and fd_count() > before:
        time.sleep(0.02)
    assert fd_count() <= before


def test_fd_handed_over_again_loses_the_stale_protocol():
    # An embedded pool that stops forgets no protocol in the shared interpreter; its fds
    # are closed, so a number handed over again names a new connection.
    Echo.events = []
    reactor.set_protocol_factory(Echo)
    a, b = socket.socketpair()
    a.setblocking(False)
    fd = a.fileno()
    assert reactor._open(fd, {"type": "unix"}) == "read"
    stale = reactor.get_protocol(fd)
    assert reactor._open(fd, {"type": "unix"}) == "read"
    fresh = reactor.get_protocol(fd)
    assert fresh is not stale and stale.closed and not fresh.closed
    assert Echo.events == [("made", "unix"), ("lost", fd), ("made", "unix")]
    a.close()
    b.close()
