"""erpy: Erlang terms in Python, and Python for Erlang.

``encode`` and ``decode`` convert between Python values and the Erlang external term
format (ETF); see the type mapping in the project's README.md.
"""

from __future__ import annotations

from ._errors import DecodeError, EncodeError, ErpyError
from ._types import (
    Atom, BitBinary, FrozenImproperList, FrozenList, FrozenMap, Fun, ImproperList, Key, Pid, Port, Ref,
    register_encoder,
)
from ._native import decode, encode, freeze

__version__ = "0.1.0"

__all__ = [
    "encode", "decode", "freeze", "register_encoder",
    "Atom", "BitBinary", "Fun", "ImproperList", "Pid", "Port", "Ref",
    "FrozenList", "FrozenMap", "FrozenImproperList", "Key",
    "ErpyError", "DecodeError", "EncodeError",
    "__version__",
]
