# `make run`: set up .venv and run the main job. `make test`: set up .venv with dev extras, and .venv-compare
# (LeRobot and robomimic themselves, for the tests against the real tools), and run the tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-all bench bench-loading compare-venv clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	# torch first, alone: the pinned pair installs from the local wheel store (no CUDA download)
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e ".[all,dev]"
	# the publishers' own model code, only for the tests that compare our encoders with it (tests/reference_models.py)
	$(BIN)/pip install --no-deps --upgrade --target $(VENV)/reference dinov2==0.0.1.dev2 clip-anytorch==2.6.0
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python train.py

test: $(STAMP) compare-venv
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/drawer_open.py

# LeRobot's and robomimic's loaders beside ours (bench/loading.py); builds .venv-compare once
compare-venv: $(STAMP)
	test -x .venv-compare/bin/python || bench/compare_venv.sh

bench-loading: compare-venv
	$(BIN)/python bench/loading.py

clean:
	rm -rf $(VENV) logs data/debug_*
