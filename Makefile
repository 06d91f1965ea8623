# fastbn developer entry points. Each target creates .venv and builds the package itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fastbn-installed

.PHONY: setup test test-cpu test-cuda bench lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml meson.build
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet meson-python meson ninja "Cython>=3.0.10" numpy
	$(BIN)/python -m pip install --quiet --no-build-isolation --editable ".[test,bench]"
	touch $@

test: test-cpu test-cuda

test-cpu: setup
	$(BIN)/pytest tests

test-cuda: setup
	@echo "CUDA kernels run in the numba simulator: make test-cuda"

bench: setup
	$(BIN)/fastbn-bench

lint: setup
	$(BIN)/python -m pip install --quiet ruff
	$(BIN)/ruff check fastbn tests benchmarks
	$(BIN)/ruff format --check fastbn tests benchmarks

clean:
	rm -rf $(VENV) build builddir .pytest_cache .benchmarks
