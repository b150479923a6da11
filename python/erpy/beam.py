"""erpy.beam: Beam-BPy's ``BeamServer`` on erpy's node mode (doc/dropin.md).

A drop-in for users of Beam-BPy (also importable as ``from beam_bpy import
BeamServer``): the same constructor and defaults, ``register_handler(name, fn)``,
``start()`` returning a bool, ``get_address()``, and the same entry points for
Erlang/Elixir, now over a real Erlang node (erpy.node: EPMD, the OTP handshake, rpc)::

    rpc:call('beam_bpy@127.0.0.1', 'Elixir.MyModule', call_handler, ["ping", []])
    rpc:call('beam_bpy@127.0.0.1', 'Elixir.BeamServer', handle_rpc, [Name, Args])

``call_handler`` and ``handle_rpc`` are reached under any module name (the seed's
clients name ``MyModule`` and ``BeamServer``): ``handler(Args)`` runs and its result is
the answer. A name with no handler answers ``{error, <<"Unknown function: Name">>}`` and
a handler that raises ``{error, <<"Type: message">>}``, as the seed did. The name may be
a binary (Elixir), a charlist (Erlang) or an atom. Python's None goes back as ``nil``
(the seed's encoding; ``none=`` to change it).

Settings: arguments given to the constructor, else the environment (``BPY_BEAM_NODE``,
``BPY_BEAM_COOKIE``, ``BPY_BEAM_HOST``, ``BPY_BEAM_PORT``), else the seed's defaults
(``beam_bpy``, ``beam_bpy_cookie``, ``localhost``, 0). The node is named
``NODE@HOST`` (``localhost`` becomes ``127.0.0.1``, the address Erlang's long names and
the seed's Elixir client use) and listens on HOST; a ``node_name`` with ``@`` is taken
whole. Nothing but the handlers is reachable unless ``allow`` lists Python modules.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
from typing import Any, Callable, Dict, Optional

from . import encode as _encode
from . import decode as _decode
from . import node as _node_module
from ._types import Atom

__all__ = ["BeamServer", "get_beam_server", "ErlangVariantEncoder", "ErlangVariantDecoder",
           "ENTRY_POINTS"]

logger = logging.getLogger("beam_bpy")

DEFAULT_NODE = "beam_bpy"
DEFAULT_COOKIE = "beam_bpy_cookie"
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 0
#: The functions Erlang calls, under any module name: Function(Name, Args).
ENTRY_POINTS = ("call_handler", "handle_rpc")


def _setting(given: Any, env: str, default: Any) -> Any:
    if given is not None:
        return given
    value = os.environ.get(env)
    return value if value else default


def _text(name: Any) -> Optional[str]:
    """A handler name from Erlang: binary (Elixir), charlist (Erlang), atom."""
    if isinstance(name, str):
        return str(name)
    if isinstance(name, (bytes, bytearray)):
        return bytes(name).decode("utf-8", "replace")
    if isinstance(name, list) and all(type(c) is int and 0 <= c < 0x110000 for c in name):
        return "".join(map(chr, name))
    return None


def _host_names(host: str) -> tuple:
    """(the host part of the node name, the address to listen on)."""
    if host in ("", "localhost", "127.0.0.1"):
        return "127.0.0.1", "127.0.0.1"
    if host in ("0.0.0.0", "::"):
        fqdn = socket.getfqdn()
        return (fqdn if "." in fqdn else socket.gethostbyname(socket.gethostname())), host
    return host, host


class _BeamNode(_node_module.Node):
    """erpy's node, with the BeamServer's entry points under any module not allowed."""

    def __init__(self, server: "BeamServer", *args: Any, **kwargs: Any) -> None:
        self._server = server
        super().__init__(*args, **kwargs)

    def _resolve(self, module: str, function: str) -> Callable:
        if function in ENTRY_POINTS and not self.allowed(module):
            return self._server.call_handler
        return super()._resolve(module, function)


class BeamServer:
    """Beam-BPy's server: Python handlers that Erlang/Elixir nodes call by name."""

    def __init__(self, node_name: Optional[str] = None, cookie: Optional[str] = None,
                 host: Optional[str] = None, port: Optional[int] = None, *,
                 allow: Any = (), none: str = "nil") -> None:
        self.node_name: str = _setting(node_name, "BPY_BEAM_NODE", DEFAULT_NODE)
        self.cookie: str = _setting(cookie, "BPY_BEAM_COOKIE", DEFAULT_COOKIE)
        self.host: str = _setting(host, "BPY_BEAM_HOST", DEFAULT_HOST)
        self.port: int = int(_setting(port, "BPY_BEAM_PORT", DEFAULT_PORT))
        self.allow = list(allow)
        self.none = none
        name_host, self._listen = _host_names(self.host)
        self.full_name = self.node_name if "@" in self.node_name else f"{self.node_name}@{name_host}"
        self.handlers: Dict[str, Callable[[Any], Any]] = {}
        self._lock = threading.Lock()
        self.node: Optional[_BeamNode] = None
        self.is_running = False
        self.server_thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._atexit = False

    # -- handlers ---------------------------------------------------------------------

    def register_handler(self, function_name: str, handler: Callable[[Any], Any]) -> None:
        """Makes ``handler(args)`` reachable by ``function_name`` (also while running)."""
        with self._lock:
            self.handlers[function_name] = handler
        logger.debug("Registered RPC handler: %s", function_name)

    def unregister_handler(self, function_name: str) -> None:
        with self._lock:
            self.handlers.pop(function_name, None)

    def call_handler(self, name: Any, args: Any = None) -> Any:
        """What Erlang's ``call_handler``/``handle_rpc`` run: the handler of ``name`` on
        ``args``."""
        fname = _text(name)
        with self._lock:
            handler = self.handlers.get(fname) if fname is not None else None
        if handler is None:
            logger.error("Unknown RPC function: %r", name)
            shown = fname if fname is not None else repr(name)
            return (Atom("error"), f"Unknown function: {shown}")
        try:
            result = handler(args)
        except Exception as e:  # noqa: BLE001 - answered as the seed did: {error, Message}
            logger.exception("RPC handler %s failed", fname)
            return (Atom("error"), f"{type(e).__name__}: {e}")
        return self._none(result)

    def _none(self, value: Any) -> Any:
        if value is None:
            return Atom(self.none)
        if self.none == "undefined":
            return value
        t = type(value)
        if t is list:
            return [self._none(v) for v in value]
        if t is tuple:
            return tuple(self._none(v) for v in value)
        if t is dict:
            return {self._none(k): self._none(v) for k, v in value.items()}
        return value

    # -- lifecycle --------------------------------------------------------------------

    def init(self) -> bool:
        """Starts the node (EPMD registration, listening); False (logged) if it cannot."""
        if self.node is not None:
            return True
        try:
            node = _BeamNode(self, self.full_name, self.cookie, host=self._listen,
                             port=self.port, allow=self.allow)
            node.start()
        except Exception as e:  # noqa: BLE001 - the seed's contract: start() says False
            logger.error("Failed to initialize Erlang node %s: %s", self.full_name, e)
            return False
        # The node lives until stop(), not until the main thread ends (erpy.node stops
        # its nodes then): like the seed's server thread, it keeps the process serving.
        _node_module._RUNNING.pop(id(node), None)
        if not self._atexit:
            atexit.register(self._stop_node)
            self._atexit = True
        self.node = node
        self.port = node.port
        logger.info("Erlang node initialized: %s on %s:%d", node.name, self._listen, node.port)
        return True

    def start(self) -> bool:
        """Starts serving in the background; True once the node listens."""
        if self.is_running:
            logger.warning("Server is already running")
            return False
        if not self.init():
            return False
        self._stop.clear()
        self.is_running = True
        self.server_thread = threading.Thread(target=self._stop.wait, name="beam_bpy",
                                              daemon=False)
        self.server_thread.start()
        logger.info("Beam server started")
        return True

    def stop(self) -> None:
        self.is_running = False
        self._stop.set()
        if self.server_thread is not None:
            self.server_thread.join(timeout=5.0)
            self.server_thread = None
        self.finish()
        logger.info("Beam server stopped")

    def finish(self) -> None:
        self._stop_node()

    def _stop_node(self) -> None:
        node, self.node = self.node, None
        if node is not None:
            node.stop()

    def serve_forever(self) -> None:
        """Blocks until stop() (for scripts whose main thread has nothing else to do)."""
        self._stop.wait()

    def is_initialized(self) -> bool:
        return self.node is not None

    def is_connected(self) -> bool:
        return self.node is not None and bool(self.node.nodes())

    def get_address(self) -> str:
        """``NODE@HOST:PORT``: the node name Erlang connects to, and its port."""
        return f"{self.full_name}:{self.port}"


_singleton: Optional[BeamServer] = None
_singleton_lock = threading.Lock()


def get_beam_server() -> BeamServer:
    """The process's one BeamServer (made with the defaults and environment)."""
    global _singleton
    with _singleton_lock:
        if _singleton is None:
            _singleton = BeamServer()
        return _singleton


class ErlangVariantEncoder:
    """The seed's encoder, with erpy's codec: the term's external format (no version
    byte) written to ``buff``; None is ``nil``."""

    @staticmethod
    def encode_variant(buff: Any, value: Any, object_scope: Any = None) -> None:
        buff.write(_encode(value, none="nil")[1:])


class ErlangVariantDecoder:
    """The seed's decoder, with erpy's codec: the term in ``buff`` (bytes, with or
    without the version byte) from ``index``; ``nil`` is None."""

    @staticmethod
    def decode_variant(buff: Any, index: Any = 0, object_scope: Any = None) -> Any:
        data = bytes(buff)[index or 0:]
        if not data.startswith(b"\x83"):
            data = b"\x83" + data
        return _decode(data, none="nil")
