# Every target creates .venv and installs what it needs: a fresh clone needs only `make demo` / `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
AZURITE_DIR := .tools/azurite
AZURITE := $(AZURITE_DIR)/node_modules/.bin/azurite-blob
# azcopy, the tool users would pick for Blob -> local copies: the npm package ships the Linux binary (mode 644);
# it needs Debian's libsecret-1-0 (`apt-get install -y libsecret-1-0`), which bench/staging.py checks for.
AZCOPY_DIR := .tools/azcopy
AZCOPY := $(AZCOPY_DIR)/node_modules/@azure-tools/azcopy-linux/dist/bin/azcopy_linux_amd64
# checkov in a venv of its own: in the project's it would downgrade packaging and urllib3 and hold boto3
# below the s3 extra's range.
CHECKOV_DIR := .tools/checkov
CHECKOV := $(CHECKOV_DIR)/bin/checkov
IMAGE ?= localhost/scalebus:dev
IMAGE_BASE ?= localhost/debian:12-slim

.PHONY: demo test lint bench bench-staging bench-policy bench-settle bench-scale clean wheel checkov image image-base test-deploy chaos

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

$(AZCOPY):
	mkdir -p $(AZCOPY_DIR)
	npm install --silent --no-audit --no-fund --prefix $(AZCOPY_DIR) @azure-tools/azcopy-linux@10.32.2
	chmod +x $(AZCOPY)

$(CHECKOV):
	$(PYTHON) -m venv $(CHECKOV_DIR)
	$(CHECKOV_DIR)/bin/pip install --quiet 'checkov==3.3.30'

checkov: $(CHECKOV)

demo: $(RUN_STAMP)
	$(VENV)/bin/scalebus demo

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check scalebus tests bench
	$(VENV)/bin/ruff format --check scalebus tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache

test: $(DEV_STAMP) $(AZURITE) $(CHECKOV) lint
	SCALEBUS_AZURITE_BIN=$(abspath $(AZURITE)) $(PY) -m pytest -q

bench: bench-staging bench-policy bench-reaction bench-settle

bench-staging: $(DEV_STAMP) $(AZURITE) $(AZCOPY)
	SCALEBUS_AZURITE_BIN=$(abspath $(AZURITE)) SCALEBUS_AZCOPY_BIN=$(abspath $(AZCOPY)) $(PY) bench/staging.py

bench-policy: $(DEV_STAMP)
	$(PY) bench/policy.py --plots bench/plots

bench-reaction: $(DEV_STAMP)
	$(PY) bench/reaction.py

bench-settle: $(DEV_STAMP)
	$(PY) bench/settle.py

# Ingest at 10k and 100k synthetic objects (add BENCH_SCALE_FLAGS=--million for 1M; minutes).
bench-scale: $(DEV_STAMP)
	$(PY) bench/scale.py --readme $(BENCH_SCALE_FLAGS)

# One controller poll against the ARM fake at 10 / 100 / 1,000 / 5,000 instances (~1 min); table in bench/README.md.
.PHONY: bench-controller
bench-controller: $(DEV_STAMP)
	$(PY) bench/controller.py

# The long chaos run (tests/e2e/test_chaos.py is its bounded version in `make test`); figures in docs/reliability.md.
CHAOS_JOBS ?= 400
CHAOS_KILLS ?= 50
CHAOS_ROOT ?= /tmp/scalebus-chaos
chaos: $(DEV_STAMP)
	rm -rf $(CHAOS_ROOT) && $(PY) -m tests.e2e._chaos --jobs $(CHAOS_JOBS) --kills $(CHAOS_KILLS) --root $(CHAOS_ROOT)

clean:
	rm -rf $(VENV) .tools .demo .pytest_cache .mypy_cache .ruff_cache

# Deployment artefacts: the wheel the node image bakes, their validators alone, the container image.
wheel: $(DEV_STAMP)
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir dist .

test-deploy: $(DEV_STAMP) $(CHECKOV)
	$(PY) -m pytest -q tests/deploy

# Docker Hub is not reachable everywhere: image-base makes IMAGE_BASE from Debian's own archive (debootstrap),
# and image builds docker/Dockerfile on it with buildah (VFS storage, chroot isolation: no daemon, no root
# privileges beyond the build). Override IMAGE_BASE=docker.io/library/debian:12-slim where the hub is reachable.
image-base:
	buildah --storage-driver vfs inspect $(IMAGE_BASE) >/dev/null 2>&1 || docker/build-base-image.sh $(IMAGE_BASE)

PIP_CA ?= /etc/ssl/certs/ca-certificates.crt
image: image-base
	buildah --storage-driver vfs bud --isolation chroot --layers --format docker -f docker/Dockerfile \
		--secret id=pip-ca,src=$(PIP_CA) --build-arg BASE=$(IMAGE_BASE) -t $(IMAGE) .
