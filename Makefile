# Every target sets up its own .venv: only Python 3.11 and pip are needed.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch is pinned in the same command so pip takes the CPU wheel, not a CUDA build.
	$(BIN)/pip install --disable-pip-version-check -q "torch==2.13.0" -e ".[test]"
	touch $(STAMP)

.PHONY: venv demo quick test test-slow bench clean
venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/splitaudit demo

quick: $(STAMP)
	$(BIN)/splitaudit demo --profile quick

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_metrics.py
	$(BIN)/python benchmarks/bench_demo.py

clean:
	rm -rf $(VENV) splitaudit-demo
