"""Calling back into Erlang from Python code that erpy runs.

Inside ``erpy:run/1,2`` snippets this module is the ``erlang`` variable; elsewhere import
it: ``from erpy import erlang``.

- ``erlang.call(module, function, arg)`` runs ``Module:Function(Arg)`` with one term.
- ``erlang.apply(module, function, [a1, ...])`` runs ``apply(Module, Function, Args)``.
- ``erlang.send(pid_or_name, term)`` sends a message (no answer).
- ``erlang.self()`` is the pid of the Erlang process the code runs for (the caller).
- ``await erlang.acall(module, function, arg)`` and ``await erlang.aapply(...)``: the same
  from a coroutine (a request whose result is awaitable runs on an event loop of its
  worker; see erpy._aio). The event loop waits while Erlang works.

Only what the pool's allow-list permits may be called; everything else raises
``ErlangError``. The exceptions are the seed's (erl_py_runner) names.
"""

from __future__ import annotations

import sys
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

from ._errors import ErpyError

__all__ = ["call", "apply", "send", "self", "acall", "aapply", "ErlangError", "ErlangTimeoutError",
           "ErlangPortError"]


class ErlangError(ErpyError):
    """The Erlang call failed (an exception, or not allowed); ``args[0]`` is Erlang's reason."""


class ErlangTimeoutError(ErlangError, TimeoutError):
    """The request this code runs for timed out (or was cancelled) while Erlang worked."""


class ErlangPortError(ErlangError):
    """There is no Erlang to talk to (not running under erpy, or the port closed)."""


def call(module: str, function: str, arg: Any) -> Any:
    """``Module:Function(Arg)`` in Erlang; returns its result."""
    return _backend().erlang_call(module, function, arg)


def apply(module: str, function: str, args: list) -> Any:  # noqa: A001 - Erlang's name
    """``apply(Module, Function, Args)`` in Erlang; returns its result."""
    return _backend().erlang_apply(module, function, list(args))


def send(dest: Any, message: Any) -> None:
    """Sends ``message`` to a pid (``erpy.Pid``) or a registered name."""
    _backend().erlang_send(dest, message)


async def acall(module: str, function: str, arg: Any) -> Any:
    """``await erlang.acall(m, f, arg)``: :func:`call` from a coroutine."""
    return _backend().erlang_call(module, function, arg)


async def aapply(module: str, function: str, args: list) -> Any:
    """``await erlang.aapply(m, f, args)``: :func:`apply` from a coroutine."""
    return _backend().erlang_apply(module, function, list(args))


def self() -> Any:  # noqa: A001 - Erlang's name
    """The pid of the Erlang process this code runs for."""
    return _backend().erlang_self()


# Set by erpy.node: returns the backend for code a node pool runs (its caller), or None.
_node_backend: Any = None


def _backend() -> Any:
    if _node_backend is not None:
        caller = _node_backend()
        if caller is not None:
            return caller
    # Inside the VM (embedded mode) the NIF provides erpy._embedded; in a port worker the
    # extension module serves the port protocol.
    embedded = sys.modules.get("erpy._embedded")
    if embedded is not None:
        return embedded
    from . import _native
    return _native
