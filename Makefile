# Thin wrappers over the real commands; see README.md.
VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
JOBS    ?= 2
CHAPTERS := $(sort $(wildcard chapters/*/c*.py))
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup test test-unit test-chapters test-book book bench bench-histology bench-deconv student lock clean

setup: ## virtual environment with CPU PyTorch, stcore and the test + book tools
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,book]" -c requirements-lock.txt

test: test-unit test-chapters test-book ## everything: unit tests, every chapter (FAST), the rendered book in Chromium

test-unit:
	STCORE_FAST=1 OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 $(BIN)/pytest -q -n $(JOBS) tests

test-chapters: ## each chapter converted to .ipynb and executed with nbmake in FAST mode
	rm -rf build/notebooks && mkdir -p build/notebooks
	for f in $(CHAPTERS); do $(BIN)/jupytext --quiet --to ipynb "$$f" -o "build/notebooks/$$(basename $${f%.py}).ipynb" || exit 1; done
	STCORE_FAST=1 OMP_NUM_THREADS=1 NUMBA_NUM_THREADS=1 $(BIN)/pytest -q -n $(JOBS) --nbmake --nbmake-timeout=600 build/notebooks

test-book: ## FAST build of the site, then a headless-Chromium check of the index and a chapter page
	$(BIN)/python tools/build_book.py --fast
	$(BIN)/python tools/check_site.py build/book-fast/_build/html

book: ## every chapter at full budget, rendered to book/_build/html
	$(BIN)/python tools/build_book.py
	$(BIN)/python tools/check_site.py book/_build/html

bench: ## leaderboards of every task into results/
	for t in graphs domains deconv impute locate; do $(BIN)/stcore bench $$t --out results || exit 1; done

HISTOLOGY := leiden,gmm,spacell,stlearn,spagcn,stmvc,deepst,congi,tesla,transformerst
bench-histology: ## the ST + histology comparison (book/results/), with and without the image; about 4 h
	OMP_NUM_THREADS=1 $(BIN)/stcore bench domains --methods $(HISTOLOGY) --seeds 0,1,2 \
		--options "" --options histology=false --options supervised=false --out results/histology
	for run in "spagcn:" "stlearn,spacell:histology=false,epochs=1" "stlearn:tile_epochs=1" \
			"spacell:epochs=1,tile_epochs=1" "deepst:pre_epochs=20,epochs=10,tile_epochs=1" "tesla:histology=false,res=100"; do \
		OMP_NUM_THREADS=1 $(BIN)/stcore bench domains --methods "$${run%%:*}" --datasets synthetic_100k --seeds 0 \
			--options "$${run#*:}" --out "results/histology_100k/$${run%%:*}_$${run#*:}" || exit 1; done
	mkdir -p book/results
	cp results/histology/domains.csv book/results/histology_domains.csv
	$(BIN)/python -c "import glob, pandas as pd; pd.concat(map(pd.read_csv, sorted(glob.glob( \
		'results/histology_100k/*/domains.csv')))).to_csv('book/results/histology_100k.csv', index=False)"

# method:options — official defaults except GTAD's epochs (1,000 official; about 2 s per epoch on 2 CPU cores)
DECONV_RUNS := "nnls:" "knn_deconv:" "dstg:" "sd2:" "destvi:" "graphst_deconv:" "gtad:epochs=150" "celldart:"
DECONV_100K := "nnls:" "knn_deconv:" "dstg:" "sd2:" "destvi:st_epochs=20" \
	"graphst_deconv:epochs=100,sc_epochs=100,map_epochs=50" "gtad:epochs=20" "celldart:"
bench-deconv: ## the ST + scRNA-seq deconvolution comparison (book/results/): two gridded datasets x 3 seeds, 100k spots, hippocampus maps, GraphST domains
	for run in $(DECONV_RUNS); do \
		OMP_NUM_THREADS=1 $(BIN)/stcore bench deconv --methods "$${run%%:*}" --seeds 0,1,2 --options "$${run#*:}" \
			--out "results/deconv/$${run%%:*}" || exit 1; done
	OMP_NUM_THREADS=1 $(BIN)/stcore bench deconv --methods destvi --seeds 0,1,2 --options standardize_input=false \
		--out results/deconv/destvi_raw_input
	for run in $(DECONV_100K); do \
		OMP_NUM_THREADS=1 $(BIN)/stcore bench deconv --methods "$${run%%:*}" --datasets synthetic_100k --seeds 0 \
			--options "$${run#*:}" --out "results/deconv_100k/$${run%%:*}" || exit 1; done
	OMP_NUM_THREADS=1 $(BIN)/python tools/deconv_results.py hippocampus $(DECONV_RUNS)
	OMP_NUM_THREADS=1 $(BIN)/stcore bench domains --methods graphst --seeds 0,1,2 --out results/graphst_domains
	$(BIN)/python tools/deconv_results.py collect

student: ## workshop copies of the chapters, solutions removed, in build/student/
	$(BIN)/python tools/make_student.py build/student

lock: ## refresh the pinned versions after changing dependencies
	$(BIN)/pip freeze --exclude-editable | sed 's/+cpu$$//' > requirements-lock.txt

clean:
	rm -rf build book/_build results
