# MILE Book. Two commands: `make book` (the main job) and `make test`. Both create .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= tiny
DATASET ?= synthetic
DATA_DIR ?=
CHECKPOINT ?=
RUNS_DIR ?= runs/$(PROFILE)-$(DATASET)
EXECUTED := book/_executed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
# the CPU wheel of torch lies on this machine's disk; a GPU user installs their CUDA torch before `make`
TORCH_PIN ?= torch==2.13.0

.PHONY: venv book notebooks html test test-package test-notebooks lint lab clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[book,test]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# Execute every notebook with papermill into book/_executed (sources stay output-free), then build the book.
notebooks: venv
	mkdir -p $(EXECUTED) $(RUNS_DIR)
	set -e; for nb in $(NOTEBOOKS); do \
	  name=$$(basename $$nb); start=$$(date +%s); \
	  $(VENV)/bin/papermill --cwd notebooks -k python3 $$nb $(EXECUTED)/$$name \
	    -p profile $(PROFILE) -p dataset $(DATASET) -p data_dir "$(DATA_DIR)" -p checkpoint "$(CHECKPOINT)" \
	    -p runs_dir "$(abspath $(RUNS_DIR))"; \
	  echo "$$name: $$(( $$(date +%s) - start )) s" | tee -a $(EXECUTED)/timings.txt; \
	done

html: venv
	$(VENV)/bin/jupyter-book build . --warningiserror --keep-going --builder html

book: notebooks html
	@echo "Book: _build/html/index.html"

test: venv
	$(PY) -m pytest -q tests
	$(MAKE) test-notebooks

test-package: venv
	$(PY) -m pytest -q tests

test-notebooks: venv
	$(PY) -m pytest -q --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg notebooks -p no:cacheprovider

lint: venv
	$(VENV)/bin/ruff check mile_utils tests

lab: venv
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf _build $(EXECUTED) runs
