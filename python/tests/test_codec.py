"""The codec's options, custom encoders, types and every error path."""

from __future__ import annotations

import enum
import gc
import math
import resource
import struct
import sys
import time
import tracemalloc
import zlib

import pytest

import erpy
from erpy import (Atom, BitBinary, DecodeError, EncodeError, ErpyError, Fun, ImproperList,
                  Pid, Port, Ref)


def etf(*parts: bytes) -> bytes:
    return b"\x83" + b"".join(parts)


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


SAMPLES = [
    0, -5, 2**100, 1.25, "text", "\u00e9", b"\xff", Atom("ok"), None, True, [], [1, 2],
    [1, "a"], ImproperList([1, 2], Atom("t")), (1, (2, 3)), {"k": [1, {Atom("x"): ()}]},
    BitBinary(b"\xf0", 4), Pid("a@b", 1, 2, 3), Port("a@b", 2**40, 1), Ref("a@b", 7, (1, 2, 3)),
]


# --- round trips ----------------------------------------------------------------------

@pytest.mark.parametrize("value", SAMPLES, ids=repr)
def test_round_trip(value):
    data = erpy.encode(value)
    assert data[0] == 131
    back = erpy.decode(data)
    assert back == value and type(back) is type(value)
    assert erpy.encode(back) == data


def test_decode_accepts_bytes_like():
    data = erpy.encode({"a": [1, 2.5]})
    for view in (data, bytearray(data), memoryview(data)):
        assert erpy.decode(view) == {"a": [1, 2.5]}
    with pytest.raises(TypeError):
        erpy.decode("not bytes")  # type: ignore[arg-type]


def test_bool_is_not_an_int():
    assert erpy.encode([True, False]) == etf(b"l", u32(2), b"w\x04truew\x05falsej")
    assert erpy.encode([1, 0]) == etf(b"k\x00\x02\x01\x00")


def test_only_exact_ints_make_a_string_ext():
    class MyInt(int):
        pass

    assert erpy.encode([MyInt(1)]) == etf(b"l", u32(1), b"a\x01j")
    assert erpy.encode([1, 256]) == etf(b"l", u32(2), b"a\x01b\x00\x00\x01\x00j")


def test_int_subclasses_and_enums():
    class Color(enum.IntEnum):
        RED = 3

    assert erpy.encode(Color.RED) == erpy.encode(3)
    assert erpy.encode(2**70 + 0) == erpy.encode(int(Color.RED) * 0 + 2**70)


def test_atom_type():
    a = erpy.decode(erpy.encode(Atom("ok")))
    assert type(a) is Atom and a == "ok" and repr(a) == "Atom('ok')"
    assert isinstance(a, str) and hash(a) == hash("ok")
    with pytest.raises(AttributeError):
        a.x = 1  # type: ignore[attr-defined]
    # Repeated atoms are one object (a bounded cache on the C++ side).
    xs = erpy.decode(erpy.encode([Atom("same"), Atom("same")]))
    assert xs[0] is xs[1]
    assert erpy.decode(erpy.encode(Atom("same"))) is xs[0]


def test_str_subclass_is_a_binary():
    class S(str):
        pass

    assert erpy.encode(S("x")) == erpy.encode("x")


def test_flattening_of_list_tails():
    # [1 | [2]] written by hand: Erlang would have written [1, 2].
    data = etf(b"l", u32(1), b"a\x01", b"l", u32(1), b"a\x02j")
    assert erpy.decode(data) == [1, 2]
    # [1 | "ab"] (a STRING_EXT tail)
    assert erpy.decode(etf(b"l", u32(1), b"a\x01", b"k\x00\x02ab")) == [1, 97, 98]
    # [1 | [2 | 3]]
    nested = etf(b"l", u32(1), b"a\x01", b"l", u32(1), b"a\x02", b"a\x03")
    assert erpy.decode(nested) == ImproperList([1, 2], 3)


def test_old_forms_decode():
    # ATOM_EXT (latin-1), SMALL_ATOM_EXT, FLOAT_EXT, PID_EXT
    assert erpy.decode(etf(b"d\x00\x02\xfcn")) == Atom("\u00fcn")
    assert erpy.decode(etf(b"s\x02ok")) == Atom("ok")
    text = b"1.50000000000000000000e+00".ljust(31, b"\x00")
    assert erpy.decode(etf(b"c", text)) == 1.5
    old_pid = etf(b"g", b"s\x03a@b", u32(85), u32(3), b"\x02")
    assert erpy.decode(old_pid) == Pid("a@b", 85, 3, 2)
    assert erpy.encode(erpy.decode(old_pid)) == etf(b"X", b"w\x03a@b", u32(85), u32(3), u32(2))


# --- options ----------------------------------------------------------------------------

def test_none_option_both_ways():
    assert erpy.encode(None) == etf(b"w\x09undefined")
    assert erpy.encode(None, none="nil") == etf(b"w\x03nil")
    assert erpy.decode(etf(b"w\x03nil"), none="nil") is None
    assert erpy.decode(etf(b"w\x09undefined"), none="nil") == Atom("undefined")
    # A node that happens to be named like the none atom stays an Atom.
    pid = erpy.decode(erpy.encode(Pid("nil", 1, 0, 0)), none="nil")
    assert type(pid.node) is Atom and pid.node == "nil"


def test_binary_option():
    data = erpy.encode(["abc", b"\xff"])
    assert erpy.decode(data) == ["abc", b"\xff"]
    assert erpy.decode(data, binary="bytes") == [b"abc", b"\xff"]
    with pytest.raises(ValueError):
        erpy.decode(data, binary="text")


def test_bad_arguments():
    with pytest.raises(TypeError):
        erpy.encode(1, nonsense=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        erpy.decode()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        erpy.encode(1, default=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        erpy.encode(None, none="x" * 256)


# --- custom encoders --------------------------------------------------------------------

class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y


class Point3(Point):
    pass


def test_register_encoder_and_mro():
    erpy.register_encoder(Point, lambda p: (Atom("point"), p.x, p.y))
    try:
        assert erpy.decode(erpy.encode([Point(1, 2)])) == [(Atom("point"), 1, 2)]
        assert erpy.decode(erpy.encode(Point3(1, 2))) == (Atom("point"), 1, 2)
        erpy.register_encoder(Point3, lambda p: "p3")
        assert erpy.decode(erpy.encode(Point3(1, 2))) == "p3"
    finally:
        erpy._types.ENCODERS.clear()


def test_encoder_exception_propagates_with_context():
    class Boom(Exception):
        pass

    def bad(p):
        raise Boom("no")

    erpy.register_encoder(Point, bad)
    try:
        with pytest.raises(Boom) as info:
            erpy.encode({"a": [0, Point(1, 2)]})
        notes = getattr(info.value, "__notes__", [])
        assert any("Point" in n and "['a'][1]" in n for n in notes), notes
    finally:
        erpy._types.ENCODERS.clear()


def test_register_encoder_checks_arguments():
    with pytest.raises(TypeError):
        erpy.register_encoder("Point", str)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        erpy.register_encoder(Point, 3)  # type: ignore[arg-type]


def test_default_fallback():
    assert erpy.decode(erpy.encode({1, 2}, default=sorted)) == [1, 2]
    with pytest.raises(EncodeError, match="returned another set"):
        erpy.encode({1}, default=lambda s: set(s))
    with pytest.raises(ZeroDivisionError):
        erpy.encode([{1}], default=lambda s: 1 / 0)


def test_custom_encoder_reentrant_encode():
    erpy.register_encoder(Point, lambda p: erpy.encode((p.x, p.y)))
    try:
        inner = erpy.encode((1, 2))
        assert erpy.decode(erpy.encode([Point(1, 2), "after"])) == [inner, "after"]
    finally:
        erpy._types.ENCODERS.clear()


def test_mutation_by_custom_encoder_is_caught():
    victim: list = []

    def shrink(p):
        victim.clear()
        return 0

    erpy.register_encoder(Point, shrink)
    try:
        victim.extend([Point(0, 0), 1, 2, 3])
        with pytest.raises(EncodeError, match="changed size"):
            erpy.encode(victim)
        d = {"a": Point(0, 0), "b": 2}

        def grow(p):
            d["c"] = 3
            return 0

        erpy.register_encoder(Point, grow)
        with pytest.raises((EncodeError, RuntimeError)):
            erpy.encode(d)
    finally:
        erpy._types.ENCODERS.clear()


# --- encode errors ------------------------------------------------------------------------

def test_encode_error_types():
    assert issubclass(EncodeError, TypeError) and issubclass(EncodeError, ErpyError)
    assert issubclass(DecodeError, ValueError) and issubclass(DecodeError, ErpyError)


def test_unencodable_object_says_what_and_where():
    with pytest.raises(EncodeError) as info:
        erpy.encode([0, 1, 2, {"name": "x", "tags": {1, 2}}])
    assert str(info.value) == "cannot encode object of type set at [3]['tags']"
    with pytest.raises(EncodeError, match=r"cannot encode object of type object$"):
        erpy.encode(object())
    with pytest.raises(EncodeError, match=r"at \[1\]\[0\]<key frozenset\(\{1\}\)>$"):
        erpy.encode((1, [{frozenset([1]): 2}]))
    with pytest.raises(EncodeError, match=r"\.tail"):
        erpy.encode(ImproperList([1], {2}))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf(bad):
    with pytest.raises(EncodeError, match=r"NaN or infinity.* at \[1\]"):
        erpy.encode([1, bad])


def test_atoms_over_255_characters():
    erpy.encode(Atom("\U0001F600" * 255))
    with pytest.raises(EncodeError, match="256 characters"):
        erpy.encode(Atom("a" * 256))
    with pytest.raises(EncodeError):
        erpy.encode(Pid("n" * 256, 1, 0, 0))


def test_lone_surrogates():
    with pytest.raises(EncodeError, match="surrogate"):
        erpy.encode(["ok", "\ud800"])
    with pytest.raises(EncodeError, match="surrogate"):
        erpy.encode(Atom("\udfff"))


def test_self_containing_and_too_deep():
    x: list = []
    x.append(x)
    with pytest.raises(EncodeError, match="deeper than 2000"):
        erpy.encode(x)
    d: dict = {}
    d["d"] = d
    with pytest.raises(EncodeError, match="deeper"):
        erpy.encode(d)
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(EncodeError):
        erpy.encode(deep)
    nested: list = []
    for _ in range(10):
        nested = [nested]
    erpy.encode(nested, max_depth=10)
    with pytest.raises(EncodeError):
        erpy.encode(nested, max_depth=9)


def test_fun_data_is_validated_on_encode():
    with pytest.raises(ValueError):
        Fun(b"garbage")
    with pytest.raises(EncodeError, match="Fun.data"):
        erpy.encode(Fun(b"q" + b"\x00"))


# --- decode errors ------------------------------------------------------------------------

def check_decode_error(data: bytes, offset: int, match: str = "") -> DecodeError:
    with pytest.raises(DecodeError, match=match) as info:
        erpy.decode(data)
    assert info.value.offset == offset, str(info.value)
    assert str(info.value).startswith(f"at byte {offset}: ")
    return info.value


def test_decode_error_offsets():
    check_decode_error(b"", 0, "version")
    check_decode_error(b"\x82a\x01", 0, "version byte 131")
    check_decode_error(etf(b"\x01"), 1, "unknown tag 1")
    check_decode_error(etf(b"h\x02a\x01\x01"), 5, "unknown tag")
    check_decode_error(etf(b"a\x01a\x02"), 3, "after the term")
    check_decode_error(etf(b"F", struct.pack(">d", math.nan)), 1, "NaN")


def test_truncated_at_every_byte():
    for value in SAMPLES + [[{"id": 1, "name": "item", "score": 1.5}] * 3]:
        data = erpy.encode(value)
        for cut in range(len(data)):
            with pytest.raises(DecodeError):
                erpy.decode(data[:cut])


def test_huge_length_fields_fail_fast():
    for data in (etf(b"l\xff\xff\xff\xff"), etf(b"i\xff\xff\xff\xff"), etf(b"t\xff\xff\xff\xff"),
                 etf(b"m\xff\xff\xff\xff"), etf(b"o\xff\xff\xff\xff\x00")):
        t0 = time.perf_counter()
        err = check_decode_error(data, 6 if data[1:2] != b"o" else 7)
        assert time.perf_counter() - t0 < 0.1, err


def test_million_deep_nesting():
    for head in (b"l" + u32(1), b"h\x01", b"t" + u32(1) + b"a\x01"):
        data = etf(head * 1_000_000, b"j")
        with pytest.raises(DecodeError, match="nested deeper than 2000"):
            erpy.decode(data)
    ok = etf(b"h\x01" * 10, b"j")
    erpy.decode(ok, max_depth=10)
    with pytest.raises(DecodeError):
        erpy.decode(ok, max_depth=9)


def test_compressed_claiming_2gib():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    payload = zlib.compress(b"\x83" + b"j")
    with pytest.raises(DecodeError):
        erpy.decode(b"\x83P" + u32(2**31) + payload)
    bomb = zlib.compress(b"\x00" * 10_000_000, 9)
    with pytest.raises(DecodeError):
        erpy.decode(b"\x83P" + u32(2**31) + bomb)
    with pytest.raises(DecodeError):  # the right size, but the data does not say it
        erpy.decode(b"\x83P" + u32(100) + zlib.compress(b"k\x00\x03abc"))
    assert time.perf_counter() - t0 < 2
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 200_000


def test_valid_compressed_term():
    inner = erpy.encode({"a": list(range(300))})[1:]
    data = b"\x83P" + u32(len(inner)) + zlib.compress(inner)
    assert erpy.decode(data) == {"a": list(range(300))}


def test_colliding_map_keys():
    # Different terms equal in Python are erpy.Key (test_map_key_collisions.py has the rest);
    # the same term twice is an error, as in Erlang.
    cases = [
        (b"w\x01a", b"m" + u32(1) + b"a", Atom("a"), "a"),           # atom a, binary "a"
        (b"a\x01", b"F" + struct.pack(">d", 1.0), 1, 1.0),              # 1 and 1.0
        (b"w\x04true", b"a\x01", True, 1),                              # true and 1
    ]
    for k1, k2, v1, v2 in cases:
        data = etf(b"t", u32(2), k1, b"a\x00", k2, b"a\x01")
        assert erpy.decode(data) == {erpy.Key(v1): 0, erpy.Key(v2): 1}
        assert erpy.encode(erpy.decode(data)) == data
    k = b"m" + u32(1) + b"a"
    data = etf(b"t", u32(2), k, b"a\x00", k, b"a\x01")
    err = check_decode_error(data, 6 + len(k) + 2, "appears twice")
    assert "'a'" in str(err)


def test_unhashable_map_keys():
    # Their frozen forms (test_map_keys.py has the rest).
    data = etf(b"t", u32(1), b"k\x00\x01\x01", b"a\x02")           # #{[1] => 2}
    assert erpy.decode(data) == {erpy.FrozenList([1]): 2} and erpy.encode(erpy.decode(data)) == data
    data = etf(b"t", u32(1), b"t", u32(0), b"a\x02")                # #{#{} => 2}
    assert erpy.decode(data) == {erpy.FrozenMap(): 2} and erpy.encode(erpy.decode(data)) == data


# --- types ---------------------------------------------------------------------------------

def test_pid_port_ref_values():
    p = Pid("a@b", 85, 0, 3)
    assert repr(p) == "Pid('a@b', 85, 0, 3)"
    assert p == Pid(Atom("a@b"), 85, 0, 3) and hash(p) == hash(Pid("a@b", 85, 0, 3))
    assert type(p.node) is Atom and p != Pid("a@b", 85, 0, 4)
    with pytest.raises(AttributeError):
        p.id = 3  # type: ignore[misc]
    assert repr(Port("a@b", 5, 1)) == "Port('a@b', 5, 1)"
    assert repr(Ref("a@b", 1, (1, 2, 3))) == "Ref('a@b', 1, (1, 2, 3))"
    assert len({Ref("a@b", 1, (1, 2)), Ref("a@b", 1, [1, 2])}) == 1
    with pytest.raises(ValueError):
        Pid("a@b", -1, 0, 0)
    with pytest.raises(ValueError):
        Ref("a@b", 0, ())
    assert {Pid("a@b", 1, 0, 0): 1}[Pid("a@b", 1, 0, 0)] == 1


def test_bitbinary_and_improper_list():
    b = BitBinary(b"\xff", 3)
    assert b.data == b"\xe0" and b == BitBinary(b"\xe0", 3) and len(b) == 3
    assert repr(b) == "BitBinary(b'\\xe0', 3)" and hash(b) == hash(BitBinary(b"\xe1", 3))
    with pytest.raises(ValueError):
        BitBinary(b"\x00", 0)
    assert erpy.encode(BitBinary(b"ab", 8)) == erpy.encode(b"ab")
    with pytest.raises(ValueError):
        ImproperList([], 1)
    with pytest.raises(ValueError):
        ImproperList([1], [2])
    assert ImproperList([1], 2) == ImproperList((1,), 2)
    with pytest.raises(TypeError):
        hash(ImproperList([1], 2))


# --- resources -----------------------------------------------------------------------------

def test_no_leak_over_many_conversions():
    value = {"id": 2**80, "name": ["item", b"\xff", Atom("ok")], "p": Pid("a@b", 1, 2, 3),
             "t": (1.5, None, True), "i": ImproperList([1], 2), "b": BitBinary(b"\x80", 1)}
    data = erpy.encode(value)
    for _ in range(1000):
        erpy.decode(erpy.encode(value))
    gc.collect()
    refs = sys.getrefcount(value), sys.getrefcount(data)
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(20_000):
            erpy.decode(erpy.encode(value))
            try:
                erpy.encode([value, {1}])
            except EncodeError:
                pass
            try:
                erpy.decode(data[:-1])
            except DecodeError:
                pass
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown
    assert (sys.getrefcount(value), sys.getrefcount(data)) == refs


def test_bitstring_does_not_corrupt_shared_bytes():
    # A 1-byte bitstring whose unused bits are set: masking must not touch b'\xff' itself.
    assert erpy.decode(etf(b"M", u32(1), b"\x03\xff")) == BitBinary(b"\xe0", 3)
    assert bytes([255]) == b"\xff" and erpy.decode(etf(b"m", u32(1), b"\xff")) == b"\xff"
