"""Limits the caller sets, and limits of the machine the codec runs on.

- max_size: a compressed term never inflates past the size the caller accepts.
- max_depth: however large, nesting stops cleanly before the C stack of the calling
  thread runs out (main thread, Python threads with small stacks), for decode, encode and
  freeze alike.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib

import pytest

import erpy
from erpy import DecodeError

HERE = os.path.dirname(os.path.abspath(__file__))
PYTHONPATH = os.path.join(HERE, "..")


def u32(n: int) -> bytes:
    return struct.pack(">I", n)


def compressed(term_bytes: bytes) -> bytes:
    inner = term_bytes[1:]
    return b"\x83P" + u32(len(inner)) + zlib.compress(inner, 9)


def test_max_size_bounds_inflation():
    term = erpy.encode("x" * 510_000)
    data = compressed(term)
    assert len(data) < 1000  # a small input that claims (and is) half a megabyte
    assert erpy.decode(data) == "x" * 510_000
    assert erpy.decode(data, max_size=len(term) - 1) == "x" * 510_000
    with pytest.raises(DecodeError, match="above the limit of 100000"):
        erpy.decode(data, max_size=100_000)
    assert erpy.decode(data, max_size=None) == "x" * 510_000


def test_max_size_bounds_plain_input():
    data = erpy.encode(list(range(100)))
    assert erpy.decode(data, max_size=len(data)) == list(range(100))
    with pytest.raises(DecodeError, match="above max_size"):
        erpy.decode(data, max_size=len(data) - 1)


def test_max_size_argument_checked():
    with pytest.raises(ValueError):
        erpy.decode(erpy.encode(1), max_size=-1)
    with pytest.raises(TypeError):
        erpy.decode(erpy.encode(1), max_size="10")


def deep_inputs(levels: int) -> list[bytes]:
    return [
        b"\x83" + (b"l" + u32(1)) * levels + b"j" + b"j" * levels,   # [[[...]]]
        b"\x83" + b"h\x01" * levels + b"j",                         # {{{...}}}
        b"\x83" + (b"t" + u32(1) + b"a\x01") * levels + b"j",       # #{1 => #{1 => ...}}
        b"\x83" + (b"t" + u32(1)) * levels + b"j" + (b"a\x01" * levels),  # keys
    ]


def test_huge_max_depth_on_deep_input_raises():
    for data in deep_inputs(1_000_000):
        with pytest.raises(DecodeError, match="too deeply for this thread's stack"):
            erpy.decode(data, max_depth=10**7)
    deep: list = []
    for _ in range(1_000_000):
        deep = [deep]
    with pytest.raises(erpy.EncodeError, match="too deep for this thread's stack"):
        erpy.encode(deep, max_depth=10**7)
    d: dict = {}
    d["d"] = d
    with pytest.raises(erpy.EncodeError):
        erpy.encode(d, max_depth=10**7)
    # Within the stack, max_depth still decides.
    assert erpy.decode(b"\x83" + b"h\x01" * 3000 + b"j", max_depth=3000)


# Threads with small stacks (threading.stack_size): the same input stops earlier, cleanly.
THREAD_SCRIPT = r"""
import sys, threading, erpy
levels = 1_000_000
inputs = [b"\x83" + (b"l\x00\x00\x00\x01") * levels + b"j" * (levels + 1),
          b"\x83" + b"h\x01" * levels + b"j",
          b"\x83" + (b"t\x00\x00\x00\x01") * levels + b"j" + b"a\x01" * levels]
deep = []
for _ in range(levels):
    deep = [deep]
key = {}
for _ in range(levels // 10):
    key = {1: key}
results = []
def work():
    for data in inputs:
        try:
            erpy.decode(data, max_depth=10**7)
        except erpy.DecodeError as e:
            results.append("stack" in str(e))
    try:
        erpy.encode(deep, max_depth=10**7)
    except erpy.EncodeError as e:
        results.append("stack" in str(e))
    try:
        erpy.freeze([key])
    except RecursionError:
        results.append(True)
    # Ordinary work still fits.
    results.append(erpy.decode(erpy.encode({"a": [1, (2, 3)]})) == {"a": [1, (2, 3)]})
threading.stack_size(int(sys.argv[1]))
t = threading.Thread(target=work)
t.start()
t.join()
print(results)
sys.exit(0 if results == [True] * 6 else 1)
"""


@pytest.mark.parametrize("stack", [64 * 1024, 256 * 1024, 1024 * 1024, 8 * 1024 * 1024])
def test_small_thread_stacks(stack):
    env = dict(os.environ, PYTHONPATH=PYTHONPATH)
    proc = subprocess.run([sys.executable, "-c", THREAD_SCRIPT, str(stack)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])
