# Every target creates .venv and installs what it needs: a fresh clone needs only `make demo` / `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
AZURITE_DIR := .tools/azurite
AZURITE := $(AZURITE_DIR)/node_modules/.bin/azurite-blob

.PHONY: demo test lint bench bench-staging bench-policy bench-settle clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# The demo needs only scalebus itself; tests and benchmarks add the dev tools and matplotlib.
$(RUN_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $(RUN_STAMP)

$(DEV_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e '.[dev,plot,s3]'
	touch $(RUN_STAMP) $(DEV_STAMP)

$(AZURITE):
	mkdir -p $(AZURITE_DIR)
	npm install --silent --no-audit --no-fund --prefix $(AZURITE_DIR) azurite@3.35.0

demo: $(RUN_STAMP)
	$(VENV)/bin/scalebus demo

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check scalebus tests bench
	$(VENV)/bin/ruff format --check scalebus tests bench
	$(VENV)/bin/mypy

test: $(DEV_STAMP) $(AZURITE) lint
	SCALEBUS_AZURITE_BIN=$(abspath $(AZURITE)) $(PY) -m pytest -q

bench: bench-staging bench-policy bench-reaction bench-settle

bench-staging: $(DEV_STAMP) $(AZURITE)
	SCALEBUS_AZURITE_BIN=$(abspath $(AZURITE)) $(PY) bench/staging.py

bench-policy: $(DEV_STAMP)
	$(PY) bench/policy.py --plots bench/plots

bench-reaction: $(DEV_STAMP)
	$(PY) bench/reaction.py

bench-settle: $(DEV_STAMP)
	$(PY) bench/settle.py

clean:
	rm -rf $(VENV) .tools .demo .pytest_cache .mypy_cache .ruff_cache
