"""Map keys that are different Erlang terms but equal in Python: erpy.Key.

1 and 1.0, true and 1, the atom ok and the binary <<"ok">>, [1] and [1.0], {a} and
{<<"a">>}: a dict cannot hold two such keys, so every key of a map that equals another of
its keys in Python is wrapped in erpy.Key (compared as an Erlang term), whatever the map's
order, and the other keys stay bare. The golden bytes are Erlang's; the round trip is
byte-exact (the dict keeps the map's order).
"""

from __future__ import annotations

import pickle
import struct

import pytest
from conftest import golden_case

import erpy
from erpy import Atom, FrozenImproperList, FrozenList, FrozenMap, Key

FL, FM, FIL, K, A = FrozenList, FrozenMap, FrozenImproperList, Key, Atom

# (golden name, expected value, or None when only the byte-exact round trip is checked)
CASES: list[tuple[str, object]] = [
    (golden_case("kc_int_float", "#{1 => a, 1.0 => b}"), {K(1): A("a"), K(1.0): A("b")}),
    (golden_case("kc_atom_binary", '#{ok => 1, <<"ok">> => 2}'), {K(A("ok")): 1, K("ok"): 2}),
    (golden_case("kc_true_one", "#{true => 1, 1 => 2}"), {K(True): 1, K(1): 2}),
    (golden_case("kc_three", "#{true => a, 1 => b, 1.0 => c, 2 => d}"),
     {K(True): A("a"), K(1): A("b"), K(1.0): A("c"), 2: A("d")}),
    (golden_case("kc_false_zero", "#{false => a, 0 => b, 0.0 => c, x => y}"),
     {K(False): A("a"), K(0): A("b"), K(0.0): A("c"), A("x"): A("y")}),
    (golden_case("kc_list", "#{[1] => a, [1.0] => b}"), {K(FL([1])): A("a"), K(FL([1.0])): A("b")}),
    (golden_case("kc_string", '#{"ok" => 1, [111, 107.0] => 2, "no" => 3}'),
     {K(FL(b"ok")): 1, K(FL([111, 107.0])): 2, FL(b"no"): 3}),
    (golden_case("kc_tuple", '#{{a} => 1, {<<"a">>} => 2}'), {K((A("a"),)): 1, K(("a",)): 2}),
    (golden_case("kc_map", "#{#{1 => a} => x, #{1.0 => a} => y}"),
     {K(FM({1: A("a")})): A("x"), K(FM({1.0: A("a")})): A("y")}),
    (golden_case("kc_improper", "#{[1 | 2] => a, [1 | 2.0] => b}"),
     {K(FIL([1], 2)): A("a"), K(FIL([1], 2.0)): A("b")}),
    (golden_case("kc_deep", "#{[[[{1, [true]}]]] => a, [[[{1, [1]}]]] => b}"),
     {K(FL([FL([FL([(1, FL([True]))])])])): A("a"), K(FL([FL([FL([(1, FL([1]))])])])): A("b")}),
    # Inside a key: the key's own map holds Keys, and the key is frozen as usual.
    (golden_case("kc_inside_key", "#{#{1 => a, 1.0 => b} => x}"),
     {FM({K(1): A("a"), K(1.0): A("b")}): A("x")}),
    (golden_case("kc_in_value", '#{m => #{ok => 1, <<"ok">> => 2}, n => [#{1 => a, 1.0 => b}]}'),
     {A("m"): {K(A("ok")): 1, K("ok"): 2}, A("n"): [{K(1): A("a"), K(1.0): A("b")}]}),
    (golden_case("kc_bignum", "#{1 bsl 70 => a, float(1 bsl 70) => b, 1 bsl 53 => c, float(1 bsl 53) => d}"),
     {K(1 << 70): A("a"), K(float(1 << 70)): A("b"), K(1 << 53): A("c"), K(float(1 << 53)): A("d")}),
    (golden_case("kc_unicode", '#{\'héllo\' => 1, <<"héllo"/utf8>> => 2}'), {K(A("héllo")): 1, K("héllo"): 2}),
    # JSON-ish maps over 32 keys (hash-ordered in ETF): atom and binary keys mixed.
    (golden_case("kc_json_big",
                 "maps:from_list([{list_to_atom(\"k\" ++ integer_to_list(I)), I} || I <- lists:seq(1, 30)]"
                 " ++ [{list_to_binary(\"k\" ++ integer_to_list(I)), -I} || I <- lists:seq(1, 30)]"
                 " ++ [{list_to_binary(\"only\" ++ integer_to_list(I)), I} || I <- lists:seq(1, 5)])"),
     {**{K(A(f"k{i}")): i for i in range(1, 31)}, **{K(f"k{i}"): -i for i in range(1, 31)},
      **{f"only{i}": i for i in range(1, 6)}}),
    (golden_case("kc_numbers_big", "maps:from_list([{I, i} || I <- lists:seq(1, 40)] ++ [{float(I), f} || I <- lists:seq(1, 40, 2)])"),
     {**{(K(i) if i % 2 else i): A("i") for i in range(1, 41)}, **{K(float(i)): A("f") for i in range(1, 41, 2)}}),
    (golden_case("kc_compressed", '#{lists:duplicate(300, 1) => a, lists:duplicate(300, 1.0) => b}',
                 "[compressed, {minor_version, 2}]"), None),
]


@pytest.mark.parametrize("name,expected", CASES, ids=[c[0] for c in CASES])
def test_golden_collisions(golden, name, expected):
    data = golden[name]
    value = erpy.decode(data)
    if expected is not None:
        assert value == expected
        assert keys_of(value) == keys_of(expected)
    if name == "kc_compressed":
        again = erpy.encode(value)
        assert erpy.decode(again) == value and erpy.encode(erpy.decode(again)) == again
        assert all(type(k) is Key for k in value)
    else:
        assert erpy.encode(value) == data


def keys_of(value):
    """The keys with their exact types, all the way down (dict equality alone says 1 == 1.0)."""
    if isinstance(value, dict):
        return sorted((repr(k), keys_of(v)) for k, v in value.items())
    if isinstance(value, list):
        return [keys_of(v) for v in value]
    return type(value).__name__


def test_encoding_keys_gives_erlangs_bytes(golden):
    # Python code can build such maps: in Erlang's order, the bytes are Erlang's.
    assert erpy.encode({K(1): A("a"), K(1.0): A("b")}) == golden["kc_int_float"]
    assert erpy.encode({K(A("ok")): 1, K(b"ok"): 2}) == golden["kc_atom_binary"]
    assert erpy.encode({K([1]): A("a"), K([1.0]): A("b")}) == golden["kc_list"]


def map_of(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"\x83t" + struct.pack(">I", len(pairs)) + b"".join(k + v for k, v in pairs)


INT1, FLOAT1 = b"a\x01", b"F" + struct.pack(">d", 1.0)
ATOM_OK, BIN_OK = b"w\x02ok", b"m\x00\x00\x00\x02ok"
TRUE = b"w\x04true"


@pytest.mark.parametrize("keys", [
    [INT1, FLOAT1, b"a\x02"],
    [ATOM_OK, BIN_OK, b"w\x01x"],
    [TRUE, INT1, FLOAT1],
    [b"k\x00\x01\x01", b"l\x00\x00\x00\x01" + FLOAT1 + b"j"],
])
def test_every_order_wraps_the_same_keys(keys):
    import itertools
    results = []
    for order in itertools.permutations(range(len(keys))):
        data = map_of(*((keys[i], b"a" + bytes([i])) for i in order))
        value = erpy.decode(data)
        assert erpy.encode(value) == data  # the map's order is kept
        assert [v for v in value.values()] == list(order)
        results.append(sorted((repr(k), v) for k, v in value.items()))
    assert all(r == results[0] for r in results)


def test_only_colliding_keys_are_wrapped():
    value = erpy.decode(map_of((b"a\x02", b"a\x00"), (INT1, b"a\x01"), (ATOM_OK, b"a\x02"), (FLOAT1, b"a\x03")))
    assert [type(k).__name__ for k in value] == ["int", "Key", "Atom", "Key"]
    assert value[2] == 0 and value[K(1)] == 1 and value["ok"] == 2 and value[K(1.0)] == 3
    assert 1 not in value and K(2) not in value


def test_same_term_twice_is_an_error():
    # Erlang's binary_to_term refuses these too (badarg).
    for k, shown in ((INT1, "1"), (BIN_OK, "'ok'"), (b"l\x00\x00\x00\x01" + FLOAT1 + b"j", "[1.0]")):
        for pairs in ([(k, b"a\x00"), (k, b"a\x01")], [(k, b"a\x00"), (INT1 if k != INT1 else FLOAT1, b"a\x01"),
                                                       (k, b"a\x02")]):
            with pytest.raises(erpy.DecodeError, match="appears twice") as e:
                erpy.decode(map_of(*pairs))
            assert shown in str(e.value)


def test_negative_zero():
    # Different terms from OTP 27 on (0.0 =:= -0.0 is false there): two Keys, kept apart.
    data = map_of((b"F" + struct.pack(">d", 0.0), b"a\x00"), (b"F" + struct.pack(">d", -0.0), b"a\x01"))
    value = erpy.decode(data)
    assert value == {K(0.0): 0, K(-0.0): 1} and len(value) == 2 and erpy.encode(value) == data


def test_options():
    # binary='bytes': ok and <<"ok">> are not equal in Python, nothing to wrap.
    data = map_of((ATOM_OK, b"a\x00"), (BIN_OK, b"a\x01"))
    assert erpy.decode(data, binary="bytes") == {A("ok"): 0, b"ok": 1}
    assert [type(k) for k in erpy.decode(data, binary="bytes")] == [A, bytes]
    # none='nil': None is kept apart from every atom, Atom('undefined') included.
    nil, undefined = b"w\x03nil", b"w\x09undefined"
    data = map_of(*((b"h\x02" + a + n, bytes([97, i])) for i, (a, n) in
                    enumerate(((nil, INT1), (nil, FLOAT1), (undefined, INT1), (undefined, FLOAT1)))))
    value = erpy.decode(data, none="nil")
    assert value == {K((None, 1)): 0, K((None, 1.0)): 1, K((A("undefined"), 1)): 2, K((A("undefined"), 1.0)): 3}
    assert erpy.encode(value, none="nil") == data


def test_key_semantics():
    assert K(1) == K(1) and hash(K(1)) == hash(K(1)) and K(1) != K(1.0) and K(True) != K(1)
    assert K(A("ok")) != K("ok") and K("ok") == K(b"ok") == K(bytearray(b"ok"))  # both binaries
    assert K(True) == K(A("true")) and K(None) != K(A("undefined"))
    assert K(1) != 1 and 1 != K(1) and K([1]) != [1] and K((1,)) != K([1])
    assert K(K(1.0)) == K(1.0) and type(K(K(1.0)).value) is float
    import enum
    one = enum.IntEnum("E", "ONE")(1)
    assert K([one]) == K([1]) and K((one,)) == K((1,)) and K([True]) != K([1])
    # Frozen, and maps compare whatever their order.
    k = K([1, {"b": [2], "a": 1}])
    assert k.value == FL([1, FM({"a": 1, "b": FL([2])})]) and type(k.value) is FL
    assert k == K([1, {"a": 1, "b": [2]}]) and hash(k) == hash(K([1, {"a": 1, "b": [2]}]))
    assert K({K(1): 2, K(1.0): 3}) == K({K(1.0): 3, K(1): 2}) != K({K(1.0): 2, K(1): 3})
    with pytest.raises(AttributeError):
        k.value = 1  # type: ignore[misc]
    assert repr(K(1.0)) == "Key(1.0)" and repr(K([1])) == "Key(FrozenList([1]))"
    assert pickle.loads(pickle.dumps(k)) == k
    assert erpy.encode(K([1, {"a": 1}])) == erpy.encode([1, {"a": 1}])
    with pytest.raises(erpy.EncodeError):
        K(object())
    with pytest.raises(erpy.EncodeError):
        K(float("nan"))


def test_keys_do_not_leak():
    import gc
    import tracemalloc
    data = erpy.encode({K(1): [1], K(1.0): {K(A("a")): 1, K("a"): 2}, K(FL([1])): 3, K(FL([1.0])): 4})
    for _ in range(300):
        erpy.encode(erpy.decode(data))
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(3000):
            erpy.encode(erpy.decode(data))
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, grown


def test_many_collisions_stay_linear():
    import time
    n = 50_000
    pairs = [(b"b" + struct.pack(">i", 1000 + i), b"a\x00") for i in range(n)]
    pairs += [(b"F" + struct.pack(">d", 1000.0 + i), b"a\x01") for i in range(n)]
    data = map_of(*pairs)
    t0 = time.perf_counter()
    value = erpy.decode(data)
    assert len(value) == 2 * n and all(type(k) is Key for k in value)
    assert erpy.encode(value) == data
    assert time.perf_counter() - t0 < 20
