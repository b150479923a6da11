"""erpy.node: this Python process as an Erlang node.

Stock Erlang/OTP reaches it with no erpy code on its side (``net_adm:ping``,
``rpc:call``, ``erpc``, ``gen_server:call``, ``!``, monitors and links); Python reaches
Erlang nodes with :meth:`Node.rpc`, :meth:`Node.call`, :meth:`Node.send`. The distribution
protocol (EPMD, handshake, framing, spawn requests) is C++ (``erpy._node``); this module is
the thin Python layer: the rpc allow-list, gen_server-like handlers, the command line.

    python3 -m erpy.node --name py@127.0.0.1 --cookie secret --allow operator,math

See doc/node.md.
"""

from __future__ import annotations

if __name__ == "__main__":
    # `python3 -m erpy.node` runs this file as __main__: run main() of the real module
    # erpy.node at once, rather than define everything here first too, so that handler
    # modules that import erpy.node (GenServer, NOREPLY) share its classes.
    import sys
    from erpy.node import main as _main
    sys.exit(_main())

import _thread
import _weakref
import atexit
import itertools
import os
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterable

from . import _node
from . import erlang as _erlang
from ._types import Atom, ImproperList, Pid, Ref
from .erlang import ErlangError, ErlangTimeoutError

__all__ = [
    "Node", "GenServer", "NOREPLY", "NotAllowed", "ErlangError", "ErlangTimeoutError",
    "format_error", "ensure_epmd", "main",
]

# rpc:call(PyNode, 'erpy.service', F, A) reaches the node's own service (used by
# erpy_node_pool); it checks the allow-list itself.
SERVICE_MODULE = "erpy.service"

# Modules only some paths need (the command line, starting epmd, a crashed handler's log
# line, GenServer threads) are imported when first used: a node starts sooner without
# them (threading alone, with the collections and functools it imports, is a good part
# of a node's start). As attributes of this module they are there all the same
# (erpy.node.log, erpy.node.subprocess, erpy.node.threading).
_LAZY = frozenset({"argparse", "contextlib", "glob", "importlib", "logging", "shutil", "signal",
                   "socket", "subprocess", "threading"})


def __getattr__(name: str) -> Any:
    if name == "threading":
        return _threading()
    if name in _LAZY:
        __import__(name)
        return sys.modules[name]
    if name == "log":
        return _log()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _log() -> Any:
    import logging
    return logging.getLogger("erpy.node")


#: The default of ``max_message_size``: the largest message (or fragmented message, its
#: fragments together) a connection may send this node; a larger one is refused.
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024
#: The defaults of ``max_queued_messages`` and ``max_queued_bytes``: what one mailbox (a
#: local process) may hold unread; a message beyond either is dropped.
DEFAULT_MAX_QUEUED_MESSAGES = 100_000
DEFAULT_MAX_QUEUED_BYTES = 1024 * 1024 * 1024
#: The default of ``max_send_queue``: bytes sent to a connected node that it has not read
#: yet; a node that lets more pile up is disconnected.
DEFAULT_MAX_SEND_QUEUE = 256 * 1024 * 1024


# Nodes still running when the interpreter exits are stopped first, before Python joins
# its non-daemon threads (the GenServer threads, which end when their node stops): no
# thread may wait for the GIL in C++ code while Python finalizes. Weak references (id ->
# ref; weakref.WeakSet would import more at start): a node nobody holds is not kept.
_RUNNING: dict[int, Any] = {}


def _stop_all() -> None:
    for ref in list(_RUNNING.values()):
        node = ref()
        if node is not None:
            node.stop()


atexit.register(_stop_all)
_threading_module: Any = None


def _threading() -> Any:
    """The threading module, imported when first needed, with _stop_all registered to run
    before Python joins non-daemon threads at exit (atexit runs only after that)."""
    global _threading_module
    if _threading_module is None:
        import threading
        register = getattr(threading, "_register_atexit", None)
        if register is not None:
            try:
                register(_stop_all)
            except RuntimeError:  # the interpreter is already shutting down
                pass
        _threading_module = threading
    return _threading_module


_encode_fn: Any = None


def _encode(value: Any) -> bytes:
    # erpy's codec module, loaded at the first callback: a node needs it for nothing else.
    global _encode_fn
    if _encode_fn is None:
        from ._native import encode
        _encode_fn = encode
    return _encode_fn(value)


class NotAllowed(PermissionError):
    """An rpc into a module (or function) that the node's allow-list does not permit."""


class SessionClosed(LookupError):
    """A request for a held worker whose namespace is gone (checked in, or the node
    restarted)."""


# The Erlang caller of the erpy.service call running on this thread (node pools), if any.
_current = _thread._local()  # threading.local, without importing threading


class _Caller:
    """The Erlang process an ``erpy.service`` call runs for (a node pool's caller): the
    backend of :mod:`erpy.erlang` for the call's code. ``erlang.call``/``apply``/``send``
    become a message to that process's alias, ``{erpy_node_callback, Alias, ReplyTo, CbId,
    Kind, M, F, ArgsBin}``, which checks them against its pool's policy, runs them and answers
    ``{erpy_callback_reply, CbId, ok | error, Value}``. M and F go as binaries and every
    other term Python chose inside ArgsBin (for send ``[Dest, Msg]``, M and F undefined),
    so the caller decodes them under its own rules: nothing in the message itself can
    make an atom. The thread waits without holding up the connection (a call run by the
    connection's reader goes on reading it meanwhile, so the reply is read by the waiting
    thread itself), and a cancel of the call (the caller's timeout) ends the wait."""

    def __init__(self, node: "Node", pid: Pid, tag: Any) -> None:
        self._node = node
        self.pid = pid
        self._tag = tag
        self._ids = itertools.count(1)
        self._mb: Any = None
        self._monitor: Any = None
        # erpy.erlang calls these; each answers through _node.outcome, which raises the
        # error from C: a failed callback's traceback shows the request's code and
        # erpy.erlang, as in the other modes, not this class.
        self.erlang_call = _node.outcome(self._call)
        self.erlang_apply = _node.outcome(self._apply)
        self.erlang_send = _node.outcome(self._send)

    def close(self) -> None:
        if self._mb is not None:
            self._mb.close()
            self._mb = None

    def erlang_self(self) -> Pid:
        return self.pid

    def _call(self, module: Any, function: Any, arg: Any) -> tuple:
        return self._callback("call", module, function, [arg])

    def _apply(self, module: Any, function: Any, args: Any) -> tuple:
        if not isinstance(args, (list, tuple)):
            return (TypeError, "apply(): arguments must be a list")
        return self._callback("apply", module, function, list(args))

    def _send(self, dest: Any, message: Any) -> tuple:
        outcome = self._callback("send", None, None, [dest, message])
        return outcome if outcome[0] is not None else (None, None)

    def _callback(self, kind: str, module: Any, function: Any, args: list) -> tuple:
        """(None, value), or (ErlangError, reason) when Erlang refused or failed."""
        try:
            names = (Atom("undefined") if module is None else _callback_name(module, "module"),
                     Atom("undefined") if function is None else _callback_name(function, "function"))
        except TypeError as e:
            return (TypeError, str(e))
        payload = _encode(args)
        mb = self._mailbox()
        cb = next(self._ids)
        # To the alias: once the request is over it is gone, and the runtime drops what
        # comes to it (a callback made after the caller gave up reaches nobody).
        mb.send(self._tag, (Atom("erpy_node_callback"), self._tag, mb.pid, cb, Atom(kind), *names, payload))
        while True:
            msg = mb.receive()
            if type(msg) is not tuple:
                continue
            if len(msg) == 4 and msg[0] == "erpy_callback_reply" and msg[1] == cb:
                return (None, msg[3]) if msg[2] == "ok" else (ErlangError, msg[3])
            if len(msg) == 5 and msg[0] == "DOWN" and msg[1] == self._monitor:
                return (ErlangError, Atom("noproc"))

    def _mailbox(self) -> Any:
        if self._mb is None:
            self._mb = self._node._native.mailbox()
            # A caller that dies ends the wait even if nobody cancels the call. One that
            # started the call with a monitor (a node pool's) cancels it as it goes, which
            # ends the wait too: no monitor of ours (two frames fewer per request).
            if not self._node._native.watched_by(self.pid):
                self._monitor = self._mb.monitor(self.pid)
        return self._mb


class _Calling:
    """The context a request with a caller runs in: erpy.erlang's callbacks on this thread
    go to that caller meanwhile. (A class, not contextlib's generator: cheaper per
    request, and contextlib need not be imported before the first.)"""

    __slots__ = ("_caller", "_previous")

    def __init__(self, caller: _Caller) -> None:
        self._caller = caller
        self._previous: Any = None

    def __enter__(self) -> None:
        self._previous = getattr(_current, "caller", None)
        _current.caller = self._caller

    def __exit__(self, *exc: Any) -> bool:
        _current.caller = self._previous
        self._caller.close()
        return False


def _callback_name(name: Any, what: str) -> str:
    if isinstance(name, (bytes, bytearray)):
        return bytes(name).decode()
    if isinstance(name, str):
        return str(name)  # a plain str: it travels as a binary, never as a new atom
    raise TypeError(f"erlang callback: the {what} must be a str, not {type(name).__name__}")


def _caller_backend() -> Any:
    return getattr(_current, "caller", None)


# erpy.erlang asks this first: inside a node pool's request it is the caller.
_erlang._node_backend = _caller_backend


class _NoReply:
    def __repr__(self) -> str:
        return "NOREPLY"


#: Returned by ``GenServer.handle_call`` to answer later with ``Node.reply(from_, value)``.
NOREPLY = _NoReply()


def format_error(exc: BaseException) -> dict:
    """A Python exception as erpy's error map: ``#{type, message, traceback}``, made by the
    executor every mode shares (``traceback`` holds ``traceback.format_exception``'s
    chunks, as in port and embedded mode)."""
    return _node.error_map(exc)


class GenServer:
    """A Python process that behaves as a gen_server: subclass it and register it with
    :meth:`Node.spawn`. The instance's attributes are its state.

    ``handle_call(request, from_)`` returns the reply (or ``NOREPLY`` and answers later
    with ``node.reply(from_, value)``); ``handle_cast(request)`` and ``handle_info(msg)``
    return nothing. An exception ends the process: monitors get ``'DOWN'`` with the error
    map as reason, a waiting ``gen_server:call`` exits with it. With ``trap_exit = True``
    exit signals from linked processes arrive in ``handle_info`` as ``('EXIT', pid,
    reason)``; otherwise a reason other than ``normal`` ends the process.
    """

    trap_exit = False
    node: "Node"
    pid: Pid

    def init(self) -> None:
        """Called in the process's thread before the first message."""

    def handle_call(self, request: Any, from_: tuple) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no handle_call")

    def handle_cast(self, request: Any) -> None:
        pass

    def handle_info(self, msg: Any) -> None:
        pass

    def terminate(self, reason: Any) -> None:
        pass

    def stop(self, reason: Any = "normal") -> None:
        """Ends this process (from inside a handler) with ``reason``."""
        raise _Stop(Atom(reason) if type(reason) is str else reason)


class _Stop(Exception):
    def __init__(self, reason: Any) -> None:
        super().__init__(reason)
        self.reason = reason


EPMD_PORT = 4369


def _epmd_answers(timeout: float = 0.5) -> bool:
    import socket
    try:
        with socket.create_connection(("127.0.0.1", EPMD_PORT), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_epmd(wait_s: float = 5.0) -> None:
    """Start ``epmd -daemon`` if no epmd answers on 127.0.0.1:4369, as ``erl -name`` does,
    and wait until it listens (``epmd -daemon`` returns before it does). Raises OSError
    with the reason if there is no epmd to start or it never answers."""
    if _epmd_answers():
        return
    import glob
    import shutil
    import subprocess
    epmd = shutil.which("epmd")
    if epmd is None:
        erl = shutil.which("erl")
        if erl is not None:  # Debian keeps epmd beside erts, not always on PATH
            root = os.path.dirname(os.path.dirname(os.path.realpath(erl)))
            found = sorted(glob.glob(os.path.join(root, "erts-*", "bin", "epmd")))
            epmd = found[-1] if found else None
    if epmd is None:
        raise OSError("no epmd answers on 127.0.0.1:4369 and none is installed to start "
                      "(apt-get install -y erlang-base)")
    subprocess.run([epmd, "-daemon"], check=False, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if _epmd_answers():
            return
        time.sleep(0.02)
    raise OSError(f"started {epmd} -daemon but nothing answered on 127.0.0.1:4369 "
                  f"within {wait_s:g} s")


class Node:
    """An Erlang node in this Python process.

    ``allow``: the Python modules Erlang's rpc may reach (``"operator"`` also allows
    ``operator.*`` submodules; ``"*"`` allows every module). Nothing is reachable unless
    listed, except functions registered with :meth:`expose`. ``allow_code``: whether
    ``erpy.service`` may run code (``eval``/``exec``/``run``) for erpy_node_pool.
    ``start_epmd``: start epmd if none runs, as ``erl -name`` does (False: fail instead).

    Inbound limits, per connection: ``max_message_size`` bytes for one message (a frame,
    or a fragmented message's fragments together); a larger one is refused (logged, its
    bytes skipped unread; an rpc gets ``{message_too_large, Size, Max}``).
    ``max_fragments`` fragmented messages unfinished at once and ``max_fragment_bytes``
    (default: twice ``max_message_size``, at least 256 MiB) of them together; a message
    beyond either is refused (an rpc gets ``{fragment_limit, MaxFragments, MaxBytes}``).

    Per process (a mailbox, a GenServer): a message to one that already holds
    ``max_queued_messages`` unread messages, or ``max_queued_bytes`` bytes of them, is
    dropped (logged at most once a second, counted in ``stats()["dropped"]``): a mailbox
    nobody reads, or a flood, cannot grow the node without bound. Monitors and links other
    nodes set on one process are capped at ``max_queued_messages`` too: beyond it the
    monitor fires at once, the link breaks, with reason ``system_limit`` (also counted in
    ``dropped``).

    Outbound, per connection: frames go out through the connection's own queue, so a node
    that stops reading holds up only what is sent to it (Python threads sending to it wait
    while a few MiB wait for it, as OTP suspends a sender on a busy distribution port);
    one that lets more than ``max_send_queue`` bytes pile up is disconnected (logged).
    """

    def __init__(self, name: str, cookie: str, *, host: str = "127.0.0.1", port: int = 0,
                 allow: Iterable[str] = (), allow_code: bool = False, hidden: bool = True,
                 ticktime: int = 60, slow_ms: int = 5, spin_us: int = 0,
                 coalesce_us: int = 200, start_epmd: bool = True,
                 max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, max_fragments: int = 1024,
                 max_fragment_bytes: int | None = None,
                 max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
                 max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
                 max_send_queue: int = DEFAULT_MAX_SEND_QUEUE, tls: dict | None = None) -> None:
        # tls: TLS distribution (doc/node.md): {"ssl_dist_optfile": F} or {"tls_cert": F,
        # "tls_key": F, "tls_ca": F, "tls_verify": "peer" | "none"}; None: plain TCP.
        if max_queued_messages < 1 or max_queued_bytes < 1:
            raise ValueError("max_queued_messages and max_queued_bytes must be at least 1")
        if max_send_queue < 1:
            raise ValueError("max_send_queue must be at least 1")
        if "@" not in name:
            name = f"{name}@127.0.0.1"
        self.allow = {a.strip() for a in allow if a and a.strip()}
        self.allow_code = allow_code
        self._exposed: dict[tuple[str, str], Callable] = {}
        # erpy.service:request/1: a request map run as every mode runs one.
        self._request = _node.service(self._policy)
        # Namespaces of held workers (erpy_node_pool:checkout/2), by session id.
        self._sessions: dict[int, dict[str, Any]] = {}
        self._session_ids = itertools.count(1)
        # Holders of sessions, monitored by one process of ours: a session goes when its
        # holder dies or its node goes away, even if the pool that opened it is gone too.
        self._session_lock = _thread.allocate_lock()  # threading.Lock
        self._session_mb: Any = None
        self._session_refs: dict[Ref, int] = {}
        self._session_monitors: dict[int, Ref] = {}
        self._native = _node.Node(name, cookie, resolver=self._resolve, host=host, port=port,
                                  hidden=hidden, ticktime=ticktime, slow_ms=slow_ms,
                                  spin_us=spin_us, coalesce_us=coalesce_us,
                                  max_message_size=max_message_size, max_fragments=max_fragments,
                                  max_fragment_bytes=max_fragment_bytes or 0,
                                  max_queued_messages=max_queued_messages,
                                  max_queued_bytes=max_queued_bytes,
                                  max_send_queue=max_send_queue, **(tls or {}))
        self._threads: list[Any] = []  # threading.Thread
        self._started = False
        self._start_epmd = start_epmd

    # -- lifecycle --------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._native.name

    @property
    def port(self) -> int:
        return self._native.port

    def start(self) -> "Node":
        try:
            self._native.start()
        except OSError:
            # Registering failed: start epmd if none answers (and try again), as `erl
            # -name` does; asked first only now, which spares a start the look.
            if not self._start_epmd or _epmd_answers():
                raise
            ensure_epmd()
            self._native.start()
        self._started = True
        key = id(self)
        _RUNNING[key] = _weakref.ref(self, lambda _ref, key=key: _RUNNING.pop(key, None))
        if "threading" in sys.modules:
            # Threads of the caller's may use this node: it stops before they are joined.
            _threading()
        return self

    def stop(self) -> None:
        if self._started:
            self._started = False
            _RUNNING.pop(id(self), None)
            self._native.stop()

    def __enter__(self) -> "Node":
        return self.start() if not self._started else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stats(self) -> dict:
        """Counters: ``calls``, ``messages`` (delivered to mailboxes), ``handovers``,
        ``refused`` (inbound messages over the connection limits), ``dropped`` (messages,
        monitors and links a process had no room for)."""
        return self._native.stats()

    def nodes(self) -> list[str]:
        return self._native.nodes()

    # -- what Erlang may call -----------------------------------------------------------

    def allowed(self, module: str) -> bool:
        if "*" in self.allow or module in self.allow:
            return True
        return any(module.startswith(a + ".") for a in self.allow)

    def set_allow(self, modules: Iterable[str]) -> None:
        self.allow = set(modules)
        self._native.clear_cache()

    def expose(self, module: str, function: str | None = None, fn: Callable | None = None):
        """Makes ``fn`` reachable as ``rpc:call(PyNode, Module, Function, Args)`` whatever
        the allow-list says. Usable as a decorator: ``@node.expose("shop")``."""
        def register(f: Callable) -> Callable:
            self._exposed[(module, function or f.__name__)] = f
            self._native.clear_cache()
            return f
        return register(fn) if fn is not None else register

    def _resolve(self, module: str, function: str) -> Callable:
        f = self._exposed.get((module, function))
        if f is not None:
            return f
        if module == SERVICE_MODULE:
            if function == "request":
                return self._request
            f = getattr(self, "_service_" + function, None)
            if f is None:
                raise NotAllowed(f"erpy.service has no function {function!r}")
            return f
        self._check_allowed(module, function)
        # Found as every mode finds a function: dotted names included ("dict.fromkeys").
        f = _node.resolve(module, function)
        if not callable(f):
            raise TypeError(f"{module}.{function} is not callable")
        return f

    def _check_allowed(self, module: str, function: str) -> None:
        if not self.allowed(module):
            raise NotAllowed(f"module {module!r} is not allowed on node {self.name} "
                             "(allow it with --allow / ERPY_NODE_ALLOW)")
        if any(part.startswith("_") for part in function.split(".")):
            raise NotAllowed(f"{module}.{function}: private names are not reachable")

    # erpy.service:request(Request): what erpy_node_pool sends, the request map every mode
    # reads (doc/protocol.md), read by the same C++ schema and run by the same executor
    # (py::Runner, through erpy._node.service): names resolve, code is cached, namespaces
    # are made and errors read (tracebacks included) as in port and embedded mode. Before
    # it runs, _policy (the node's own: allow-list, allow_code, sessions, the caller)
    # decides; see there. call/eval/exec/run are the same requests for stock erpc callers.
    def _policy(self, *, kind: str, module: Any, function: Any, session: Any, caller: Any,
                reply_to: Any, max_size: int) -> tuple:
        """(context, target, namespace) for a request, or raises what refuses it.
        `max_size`: the largest result (bytes of external format) it may return, else
        {message_too_large, Size, Max}; 0: no limit. `session`: the namespace of a held
        worker (session_open/1), None for none. `caller` and `reply_to` (a node pool's
        caller and its alias): the result (or the error map) goes back as its ETF in a
        binary, for the caller to decode under its pool's policy, and erpy.erlang's
        callbacks in the code go to that alias (_Caller). No caller (a stock erpc caller):
        plain terms, no callbacks."""
        # First: an error raised by what follows goes back as the caller expects too.
        self._native.set_result_limit(max_size or 0, caller is not None)
        ctx = None
        if caller is not None:
            if not (isinstance(caller, Pid) and isinstance(reply_to, (Ref, Pid))):
                raise TypeError(f"erpy.service: caller must be a pid and reply_to an alias, "
                                f"not {caller!r}, {reply_to!r}")
            ctx = self._calling(caller, reply_to)
        if kind == "call":
            if session is not None:
                self._session(session)
            module, function = _text(module), _text(function)
            f = self._exposed.get((module, function))
            if f is not None:
                return (ctx, f, None)
            self._check_allowed(module, function)
            return (ctx, None, None)
        self._check_code()
        return (ctx, None, self._session(session))

    def _calling(self, pid: Pid, alias: Any) -> "_Calling":
        return _Calling(_Caller(self, pid, alias))

    # The stock erpc interface: rpc:call(PyNode, 'erpy.service', call, [M, F, Args]) etc.
    def _service_call(self, module: Any, function: Any, args: Any, kwargs: Any = None) -> Any:
        req = {"v": 1, "kind": "call", "module": module, "function": function, "args": args}
        if kwargs is not None:
            req["kwargs"] = kwargs
        return self._request(req)

    def _service_eval(self, expr: Any, local_vars: Any = None) -> Any:
        req = {"v": 1, "kind": "eval", "code": expr}
        if local_vars is not None:
            req["locals"] = local_vars
        return self._request(req)

    def _service_exec(self, code: Any) -> Any:
        return self._request({"v": 1, "kind": "exec", "code": code})

    def _service_run(self, code: Any, arguments: Any = None) -> Any:
        return self._request({"v": 1, "kind": "run", "code": code, "args": arguments})

    def _check_code(self) -> None:
        if not self.allow_code:
            raise NotAllowed(f"node {self.name} does not run code (start it with --allow-code)")

    def _session(self, session: Any) -> dict:
        if session is None:
            # Without a held worker every exec/eval gets a fresh namespace, as in the
            # other modes; state across calls needs a checkout.
            return _node.namespace()
        ns = self._sessions.get(session)
        if ns is None:
            raise SessionClosed(f"worker session {session!r} is closed on node {self.name}")
        return ns

    def _service_session_open(self, holder: Any = None) -> int:
        """A namespace kept on this node for one holder (a checked-out worker); it goes
        at session_close or when the holder (a pid) dies."""
        self._check_code()
        sid = next(self._session_ids)
        self._sessions[sid] = _node.namespace()
        if isinstance(holder, Pid):
            with self._session_lock:
                if self._session_mb is None:
                    self._session_mb = self._native.mailbox()
                    t = _threading().Thread(target=self._session_reaper, args=(self._session_mb,),
                                         daemon=False, name="erpy-sessions")
                    self._threads.append(t)
                    t.start()
                ref = self._session_mb.monitor(holder)
                self._session_refs[ref] = sid
                self._session_monitors[sid] = ref
        return sid

    def _service_session_close(self, session: Any) -> Any:
        self._sessions.pop(session, None)
        with self._session_lock:
            ref = self._session_monitors.pop(session, None)
            if ref is not None:
                self._session_refs.pop(ref, None)
                try:
                    self._session_mb.demonitor(ref)
                except Exception:  # noqa: BLE001 - the holder's node may be gone
                    pass
        return Atom("ok")

    def _session_reaper(self, mb: Any) -> None:
        while True:
            try:
                msg = mb.receive()
            except EOFError:  # the node stopped
                return
            if type(msg) is tuple and len(msg) == 5 and msg[0] == "DOWN":
                with self._session_lock:
                    sid = self._session_refs.pop(msg[1], None)
                    if sid is not None:
                        self._session_monitors.pop(sid, None)
                        self._sessions.pop(sid, None)

    def _service_cancel(self, req: Any) -> Any:
        """Interrupts the call of spawn request `req` (its caller gave up before our
        spawn reply reached its node, which then cannot tell us)."""
        self._native.cancel_request(req)
        return None

    def _service_ping(self) -> Any:
        return Atom("pong")

    # -- processes ----------------------------------------------------------------------

    def mailbox(self) -> Any:
        """A new local process: ``.pid``, ``.receive()``, ``.send()``, ``.monitor()`` ..."""
        return self._native.mailbox()

    def spawn(self, handler: GenServer, name: str | None = None) -> Pid:
        """Runs ``handler`` (a :class:`GenServer`) as a process in a thread of its own,
        registered under ``name`` if given; returns its pid."""
        mb = self._native.mailbox()
        if name is not None and not mb.register(name):
            mb.close()
            raise ValueError(f"the name {name!r} is already registered")
        handler.node = self
        handler.pid = mb.pid
        t = _threading().Thread(target=self._loop, args=(handler, mb), daemon=False,
                             name=f"erpy-{name or mb.pid.id}")
        self._threads.append(t)
        t.start()
        return mb.pid

    def _loop(self, h: GenServer, mb: Any) -> None:
        reason: Any = Atom("normal")
        try:
            h.init()
            while True:
                for msg in mb.receive_many(256):
                    self._dispatch(h, msg)
        except EOFError:
            reason = Atom("killed")
        except _Stop as s:
            reason = s.reason
        except BaseException as e:  # noqa: BLE001 - the process ends with the error
            _log().warning("process %r (%s) crashed", mb.pid, type(h).__name__, exc_info=True)
            reason = format_error(e)
        try:
            h.terminate(reason)
        except Exception:  # noqa: BLE001
            pass
        if not mb.closed:
            mb.close(reason)

    def _dispatch(self, h: GenServer, msg: Any) -> None:
        if type(msg) is tuple and msg:
            tag = msg[0]
            if tag == "$gen_call" and len(msg) == 3:
                reply = h.handle_call(msg[2], msg[1])
                if reply is not NOREPLY:
                    self.reply(msg[1], reply, sender=h.pid)
                return
            if tag == "$gen_cast" and len(msg) == 2:
                h.handle_cast(msg[1])
                return
            if tag == "EXIT" and len(msg) == 3 and not h.trap_exit:
                if msg[2] != "normal":
                    raise _Stop(msg[2])
                return
        h.handle_info(msg)

    def reply(self, from_: tuple, value: Any, sender: Any = None) -> None:
        """Answers a ``gen_server:call`` whose ``From`` is ``from_``."""
        pid, tag = from_
        # OTP 24+: the tag [alias | Ref] asks for the reply to go to the alias.
        if isinstance(tag, ImproperList) and tag.elements == ["alias"]:
            dest = tag.tail
        else:
            dest = pid
        self._native.send(dest, (tag, value))

    # -- reaching Erlang ----------------------------------------------------------------

    def ping(self, node: str) -> bool:
        try:
            return bool(self._native.connect(node))
        except ConnectionError:
            return False

    def send(self, dest: Any, msg: Any) -> None:
        """``Dest ! Msg``: dest is a Pid, a Ref (alias), a registered name of this node or
        ``(name, node)``."""
        self._native.send(dest, msg)

    def cast(self, dest: Any, request: Any) -> None:
        """``gen_server:cast(Dest, Request)``."""
        self._native.send(dest, (Atom("$gen_cast"), request))

    def call(self, dest: Any, request: Any, timeout: float = 5.0) -> Any:
        """``gen_server:call(Dest, Request, Timeout)`` into Erlang; dest is a Pid or
        ``(name, node)``. Raises ErlangError when the server is down, ErlangTimeoutError."""
        mb = self._native.mailbox()
        try:
            ref = mb.monitor(dest)
            mb.send(dest, (Atom("$gen_call"), (mb.pid, ref), request))
            deadline = time.monotonic() + timeout
            while True:
                msg = self._receive(mb, deadline)
                if type(msg) is tuple and len(msg) == 2 and msg[0] == ref:
                    mb.demonitor(ref)
                    return msg[1]
                if type(msg) is tuple and len(msg) == 5 and msg[0] == "DOWN" and msg[1] == ref:
                    raise ErlangError(msg[4])
        finally:
            mb.close()

    def rpc(self, node: str, module: str, function: str, args: Iterable[Any] = (),
            timeout: float = 5.0) -> Any:
        """``erpc:call(Node, Module, Function, Args)`` into an Erlang node. An Erlang
        exception raises ErlangError with ``(Class, Reason)``."""
        mb = self._native.mailbox()
        try:
            res = self._native.make_ref()
            req = mb.spawn_request(node, "erpc", "execute_call",
                                   [res, Atom(module), Atom(function), list(args)])
            deadline = time.monotonic() + timeout
            while True:
                msg = self._receive(mb, deadline)
                if type(msg) is not tuple or not msg:
                    continue
                tag = msg[0]
                if tag == "spawn_reply" and msg[1] == req:
                    if msg[2] == "error":
                        raise ErlangError(msg[3])
                elif tag == "DOWN" and msg[1] == req:
                    reason = msg[4]
                    if type(reason) is tuple and len(reason) >= 3 and reason[0] == res:
                        if reason[1] == "return":
                            return reason[2]
                        raise ErlangError((reason[1], reason[2]))
                    raise ErlangError(reason)
                elif tag == "io_request" and len(msg) == 4:
                    # We are the group leader of the process we asked for.
                    mb.send(msg[1], (Atom("io_reply"), msg[2], Atom("ok")))
        finally:
            mb.close()

    @staticmethod
    def _receive(mb: Any, deadline: float) -> Any:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ErlangTimeoutError("timeout")
        try:
            return mb.receive(left)
        except TimeoutError:
            raise ErlangTimeoutError("timeout") from None

    def serve_forever(self, stop: Any = None) -> None:
        """Blocks until ``stop`` (a threading.Event) is set (or forever)."""
        (stop or _threading().Event()).wait()


def _text(v: Any) -> str:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).decode()
    return str(v)


def _env(*names: str, default: str | None = None) -> str | None:
    for n in names:
        v = os.environ.get(n)
        if v:
            return v
    return default


# The command line: (flag, kind, default, help). Kinds: "str", "int", "append" (repeatable),
# "true"/"false" (flags). An int's default may be (environment variable, value if unset). A
# command line made of these flags only (what a node pool passes) is read without
# argparse, whose import costs a node's start about as much as the rest of erpy's;
# argparse reads any other (--help, abbreviations, mistakes: its messages).
_CLI: tuple = (
    ("--name", "str", None, "NAME@HOST (env ERPY_NODE_NAME, BPY_BEAM_NODE)"),
    ("--cookie", "str", None, "the cookie (env ERPY_COOKIE, BPY_BEAM_COOKIE)"),
    ("--listen", "str", None, "address to listen on (env ERPY_NODE_LISTEN, BPY_BEAM_HOST; default 127.0.0.1)"),
    ("--port", "int", None, "distribution port (env ERPY_NODE_PORT, BPY_BEAM_PORT; default 0: any)"),
    ("--allow", "append", None,
     "comma-separated Python modules rpc may reach ('*': all); repeatable (env ERPY_NODE_ALLOW)"),
    ("--allow-code", "true", None, "let erpy.service run code (eval/exec/run) (env ERPY_NODE_ALLOW_CODE=1)"),
    ("--load", "append", [], "import this module at start; its erpy_setup(node) is called if present"),
    ("--connect", "append", [],
     "connect to this node before saying it is ready (if that fails, it is left to connect); repeatable"),
    ("--ticktime", "int", ("ERPY_NODE_TICKTIME", 60), None),
    ("--spin-us", "int", ("ERPY_NODE_SPIN_US", 0),
     "poll a connection up to this long after data before sleeping, only while that pays (0: never)"),
    ("--coalesce-us", "int", ("ERPY_NODE_COALESCE_US", 200),
     "when messages stream in, wait this long between reads (0: off)"),
    ("--max-message-size", "int", ("ERPY_NODE_MAX_MESSAGE_SIZE", DEFAULT_MAX_MESSAGE_SIZE),
     "largest message (bytes) a connection may send this node; larger ones are refused (env "
     "ERPY_NODE_MAX_MESSAGE_SIZE; default 64 MiB)"),
    ("--max-queued-messages", "int", ("ERPY_NODE_MAX_QUEUED_MESSAGES", DEFAULT_MAX_QUEUED_MESSAGES),
     "unread messages one mailbox may hold; more are dropped (env ERPY_NODE_MAX_QUEUED_MESSAGES; "
     "default 100000)"),
    ("--max-queued-bytes", "int", ("ERPY_NODE_MAX_QUEUED_BYTES", DEFAULT_MAX_QUEUED_BYTES),
     "bytes of unread messages one mailbox may hold; more are dropped (env ERPY_NODE_MAX_QUEUED_BYTES; "
     "default 1 GiB)"),
    ("--max-send-queue", "int", ("ERPY_NODE_MAX_SEND_QUEUE", DEFAULT_MAX_SEND_QUEUE),
     "bytes sent to a node that has not read them, beyond which it is disconnected (env "
     "ERPY_NODE_MAX_SEND_QUEUE; default 256 MiB)"),
    ("--ssl-dist-optfile", "str", None,
     "TLS distribution configured by this ssl_dist options file, as erl -ssl_dist_optfile (env ERPY_SSL_DIST_OPTFILE)"),
    ("--tls-cert", "str", None, "TLS distribution with this certificate (PEM), both directions (env ERPY_TLS_CERT)"),
    ("--tls-key", "str", None, "its private key (PEM; default: in --tls-cert) (env ERPY_TLS_KEY)"),
    ("--tls-ca", "str", None, "CA certificates (PEM) peers' certificates must chain to (env ERPY_TLS_CA)"),
    ("--tls-verify", "str", None, "peer (default with --tls-ca) or none (env ERPY_TLS_VERIFY)"),
    ("--no-start-epmd", "false", None, "fail if no epmd runs instead of starting one (as erl -start_epmd false)"),
    ("--exit-on-eof", "true", False, "stop when stdin closes (for nodes started by Erlang ports)"),
)


def _cli_dest(flag: str) -> str:
    return "start_epmd" if flag == "--no-start-epmd" else flag[2:].replace("-", "_")


def _cli_default(kind: str, default: Any) -> Any:
    if kind == "int" and type(default) is tuple:
        return int(_env(default[0], default=str(default[1])))
    if kind == "false":
        return True
    return list(default) if type(default) is list else default


def _cli_parser() -> Any:
    import argparse
    p = argparse.ArgumentParser(prog="python3 -m erpy.node",
                                description="Run this Python as an Erlang node (see doc/node.md).")
    for flag, kind, default, text in _CLI:
        kw: dict = {"dest": _cli_dest(flag), "help": text, "default": _cli_default(kind, default)}
        if kind == "int":
            kw["type"] = int
        elif kind == "append":
            kw["action"] = "append"
        elif kind == "true":
            kw["action"] = "store_true"
        elif kind == "false":
            kw["action"] = "store_false"
        p.add_argument(flag, **kw)
    return p


class _Options:
    """The parsed command line (types.SimpleNamespace's job, without importing types)."""


def _cli_plain(argv: list[str]) -> Any:
    """The options of a command line made only of _CLI's flags, each spelled out (a value
    in the next argument, not starting with "-"); None for any other."""
    kinds = {flag: kind for flag, kind, _, _ in _CLI}
    a = _Options()
    for f, k, d, _ in _CLI:
        setattr(a, _cli_dest(f), _cli_default(k, d))
    i = 0
    while i < len(argv):
        kind = kinds.get(argv[i])
        if kind is None:
            return None
        dest = _cli_dest(argv[i])
        if kind in ("true", "false"):
            setattr(a, dest, kind == "true")
            i += 1
            continue
        if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
            return None
        value = argv[i + 1]
        if kind == "int":
            try:
                value = int(value)
            except ValueError:
                return None
        if kind == "append":
            value = (getattr(a, dest) or []) + [value]
        setattr(a, dest, value)
        i += 2
    return a


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    a = _cli_plain(args)
    if a is None:
        a = _cli_parser().parse_args(args)

    def error(message: str) -> None:
        _cli_parser().error(message)

    name = a.name or _env("ERPY_NODE_NAME", "BPY_BEAM_NODE")
    if not name:
        error("--name (or ERPY_NODE_NAME) is required")
    if "@" not in name:
        name = f"{name}@{_env('BPY_BEAM_HOST', default='127.0.0.1')}"
    cookie = a.cookie or _env("ERPY_COOKIE", "BPY_BEAM_COOKIE")
    if not cookie:
        error("--cookie (or ERPY_COOKIE) is required")
    listen = a.listen or _env("ERPY_NODE_LISTEN", "BPY_BEAM_HOST", default="127.0.0.1")
    if listen == "localhost":
        listen = "127.0.0.1"
    port = a.port if a.port is not None else int(_env("ERPY_NODE_PORT", "BPY_BEAM_PORT", default="0"))
    allow_lists = a.allow if a.allow is not None else [_env("ERPY_NODE_ALLOW", default="")]
    allow = [m for item in allow_lists for m in item.split(",")]
    allow_code = a.allow_code if a.allow_code is not None else _env("ERPY_NODE_ALLOW_CODE") in ("1", "true", "yes")

    node = Node(name, cookie, host=listen, port=port, allow=allow, allow_code=bool(allow_code),
                ticktime=a.ticktime, spin_us=a.spin_us, coalesce_us=a.coalesce_us,
                start_epmd=a.start_epmd, max_message_size=a.max_message_size,
                max_queued_messages=a.max_queued_messages, max_queued_bytes=a.max_queued_bytes,
                max_send_queue=a.max_send_queue,
                tls={k: v for k in ("ssl_dist_optfile", "tls_cert", "tls_key", "tls_ca", "tls_verify")
                     if (v := getattr(a, k) or _env("ERPY_" + k.upper()))})
    node.start()
    if a.load:
        import importlib
        for mod in a.load:
            m = importlib.import_module(mod)
            setup = getattr(m, "erpy_setup", None)
            if callable(setup):
                setup(node)
        if "threading" in sys.modules:
            _threading()
    for peer in a.connect:
        # The node that started this one (a node pool's VM) is connected from here, at
        # once: its own connect would first start its resolver. If this fails (another
        # distribution protocol, say), it connects as it would anyway.
        try:
            node.ping(peer)
        except Exception:  # noqa: BLE001 - a bad name too: the peer still connects
            pass
    # What a node pool waits for (its start is the pool's): _thread and _signal rather
    # than threading and signal, which import much more. `stop` is held until a signal or
    # the end of stdin releases it (threading.Event's job).
    import _signal
    stop = _thread.allocate_lock()
    stop.acquire()

    def set_stop(*_: Any) -> None:
        try:
            stop.release()
        except RuntimeError:  # already released
            pass

    for sig in (_signal.SIGTERM, _signal.SIGINT):
        _signal.signal(sig, set_stop)
    if a.exit_on_eof:
        def watch() -> None:
            try:
                while sys.stdin.buffer.read(4096):
                    pass
            finally:
                set_stop()
        _thread.start_new_thread(watch, ())  # a daemon thread
    print(f"erpy.node {node.name} ready on port {node.port}", flush=True)
    try:
        while not stop.acquire(timeout=0.5):
            pass
    finally:
        # A handler that never returns (one that swallows every interrupt) must not keep
        # the process alive once it was told to stop: stop() gets two seconds.
        def deadline() -> None:
            time.sleep(2.0)
            os._exit(0)
        _thread.start_new_thread(deadline, ())
        node.stop()
    return 0

