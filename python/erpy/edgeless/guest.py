"""The EDGELESS guest: serves GuestAPIFunction for one function instance.

The node boots the guest (where its GuestAPIHost is, and the instance's id), inits it
(payload and last synced state), then casts and calls it, and finally stops it. Handlers
run one at a time (an instance is sequential, as under erpy_function), each on a gRPC
thread with its host API bound to the node (:class:`GrpcHost`).

Errors: an RPC before Boot/Init is FAILED_PRECONDITION; a request the guest cannot parse
is gRPC's own error status; an exception in handle_init, handle_cast or handle_stop is
INTERNAL with the exception in the details; in handle_call it is ``CALL_RET_ERR``. Each
handler exception is also sent to the node as a LOG_ERROR telemetry event. The guest
keeps serving after every one of them.
"""

from __future__ import annotations

import logging
import threading
import traceback
from concurrent import futures

import grpc

from .. import function as fn
from . import DEFAULT_PORT
from ._proto import EMPTY, pb, rpc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

__all__ = ["GrpcHost", "FunctionServicer", "serve"]

log = logging.getLogger("erpy.edgeless")

# Host calls that wait for the node: bounded, so a node that is gone fails the handler
# rather than hanging it.
HOST_TIMEOUT_S = 30.0


def _pb_id(iid: fn.InstanceId) -> Any:
    return pb.InstanceId(node_id=iid.node_id, function_id=iid.function_id)


def _fn_id(msg: Any) -> fn.InstanceId:
    return fn.InstanceId(msg.node_id, msg.function_id)


class GrpcHost(fn.Host):
    """The host API of one instance, served by the node's GuestAPIHost."""

    def __init__(self, channel: grpc.Channel, instance_id: fn.InstanceId) -> None:
        self._stub = rpc.GuestAPIHostStub(channel)
        self._id = instance_id
        self._origin = _pb_id(instance_id)

    def _rpc(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=HOST_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise fn.FunctionCallError(("grpc", exc.code().name, exc.details())) from None

    @staticmethod
    def _answer(ret: Any) -> bytes | Any:
        if ret.type == pb.CALL_RET_REPLY:
            return ret.msg
        if ret.type == pb.CALL_RET_NO_REPLY:
            return fn.NoReply
        raise fn.FunctionCallError("call_error")

    def cast(self, alias: str, msg: bytes) -> None:
        self._rpc(self._stub.Cast, pb.OutputEventData(originator=self._origin, alias=alias, msg=msg))

    def cast_raw(self, dst: fn.InstanceId, msg: bytes) -> None:
        self._rpc(self._stub.CastRaw,
                  pb.OutputEventDataRaw(originator=self._origin, dst=_pb_id(dst), msg=msg))

    def call(self, alias: str, msg: bytes) -> bytes | Any:
        return self._answer(self._rpc(
            self._stub.Call, pb.OutputEventData(originator=self._origin, alias=alias, msg=msg)))

    def call_raw(self, dst: fn.InstanceId, msg: bytes) -> bytes | Any:
        return self._answer(self._rpc(
            self._stub.CallRaw,
            pb.OutputEventDataRaw(originator=self._origin, dst=_pb_id(dst), msg=msg)))

    def delayed_cast(self, delay_ms: int, alias: str, msg: bytes) -> None:
        self._rpc(self._stub.DelayedCast,
                  pb.DelayedEventData(originator=self._origin, alias=alias, msg=msg, delay=delay_ms))

    def sync(self, state: bytes) -> None:
        self._rpc(self._stub.Sync, pb.SyncData(originator=self._origin, serialized_state=state))

    def telemetry_log(self, level: int, target: str, msg: str) -> None:
        self._rpc(self._stub.TelemetryLog,
                  pb.TelemetryLogEvent(originator=self._origin, log_level=level, target=target,
                                       msg=msg))

    def slf(self) -> fn.InstanceId:
        return self._id

    def handler_error(self, handler: str, exc: BaseException) -> None:
        text = f"{handler}: {type(exc).__name__}: {exc}"
        log.error("%s\n%s", text, "".join(traceback.format_exception(exc)).rstrip())
        try:
            self.telemetry_log(fn.LOG_ERROR, "erpy.function", text)
        except fn.FunctionCallError as why:  # the node is gone: the log above has it
            log.warning("could not report to the node: %s", why.args[0])


class FunctionServicer(rpc.GuestAPIFunctionServicer):
    """GuestAPIFunction for the function ``factory`` makes (see erpy.function.load)."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        # One handler at a time; also guards the fields below.
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._host: GrpcHost | None = None
        self._instance: fn.Instance | None = None

    # Boot and Init

    def Boot(self, request: Any, context: grpc.ServicerContext) -> Any:
        endpoint = request.guest_api_host_endpoint
        if not endpoint:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Boot: guest_api_host_endpoint is empty")
        channel = grpc.insecure_channel(endpoint)
        with self._lock:
            old, self._channel = self._channel, channel
            self._host = GrpcHost(channel, _fn_id(request.instance_id))
            self._instance = None
        if old is not None:
            old.close()
        log.info("booted as %s/%s, host %s", request.instance_id.node_id,
                 request.instance_id.function_id, endpoint)
        return EMPTY

    def Init(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            if self._host is None:
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Init before Boot")
            try:
                instance = fn.Instance(self._factory, self._host)
                instance.init(request.init_payload, request.serialized_state)
            except Exception as exc:
                context.abort(grpc.StatusCode.INTERNAL, _describe("handle_init", exc))
            self._instance = instance
        return EMPTY

    # Events

    def Cast(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            instance = self._ready(context)
            try:
                instance.cast(_fn_id(request.src), request.msg)
            except Exception as exc:
                context.abort(grpc.StatusCode.INTERNAL, _describe("handle_cast", exc))
        return EMPTY

    def Call(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            instance = self._ready(context)
            try:
                reply = instance.call(_fn_id(request.src), request.msg)
            except Exception:
                # Reported to the node by handler_error; the caller gets EDGELESS's error.
                return pb.CallReturn(type=pb.CALL_RET_ERR)
        if reply is fn.NoReply:
            return pb.CallReturn(type=pb.CALL_RET_NO_REPLY)
        return pb.CallReturn(type=pb.CALL_RET_REPLY, msg=reply)

    def Stop(self, request: Any, context: grpc.ServicerContext) -> Any:
        with self._lock:
            instance, self._instance = self._instance, None
            if instance is not None:
                try:
                    instance.stop()
                except Exception as exc:
                    context.abort(grpc.StatusCode.INTERNAL, _describe("handle_stop", exc))
        return EMPTY

    def _ready(self, context: grpc.ServicerContext) -> fn.Instance:
        if self._instance is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "the function is not initialised (Boot and Init first)")
        return self._instance  # type: ignore[return-value]

    def close(self) -> None:
        with self._lock:
            channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()


def _describe(handler: str, exc: BaseException) -> str:
    return f"{handler}: {type(exc).__name__}: {exc}"


def serve(spec: Any, port: int = DEFAULT_PORT, address: str = "[::]",
          max_workers: int = 10) -> tuple[grpc.Server, int, FunctionServicer]:
    """Starts a guest for the function ``spec`` (see erpy.function.load): the server,
    the port it listens on (``port=0``: any free one) and its servicer."""
    servicer = FunctionServicer(fn.load(spec))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers,
                                                    thread_name_prefix="erpy-guest"))
    rpc.add_GuestAPIFunctionServicer_to_server(servicer, server)
    bound = _bind(server, address, port)
    server.start()
    return server, bound, servicer


def _bind(server: grpc.Server, address: str, port: int) -> int:
    # "[::]" is every IPv6 and (dual stack) IPv4 address; a host without IPv6 gets IPv4.
    candidates = [address] + (["0.0.0.0"] if address == "[::]" else [])
    for addr in candidates:
        try:
            bound = server.add_insecure_port(f"{addr}:{port}")
        except RuntimeError:
            bound = 0
        if bound:
            return bound
    raise OSError(f"cannot listen on {address}:{port}")
