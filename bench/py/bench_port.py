"""Port helper of the benchmarks: runs a workload on command and reports its cost.

Frames are {packet, 4}. Commands (first byte):
  V                 -> the Python version and where erpy was imported from
  L <ETF bytes>     -> keep these bytes for W5; answers b"ok" if decode+encode gives them
                       back exactly, else b"mismatch"
  R <K:32>          -> K rounds of erpy.encode(erpy.decode(bytes)); answers
                       <wall ns:64><cpu ns:64> (perf_counter_ns, process_time_ns)
The protocol is raw bytes on purpose: the codec under test is not used for control.
"""
import struct
import sys
import time

import erpy


def read_frame(stream):
    header = stream.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack(">I", header)
    data = stream.read(size)
    return data if len(data) == size else None


def main():
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    data = b""
    decode, encode = erpy.decode, erpy.encode
    while True:
        frame = read_frame(stdin)
        if frame is None:
            return
        cmd, arg = frame[:1], frame[1:]
        if cmd == b"V":
            reply = f"{sys.version.split()[0]} {erpy.__file__}".encode()
        elif cmd == b"L":
            data = bytes(arg)
            reply = b"ok" if encode(decode(data)) == data else b"mismatch"
        elif cmd == b"R":
            (k,) = struct.unpack(">I", arg)
            c0, w0 = time.process_time_ns(), time.perf_counter_ns()
            for _ in range(k):
                encode(decode(data))
            w1, c1 = time.perf_counter_ns(), time.process_time_ns()
            reply = struct.pack(">QQ", w1 - w0, c1 - c0)
        else:
            reply = b"unknown command"
        stdout.write(struct.pack(">I", len(reply)) + reply)
        stdout.flush()


if __name__ == "__main__":
    main()
