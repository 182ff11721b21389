# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RSRETRIEVE_WORKSPACE ?= $(CURDIR)/rsretrieve-workspace

.PHONY: install demo test bench notebook clean gpu-check

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned: 2.13.0 resolves to the CPU build on these machines; a bare `torch` may pull CUDA.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[cpu,dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	bash tools/demo.sh

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

notebook: $(STAMP)
	$(BIN)/python tools/run_notebook.py notebooks/explore.ipynb

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_model.py
	$(BIN)/python benchmarks/bench_readers.py
	$(BIN)/python benchmarks/bench_pipeline.py
	$(BIN)/python benchmarks/bench_search.py --quick

# On a lent GPU machine (../shared/GPU.md): the `cuda` tests and the GPU measurements, as a
# BENCHMARKS.md table; without CUDA a dry run (tiny sizes on the CPU, says `dry run`, exits 0).
gpu-check:
	bash tools/gpu_check.sh

clean:
	rm -rf $(VENV) rsretrieve-workspace
