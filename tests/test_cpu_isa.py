"""Every variant of the CPU kernels that this machine runs — AVX-512, AVX2, portable — passes
the CPU kernel tests: the suite itself only reaches the widest one, and a narrower variant
once shipped correct but 25× slower without any test noticing its code. Each variant runs
tests/test_cpu_kernels.py (the Gram's correlation micro-kernel), tests/test_conv_gram_grad.py
(the same kernel's G) and tests/test_cpu_solve_lanes.py (the lane solver) in a subprocess with
CX_CPU_ISA set."""
import os
import pathlib
import subprocess
import sys

import pytest

TESTS = pathlib.Path(__file__).parent


def _cpu_flags() -> set[str]:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _runs(isa: str) -> bool:
    flags = _cpu_flags()
    return {"portable": True, "avx2": {"avx2", "fma"} <= flags, "avx512": "avx512f" in flags}[isa]


@pytest.mark.parametrize("isa", ["portable", "avx2", "avx512"])
def test_cpu_kernels_pass_on_each_variant(isa):
    if not _runs(isa):
        pytest.skip(f"this CPU does not run the {isa} variant")
    env = dict(os.environ, CX_CPU_ISA=isa)
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(TESTS / "test_cpu_kernels.py"),
                          str(TESTS / "test_conv_gram_grad.py"),
                          str(TESTS / "test_cpu_solve_lanes.py")],
                         env=env, cwd=TESTS.parent, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and " failed" not in run.stdout, run.stdout[-2000:]


def test_unknown_variant_is_refused_by_name():
    code = ("import torch, consequential_ext\n"
            "x = torch.randn(2, 16, 5, 5)\n"
            "torch.ops.consequential_ext._im2col_gram_algorithm("
            "x, [3, 3], [1, 1], [1, 1], [1, 1], 1, False, 'shift')\n")
    run = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, CX_CPU_ISA="sse9"),
                         cwd=TESTS.parent, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "CX_CPU_ISA must be portable, avx2 or avx512, not 'sse9'" in run.stderr, run.stderr
