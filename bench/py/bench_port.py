"""Port helper of the benchmarks: runs a workload on command and reports its cost.

Frames are {packet, 4}. Commands (first byte):
  V                 -> the Python version and where erpy was imported from
  L <ETF bytes>     -> keep these bytes for W5, and the same objects serialized by each
                       reference codec; answers b"ok <codec> <codec> ..." (the codecs whose
                       round trip gives the objects back, erpy's exactly its bytes), else an
                       error text
  R <codec:8> <K:32>
                    -> K round trips with that codec (a byte of CODECS: b"e" erpy, ...);
                       answers <wall ns:64><cpu ns:64> (perf_counter_ns, process_time_ns)
  S <codec:8>       -> the size of that codec's serialized form, as text
A round trip is what W5 measures for erpy: decode the stored bytes into objects, encode
those objects again (erpy.encode(erpy.decode(b)), marshal.dumps(marshal.loads(b)), ...).
The protocol is raw bytes on purpose: the codec under test is not used for control.
"""
import marshal
import pickle
import struct
import sys
import time

import erpy

try:  # Debian's python3-msgpack (its C extension); the bench notes when it is missing
    import msgpack
except ImportError:
    msgpack = None


def read_frame(stream):
    header = stream.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    data = stream.read(size)
    return data if len(data) == size else None


def codecs():
    """code byte -> (name, dumps, loads); each round trip is dumps(loads(stored))."""
    table = {
        b"e": ("erpy", erpy.encode, erpy.decode),
        b"m": ("marshal", marshal.dumps, marshal.loads),
        b"p": ("pickle", lambda o: pickle.dumps(o, protocol=5), pickle.loads),
    }
    if msgpack is not None:
        table[b"g"] = ("msgpack", msgpack.packb, msgpack.unpackb)
    return table


def rounds(dumps, loads, stored, k):
    c0, w0 = time.process_time_ns(), time.perf_counter_ns()
    for _ in range(k):
        dumps(loads(stored))
    w1, c1 = time.perf_counter_ns(), time.process_time_ns()
    return struct.pack(">QQ", w1 - w0, c1 - c0)


def load(data, table):
    """The stored form of each codec that gives the objects back; None if erpy fails."""
    obj = erpy.decode(data)
    if erpy.encode(obj) != data:
        return None
    stored = {b"e": data}
    for code, (_, dumps, loads) in table.items():
        if code != b"e":
            try:
                form = dumps(obj)
                if loads(form) == obj:
                    stored[code] = form
            except Exception:  # a codec that cannot carry this term is left out
                pass
    return stored


def main():
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    table = codecs()
    stored = {}
    while True:
        frame = read_frame(stdin)
        if frame is None:
            return
        cmd, arg = frame[:1], frame[1:]
        if cmd == b"V":
            reply = f"{sys.version.split()[0]} {erpy.__file__}".encode()
        elif cmd == b"L":
            stored = load(bytes(arg), table) or {}
            names = [table[code][0] for code in table if code in stored]
            reply = b"ok " + " ".join(names).encode() if stored else b"mismatch"
        elif cmd == b"R" and arg[:1] in stored:
            (k,) = struct.unpack(">I", arg[1:5])
            _, dumps, loads = table[arg[:1]]
            reply = rounds(dumps, loads, stored[arg[:1]], k)
        elif cmd == b"S" and arg[:1] in stored:
            reply = str(len(stored[arg[:1]])).encode()
        else:
            reply = b"unknown command"
        stdout.write(struct.pack(">I", len(reply)) + reply)
        stdout.flush()


if __name__ == "__main__":
    main()
