# MILE Book. Two commands: `make book` (the main job) and `make test`. Both create .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= tiny
DATASET ?= synthetic
DATA_DIR ?=
CHECKPOINT ?=
EXECUTED := book/_executed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
# the CPU wheel of torch lies on this machine's disk; a GPU user installs their CUDA torch before `make`
TORCH_PIN ?= torch==2.13.0

.PHONY: venv book notebooks html test test-package test-notebooks lint lab clean clean-runs

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[book,test]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# ---- the book ------------------------------------------------------------------------------------------------
# Notebook parameters: empty make variables leave the notebook's own default (the profile's epochs, the chapter's
# dataset size). RUNS_DIR is shared by all chapters, so chapter 09 reads the results of 02-08; a finished run is
# not repeated, so a results folder copied into it (e.g. from a GPU machine) is reused as it is.
RUNS_DIR ?= runs
# the CPU book trains each tiny run for 3 epochs (the profile's default is 6) to stay within its time budget;
# other profiles keep their own default unless EPOCHS is given
EPOCHS ?= $(if $(filter tiny,$(PROFILE)),3,)
BATCH_SIZE ?=
SIZE ?=
SEED ?=
# book/_executed is the book's staging tree; it mirrors the repository (book/*.md, notebooks/*.ipynb executed,
# references.bib) so each page's launch/download/source buttons point at the real file in the repository.
EXECUTED_NB := $(EXECUTED)/notebooks
PM_PARAMS = -p profile "$(PROFILE)" -p dataset "$(DATASET)" -p data_dir "$(DATA_DIR)" \
  -p checkpoint "$(CHECKPOINT)" -p runs_dir "$(abspath $(RUNS_DIR))" \
  $(if $(EPOCHS),-p epochs $(EPOCHS)) $(if $(BATCH_SIZE),-p batch_size $(BATCH_SIZE)) \
  $(if $(SIZE),-p size $(SIZE)) $(if $(SEED),-p seed $(SEED)) \
  -p progress False  # progress bars are for people watching; in the book they would be noise
PAPERMILL := $(VENV)/bin/papermill --cwd notebooks -k python3 --log-level WARNING --no-progress-bar

# Execute every notebook with papermill into book/_executed/notebooks (sources stay output-free); the time of
# each notebook goes to book/_executed/timings.txt.
notebooks: venv
	mkdir -p $(EXECUTED_NB) $(RUNS_DIR)
	: > $(EXECUTED)/timings.txt
	set -e; total=0; for nb in $(NOTEBOOKS); do \
	  name=$$(basename $$nb); start=$$(date +%s); \
	  $(PAPERMILL) $$nb $(EXECUTED_NB)/$$name $(PM_PARAMS); \
	  took=$$(( $$(date +%s) - start )); total=$$(( total + took )); \
	  echo "$$name: $$took s" | tee -a $(EXECUTED)/timings.txt; \
	done; echo "all notebooks: $$total s" | tee -a $(EXECUTED)/timings.txt
	$(PY) tests/check_notebook_outputs.py $(EXECUTED_NB)/*.ipynb

# Build the static HTML book from the executed copies, offline; any Sphinx warning fails the build.
html: venv
	mkdir -p $(EXECUTED)/book
	cp book/*.md $(EXECUTED)/book/
	cp references.bib $(EXECUTED)/
	$(VENV)/bin/jupyter-book build $(EXECUTED) --config $(abspath _config.yml) --toc $(abspath _toc.yml) --path-output . \
	  --warningiserror --keep-going --all --builder html

book: notebooks
	$(MAKE) html
	@echo "Book: $(abspath _build/html/index.html)"

test: venv
	$(PY) -m pytest -q tests
	$(MAKE) test-notebooks

test-package: venv
	$(PY) -m pytest -q tests

# The notebook check: execute each notebook with papermill using fast "smoke" parameters into a scratch folder
# (the sources carry no outputs to compare against), then let nbval re-execute those copies and compare the cells
# marked `# NBVAL_CHECK_OUTPUT` (parameter tables, dataset summaries), ignoring what the sanitize file masks.
NBTEST := _build/nbtest
SMOKE_PARAMS := -p profile tiny -p dataset synthetic -p runs_dir "$(abspath $(NBTEST))/runs" -p epochs 1 -p size 24 \
  -p progress False
test-notebooks: venv
	rm -rf $(NBTEST) && mkdir -p $(NBTEST)/notebooks
	set -e; for nb in $(NOTEBOOKS); do \
	  name=$$(basename $$nb); start=$$(date +%s); \
	  $(PAPERMILL) $$nb $(NBTEST)/notebooks/$$name $(SMOKE_PARAMS); \
	  echo "$$name (smoke): $$(( $$(date +%s) - start )) s"; \
	done
	$(PY) tests/check_notebook_outputs.py $(NBTEST)/notebooks/*.ipynb
	cd $(NBTEST)/notebooks && $(abspath $(PY)) -m pytest -q -p no:cacheprovider --nbval-lax \
	  --nbval-current-env --nbval-sanitize-with $(abspath tests/nbval_sanitize.cfg) --rootdir . .

lint: venv
	$(VENV)/bin/ruff check mile_utils tests

# JupyterLab on the project's environment, opened on the notebooks
lab: venv
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

# keeps runs/ (hours of GPU work may live there); `make clean-runs` removes it
clean:
	rm -rf _build $(EXECUTED)

clean-runs:
	rm -rf runs
