"""The CUDA kernels of csrc/cuda, run on the CPU through the host emulation (csrc/emu).

The same .cu sources the GPU build compiles are compiled by g++ with csrc/emu/cuda_emu.h
force-included (blocks one after another, threads as host threads with barriers) into a
small shared library, and driven through the same launchers the ATen binding calls. Results
are checked against consequential_ext.ops.reference on small awkward shapes.

By default a block's threads run one at a time in a seeded priority order that changes at
every barrier (cuda_emu.h, the serial schedule): a missing barrier whose race changes values
fails on every run. CX_TEST_SEED picks the order with the inputs; CX_EMU_SCHEDULE=threads runs
them as concurrent host threads instead (tools/sanitize_cuda.sh, under ThreadSanitizer).
"""
import ctypes
import hashlib
import math
import os
import pathlib
import shutil
import subprocess
import tempfile

import pytest
import torch

from consequential_ext.ops import reference

ROOT = pathlib.Path(__file__).resolve().parents[1]
KERNEL_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
EMU_SOURCES = [ROOT / "csrc" / "emu" / "emu_entry.cpp"]
EMU_HEADER = ROOT / "csrc" / "emu" / "cuda_emu.h"
CXX_FLAGS_ENV = os.environ.get("CX_EMU_CXXFLAGS", "").split()   # e.g. -fsanitize=thread
SCHEDULES = {"serial": 0, "threads": 1}
DEPENDENCIES = KERNEL_SOURCES + EMU_SOURCES + sorted((ROOT / "csrc" / "cuda").glob("*.h")) \
    + sorted((ROOT / "csrc" / "cuda").glob("*.cuh")) + [EMU_HEADER]
CXX_FLAGS = ["-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-Wall", "-Wextra", "-Werror",
             "-Wno-unknown-pragmas",     # #pragma unroll is for nvcc
             "-Wno-unused-parameter"]    # the emulation ignores streams

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
TILED, SHIFT, AUTO = 1, 2, 0
SOLVED, NON_FINITE, NOT_PD = 0, 1, 2
LARGE_SHARED = 227 * 1024          # an H100's opt-in shared memory per block

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ for the emulation build")


def _build_library() -> pathlib.Path:
    """Compile the emulation library once per source state (cached by content hash)."""
    flags = CXX_FLAGS + CXX_FLAGS_ENV
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in DEPENDENCIES:
        digest.update(path.name.encode() + path.read_bytes())
    out_dir = pathlib.Path(tempfile.gettempdir()) / f"cx_cuda_emu_{digest.hexdigest()[:16]}"
    library = out_dir / "libcx_cuda_emu.so"
    if not library.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = out_dir / f"partial_{os.getpid()}.so"
        cmd = ["g++", *flags, "-x", "c++", "-include", str(EMU_HEADER),
               *map(str, KERNEL_SOURCES + EMU_SOURCES), "-o", str(partial)]
        # Not g++ under a sanitizer runtime preloaded for this process (tools/sanitize_cuda.sh).
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        result = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if result.returncode:
            pytest.fail(f"emulation build failed:\n{' '.join(cmd)}\n{result.stderr[-4000:]}")
        partial.replace(library)  # atomic: a concurrent session never loads half a file
    return library


@pytest.fixture(scope="session")
def emu():
    lib = ctypes.CDLL(str(_build_library()))
    p, i, ll, d = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_double
    schedule = os.environ.get("CX_EMU_SCHEDULE", "serial")
    if schedule not in SCHEDULES:
        pytest.fail(f"CX_EMU_SCHEDULE={schedule!r}: expected one of {', '.join(SCHEDULES)}")
    lib.cx_emu_set_schedule.argtypes = [i, ctypes.c_ulonglong]
    lib.cx_emu_set_schedule(SCHEDULES[schedule], int(os.environ.get("CX_TEST_SEED", "0")))
    lib.cx_emu_im2col_gram.argtypes = [p, i, ctypes.POINTER(ll), ctypes.POINTER(ll),
                                       ctypes.POINTER(i), i, i, i, p]
    lib.cx_emu_ridge_solve.argtypes = [i, i, ll, i, ll, p, p, p, p, p, ll, d, i,
                                       ctypes.POINTER(i), ctypes.POINTER(d)]
    lib.cx_emu_triangular_solve.argtypes = [i, i, ll, i, ll, p, p, p, ll, i]
    for name in ("cx_emu_half_to_float", "cx_emu_float_to_half", "cx_emu_float_to_bfloat16"):
        getattr(lib, name).argtypes = [p, p, ll]
        getattr(lib, name).restype = None
    return lib


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def emulated_gram(lib, x, kernel_size, stride, padding, dilation, groups, bias, algorithm):
    """What the binding does: pass x's strides as they are (any layout), get (groups, D, D)."""
    (kh, kw), (sy, sx), (py, px), (dy, dx) = map(_pair, (kernel_size, stride, padding, dilation))
    d = x.shape[1] // groups * kh * kw + int(bias)
    out = torch.full((groups, d, d), float("nan"), dtype=reference.accumulate_dtype(x.dtype))
    sizes = (ctypes.c_longlong * 4)(*x.shape)
    strides = (ctypes.c_longlong * 4)(*x.stride())
    conv = (ctypes.c_int * 8)(kh, kw, sy, sx, py, px, dy, dx)
    err = lib.cx_emu_im2col_gram(x.data_ptr(), DTYPE_CODE[x.dtype], sizes, strides, conv, groups,
                                 int(bias), algorithm, out.data_ptr())
    assert err == 0, f"im2col_gram launcher returned cudaError {err}"
    return out


GRAM_CASES = [
    # (B, C, H, W), kernel, stride, padding, dilation, groups, bias, layout
    ((2, 3, 7, 6), 3, 1, 1, 1, 1, True, "channels_last"),
    ((3, 4, 9, 8), (3, 2), (2, 1), (1, 0), 1, 2, False, "contiguous"),
    ((1, 6, 8, 9), 3, 1, 2, 2, 3, True, "contiguous"),
    ((2, 9, 6, 7), 3, 1, 1, 1, 1, False, "transposed_hw"),      # D = 81: two tiles
    ((2, 5, 11, 10), (2, 3), 1, (0, 2), (2, 1), 1, True, "sliced_channels"),
    ((2, 70, 3, 4), 1, 1, 0, 1, 1, True, "channels_last"),       # 1×1: D = 71
    ((1, 2, 5, 5), 3, 1, 3, 3, 1, False, "contiguous"),          # windows mostly padding
    # Tiny Grams: fewer entries, rows and shift pairs than one block has threads, so a grid
    # rounded down instead of up launches no block (an error here, as on a GPU).
    ((2, 1, 5, 4), 3, 1, 1, 1, 1, True, "contiguous"),           # D = 10
    ((3, 2, 4, 5), 1, 1, 0, 1, 2, True, "channels_last"),        # D = 2 per group
]


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed_hw":  # a non-contiguous view with H/W strides swapped
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "sliced_channels":
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x


def _gram_algorithms(case):
    stride, kernel = _pair(case[2]), _pair(case[1])
    shift_ok = stride == (1, 1) and max(kernel) <= 3
    return [TILED, SHIFT] if shift_ok else [TILED]


@pytest.mark.parametrize("case,algorithm", [(c, a) for c in GRAM_CASES for a in _gram_algorithms(c)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gram_matches_reference(emu, case, algorithm, dtype):
    shape, k, s, p, d, g, bias, layout = case
    x = _layout(torch.randn(*shape, dtype=dtype), layout)
    got = emulated_gram(emu, x, k, s, p, d, g, bias, algorithm)
    expected = reference.im2col_gram(x.double(), _pair(k), _pair(s), _pair(p), _pair(d), g, bias)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    scale = expected.abs().max()
    assert torch.allclose(got.double(), expected, atol=tol * scale, rtol=tol), \
        f"max abs error {(got.double() - expected).abs().max():.3g} (scale {scale:.3g})"
    assert torch.equal(got, got.transpose(1, 2)), "Gram must be exactly symmetric"


@pytest.mark.parametrize("channels,groups,picked", [(8, 1, SHIFT), (16, 1, SHIFT), (32, 2, SHIFT),
                                                     (17, 1, TILED), (32, 1, TILED)])
def test_auto_takes_the_shift_form_up_to_16_channels_a_group(emu, channels, groups, picked):
    """The H200's measurements behind kShiftMaxChannels (gram_cuda.h)."""
    torch.manual_seed(channels)
    x = torch.randn(3, channels, 7, 6)
    runs = {a: emulated_gram(emu, x, 3, 1, 1, 1, groups, True, a) for a in (TILED, SHIFT, AUTO)}
    assert not torch.equal(runs[TILED], runs[SHIFT])   # their sums' orders differ: the pick shows
    assert torch.equal(runs[AUTO], runs[picked])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gram_half_inputs_accumulate_in_float32(emu, dtype):
    # Values whose squares' sum overflows fp16 range: only fp32 accumulation survives.
    x = (torch.randn(2, 3, 9, 7) * 60).to(dtype).contiguous(memory_format=torch.channels_last)
    for algorithm in (TILED, SHIFT, AUTO):
        got = emulated_gram(emu, x, 3, 1, 1, 1, 1, True, algorithm)
        assert got.dtype == torch.float32
        expected = reference.im2col_gram(x.double(), (3, 3), (1, 1), (1, 1), (1, 1), 1, True)
        assert torch.allclose(got.double(), expected, rtol=2e-6, atol=2e-6 * expected.abs().max())


@pytest.mark.parametrize("algorithm", [TILED, SHIFT])
def test_gram_of_an_empty_batch_is_zero(emu, algorithm):
    got = emulated_gram(emu, torch.randn(0, 3, 5, 5), 3, 1, 1, 1, 1, True, algorithm)
    assert got.shape == (1, 28, 28) and not got.any()


@pytest.mark.parametrize("algorithm", [TILED, SHIFT, AUTO])
@pytest.mark.parametrize("groups", [1, 2])
def test_gram_without_channels_still_counts_the_patches(emu, algorithm, groups):
    # No patch rows, but the bias row's entry is the patch count B·Ho·Wo (the launcher once
    # returned before the bias kernel whenever the patch rows were empty).
    x = torch.randn(2, 0, 5, 4)
    got = emulated_gram(emu, x, 3, 1, 1, 1, groups, True, algorithm)
    assert torch.equal(got, torch.full((groups, 1, 1), 2.0 * 5 * 4))
    assert torch.equal(got, reference.im2col_gram(x, (3, 3), (1, 1), (1, 1), (1, 1), groups, True))
    assert emulated_gram(emu, x, 3, 1, 1, 1, groups, False, algorithm).shape == (groups, 0, 0)


def test_gram_rejects_shift_form_for_strided_conv(emu):
    x = torch.randn(1, 2, 6, 6)
    sizes = (ctypes.c_longlong * 4)(*x.shape)
    strides = (ctypes.c_longlong * 4)(*x.stride())
    conv = (ctypes.c_int * 8)(3, 3, 2, 2, 0, 0, 1, 1)
    out = torch.empty(1, 18, 18)
    assert emu.cx_emu_im2col_gram(x.data_ptr(), 0, sizes, strides, conv, 1, 0, SHIFT,
                                  out.data_ptr()) != 0


# ---- ridge_solve ------------------------------------------------------------------------

def _spd(batch, d, dtype):
    a = torch.randn(batch, d, d + 3, dtype=torch.float64)
    return (a @ a.transpose(-1, -2) / d).to(dtype)


def emulated_ridge_solve(lib, gram, grad, ridge, out_dtype, max_shared=LARGE_SHARED, max_attempts=12):
    batch, m, d = grad.shape
    out = torch.full((batch, m, d), float("nan"), dtype=out_dtype)
    factor = torch.empty(batch, d, d, dtype=gram.dtype)
    status = torch.full((batch,), -1, dtype=torch.int32)
    outcome, ridge_used = ctypes.c_int(-1), ctypes.c_double(float("nan"))
    err = lib.cx_emu_ridge_solve(DTYPE_CODE[gram.dtype], DTYPE_CODE[out_dtype], batch, d, m,
                                 gram.data_ptr(), grad.data_ptr(), out.data_ptr(), factor.data_ptr(),
                                 status.data_ptr(), max_shared, ridge, max_attempts,
                                 ctypes.byref(outcome), ctypes.byref(ridge_used))
    assert err == 0, f"ridge_solve launcher returned cudaError {err}"
    return out, outcome.value, ridge_used.value


OUT_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


_F32, _F64, _F16, _BF16 = torch.float32, torch.float64, torch.float16, torch.bfloat16
RIDGE_CASES = (
    # every work × out dtype on a small system (factor in shared memory) ...
    [(w, o, 9, 4, True) for w in (_F32, _F64) for o in (_F32, _F64, _F16, _BF16)]
    # ... and larger D: several warps per row, the factor in global memory (the medium-D path)
    + [(_F32, _BF16, 45, 7, False), (_F64, _F64, 45, 7, False), (_F32, _F32, 70, 3, True),
       (_F64, _F16, 70, 3, True)]
    # ... and a factor in shared memory past the 48 KiB a launch gets without opting in
    # (the emulation refuses such a launch unless cudaFuncSetAttribute raised the limit)
    + [(_F64, _F32, 90, 5, True)])


@pytest.mark.parametrize("work,out_dtype,d,m,factor_in_shared", RIDGE_CASES)
def test_ridge_solve_matches_reference(emu, work, out_dtype, d, m, factor_in_shared):
    gram, grad = _spd(3, d, work), torch.randn(3, m, d, dtype=work)
    # Small shared memory: the factor stays in the global workspace (the medium-D path).
    max_shared = LARGE_SHARED if factor_in_shared else 1024 + 4 * d * work.itemsize
    out, outcome, ridge_used = emulated_ridge_solve(emu, gram, grad, 0.05, out_dtype, max_shared)
    assert outcome == SOLVED and ridge_used == 0.05
    expected = reference.ridge_solve(gram.double(), grad.double(), 0.05)
    rel = max(OUT_TOL[out_dtype], OUT_TOL[work])
    assert out.dtype == out_dtype
    err = (out.double() - expected).abs().max() / expected.abs().max()
    assert err < rel, f"relative error {err:.3g} > {rel:.3g}"
    if out_dtype in (torch.float16, torch.bfloat16):
        # The store rounds the kernel's own work-dtype result once, to nearest even (float64
        # through float32, as store_as documents): bit for bit what torch's casts give. (An
        # independent float32 solve is no reference here: where an output is small by
        # cancellation, two float32 solves differ by more than its half ulp.)
        wide, _, _ = emulated_ridge_solve(emu, gram, grad, 0.05, work, max_shared)
        rounded = wide.float().to(out_dtype)
        assert torch.equal(out.view(torch.int16), rounded.view(torch.int16)), \
            f"{(out.view(torch.int16) != rounded.view(torch.int16)).sum()} of {out.numel()} misrounded"


def test_ridge_solve_escalates_the_whole_batch_as_the_cpu_kernel(emu, monkeypatch):
    # The kernel escalates a batch at once, as the CPU one; ops.ridge_solve then solves such a
    # batch again one system at a time (each system's own ridge, as the reference's).
    monkeypatch.setattr(reference, "_escalation_warned", True)   # silence; warnings are not ours
    v = torch.randn(2, 6, 2, dtype=torch.float64)
    gram = v @ v.transpose(1, 2)
    gram[0] -= 3e-3 * torch.eye(6, dtype=torch.float64)         # system 0 indefinite, 1 fine
    grad = torch.randn(2, 3, 6, dtype=torch.float64)
    out, outcome, ridge_used = emulated_ridge_solve(emu, gram, grad, 1e-8, torch.float64)
    assert outcome == SOLVED
    assert math.isclose(ridge_used, 1e-2, rel_tol=1e-9)        # 1e-8 · 10⁶: first λ > 3e-3
    expected = reference.ridge_solve(gram, grad, ridge_used)    # both systems at that ridge
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)


def test_ridge_solve_reports_failure_after_last_attempt(emu):
    gram = -torch.eye(5, dtype=torch.float32).expand(2, 5, 5).contiguous()
    grad = torch.randn(2, 3, 5)
    out, outcome, _ = emulated_ridge_solve(emu, gram, grad, 1e-3, torch.float32, max_attempts=2)
    assert outcome == NOT_PD


@pytest.mark.parametrize("where", ["gram_inf", "grad_nan"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_ridge_solve_non_finite_gives_all_nan(emu, where, out_dtype):
    gram, grad = _spd(3, 6, torch.float32), torch.randn(3, 2, 6)
    if where == "gram_inf":
        gram[1, 2, 3] = float("inf")
    else:
        grad[2, 1, 0] = float("nan")
    out, outcome, _ = emulated_ridge_solve(emu, gram, grad, 0.1, out_dtype)
    assert outcome == NON_FINITE
    assert torch.isnan(out.float()).all()


def test_ridge_solve_state_does_not_leak_between_solves(emu):
    # A finite solve after a non-finite one and the other way round: nothing a block keeps in
    # shared memory (the non-finite flag) may survive into the next launch.
    gram, grad = _spd(3, 6, torch.float32), torch.randn(3, 2, 6)
    poisoned = grad.clone()
    poisoned[1, 0, 3] = float("nan")
    expected = reference.ridge_solve(gram.double(), grad.double(), 0.1)
    for g, want in [(grad, SOLVED), (poisoned, NON_FINITE), (grad, SOLVED), (poisoned, NON_FINITE)]:
        out, outcome, _ = emulated_ridge_solve(emu, gram, g, 0.1, torch.float32)
        assert outcome == want
        if want == SOLVED:
            assert (out.double() - expected).abs().max() / expected.abs().max() < OUT_TOL[torch.float32]
        else:
            assert torch.isnan(out).all()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_triangular_solve_from_external_factor(emu, out_dtype):
    # The binding's large-D path: factor from cuSOLVER (here LAPACK), solve + rescale by ours.
    gram, grad = _spd(2, 37, torch.float32), torch.randn(2, 5, 37)
    factor = torch.linalg.cholesky(gram + 0.1 * torch.eye(37)).contiguous()
    out = torch.empty(2, 5, 37, dtype=out_dtype)
    err = emu.cx_emu_triangular_solve(0, DTYPE_CODE[out_dtype], 2, 37, 5, factor.data_ptr(),
                                      grad.data_ptr(), out.data_ptr(), 1024 + 4 * 37 * 4, 0)
    assert err == 0
    expected = reference.ridge_solve(gram.double(), grad.double(), 0.1)
    rel = max(OUT_TOL[out_dtype], OUT_TOL[torch.float32])
    assert ((out.double() - expected).abs().max() / expected.abs().max()) < rel


# ---- the kernels' dtype conversions -------------------------------------------------------

def test_half_to_float_is_exact_for_every_bit_pattern(emu):
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    got = torch.empty(bits.numel(), dtype=torch.float32)
    emu.cx_emu_half_to_float(bits.data_ptr(), got.data_ptr(), bits.numel())
    expected = bits.view(torch.float16).float()
    nan = torch.isnan(expected)
    assert torch.equal(torch.isnan(got), nan)
    assert torch.equal(got[~nan], expected[~nan])


@pytest.mark.parametrize("dtype,entry", [(torch.float16, "cx_emu_float_to_half"),
                                         (torch.bfloat16, "cx_emu_float_to_bfloat16")])
def test_float_to_16bit_rounds_like_torch(emu, dtype, entry):
    halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype).float()
    halves = halves[torch.isfinite(halves)]
    midpoints = (halves[:-1].double() + halves[1:].double()).div(2).float()   # exact ties
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 65504.0, 65519.99, 65520.0,
                            6e-8, 2.98e-8, 2.9802322e-8, 1e-45, 3.4e38])
    x = torch.cat([halves, midpoints, torch.randn(20000) * torch.logspace(-9, 6, 20000), special])
    got = torch.empty(x.numel(), dtype=torch.int16)
    getattr(emu, entry)(x.data_ptr(), got.data_ptr(), x.numel())
    expected = x.to(dtype).view(torch.int16)
    assert torch.equal(got, expected), f"{(got != expected).sum()} of {x.numel()} differ"
    nan, nan_bits = torch.tensor([float("nan")]), torch.empty(1, dtype=torch.int16)
    getattr(emu, entry)(nan.data_ptr(), nan_bits.data_ptr(), 1)
    assert torch.isnan(nan_bits.view(dtype).float()).all()
