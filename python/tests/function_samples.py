"""Function definitions the erpy.function tests load (module style and class style)."""

from erpy import function as fn

# Module style: these globals are one instance's state (each instance has its own copy).
events = []
state = b""


def handle_init(payload, serialized_state):
    global state
    state = serialized_state
    events.append(("init", payload, serialized_state))


def handle_cast(src, msg):
    global state
    events.append(("cast", src, msg))
    if msg.startswith(b"fwd "):
        fn.cast("next", msg[4:])
    elif msg == b"boom":
        raise RuntimeError("cast exploded")
    elif msg.startswith(b"sync "):
        state = msg[5:]
        fn.sync(state)
    elif msg.startswith(b"later "):
        fn.delayed_cast(5, "next", msg[6:])
    elif msg == b"log":
        fn.telemetry_log("warn", "samples", "hello")


def handle_call(src, msg):
    if msg == b"noret":
        return fn.NoReply
    if msg == b"none":
        return None
    if msg == b"state":
        return state
    if msg == b"whoami":
        return "/".join(fn.slf())
    if msg == b"src":
        return "/".join(src)
    if msg == b"bad":
        return 42
    if msg.startswith(b"ask "):
        return fn.call("next", msg[4:])
    if msg.startswith(b"running "):
        # How many calls of instance <key> run now, seen from inside one of them.
        return str(fn.erlang_running(msg[8:].decode()))
    if msg == b"raise":
        raise ValueError("handler failed")
    return b"echo:" + msg


def handle_stop():
    events.append(("stop",))


class Counter:
    """Class style: one object per instance."""

    def __init__(self):
        self.n = 0

    def handle_init(self, payload, serialized_state):
        self.n = int(serialized_state or b"0")

    def handle_cast(self, src, msg):
        self.n += int(msg)
        fn.sync(str(self.n))

    def handle_call(self, src, msg):
        return str(self.n)
