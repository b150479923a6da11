"""python3 -m erpy.edgeless.node_cli: an EDGELESS node emulator that drives one guest.

It serves GuestAPIHost on ``--host-endpoint`` (printing what the function asks of it:
casts, calls, delayed casts, syncs, telemetry), boots and inits the guest at
``--function-endpoint``, then reads commands, one a line, from stdin:

- ``cast MSG``: Cast MSG to the function (e.g. ``cast recast another-alias new-message``,
  ``cast sync inner-function-state``);
- ``call MSG``: Call it and print the answer (``call noret``: no reply);
- ``init [PAYLOAD]``: Init again, with the state last synced;
- ``stop``: Stop it;
- ``help``; ``quit`` (or end of input).

The host answers the function's calls with ``--call-reply`` (default: the message back)
and delivers delayed casts at their time, in order, as printed casts.
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import sys
import threading
import time
import uuid
from concurrent import futures

import grpc

from ._proto import EMPTY, pb, rpc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

__all__ = ["HostServicer", "NodeEmulator", "main"]

_LEVELS = {0: "ERROR", 1: "WARN", 2: "INFO", 3: "DEBUG", 4: "TRACE"}


def _id(iid: Any) -> str:
    return f"{iid.node_id}/{iid.function_id}"


class HostServicer(rpc.GuestAPIHostServicer):
    """GuestAPIHost: records every event (``events``, with its monotonic time) and
    reports it to ``out``. Delayed casts are kept in a heap by (due, arrival) and
    delivered by one thread, so they come in order and never before their time."""

    def __init__(self, instance_id: Any, out: Callable[[str], None],
                 call_reply: Callable[[str, bytes], Any] | None = None) -> None:
        self.instance_id = instance_id
        self.out = out
        self.call_reply = call_reply
        self.events: list[tuple] = []
        self.state = b""
        self._cond = threading.Condition()
        self._delayed: list[tuple] = []
        self._seq = itertools.count()
        self._closed = False
        self._timer = threading.Thread(target=self._deliver, name="node-delayed", daemon=True)
        self._timer.start()

    def _record(self, *event: Any) -> None:
        with self._cond:
            self.events.append((time.monotonic(), *event))
            self._cond.notify_all()

    def wait_events(self, n: int, timeout: float = 10.0) -> list[tuple]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self.events) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return list(self.events)

    def _reply(self, target: str, msg: bytes) -> Any:
        if self.call_reply is not None:
            return self.call_reply(target, msg)
        return pb.CallReturn(type=pb.CALL_RET_REPLY, msg=msg)

    def Cast(self, request: Any, context: Any) -> Any:
        self._record("cast", request.alias, request.msg)
        self.out(f"cast {request.alias} {request.msg!r}")
        return EMPTY

    def CastRaw(self, request: Any, context: Any) -> Any:
        self._record("cast_raw", _id(request.dst), request.msg)
        self.out(f"cast_raw {_id(request.dst)} {request.msg!r}")
        return EMPTY

    def Call(self, request: Any, context: Any) -> Any:
        self._record("call", request.alias, request.msg)
        self.out(f"call {request.alias} {request.msg!r}")
        return self._reply(request.alias, request.msg)

    def CallRaw(self, request: Any, context: Any) -> Any:
        self._record("call_raw", _id(request.dst), request.msg)
        self.out(f"call_raw {_id(request.dst)} {request.msg!r}")
        return self._reply(_id(request.dst), request.msg)

    def TelemetryLog(self, request: Any, context: Any) -> Any:
        level = _LEVELS.get(request.log_level, str(request.log_level))
        self._record("telemetry_log", request.log_level, request.target, request.msg)
        self.out(f"telemetry {level} {request.target}: {request.msg}")
        return EMPTY

    def Slf(self, request: Any, context: Any) -> Any:
        return self.instance_id

    def DelayedCast(self, request: Any, context: Any) -> Any:
        due = time.monotonic() + request.delay / 1000.0
        self._record("delayed_cast", request.delay, request.alias, request.msg)
        with self._cond:
            heapq.heappush(self._delayed, (due, next(self._seq), request.alias, request.msg))
            self._cond.notify_all()
        return EMPTY

    def Sync(self, request: Any, context: Any) -> Any:
        self.state = request.serialized_state
        self._record("sync", request.serialized_state)
        self.out(f"sync {request.serialized_state!r}")
        return EMPTY

    def _deliver(self) -> None:
        with self._cond:
            while not self._closed:
                if not self._delayed:
                    self._cond.wait()
                    continue
                due, _, alias, msg = self._delayed[0]
                now = time.monotonic()
                if now < due:
                    self._cond.wait(due - now)
                    continue
                heapq.heappop(self._delayed)
                self.events.append((now, "delayed", alias, msg))
                self._cond.notify_all()
                self.out(f"cast (delayed) {alias} {msg!r}")

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class NodeEmulator:
    """The node side for one guest: its GuestAPIHost server and a GuestAPIFunction stub."""

    def __init__(self, function_endpoint: str, host_endpoint: str,
                 node_id: str | None = None, function_id: str | None = None,
                 out: Callable[[str], None] = print,
                 call_reply: Callable[[str, bytes], Any] | None = None,
                 timeout: float = 30.0) -> None:
        self.instance_id = pb.InstanceId(node_id=node_id or str(uuid.uuid4()),
                                         function_id=function_id or str(uuid.uuid4()))
        self.out = out
        self.timeout = timeout
        self.host = HostServicer(self.instance_id, out, call_reply)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4,
                                                             thread_name_prefix="node-host"))
        rpc.add_GuestAPIHostServicer_to_server(self.host, self.server)
        port = self.server.add_insecure_port(host_endpoint)
        if not port:
            raise OSError(f"cannot listen on {host_endpoint}")
        # What the guest is told: the port the server really got (an endpoint may say 0).
        hostname = host_endpoint.rsplit(":", 1)[0]
        self.host_endpoint = f"{hostname}:{port}"
        self.server.start()
        self.channel = grpc.insecure_channel(function_endpoint)
        self.function = rpc.GuestAPIFunctionStub(self.channel)

    def boot(self) -> None:
        self.function.Boot(pb.BootData(guest_api_host_endpoint=self.host_endpoint,
                                       instance_id=self.instance_id),
                           timeout=self.timeout, wait_for_ready=True)

    def init(self, payload: str = "", state: bytes | None = None) -> None:
        self.function.Init(pb.FunctionInstanceInit(
            init_payload=payload, serialized_state=self.host.state if state is None else state),
            timeout=self.timeout)

    def cast(self, msg: bytes, src: Any = None) -> None:
        self.function.Cast(pb.InputEventData(src=src or self.instance_id, msg=msg),
                           timeout=self.timeout)

    def call(self, msg: bytes, src: Any = None) -> Any:
        return self.function.Call(pb.InputEventData(src=src or self.instance_id, msg=msg),
                                  timeout=self.timeout)

    def stop(self) -> None:
        self.function.Stop(EMPTY, timeout=self.timeout)

    def command(self, line: str) -> bool:
        """Runs one command line; False for quit."""
        cmd, _, rest = line.strip().partition(" ")
        try:
            if cmd in ("quit", "exit"):
                return False
            if cmd == "":
                pass
            elif cmd == "cast":
                self.cast(rest.encode())
                self.out("ok")
            elif cmd == "call":
                ret = self.call(rest.encode())
                self.out(_describe_return(ret))
            elif cmd == "init":
                self.init(rest)
                self.out("ok")
            elif cmd == "stop":
                self.stop()
                self.out("ok")
            elif cmd == "help":
                self.out(__doc__.split("\n\n", 2)[1])
            else:
                self.out(f"unknown command {cmd!r} (try help)")
        except grpc.RpcError as exc:
            self.out(f"error {exc.code().name}: {exc.details()}")
        return True

    def close(self) -> None:
        self.host.close()
        self.channel.close()
        self.server.stop(grace=0.5).wait()


def _describe_return(ret: Any) -> str:
    if ret.type == pb.CALL_RET_REPLY:
        return f"reply {ret.msg!r}"
    if ret.type == pb.CALL_RET_NO_REPLY:
        return "noreply"
    return "error"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m erpy.edgeless.node_cli",
                                description="EDGELESS node emulator for one function guest.",
                                epilog="Commands on stdin: cast MSG | call MSG | init [PAYLOAD] "
                                       "| stop | help | quit")
    p.add_argument("--function-endpoint", default="127.0.0.1:7101",
                   help="where the guest's GuestAPIFunction listens (default 127.0.0.1:7101)")
    p.add_argument("--host-endpoint", default="127.0.0.1:7100",
                   help="address:port to serve GuestAPIHost on, reachable from the guest "
                        "(default 127.0.0.1:7100)")
    p.add_argument("--node-id", default=None, help="the instance's node id (default: a UUID)")
    p.add_argument("--function-id", default=None, help="the instance's id (default: a UUID)")
    p.add_argument("--init-payload", default="", help="handle_init's payload")
    p.add_argument("--state", default="", help="handle_init's serialized state")
    p.add_argument("--timeout", type=float, default=30.0, help="RPC timeout in seconds")
    args = p.parse_args(argv)

    def out(text: str) -> None:
        print(text, flush=True)

    try:
        node = NodeEmulator(args.function_endpoint, args.host_endpoint, args.node_id,
                            args.function_id, out, timeout=args.timeout)
    except OSError as exc:
        print(f"node_cli: {exc}", file=sys.stderr)
        return 1
    try:
        try:
            node.boot()
            node.init(args.init_payload, args.state.encode())
        except grpc.RpcError as exc:
            print(f"node_cli: cannot boot the function at {args.function_endpoint}: "
                  f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        out(f"booted {_id(node.instance_id)}; commands: cast MSG | call MSG | stop | quit")
        for line in sys.stdin:
            if not node.command(line):
                break
        return 0
    finally:
        node.close()


if __name__ == "__main__":
    sys.exit(main())
