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

.PHONY: venv stand-in book notebooks executed-notebooks FORCE html test test-package test-notebooks smoke-notebooks update-expected check-html lint lab clean clean-runs

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[book,test]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

# The kernel warns on every start that it runs over TCP without encryption (ipykernel's kernelapp; jupyter_client
# provisions no CurveZMQ keys by default). Kernels here talk to papermill/nbval/JupyterLab on this machine only,
# so the environment's kernel config (read from <prefix>/etc/ipython) keeps the kernel's log to errors.
KERNEL_CONFIG := $(VENV)/etc/ipython/ipython_kernel_config.json
$(KERNEL_CONFIG): | venv
	mkdir -p $(dir $@)
	echo '{"IPKernelApp": {"log_level": "ERROR"}}' > $@

# ---- the book ------------------------------------------------------------------------------------------------
# Notebook parameters: empty make variables leave the notebook's own default (the profile's epochs, the chapter's
# dataset size). RUNS_DIR is shared by all chapters, so chapter 09 reads the results of 02-08; a finished run is
# not repeated, so a results folder copied into it (e.g. from a GPU machine) is reused as it is. The default is the
# notebooks' own default (../runs from notebooks/), so `make book`, `make lab` and a plain run share one folder.
RUNS_DIR ?= runs
# empty: each profile's own default (tiny: 3 epochs from the stand-in, on the 160-image "small" set, the
# notebooks' default size: the design of book/reproducibility.md, sized to the CPU book's time budget)
EPOCHS ?=
BATCH_SIZE ?=
SIZE ?=
SEED ?=
# Per-cell time limit (seconds) of every papermill and nbval execution: a stuck cell fails with the notebook and
# cell named instead of waiting forever. A cell of the paper profile trains a whole grid on a GPU: 2 days.
CELL_TIMEOUT ?= $(if $(filter tiny,$(PROFILE)),1800,172800)
TEST_CELL_TIMEOUT ?= 1200
# book/_executed is the book's staging tree; it mirrors the repository (book/*.md, notebooks/*.ipynb executed,
# references.bib) so each page's launch/download/source buttons point at the real file in the repository.
EXECUTED_NB := $(EXECUTED)/notebooks
# a path as the notebooks (run in notebooks/) see it: relative when inside the repository, so no path of this
# machine is written into the executed notebooks, absolute otherwise
nb_path = $(shell $(PY) -c "import os,sys; p=os.path.abspath(sys.argv[1]); r=os.path.relpath(p, 'notebooks'); \
  print(p if os.path.relpath(p).startswith('..') else r)" "$(1)")
PM_PARAMS = -p profile "$(PROFILE)" -p dataset "$(DATASET)" -p data_dir "$(if $(DATA_DIR),$(call nb_path,$(DATA_DIR)))" \
  -p checkpoint "$(CHECKPOINT)" -p runs_dir "$(call nb_path,$(RUNS_DIR))" \
  $(if $(EPOCHS),-p epochs $(EPOCHS)) $(if $(BATCH_SIZE),-p batch_size $(BATCH_SIZE)) \
  $(if $(SIZE),-p size $(SIZE)) $(if $(SEED),-p seed $(SEED)) \
  -p progress False  # progress bars are for people watching; in the book they would be noise
PAPERMILL := $(VENV)/bin/papermill -k python3 --log-level WARNING --no-progress-bar
# execute_nb NOTEBOOK OUTPUT TIMEOUT PARAMS CWD: papermill with a per-cell timeout. Chapters with ipywidgets browsers
# declare an `interactive` parameter: headless runs set it False (nbclient can deadlock on widgets; they show
# their static table), and nbval's re-execution of the executed copy keeps the injected value. On failure the
# check names the notebook and the cell that raised or ran past the timeout.
execute_nb = $(PAPERMILL) --cwd $(5) --execution-timeout $(3) $(1) $(2) $(4) \
  $$(grep -q '"interactive = ' $(1) && echo "-p interactive False") \
  || { $(PY) tests/check_notebook_outputs.py $(2); echo "$(1) failed (a cell raised or ran past $(3) s)" >&2; \
       exit 1; }

# Execute every notebook with papermill into book/_executed/notebooks (sources stay output-free), JOBS at a time,
# the time of each going to book/_executed/timings.txt. Chapters share runs safely (a run folder is locked while
# it trains; a chapter asking for it meanwhile waits and reads its results). JOBS: the CPU's cores for the tiny
# profile (chapters side by side on a CPU train ~1.45x the samples/s of one chapter using every core: these models
# are too small to keep two threads busy), 1 for a GPU profile (one GPU). THREADS: torch threads per chapter, 1 for
# tiny, so that its numbers (float summation order) do not depend on the machine's core count or on JOBS.
JOBS ?= $(if $(filter tiny,$(PROFILE)),$(shell nproc 2>/dev/null || echo 1),1)
THREADS ?= $(if $(filter tiny,$(PROFILE)),1)
THREAD_ENV = $(if $(THREADS),OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS))
EXECUTED_NBS := $(NOTEBOOKS:notebooks/%=$(EXECUTED_NB)/%)
# chapter 9 collects the runs of chapters 2-8: it starts when they have finished; chapter 11 reads chapter 10's grid
$(EXECUTED_NB)/09_results.ipynb: $(patsubst notebooks/%,$(EXECUTED_NB)/%,$(wildcard notebooks/0[2-8]_*.ipynb))
$(EXECUTED_NB)/11_seeds_and_the_encoder_prefix.ipynb: $(EXECUTED_NB)/10_beyond_the_paper.ipynb
# The tiny chapters but 1 start from chapter 2's stand-in for pretrained MISS: it trains first (beside chapter 1,
# which trains nothing), so that its minute counts in no chapter's time: by the chapters' own call (book.setup), so
# they find it finished (the same seed and size give the same run identity: a run is known by content, not folder).
STAND_IN = $(if $(and $(filter tiny,$(PROFILE)),$(if $(CHECKPOINT),,yes)),stand-in)
$(filter-out %/01_data_and_model.ipynb,$(EXECUTED_NBS)): | $(STAND_IN)
stand-in: venv
	@mkdir -p $(EXECUTED); start=$$(date +%s); $(THREAD_ENV) $(PY) -c "import sys; from mile_utils import book; \
	  size = sys.argv[3] if sys.argv[3] in ('small', 'full') else int(sys.argv[3]); \
	  book.setup('tiny', 'synthetic', runs_dir=sys.argv[1], seed=int(sys.argv[2]), size=size, progress=False)" \
	  "$(RUNS_DIR)" "$(or $(SEED),0)" "$(or $(SIZE),small)"; \
	  echo "stand-in (chapter 2's pretrained MISS stand-in, before the chapters): $$(( $$(date +%s) - start )) s" \
	  | tee -a $(EXECUTED)/timings.txt
$(EXECUTED_NB)/%.ipynb: notebooks/%.ipynb FORCE | $(EXECUTED_NB)
	@start=$$(date +%s); $(THREAD_ENV) $(call execute_nb,$<,$@,$(CELL_TIMEOUT),$(PM_PARAMS),notebooks); \
	  echo "$(notdir $@): $$(( $$(date +%s) - start )) s" | tee -a $(EXECUTED)/timings.txt
$(EXECUTED_NB):
	mkdir -p $@
# started in this order: chapter 10 (it trains the most; chapter 11 follows it), chapter 1 (it trains nothing:
# beside the stand-in's training), the rest, chapter 7 last but one (it reads back the runs of 2-6)
BOOK_ORDER = $(filter %/10_beyond_the_paper.ipynb,$(1)) $(filter-out %/07_component_ablation.ipynb,$(1))
executed-notebooks: $(call BOOK_ORDER,$(EXECUTED_NBS))
FORCE:

notebooks: venv $(KERNEL_CONFIG)
	mkdir -p $(EXECUTED_NB) $(RUNS_DIR)
	: > $(EXECUTED)/timings.txt
	start=$$(date +%s); $(MAKE) --no-print-directory -j$(JOBS) executed-notebooks && \
	  echo "all notebooks, $(JOBS) at a time, torch threads per notebook: $(or $(THREADS),default): $$(( $$(date +%s) - start )) s" \
	  | tee -a $(EXECUTED)/timings.txt
	$(PY) tests/check_notebook_outputs.py $(EXECUTED_NB)/*.ipynb
	@# papermill's injected-parameters cell is plumbing, like the parameters cell it overrides: out of the book
	$(PY) -c "import sys, nbformat; nbs = {p: nbformat.read(p, 4) for p in sys.argv[1:]}; \
	  [c.metadata.tags.append('remove-cell') for nb in nbs.values() for c in nb.cells \
	   if 'injected-parameters' in c.metadata.get('tags', [])]; [nbformat.write(nb, p) for p, nb in nbs.items()]" \
	  $(EXECUTED_NB)/*.ipynb

# Build the static HTML book from the executed copies, offline; any Sphinx warning fails the build.
html: venv
	mkdir -p $(EXECUTED)/book
	cp book/*.md $(EXECUTED)/book/
	rm -rf $(EXECUTED)/book/_ext && cp -r book/_ext $(EXECUTED)/book/_ext
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

# The notebook check: execute each notebook with papermill using fast "smoke" parameters into a scratch folder,
# compare its deterministic outputs (parameter tables, dataset summaries, settings; cells tagged
# `nbval-check-output`) with the committed expectations in tests/expected/ (check_notebook_outputs.py
# --expected; `make update-expected` rewrites them after an intended change), then let nbval re-execute those
# copies and compare the same cells with papermill's run (the check that they are deterministic). The copies run
# in $(NBTEST)/notebooks, whose ../runs is $(NBTEST)/runs both for papermill and for nbval.
NBTEST := _build/nbtest
SMOKE_PARAMS := -p profile tiny -p dataset synthetic -p runs_dir ../runs -p epochs 1 -p size 24 -p progress False
# chapters 10-11 train every method of their grid; their smoke run takes three (a paper method, LN tuning, a prefix
# method)
SMOKE_METHODS := ia3,ln,ptv2
SMOKE_NBS := $(NOTEBOOKS:notebooks/%=$(NBTEST)/notebooks/%)
$(NBTEST)/notebooks/09_results.ipynb: $(patsubst notebooks/%,$(NBTEST)/notebooks/%,$(wildcard notebooks/0[2-8]_*.ipynb))
$(NBTEST)/notebooks/11_seeds_and_the_encoder_prefix.ipynb: $(NBTEST)/notebooks/10_beyond_the_paper.ipynb
$(NBTEST)/notebooks/%.ipynb: notebooks/%.ipynb FORCE
	@start=$$(date +%s); $(THREAD_ENV) $(call execute_nb,$<,$@,$(TEST_CELL_TIMEOUT),$(SMOKE_PARAMS) \
	  $$(grep -q '"methods = ' $< && echo "-p methods $(SMOKE_METHODS)"),$(NBTEST)/notebooks); \
	  echo "$(notdir $@) (smoke): $$(( $$(date +%s) - start )) s"
smoke-notebooks: $(call BOOK_ORDER,$(SMOKE_NBS))

test-notebooks: venv $(KERNEL_CONFIG)
	rm -rf $(NBTEST) && mkdir -p $(NBTEST)/notebooks
	$(MAKE) --no-print-directory -j$(JOBS) smoke-notebooks
	$(PY) tests/check_notebook_outputs.py --expected tests/expected $(NBTEST)/notebooks/*.ipynb
	cd $(NBTEST)/notebooks && $(THREAD_ENV) $(abspath $(PY)) -m pytest -q -p no:cacheprovider --nbval-lax \
	  --nbval-current-env --nbval-cell-timeout $(TEST_CELL_TIMEOUT) \
	  --nbval-sanitize-with $(abspath tests/nbval_sanitize.cfg) --rootdir . .

# after an intended change of a checked output: rewrite tests/expected/ from the last `make test-notebooks` run
update-expected: venv
	$(PY) tests/check_notebook_outputs.py --update tests/expected $(NBTEST)/notebooks/*.ipynb

# The built pages in headless Chromium (Debian's `chromium`, driven by playwright; `apt-get install chromium`):
# fails on raw TeX, console/script errors, failed or non-local (CDN) requests and missing figures.
# SHOTS=dir saves full-page screenshots, PAGES="03 07 09" limits the pages.
check-html: venv
	$(PY) tests/check_book_html.py _build/html $(if $(PAGES),--pages $(PAGES)) $(if $(SHOTS),--screenshots $(SHOTS))

lint: venv
	$(VENV)/bin/ruff check mile_utils tests notebooks

# JupyterLab on the project's environment, opened on the notebooks
lab: venv
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks

# keeps runs/ (hours of GPU work may live there); `make clean-runs` removes it
clean:
	rm -rf _build $(EXECUTED)

clean-runs:
	rm -rf runs
