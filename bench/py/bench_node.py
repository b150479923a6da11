"""Loaded into the Python node of bench/erpy_bench_node.erl (``--load bench_node``)."""

from __future__ import annotations

import os
import threading

from erpy import Atom

NODE = None


def echo(x):
    return x


def getpid():
    return os.getpid()


def rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _sink(mb):
    # A plain mailbox loop: messages come in batches; {count, Pid} asks for the total.
    n = 0
    count = Atom("count")
    while True:
        try:
            batch = mb.receive_many(4096)
        except EOFError:  # the node stopped
            return
        for m in batch:
            if type(m) is tuple and m[0] == count:
                mb.send(m[1], (count, n))
            else:
                n += 1


def erpy_setup(node):
    global NODE
    NODE = node
    mb = node.mailbox()
    mb.register("bench_sink")
    threading.Thread(target=_sink, args=(mb,)).start()
