#!/usr/bin/env bash
# Compile every CUDA kernel source (csrc/cuda/*.cu) with nvcc for sm_90a and a portable PTX
# target, failing on any error, and print ptxas's per-kernel register / spill / shared-memory
# report. No GPU and no torch needed: the kernels include CUDA headers only.
# With PYTHON set to an interpreter that has torch, also type-checks the ATen binding
# (csrc/cuda/*_binding.cpp) against that torch's headers: a CPU torch wheel lacks
# c10/cuda/impl/cuda_cmake_macros.h and this machine lacks the cuBLAS/cuSPARSE/cuSOLVER headers,
# so those are stubbed with opaque handle types (g++ -fsyntax-only: nothing is linked).
#   NVCC=... NVCC_ARCH_FLAGS=... PYTHON=... tools/nvcc_check.sh [OUTDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-$(command -v nvcc || true)}
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "nvcc_check: nvcc not found (set NVCC=/path/to/nvcc)" >&2
  exit 1
fi
OUTDIR=${1:-build/nvcc-check}
ARCH_FLAGS=${NVCC_ARCH_FLAGS:-"-gencode arch=compute_90a,code=sm_90a -gencode arch=compute_80,code=compute_80"}
mkdir -p "$OUTDIR"
"$NVCC" --version | tail -n 2

status=0
for src in csrc/cuda/*.cu; do
  name=$(basename "$src" .cu)
  log="$OUTDIR/$name.ptxas.log"
  echo "== nvcc $src"
  # shellcheck disable=SC2086
  if ! "$NVCC" -std=c++20 -O3 --expt-relaxed-constexpr -lineinfo $ARCH_FLAGS -Xptxas -v \
        -Icsrc -c "$src" -o "$OUTDIR/$name.o" >"$log" 2>&1; then
    cat "$log" >&2
    echo "nvcc_check: FAILED to compile $src" >&2
    status=1
    continue
  fi
  # One line per kernel and arch: demangled name, registers, spills, static shared memory.
  awk '
    /Compiling entry function/ { match($0, /entry function '\''[^'\'']*'\''/); fn = substr($0, RSTART + 16, RLENGTH - 17);
                                 match($0, /for '\''[^'\'']*'\''/); arch = substr($0, RSTART + 5, RLENGTH - 6) }
    /spill stores/              { spill = $0; sub(/^[ \t]+/, "", spill) }
    /Used [0-9]+ registers/     { used = $0; sub(/^.*Used/, "Used", used); print arch "\t" fn "\n\t" used "; " spill }
  ' "$log" | c++filt | sed 's/(anonymous namespace):://g; s/consequential_ext::cuda:://g'
  if grep -q "warning" "$log"; then grep "warning" "$log"; fi
done

if [[ -n "${PYTHON:-}" ]]; then
  if ! torch_include=$("$PYTHON" -c \
      "import torch.utils.cpp_extension as c; print(' '.join(c.include_paths()))"); then
    echo "nvcc_check: PYTHON=$PYTHON cannot import torch: cannot check the binding" >&2
    exit 1
  fi
  stubs="$OUTDIR/stub-include"
  mkdir -p "$stubs/c10/cuda/impl"
  echo '#pragma once' >"$stubs/c10/cuda/impl/cuda_cmake_macros.h"
  printf '#pragma once\ntypedef struct cusparseContext* cusparseHandle_t;\ntypedef int cusparseStatus_t;\n' >"$stubs/cusparse.h"
  printf '#pragma once\ntypedef struct cublasContext* cublasHandle_t;\ntypedef int cublasStatus_t;\n' >"$stubs/cublas_v2.h"
  printf '#pragma once\ntypedef struct cublasLtContext* cublasLtHandle_t;\n' >"$stubs/cublasLt.h"
  printf '#pragma once\ntypedef struct cusolverDnContext* cusolverDnHandle_t;\ntypedef int cusolverStatus_t;\n' >"$stubs/cusolverDn.h"
  echo '#pragma once' >"$stubs/cusolver_common.h"
  # nvcc may be a wrapper script: ask it where its own headers are.
  cuda_include=${CUDA_INCLUDE:-$("$NVCC" -E -x cu - -M </dev/null 2>/dev/null | tr ' ' '\n' \
                 | awk '/\/cuda_runtime\.h$/ && !found { sub(/\/cuda_runtime\.h$/, ""); print; found = 1 }')}
  cuda_include=${cuda_include:-/usr/local/cuda/include}
  for src in csrc/cuda/*_binding.cpp; do
    echo "== g++ -fsyntax-only $src (torch headers, stubbed CUDA libraries)"
    # shellcheck disable=SC2046
    if ! "${CXX:-g++}" -std=c++20 -fsyntax-only -DTORCH_API_INCLUDE_EXTENSION_H -I"$stubs" \
          $(printf -- '-I%s ' $torch_include) -I"$cuda_include" -Icsrc -Icsrc/cuda "$src"; then
      echo "nvcc_check: the binding $src does not compile" >&2
      status=1
    fi
  done
fi
exit $status
