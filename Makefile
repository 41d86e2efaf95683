# `make test` and `make bench` do all their own set-up on a fresh machine: a venv, torch
# (TORCH_SPEC, default: the CPU wheel this machine provides), the extras of pyproject.toml,
# and an in-place build of consequential_ext._C against that torch (no build isolation,
# so pip never pulls the registry's CUDA torch).
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS     ?= test bench triton
# Packages installed without their dependencies (which would pull the registry's CUDA torch).
NO_DEPS    ?=
# `make bench` runs in a venv of its own that adds timm for the real-models section and the
# torchvision whose pure-Python model code timm imports (bench/real_models.py). Not in .venv:
# that torchvision's compiled ops do not load with the CPU torch, which breaks transformers'
# model imports in the tests.
BENCH_VENV ?= .venv-bench
BENCH_NO_DEPS ?= timm==1.0.31 torchvision==0.28.0
PY         := $(VENV)/bin/python
PIP        := $(PY) -m pip install -q --disable-pip-version-check
EXT        := consequential_ext/_C.abi3.so
CSRC       := $(shell find csrc -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \))
PYTEST_ARGS ?=

.PHONY: env build cuda-check cuda-wheel test sanitize-cuda bench mutate clean

env: $(VENV)/.ready
$(VENV)/.ready: pyproject.toml tools/requirements.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) "$(TORCH_SPEC)"
	$(PY) tools/requirements.py $(EXTRAS) > $(VENV)/requirements.txt
	$(PIP) -r $(VENV)/requirements.txt
	$(if $(strip $(NO_DEPS)),$(PIP) --no-deps $(NO_DEPS))
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

# The CUDA wheel in dist/cuda/, built against the registry's CUDA torch in a venv cached
# outside the checkout (never $(VENV)), installed there and checked; no GPU needed.
cuda-wheel:
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" tools/cuda_wheel.sh

test: build cuda-check
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The CUDA kernels' host emulation under ThreadSanitizer and AddressSanitizer: races between
# a block's threads and out-of-bounds accesses fail it (tools/sanitize_cuda.sh).
sanitize-cuda: build
	PYTHON=$(PY) tools/sanitize_cuda.sh

bench:
	$(MAKE) VENV=$(BENCH_VENV) NO_DEPS="$(BENCH_NO_DEPS)" build
	$(BENCH_VENV)/bin/python -m bench --quick

# Mutation testing (docs/mutation.md): each curated mutant of tools/mutants.py in a scratch
# copy (build/mutate), against its own tests; prints the table and the score. Not in CI.
MUTATE_ARGS ?=
mutate: env
	$(PY) tools/mutate.py $(MUTATE_ARGS)

clean:
	rm -rf build $(EXT) .pytest_cache
