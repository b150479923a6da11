"""Python's stdout and stderr inside the Erlang VM (embedded mode).

The VM owns file descriptors 1 and 2, and a print() there would bypass the logger. So in
embedded mode ``sys.stdout`` and ``sys.stderr`` are line buffers that hand each complete
line to the Erlang logger of the pool whose context wrote it (``erpy._embedded.log``).
Output from threads that are not erpy contexts still goes to the real stream.
"""

from __future__ import annotations

import io
import sys
import threading

from ._types import Atom


class LogStream(io.TextIOBase):
    def __init__(self, name: str, fallback: object) -> None:
        super().__init__()
        self._name = Atom(name)
        self._fallback = fallback
        self._local = threading.local()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return "utf-8"

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        pending = getattr(self._local, "pending", "") + text
        *lines, rest = pending.split("\n")
        self._local.pending = rest
        for line in lines:
            self._emit(line)
        return len(text)

    def flush(self) -> None:
        pending = getattr(self._local, "pending", "")
        if pending:
            self._local.pending = ""
            self._emit(pending)

    def _emit(self, line: str) -> None:
        from . import _embedded  # type: ignore[attr-defined]
        if not _embedded.log(self._name, line):
            try:
                self._fallback.write(line + "\n")
            except Exception:  # noqa: BLE001 - no stream to report it on
                pass


def install() -> None:
    sys.stdout = LogStream("stdout", sys.__stdout__)
    sys.stderr = LogStream("stderr", sys.__stderr__)
