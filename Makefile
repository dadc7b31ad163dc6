# The commands a newcomer needs: `make test`, `make quick` and `make demo`.
# Each bootstraps a local virtual environment (.venv) from pyproject.toml.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test quick demo lint typecheck benchmark clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP) lint typecheck
	$(PY) -m pytest -q
	$(PY) -m pytest -q tests/multidevice

# The library's unit tests and docstring examples only (no scripts, docs or multidevice):
# the loop to run while changing softmax_jax/.
quick: $(STAMP)
	$(PY) -m pytest -q tests/core tests/fused softmax_jax

lint: $(STAMP)
	$(VENV)/bin/ruff check softmax_jax tests scripts

typecheck: $(STAMP)
	$(VENV)/bin/mypy softmax_jax

# The demo is the same every time: a second `make demo` retrains runs/demo from scratch
# (--overwrite) instead of stopping at the run the first one left there.
demo: $(STAMP)
	$(PY) scripts/worked_example.py
	$(PY) scripts/slowdown.py --out runs/demo/slowdown
	$(PY) scripts/train.py --compare --out runs/demo --overwrite

benchmark: $(STAMP)
	$(PY) scripts/benchmark.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
