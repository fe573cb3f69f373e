# hcgen: everything a user runs goes through these targets (reached on a fresh Debian 12 machine via
# `bash scripts/bootstrap.sh TARGET`, which first installs make, python3 and the build tools).
SHELL := /bin/bash
PYTHON_SYS ?= /usr/bin/python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.hcgen-installed
TEST_STAMP := $(VENV)/.hcgen-test-installed

.PHONY: setup caffe demo test doctor table1-quick table1-medium table1-paper-rows table1-full bench clean

setup: caffe

# The virtualenv, with hcgen installed in editable mode and only what the main job imports (no torch,
# no pytest); redone only when setup.py changes.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

# The test suite's extras, installed on demand by `make test` only: pytest and torch (pinned in setup.py).
# From PyPI the Linux torch wheel brings CUDA libraries (GBs); for the CPU-only wheel, set
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (README, "Quick start").
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,torch]'
	touch $@

# Builds Caffe once into ~/.cache/hcgen (keyed by sdist + patches) and links it into the venv.
caffe: $(STAMP)
	bash scripts/install_caffe.sh $(VENV)

doctor: caffe
	$(VENV)/bin/hcgen doctor

# The main job: works with no arguments (see README).
demo: caffe
	$(VENV)/bin/hcgen doctor
	$(VENV)/bin/hcgen demo

table1-quick: caffe
	$(VENV)/bin/hcgen table1 --profile quick --dask

table1-medium: caffe
	$(VENV)/bin/hcgen table1 --profile medium --dask

table1-paper-rows: caffe
	$(VENV)/bin/hcgen table1 --profile paper-rows --dask

table1-full: caffe
	$(VENV)/bin/hcgen table1 --profile full --dask

test: caffe $(TEST_STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
