#!/usr/bin/env bash
# Installs the Debian packages erpy needs to build and test. Idempotent and quiet when
# everything is present (it runs at the start of every make target). As root it runs
# apt-get itself; otherwise it prints the exact command to run and exits 1.
set -euo pipefail

packages=(
  build-essential cmake pkg-config
  clang libclang-rt-14-dev          # libFuzzer and the sanitizer runtimes
  llvm-14                           # llvm-symbolizer: sanitizer reports with names and lines
  zlib1g-dev                        # compressed terms (tag 80)
  libssl-dev openssl                # TLS distribution of the Python node (c_src/node/tls.cpp), test certificates
  libgtest-dev
  erlang-nox erlang-dev erlang-common-test erlang-eunit rebar3
  elixir
  python3 python3-dev libpython3.11-dev python3-pytest python3-venv
  python3-msgpack                   # a reference of the W5 bench (bench/erpy_bench_w5.erl)
  valgrind                          # W5 in instructions (callgrind, bench/erpy_bench_w5.erl)
  # The EDGELESS guest (erpy.edgeless): gRPC and protobuf for Python, and protoc with the
  # gRPC plugin and the well-known .proto files to generate its stubs (scripts/gen_proto.sh).
  python3-grpcio python3-protobuf protobuf-compiler protobuf-compiler-grpc libprotobuf-dev
  erlang-mnesia                     # function state store (erpy_function)
)

# `setup.sh --list`: the packages, one a line (scripts/footprint.py reads them).
if [ "${1:-}" = "--list" ]; then
  printf '%s\n' "${packages[@]}"
  exit 0
fi

# One dpkg-query for all of them: packages it does not know are simply not printed.
installed=" $({ dpkg-query -W -f='${db:Status-Status}:${Package} ' "${packages[@]}" 2>/dev/null || true; } \
  | tr ' ' '\n' | sed -n 's/^installed://p' | tr '\n' ' ') "
missing=()
for p in "${packages[@]}"; do
  case "$installed" in *" $p "*) ;; *) missing+=("$p") ;; esac
done

[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "erpy setup: missing Debian packages: ${missing[*]}" >&2
  echo "Run as root (or with sudo), then run make again:" >&2
  echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi

echo "erpy setup: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
start=$(date +%s)
before=$(dpkg-query -W -f='${db:Status-Status}\n' 2>/dev/null | grep -c '^installed$' || true)
apt-get update -q
# Only what erpy needs: recommended packages (documentation, GUIs) are left out.
apt-get install -y -q --no-install-recommends "${missing[@]}"
after=$(dpkg-query -W -f='${db:Status-Status}\n' 2>/dev/null | grep -c '^installed$' || true)
echo "erpy setup: installed $((after - before)) packages (${missing[*]} and what they need) in $(( $(date +%s) - start )) s" >&2
