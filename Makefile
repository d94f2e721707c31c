# pixsigma: two commands do all the set-up.
#   make demo   — create .venv if missing, build the demo corpus and tiny models, run all four stages
#   make test   — same .venv, run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
DEMO_OUT ?= demo_out
DEMO_N ?= 24
DEMO_SEED ?= 0
DEMO_CONFIG ?= configs/debug.toml
NPROC ?= 2
# Test processes (pytest-xdist; one file per process at a time, each with its own local Ray cluster of ~0.6 GB).
# --no-loadscope-reorder: files in collection order (tests/conftest.py puts the longest first); xdist's default
# reorders them by test count, which left test_demo and the other end-to-end runs for the end.
TEST_WORKERS ?= 2

# Offline and quiet: nothing here may download weights or phone home.
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export WANDB_MODE := disabled
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: demo test venv lint clean

venv: $(STAMP)

# Re-installs only when the project's requirements change; otherwise a no-op.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e ".[dev]" 2>&1 | grep -v "is ignored" || true
	$(PY) -c "import torch, torchvision, ray, open_clip, diffusers, transformers, webdataset, img2dataset, duckdb"
	touch $(STAMP)

demo: $(STAMP)
	DEMO_OUT=$(DEMO_OUT) DEMO_N=$(DEMO_N) DEMO_SEED=$(DEMO_SEED) DEMO_CONFIG=$(DEMO_CONFIG) NPROC=$(NPROC) \
		PATH=$(abspath $(VENV))/bin:$$PATH bash configs/demo.sh

test: $(STAMP)
	$(VENV)/bin/pytest -q tests -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
