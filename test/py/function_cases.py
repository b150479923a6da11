"""Function definitions for test/erpy_function_SUITE.erl."""

import os
import time

from erpy import function as fn


class Kv:
    """State is a counter; messages drive the host API."""

    def handle_init(self, payload, serialized_state):
        self.payload = payload
        self.n = int(serialized_state or b"0")
        if payload == "fail-init":
            raise ValueError("init refused")

    def handle_cast(self, src, msg):
        if msg == b"boom":
            raise RuntimeError("cast exploded")
        if msg == b"die":
            os._exit(3)  # the worker dies with the instance in it
        if msg.startswith(b"delay "):
            # "delay 30,10,20": one delayed cast per number, to "out", in this order.
            for i, ms in enumerate(msg[6:].split(b",")):
                fn.delayed_cast(int(ms), "out", b"%d:%s" % (i, ms))
            return
        if msg.startswith(b"raw "):
            fn.cast_raw(fn.InstanceId(fn.slf().node_id, msg[4:].decode()), b"via-raw")
            return
        if msg.startswith(b"log "):
            fn.telemetry_log("warn", "kv", msg[4:].decode())
            return
        if msg == b"via-raw":
            fn.cast("out", b"got-raw")
            return
        if msg.startswith(b"to "):
            fn.cast("out", msg[3:])
            return
        self.n += int(msg)
        fn.sync(str(self.n))

    def handle_call(self, src, msg):
        if msg == b"get":
            return str(self.n)
        if msg == b"payload":
            return self.payload
        if msg == b"src":
            return "/".join(src)
        if msg == b"slf":
            return "/".join(fn.slf())
        if msg == b"noret":
            return fn.NoReply
        if msg == b"boom":
            raise KeyError("call exploded")
        if msg.startswith(b"ask "):
            alias, _, rest = msg[4:].partition(b" ")
            try:
                answer = fn.call(alias.decode(), rest)
            except fn.FunctionCallError as exc:
                return "error:%r" % (exc.args[0],)
            return b"noreply" if answer is fn.NoReply else answer
        if msg.startswith(b"excl "):
            # Spins like "spin"; answers b"overlap" if another handler of this instance ran
            # meanwhile (an instance runs one handler at a time).
            if getattr(self, "inside", False):
                return b"overlap"
            self.inside = True
            try:
                end = time.monotonic() + float(msg[5:])
                while time.monotonic() < end:
                    pass
            finally:
                self.inside = False
            return b"alone"
        if msg.startswith(b"spin "):
            # Busy, not time.sleep: every mode's interrupt stops bytecode at once.
            end = time.monotonic() + float(msg[5:])
            while time.monotonic() < end:
                pass
            return b"spun"
        return b"echo:" + msg

    def handle_stop(self):
        fn.cast("out", b"stopped")


class Hammer:
    """A counter that notices overlapping handlers (one_instance_hammered): "mark I K"
    (cast) counts and records K as sender I's last; "inc" (cast or call) counts; "delay"
    (cast) counts twice later, by delayed casts to "me"; calls "last I" and "get"."""

    def handle_init(self, payload, serialized_state):
        self.n = 0
        self.overlaps = 0
        self.inside = False
        self.last = {}

    def _enter(self):
        if self.inside:
            self.overlaps += 1
        self.inside = True
        # A moment inside without the GIL, where another thread's handler would show.
        time.sleep(0.0002)

    def handle_cast(self, src, msg):
        self._enter()
        try:
            if msg.startswith(b"mark "):
                _, i, k = msg.split(b" ")
                self.last[i] = k
                self.n += 1
            elif msg == b"inc":
                self.n += 1
            elif msg == b"delay":
                fn.delayed_cast(1, "me", b"inc")
                fn.delayed_cast(2, "me", b"inc")
        finally:
            self.inside = False

    def handle_call(self, src, msg):
        self._enter()
        try:
            if msg == b"inc":
                self.n += 1
                return str(self.n)
            if msg.startswith(b"last "):
                return self.last.get(msg[5:], b"none")
            return "%d %d" % (self.n, self.overlaps)
        finally:
            self.inside = False
