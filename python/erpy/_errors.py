"""Exceptions of the erpy codec.

Each inherits both erpy's base class and the builtin a caller would expect, so code that
catches ``ValueError`` around a parser keeps working (as msgpack does).
"""

from __future__ import annotations

__all__ = ["ErpyError", "DecodeError", "EncodeError"]


class ErpyError(Exception):
    """Base class of every erpy error."""


class DecodeError(ValueError, ErpyError):
    """Input that is not one well-formed external term.

    ``offset`` is the byte position where the problem was found (for a compressed term:
    the position in the inflated data).
    """

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.offset = offset


class EncodeError(TypeError, ErpyError):
    """A value that has no external term form; the message says what and where."""
