"""Runs of similar terms, which the codec takes short cuts for (W5, bench/erpy_bench_w5.erl).

- Decoding: a map's keys and values whose bytes repeat those of the previous map of its
  size at the same position are the same objects again, for immutable values only.
- Decoding: long lists and tuples are hidden from the garbage collector while filled.
- Encoding: plain scalars in containers are written inline.
The results must be exactly those of the general paths.
"""

from __future__ import annotations

import enum
import gc
import struct
import zlib

import pytest

import erpy
from erpy import Atom, BitBinary, DecodeError, EncodeError, Key, Pid


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def binary(s: bytes) -> bytes:
    return b"m" + u32(len(s)) + s


def etf_map(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"t" + u32(len(pairs)) + b"".join(k + v for k, v in pairs)


def etf_list(*items: bytes) -> bytes:
    return b"l" + u32(len(items)) + b"".join(items) + b"j"


def round_trip(value):
    data = erpy.encode(value)
    back = erpy.decode(data)
    assert back == value
    assert erpy.encode(back) == data
    return back


VALUES = [
    0, 255, 256, -1, 2**31 - 1, -2**31, 2**31, 2**62, -2**62, 2**63, 2**64, -2**100,
    0.0, -0.0, 1.5, 1e300, "", "x", "\u00e9t\u00e9", "y" * 40, "z" * 300, b"\xff", b"\xfe" * 300,
    Atom("ok"), Atom("\u00e9"), None, True, False,
]


@pytest.mark.parametrize("value", VALUES, ids=repr)
def test_runs_of_maps_round_trip(value):
    # The same value three times (reused from the third map on), between others.
    rows = [{"id": i, "v": value, "w": VALUES[i % len(VALUES)]} for i in range(8)]
    back = round_trip(rows)
    for row in back:
        assert type(row["v"]) is type(value)
    assert round_trip([{"v": value}] * 5) == [{"v": value}] * 5


def test_runs_with_other_shapes_between():
    rows = []
    for i in range(50):
        rows.append({"a": i, "b": "same", "c": {"x": 1, "y": [i]}})
        rows.append({"c": i % 3, "a": "other", "b": 2.5})  # same size, other key order
        rows.append({Atom("k"): (i, "t"), 7: None, 1.5: b"\x80"})
        rows.append({"x": {"a": 1, "b": 2, "c": 3}})  # a map of 3 inside a map of 1
        rows.append({f"k{j}": j for j in range(40)})  # larger than any reused shape
    round_trip(rows)


def test_mutable_values_are_never_shared():
    value = [{"l": [], "s": [1, 2], "m": {"x": 1}, "t": (1, [2]), "n": [1, 2.5],
              "b": BitBinary(b"\xf0", 4), "p": Pid("a@b", 1, 2, 3)} for _ in range(4)]
    back = round_trip(value)
    for key in ("l", "s", "m", "t", "n", "b", "p"):
        assert len({id(row[key]) for row in back}) == 4, key
    back[0]["l"].append(1)
    back[0]["m"]["y"] = 2
    back[0]["t"][1].append(3)
    assert back[1] == value[1] and back[3] == value[3]


def test_decode_options_apply_to_reused_values():
    data = erpy.encode([{"k": "text", "n": None}] * 4)
    assert erpy.decode(data, binary="bytes") == [{b"k": b"text", b"n": None}] * 4
    assert erpy.decode(data, none="nil") == [{"k": "text", "n": Atom("undefined")}] * 4


def test_same_key_twice_after_a_run():
    a, b = binary(b"a"), binary(b"b")
    one, two = b"a\x01", b"a\x02"
    good = etf_map((a, one), (b, two))
    bad = etf_map((a, one), (a, two))
    data = b"\x83" + etf_list(good, good, good, bad)
    with pytest.raises(DecodeError, match="appears twice") as info:
        erpy.decode(data)
    assert info.value.offset == 1 + 5 + 3 * len(good) + 5 + len(a) + len(one)


def test_keys_equal_in_python_in_a_run():
    # #{1 => a, 1.0 => b}: both keys become erpy.Key, in every map of the run.
    m = etf_map((b"a\x01", b"w\x01a"), (b"F" + struct.pack(">d", 1.0), b"w\x01b"))
    data = b"\x83" + etf_list(m, m, m, m)
    back = erpy.decode(data)
    for row in back:
        assert sorted(type(k).__name__ for k in row) == ["Key", "Key"]
        assert row[Key(1)] == Atom("a") and row[Key(1.0)] == Atom("b")
    assert erpy.encode(back) == data


def test_depth_limit_holds_for_reused_terms():
    data = erpy.encode([{"a": 1}] * 5)
    assert erpy.decode(data, max_depth=2) == [{"a": 1}] * 5
    with pytest.raises(DecodeError, match="nested deeper than 1 levels"):
        erpy.decode(data, max_depth=1)
    with pytest.raises(DecodeError, match="nested deeper than 0 levels"):
        erpy.decode(erpy.encode([300, 301]), max_depth=0)


def test_compressed_runs():
    rows = [{"id": i, "name": "item", "score": 1.5} for i in range(1000)]
    inner = erpy.encode(rows)[1:]
    data = b"\x83P" + u32(len(inner)) + zlib.compress(inner)
    assert erpy.decode(data) == rows


def test_long_containers_are_tracked_by_the_collector():
    for value in (list(range(1000)), [{"a": [i]} for i in range(1000)], tuple(range(1000)),
                  [[i] for i in range(300)]):
        back = erpy.decode(erpy.encode(value))
        assert back == value
        assert gc.is_tracked(back)
    improper = erpy.decode(erpy.encode(erpy.ImproperList(list(range(500)), 1)))
    assert gc.is_tracked(improper.elements)
    # A cycle made afterwards is collected.
    back = erpy.decode(erpy.encode([[i] for i in range(1000)]))
    back.append(back)
    marker = Marker()
    back.append(marker)
    import weakref
    ref = weakref.ref(marker)
    del back, marker
    gc.collect()
    assert ref() is None


class Marker:
    pass


class Color(enum.IntEnum):
    RED = 1


class Text(str):
    pass


class Real(float):
    pass


def test_inline_scalars_keep_every_type_rule():
    # bool, int and str subclasses and non-ASCII text go the general way, in every container.
    for wrap in (lambda x: [x, 1], lambda x: (x, 1), lambda x: {"k": x, "j": 1}, lambda x: {x: 1}):
        for value, expected in ((True, True), (Color.RED, 1), (Text("t"), "t"), (Real(2.5), 2.5),
                                ("\u00e9", "\u00e9"), (2**64, 2**64), (-2**63, -2**63),
                                (2**30, 2**30), (-2**60, -2**60)):
            back = erpy.decode(erpy.encode(wrap(value)))
            assert back == wrap(expected)
    assert erpy.encode([True, 1]) == erpy.encode([Atom("true"), 1])


def test_registered_encoders_apply_inside_containers():
    erpy.register_encoder(Color, lambda c: c.name)
    try:
        assert erpy.decode(erpy.encode({"c": Color.RED, "l": [Color.RED]})) == {"c": "RED", "l": ["RED"]}
    finally:
        erpy._types.ENCODERS.clear()


def test_inline_scalar_errors_say_where():
    with pytest.raises(EncodeError, match=r"NaN or infinity.* at \['k'\]$"):
        erpy.encode({"k": float("nan")})
    with pytest.raises(EncodeError, match=r"NaN or infinity.* at \[0\]\['k'\]$"):
        erpy.encode([{"k": float("inf")}])
    with pytest.raises(EncodeError, match=r"surrogate.* at \[2\]$"):
        erpy.encode(("a", 1, "\ud800"))
    with pytest.raises(EncodeError, match=r"deeper than 0 levels.* at \[0\]$"):
        erpy.encode([1.5], max_depth=0)
    with pytest.raises(EncodeError, match=r"deeper than 0 levels.* at <key 'k'>$"):
        erpy.encode({"k": 1}, max_depth=0)
    assert erpy.encode({"k": 1}, max_depth=1) == erpy.encode({"k": 1})
