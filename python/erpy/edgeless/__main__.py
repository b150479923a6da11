"""python3 -m erpy.edgeless: run a function as an EDGELESS guest (see erpy.edgeless.guest).

Settings: flags, else the environment (as the EDGELESS Python runtime's container):
``--module`` / FUNCTION, ``--port`` / PORT (7101), ``--max-workers`` / MAX_WORKERS (10),
``--log-level`` / LOG_LEVEL (INFO), ``--address`` / ADDRESS ([::]).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from . import DEFAULT_PORT

DEFAULT_MODULE = "erpy.edgeless.example"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"erpy.edgeless: {name} must be an integer, got {value!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m erpy.edgeless",
        description="Serve a Python function (erpy.function) as an EDGELESS guest over gRPC.")
    p.add_argument("--module", default=os.environ.get("FUNCTION", DEFAULT_MODULE),
                   help="the function: 'module' or 'module:Class' (env FUNCTION; "
                        f"default {DEFAULT_MODULE}, the node_cli demo function)")
    p.add_argument("--port", type=int, default=_env_int("PORT", DEFAULT_PORT),
                   help=f"TCP port to listen on (env PORT; default {DEFAULT_PORT}; 0: any)")
    p.add_argument("--address", default=os.environ.get("ADDRESS", "[::]"),
                   help="address to listen on (env ADDRESS; default [::], all)")
    p.add_argument("--max-workers", type=int, default=_env_int("MAX_WORKERS", 10),
                   help="gRPC threads (env MAX_WORKERS; default 10)")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"),
                   help="DEBUG, INFO, WARNING, ERROR (env LOG_LEVEL; default INFO)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    level = logging.getLevelName(args.log_level.upper())
    if not isinstance(level, int):
        print(f"erpy.edgeless: unknown log level {args.log_level!r}", file=sys.stderr)
        return 2
    if args.max_workers < 1 or not 0 <= args.port <= 65535:
        print("erpy.edgeless: --max-workers must be >= 1 and --port 0-65535", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .guest import serve
    try:
        server, port, servicer = serve(args.module, args.port, args.address, args.max_workers)
    except (ImportError, TypeError, ValueError, OSError) as exc:
        print(f"erpy.edgeless: {exc}", file=sys.stderr)
        return 1
    # The port on stdout first, so a parent that asked for port 0 can read it.
    print(f"erpy.edgeless: serving {args.module} on port {port}", flush=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    server.stop(grace=1).wait()
    servicer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
