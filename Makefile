# From a fresh clone: `make run` starts the embedded dev setup, `make test` runs everything.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit integration edge-uvicorn bench clean

# Quiet recipes: `make run` prints only what `cp-token dev` prints (the curl lines on stdout).
$(STAMP): pyproject.toml
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

typecheck: $(STAMP)
	$(BIN)/mypy

test: $(STAMP) lint typecheck edge-uvicorn
	$(BIN)/python -m pytest -q -p no:cacheprovider

# cp_token/edge.py subclasses uvicorn's HTTP protocol classes: its tests run again on the
# oldest and the newest uvicorn that pyproject's pin allows, each installed alone (no deps)
# into a directory that shadows the venv's copy (tests/integration/test_edge.py checks which
# version it ran on).
UVICORN_PIN := $(shell sed -n 's/^ *"\(uvicorn[^"]*\)",.*/\1/p' pyproject.toml)
UVICORN_OLDEST := $(shell echo '$(UVICORN_PIN)' | sed -n 's/.*>=\([0-9.]*\).*/\1/p')
EDGE_TESTS := tests/integration/test_edge.py tests/unit/test_framing.py
edge-uvicorn: $(STAMP)
	@for spec in 'uvicorn==$(UVICORN_OLDEST)' '$(UVICORN_PIN)'; do \
	  dir=$(VENV)/uvicorn-edge; rm -rf $$dir; \
	  $(BIN)/python -m pip install -q --no-deps --target $$dir "$$spec" >&2 || exit 1; \
	  version=$$(PYTHONPATH=$$dir $(BIN)/python -c 'import uvicorn; print(uvicorn.__version__)'); \
	  echo "edge tests on $$spec: uvicorn $$version"; \
	  PYTHONPATH=$$dir EDGE_TEST_UVICORN=$$version \
	    $(BIN)/python -m pytest -q -p no:cacheprovider $(EDGE_TESTS) || exit 1; \
	done

unit: $(STAMP)
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

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache
