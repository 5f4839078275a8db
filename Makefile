# From a fresh clone: `make run` starts the embedded dev setup, `make test` runs everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

LOCK_VENV ?= .venv-lock

.PHONY: run test test-cluster cluster-tools lint typecheck unit integration edge-uvicorn bench lock promtool clean

# Quiet recipes: `make run` prints only what `cp-token dev` prints (the curl lines on stdout).
$(STAMP): pyproject.toml cp_token/__init__.py
	@echo "setting up $(VENV) (once)" >&2
	@# the dev test pastes the printed curl lines into a shell, as a user would
	@command -v curl >/dev/null || (apt-get update -qq && apt-get install -y -qq curl) >&2
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip >&2
	@$(BIN)/python -m pip install -q -e '.[server,dev]' >&2
	@touch $(STAMP)

run: $(STAMP)
	@$(BIN)/cp-token dev

lint: $(STAMP)
	$(BIN)/ruff check cp_token sidecar tests bench examples
	$(BIN)/ruff format --check cp_token sidecar tests bench examples
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

# promtool checks and unit-tests the alerts and parses the dashboard's expressions
# (tests/unit/test_observability.py): from Debian's prometheus package, as curl and wrk are.
promtool:
	@command -v promtool >/dev/null || (apt-get update -qq \
	  && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus) >&2

test: $(STAMP) promtool lint typecheck edge-uvicorn
	$(BIN)/python -m pytest -q -p no:cacheprovider

# The cluster tier: a real kube-apiserver, etcd and kubectl built from their Go modules (Go >= 1.26
# and the Go module proxy; first build several minutes, then cached outside the repository by
# the hash of tests/cluster/tools: see CONTRIBUTING.md), the project's manifests applied, every
# flow run against it.
cluster-tools:
	@tests/cluster/build.sh >/dev/null

test-cluster: $(STAMP) cluster-tools
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/cluster

# cp_token/http/edge.py subclasses uvicorn's HTTP protocol classes: its tests run again on the
# oldest and the newest uvicorn that pyproject's pin allows, each installed alone (no deps)
# into a directory that shadows the venv's copy (tests/integration/test_edge.py checks which
# version it ran on).
UVICORN_PIN := $(shell sed -n 's/^ *"\(uvicorn[<>=!~][^"]*\)",.*/\1/p' pyproject.toml)
UVICORN_OLDEST := $(shell echo '$(UVICORN_PIN)' | sed -n 's/.*>=\([0-9.]*\).*/\1/p')
EDGE_TESTS := tests/integration/test_edge.py tests/unit/http/test_framing.py
edge-uvicorn: $(STAMP)
	@for spec in 'uvicorn==$(UVICORN_OLDEST)' '$(UVICORN_PIN)'; do \
	  dir=$(VENV)/uvicorn-edge; rm -rf $$dir; \
	  $(BIN)/python -m pip install -q --no-deps --target $$dir "$$spec" >&2 || exit 1; \
	  version=$$(PYTHONPATH=$$dir $(BIN)/python -c 'import uvicorn; print(uvicorn.__version__)'); \
	  echo "edge tests on $$spec: uvicorn $$version"; \
	  PYTHONPATH=$$dir EDGE_TEST_UVICORN=$$version \
	    $(BIN)/python -m pytest -q -p no:cacheprovider $(EDGE_TESTS) || exit 1; \
	done

unit: $(STAMP) promtool
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/integration

# Every row of issue 11's table in one run (bench_table.py: a few minutes; bench_cp.py,
# bench_sidecar.py and bench_signer.py give more detail, run by hand), then the others.
bench: $(STAMP)
	@command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk) >&2
	$(BIN)/python bench/bench_table.py
	$(BIN)/python bench/bench_recovery.py
	$(BIN)/python bench/bench_exchange.py
	$(BIN)/python bench/bench_inject.py
	$(BIN)/python bench/bench_hostile.py

# requirements.lock: every distribution the `server` and `grpc` extras need, pinned with the hashes of
# all its files on PyPI (the Dockerfile installs it with --require-hashes). Keeps existing
# pins; `make lock LOCK_ARGS=--upgrade` moves everything to the newest allowed versions.
# pip-tools lives in its own venv: it is a tool of this target, not a dependency.
lock:
	@test -x $(LOCK_VENV)/bin/pip-compile || ($(PYTHON) -m venv $(LOCK_VENV) \
	  && $(LOCK_VENV)/bin/python -m pip install -q pip-tools) >&2
	$(LOCK_VENV)/bin/pip-compile --quiet --extra server --extra grpc --generate-hashes --allow-unsafe \
	  --strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_ARGS) \
	  --output-file requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) $(LOCK_VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
