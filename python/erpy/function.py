"""erpy.function: stateful functions, the same code hosted by Erlang or by an EDGELESS node.

A function is a module (or a class) with four handlers::

    def handle_init(payload: str, serialized_state: bytes) -> None
    def handle_cast(src: InstanceId, msg: bytes) -> None
    def handle_call(src: InstanceId, msg: bytes) -> bytes | NoReply
    def handle_stop() -> None

Inside a handler it uses the host API of this module: :func:`cast`, :func:`cast_raw`,
:func:`call`, :func:`call_raw`, :func:`delayed_cast`, :func:`sync`, :func:`telemetry_log`,
:func:`slf`. Who serves that API is a :class:`Host`: ``erpy_function`` in Erlang
(:class:`ErlangHost`, through the pool's ``erlang.call`` path and its policy) or an
EDGELESS node over gRPC (``erpy.edgeless``). The function's code does not know which.

Messages are bytes (a ``str`` is sent as UTF-8). An exception in a handler is reported to
the host (:meth:`Host.handler_error`) and then raised to whoever drove the handler: the
Erlang caller gets ``{error, PythonError}``, a gRPC node an error status.

Each instance of a module function runs on its own copy of the module (its globals are the
instance's state); a class function is instantiated once per instance.

See doc/function.md.
"""

from __future__ import annotations

import contextvars
import importlib
import importlib.util
import types
import weakref

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

from typing import NamedTuple

from ._errors import ErpyError
from ._types import Atom

__all__ = [
    "NoReply", "InstanceId", "Host", "Instance", "FunctionCallError", "NoInstanceError",
    "LOG_ERROR", "LOG_WARN", "LOG_INFO", "LOG_DEBUG", "LOG_TRACE",
    "cast", "cast_raw", "call", "call_raw", "delayed_cast", "sync", "telemetry_log", "slf",
    "load", "as_bytes", "log_level",
]


class _NoReplyType:
    """The answer of a call that has no reply (EDGELESS CALL_RET_NO_REPLY)."""

    _instance: _NoReplyType | None = None

    def __new__(cls) -> _NoReplyType:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NoReply"

    def __bool__(self) -> bool:
        return False

    def __reduce__(self) -> str:
        return "NoReply"


NoReply = _NoReplyType()


class InstanceId(NamedTuple):
    """A function instance: the node hosting it and its id there."""

    node_id: str
    function_id: str


class FunctionCallError(ErpyError):
    """A call (:func:`call`, :func:`call_raw`) the host could not complete: the callee
    raised, is unknown, or timed out. ``args[0]`` is the host's reason."""


class NoInstanceError(ErpyError, RuntimeError):
    """The host API was used outside a handler of a function instance."""


# Telemetry levels, numbered as EDGELESS TelemetryLogLevel.
LOG_ERROR, LOG_WARN, LOG_INFO, LOG_DEBUG, LOG_TRACE = range(5)
_LEVEL_NAMES = {"error": LOG_ERROR, "warn": LOG_WARN, "warning": LOG_WARN, "info": LOG_INFO,
                "debug": LOG_DEBUG, "trace": LOG_TRACE}


def log_level(level: int | str) -> int:
    """A telemetry level as its number: 0-4, or a name (``"error"`` ... ``"trace"``)."""
    if isinstance(level, bool):
        raise ValueError(f"telemetry level: expected 0-4 or a name, got {level!r}")
    if isinstance(level, int):
        if LOG_ERROR <= level <= LOG_TRACE:
            return level
    elif isinstance(level, str) and level.lower() in _LEVEL_NAMES:
        return _LEVEL_NAMES[level.lower()]
    raise ValueError(f"telemetry level: expected 0-4 or a name, got {level!r}")


def as_bytes(msg: Any) -> bytes:
    """A message as bytes: bytes-like objects as they are, ``str`` as UTF-8."""
    if isinstance(msg, bytes):
        return msg
    if isinstance(msg, str):
        return msg.encode("utf-8")
    if isinstance(msg, (bytearray, memoryview)):
        return bytes(msg)
    raise TypeError(f"a message is bytes or str, got {type(msg).__name__}")


def _as_instance_id(value: Any) -> InstanceId:
    if isinstance(value, InstanceId):
        return value
    if isinstance(value, (tuple, list)) and len(value) == 2:
        node, fn = value
        return InstanceId(_as_str(node), _as_str(fn))
    raise TypeError(f"an instance id is (node_id, function_id), got {value!r}")


def _as_str(value: Any) -> str:
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    raise TypeError(f"expected str, got {type(value).__name__}")


class Host:
    """What serves the host API for one instance. Both hosts implement every method;
    this base raises NotImplementedError so a missing one is loud."""

    def cast(self, alias: str, msg: bytes) -> None:
        raise NotImplementedError

    def cast_raw(self, dst: InstanceId, msg: bytes) -> None:
        raise NotImplementedError

    def call(self, alias: str, msg: bytes) -> bytes | _NoReplyType:
        raise NotImplementedError

    def call_raw(self, dst: InstanceId, msg: bytes) -> bytes | _NoReplyType:
        raise NotImplementedError

    def delayed_cast(self, delay_ms: int, alias: str, msg: bytes) -> None:
        raise NotImplementedError

    def sync(self, state: bytes) -> None:
        raise NotImplementedError

    def telemetry_log(self, level: int, target: str, msg: str) -> None:
        raise NotImplementedError

    def slf(self) -> InstanceId:
        raise NotImplementedError

    def handler_error(self, handler: str, exc: BaseException) -> None:
        """Told of an exception in a handler before it is raised to the driver."""


# The host of the handler running in this thread (or task): set for the handler's duration.
_current: contextvars.ContextVar[Host] = contextvars.ContextVar("erpy_function_host")


def _host() -> Host:
    host = _current.get(None)
    if host is None:
        raise NoInstanceError("the function host API is only available inside a handler")
    return host


def cast(alias: str, msg: bytes | str) -> None:
    """Sends ``msg`` to the instance the host knows as ``alias`` (no answer)."""
    _host().cast(_as_str(alias), as_bytes(msg))


def cast_raw(dst: InstanceId | tuple, msg: bytes | str) -> None:
    """Sends ``msg`` to the instance ``dst`` (an :class:`InstanceId`)."""
    _host().cast_raw(_as_instance_id(dst), as_bytes(msg))


def call(alias: str, msg: bytes | str) -> bytes | _NoReplyType:
    """Calls the instance ``alias``: its reply (bytes) or ``NoReply``; raises
    :class:`FunctionCallError` when the call failed."""
    return _host().call(_as_str(alias), as_bytes(msg))


def call_raw(dst: InstanceId | tuple, msg: bytes | str) -> bytes | _NoReplyType:
    """:func:`call` to the instance ``dst`` (an :class:`InstanceId`)."""
    return _host().call_raw(_as_instance_id(dst), as_bytes(msg))


def delayed_cast(delay_ms: int, alias: str, msg: bytes | str) -> None:
    """:func:`cast` ``msg`` to ``alias`` in ``delay_ms`` milliseconds (not before)."""
    if isinstance(delay_ms, bool) or not isinstance(delay_ms, int) or delay_ms < 0:
        raise ValueError(f"delay_ms: expected an integer >= 0, got {delay_ms!r}")
    _host().delayed_cast(delay_ms, _as_str(alias), as_bytes(msg))


def sync(state: bytes | str) -> None:
    """Stores ``state``: a restarted instance gets the last one in ``handle_init``."""
    _host().sync(as_bytes(state))


def telemetry_log(level: int | str, target: str, msg: str) -> None:
    """A log event at ``level`` (``LOG_ERROR`` ... ``LOG_TRACE``, or a name)."""
    _host().telemetry_log(log_level(level), _as_str(target), _as_str(msg))


def slf() -> InstanceId:
    """This instance's id."""
    return _host().slf()


## Loading a function

_HANDLERS = ("handle_init", "handle_cast", "handle_call", "handle_stop")


def load(spec: Any) -> Callable[[], Any]:
    """A factory of handler objects, one per instance, from ``spec``:

    - ``"pkg.mod"``: the module; each instance gets its own fresh copy of it (its
      globals are the instance's state, never shared with another instance);
    - ``"pkg.mod:Name"``: the class (instantiated per instance) or object ``Name`` there;
    - a module object (fresh copies of it), a class, or any object with handlers.
    """
    if isinstance(spec, (bytes, bytearray)):
        spec = bytes(spec).decode("utf-8")
    if isinstance(spec, str):
        mod_name, _, attr = spec.partition(":")
        if not mod_name:
            raise ValueError(f"function: expected 'module' or 'module:Name', got {spec!r}")
        if not attr:
            return _module_factory(mod_name)
        target = importlib.import_module(mod_name)
        for part in attr.split("."):
            target = getattr(target, part)
        spec = target
    if isinstance(spec, types.ModuleType):
        return _module_factory(spec.__name__)
    if isinstance(spec, type):
        _check_handlers(spec, repr(spec))
        return spec
    _check_handlers(spec, repr(spec))
    return lambda: spec


def _check_handlers(obj: Any, what: str) -> None:
    if not any(callable(getattr(obj, h, None)) for h in _HANDLERS):
        raise TypeError(f"function {what} defines none of {', '.join(_HANDLERS)}")


def _module_factory(name: str) -> Callable[[], Any]:
    found = importlib.util.find_spec(name)
    if found is None or found.loader is None:
        raise ModuleNotFoundError(f"function module {name!r} not found", name=name)
    template = importlib.import_module(name)
    _check_handlers(template, f"module {name!r}")

    def fresh() -> types.ModuleType:
        # A new module object from the same source: instances never share globals. It is
        # not put in sys.modules, so `import name` elsewhere still sees the shared one.
        mod = importlib.util.module_from_spec(found)
        found.loader.exec_module(mod)  # type: ignore[union-attr]
        return mod
    return fresh


class Instance:
    """One function instance: its handler object and its host. Each handler runs with the
    host API bound to ``host``; an exception is given to ``host.handler_error`` and
    raised."""

    __slots__ = ("handlers", "host", "running", "__weakref__")

    def __init__(self, factory: Callable[[], Any], host: Host) -> None:
        self.host = host
        # Calls of this instance running now (erlang_call): Erlang asks before it runs
        # another handler after a direct caller died holding the instance's turn.
        self.running = 0
        token = _current.set(host)
        try:
            self.handlers = factory()
        except BaseException as exc:
            host.handler_error("load", exc)
            raise
        finally:
            _current.reset(token)

    def _run(self, name: str, *args: Any) -> Any:
        fn = getattr(self.handlers, name, None)
        token = _current.set(self.host)
        try:
            if fn is None:
                if name in ("handle_init", "handle_stop"):
                    return None
                raise NotImplementedError(f"the function defines no {name}")
            return fn(*args)
        except BaseException as exc:
            self.host.handler_error(name, exc)
            raise
        finally:
            _current.reset(token)

    def init(self, payload: Any, state: Any) -> None:
        payload = "" if payload is None else _as_str(payload)
        state = b"" if state is None else as_bytes(state)
        self._run("handle_init", payload, state)

    def cast(self, src: Any, msg: Any) -> None:
        self._run("handle_cast", _as_instance_id(src), as_bytes(msg))

    def call(self, src: Any, msg: Any) -> bytes | _NoReplyType:
        """The reply as bytes, or NoReply (a handler returning None means no reply)."""
        return self.reply(self._run("handle_call", _as_instance_id(src), as_bytes(msg)))

    def reply(self, reply: Any) -> bytes | _NoReplyType:
        """What handle_call returned, as a reply: bytes, or NoReply."""
        if type(reply) is bytes:
            return reply
        if reply is None or reply is NoReply:
            return NoReply
        try:
            return as_bytes(reply)
        except TypeError as exc:
            err = TypeError(f"handle_call returned {type(reply).__name__}: {exc}")
            self.host.handler_error("handle_call", err)
            raise err from None

    def stop(self) -> None:
        self._run("handle_stop")


## Erlang as the host (erpy_function)
#
# erpy_function drives each instance with requests to the functions below, on a worker it
# holds (port, node) or on any context of its embedded pool, one request at a time; host API calls go back with erlang.call('erpy_function', 'host', Op),
# which runs in the instance's Erlang process under the pool's policy (the pool must
# allow {erpy_function, host, 1}). Erlang knows the instance by the process the callback
# runs in, so Python cannot speak for another instance.

_atom = Atom
# Answers made on every request: built once.
_OK, _NOREPLY = Atom("ok"), Atom("noreply")


class ErlangHost(Host):
    __slots__ = ("_id", "default_src")

    def __init__(self, self_id: InstanceId) -> None:
        self._id = self_id
        # Who calls when erpy_function:call is given no src: Erlang on this node.
        self.default_src = InstanceId(self_id.node_id, "erlang")

    @staticmethod
    def _host(op: tuple) -> Any:
        from . import erlang
        return erlang.call("erpy_function", "host", op)

    def cast(self, alias: str, msg: bytes) -> None:
        self._answer(self._host((_atom("cast"), alias, msg)))

    def cast_raw(self, dst: InstanceId, msg: bytes) -> None:
        self._answer(self._host((_atom("cast_raw"), tuple(dst), msg)))

    def call(self, alias: str, msg: bytes) -> bytes | _NoReplyType:
        return self._answer(self._host((_atom("call"), alias, msg)))

    def call_raw(self, dst: InstanceId, msg: bytes) -> bytes | _NoReplyType:
        return self._answer(self._host((_atom("call_raw"), tuple(dst), msg)))

    def delayed_cast(self, delay_ms: int, alias: str, msg: bytes) -> None:
        self._answer(self._host((_atom("delayed_cast"), delay_ms, alias, msg)))

    def sync(self, state: bytes) -> None:
        self._answer(self._host((_atom("sync"), state)))

    def telemetry_log(self, level: int, target: str, msg: str) -> None:
        self._answer(self._host((_atom("telemetry_log"), level, target, msg)))

    def slf(self) -> InstanceId:
        return self._id

    @staticmethod
    def _answer(answer: Any) -> Any:
        # erpy_function:host/1 answers ok | {reply, Bin} | noreply | {error, Reason}.
        if answer == "ok":
            return None
        if answer == "noreply":
            return NoReply
        if isinstance(answer, tuple) and len(answer) == 2:
            tag, value = answer
            if tag == "reply":
                return as_bytes(value)
            if tag == "error":
                raise FunctionCallError(value)
        raise FunctionCallError(("bad_host_answer", answer))


# Instances of this interpreter hosted by Erlang, by the key erpy_function gave them. An
# instance on a held worker (port, node) lives as long as a guard kept in that worker's
# namespace: when the worker goes back to its pool (stop, or the instance process died)
# the namespace is cleared, the guard freed, and the entry dropped, so nothing leaks in a
# long-lived worker or node. One on an embedded pool holds no worker (erlang_start_shared):
# Erlang drops it explicitly.
_erlang_instances: dict[Any, Instance] = {}


class _Guard:
    __slots__ = ("__weakref__",)


def erlang_start(namespace: dict, key: Any, spec: Any, self_id: Any, payload: Any, state: Any) -> Any:
    """Creates and initialises the instance ``key`` (Erlang evaluates this in the held
    worker's namespace, passing ``globals()``). Answers ``ok``."""
    instance = Instance(load(spec), ErlangHost(_as_instance_id(self_id)))
    guard = _Guard()
    weakref.finalize(guard, _erlang_instances.pop, key, None)
    namespace["__erpy_function__"] = guard
    _erlang_instances[key] = instance
    try:
        instance.init(payload, state)
    except BaseException:
        _erlang_instances.pop(key, None)
        namespace.pop("__erpy_function__", None)
        raise
    return _OK


def erlang_start_shared(key: Any, spec: Any, self_id: Any, payload: Any, state: Any) -> Any:
    """:func:`erlang_start` for an instance that holds no worker (embedded pools: every
    context shares this interpreter). The entry lives until :func:`erlang_stop` or
    :func:`erlang_drop` (erpy_function's janitor calls it when the instance process ends);
    an entry of an earlier run of the same instance that was never dropped goes now."""
    sid = _as_instance_id(self_id)
    for old, inst in list(_erlang_instances.items()):
        if isinstance(inst.host, ErlangHost) and inst.host.slf() == sid and old != key:
            _erlang_instances.pop(old, None)
    instance = Instance(load(spec), ErlangHost(sid))
    _erlang_instances[key] = instance
    try:
        instance.init(payload, state)
    except BaseException:
        _erlang_instances.pop(key, None)
        raise
    return _OK


def erlang_drop(key: Any) -> Any:
    """Forgets the instance ``key`` without ``handle_stop`` (its process crashed)."""
    _erlang_instances.pop(key, None)
    return _OK


def _erlang_instance(key: Any) -> Instance:
    instance = _erlang_instances.get(key)
    if instance is None:
        raise LookupError(f"no function instance {key!r} in this worker")
    return instance


def erlang_cast(key: Any, src: Any, msg: Any) -> Any:
    _erlang_instance(key).cast(_erlang_src(src), msg)
    return _OK


# Erlang's src tuples as InstanceIds: a handful of distinct ones, converted once (bounded).
_src_ids: dict[Any, InstanceId] = {}


def _erlang_src(src: Any) -> InstanceId:
    try:
        return _src_ids[src]
    except (KeyError, TypeError):
        pass
    sid = _as_instance_id(src)
    if type(src) is tuple and type(src[0]) is str and type(src[1]) is str:
        if len(_src_ids) >= 1024:
            _src_ids.clear()
        _src_ids[src] = sid
    return sid


def erlang_call(key: Any, msg: Any, src: Any = None) -> Any:
    """handle_call of instance ``key``: a reply as bytes, NoReply as the atom noreply.
    Without ``src`` the caller is the default one, ``(node_id, "erlang")``."""
    # Every erpy_function:call comes here: Instance.call inlined for the common case (a
    # handle_call of bytes returning bytes); anything else goes the general way.
    instance = _erlang_instances.get(key)
    if instance is None:
        raise LookupError(f"no function instance {key!r} in this worker")
    sid = instance.host.default_src if src is None else _erlang_src(src)
    fn = getattr(instance.handlers, "handle_call", None)
    instance.running += 1
    try:
        if fn is None or type(msg) is not bytes:
            reply = instance.call(sid, msg)
        else:
            token = _current.set(instance.host)
            try:
                reply = fn(sid, msg)
            except BaseException as exc:
                instance.host.handler_error("handle_call", exc)
                raise
            finally:
                _current.reset(token)
            if type(reply) is bytes:
                return reply
            reply = instance.reply(reply)
    finally:
        instance.running -= 1
    if reply is NoReply:
        return _NOREPLY
    return reply


def erlang_running(key: Any) -> int:
    """How many calls of instance ``key`` run now (0 for an unknown one)."""
    instance = _erlang_instances.get(key)
    return 0 if instance is None else instance.running


def erlang_stop(key: Any) -> Any:
    instance = _erlang_instances.pop(key, None)
    if instance is not None:
        instance.stop()
    return _OK

