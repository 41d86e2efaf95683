# `make test` and `make bench` do all their own set-up on a fresh machine: a venv, torch
# (TORCH_SPEC, default: the CPU wheel this machine provides), the extras of pyproject.toml,
# and an in-place build of consequential_ext._C against that torch (no build isolation,
# so pip never pulls the registry's CUDA torch).
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= test bench triton
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip install -q --disable-pip-version-check
EXT        := consequential_ext/_C.abi3.so
CSRC       := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \))
PYTEST_ARGS ?=

.PHONY: env build cuda-check test bench mutate clean

env: $(VENV)/.ready
$(VENV)/.ready: pyproject.toml tools/requirements.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	$(PY) tools/requirements.py $(EXTRAS) > $(VENV)/requirements.txt
	$(PIP) -r $(VENV)/requirements.txt
	touch $@

build: $(EXT)
$(EXT): $(VENV)/.ready setup.py $(CSRC)
	$(PY) setup.py -q build_ext --inplace

# Every CUDA kernel source compiled by nvcc (no GPU needed), with the ptxas register/spill
# report; re-run only when a CUDA source or the script changed.
CUDA_SRC   := $(shell find csrc/cuda -type f \( -name '*.cu' -o -name '*.cuh' -o -name '*.h' \))
cuda-check: build/nvcc-check/.done
build/nvcc-check/.done: $(CUDA_SRC) $(wildcard csrc/cuda/*.cpp) tools/nvcc_check.sh
	PYTHON=$(PY) tools/nvcc_check.sh build/nvcc-check
	touch $@

test: build cuda-check
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: build
	$(PY) -m bench --quick

# Mutation testing (docs/mutation.md): each curated mutant of tools/mutants.py in a scratch
# copy (build/mutate), against its own tests; prints the table and the score. Not in CI.
MUTATE_ARGS ?=
mutate: env
	$(PY) tools/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf build $(EXT) .pytest_cache
