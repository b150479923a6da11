"""W5 in instructions: K round trips of one codec over the term in FILE, to be run under
valgrind's callgrind (bench/erpy_bench_w5.erl runs it twice, with two K, and takes the
difference, so start-up and loading cancel out).

usage: w5_count.py erpy|marshal K FILE
"""

import marshal
import sys

import erpy


def main():
    codec, k, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    with open(path, "rb") as f:
        data = f.read()
    if codec == "erpy":
        dumps, loads, stored = erpy.encode, erpy.decode, data
    elif codec == "marshal":
        dumps, loads = marshal.dumps, marshal.loads
        stored = marshal.dumps(erpy.decode(data))
    else:
        raise SystemExit("unknown codec " + codec)
    for _ in range(k):
        dumps(loads(stored))


if __name__ == "__main__":
    main()
