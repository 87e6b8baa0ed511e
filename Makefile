# prerec: `make run` serves on port 10600, `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: install run test lint migrate migration downgrade gc clean

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

migrate: $(STAMP)
	$(PY) -m prerec migrate

migration: $(STAMP)
	@test -n "$(m)" || { echo 'usage: make migration m="what it changes"'; exit 2; }
	$(PY) -m prerec revision -m "$(m)"

downgrade: $(STAMP)
	$(PY) -m prerec downgrade

# The storage check: `make gc`, or `make gc ARGS=--apply` to repair.
gc: $(STAMP)
	$(PY) -m prerec gc $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
