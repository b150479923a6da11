"""Throughput of erpy.encode / erpy.decode on W5's term: a list of 10,000 maps
#{<<"id">> => I, <<"name">> => <<"item">>, <<"score">> => 1.5}.

    PYTHONPATH=python python3 python/tests/bench_codec.py [--rounds N]

Prints MB/s of ETF for decode, encode (single pass, the default) and the two-pass encoder
kept for comparison, best of N rounds. Not a pytest module (no test_ prefix).
"""

from __future__ import annotations

import argparse
import time

import erpy
from erpy import _native


def w5_term(n: int = 10_000) -> list:
    return [{"id": i, "name": "item", "score": 1.5} for i in range(n)]


def best(fn, arg, rounds: int, inner: int) -> float:
    """Best time per call in seconds."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn(arg)
        times.append((time.perf_counter() - t0) / inner)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--inner", type=int, default=20)
    args = ap.parse_args()

    term = w5_term()
    data = erpy.encode(term)
    assert erpy.decode(data) == term
    assert _native._encode_two_pass(term) == data
    mb = len(data) / 1e6
    t_dec = best(erpy.decode, data, args.rounds, args.inner)
    t_enc = best(erpy.encode, term, args.rounds, args.inner)
    t_enc2 = best(_native._encode_two_pass, term, args.rounds, args.inner)
    print(f"W5 term: {len(data)} bytes of ETF")
    print(f"decode            {t_dec * 1e3:8.3f} ms  {mb / t_dec:8.1f} MB/s")
    print(f"encode            {t_enc * 1e3:8.3f} ms  {mb / t_enc:8.1f} MB/s")
    print(f"encode (2 passes) {t_enc2 * 1e3:8.3f} ms  {mb / t_enc2:8.1f} MB/s")
    rt = t_dec + t_enc
    print(f"decode+encode     {rt * 1e3:8.3f} ms  {2 * mb / rt:8.1f} MB/s (bytes decoded + encoded)")
    print(f"                                {mb / rt:8.1f} MB/s (term size / round-trip time)")


if __name__ == "__main__":
    main()
