# Every target creates .venv and installs what it needs: a fresh clone needs only `make demo` / `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
AZURITE_DIR := .tools/azurite
AZURITE := $(AZURITE_DIR)/node_modules/.bin/azurite-blob

.PHONY: demo test lint unit bench bench-staging bench-policy clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev,plot]'
	touch $(STAMP)

$(AZURITE):
	mkdir -p $(AZURITE_DIR)
	npm install --silent --no-audit --no-fund --prefix $(AZURITE_DIR) azurite@3.35.0

demo: $(STAMP)
	$(VENV)/bin/scalebus demo

lint: $(STAMP)
	$(VENV)/bin/ruff check scalebus tests bench
	$(VENV)/bin/ruff format --check scalebus tests bench
	$(VENV)/bin/mypy

test: $(STAMP) $(AZURITE) lint
	SCALEBUS_AZURITE_BIN=$(abspath $(AZURITE)) $(PY) -m pytest -q

bench: bench-staging bench-policy

bench-staging: $(STAMP) $(AZURITE)
	SCALEBUS_AZURITE_BIN=$(abspath $(AZURITE)) $(PY) bench/staging.py

bench-policy: $(STAMP)
	$(PY) bench/policy.py

clean:
	rm -rf $(VENV) .tools .demo .pytest_cache .mypy_cache .ruff_cache
