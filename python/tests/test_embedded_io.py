"""The pure-Python side of embedded mode: erpy.erlang's backend choice and the stdout /
stderr line buffers that hand print() output to the Erlang logger. The NIF itself is
tested through the VM (test/erpy_embedded_SUITE.erl)."""

from __future__ import annotations

import sys
import types

import pytest

from erpy import Atom, erlang
from erpy import _embedded_io


@pytest.fixture
def fake_embedded(monkeypatch):
    """A stand-in for the module the NIF provides inside the VM."""
    calls = []
    mod = types.ModuleType("erpy._embedded")
    mod.log = lambda stream, text: calls.append((stream, text)) or True
    mod.erlang_call = lambda m, f, a: ("call", m, f, a)
    mod.erlang_apply = lambda m, f, a: ("apply", m, f, a)
    mod.erlang_send = lambda d, msg: calls.append(("send", d, msg))
    mod.erlang_self = lambda: "pid"
    monkeypatch.setitem(sys.modules, "erpy._embedded", mod)
    return calls


def test_backend_is_the_nif_inside_the_vm(fake_embedded):
    assert erlang.call("lists", "sort", [3, 1]) == ("call", "lists", "sort", [3, 1])
    assert erlang.apply("erlang", "max", (1, 2)) == ("apply", "erlang", "max", [1, 2])
    assert erlang.self() == "pid"
    erlang.send("name", 1)
    assert fake_embedded == [("send", "name", 1)]


def test_backend_outside_the_vm_is_the_port_worker():
    assert "erpy._embedded" not in sys.modules
    # Not inside a port worker either: the extension says there is no Erlang to talk to.
    with pytest.raises(erlang.ErlangPortError):
        erlang.self()


def test_log_stream_hands_over_whole_lines(fake_embedded):
    s = _embedded_io.LogStream("stdout", sys.__stdout__)
    assert s.write("hello ") == 6
    assert fake_embedded == []
    s.write("world\nsecond\nthird")
    assert fake_embedded == [(Atom("stdout"), "hello world"), (Atom("stdout"), "second")]
    s.flush()
    assert fake_embedded[-1] == (Atom("stdout"), "third")
    assert isinstance(fake_embedded[0][0], Atom)


def test_log_stream_falls_back_outside_contexts(monkeypatch, capsys):
    mod = types.ModuleType("erpy._embedded")
    mod.log = lambda stream, text: False  # not a context thread
    monkeypatch.setitem(sys.modules, "erpy._embedded", mod)
    s = _embedded_io.LogStream("stderr", sys.stderr)
    s.write("to the real stream\n")
    assert "to the real stream" in capsys.readouterr().err


def test_log_stream_refuses_bytes(fake_embedded):
    s = _embedded_io.LogStream("stdout", sys.__stdout__)
    with pytest.raises(TypeError):
        s.write(b"bytes")  # type: ignore[arg-type]
