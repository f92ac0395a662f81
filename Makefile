# The README names these targets. Everything installs into .venv from the repo's own files.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
EXTRAS ?= train,serve,export,loadtest,tune,dev

.PHONY: install demo test lint bench-train bench-memory docker-test clean

install: $(VENV)/.installed

# torch is pinned and installed first: an unpinned torch would pull several GB of CUDA wheels.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

## The main job on built-in synthetic data: train ML-DCN and DCNv2 at matched FLOPs.
demo: install
	$(VENV)/bin/mldcn demo --out demo

## The test command (CI runs it): lint, then the whole test suite.
test: install
	$(PY) -m ruff check .
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check . || true

bench-train: install
	$(VENV)/bin/mldcn bench train-throughput --out docs/bench/train_throughput.json

bench-memory: install
	$(VENV)/bin/mldcn bench train-memory --out docs/bench/train_memory.json

## Smoke test of the CPU Docker image without Docker Hub (root: installs docker.io and
## debootstrap if missing, starts dockerd); see docker/smoke_test.sh.
docker-test: install
	bash docker/smoke_test.sh

clean:
	rm -rf demo runs .cache .pytest_cache .ruff_cache
