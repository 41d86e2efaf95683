#!/usr/bin/env bash
# The host emulation of csrc/cuda (tests/test_cuda_emulation.py) under ThreadSanitizer, then
# under AddressSanitizer: data races between the emulated threads of a block (a missing
# __syncthreads/__syncwarp, even a benign one) and out-of-bounds reads/writes (a guard off by
# one that changes no value) are reported on every run. Exits non-zero on any report.
#
# The sanitizer runtime is preloaded into the Python process, which loads the instrumented
# emulation library through ctypes. torch's OpenMP threads are not instrumented and would give
# false race reports: OMP_NUM_THREADS=1. --capture=sys: the reports, written to file descriptor 2,
# show even for a test that passes. The emulation runs its threads concurrently here
# (CX_EMU_SCHEDULE=threads): the deterministic schedule runs a block's threads as fibers on
# one host thread, where ThreadSanitizer sees no two accesses as concurrent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
CXX=${CXX:-g++}
# Every kernel and every barrier, on few cases (the full file takes minutes under TSan).
SELECT=${SANITIZE_SELECT:-"not every_bit_pattern and not rounds_like_torch"}

run_under() {  # name, runtime library, compile flags, sanitizer options variable=value
  local name=$1 runtime
  runtime=$("$CXX" -print-file-name="$2")
  echo "== $name: $3"
  env CX_EMU_CXXFLAGS="$3" CX_EMU_SCHEDULE=threads OMP_NUM_THREADS=1 "$4" LD_PRELOAD="$runtime" \
    "$PYTHON" -m pytest -q -p no:cacheprovider --capture=sys tests/test_cuda_emulation.py -k "$SELECT"
}

status=0
run_under ThreadSanitizer libtsan.so.2 "-fsanitize=thread -g" \
  TSAN_OPTIONS="exitcode=66 halt_on_error=0 second_deadlock_stack=1 suppressions=$PWD/tools/tsan.supp" || status=$?
run_under AddressSanitizer libasan.so.8 "-fsanitize=address -fno-omit-frame-pointer -g" \
  ASAN_OPTIONS="detect_leaks=0 halt_on_error=1 abort_on_error=0" || status=$((status ? status : $?))
if [ "$status" -ne 0 ]; then echo "sanitize-cuda: FAILED (exit $status)"; fi
exit "$status"
