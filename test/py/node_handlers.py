"""Handlers for erpy_node_SUITE and bench: loaded into test Python nodes with
``python3 -m erpy.node --load node_handlers``."""

from __future__ import annotations

import os
import threading
import time

from erpy import Atom
from erpy.node import NOREPLY, GenServer

NODE = None


def echo(x):
    return x


def add(a, b):
    return a + b


def sleep(seconds):
    time.sleep(seconds)
    return Atom("slept")


def crash(message):
    raise ValueError(message)


def getpid():
    return os.getpid()


def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def notify(dest, msg):
    NODE.send(dest, msg)


def erlang_rpc(node, module, function, args):
    return NODE.rpc(str(node), str(module), str(function), args)


def erlang_call(name, node, request):
    return NODE.call((str(name), str(node)), request)


def erlang_send(dest, msg):
    NODE.send(dest, msg)
    return Atom("ok")


def stats():
    return {Atom(k): v for k, v in NODE.stats().items()}


def monitor_and_wait(pid, timeout):
    mb = NODE.mailbox()
    try:
        ref = mb.monitor(pid)
        while True:
            msg = mb.receive(timeout)
            if msg[0] == "DOWN" and msg[1] == ref:
                return msg[4]
    finally:
        mb.close()


class Counter(GenServer):
    """A gen_server with state: add/get, a deferred reply, crashes and stops on request."""

    def init(self):
        self.count = 0
        self.info = []

    def handle_call(self, request, from_):
        if request == "get":
            return self.count
        if request == "pid":
            return self.pid
        if request == "info":
            return self.info
        if request == "crash":
            raise RuntimeError("boom")
        if type(request) is tuple and request[0] == "add":
            self.count += request[1]
            return self.count
        if type(request) is tuple and request[0] == "defer":
            threading.Timer(0.05, self.node.reply, (from_, request[1])).start()
            return NOREPLY
        if type(request) is tuple and request[0] == "stop":
            self.stop(request[1])
        return (Atom("unknown"), request)

    def handle_cast(self, request):
        if type(request) is tuple and request[0] == "add":
            self.count += request[1]
        elif type(request) is tuple and request[0] == "stop":
            self.stop(request[1])

    def handle_info(self, msg):
        self.info.append(msg)
        if type(msg) is tuple and len(msg) == 2 and msg[0] == "ping":
            self.node.send(msg[1], (Atom("pong"), self.pid))


class Collector(GenServer):
    """Keeps every message it gets, in order; `get` returns and clears them."""

    def init(self):
        self.seen = []

    def handle_info(self, msg):
        self.seen.append(msg)

    def handle_call(self, request, from_):
        out, self.seen = self.seen, []
        return out


class Sink(GenServer):
    """Counts messages (for throughput): {count, Pid} is answered with the count so far."""

    def init(self):
        self.n = 0

    def handle_info(self, msg):
        if type(msg) is tuple and msg[0] == "count":
            self.node.send(msg[1], (Atom("count"), self.n))
        else:
            self.n += 1


def respawn_counter():
    """Starts a new `counter` once the old one is gone (tests that stop it)."""
    deadline = time.monotonic() + 5
    while NODE._native.whereis("counter") is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    if NODE._native.whereis("counter") is None:
        NODE.spawn(Counter(), "counter")
    return Atom("ok")


def erpy_setup(node):
    global NODE
    NODE = node
    node.spawn(Counter(), "counter")
    node.spawn(Collector(), "collector")
    node.spawn(Sink(), "sink")
