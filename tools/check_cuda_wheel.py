"""Checks a CUDA wheel installed in the running (CUDA torch) venv; no GPU needed.

    python tools/check_cuda_wheel.py WHEEL

What `make cuda-wheel` promises: the wheel's tag and torch pin; its _C links the CUDA runtime
and defines every launcher declared in csrc/cuda/*.h; its fat binary holds exactly the
cubins/PTX setup.py asked nvcc for; it imports (from the venv, not the checkout) in a
minimal install (torch and its own dependencies: no numpy); every op with a CPU kernel has a
CUDA one and dispatches cuda → triton → reference on CUDA tensors; the CPU ops still match
float64 references. Prints one summary line, or fails naming the first broken promise.
"""
from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_setup_helpers():
    """setup.py as a module (it builds only when run as __main__): the arch list, the toolkit."""
    spec = importlib.util.spec_from_file_location("cx_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_config = _load_setup_helpers()


class CheckFailed(Exception):
    pass


def check(condition, message):
    if not condition:
        raise CheckFailed(message)


def check_wheel_file(wheel: Path, torch_release: str):
    check(re.fullmatch(r"consequential_ext-[^-]+-cp310-abi3-[a-z0-9_]+\.whl", wheel.name),
          f"{wheel.name}: expected a cp310-abi3 wheel (Py_LIMITED_API is 3.10)")
    meta = next(n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".dist-info/METADATA"))
    requires = re.findall(r"^Requires-Dist: (.+)$", zipfile.ZipFile(wheel).read(meta).decode(),
                          re.MULTILINE)
    check(f"torch=={torch_release}" in requires,
          f"{wheel.name} requires {requires}, not the torch it was built for "
          f"(torch=={torch_release})")


def declared_launchers() -> list[str]:
    """Functions declared at namespace scope in csrc/cuda/*.h (the launchers)."""
    names = []
    for header in sorted(ROOT.glob("csrc/cuda/*.h")):
        names += re.findall(r"^[A-Za-z_][\w:<> ]*?\b(\w+)\(", header.read_text(), re.MULTILINE)
    check(names, "no launcher declarations found in csrc/cuda/*.h")
    return names


def _output(*command: str) -> str:
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def cuobjdump(toolkit: str) -> str:
    """The toolkit's cuobjdump, else the one of the nvidia-cuda-cuobjdump wheel."""
    import nvidia
    candidates = [os.path.join(toolkit, "bin", "cuobjdump")] + \
        sorted(glob.glob(os.path.join(nvidia.__path__[0], "*", "bin", "cuobjdump")))
    found = [c for c in candidates if os.access(c, os.X_OK)]
    check(found, f"no cuobjdump in {candidates}: pip install nvidia-cuda-cuobjdump")
    return found[0]


def check_binary(so: str, toolkit: str, platform_tag: str) -> tuple[str, list[str], str]:
    """(the CUDA runtime _C needs, the launchers it defines, its cubins and PTX)."""
    needed = _output("readelf", "-d", so)
    cudart = re.findall(r"\[(libcudart\.so[.\d]*)\]", needed)
    check(cudart, f"{so} does not link the CUDA runtime (no libcudart in its NEEDED entries)")
    check("[libstdc++.so.6]" in needed, f"{so} does not link libstdc++ dynamically (a static "
          f"copy beside torch's crashes the ops' error messages; see setup.py)")
    symbols = _output("nm", "-C", "--defined-only", so)
    launchers = declared_launchers()
    missing = [n for n in launchers if f"consequential_ext::cuda::{n}(" not in symbols]
    check(not missing, f"{so} lacks the CUDA launchers {missing}")
    dynamic = _output("objdump", "-T", so)
    glibc = max((tuple(map(int, v.split("."))) for v in re.findall(r"GLIBC_([\d.]+)", dynamic)),
                default=(2, 0))
    tagged = re.match(r"manylinux_(\d+)_(\d+)_", platform_tag)
    check(tagged is None or glibc <= tuple(map(int, tagged.groups())),
          f"{so} needs glibc {glibc}, newer than its tag {platform_tag}")

    # Every kernel source is compiled to exactly the cubins and PTX setup.py asked nvcc for.
    listing = _output(cuobjdump(toolkit), "--list-elf", "--list-ptx", so)
    flags = build_config._gencode_flags(*build_config.arch_list())
    want = sorted({f"{code.replace('compute_', 'sm_')}.ptx" if code.startswith("compute_")
                   else f"{code}.cubin" for code in (f.rsplit("code=", 1)[1] for f in flags)})
    for source in sorted(ROOT.glob("csrc/cuda/*.cu")):
        held = sorted(re.findall(rf"\b{source.stem}\.(sm_\w+\.(?:cubin|ptx))\b", listing))
        check(held == want, f"{so} holds {held} for {source.name}; setup.py asked for {want}")
    cubins = [w[:-6] for w in want if w.endswith(".cubin")]
    ptx = [w[:-4].replace("sm_", "compute_") for w in want if w.endswith(".ptx")]
    return cudart[0], launchers, f"cubins {' '.join(cubins)} + PTX {' '.join(ptx)}"


def check_dispatch(cx) -> list[str]:
    ops = sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                 if name.startswith("consequential_ext::"))
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    # Ops named with a leading underscore are CPU test hooks (_im2col_gram_algorithm: one
    # named CPU algorithm), not part of the API every device serves.
    with_cpu = [op for op in ops if has_kernel(f"consequential_ext::{op}", "CPU")
                and not op.startswith("_")]
    check(with_cpu, f"no consequential_ext op has a CPU kernel (ops: {ops})")
    for op in with_cpu:
        check(has_kernel(f"consequential_ext::{op}", "CUDA"),
              f"consequential_ext::{op} has a CPU kernel but no CUDA kernel")
        backends = cx.ops.available_backends(op, "cuda")
        check(backends == ["cuda", "triton", "reference"],
              f"available_backends({op!r}, 'cuda') is {backends}, "
              f"not ['cuda', 'triton', 'reference']")
    return with_cpu


def check_cpu_ops(cx) -> float:
    """Largest relative error of the compiled CPU ops against float64 references."""
    gen = torch.Generator().manual_seed(16)
    x = torch.randn(3, 4, 7, 5, dtype=torch.float64, generator=gen)
    with cx.ops.use_backend("cpu"):
        gram = cx.ops.im2col_gram(x, (3, 2), stride=(2, 1), padding=1)
    cols = torch.nn.functional.unfold(x, (3, 2), stride=(2, 1), padding=1)
    cols = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    want = cols.T @ cols
    errors = [((gram - want).abs().max() / want.abs().max()).item()]

    a = torch.randn(2, 9, 9, dtype=torch.float64, generator=gen)
    a = a @ a.transpose(-1, -2)
    g = torch.randn(2, 4, 9, dtype=torch.float64, generator=gen)
    with cx.ops.use_backend("cpu"):
        out = cx.ops.ridge_solve(a, g, 0.3)
    want = torch.linalg.solve(a + 0.3 * torch.eye(9, dtype=torch.float64), g.transpose(-1, -2))
    want = want.transpose(-1, -2)
    errors.append(((out - want).abs().max() / want.abs().max()).item())
    check(max(errors) < 1e-10,
          f"CPU ops disagree with the float64 references: relative errors {errors}")
    return max(errors)


def main():
    wheel = Path(sys.argv[1])
    check(torch.version.cuda is not None, f"torch {torch.__version__} in {sys.prefix} has no CUDA")
    toolkit, why = build_config.find_toolkit()
    check(toolkit, why)
    release = torch.__version__.split("+", 1)[0]
    check_wheel_file(wheel, release)
    check(importlib.util.find_spec("numpy") is None,
          "numpy is installed: the venv must be a minimal install (torch and its dependencies)")

    import consequential_ext as cx
    check(Path(cx.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()),
          f"consequential_ext imported from {cx.__file__}, not from the wheel in {sys.prefix}")
    built = torch.ops.consequential_ext.built_with_torch()
    check(built == torch.__version__, f"built_with_torch() is {built}, running {torch.__version__}")
    so = glob.glob(os.path.join(os.path.dirname(cx.__file__), "_C*.so"))
    check(len(so) == 1, f"expected one _C library in {os.path.dirname(cx.__file__)}, found {so}")
    cudart, launchers, archs = check_binary(so[0], toolkit, wheel.stem.rsplit("-", 1)[1])
    ops = check_dispatch(cx)
    error = check_cpu_ops(cx)
    size = wheel.stat().st_size / 2**20
    print(f"cuda-wheel ok: {wheel} ({size:.1f} MiB, version "
          f"{importlib.metadata.version('consequential_ext')}, requires torch=={release}), built "
          f"with torch {built}; _C needs {cudart}, defines "
          f"{len(launchers)} launchers, holds {archs}; CUDA kernels and backends cuda/triton/"
          f"reference for {', '.join(ops)} (no numpy); CPU ops match float64 "
          f"(rel. err. {error:.1e})")


if __name__ == "__main__":
    try:
        main()
    except CheckFailed as failure:
        sys.exit(f"cuda-wheel check FAILED: {failure}")
