"""erpy.edgeless: an erpy function (erpy.function) as an EDGELESS guest over gRPC.

    python3 -m erpy.edgeless --module my_function        # the guest, on port 7101
    python3 -m erpy.edgeless.node_cli                    # a node emulator to drive it

The guest serves ``GuestAPIFunction`` (Boot, Init, Cast, Call, Stop) and calls the node's
``GuestAPIHost`` for the function's host API; the wire definitions are the project's
``proto/edgeless/*.proto`` (a subset of EDGELESS's, same names and numbers), compiled to
``erpy/edgeless/_gen`` at build time. See doc/function.md.
"""

from __future__ import annotations

__all__ = ["DEFAULT_PORT"]

DEFAULT_PORT = 7101
