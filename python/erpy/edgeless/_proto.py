"""The generated stubs (scripts/gen_proto.sh), with a clear error when they are missing."""

from __future__ import annotations

try:
    from google.protobuf import empty_pb2
    from ._gen import messages_pb2 as pb
    from ._gen import services_pb2_grpc as rpc
except ImportError as exc:  # pragma: no cover - a build step was skipped
    raise ImportError(
        f"erpy.edgeless needs grpcio, protobuf and its generated stubs ({exc}): install "
        "python3-grpcio python3-protobuf and run `make native` (scripts/gen_proto.sh)"
    ) from exc

__all__ = ["pb", "rpc", "empty_pb2", "EMPTY"]

EMPTY = empty_pb2.Empty()
