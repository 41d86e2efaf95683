#!/usr/bin/env bash
# `make cuda-wheel`: build the CUDA wheel into dist/cuda/ and check it, without a GPU.
#  1. A venv with the registry's CUDA build of torch (TORCH_SPEC) in CX_CUDA_VENV (default
#     ${XDG_CACHE_HOME:-~/.cache}/consequential_ext/cuda-venv): created once, reused across
#     runs and clones, never the .venv of `make test`. Its installs ignore pip configuration
#     files and find-links, which may offer a local CPU wheel that also satisfies TORCH_SPEC.
#     It holds torch and its own dependencies (no numpy: a minimal install) and build tools.
#  2. FORCE_CUDA=1 pip wheel (objects in build/cuda/, reused by the next run).
#  3. Installs the wheel into that venv; tools/check_cuda_wheel.py checks it (one line).
#   TORCH_SPEC=... CX_CUDA_VENV=... MAX_JOBS=2 PYTHON=python3 tools/cuda_wheel.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VENV=${CX_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/consequential_ext/cuda-venv}
BUILD=$PWD/build/cuda
OUT=dist/cuda
# What the build needs beside torch, and cuobjdump for the check (the toolkit may lack it).
BUILD_REQS=("setuptools>=77" "ninja" "nvidia-cuda-cuobjdump")
STAMP="$VENV/.cx-cuda-venv"
WANT="$TORCH_SPEC ${BUILD_REQS[*]}"
mkdir -p "$BUILD" "$(dirname "$VENV")"
# One run at a time per venv (clones share it): installs into it must not interleave.
exec 9>"$VENV.lock"
flock 9
# torch warns at import when numpy is missing, which this venv is on purpose.
export PYTHONWARNINGS="ignore:Failed to initialize NumPy"

# The venv's pip, without this machine's pip configuration file, find-links or constraints.
venv_pip() {
  env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT -u PIP_NO_INDEX \
    PIP_CONFIG_FILE=/dev/null "$VENV/bin/python" -m pip --disable-pip-version-check "$@"
}

fail() { echo "cuda-wheel: $*" >&2; exit 1; }

if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
  echo "cuda-wheel: installing $WANT into $VENV (cold cache: ~5 GB download)"
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  venv_pip index versions torch --timeout 30 --retries 1 >"$BUILD/registry-probe.log" 2>&1 \
    || fail "cannot reach the package registry to install $TORCH_SPEC" \
            "($(tail -n 1 "$BUILD/registry-probe.log"))"
  venv_pip install --timeout 60 --retries 3 "$TORCH_SPEC" "${BUILD_REQS[@]}" \
      >"$BUILD/venv.log" 2>&1 \
    || { tail -n 20 "$BUILD/venv.log" >&2; fail "pip install $WANT failed (log: $BUILD/venv.log)"; }
  echo "$WANT" >"$STAMP"
fi
"$VENV/bin/python" -c "import sys, torch; sys.exit(torch.version.cuda is None)" \
  || fail "torch in $VENV has no CUDA" \
          "($("$VENV/bin/python" -c 'import torch; print(torch.__version__)')): delete $VENV, rerun"

rm -rf "$OUT"
# build/cuda instead of build/: the in-place CPU build of `make build` keeps its objects.
printf '[build]\nbuild_base = %s\n' "$BUILD" >"$BUILD/dist.cfg"
start=$SECONDS
DIST_EXTRA_CONFIG="$BUILD/dist.cfg" FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} \
  venv_pip wheel --no-build-isolation --no-deps --no-index -v -w "$OUT" . >"$BUILD/build.log" 2>&1 \
  || { grep -E "error|Error" "$BUILD/build.log" | tail -n 20 >&2
       fail "build failed (log: $BUILD/build.log)"; }
wheel=$(ls "$OUT"/consequential_ext-*.whl)
echo "cuda-wheel: built $wheel in $((SECONDS - start)) s"

# Offline; `pip check` then holds the wheel's torch pin against the venv's torch.
venv_pip install --no-index --force-reinstall --no-deps -q "$wheel"
venv_pip check >/dev/null || fail "$(venv_pip check)"
# From outside the checkout, so that the package comes from the wheel.
cd "$BUILD" && "$VENV/bin/python" "$OLDPWD/tools/check_cuda_wheel.py" "$OLDPWD/$wheel"
