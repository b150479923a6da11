"""erpy.port: a Python program behind an Erlang port, answering by handler name.

An Erlang port opened with ``{packet, N}`` (N = 1, 2 or 4) writes each message as an
N-byte big-endian length and that many bytes; here, each message is one term in the
external format (``term_to_binary``), read and written with erpy's codec. Subclass
:class:`Protocol`, give it ``handler_<name>`` methods (or :meth:`Protocol.register`
functions) and call :meth:`Protocol.run`::

    from erpy.port import Protocol

    class MyProtocol(Protocol):
        def handler_twice(self, x):
            return 2 * int(x)

    if __name__ == '__main__':
        MyProtocol(packet=2).run()

What a request may be, and what answers it:

- BERT-RPC's ``{call, Module, Function, Args}``: ``{reply, Result}``, or ``{error,
  {Type, Code, Class, Detail, Backtrace}}`` (``user``/0 for an exception in the handler,
  ``server``/1 for a module the protocol does not serve, ``server``/2 for no handler of
  that name and arity, ``server``/0 for a result that cannot be encoded or framed,
  ``protocol``/2 for a frame that is no term, ``protocol``/0 for a term that is no
  request). ``{cast, M, F, A}``: ``{noreply}`` at once, then the handler runs.
  ``{info, ...}``: no answer (BERT-RPC's info packets).
- any other tuple ``{Name, Arg1, ...}`` (the form of the port programs of old, such as
  ``{twice, 3}``): the handler's result itself, or the same ``{error, {...}}``.

A bad frame or request is answered and the loop goes on; the loop ends when stdin
closes. ``erpy_port_program`` (``mode => program`` pools) runs such scripts under
supervision; a plain ``open_port({spawn, Script}, [{packet, N}, binary])`` works too.
"""

from __future__ import annotations

import inspect
import os
import sys
import traceback
from typing import Any, Callable

from . import DecodeError, decode, encode
from ._types import Atom

__all__ = ["Port", "Protocol", "BertError"]

_HEADER = {1: 1, 2: 2, 4: 4}


class BertError(Exception):
    """Raised by a handler to answer ``{error, {Type, Code, Class, Detail, Backtrace}}``
    with its own type and code (``BertError('user', 3, 'NotFound', 'no such item')``)."""

    def __init__(self, type_: str, code: int, cls: str, detail: str) -> None:
        super().__init__(detail)
        self.type, self.code, self.cls, self.detail = type_, code, cls, detail


class Port:
    """Frames on two fds, ``{packet, N}`` style (N = 1, 2, 4), one term each.

    With the default fds (stdin, stdout) the channel is taken over: fd 1 then points at
    stderr and fd 0 at /dev/null, so that a stray ``print()`` or ``input()`` cannot
    corrupt or steal a frame."""

    def __init__(self, packet: int = 2, in_fd: int | None = None, out_fd: int | None = None,
                 *, binary: str = "str", none: str = "undefined",
                 max_size: int | None = None) -> None:
        if packet not in _HEADER:
            raise ValueError(f"packet must be 1, 2 or 4, not {packet!r}")
        self.packet = packet
        self.max_frame = (1 << (8 * packet)) - 1
        if max_size is not None:
            self.max_frame = min(self.max_frame, max_size)
        self._binary, self._none = binary, none
        if in_fd is None:
            in_fd = os.dup(0)
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.close(devnull)
        if out_fd is None:
            sys.stdout.flush()
            out_fd = os.dup(1)
            os.dup2(2, 1)
        self.in_fd, self.out_fd = in_fd, out_fd

    def _read_exact(self, n: int) -> bytes:
        chunks, left = [], n
        while left:
            buf = os.read(self.in_fd, min(left, 1 << 20))
            if not buf:
                raise EOFError("the port closed" if left == n else
                               f"the port closed {n - left} bytes into a {n}-byte read")
            chunks.append(buf)
            left -= len(buf)
        return b"".join(chunks)

    def read_frame(self) -> bytes:
        """The next frame's bytes; EOFError when the port closes."""
        size = int.from_bytes(self._read_exact(self.packet), "big")
        return self._read_exact(size) if size else b""

    def read(self) -> Any:
        """The next frame's term; DecodeError if it holds none, EOFError at the end."""
        return decode(self.read_frame(), binary=self._binary, none=self._none)

    def write_frame(self, data: bytes) -> None:
        if len(data) > self.max_frame:
            raise ValueError(f"a frame of {len(data)} bytes is over the {{packet, "
                             f"{self.packet}}} limit of {self.max_frame}")
        view = memoryview(len(data).to_bytes(self.packet, "big") + data)
        while view:
            n = os.write(self.out_fd, view)
            view = view[n:]

    def write(self, term: Any) -> None:
        self.write_frame(encode(term, none=self._none))

    def close(self) -> None:
        for fd in (self.in_fd, self.out_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def _error(type_: str, code: int, cls: str, detail: str, backtrace: list | None = None) -> tuple:
    return (Atom("error"), (Atom(type_), code, cls, detail, backtrace or []))


def _name(value: Any) -> str | None:
    if isinstance(value, str):
        return str(value)
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return None
    if isinstance(value, list) and all(type(c) is int and 0 <= c < 0x110000 for c in value):
        return "".join(map(chr, value))  # an Erlang string
    return None


class Protocol:
    """The request loop of a port program: dispatch by name, BERT-RPC answers.

    Handlers: functions registered with :meth:`register` (for any module, or for one),
    then methods ``handler_<name>``. ``modules``: the BERT-RPC modules served (None:
    any). ``packet``: the port's ``{packet, N}`` (2, as the programs of old, unless the
    subclass or the constructor says otherwise)."""

    packet: int = 2
    modules: Any = None

    def __init__(self, port: Port | None = None, *, packet: int | None = None) -> None:
        self.port = port if port is not None else Port(packet or self.packet)
        self._handlers: dict[tuple[str | None, str], Callable] = {}
        self._signatures: dict[Any, Any] = {}

    def register(self, name: str, fn: Callable | None = None, *, module: str | None = None) -> Any:
        """Makes ``fn`` the handler of ``name`` (for BERT-RPC calls into ``module`` only,
        if given). Usable as a decorator: ``@proto.register('sum')``."""
        def add(f: Callable) -> Callable:
            self._handlers[(module, name)] = f
            return f
        return add(fn) if fn is not None else add

    def handler(self, name: str, module: str | None = None) -> Callable | None:
        """The handler of ``name`` (for ``module``), or None."""
        f = self._handlers.get((module, name)) if module is not None else None
        if f is None:
            f = self._handlers.get((None, name))
        if f is None:
            f = getattr(self, "handler_" + name, None)
        return f if callable(f) else None

    def _arity_ok(self, fn: Callable, args: list) -> bool:
        sig = self._signatures.get(fn)
        if sig is None:
            try:
                sig = inspect.signature(fn)
            except (TypeError, ValueError):  # a builtin without a signature: let it say
                return True
            self._signatures[fn] = sig
        try:
            sig.bind(*args)
            return True
        except TypeError:
            return False

    def _apply(self, module: str | None, name: Any, args: Any) -> tuple:
        """(True, result) or (False, error answer)."""
        fname = _name(name)
        if fname is None:
            return False, _error("server", 2, "NameError", f"no handler named {name!r}")
        if not isinstance(args, list):
            return False, _error("protocol", 0, "TypeError",
                                 f"the arguments must be a list, not {type(args).__name__}")
        if module is not None and self.modules is not None and module not in self.modules:
            return False, _error("server", 1, "NameError", f"no module {module!r}")
        fn = self.handler(fname, module)
        if fn is None:
            return False, _error("server", 2, "NameError", f"no handler {fname!r}")
        if not self._arity_ok(fn, args):
            return False, _error("server", 2, "TypeError",
                                 f"no handler {fname}/{len(args)} (wrong number of arguments)")
        try:
            return True, fn(*args)
        except BertError as e:
            return False, _error(e.type, e.code, e.cls, e.detail)
        except Exception as e:  # noqa: BLE001 - the caller gets it as a BERT-RPC error
            return False, _error("user", 0, type(e).__name__, str(e),
                                 traceback.format_exception(e))

    def handle(self, message: Any) -> tuple[bool, Any]:
        """(answer?, answer) for one request term."""
        if type(message) is tuple and message:
            tag = message[0]
            if tag == "call" and len(message) == 4 and isinstance(message[1], str):
                ok, value = self._apply(str(message[1]), message[2], message[3])
                return True, (Atom("reply"), value) if ok else value
            if tag == "cast" and len(message) == 4 and isinstance(message[1], str):
                return True, (Atom("noreply"),)
            if tag == "info" and isinstance(tag, Atom):
                return False, None
            if _name(tag) is not None and not isinstance(tag, list):
                ok, value = self._apply(None, tag, list(message[1:]))
                return True, value
        return True, _error("protocol", 0, "BadRequest", f"not a request: {message!r:.200}")

    def _answer(self, answer: Any) -> None:
        try:
            self.port.write(answer)
        except Exception as e:  # noqa: BLE001 - an unencodable or oversized result
            self.port.write(_error("server", 0, type(e).__name__, str(e)))

    def run(self) -> None:
        """Answers requests until the port closes."""
        while True:
            try:
                frame = self.port.read_frame()
            except EOFError:
                return
            try:
                message = decode(frame, binary=self.port._binary, none=self.port._none)
            except DecodeError as e:
                self._answer(_error("protocol", 2, "DecodeError", str(e)))
                continue
            reply, answer = self.handle(message)
            if reply:
                self._answer(answer)
            if type(message) is tuple and len(message) == 4 and message[0] == "cast" \
                    and isinstance(message[1], str):
                # Answered already ({noreply}): now the work, whose result nobody waits for.
                ok, value = self._apply(str(message[1]), message[2], message[3])
                if not ok:
                    print(f"erpy.port: cast {message[1]}:{message[2]} failed: {value!r}",
                          file=sys.stderr)
