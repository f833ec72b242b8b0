# Two commands on a fresh machine: `make run` scores the sample data, `make test` runs the tests.
# Each sets up .venv itself (pip installs uv, uv installs the project).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: run test lint bench clean image

$(BIN)/uv:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv

$(VENV)/.run-deps: pyproject.toml | $(BIN)/uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e .
	touch $@

$(VENV)/.dev-deps: pyproject.toml | $(BIN)/uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev]'
	touch $@ $(VENV)/.run-deps

$(VENV)/.bench-deps: $(VENV)/.dev-deps
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev,peers]'
	touch $@

run: $(VENV)/.run-deps
	$(BIN)/batchscore sample --model-only
	$(BIN)/batchscore run --config configs/sample.yaml

test: $(VENV)/.dev-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The development loop: all but the end-to-end (slow) and fault-injection tests; `make test` runs those too.
.PHONY: test-fast
test-fast: $(VENV)/.dev-deps
	$(BIN)/python -m pytest -m "not slow and not fault" $(PYTEST_ARGS)

# The reference tables in docs/ (and any in the README), regenerated from the code that declares
# them; tests/test_docs.py runs `cog --check` over the same files.
.PHONY: docs
docs: $(VENV)/.dev-deps
	$(BIN)/cog -r docs/*.md

# The linters, as CI runs them before the tests; their settings are in pyproject.toml.
lint: $(VENV)/.dev-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The command bench/RESULTS.md names in its header (bench/run.py records the arguments it ran with;
# tests/test_bench.py holds the two to each other). Dask and Ray (the `peers` extra) run the peer jobs.
BENCH_ARGS := --sizes 1000000,10000000 --peers --repeats 2 --json bench/out/results.json --markdown bench/RESULTS.md
bench: $(VENV)/.bench-deps
	$(BIN)/python bench/run.py $(BENCH_ARGS)

# The scoring image, with Docker where an engine answers, else buildah (scripts/build-image --help).
# make image IMAGE=... CA_BUNDLE=/path/to/proxy-ca.pem (CA_BUNDLE='' for none; EXTRAS= leaves the compiled engine out).
IMAGE ?= localhost/batchscore:dev
EXTRAS ?= [compiled]
image:
	BATCHSCORE_IMAGE='$(IMAGE)' BATCHSCORE_EXTRAS='$(EXTRAS)' scripts/build-image $(if $(filter undefined,$(origin CA_BUNDLE)),,--ca-bundle '$(CA_BUNDLE)')

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
