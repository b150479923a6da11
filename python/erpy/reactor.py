"""erpy.reactor: Python protocols on file descriptors that erpy polls (doc/reactor.md).

Erlang accepts a connection (or opens any fd: TCP, UDP, Unix socket, pipe) and hands it
over with ``erpy_reactor:handoff/3,4``. A *protocol* object, made by the pool's factory,
then handles it: erpy waits for the fd to be readable or writable (``enif_select`` in
embedded mode, the worker's own poll loop in port mode) and calls the protocol, whose
return value (an *action*) says what to wait for next:

``"continue"``       wait for the same event again
``"read_pending"``   wait until the fd is readable (``data_received`` comes next)
``"write_pending"``  wait until it is writable (``write_ready`` comes next; erpy tries
                     at once, since a socket is nearly always writable)
``"close"``          close the connection (``connection_lost`` comes next)

Anything else is an error that closes that connection only (:class:`ReactorError`).

``data_received`` gets a :class:`ReactorBuffer`: the bytes read, without a copy, valid
during that call only. Keep ``bytes(data)`` (or extend a bytearray with it) to keep them.

The fd belongs to erpy: a protocol reads and writes it (:meth:`Protocol.read`,
:meth:`Protocol.write`) and never closes it; ``"close"`` does.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
import traceback

from . import _native

__all__ = [
    "Protocol", "ReactorBuffer", "ReactorError", "BufferReleasedError",
    "set_protocol_factory", "get_protocol", "ACTIONS",
]

ReactorBuffer = _native.ReactorBuffer
BufferReleasedError = _native.BufferReleasedError

ACTIONS = ("continue", "write_pending", "read_pending", "close")


class ReactorError(RuntimeError):
    """A protocol broke the reactor's contract (an unknown action, no factory, a closed
    connection used); the connection concerned is closed."""


class ReactorTimeout(BaseException):
    """Raised inside a protocol callback that ran past its time (port mode); like
    KeyboardInterrupt, ``except Exception`` does not catch it."""


class Protocol:
    """One connection. Subclass it and override the callbacks you need.

    Attributes set by erpy: ``fd`` (int), ``client_info`` (dict from Erlang, usually with
    ``addr``, ``port`` and ``type``), ``write_buffer`` (a bytearray that the default
    :meth:`write_ready` sends), ``closed`` (bool).
    """

    #: Largest read per readiness event.
    read_size = 65536

    def __init__(self):
        self.fd = -1
        self.client_info = {}
        self.write_buffer = bytearray()
        self.closed = False

    # -- callbacks ----------------------------------------------------------------------

    def connection_made(self, fd, client_info):
        """The fd was handed over. Return an action (None: ``"read_pending"``)."""
        self.fd = fd
        self.client_info = client_info

    def data_received(self, data):
        """Bytes arrived (a ReactorBuffer, valid during this call only)."""
        return "continue"

    def eof_received(self):
        """The peer closed its end for writing. Default: close. Return
        ``"write_pending"`` to send what is buffered first (erpy closes once writing is
        done and the next read finds the end again)."""
        return "close"

    def write_ready(self):
        """The fd is writable: send what ``write_buffer`` holds."""
        if self.write_buffer:
            n = self.write(self.write_buffer)
            del self.write_buffer[:n]
        return "continue" if self.write_buffer else "read_pending"

    def connection_lost(self):
        """The connection is closed (by "close", the peer, an error or a timeout)."""

    # -- I/O helpers -------------------------------------------------------------------

    def read(self, size=65536):
        """Up to ``size`` bytes (a copy), ``b''`` at end of file, None if nothing is
        there now. Errors (a reset peer) raise OSError."""
        self._check_open()
        buf = _native.reactor_read(self.fd, size)
        if buf is None or not len(buf):
            return buf
        try:
            return bytes(buf)
        finally:
            buf.release()

    def write(self, data):
        """Writes what the fd takes now; returns the number of bytes written (0 if it
        would block). A reset peer raises OSError (EPIPE, ECONNRESET), never SIGPIPE."""
        self._check_open()
        return _native.reactor_write(self.fd, data)

    def _check_open(self):
        if self.closed:
            raise ReactorError(f"connection {self.fd} is closed")


# -- factories, per pool -------------------------------------------------------------------

_factories: dict = {}         # scope (pool name, or None: any pool) -> factory
_spec_cache: dict = {}        # (module, name) -> factory
_module_factory: dict = {}    # module name -> factory its import set (for other pools)
_scope = threading.local()    # the pool a setup or a callback runs for
_conns: dict = {}             # fd -> protocol


def set_protocol_factory(factory, *, pool=None):
    """Sets what makes a protocol for each new connection: any callable returning a
    :class:`Protocol` (a subclass, or ``lambda: MyProtocol(arg)``).

    For the pool ``pool``, or, if not given, for the pool whose setup or callback is
    running (a module named by the pool option ``reactor``, imported at the pool's first
    handoff), or else for every pool that has no factory of its own."""
    if not callable(factory):
        raise TypeError(f"set_protocol_factory: factory must be callable, not {type(factory).__name__}")
    scope = pool if pool is not None else getattr(_scope, "pool", None)
    _factories[scope] = factory
    module = getattr(_scope, "module", None)
    if module is not None:
        _module_factory[module] = factory


def get_protocol(fd):
    """The protocol of connection ``fd``, or None."""
    return _conns.get(fd)


def _factory(scope, spec):
    if spec is None or spec is False:
        f = _factories.get(scope) or _factories.get(None)
        if f is None:
            raise ReactorError(f"no protocol factory for pool {scope!s}: call set_protocol_factory, "
                               "or start the pool with the option reactor => {Module, Factory}")
        return f
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        key = (str(spec[0]), str(spec[1]))
        f = _spec_cache.get(key)
        if f is None:
            f = getattr(importlib.import_module(key[0]), key[1])
            if not callable(f):
                raise ReactorError(f"{key[0]}.{key[1]} is not callable")
            _spec_cache[key] = f
        return f
    # A module whose import sets the factory (set_protocol_factory at its top level).
    name = str(spec)
    f = _module_factory.get(name)
    if f is None:
        old_pool, old_module = getattr(_scope, "pool", None), getattr(_scope, "module", None)
        _scope.pool, _scope.module = scope, name
        try:
            importlib.import_module(name)
        finally:
            _scope.pool, _scope.module = old_pool, old_module
        f = _module_factory.get(name)
        if f is None:
            raise ReactorError(f"module {name} set no protocol factory")
    _factories.setdefault(scope, f)
    return f


# -- the dispatcher: what erpy calls (embedded: from Erlang; port: the poll loop) ---------

def _open(fd, client_info, scope=None, spec=None):
    """A new connection: makes its protocol, calls connection_made. Returns the mode to
    wait in: "read", "write" or "close"."""
    stale = _conns.get(fd)
    if stale is not None:
        # erpy holds each fd it hands over open until its connection is forgotten, so an
        # fd number handed over again means the old connection's fd was closed without
        # Python being told (its embedded pool stopped, which forgets no protocol in the
        # interpreter all embedded pools share): it is lost now.
        _abort(fd)
    info = dict(client_info) if isinstance(client_info, dict) else {}
    proto = _factory(scope, spec)()
    proto.fd = fd
    proto.client_info = info
    if not isinstance(getattr(proto, "write_buffer", None), bytearray):
        proto.write_buffer = bytearray()
    proto.closed = False
    _conns[fd] = proto
    try:
        action = proto.connection_made(fd, info)
        return _apply(proto, "read_pending" if action is None else action, "read")
    except BaseException:
        _lose(proto)
        raise


def _ready(fd, event):
    """The fd is readable ("read") or writable ("write"). Returns the next mode."""
    proto = _conns.get(fd)
    if proto is None:
        raise ReactorError(f"no connection on fd {fd}")
    if event == "write":
        return _apply(proto, proto.write_ready(), "write")
    buf = _native.reactor_read(fd, proto.read_size)
    if buf is None:  # woken for nothing (a datagram taken by someone else, a spurious wakeup)
        return "read"
    if not len(buf):
        proto._reactor_eof = True
        return _apply(proto, proto.eof_received(), "read")
    try:
        action = proto.data_received(buf)
    finally:
        buf.release()
    return _apply(proto, action, "read")


def _apply(proto, action, mode):
    if action == "write_pending" and mode != "write":
        # Tried at once: a connected socket is nearly always writable, and this saves a
        # trip through the poller per answer.
        action, mode = proto.write_ready(), "write"
    if action == "continue":
        nxt = mode
    elif action == "read_pending":
        nxt = "read"
    elif action == "write_pending":
        nxt = "write"
    elif action == "close":
        _lose(proto)
        return "close"
    else:
        raise ReactorError(f"a protocol callback returned {action!r}: expected one of "
                           + ", ".join(repr(a) for a in ACTIONS))
    if nxt == "read" and getattr(proto, "_reactor_eof", False):
        # The peer sent its last byte and what it was owed is written.
        _lose(proto)
        return "close"
    return nxt


def _lose(proto):
    """Unregisters a connection and tells its protocol (once)."""
    fd = proto.fd
    if _conns.get(fd) is proto:
        del _conns[fd]
    if proto.closed:
        return
    proto.closed = True
    proto.connection_lost()


def _abort(fd, why=None):
    """Erlang closes the connection (a callback raised or ran past its time, the peer
    reset it, the pool stops): connection_lost runs, errors in it are only reported."""
    proto = _conns.get(fd)
    if proto is None:
        return False
    try:
        _lose(proto)
    except Exception:
        traceback.print_exc()
    return True


def _count():
    """Connections open in this interpreter (tests, pool_info)."""
    return len(_conns)


# -- port mode: the worker's own poll loop ------------------------------------------------
#
# Erlang asks a worker for its channel (_port_channel, an ordinary request), then sends
# each fd there with SCM_RIGHTS (erpy_nif:reactor_send_fd), with the connection's
# details as an external term. The channel is an abstract Unix socket; only processes of
# this user may connect, and Erlang checks the peer is this very process (SO_PEERCRED),
# so no other process can pose as the worker. A thread of the worker polls the channel
# and the connections (epoll) and runs the protocols; the worker owns the fds it gets and
# closes them. A protocol callback that runs past its time gets ReactorTimeout.
# The first fd Erlang sends is the callback channel (payload {erpy_callback_channel,
# Pool}): erlang.call/apply/send from the protocols go there, to an Erlang process that
# runs them under the pool's policy (erpy_reactor.erl).

_port = None


class _PortLoop:
    def __init__(self, timeout_ms):
        import select
        import socket
        self.select = select
        self.socket = socket
        self.timeout = timeout_ms / 1000.0 if timeout_ms else None
        self.name = "erpy-reactor-%d-%s" % (os.getpid(), os.urandom(8).hex())
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind("\0" + self.name)
        self.listener.listen(64)
        self.listener.setblocking(False)
        self.ep = select.epoll()
        self.ep.register(self.listener.fileno(), select.EPOLLIN)
        self.running_since = None
        self.running_fd = None
        self.thread = threading.Thread(target=self.run, name="erpy-reactor", daemon=True)
        self.thread.start()
        if self.timeout:
            threading.Thread(target=self.watch, name="erpy-reactor-watch", daemon=True).start()

    def run(self):
        lfd = self.listener.fileno()
        while True:
            try:
                for fd, ev in self.ep.poll():
                    if fd == lfd:
                        self.accept()
                    else:
                        self.event(fd, ev)
            except (InterruptedError, ReactorTimeout):
                # A timeout that landed just after its callback returned: nothing to stop.
                continue

    def accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except BlockingIOError:
                return
            with conn:
                self.adopt(conn)

    def adopt(self, conn):
        import struct
        conn.settimeout(5.0)
        try:
            creds = conn.getsockopt(self.socket.SOL_SOCKET, self.socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid != os.getuid():
                return
            msg, fds, _flags, _addr = self.socket.recv_fds(conn, 1 << 20, 1)
        except OSError:
            return
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return
        fd = fds[0]
        try:
            # recv_fds does not set close-on-exec: a child of the worker must not keep a
            # connection (or the callback channel) open.
            os.set_inheritable(fd, False)
            from . import decode
            payload = decode(msg)
            if isinstance(payload, tuple) and len(payload) == 2 and payload[0] == "erpy_callback_channel":
                # erlang.call/apply/send from this thread go there (port_worker.cpp),
                # each waiting for its answer at most a callback's time.
                taken = _native.reactor_callback_channel(fd, int((self.timeout or 0) * 1000))
                if not taken:
                    os.close(fd)
                try:
                    conn.sendall(b"K" if taken else b"Ehas a callback channel")
                except OSError:
                    pass
                return
            scope, info, spec = payload
            os.set_blocking(fd, False)
            mode = self.call(fd, _open, fd, info, scope, spec)
        except BaseException as e:  # noqa: B902 - a ReactorTimeout too
            os.close(fd)
            _report(e)
            try:
                conn.sendall(b"E" + ("%s: %s" % (type(e).__name__, e)).encode("utf-8", "replace")[:4000])
            except OSError:
                pass
            return
        try:
            conn.sendall(b"K")
        except OSError:
            pass
        self.rearm(fd, mode, new=True)

    def event(self, fd, ev):
        select = self.select
        proto = _conns.get(fd)
        if proto is None:
            self.forget(fd)
            return
        try:
            if ev & (select.EPOLLOUT) and not ev & select.EPOLLIN:
                mode = self.call(fd, _ready, fd, "write")
            else:
                mode = self.call(fd, _ready, fd, "read")
        except BaseException as e:  # noqa: B902
            _abort(fd)
            if not isinstance(e, ConnectionResetError):
                _report(e)
            mode = "close"
        self.rearm(fd, mode)

    def call(self, fd, f, *args):
        self.running_fd, self.running_since = fd, _monotonic()
        try:
            return f(*args)
        finally:
            self.running_since = None

    def rearm(self, fd, mode, new=False):
        select = self.select
        if mode == "close":
            self.forget(fd)
            return
        mask = select.EPOLLOUT if mode == "write" else select.EPOLLIN
        if new:
            self.ep.register(fd, mask)
        else:
            self.ep.modify(fd, mask)

    def forget(self, fd):
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass
        try:
            os.close(fd)
        except OSError:
            pass

    def watch(self):
        import ctypes
        import time
        tid = self.thread.ident
        while True:
            time.sleep(min(0.05, self.timeout / 4))
            since = self.running_since
            if since is not None and _monotonic() - since > self.timeout:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(ReactorTimeout))
                # Once per overrun: the next callback starts its own clock.
                while self.running_since == since:
                    time.sleep(0.01)


def _monotonic():
    import time
    return time.monotonic()


def _report(e):
    """A protocol error in port mode: to stderr, which the worker sends to Erlang's logger."""
    print("erpy.reactor: connection closed: " + "".join(traceback.format_exception(e)).rstrip(),
          file=sys.stderr, flush=True)


def _port_channel(timeout_ms=5000):
    """(Port mode.) Starts this worker's reactor loop if needed; returns (channel name,
    OS pid) for Erlang to send fds to."""
    global _port
    if _port is None:
        _port = _PortLoop(timeout_ms)
    return (_port.name, os.getpid())
