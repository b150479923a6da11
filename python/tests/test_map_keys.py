"""Map keys Python cannot hash: every Erlang map comes to Python and back.

A list (every Erlang string), a map or an improper list as a key, at any depth, decodes to
its frozen form (erpy.FrozenList, FrozenMap, FrozenImproperList): hashable, immutable,
equal by value, and encoded to exactly the bytes Erlang made.
"""

from __future__ import annotations

import copy
import pickle

import pytest
from conftest import golden_case

import erpy
from erpy import Atom, FrozenImproperList, FrozenList, FrozenMap, ImproperList

FL, FM, FIL = FrozenList, FrozenMap, FrozenImproperList

# (golden name, expected value, or None when only the byte-exact round trip is checked)
CASES: list[tuple[str, object]] = [
    (golden_case("key_string", '#{"name" => 1}'), {FL(b"name"): 1}),
    (golden_case("key_nested_list", "#{[1, [2]] => x}"), {FL([1, FL([2])]): Atom("x")}),
    (golden_case("key_map", "#{#{a => 1} => b}"), {FM({Atom("a"): 1}): Atom("b")}),
    (golden_case("key_nil", "#{[] => 1}"), {FL(): 1}),
    (golden_case("key_tuple_of_list", "#{{[1], 2} => 1}"), {(FL([1]), 2): 1}),
    (golden_case("key_improper", "#{[1 | 2] => 1}"), {FIL([1], 2): 1}),
    (golden_case("key_map_of_lists", "#{#{[1] => [2]} => 3}"), {FM({FL([1]): FL([2])}): 3}),
    (golden_case("key_list_of_map", "#{[#{a => [1]}] => 1}"), {FL([FM({Atom("a"): FL([1])})]): 1}),
    (golden_case("key_value_stays_list", '#{"k" => "v"}'), {FL(b"k"): [118]}),
    (golden_case("key_in_value_map", "#{a => #{[1] => 2}}"), {Atom("a"): {FL([1]): 2}}),
    (golden_case("key_long_string", "#{lists:duplicate(70000, $a) => 1}"), {FL(b"a" * 70000): 1}),
    (golden_case("key_unicode_string", '#{[16#1F600, 233] => 1}'), {FL([0x1F600, 233]): 1}),
    (golden_case("key_mixed", '#{"b" => 1, [a] => 2, <<"c">> => 3, {x, "y"} => 4, #{} => 5}'), None),
    (golden_case("key_many", "maps:from_list([{[I], I} || I <- lists:seq(1, 40)])"), None),
    (golden_case("key_compressed", '#{lists:duplicate(500, "ab") => [1, 2]}',
                 "[compressed, {minor_version, 2}]"), None),
]


@pytest.mark.parametrize("name,expected", CASES, ids=[c[0] for c in CASES])
def test_golden_keys(golden, name, expected):
    data = golden[name]
    value = erpy.decode(data)
    if expected is not None:
        assert value == expected
        for k, k2 in zip(value, expected):
            assert type(k) is type(k2)
        assert erpy.encode(expected) == data
    if name == "key_compressed":
        assert erpy.encode(value) == erpy.encode(erpy.decode(erpy.encode(value)))
        assert erpy.decode(erpy.encode(value)) == value
    else:
        assert erpy.encode(value) == data
    # Every key is hashable, and its parts are frozen all the way down.
    for key in value if isinstance(value, dict) else ():
        hash(key)


def test_frozen_list_semantics():
    k = FL([1, FL([2])])
    assert k == FL([1, FL([2])]) and hash(k) == hash(FL([1, FL([2])]))
    assert k == [1, [2]] and [1, [2]] == k
    assert FL([1, 2]) != (1, 2) and (1, 2) != FL([1, 2])
    assert FL() != () and FL() == []
    assert len(k) == 2 and list(k) == [1, FL([2])] and k[0] == 1 and k[-1] == [2]
    assert k[:1] == FL([1]) and type(k[:1]) is FL
    assert 1 in k and k.index(1) == 0 and k.count(1) == 1 and list(reversed(k)) == [[2], 1]
    assert repr(FL(b"ab")) == "FrozenList([97, 98])"
    with pytest.raises(AttributeError):
        k._items = ()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        k.x = 1  # type: ignore[attr-defined]
    assert pickle.loads(pickle.dumps(k)) == k and copy.deepcopy(k) == k
    assert {k: 1}[FL([1, FL([2])])] == 1


def test_frozen_map_semantics():
    m = FM({Atom("a"): 1, 2: FL([3])})
    assert m == FM({2: FL([3]), Atom("a"): 1}) and hash(m) == hash(FM({2: FL([3]), "a": 1}))
    assert m == {"a": 1, 2: [3]} and {"a": 1, 2: [3]} == m
    assert m != FL() and m["a"] == 1 and m.get("z") is None and "a" in m and len(m) == 2
    assert list(m) == ["a", 2] and list(m.keys()) == ["a", 2] and list(m.values()) == [1, [3]]
    assert dict(m.items()) == {"a": 1, 2: [3]}
    with pytest.raises(AttributeError):
        m._map = {}  # type: ignore[misc]
    with pytest.raises(TypeError):
        m["b"] = 2  # type: ignore[index]
    assert pickle.loads(pickle.dumps(m)) == m
    assert repr(FM({1: 2})) == "FrozenMap({1: 2})"


def test_frozen_improper_list_semantics():
    k = FIL([1, FL([2])], Atom("t"))
    assert k == FIL((1, FL([2])), "t") and hash(k) == hash(FIL([1, [2]][:1] + [FL([2])], "t"))
    assert k == ImproperList([1, [2]], "t") and ImproperList([1, [2]], "t") == k
    assert k.elements == (1, FL([2])) and k.tail == "t"
    with pytest.raises(AttributeError):
        k.tail = 1  # type: ignore[misc]
    with pytest.raises(ValueError):
        FIL([], 1)
    with pytest.raises(ValueError):
        FIL([1], FL([2]))
    assert pickle.loads(pickle.dumps(k)) == k


def test_contents_must_be_hashable():
    with pytest.raises(TypeError):
        FL([[1]])
    with pytest.raises(TypeError):
        FM({1: [2]})
    with pytest.raises(TypeError):
        FIL([1], {})
    assert erpy.freeze([[1]]) == FL([FL([1])])


def test_deep_keys_hash_without_recursion():
    # #{[[[...2000 deep...]]] => 1}: within max_depth; its hash is one step, not 2000.
    levels = 1990
    data = b"\x83t\x00\x00\x00\x01" + b"l\x00\x00\x00\x01" * levels + b"j" * (levels + 1) + b"a\x01"
    value = erpy.decode(data)
    (key,) = value
    assert type(key) is FL and hash(key) == hash(erpy.decode(data).popitem()[0])
    assert erpy.encode(value) == data


def test_frozen_forms_encode_as_the_originals():
    for value in ([1, 2], list(b"abc"), [], [[1], {2: [3]}], {"a": [1]}, {}, (1, [2])):
        assert erpy.encode(erpy.freeze(value)) == erpy.encode(value)
    assert erpy.encode(FIL([1, FL([2])], 3)) == erpy.encode(ImproperList([1, [2]], 3))
    # Python code can build keys Erlang reads as lists and maps.
    data = erpy.encode({FL(b"name"): 1, FM({"a": 1}): 2, FIL([1], 2): 3})
    assert erpy.decode(data) == {FL(b"name"): 1, FM({"a": 1}): 2, FIL([1], 2): 3}


def test_freeze():
    assert erpy.freeze([1, {2: [3]}, (4, [5]), ImproperList([[6]], 7)]) == \
        FL([1, FM({2: FL([3])}), (4, FL([5])), FIL([FL([6])], 7)])
    t = (1, "a")
    assert erpy.freeze(t) is t  # nothing to freeze: the same object
    assert erpy.freeze("s") == "s" and erpy.freeze(None) is None
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(RecursionError):
        erpy.freeze(deep)


def test_unhashable_keys_do_not_leak():
    import gc
    import tracemalloc
    data = erpy.encode({FL([FM({"a": FL([1])}), FIL([1], 2)]): [1], (FL(), 1): 2})
    for _ in range(500):
        erpy.decode(data)
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(5000):
            erpy.encode(erpy.decode(data))
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown


def test_deep_keys_equal_in_python_are_keys():
    # [[[1]]] and [[[1.0]]] are two keys in Erlang, equal in Python: erpy.Key, however deep
    # (their comparison in Python does not recurse).
    import struct
    for levels in (10, 900, 1900):
        k1 = b"l\x00\x00\x00\x01" * levels + b"h\x01a\x01" + b"j" * levels
        k2 = b"l\x00\x00\x00\x01" * levels + b"h\x01F" + struct.pack(">d", 1.0) + b"j" * levels
        data = b"\x83t\x00\x00\x00\x02" + k1 + b"a\x01" + k2 + b"a\x02"
        value = erpy.decode(data)
        assert [type(k) for k in value] == [erpy.Key, erpy.Key] and list(value.values()) == [1, 2]
        assert erpy.encode(value) == data
        a, b = value
        assert a.value == b.value and a != b


def test_deep_frozen_equality():
    deep1, deep2 = 1, 1.0
    for _ in range(5000):
        deep1, deep2 = FL([(deep1,)]), FL([(deep2,)])
    assert deep1 == deep2 and hash(deep1) == hash(deep2)
    assert FM({1: deep1}) == FM({1.0: deep2}) and FIL([deep1], 2) == FIL([deep2], 2.0)
    assert FL([1, FL([2])]) != FL([1, FL([3])]) and FL([1]) != FL([1, 2])

    class Sub(FrozenList):
        __slots__ = ()

    assert Sub([1]) == FL([1]) and FL([1]) == Sub([1.0]) and Sub([1]) != FL([2])
