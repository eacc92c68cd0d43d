# The two set-up commands: `make demo` and `make test`. Each builds .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench bench-check bench-baseline clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

lint: $(STAMP)
	$(BIN)/ruff check meshlib tests benchmarks examples
	$(BIN)/ruff format --check meshlib tests benchmarks examples
	$(BIN)/mypy --strict meshlib

test: lint
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose"; exit 1; fi; \
	exit $$rc

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

# The instruction-count regression gate (valgrind; docs/performance.md, "Regression gate").
bench-check: $(STAMP)
	$(BIN)/python -m benchmarks.bench_check

# Rewrites benchmarks/baseline.json: only deliberately, saying why in the commit message.
bench-baseline: $(STAMP)
	$(BIN)/python -m benchmarks.bench_check --update

clean:
	rm -rf $(VENV) build *.egg-info
