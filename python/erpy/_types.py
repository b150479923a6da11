"""Python values for the Erlang terms that have no builtin Python counterpart.

Pure Python on purpose: the C++ conversion layer receives these classes when it is set up
(by the extension module at import, by the port worker, by the C++ tests), so there is one
definition of each.
"""

from __future__ import annotations

# typing costs a third of erpy's import time and annotations are strings here, so it
# is only imported for type checkers.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

__all__ = [
    "Atom", "BitBinary", "ImproperList", "Pid", "Port", "Ref", "Fun",
    "FrozenList", "FrozenMap", "FrozenImproperList", "Key",
    "register_encoder", "ENCODERS",
]

# class -> function(obj) returning an encodable object. The encoder reads this very dict.
ENCODERS: dict[type, Callable[[Any], Any]] = {}


def register_encoder(cls: type, fn: Callable[[Any], Any]) -> None:
    """Encode instances of ``cls`` (and of its subclasses) as whatever ``fn(obj)`` returns.

    Looked up by exact type first, then along the MRO, after the builtin types that erpy
    maps itself (an exact ``int`` or ``dict`` never reaches a custom encoder).
    """
    if not isinstance(cls, type):
        raise TypeError(f"register_encoder: cls must be a class, not {type(cls).__name__}")
    if not callable(fn):
        raise TypeError(f"register_encoder: fn must be callable, not {type(fn).__name__}")
    ENCODERS[cls] = fn


class Atom(str):
    """An Erlang atom. A ``str``, so ``Atom('ok') == 'ok'``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Atom({str.__repr__(self)})"


def _atom(node: Any, what: str) -> Atom:
    if not isinstance(node, str):
        raise TypeError(f"{what}: node must be a str, not {type(node).__name__}")
    return node if type(node) is Atom else Atom(node)


def _uint(value: Any, bits: int, what: str) -> int:
    if type(value) is not int and not (isinstance(value, int) and not isinstance(value, bool)):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value < (1 << bits):
        raise ValueError(f"{what} must be in 0..{(1 << bits) - 1}, got {value}")
    return int(value)


class _Frozen:
    """Immutable, hashable value objects compared by their fields."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def _key(self) -> tuple:
        return tuple(getattr(self, f) for f in self._fields)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._key() == other._key()  # type: ignore[attr-defined]

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return hash((type(self).__name__,) + self._key())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(repr(v) for v in self._key())})"

    def __reduce__(self):
        return (type(self), self._key())


class Pid(_Frozen):
    """An Erlang process identifier."""

    __slots__ = ("node", "id", "serial", "creation")
    _fields = __slots__

    node: Atom
    id: int
    serial: int
    creation: int

    def __init__(self, node: str, id: int, serial: int, creation: int) -> None:
        s = object.__setattr__
        s(self, "node", _atom(node, "Pid"))
        s(self, "id", _uint(id, 32, "Pid.id"))
        s(self, "serial", _uint(serial, 32, "Pid.serial"))
        s(self, "creation", _uint(creation, 32, "Pid.creation"))

    def __repr__(self) -> str:
        return f"Pid({str(self.node)!r}, {self.id}, {self.serial}, {self.creation})"


class Port(_Frozen):
    """An Erlang port identifier."""

    __slots__ = ("node", "id", "creation")
    _fields = __slots__

    node: Atom
    id: int
    creation: int

    def __init__(self, node: str, id: int, creation: int) -> None:
        s = object.__setattr__
        s(self, "node", _atom(node, "Port"))
        s(self, "id", _uint(id, 64, "Port.id"))
        s(self, "creation", _uint(creation, 32, "Port.creation"))

    def __repr__(self) -> str:
        return f"Port({str(self.node)!r}, {self.id}, {self.creation})"


class Ref(_Frozen):
    """An Erlang reference: node, creation and 1..5 id words."""

    __slots__ = ("node", "creation", "ids")
    _fields = __slots__

    node: Atom
    creation: int
    ids: tuple[int, ...]

    def __init__(self, node: str, creation: int, ids: tuple[int, ...]) -> None:
        ids = tuple(ids)
        if not 1 <= len(ids) <= 5:
            raise ValueError(f"Ref: ids must hold 1..5 words, got {len(ids)}")
        s = object.__setattr__
        s(self, "node", _atom(node, "Ref"))
        s(self, "creation", _uint(creation, 32, "Ref.creation"))
        s(self, "ids", tuple(_uint(i, 32, "Ref.ids[]") for i in ids))

    def __repr__(self) -> str:
        return f"Ref({str(self.node)!r}, {self.creation}, {self.ids!r})"


class Fun(_Frozen):
    """An Erlang fun, kept as its encoded bytes (tag included) and re-encoded verbatim."""

    __slots__ = ("data",)
    _fields = __slots__

    data: bytes

    def __init__(self, data: bytes) -> None:
        data = bytes(data)
        if not data or data[0] not in (112, 113, 117):
            raise ValueError("Fun: data must be an encoded fun (tag 112, 113 or 117)")
        object.__setattr__(self, "data", data)

    def __repr__(self) -> str:
        return f"Fun(<{len(self.data)} bytes>)"


class BitBinary(_Frozen):
    """An Erlang bitstring: ``data`` whose last byte holds ``bits`` (1..8) used bits.

    The unused low bits of the last byte are cleared, so equal bitstrings compare equal.
    """

    __slots__ = ("data", "bits")
    _fields = __slots__

    data: bytes
    bits: int

    def __init__(self, data: bytes, bits: int) -> None:
        data = bytes(data)
        if type(bits) is not int or not 1 <= bits <= 8:
            raise ValueError(f"BitBinary: bits must be an int in 1..8, got {bits!r}")
        if not data and bits != 8:
            raise ValueError("BitBinary: empty data needs bits=8")
        if bits != 8:
            data = data[:-1] + bytes([data[-1] & (0xFF << (8 - bits)) & 0xFF])
        s = object.__setattr__
        s(self, "data", data)
        s(self, "bits", bits)

    def __len__(self) -> int:
        """Length in bits."""
        return 0 if not self.data else (len(self.data) - 1) * 8 + self.bits


class ImproperList:
    """An Erlang list whose tail is not ``[]``: ``[1, 2 | tail]``.

    ``elements`` is a non-empty list and ``tail`` anything but a list.
    """

    __slots__ = ("elements", "tail")

    elements: list
    tail: Any

    def __init__(self, elements: list, tail: Any) -> None:
        elements = list(elements)
        if not elements:
            raise ValueError("ImproperList: elements must not be empty")
        if isinstance(tail, (list, ImproperList)):
            raise ValueError("ImproperList: tail must not be a list (append it to the elements)")
        self.elements = elements
        self.tail = tail

    def __eq__(self, other: object) -> bool:
        if type(other) is not ImproperList:
            return NotImplemented
        return self.elements == other.elements and self.tail == other.tail

    __hash__ = None  # type: ignore[assignment]  # holds a list: mutable

    def __repr__(self) -> str:
        return f"ImproperList({self.elements!r}, {self.tail!r})"


# ---- map keys -----------------------------------------------------------------------------
#
# An Erlang map key may be any term, but a dict key must be hashable: a list (every Erlang
# string is one), a map or an improper list cannot be one. Such a key decodes to the
# frozen form of the same term, at every level of it (tuples hold frozen forms too):
# immutable, hashable, equal by value to each other and to the mutable forms, and encoded
# exactly as the mutable form is (a FrozenList of bytes is a STRING_EXT, as the list is).
# Only keys take these forms; values stay lists, dicts and ImproperLists.
#
# Their contents must be hashable (erpy.freeze makes them so), and each hash is computed
# once, when the object is made from its (already frozen) parts: hashing a key nested
# thousands of levels deep then never recurses.
#
# Keys that are different terms but equal in Python (1 and 1.0, ok and <<"ok">>) are
# erpy.Key, at the end of this file.


def _immutable(self: Any, name: str, value: Any = None) -> None:
    raise AttributeError(f"{type(self).__name__} is immutable")


def _frozen_equal(a: Any, b: Any) -> bool:
    """``a == b`` for frozen forms, walked with a stack instead of recursion.

    Two map keys with equal hashes are compared, and keys may nest as deep as ``max_depth``
    (2000): Python's own comparison would stop with a RecursionError a few hundred levels
    down. Unequal hashes settle most comparisons without walking the contents.
    """
    stack = [(a, b)]
    pop, push, extend = stack.pop, stack.append, stack.extend
    while stack:
        x, y = pop()
        if x is y:
            continue
        t = type(x)
        if t is not type(y):
            t = _frozen_kind(x)
            if t is None or t is not _frozen_kind(y):
                if not x == y:  # 1 and 1.0, a FrozenList and a list: their own rules
                    return False
                continue
        if t is tuple:
            if len(x) != len(y):
                return False
            extend(zip(x, y))
        elif t is FrozenList:
            if x._hash != y._hash or len(x._items) != len(y._items):
                return False
            extend(zip(x._items, y._items))
        elif t is FrozenImproperList:
            if x._hash != y._hash or len(x.elements) != len(y.elements):
                return False
            push((x.tail, y.tail))
            extend(zip(x.elements, y.elements))
        elif t is FrozenMap:
            if x._hash != y._hash or len(x._map) != len(y._map):
                return False
            other = y._map
            for k, v in x._map.items():
                w = other.get(k, _MISSING)
                if w is _MISSING:
                    return False
                push((v, w))
        elif not x == y:
            return False
    return True


_MISSING = object()


def _frozen_kind(x: Any) -> type | None:
    for kind in (tuple, FrozenList, FrozenMap, FrozenImproperList):
        if isinstance(x, kind):
            return kind
    return None


class FrozenList:
    """An Erlang list as a map key: an immutable, hashable sequence.

    ``erpy.decode`` gives ``{FrozenList([110, 97, 109, 101]): 1}`` for ``#{"name" => 1}``.
    Equal to another FrozenList, or to a list, with equal items; never to a tuple (Erlang's
    ``{1, 2}`` and ``[1, 2]`` are different keys).
    """

    __slots__ = ("_items", "_hash")

    _items: tuple

    def __init__(self, items: Any = ()) -> None:
        items = tuple(items)
        object.__setattr__(self, "_items", items)
        object.__setattr__(self, "_hash", hash((FrozenList, items)))

    __setattr__ = _immutable
    __delattr__ = _immutable

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Any:
        return iter(self._items)

    def __reversed__(self) -> Any:
        return reversed(self._items)

    def __contains__(self, value: object) -> bool:
        return value in self._items

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return FrozenList(self._items[index])
        return self._items[index]

    def index(self, value: Any, *args: Any) -> int:
        return self._items.index(value, *args)

    def count(self, value: Any) -> int:
        return self._items.count(value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenList):
            return _frozen_equal(self, other)
        if isinstance(other, list):
            return list(self._items) == other
        return NotImplemented

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenList({list(self._items)!r})"

    def __reduce__(self):
        return (FrozenList, (self._items,))


class FrozenMap:
    """An Erlang map as a map key: an immutable, hashable mapping (insertion order kept).

    Equal to another FrozenMap, or to a dict, with equal items.
    """

    __slots__ = ("_map", "_hash")

    _map: dict

    def __init__(self, items: Any = ()) -> None:
        m = dict(items)
        object.__setattr__(self, "_map", m)
        object.__setattr__(self, "_hash", hash((FrozenMap, frozenset(m.items()))))

    __setattr__ = _immutable
    __delattr__ = _immutable

    def __len__(self) -> int:
        return len(self._map)

    def __iter__(self) -> Any:
        return iter(self._map)

    def __contains__(self, key: object) -> bool:
        return key in self._map

    def __getitem__(self, key: Any) -> Any:
        return self._map[key]

    def get(self, key: Any, default: Any = None) -> Any:
        return self._map.get(key, default)

    def keys(self) -> Any:
        return self._map.keys()

    def values(self) -> Any:
        return self._map.values()

    def items(self) -> Any:
        return self._map.items()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenMap):
            return _frozen_equal(self, other)
        if isinstance(other, dict):
            return self._map == other
        return NotImplemented

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenMap({self._map!r})"

    def __reduce__(self):
        return (FrozenMap, (self._map,))


_LISTS = (list, FrozenList, ImproperList)


class FrozenImproperList:
    """An Erlang improper list as a map key: ``elements`` (a non-empty tuple) and ``tail``.

    Equal to another FrozenImproperList, or to an ImproperList, with equal parts.
    """

    __slots__ = ("elements", "tail", "_hash")

    elements: tuple
    tail: Any

    def __init__(self, elements: Any, tail: Any) -> None:
        elements = tuple(elements)
        if not elements:
            raise ValueError("FrozenImproperList: elements must not be empty")
        if isinstance(tail, (*_LISTS, FrozenImproperList)):
            raise ValueError("FrozenImproperList: tail must not be a list (append it to the elements)")
        object.__setattr__(self, "elements", elements)
        object.__setattr__(self, "tail", tail)
        object.__setattr__(self, "_hash", hash((FrozenImproperList, elements, tail)))

    __setattr__ = _immutable
    __delattr__ = _immutable

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FrozenImproperList):
            return _frozen_equal(self, other)
        if isinstance(other, ImproperList):
            return list(self.elements) == other.elements and self.tail == other.tail
        return NotImplemented

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenImproperList({list(self.elements)!r}, {self.tail!r})"

    def __reduce__(self):
        return (FrozenImproperList, (self.elements, self.tail))


class Key:
    """A map key compared as an Erlang term: by its type and value, not by Python's ``==``.

    Some different Erlang terms are equal in Python: ``1`` and ``1.0``, ``true`` and ``1``,
    the atom ``ok`` and the binary ``<<"ok">>`` (``Atom('ok') == 'ok'``), ``[1]`` and
    ``[1.0]``. A dict cannot hold two such keys, so when a decoded map has keys that are
    equal in Python, every one of them is wrapped (whatever the map's order) and the other
    keys stay as they are: ``#{1 => a, 1.0 => b, 2 => c}`` decodes to
    ``{Key(1): Atom('a'), Key(1.0): Atom('b'), 2: Atom('c')}``; look them up with
    ``d[erpy.Key(1.0)]``. A Key encodes as its ``value``.

    Two Keys are equal when their values are the same Erlang term (``Key('ok') ==
    Key(b'ok')``, both the binary; ``Key(1) != Key(1.0)``). A Key is never equal to a
    bare value. ``value`` is held in its frozen form (see ``erpy.freeze``) and must be
    encodable.
    """

    __slots__ = ("value", "_exact", "_hash")

    value: Any

    def __init__(self, value: Any) -> None:
        from ._native import _key_parts  # the codec imports this module first

        if isinstance(value, Key):
            value = value.value
        frozen, exact = _key_parts(value)
        _fill_key(self, frozen, exact)

    @classmethod
    def _made(cls, value: Any, exact: bytes) -> Key:
        """For the codec, which has frozen ``value`` and encoded it exactly already."""
        self = object.__new__(cls)
        _fill_key(self, value, exact)
        return self

    __setattr__ = _immutable
    __delattr__ = _immutable

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Key):
            return self._hash == other._hash and self._exact == other._exact
        return NotImplemented

    def __hash__(self) -> int:
        return self._hash

    def __repr__(self) -> str:
        return f"Key({self.value!r})"

    def __reduce__(self):
        return (Key, (self.value,))


def _fill_key(key: Key, value: Any, exact: bytes) -> None:
    s = object.__setattr__
    s(key, "value", value)
    # The value encoded so that the same term always gives the same bytes (map entries
    # sorted, None apart from every atom): comparing Keys never recurses, however deep.
    s(key, "_exact", exact)
    s(key, "_hash", hash((Key, exact)))
