"""Protocols for test/erpy_reactor_SUITE.erl (and erpy_reactor_SUITE's port pools)."""

import os
import time

from erpy import erlang, reactor


class Echo(reactor.Protocol):
    def data_received(self, data):
        if data.startswith(b"raise"):
            raise ValueError("asked to raise")
        if data.startswith(b"bogus"):
            return "bogus_action"
        if data.startswith(b"hang"):
            while True:
                pass
        if data.startswith(b"crash"):
            os._exit(3)  # the whole worker goes (port mode)
        if data.startswith(b"slow"):
            time.sleep(0.3)
        if data.startswith(b"quitcall"):
            # A callback, then an answer that is not "wait again": both reach Erlang.
            erlang.call("lists", "reverse", [[1]])
            return "close"
        if data.startswith(b"call"):
            # Under the pool's policy: lists is allowed in the suite, os is not.
            try:
                r = erlang.call("lists", "reverse", [[1, 2, 3]])
                self.write_buffer.extend(b"ok:" + repr(r).encode())
            except Exception as e:  # noqa: BLE001
                self.write_buffer.extend(b"refused:" + type(e).__name__.encode())
            try:
                erlang.call("os", "cmd", ["true"])
                self.write_buffer.extend(b";os:ran")
            except Exception as e:  # noqa: BLE001
                self.write_buffer.extend(b";os:" + type(e).__name__.encode())
            return "write_pending"
        if data.startswith(b"send:"):
            # erlang.send to a registered name: the pool's send_allowed decides.
            try:
                erlang.send(bytes(data[5:]).decode(), b"from the reactor")
                self.write_buffer.extend(b"sent")
            except Exception as e:  # noqa: BLE001
                self.write_buffer.extend(b"refused:" + type(e).__name__.encode())
            return "write_pending"
        if data.startswith(b"limits"):
            # A callback over max_message_size, and one naming an atom that does not exist.
            import erpy
            for args in ([b"x" * 200000], [erpy.Atom("erpy_reactor_suite_no_such_atom_zq")]):
                try:
                    erlang.call("lists", "reverse", args)
                    self.write_buffer.extend(b"ran;")
                except Exception as e:  # noqa: BLE001
                    self.write_buffer.extend(type(e).__name__.encode() + b";")
            return "write_pending"
        if data.startswith(b"sleepcall"):
            # Waits in Erlang (timer:sleep) until the test ends the channel or the worker.
            try:
                erlang.call("timer", "sleep", 3000)
                self.write_buffer.extend(b"slept")
            except Exception as e:  # noqa: BLE001
                self.write_buffer.extend(type(e).__name__.encode())
            return "write_pending"
        if data.startswith(b"info"):
            i = self.client_info
            self.write_buffer.extend(repr((str(i.get("type")), str(i.get("addr")), i.get("port"))).encode())
            return "write_pending"
        self.write_buffer.extend(data)
        return "write_pending"


class Greeter(reactor.Protocol):
    """Speaks first (connection_made returns write_pending)."""

    def connection_made(self, fd, info):
        super().connection_made(fd, info)
        self.write_buffer.extend(b"hello\n")
        return "write_pending"

    def data_received(self, data):
        return "close" if data.startswith(b"bye") else "continue"


class Sink(reactor.Protocol):
    """Keeps what it reads (pipes, datagrams); get_protocol(fd).got from Erlang."""

    def connection_made(self, fd, info):
        super().connection_made(fd, info)
        self.got = []

    def data_received(self, data):
        self.got.append(bytes(data))
        if data.startswith(b"reply") and self.client_info.get("type") == "udp":
            self.write(b"pong")
        return "continue"


def got(fd):
    p = reactor.get_protocol(fd)
    return None if p is None else b"".join(p.got)


def count():
    return reactor._count()
