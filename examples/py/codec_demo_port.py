"""The Python half of `make demo`: decodes each {packet, 4} frame with erpy, shows what
it got (on stderr, since stdout carries the frames) and sends it back re-encoded."""
import struct
import sys

import erpy


def main():
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while (header := stdin.read(4)) and len(header) == 4:
        frame = stdin.read(struct.unpack(">I", header)[0])
        obj = erpy.decode(frame)
        print(f"python received: {obj!r}", file=sys.stderr, flush=True)
        for key, value in obj.items():
            print(f"  {key!r:>12} -> {type(value).__name__}", file=sys.stderr, flush=True)
        reply = erpy.encode(obj)
        stdout.write(struct.pack(">I", len(reply)) + reply)
        stdout.flush()


if __name__ == "__main__":
    main()
