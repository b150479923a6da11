"""The guest's default function: it acts out the node emulator's demo commands.

- cast ``recast ALIAS MSG``: casts MSG to ALIAS;
- cast ``sync STATE``: syncs STATE;
- cast ``delay MS ALIAS MSG``: a delayed cast of MSG to ALIAS after MS milliseconds;
- cast ``log MSG``: an info telemetry event;
- call ``noret``: no reply; call ``slf``: this instance's id; call ``state``: the state;
  any other call: the message echoed back;
- stop: logs that it stops.
"""

from __future__ import annotations

from erpy import function as fn

state = b""


def handle_init(payload, serialized_state):
    global state
    state = serialized_state
    fn.telemetry_log(fn.LOG_INFO, "example", f"init payload={payload!r} state={serialized_state!r}")


def handle_cast(src, msg):
    global state
    cmd, _, rest = msg.partition(b" ")
    if cmd == b"recast":
        alias, _, payload = rest.partition(b" ")
        fn.cast(alias.decode(), payload)
    elif cmd == b"sync":
        state = rest
        fn.sync(rest)
    elif cmd == b"delay":
        ms, _, tail = rest.partition(b" ")
        alias, _, payload = tail.partition(b" ")
        fn.delayed_cast(int(ms), alias.decode(), payload)
    elif cmd == b"log":
        fn.telemetry_log(fn.LOG_INFO, "example", rest.decode("utf-8", "replace"))
    else:
        fn.telemetry_log(fn.LOG_WARN, "example", f"unknown cast {msg!r}")


def handle_call(src, msg):
    if msg == b"noret":
        return fn.NoReply
    if msg == b"slf":
        return "/".join(fn.slf())
    if msg == b"state":
        return state
    return msg


def handle_stop():
    fn.telemetry_log(fn.LOG_INFO, "example", "stopping")
