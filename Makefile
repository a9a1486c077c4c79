# Two commands do all set-up: `make run` (default experiment) and `make test` (test suite).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-slow install flwr-run clean

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: no python3.11 or python3 found (abd-fl needs Python 3.11; set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: these wheels come from local disk here; an unpinned torch pulls a multi-GB download
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/abd-fl $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]  # exit 5: no slow test collected

# `make flwr-run`: a Flower App through Flower's own CLI, `flwr run` (default: the example app
# examples/abd-quickstart; FLWR_APP=. runs this project's app, e.g. with
# FLWR_RUN_CONFIG="overrides='experiment=tiny simulation.num_clients=4 output_dir=/abs/path'",
# simulation.num_clients equal to num-supernodes). scripts/flwr_run.py
# starts a SuperLink of its own (FLWR_HOME .flwr_home/, free ports), points `flwr run` at it,
# checks that the run completed, and stops that SuperLink by its pid at the end (Ctrl-C
# included), waiting for everything it started; no other SuperLink on the machine is touched.
FLWR_APP               ?= examples/abd-quickstart
FLWR_FEDERATION_CONFIG ?= num-supernodes=4 client-resources-num-cpus=1
FLWR_RUN_CONFIG        ?=

flwr-run: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" FLWR_HOME="$(CURDIR)/.flwr_home" $(PY) scripts/flwr_run.py "$(FLWR_APP)" \
	  --federation-config "$(FLWR_FEDERATION_CONFIG)" --run-config "$(FLWR_RUN_CONFIG)"

clean:
	rm -rf $(VENV) outputs .pytest_cache .flwr_home
