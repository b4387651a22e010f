# routerq: `make demo` runs a local stack with example jobs; `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
PHOENIX_VENV := .venv-phoenix
PHOENIX_SPEC ?= arize-phoenix>=12

.PHONY: install demo down test test-unit lint bench clean

install: $(VENV)/.installed $(PHOENIX_VENV)/.installed
	@scripts/ensure-redis

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

# The Phoenix server lives in its own virtualenv: beside routerq it would slow every import of phoenix.otel.
$(PHOENIX_VENV)/.installed:
	$(PYTHON) -m venv $(PHOENIX_VENV)
	$(PHOENIX_VENV)/bin/pip install -q --upgrade pip
	$(PHOENIX_VENV)/bin/pip install -q '$(PHOENIX_SPEC)'
	touch $@

demo: install
	$(VENV)/bin/routerq demo

down:
	$(VENV)/bin/routerq down

# Every tier: tests/unit (pure logic), tests/integration (a real Redis), tests/e2e (the whole local
# stack). Two pytest sessions side by side, each with its own stack: most e2e time is waiting (retry
# countdowns, lease expiry, slow fake answers), so two halve the wall time on CI's two cores.
TEST_WORKERS ?= 2
test: install
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --dist loadgroup

test-unit: $(VENV)/.installed
	$(VENV)/bin/python -m pytest tests/unit

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: install
	$(VENV)/bin/python -m bench

clean:
	rm -rf $(VENV) $(PHOENIX_VENV) .routerq
