# Two commands do all set-up on a fresh machine:
#   make demo   - create .venv if missing, install, run the main job
#   make test   - create/update .venv, run nbdev_test (notebooks) and pytest (tests/)
#   make test-browser - the explorer in JupyterLab in headless Chromium (needs apt's chromium)
#   make eval-venv - add the `.[eval]` extra (lmms-eval, pinned in settings.ini) without torchvision (see below)
# The CPU build of torch is installed first so that pip never pulls the multi-GB CUDA wheels on a
# CPU machine. On a GPU box:  make test TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# (any pip requirement spec works).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NBDEV_FLAGS ?=

.PHONY: all venv eval-venv demo test test-nbs test-py test-browser export readme bench-select

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

# lmms-eval requires torchvision, but the registry's torchvision is CUDA-built: on a CPU torch it fails to import and
# takes transformers down with it. So: lmms-eval with --no-deps, then its requirements minus torchvision/timm
# (scripts/eval_requirements.py), with torch held at the installed build (and filelock<4, which lmms-eval 0.7.3
# needs); then check that no torchvision came in.
# Where a matching torchvision exists (a GPU box), `pip install -e ".[eval]"` is the plain route.
EVAL_STAMP := $(VENV)/.installed-eval
$(EVAL_STAMP): $(STAMP) scripts/eval_requirements.py
	@t0=$$(date +%s); set -e; \
	$(BIN)/python -m pip install --quiet --no-deps $$($(BIN)/python scripts/eval_requirements.py pin); \
	$(BIN)/python scripts/eval_requirements.py > $(VENV)/eval-requirements.txt; \
	$(BIN)/python scripts/eval_requirements.py hold > $(VENV)/eval-hold.txt; \
	$(BIN)/python -m pip install --quiet -r $(VENV)/eval-requirements.txt -c $(VENV)/eval-hold.txt; \
	$(BIN)/python -c "import importlib.util as u, sys; sys.exit('torchvision got installed: remove it (pip uninstall torchvision)' if u.find_spec('torchvision') else 0)"; \
	$(BIN)/python -m pip install --quiet --no-deps -e .; \
	$(BIN)/python -c "import lmms_eval, lmms_eval.evaluator, filelock._api, transformers; from lmms_eval.models import get_model; get_model('tokprune'); from importlib.metadata import version; print('eval extra: lmms-eval', version('lmms-eval'), '| --model tokprune registered')"; \
	echo "eval extra installed in $$(( $$(date +%s) - t0 )) s"
	touch $(EVAL_STAMP)

eval-venv: $(EVAL_STAMP)

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
