"""erpy.beam (and its alias beam_bpy): Beam-BPy's BeamServer on erpy's node mode. The
settings and the dispatch here; calls from real Erlang and Elixir nodes, with the seed's
own examples, in test/erpy_dropin_SUITE.erl."""

from __future__ import annotations

import shutil
import uuid

import pytest

from erpy import Atom
from erpy import beam
from erpy.node import Node, ensure_epmd

ENV = ("BPY_BEAM_NODE", "BPY_BEAM_COOKIE", "BPY_BEAM_HOST", "BPY_BEAM_PORT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def epmd() -> None:
    if shutil.which("epmd") is None and shutil.which("erl") is None:
        pytest.skip("epmd is not installed (erlang-base)")
    ensure_epmd()


def test_alias_module_is_the_same_class():
    from beam_bpy import BeamServer, get_beam_server
    assert BeamServer is beam.BeamServer
    assert get_beam_server is beam.get_beam_server


def test_seed_defaults():
    s = beam.BeamServer()
    assert (s.node_name, s.cookie, s.host, s.port) == ("beam_bpy", "beam_bpy_cookie", "localhost", 0)
    # localhost is 127.0.0.1 in the node's name: what the seed's Elixir client connects to.
    assert s.full_name == "beam_bpy@127.0.0.1"
    assert s.get_address() == "beam_bpy@127.0.0.1:0"
    assert not s.is_initialized() and not s.is_connected()


def test_environment_is_read_by_the_library(monkeypatch):
    monkeypatch.setenv("BPY_BEAM_NODE", "envnode")
    monkeypatch.setenv("BPY_BEAM_COOKIE", "envcookie")
    monkeypatch.setenv("BPY_BEAM_HOST", "127.0.0.1")
    monkeypatch.setenv("BPY_BEAM_PORT", "4567")
    s = beam.BeamServer()
    assert (s.node_name, s.cookie, s.host, s.port) == ("envnode", "envcookie", "127.0.0.1", 4567)
    assert s.get_address() == "envnode@127.0.0.1:4567"
    # Arguments given to the constructor win over the environment.
    s = beam.BeamServer(node_name="mine", cookie="c", host="localhost", port=0)
    assert (s.node_name, s.cookie, s.port) == ("mine", "c", 0)


def test_full_node_name_is_kept():
    assert beam.BeamServer(node_name="x@10.0.0.1").full_name == "x@10.0.0.1"


def test_dispatch_by_name():
    s = beam.BeamServer()
    s.register_handler("ping", lambda args: "pong")
    s.register_handler("echo", lambda args: args)
    s.register_handler("boom", lambda args: 1 / 0)
    s.register_handler("nothing", lambda args: [None, {"k": None}, (None,)])
    assert s.call_handler("ping", []) == "pong"             # Elixir: a binary
    assert s.call_handler([112, 105, 110, 103], []) == "pong"  # Erlang: a charlist
    assert s.call_handler(Atom("ping"), []) == "pong"
    assert s.call_handler(b"echo", ["a", 1]) == ["a", 1]
    assert s.call_handler("nope", []) == (Atom("error"), "Unknown function: nope")
    err = s.call_handler("boom", [])
    assert err[0] == "error" and err[1].startswith("ZeroDivisionError")
    assert s.call_handler("nothing", []) == [Atom("nil"), {"k": Atom("nil")}, (Atom("nil"),)]
    s.unregister_handler("ping")
    assert s.call_handler("ping", [])[0] == "error"


def test_start_serves_rpc_and_start_twice_is_false(epmd):
    name = f"bpyt_{uuid.uuid4().hex[:8]}"
    s = beam.BeamServer(node_name=name, cookie="bpy_test_cookie", host="localhost", port=0)
    s.register_handler("ping", lambda args: "pong")
    s.register_handler("my_operation", lambda args: {"status": "processed", "data": args})
    assert s.start() is True
    try:
        assert s.is_initialized()
        assert s.port > 0 and s.get_address() == f"{name}@127.0.0.1:{s.port}"
        assert s.start() is False  # already running
        # Another server cannot take the same name: start() says so.
        assert beam.BeamServer(node_name=name, cookie="bpy_test_cookie").start() is False
        with Node(f"bpyc_{uuid.uuid4().hex[:8]}@127.0.0.1", "bpy_test_cookie") as client:
            target = f"{name}@127.0.0.1"
            assert client.rpc(target, "Elixir.MyModule", "call_handler", ["ping", []]) == "pong"
            assert client.rpc(target, "Elixir.BeamServer", "handle_rpc",
                              ["my_operation", ["arg1", "arg2"]]) == \
                {"status": "processed", "data": ["arg1", "arg2"]}
            # Late registration is seen at once.
            s.register_handler("late", lambda args: 1)
            assert client.rpc(target, "Elixir.BeamServer", "handle_rpc", ["late", []]) == 1
            assert s.is_connected()
    finally:
        s.stop()
    assert not s.is_initialized()


def test_variant_codec_aliases():
    import io
    buf = io.BytesIO()
    beam.ErlangVariantEncoder.encode_variant(buf, {"a": None})
    assert beam.ErlangVariantDecoder.decode_variant(buf.getvalue()) == {"a": None}
