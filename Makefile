# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv if missing, install, run the main job
#   make test   - create/update .venv, run nbdev_test (notebooks) and pytest (tests/)
#   make test-browser - the explorer in JupyterLab in headless Chromium (needs apt's chromium)
# The CPU build of torch is installed first so that pip never pulls the multi-GB CUDA wheels on a
# CPU machine. On a GPU box:  make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# (any pip requirement spec works).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NBDEV_FLAGS ?=

.PHONY: all venv demo test test-nbs test-py test-browser export readme bench-select

all: test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python settings.ini setup.py
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -c "import torch, transformers, tokprune_nb; print('installed: torch', torch.__version__, '| transformers', transformers.__version__, '| tokprune_nb', tokprune_nb.__version__)"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/tokprune demo

test: $(STAMP) test-nbs test-py

test-nbs: $(STAMP)
	$(BIN)/nbdev_test --n_workers 2 $(NBDEV_FLAGS)

test-py: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Not part of `make test`: needs Debian's chromium (apt-get install chromium); Playwright drives it, no download.
test-browser: $(STAMP)
	$(BIN)/python -m pip install --quiet playwright
	$(BIN)/python scripts/browser_check.py

export: $(STAMP)
	$(BIN)/nbdev_export
	$(BIN)/nbdev_clean

bench-select: $(STAMP)
	$(BIN)/tokprune bench-select

readme: $(STAMP)
	$(BIN)/python scripts/make_readme.py
