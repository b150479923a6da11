"""The Python side of an erpy port worker: ``python -m erpy.worker``.

Erlang starts this with the protocol on file descriptors 3 (requests in) and 4 (answers
out); the framing and the dispatch loop are C++ (``erpy._native.serve_port``). Not meant
to be run by hand.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    try:
        os.fstat(3)
        os.fstat(4)
    except OSError:
        print("erpy.worker: run by erpy's port pools, with the protocol on fds 3 and 4",
              file=sys.stderr)
        return 2
    from erpy import _native
    return _native.serve_port(3, 4)


if __name__ == "__main__":
    sys.exit(main())
