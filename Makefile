# Two commands on a fresh machine: `make run` scores the sample data, `make test` runs the tests.
# Each sets up .venv itself (pip installs uv, uv installs the project).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test bench clean

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv

$(VENV)/.run-deps: pyproject.toml | $(BIN)/uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e .
	touch $@

$(VENV)/.dev-deps: pyproject.toml | $(BIN)/uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev]'
	touch $@ $(VENV)/.run-deps

run: $(VENV)/.run-deps
	$(BIN)/batchscore sample --model-only
	$(BIN)/batchscore run --config configs/sample.yaml

test: $(VENV)/.dev-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The development loop: all but the end-to-end (slow) and fault-injection tests; `make test` runs those too.
.PHONY: test-fast
test-fast: $(VENV)/.dev-deps
	$(BIN)/python -m pytest -m "not slow and not fault" $(PYTEST_ARGS)

bench: $(VENV)/.dev-deps
	$(BIN)/python bench/run.py --sizes 1000000,10000000 --markdown bench/RESULTS.md

clean:
	rm -rf $(VENV) out .pytest_cache
