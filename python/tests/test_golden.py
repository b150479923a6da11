"""Every row of the type mapping (README.md) against the bytes Erlang itself makes.

For each case: decode(golden) is the expected Python value (types included), encode(value)
is byte-for-byte the golden, and decode -> encode gives the golden back.
"""

from __future__ import annotations

import collections

import pytest
from conftest import golden_case

import erpy
from erpy import Atom, BitBinary, Fun, ImproperList, Pid, Port, Ref

ANY = object()  # the value is only checked by type and by the byte-exact round trip
# Maps over 32 keys are hash-ordered in Erlang; a dict written in another order encodes in
# its own order, so only the decoded dict re-encodes to the golden bytes.
HASH_ORDERED = {"map40"}
NODE = Atom("nonode@nohost")

CASES: list[tuple[str, object]] = [
    # integers: each size class of the encoder
    (golden_case("int0", "0"), 0),
    (golden_case("int255", "255"), 255),
    (golden_case("int256", "256"), 256),
    (golden_case("intm1", "-1"), -1),
    (golden_case("int32max", "2147483647"), 2**31 - 1),
    (golden_case("int32min", "-2147483648"), -(2**31)),
    (golden_case("int32over", "2147483648"), 2**31),
    (golden_case("int32under", "-2147483649"), -(2**31) - 1),
    (golden_case("int64max", "(1 bsl 63) - 1"), 2**63 - 1),
    (golden_case("int64min", "-(1 bsl 63)"), -(2**63)),
    (golden_case("int64", "1 bsl 64"), 2**64),
    (golden_case("intneg64", "-(1 bsl 64)"), -(2**64)),
    (golden_case("bigsmall", "1 bsl 2000"), 2**2000),
    (golden_case("biglarge", "-(1 bsl 2100) + 7"), -(2**2100) + 7),
    # floats
    (golden_case("float", "1.5"), 1.5),
    (golden_case("floatneg0", "-0.0"), -0.0),
    (golden_case("floatpi", "3.141592653589793"), 3.141592653589793),
    (golden_case("floatbig", "1.0e300"), 1.0e300),
    (golden_case("floattiny", "5.0e-324"), 5e-324),
    # atoms
    (golden_case("atom", "ok"), Atom("ok")),
    (golden_case("true", "true"), True),
    (golden_case("false", "false"), False),
    (golden_case("undefined", "undefined"), None),
    (golden_case("atomspace", "'hello world'"), Atom("hello world")),
    (golden_case("atomlatin1", "list_to_atom([252, 110])"), Atom("\u00fcn")),
    (golden_case("atomemoji", "list_to_atom([16#1F600, $x])"), Atom("\U0001F600x")),
    (golden_case("atom255", "list_to_atom(lists:duplicate(255, $a))"), Atom("a" * 255)),
    (golden_case("atom255u", "list_to_atom(lists:duplicate(255, 16#1F600))"), Atom("\U0001F600" * 255)),
    (golden_case("nil_atom", "nil"), Atom("nil")),
    # binaries
    (golden_case("bin", '<<"abc">>'), "abc"),
    (golden_case("binempty", "<<>>"), ""),
    (golden_case("binutf8", "unicode:characters_to_binary([233, 16#1F600])"), "\u00e9\U0001F600"),
    (golden_case("binraw", "<<255, 0, 1>>"), b"\xff\x00\x01"),
    (golden_case("binlong", "binary:copy(<<\"x\">>, 1000)"), "x" * 1000),
    (golden_case("binnul", "<<0, 0>>"), "\x00\x00"),
    # bitstrings
    (golden_case("bits3", "<<1:3>>"), BitBinary(b"\x20", 3)),
    (golden_case("bits9", "<<255, 1:1>>"), BitBinary(b"\xff\x80", 1)),
    (golden_case("bits15", "<<16#ABCD:15>>"), BitBinary(b"\x57\x9a", 7)),
    # lists
    (golden_case("nil", "[]"), []),
    (golden_case("string", "[1, 2, 3]"), [1, 2, 3]),
    (golden_case("string2", '"hello"'), list(b"hello")),
    (golden_case("string65535", "lists:duplicate(65535, 7)"), [7] * 65535),
    (golden_case("list65536", "lists:duplicate(65536, 7)"), [7] * 65536),
    (golden_case("list256", "[256]"), [256]),
    (golden_case("listneg", "[-1, 2]"), [-1, 2]),
    (golden_case("listmixed", "[1, a, <<\"b\">>, 2.0]"), [1, Atom("a"), "b", 2.0]),
    (golden_case("listbools", "[true, false]"), [True, False]),
    (golden_case("listnested", "[[], [1], [[2]]]"), [[], [1], [[2]]]),
    (golden_case("improper", "[1 | 2]"), ImproperList([1], 2)),
    (golden_case("improper2", "[a, b | c]"), ImproperList([Atom("a"), Atom("b")], Atom("c"))),
    (golden_case("improperbin", '[1 | <<"t">>]'), ImproperList([1], "t")),
    # tuples
    (golden_case("tuple0", "{}"), ()),
    (golden_case("tuple", '{ok, <<"x">>, 1}'), (Atom("ok"), "x", 1)),
    (golden_case("tuple300", "list_to_tuple(lists:seq(1, 300))"), tuple(range(1, 301))),
    # maps
    (golden_case("map0", "#{}"), {}),
    (golden_case("map", '#{a => 1, <<"b">> => [2]}'), {Atom("a"): 1, "b": [2]}),
    (golden_case("map40", "maps:from_list([{I, I * 2} || I <- lists:seq(1, 40)])"),
     {i: i * 2 for i in range(1, 41)}),
    (golden_case("mapnested", '#{<<"k">> => #{x => {1, 2}}}'), {"k": {Atom("x"): (1, 2)}}),
    (golden_case("w5", '[#{<<"id">> => I, <<"name">> => <<"item">>, <<"score">> => 1.5}'
                       " || I <- lists:seq(1, 100)]"),
     [{"id": i, "name": "item", "score": 1.5} for i in range(1, 101)]),
    # pids, ports, refs, funs
    (golden_case("pid", 'list_to_pid("<0.85.3>")'), Pid(NODE, 85, 3, 0)),
    (golden_case("port", 'list_to_port("#Port<0.5>")'), Port(NODE, 5, 0)),
    (golden_case("ref", 'list_to_ref("#Ref<0.1.2.3>")'), ANY),
    (golden_case("refself", "make_ref()"), ANY),
    (golden_case("self", "self()"), ANY),
    (golden_case("funexport", "fun lists:sort/1"), ANY),
    (golden_case("funlocal", "Y = 7, fun(X) -> X + Y end"), ANY),
]


def same(a: object, b: object) -> bool:
    """Equality that also checks types all the way down (True is not 1, 'a' not Atom('a'))."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))  # type: ignore[arg-type]
    if isinstance(a, dict):
        return (list(map(type, a)) == list(map(type, b))  # type: ignore[arg-type]
                and a.keys() == b.keys()  # type: ignore[attr-defined]
                and all(same(a[k], b[k]) for k in a))  # type: ignore[index]
    if isinstance(a, ImproperList):
        return same(a.elements, b.elements) and same(a.tail, b.tail)  # type: ignore[attr-defined]
    if isinstance(a, float):
        return repr(a) == repr(b)  # -0.0 is not 0.0
    return a == b


@pytest.mark.parametrize("name,value", CASES, ids=[c[0] for c in CASES])
def test_golden(golden, name, value):
    data = golden[name]
    decoded = erpy.decode(data)
    if value is ANY:
        assert isinstance(decoded, (Pid, Port, Ref, Fun))
    else:
        assert same(decoded, value), f"{decoded!r} != {value!r}"
        if name not in HASH_ORDERED:
            assert erpy.encode(value) == data
    assert erpy.encode(decoded) == data
    # A bytes-like view decodes the same, without a copy being needed.
    assert erpy.encode(erpy.decode(memoryview(data))) == data


def test_golden_types(golden):
    ref = erpy.decode(golden["ref"])
    assert isinstance(ref, Ref) and ref.node == "nonode@nohost" and len(ref.ids) == 3
    assert isinstance(erpy.decode(golden["self"]), Pid)
    fun = erpy.decode(golden["funlocal"])
    assert isinstance(fun, Fun) and fun.data[0] == 112
    assert erpy.decode(golden["funexport"]).data[0] == 113


golden_case("nil_for_none", "nil")
golden_case("compressed", 'lists:duplicate(1000, <<"abc">>)', "[compressed]")


def test_none_option(golden):
    data = golden["nil_for_none"]
    assert erpy.decode(data) == Atom("nil")
    assert erpy.decode(data, none="nil") is None
    assert erpy.encode(None, none="nil") == data
    assert erpy.decode(golden["undefined"], none="nil") == Atom("undefined")
    assert type(erpy.decode(golden["undefined"], none="nil")) is Atom


def test_compressed(golden):
    assert erpy.decode(golden["compressed"]) == ["abc"] * 1000


def test_binary_bytes_option(golden):
    assert erpy.decode(golden["bin"], binary="bytes") == b"abc"
    assert erpy.decode(golden["binraw"], binary="bytes") == b"\xff\x00\x01"
    assert erpy.decode(golden["map"], binary="bytes") == {Atom("a"): 1, b"b": [2]}
    assert erpy.encode(erpy.decode(golden["w5"], binary="bytes")) == golden["w5"]


def test_subclasses_and_buffers(golden):
    point = collections.namedtuple("point", "a b")
    assert erpy.encode(point(Atom("ok"), "x")) == erpy.encode((Atom("ok"), "x"))
    assert erpy.encode(collections.OrderedDict([(Atom("a"), 1), ("b", [2])])) == golden["map"]
    assert erpy.encode(bytearray(b"\xff\x00\x01")) == golden["binraw"]
    assert erpy.encode(memoryview(b"\xff\x00\x01")) == golden["binraw"]
