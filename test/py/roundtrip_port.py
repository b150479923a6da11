"""Port helper of erpy_codec_SUITE: decodes every frame with erpy and sends it re-encoded.

Frames are {packet, 4}: a 4-byte big-endian length, then ETF bytes. A frame that fails
to decode or encode is answered with the encoding of {error, TypeName, Message}, so the
suite can tell which term failed and why. End of input ends the script.
"""
import struct
import sys

import erpy


def read_exact(stream, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def answer(frame):
    try:
        return erpy.encode(erpy.decode(frame))
    except Exception as exc:  # Every failure goes back to Erlang, which reports it.
        return erpy.encode((erpy.Atom("error"), type(exc).__name__, str(exc)))


def main():
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        header = read_exact(stdin, 4)
        if header is None:
            return
        (size,) = struct.unpack(">I", header)
        frame = read_exact(stdin, size)
        if frame is None:
            return
        reply = answer(frame)
        stdout.write(struct.pack(">I", len(reply)))
        stdout.write(reply)
        stdout.flush()


if __name__ == "__main__":
    main()
