#!/usr/bin/env bash
# Generates the Python stubs of the EDGELESS guest API (proto/edgeless/*.proto) into
# python/erpy/edgeless/_gen/ with Debian's protoc and grpc_python_plugin (packages
# protobuf-compiler, protobuf-compiler-grpc, libprotobuf-dev for empty.proto). The
# generated modules import each other as top-level modules; they are made relative so
# that they live inside the erpy.edgeless package. Runs from `make native`; quiet and
# quick when the stubs are newer than the .proto files.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src="$root/proto/edgeless"
out="${1:-$root/python/erpy/edgeless/_gen}"
stamp="$out/services_pb2_grpc.py"

if [ -f "$stamp" ] && [ -z "$(find "$src" -name '*.proto' -newer "$stamp")" ]; then
  exit 0
fi
plugin="$(command -v grpc_python_plugin || true)"
if ! command -v protoc > /dev/null || [ -z "$plugin" ]; then
  echo "gen_proto: protoc and grpc_python_plugin are needed (scripts/setup.sh installs them)" >&2
  exit 1
fi
include=/usr/include
[ -f "$include/google/protobuf/empty.proto" ] || { echo "gen_proto: no google/protobuf/empty.proto (libprotobuf-dev)" >&2; exit 1; }

mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
protoc -I "$src" -I "$include" --python_out="$tmp" --grpc_out="$tmp" \
  --plugin=protoc-gen-grpc="$plugin" "$src/messages.proto" "$src/services.proto"
sed -i -E 's/^import (messages_pb2|services_pb2) as/from . import \1 as/' "$tmp"/*.py
printf '"""Generated at build time by scripts/gen_proto.sh from proto/edgeless/."""\n' > "$tmp/__init__.py"
cp "$tmp"/*.py "$out"/
