# The README's commands. Each sets up the pinned virtual environment in .venv first.
#   make book   execute every notebook (profile cpu) and build the HTML book into _build/html
#   make test   unit tests + nbval over notebooks/ in profile ci
#   make results-table   the README's results table from the runs of the last `make book`
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BOOK_PROFILE ?= cpu

# Real datasets beside the checkout (never committed); tests that need them skip without them.
ifneq ($(wildcard ../shared/data),)
export SCVIT_DATA_DIR ?= $(abspath ../shared/data)
endif

# Trained models and metrics, cached by the experiment runner (scvit_core.experiments).
export SCVIT_RESULTS_DIR ?= $(CURDIR)/results

.PHONY: venv test book results-table lint format benchmarks zeisel-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/constraints.txt -e ".[all]"
	touch $(STAMP)

test: $(STAMP)
	SCVIT_PROFILE=ci $(PY) -m pytest

book: $(STAMP)
	SCVIT_PROFILE=$(BOOK_PROFILE) $(VENV)/bin/jupyter-book build . --toc book/_toc.yml -W -n --keep-going

results-table: $(STAMP)
	$(PY) scripts/results_table.py --profile $(BOOK_PROFILE)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

benchmarks: $(STAMP)
	$(PY) benchmarks/data_throughput.py

zeisel-check: $(STAMP)
	$(PY) scripts/make_zeisel.py --check

clean:
	rm -rf _build .pytest_cache
