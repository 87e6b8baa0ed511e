# prerec: `make run` serves on port 10600, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install run test lint docs migrate migration downgrade gc bench bench-smoke bench-tools clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet --disable-pip-version-check -e .
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP) $@

install: $(STAMP)

run: $(STAMP)
	$(PY) -m prerec

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check prerec tests migrations
	$(VENV)/bin/ruff format --check prerec tests migrations

# The README's settings table, regenerated from prerec/config.py (a test fails when it is stale).
docs: $(STAMP)
	$(PY) -m prerec settings --readme README.md

migrate: $(STAMP)
	$(PY) -m prerec migrate

migration: $(STAMP)
	@test -n "$(m)" || { echo 'usage: make migration m="what it changes"'; exit 2; }
	$(PY) -m prerec revision -m "$(m)"

downgrade: $(STAMP)
	$(PY) -m prerec downgrade

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet --disable-pip-version-check -e '.[bench]'
	touch $(STAMP) $@

# The bench drives nginx (the reference), wrk, ab and curl; install them when missing and root.
bench-tools:
	@missing=""; for tool in nginx:nginx-light wrk:wrk ab:apache2-utils curl:curl; do \
		command -v $${tool%%:*} >/dev/null || [ -x /usr/sbin/$${tool%%:*} ] || missing="$$missing $${tool#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
		else echo "make bench needs:$$missing (apt-get install them)"; exit 1; fi; \
	fi

# Rewrites docs/benchmarks.md and docs/benchmarks.png (about ten minutes).
bench: $(BENCH_STAMP) bench-tools
	$(PY) bench/bench.py

# The same code on small sizes, in seconds; writes nothing.
bench-smoke: $(BENCH_STAMP) bench-tools
	$(PY) bench/bench.py --smoke

# The storage check: `make gc`, or `make gc ARGS=--apply` to repair.
gc: $(STAMP)
	$(PY) -m prerec gc $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
