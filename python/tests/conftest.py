"""Golden ETF bytes, made by Erlang's term_to_binary during the test run.

One `erl` invocation per session turns every Erlang expression listed in GOLDEN_EXPRS (see
test_codec.py) into hex; tests that need them are skipped, with the reason, only when no
`erl` is installed.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

# Each entry: (name, Erlang expression, term_to_binary options).
GOLDEN: list[tuple[str, str, str]] = []


def golden_case(name: str, expr: str, opts: str = "[{minor_version, 2}]") -> str:
    GOLDEN.append((name, expr, opts))
    return name


@pytest.fixture(scope="session")
def golden() -> dict[str, bytes]:
    erl = shutil.which("erl")
    if erl is None:
        pytest.skip("erl is not installed: golden bytes are produced by Erlang at test time")
    parts = [f"{{<<\"{name}\">>, fun() -> {expr} end, {opts}}}" for name, expr, opts in GOLDEN]
    program = (
        "lists:foreach(fun({N, F, O}) -> "
        "io:format(\"~s ~s~n\", [N, binary:encode_hex(term_to_binary(F(), O))]) end, ["
        + ",\n".join(parts)
        + "]), halt()."
    )
    proc = subprocess.run(
        [erl, "-noshell", "-eval", program],
        capture_output=True, text=True, timeout=120,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"erl failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    out = {}
    for line in proc.stdout.splitlines():
        name, _, hexdata = line.partition(" ")
        out[name] = bytes.fromhex(hexdata)
    missing = [n for n, _, _ in GOLDEN if n not in out]
    if missing:
        raise RuntimeError(f"erl printed no bytes for {missing}:\n{proc.stdout}\n{proc.stderr}")
    return out
