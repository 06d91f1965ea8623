# fastbn developer entry points. Each target creates .venv and builds the package itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastbn-installed
# meson and ninja are installed into the venv; the editable build looks for them on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup test test-cpu test-cuda test-no-openmp bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml meson.build
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet meson-python meson ninja "Cython>=3.0.10" numpy
	$(BIN)/python -m pip install --quiet --no-build-isolation --editable ".[test,bench,cuda]"
	touch $@

test: test-cpu test-cuda

# CPU backends; the CUDA modules skip themselves here (they need the simulator, set below).
test-cpu: setup
	$(BIN)/pytest tests

# CUDA kernels on the CPU through numba's simulator, in their own process: the variable
# must be set before numba is imported and would change every other test.
test-cuda: setup
	NUMBA_ENABLE_CUDASIM=1 $(BIN)/pytest tests/test_cuda_kernels.py tests/test_cuda_api.py

# A second build without OpenMP (serial Cython kernels) must pass the kernel tests too.
NOOMP_VENV := build/venv-no-openmp
test-no-openmp:
	$(PYTHON) -m venv $(NOOMP_VENV)
	$(NOOMP_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(NOOMP_VENV)/bin/python -m pip install --quiet ".[test]" -Csetup-args=-Dopenmp=disabled
	cd $(NOOMP_VENV) && bin/python -c "import fastbn.backends.cython_cpu as c; assert not c.openmp_enabled(), 'OpenMP is compiled in'"
	cd build && venv-no-openmp/bin/pytest -p no:cacheprovider --import-mode=importlib ../tests/test_cython_kernels.py

bench: setup
	$(BIN)/fastbn-bench

lint: setup
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check fastbn tests benchmarks
	$(BIN)/ruff format --check fastbn tests benchmarks

clean:
	rm -rf $(VENV) build builddir .pytest_cache .benchmarks
