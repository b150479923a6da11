"""erl_py_runner's ``python_modules``: a snippet run with its imports limited.

``erl_py_runner:run/1,2`` runs this when the ``erl_py_runner`` env lists the Python
modules snippets may import (the seed's ``modules_whitelist.python_modules``). As the
seed did, the snippet gets the builtins without ``open``, ``eval``, ``exec``,
``compile``, ``input``, ``breakpoint``, ``exit`` and ``quit``, and an ``__import__`` that
refuses modules not listed (by their top-level name). This narrows mistakes, it does not
contain hostile code (Python sandboxes are escapable): that is the worker process's and
the pool's policy's job (doc/security.md).
"""

from __future__ import annotations

import builtins
from typing import Any

__all__ = ["run_restricted"]

_DENIED = frozenset({"__import__", "breakpoint", "compile", "eval", "exec", "exit", "input",
                     "open", "quit"})
# Compiled snippets by source: erl_py_runner users run the same few snippets again.
_CACHE: dict[str, Any] = {}
_CACHE_MAX = 256


def _compiled(code: str) -> Any:
    obj = _CACHE.get(code)
    if obj is None:
        obj = compile(code, "<erl_py_runner>", "exec")
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[code] = obj
    return obj


def _importer(allowed: frozenset[str]) -> Any:
    real = builtins.__import__

    def restricted_import(name: str, globals: Any = None, locals: Any = None,
                          fromlist: Any = (), level: int = 0) -> Any:
        if level != 0 or name.split(".")[0] not in allowed:
            raise ImportError(f"import of '{name}' is not allowed")
        return real(name, globals, locals, fromlist, level)

    return restricted_import


def run_restricted(request: tuple, erlang: Any) -> Any:
    """Runs ``(code, arguments, modules)``: ``code`` with ``arguments`` and ``erlang`` in
    scope, imports limited to ``modules``; returns what the code left in ``result``."""
    code, arguments, modules = request
    if isinstance(code, (bytes, bytearray)):
        code = bytes(code).decode()
    safe = {k: v for k, v in vars(builtins).items() if k not in _DENIED}
    safe["__import__"] = _importer(frozenset(str(m) for m in modules))
    ns = {"__builtins__": safe, "__name__": "__erpy__", "arguments": arguments,
          "erlang": erlang, "result": None}
    exec(_compiled(code), ns)  # noqa: S102 - running the caller's snippet is the point
    return ns.get("result")
