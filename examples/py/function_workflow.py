"""A workflow of three stateful functions (examples/function_demo.escript, doc/function.md).

    stage_a --cast--> stage_b --call--> stage_c
                        \\--cast--> "out" (whatever the host wires it to)

The same code runs hosted by Erlang (erpy_function, any pool mode) and as an EDGELESS
guest over gRPC (python3 -m erpy.edgeless --module function_workflow:StageB).
"""

from erpy import function as fn


class StageA:
    """Normalises each message and passes it on to its alias "next"."""

    def handle_cast(self, src, msg):
        fn.cast("next", msg.strip().lower())


class StageB:
    """Asks "lookup" about each message, counts them, and casts the answer to "out".
    Its count is its state: synced after each message, back after a restart."""

    def handle_init(self, payload, serialized_state):
        self.count = int(serialized_state or b"0")
        fn.telemetry_log(fn.LOG_INFO, "stage_b", f"started at {self.count} ({payload})")

    def handle_cast(self, src, msg):
        answer = fn.call("lookup", msg)
        self.count += 1
        fn.sync(str(self.count))
        fn.cast("out", b"%d:%s" % (self.count, answer if answer is not fn.NoReply else b"-"))

    def handle_call(self, src, msg):
        if msg == b"count":
            return str(self.count)
        return fn.NoReply


class StageC:
    """A lookup table: answers a call with the message's length and reversal."""

    def handle_call(self, src, msg):
        return b"%d/%s" % (len(msg), msg[::-1])
