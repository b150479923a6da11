# erpy: the one entry point. `make` builds everything, `make test` runs every test,
# `make demo` the demo, `make bench` the benchmarks, `make shell` an Erlang shell with
# erpy started. Each target first checks the Debian packages (scripts/setup.sh): as root
# it installs what is missing, otherwise it prints the apt-get line to run.

# The Python interpreter the extension is built for and every test runs with. Debian's
# /usr/bin/python3 by default: its packages (python3-dev, python3-pytest) are what setup
# installs, so `make test` works on a fresh machine. Another interpreter (a pyenv or a
# venv) works too when it has its headers and pytest: `make test PYTHON=/path/to/python3`.
PYTHON ?= /usr/bin/python3

ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
FUZZ_SECONDS ?= 600
FUZZ_CI_SECONDS ?= 30
FUZZERS := fuzz_etf_decode fuzz_py_decode
GOLDEN := $(ROOT)/_build/golden/cases.tsv
# Extra CMake options for every native build, e.g. CMAKE_ARGS=-DERPY_WERROR=OFF.
CMAKE_ARGS ?=
MAKEFLAGS += --no-print-directory

# Seen by the Common Test suites, the bench and demo helpers, and the rebar3 hook.
export ERPY_PYTHON := $(PYTHON)
export ERPY_ROOT := $(ROOT)
# rebar3 needs no network (there are no hex dependencies) but does need a writable HOME
# and cache directory; CI environments may have neither.
export REBAR_OFFLINE := 1
export HOME := $(if $(HOME),$(HOME),$(ROOT)/_build/home)
export REBAR_CACHE_DIR ?= $(ROOT)/_build/rebar3-cache
# The Makefile builds the native parts itself, so rebar3's pre-compile hook skips them.
REBAR := ERPY_SKIP_NATIVE=1 rebar3
PYENV := PYTHONPATH=$(ROOT)/python$(if $(PYTHONPATH),:$(PYTHONPATH))
CMAKE_CONFIGURE := cmake --log-level=WARNING -S . -DERPY_PYTHON=$(PYTHON) $(CMAKE_ARGS)

.NOTPARALLEL:
.PHONY: all setup native erlang golden test test-cpp test-asan test-tsan test-tsan-node test-py test-eunit \
        test-ct test-elixir dialyzer \
        fuzz-build fuzz-ci fuzz run-fuzzers demo bench shell clean

all: setup native erlang

setup:
	@scripts/setup.sh

## Builds

native: setup
	@$(CMAKE_CONFIGURE) -B _build/native -DCMAKE_BUILD_TYPE=Release
	@cmake --build _build/native -j$(JOBS)
	@# Port workers run the interpreter the extension was built for (erpy_config:built_python/0).
	@command -v $(PYTHON) > priv/python.path
	@# The EDGELESS guest's gRPC stubs, from proto/edgeless (erpy.edgeless, doc/function.md).
	@scripts/gen_proto.sh
	@# Bytecode for erpy's own modules, so that no worker or node compiles them at start
	@# (with PYTHONDONTWRITEBYTECODE set, Python would compile them in every process).
	@$(PYTHON) -m compileall -q python/erpy

erlang: setup
	@$(REBAR) compile

## Tests

test: setup native erlang golden test-cpp test-asan test-tsan test-tsan-node test-py test-eunit dialyzer \
      test-ct test-elixir fuzz-ci
	@echo "make test: every step passed"

# Golden ETF bytes, written by this machine's Erlang for the C++ tests (and as fuzz seeds).
golden: setup
	@escript test/golden/gen_golden.escript $(GOLDEN) --corpus _build/golden/corpus

test-cpp: native golden
	@ERPY_GOLDEN_FILE=$(GOLDEN) ctest --test-dir _build/native --output-on-failure

# Also the NIF: built with the sanitizers into _build/asan/nif and loaded by a VM with
# libasan preloaded (leak checking off there: the VM and Python keep memory until exit).
ASAN_PRELOAD = $(shell gcc -print-file-name=libasan.so):$(shell gcc -print-file-name=libubsan.so)

test-asan: setup golden erlang
	@$(CMAKE_CONFIGURE) -B _build/asan -DCMAKE_BUILD_TYPE=Debug -DERPY_SANITIZE=ON
	@cmake --build _build/asan -j$(JOBS)
	@ERPY_GOLDEN_FILE=$(GOLDEN) ASAN_OPTIONS=detect_leaks=1 \
	  UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  ctest --test-dir _build/asan --output-on-failure
	@ERPY_NIF_DIR=$(ROOT)/_build/asan/nif LD_PRELOAD=$(ASAN_PRELOAD) \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(PYENV) escript test/asan/embedded_smoke.escript
	@# The node core (erpy._node, built into _build/asan/node) under a concurrent stress run;
	@# Python's own allocator is off so that the sanitizer sees Python objects too.
	@LD_PRELOAD=$(ASAN_PRELOAD) PYTHONMALLOC=malloc \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	  $(PYENV) $(PYTHON) test/sanitize/node_stress.py --native _build/asan/node --seconds 10

# The node core's threads under ThreadSanitizer: its C++ tests (the send queue among them)
# and the concurrent stress run (nodes calling, sending, monitoring, linking and cancelling
# across each other, a peer that stops reading, an Erlang peer). Any report fails it.
TSAN_PRELOAD = $(shell gcc -print-file-name=libtsan.so)

test-tsan-node: setup
	@$(CMAKE_CONFIGURE) -B _build/tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DERPY_TSAN=ON
	@cmake --build _build/tsan -j$(JOBS) --target erpy_node erpy_node_tests
	@TSAN_OPTIONS=halt_on_error=1 _build/tsan/erpy_node_tests --gtest_brief=1
	@LD_PRELOAD=$(TSAN_PRELOAD) TSAN_OPTIONS=halt_on_error=1:exitcode=66:suppressions=$(ROOT)/test/sanitize/tsan.supp \
	  $(PYENV) $(PYTHON) test/sanitize/node_stress.py --native _build/tsan/node --seconds 20

# The NIF pool under ThreadSanitizer: built into _build/tsan/nif and loaded by a VM with
# libtsan preloaded, which runs a concurrent stress of the pool (test/tsan). The VM is
# started without the `erl` shell script (dash crashes with libtsan preloaded), and TSan
# checks only our instrumented code: the VM and Python are not instrumented, so reports
# from their own calls (ignore_noninstrumented_modules) and lock-order graphs over the
# VM's many locks (detect_deadlocks) are left out. Exit code 66: TSan reported a race.
TSAN_LIB = $(shell gcc -print-file-name=libtsan.so)
ERL_ROOT_DIR = $(shell erl -noshell -eval 'io:format("~s", [code:root_dir()]), halt().')
ERTS_BIN_DIR = $(wildcard $(ERL_ROOT_DIR)/erts-*/bin)

test-tsan: setup erlang
	@$(CMAKE_CONFIGURE) -B _build/tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DERPY_TSAN=ON
	@cmake --build _build/tsan --target erpy_nif -j$(JOBS)
	@ERPY_NIF_DIR=$(ROOT)/_build/tsan/nif $(PYENV) \
	  ROOTDIR=$(ERL_ROOT_DIR) BINDIR=$(ERTS_BIN_DIR) EMU=beam PROGNAME=erl \
	  ESCRIPT_EMULATOR=$(ERTS_BIN_DIR)/erlexec LD_PRELOAD=$(TSAN_LIB) \
	  TSAN_OPTIONS="halt_on_error=1 exitcode=66 second_deadlock_stack=1 detect_deadlocks=0 ignore_noninstrumented_modules=1 report_signal_unsafe=0 suppressions=$(ROOT)/test/tsan/suppressions.txt" \
	  escript test/tsan/nif_stress.escript

test-py: native
	@$(PYENV) $(PYTHON) -m pytest -q -p no:cacheprovider python/tests

test-eunit: setup
	@$(REBAR) eunit

# Type specs checked against the code (the first run builds the PLT, about a minute).
dialyzer: setup
	@$(REBAR) dialyzer

test-ct: native
	@$(REBAR) ct

# The Elixir package (elixir/): ExUnit tests and the doctests of its docs, with Mix,
# offline (no Hex dependency).
test-elixir: native
	@cd elixir && MIX_ENV=test mix test

## Fuzzing: each fuzzer starts from its seed corpus plus the golden cases, in a
## writable copy under _build/fuzz/corpus-work/. Crashes land in _build/fuzz/artifacts/.

fuzz-build: setup
	@CXX=clang++ CC=clang $(CMAKE_CONFIGURE) -B _build/fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DERPY_FUZZ=ON
	@cmake --build _build/fuzz -j$(JOBS)

fuzz-ci: fuzz-build golden
	@$(MAKE) -s run-fuzzers SECONDS=$(FUZZ_CI_SECONDS)

fuzz: fuzz-build golden
	@$(MAKE) -s run-fuzzers SECONDS=$(FUZZ_SECONDS)

run-fuzzers:
	@mkdir -p _build/fuzz/artifacts
	@set -e; for f in $(FUZZERS); do \
	  work=_build/fuzz/corpus-work/$$f; log=_build/fuzz/$$f.log; \
	  mkdir -p $$work; \
	  if [ -d c_src/fuzz/corpus/$$f ]; then cp -r c_src/fuzz/corpus/$$f/. $$work/; fi; \
	  cp -r _build/golden/corpus/. $$work/; \
	  echo "fuzzing $$f for $(SECONDS) s (log: $$log)"; \
	  if ! $(PYENV) _build/fuzz/$$f -max_total_time=$(SECONDS) -rss_limit_mb=2048 -timeout=10 \
	      -artifact_prefix=_build/fuzz/artifacts/$$f- $$work > $$log 2>&1; then \
	    tail -n 60 $$log; echo "$$f FAILED; the input is in _build/fuzz/artifacts/"; exit 1; \
	  fi; \
	  grep -E '^Done [0-9]+ runs' $$log | sed "s/^/$$f: /"; \
	done

## Running

demo: all
	@$(PYENV) escript examples/codec_demo.escript
	@escript examples/port_demo.escript
	@$(PYENV) escript examples/embedded_demo.escript
	@$(PYENV) escript examples/node_demo.escript

bench: all
	@$(PYENV) escript bench/run_bench.escript

shell: all
	@erl -pa _build/default/lib/erpy/ebin -eval 'application:ensure_all_started(erpy)'

clean:
	rm -rf _build python/erpy/_native*.so priv/*.so python/erpy/edgeless/_gen
	find python test bench examples -name __pycache__ -type d -prune -exec rm -rf {} +
