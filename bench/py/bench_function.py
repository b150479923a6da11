"""Functions and the gRPC client of bench/erpy_bench_function.erl (F1-F3).

As a module: the functions the bench hosts (Echo, Relay, Counter).
As a script: F2. It starts the guest (python3 -m erpy.edgeless --module
bench_function:Echo) and a bare grpcio echo server (--echo-server: GuestAPIFunction.Call
answering the message back, nothing else) as two processes alike, then times Call round
trips to each alternately from this process and prints one line per pair:
``pair GUEST_US ECHO_US`` (medians of the pair's calls), then ``done``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from erpy import function as fn


class Echo:
    def handle_call(self, src, msg):
        return msg


class Relay:
    """Passes each cast on to "next"."""

    def handle_cast(self, src, msg):
        fn.cast("next", msg)


class Counter:
    """State that is synced on each cast, and read back by a call."""

    def handle_init(self, payload, serialized_state):
        self.n = int(serialized_state or b"0")

    def handle_cast(self, src, msg):
        self.n += 1
        fn.sync(str(self.n))

    def handle_call(self, src, msg):
        return str(self.n)


def echo_server() -> None:
    from concurrent import futures

    import grpc

    from erpy.edgeless._proto import pb, rpc

    class Bare(rpc.GuestAPIFunctionServicer):
        def Call(self, request, context):
            return pb.CallReturn(type=pb.CALL_RET_REPLY, msg=request.msg)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=10))
    rpc.add_GuestAPIFunctionServicer_to_server(Bare(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"serving on port {port}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    server.stop(0)


def _spawn(args: list[str]) -> tuple[subprocess.Popen, int]:
    env = dict(os.environ)
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONPATH"] = os.pathsep.join([here, env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, *args], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    return proc, int(line.rsplit(" ", 1)[1])


def main(pairs: int, calls: int) -> None:
    import grpc

    from erpy.edgeless._proto import pb, rpc
    from erpy.edgeless.node_cli import NodeEmulator

    guest, gport = _spawn(["-m", "erpy.edgeless", "--module", "bench_function:Echo", "--port", "0",
                           "--address", "127.0.0.1", "--log-level", "warning"])
    bare, bport = _spawn([os.path.abspath(__file__), "--echo-server"])
    node = NodeEmulator(f"127.0.0.1:{gport}", "127.0.0.1:0", "bench", "echo", out=lambda _: None)
    channel = grpc.insecure_channel(f"127.0.0.1:{bport}")
    try:
        node.boot()
        node.init()
        stubs = {"guest": node.function, "echo": rpc.GuestAPIFunctionStub(channel)}
        req = pb.InputEventData(src=node.instance_id, msg=b"x" * 64)

        def run(which: str) -> float:
            call = stubs[which].Call
            lat = []
            for _ in range(calls):
                t0 = time.perf_counter_ns()
                ret = call(req, timeout=30)
                lat.append((time.perf_counter_ns() - t0) / 1000)
                assert ret.msg == req.msg
            return statistics.median(lat)
        run("guest"), run("echo")  # warm both
        for _ in range(pairs):
            print(f"pair {run('guest'):.1f} {run('echo'):.1f}", flush=True)
        print("done", flush=True)
    finally:
        node.close()
        channel.close()
        for proc in (guest, bare):
            if proc.stdin:
                proc.stdin.close()
            proc.terminate()
            proc.wait(10)


if __name__ == "__main__":
    if sys.argv[1:] == ["--echo-server"]:
        echo_server()
    else:
        main(int(sys.argv[1]), int(sys.argv[2]))
