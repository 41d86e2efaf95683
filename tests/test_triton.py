"""Triton kernels (ops/triton) against float64 references.

conftest.py sets TRITON_INTERPRET=1, so in CI the kernels are interpreted on CPU tensors;
with TRITON_INTERPRET=0 on a GPU machine (the GPU suite's full run) the same tests run the
compiled kernels on CUDA tensors. Shapes are small and awkward (odd sizes, several tiles,
padding rows/columns, split patch ranges).
"""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from consequential_ext.ops import available_backends, reference
from consequential_ext.ops import triton as triton_ops
from consequential_ext.ops.triton import gram as gram_module, shift as shift_module
from consequential_ext.ops.triton import solve as triton_solve
from consequential_ext.ops.triton._register import check_device, is_interpreted
from consequential_ext.ops.triton.gram import _im2col_gram_kernel

INTERPRETED = is_interpreted(_im2col_gram_kernel)
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRETED and not torch.cuda.is_available(),
                                reason="compiled Triton kernels need a CUDA device")

# Elementwise error bound relative to the Gram of absolute values (|P| |P|ᵀ), which stays
# meaningful where entries cancel. 16-bit products are exact in float32, so they share
# float32's bound; tf32 keeps 10 mantissa bits of each operand (hardware may truncate:
# < 2⁻¹⁰ each, < 2⁻⁹ per product) before float32 accumulation.
GRAM_RTOL = {"ieee": 1e-5, "tf32": 2.5e-3, torch.float64: 1e-12}


def unfold_gram(x, kernel_size, stride, padding, dilation, groups, bias):
    """Independent float64 reference: explicit unfold, per-group patch matrix, P Pᵀ."""
    x = x.detach().cpu().double()
    cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    b, _, n = cols.shape
    grams = []
    for part in cols.reshape(b, groups, -1, n).unbind(1):
        patches = part.permute(1, 0, 2).reshape(part.shape[1], -1)
        if bias:
            patches = torch.cat([patches, patches.new_ones(1, patches.shape[1])])
        grams.append(patches @ patches.T)
    return torch.stack(grams)


def assert_gram_close(got, x, args, rtol):
    want = unfold_gram(x, *args)
    scale = unfold_gram(x.abs(), *args)  # |P| |P|ᵀ
    assert got.shape == want.shape
    err = (got.cpu().double() - want).abs()
    bad = err > rtol * scale + 1e-30
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} entries off, first at "
                           f"{bad.nonzero()[0].tolist()}: max err/scale "
                           f"{(err / (scale + 1e-30)).max().item():.3g} > {rtol}")


def make_input(shape, dtype, layout):
    if layout == "sliced":  # non-contiguous: every other channel and column
        b, c, h, w = shape
        return torch.randn(b, 2 * c, h, 2 * w + 1, dtype=dtype, device=DEVICE)[:, ::2, :, 1::2]
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


# (shape, kernel, stride, padding, dilation, groups, bias, layout, block_d, block_p, split)
GRAM_CASES = [
    ((2, 3, 7, 9), (3, 3), (1, 1), (1, 1), (1, 1), 1, True, "contiguous", 16, 16, 0),
    ((2, 6, 7, 9), (3, 2), (2, 1), (1, 0), (1, 2), 2, True, "contiguous", 16, 16, 3),
    ((3, 5, 6, 5), (3, 3), (1, 2), (2, 1), (1, 1), 1, False, "channels_last", 16, 16, 0),
    ((1, 4, 9, 8), (2, 3), (1, 1), (0, 2), (2, 1), 4, True, "sliced", 16, 32, 2),
    ((2, 7, 5, 5), (1, 1), (2, 2), (0, 0), (1, 1), 1, True, "channels_last", 0, 0, 0),
    ((1, 2, 4, 4), (5, 5), (1, 1), (2, 2), (1, 1), 1, False, "contiguous", 0, 0, 0),
]


@pytest.mark.parametrize("case", GRAM_CASES, ids=lambda c: f"{c[0]}k{c[1]}s{c[2]}g{c[5]}{c[7]}")
def test_im2col_gram_float32_ieee_matches_unfold(case):
    torch.manual_seed(0)
    shape, k, s, p, d, g, bias, layout, bd, bp, split = case
    x = make_input(shape, torch.float32, layout)
    got = triton_ops.im2col_gram(x, k, s, p, d, g, bias, input_precision="ieee",
                                 block_d=bd, block_p=bp, split=split)
    assert got.dtype == torch.float32
    assert_gram_close(got, x, (k, s, p, d, g, bias), GRAM_RTOL["ieee"])


# Layers of the real models (ConvNeXt's depthwise 7×7, MobileNet's strided depthwise, a ViT
# patch embedding with stride = kernel, a 1×1 expansion): on a GPU their 16-bit Grams go to
# this kernel by default (ops/_backends.py), with its default blocks.
REAL_MODEL_CASES = [
    ((2, 6, 9, 8), 7, 1, 3, 1, 6, True, "channels_last"),
    ((2, 8, 9, 9), 3, 2, 1, 1, 8, True, "contiguous"),
    ((2, 3, 16, 16), 4, 4, 0, 1, 1, True, "channels_last"),
    ((2, 16, 5, 5), 1, 1, 0, 1, 1, False, "sliced"),
]


@pytest.mark.parametrize("case", REAL_MODEL_CASES, ids=lambda c: f"{c[0]}k{c[1]}s{c[2]}g{c[5]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_im2col_gram_real_model_layers(case, dtype):
    torch.manual_seed(3)
    shape, k, s, p, d, g, bias, layout = case
    x = make_input(shape, dtype, layout)
    args = ((k, k), (s, s), (p, p), (d, d), g, bias)
    precision = "ieee" if dtype == torch.float32 else None
    got = triton_ops.im2col_gram(x, *args, input_precision=precision)
    assert got.dtype == torch.float32
    assert_gram_close(got, x, args, GRAM_RTOL["ieee"])


@pytest.mark.parametrize("dtype,precision", [(torch.float32, "tf32"), (torch.float16, None),
                                             (torch.bfloat16, None), (torch.float64, None)])
def test_im2col_gram_dtypes(dtype, precision):
    torch.manual_seed(1)
    x = make_input((2, 6, 6, 7), dtype, "channels_last")
    args = ((3, 2), (1, 2), (1, 1), (1, 1), 3, True)
    got = triton_ops.im2col_gram(x, *args, input_precision=precision, block_d=16, block_p=16)
    assert got.dtype == reference.accumulate_dtype(dtype)
    rtol = GRAM_RTOL[torch.float64] if dtype == torch.float64 else GRAM_RTOL[precision or "ieee"]
    assert_gram_close(got, x, args, rtol)


def test_im2col_gram_default_blocks_and_reference_agree():
    torch.manual_seed(2)
    x = torch.randn(3, 5, 8, 7, device=DEVICE)
    got = triton_ops.im2col_gram(x, 3, 2, 1, 1, 1, True, input_precision="ieee").cpu()
    want = reference.im2col_gram(x.cpu().double(), (3, 3), (2, 2), (1, 1), (1, 1), 1, True)
    # bias entries: patch count and patch sums
    assert got[0, -1, -1].item() == 3 * 4 * 4
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


# (shape, kernel, padding, dilation, groups, bias, layout, dtype): stride 1 only
SHIFT_CASES = [
    ((2, 6, 7, 9), (3, 2), (1, 0), (1, 2), 2, True, "contiguous", torch.float32),
    ((3, 5, 6, 5), (3, 3), (2, 1), (1, 1), 1, False, "channels_last", torch.float32),
    ((1, 2, 5, 6), (3, 3), (1, 1), (1, 1), 1, True, "sliced", torch.bfloat16),
    ((2, 3, 3, 4), (3, 3), (1, 1), (2, 1), 1, True, "contiguous", torch.float32),  # no core row
]


@pytest.mark.parametrize("case", SHIFT_CASES, ids=lambda c: f"{c[0]}k{c[1]}p{c[2]}{c[7]}")
def test_im2col_gram_shift_form_matches_unfold(case):
    torch.manual_seed(9)
    shape, k, p, d, g, bias, layout, dtype = case
    x = make_input(shape, dtype, layout)
    got = triton_ops.im2col_gram(x, k, 1, p, d, g, bias, input_precision="ieee", method="shift")
    assert got.dtype == torch.float32
    assert_gram_close(got, x, (k, (1, 1), p, d, g, bias), GRAM_RTOL["ieee"])


def test_im2col_gram_shift_form_pixel_chunks_sum_up():
    torch.manual_seed(10)
    x = torch.randn(2, 3, 5, 6, device=DEVICE)
    args = ((3, 3), (1, 1), (1, 1), 1, True)
    got = triton_ops.im2col_gram_shift(x, [3, 3], [1, 1], [1, 1], 1, True, "ieee",
                                       block_c=16, block_p=16, chunk=16)
    assert_gram_close(got, x, (args[0], (1, 1), *args[1:]), GRAM_RTOL["ieee"])


@pytest.mark.parametrize("method", ["implicit", "shift"])
def test_im2col_gram_without_channels_counts_the_patches(method):
    # No patch rows: only the bias row's patch count B·Ho·Wo (the shift form's planning once
    # divided by the number of channel blocks, 0 here).
    x = torch.randn(2, 0, 5, 4, device=DEVICE)
    got = triton_ops.im2col_gram(x, 3, 1, 1, 1, 2, True, method=method).cpu()
    assert torch.equal(got, torch.full((2, 1, 1), 2.0 * 5 * 4))
    assert torch.equal(got, reference.im2col_gram(x.cpu(), (3, 3), (1, 1), (1, 1), (1, 1), 2, True))


@pytest.mark.parametrize("side", ["d", "n"])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_gram_both_sides(side, bias):
    torch.manual_seed(3)
    x = torch.randn(13, 41, device=DEVICE)[:, 1:40:2]  # (13, 20), non-contiguous
    got = triton_ops.linear_gram(x, bias, side, input_precision="ieee", block_d=16,
                                 block_p=16).cpu()
    x = x.cpu()
    rows = torch.cat([x, torch.ones(13, 1)], 1).double() if bias else x.double()
    want = rows.T @ rows if side == "d" else rows @ rows.T
    scale = rows.abs().T @ rows.abs() if side == "d" else rows.abs() @ rows.abs().T
    assert got.shape == want.shape
    assert ((got.double() - want).abs() <= 1e-5 * scale).all()


def test_cholesky_kernel_matches_torch_and_reports_failure():
    torch.manual_seed(4)
    x = torch.randn(3, 21, 40, dtype=torch.float64, device=DEVICE)
    gram = x @ x.transpose(1, 2) / 40
    gram[1] = -gram[1]  # not positive definite: first pivot fails
    spd = gram.clone()
    spd[1] = -spd[1]
    spd[2, 5:, 5:] = 0  # pivot 5 is exactly the shift below zero
    spd -= 1e-6 * torch.eye(21, dtype=torch.float64, device=DEVICE)  # a ridge < 0 is refused
    factor, info = triton_ops.cholesky(spd)
    assert info.tolist() == [0, 0, 6]
    want = torch.linalg.cholesky(spd[:2].cpu())
    torch.testing.assert_close(factor[:2].cpu(), want, rtol=1e-10, atol=1e-12)
    _, info = triton_ops.cholesky(gram.float(), 1e-3)
    assert info.tolist() == [0, 1, 0]


def solve_reference(gram, grad, ridge):
    eye = torch.eye(gram.shape[-1], dtype=torch.float64)
    system = gram.cpu().double() + ridge * eye
    return torch.linalg.solve(system, grad.cpu().double().transpose(-1, -2)).transpose(-1, -2)


# (batch, M, D, dtype, out_dtype, block_m, block_d): one register block, several blocks,
# rows not a multiple of the block, batch dims, the rescale into 16-bit parameters.
SOLVE_CASES = [
    ((), 5, 7, torch.float32, None, 0, 0),
    ((1, 2), 19, 37, torch.float32, None, 16, 16),
    ((2,), 9, 40, torch.float64, None, 16, 16),
    ((3,), 17, 23, torch.float32, torch.bfloat16, 16, 16),
    ((1,), 33, 18, torch.float16, torch.float16, 0, 0),
]


@pytest.mark.parametrize("case", SOLVE_CASES, ids=lambda c: f"b{c[0]}m{c[1]}d{c[2]}{c[3]}")
def test_ridge_solve_matches_linalg_solve(case):
    torch.manual_seed(5)
    batch, m, d, dtype, out_dtype, bm, bd = case
    x = torch.randn(*batch, d, 3 * d, dtype=torch.float64, device=DEVICE)
    gram = (x @ x.transpose(-1, -2) / (3 * d)).to(dtype)
    grad = torch.randn(*batch, d, m, dtype=dtype, device=DEVICE).transpose(-1, -2)  # strided
    got = triton_ops.ridge_solve(gram, grad, 1e-2, out_dtype, block_m=bm, block_d=bd).cpu()
    want = solve_reference(gram, grad, 1e-2)
    assert got.dtype == (out_dtype or dtype) and got.shape == grad.shape
    # Work dtype: normwise error per row ≲ cond · eps (cond < 20 here); a 16-bit output
    # adds its own rounding: one ulp, since the interpreter's float32 → bfloat16 cast
    # truncates (the GPU's rounds to nearest, half an ulp).
    work_rtol = {torch.float64: 1e-12, torch.float32: 1e-5}[reference.accumulate_dtype(dtype)]
    out_rtol = torch.finfo(got.dtype).eps if got.dtype != want.dtype else 0.0
    err = (got.double() - want).abs()
    bound = work_rtol * want.abs().amax(-1, keepdim=True) + out_rtol * want.abs()
    assert (err <= bound).all(), f"max err/bound {(err / bound).max().item():.3g}"


def test_ridge_solve_large_d_uses_torch_cholesky(monkeypatch):
    monkeypatch.setattr(triton_solve, "TRITON_CHOLESKY_MAX_D", 0)
    torch.manual_seed(6)
    x = torch.randn(2, 20, 50, device=DEVICE)
    gram, grad = x @ x.transpose(1, 2) / 50, torch.randn(2, 6, 20, device=DEVICE)
    got = triton_ops.ridge_solve(gram, grad, 1e-3, None, block_d=16)
    torch.testing.assert_close(got.cpu().double(), solve_reference(gram, grad, 1e-3),
                               rtol=1e-5, atol=1e-5)


def test_ridge_solve_escalates_once_with_a_warning(monkeypatch):
    monkeypatch.setattr(reference, "_escalation_warned", False)
    gram = -0.5 * torch.eye(6, device=DEVICE).expand(2, 6, 6)  # finite, needs ridge > 0.5
    grad = torch.randn(2, 3, 6, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="escalated"):
        got = triton_ops.ridge_solve(gram, grad, 0.1, None)
    torch.testing.assert_close(got, grad / 0.5, rtol=1e-6, atol=1e-6)  # λ = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        triton_ops.ridge_solve(gram, grad, 0.1, None)  # warned once per process


def test_ridge_solve_escalates_each_system_alone(monkeypatch):
    # A batch one of whose systems fails: each system's ridge escalates alone (the batched
    # per-system escalation of the reference, not a Triton launch and host sync per system),
    # and one that no ridge rescues is NaN alone.
    monkeypatch.setattr(reference, "_escalation_warned", False)
    eig = torch.tensor([[1.0] * 5, [-0.5] + [1.0] * 4, [-1e30] + [1.0] * 4, [2.0] * 5])
    gram = torch.diag_embed(eig).to(DEVICE)
    grad = torch.randn(4, 3, 5, device=DEVICE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = triton_ops.ridge_solve(gram, grad, 1e-3, None).cpu()
    assert any("gradient is NaN" in str(w.message) for w in caught)
    lam = torch.tensor([1e-3, 1.0, 0.0, 1e-3], dtype=torch.float64)
    expected = grad.cpu().double() / (eig.double() + lam[:, None])[:, None, :]
    assert got[2].isnan().all()
    torch.testing.assert_close(got[[0, 1, 3]].double(), expected[[0, 1, 3]], rtol=1e-6,
                               atol=1e-6)


def test_ridge_solve_escalating_past_float32_gives_nan_and_the_warning(monkeypatch):
    """A single system whose ridge escalates past float32's largest value: NaN and the
    warning, as the reference gives (it raised 'value cannot be converted to type float
    without overflow' from the factor's launch)."""
    monkeypatch.setattr(reference, "_escalation_warned", False)
    gram = -3e38 * torch.eye(3, device=DEVICE)[None]
    grad = torch.randn(1, 2, 3, device=DEVICE)
    with pytest.warns(RuntimeWarning, match="gradient is NaN"):
        got = triton_ops.ridge_solve(gram, grad, 1e38, None)
    monkeypatch.setattr(reference, "_escalation_warned", False)
    with pytest.warns(RuntimeWarning, match="gradient is NaN"):
        want = reference.ridge_solve(gram.cpu(), grad.cpu(), 1e38)
    assert got.shape == grad.shape and got.isnan().all() and want.isnan().all()


@pytest.mark.parametrize("where", ["gram", "grad"])
def test_ridge_solve_non_finite_gives_nan(where):
    gram = torch.eye(5, device=DEVICE).repeat(2, 1, 1)
    grad = torch.randn(2, 4, 5, device=DEVICE)
    (gram if where == "gram" else grad)[1, 2, 3] = float("inf" if where == "grad" else "nan")
    got = triton_ops.ridge_solve(gram, grad, 1e-3, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == grad.shape and got.isnan().all()


def _lazy_strided(elements, dtype):
    """An ``elements``-long buffer that is never touched as a whole (the kernel's 32-bit
    offset arithmetic needs views spanning ≥ 2³¹ elements; the interpreter reads only the few
    pages a view covers), or skip where the allocation is refused."""
    if not INTERPRETED:
        pytest.skip("interpreter only: on a GPU the lazy buffer would be real memory")
    try:
        return torch.empty(elements, dtype=dtype)
    except RuntimeError as error:  # e.g. vm.overcommit_memory = 2
        pytest.skip(f"cannot reserve {elements} elements: {error}")


def test_ridge_solve_offsets_past_2_31_elements():
    """One system's gradient spanning ≥ 2³¹ elements (M·D of a 262144 × 8193 LM head; D·D
    from D = 46341): int32 offsets wrapped, reading row 2 from 2³² elements before it. Here
    three fp16 rows 1.5·2³⁰ apart: row 2 starts at element 3·2³⁰."""
    d, m, stride, start = 16, 3, 3 << 29, 1 << 30
    buf = _lazy_strided(start + (m - 1) * stride + d, torch.float16)
    rows = torch.randn(m, d, dtype=torch.float16)
    grad = buf.as_strided((1, m, d), (0, stride, 1), start)
    for r in range(m):
        grad[0, r] = rows[r]
    buf[:d] = 0  # where the wrapped offset of row 2 points
    x = torch.randn(1, d, 3 * d, dtype=torch.float64)
    gram = (x @ x.transpose(1, 2) / (3 * d)).float()
    got = triton_ops.ridge_solve(gram, grad, 1e-2, torch.float32)
    want = solve_reference(gram, rows[None], 1e-2)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_linear_gram_offsets_past_2_31_elements():
    """linear_gram(side="n") of a transposed (N, F) input: the patch columns step by N, so
    F·N ≥ 2³¹ wrapped the column offsets. Three fp16 columns 1.5·2³⁰ apart."""
    n, f, stride, start = 16, 3, 3 << 29, 1 << 30
    buf = _lazy_strided(start + (f - 1) * stride + n, torch.float16)
    vals = torch.randn(n, f, dtype=torch.float16)
    x = buf.as_strided((n, f), (1, stride), start)
    for c in range(f):
        x[:, c] = vals[:, c]
    buf[:n] = 0  # where the wrapped offset of column 2 points
    got = triton_ops.linear_gram(x, side="n", input_precision="ieee")
    want = vals.double() @ vals.double().T
    assert ((got.double() - want).abs() <= 1e-5 * (vals.double().abs() @ vals.double().abs().T)).all()


def test_ridge_solve_grid_fits_cuda_limits_for_many_systems(monkeypatch):
    """More than 65535 systems: the fused solve's systems were the grid's second axis, which
    CUDA caps at 65535 (the launch fails on a GPU; the interpreter has no limit). The launch
    is intercepted, its grid checked as csrc/emu/cuda_emu.h's valid_configuration does, and
    the interpreted run skipped."""
    grids = []

    class Check:
        def __init__(self, kernel):
            pass

        def __getitem__(self, grid):
            grids.append(tuple(grid) + (1,) * (3 - len(grid)))
            return lambda *args, **kwargs: None

    monkeypatch.setattr(triton_solve, "wrap_triton", Check)
    batch, d = 65536, 16
    factor = torch.eye(d, device=DEVICE).expand(batch, d, d)
    grad = torch.randn(batch, 1, d, device=DEVICE)
    torch.ops.consequential_ext_triton.cholesky_solve(factor, grad, torch.float32, 0, 0)
    (x, y, z), = grids
    assert x <= 2 ** 31 - 1 and y <= 65535 and z <= 65535 and x * y * z >= batch, grids


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_run_on_their_tensors_device():  # pragma: no cover - multi-GPU only
    """Tensors on cuda:1 while cuda:0 is current: Triton launches on the current device and
    its stream, so the launchers make the tensors' device current (as the CUDA binding's
    CUDAGuard does)."""
    torch.manual_seed(12)
    x = torch.randn(2, 3, 6, 5, device="cuda:1")
    gram = triton_ops.im2col_gram(x, 3, 1, 1, 1, 1, True, input_precision="ieee")
    assert gram.device == x.device
    assert_gram_close(gram.cpu(), x.cpu(), ((3, 3), (1, 1), (1, 1), (1, 1), 1, True),
                      GRAM_RTOL["ieee"])
    a = gram[0].double() / 60
    grad = torch.randn(4, a.shape[-1], device="cuda:1")
    out = triton_ops.ridge_solve(a.float(), grad, 1e-2, None)
    torch.testing.assert_close(out.cpu().double(), solve_reference(a, grad, 1e-2),
                               rtol=1e-4, atol=1e-4)


def test_dispatcher_would_choose_triton_on_cuda():
    from consequential_ext.ops._backends import _compiled_has
    for op in ("im2col_gram", "ridge_solve"):
        names = available_backends(op, "cuda")
        compiled = ["cuda"] if _compiled_has(op, "CUDA") else []
        assert names[:len(compiled) + 1] == compiled + ["triton"], names


def test_matched_gradients_through_the_dispatcher_on_triton(monkeypatch):
    """The public ops → triton wiring, end to end through the C-layers' backward: CPU
    tensors are let through to the (interpreted) Triton backend for this test only. The
    Gram runs in IEEE float32 so a GPU run can share the interpreter's tolerance."""
    import consequential_ext as cx
    from consequential_ext.ops import _backends, use_backend
    monkeypatch.setattr(_backends, "available_backends", lambda op, device: ["triton",
                                                                             "reference"])
    calls = []
    # what ops dispatches to: the Gram's entry point, the solve's past the checks ops made
    for name, module, attr in (("im2col_gram", triton_ops, "im2col_gram"),
                               ("ridge_solve", triton_solve, "solve_checked")):
        def counted(*args, _launch=getattr(module, attr), _name=name, **kwargs):
            calls.append(_name)
            if _name == "im2col_gram":
                kwargs["input_precision"] = "ieee"
            return _launch(*args, **kwargs)
        monkeypatch.setattr(module, attr, counted)
    torch.manual_seed(11)
    new = dict(device=DEVICE, requires_grad=True)
    x, rows = torch.randn(2, 4, 6, 5, device=DEVICE), torch.randn(7, 5, device=DEVICE)
    w, b = torch.randn(6, 2, 3, 3, **new), torch.randn(6, **new)
    lw, lb = torch.randn(3, 5, **new), torch.randn(3, **new)
    grads = {}
    for backend in ("triton", "reference"):
        with use_backend(backend):
            y = cx.functional.cconv2d(x, w, b, stride=(1, 2), padding=1, groups=2, ridge=1e-2)
            z = cx.functional.clinear(rows, lw, lb, ridge=1e-2)
            loss = y.square().sum() + z.square().sum()
            grads[backend] = torch.autograd.grad(loss, (w, b, lw, lb))
    assert sorted(calls) == ["im2col_gram", "ridge_solve", "ridge_solve"]  # triton pass only
    for got, want in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ops_pass_opcheck_and_compile():
    torch.manual_seed(7)
    x = torch.randn(2, 3, 5, 6, device=DEVICE)
    gram_args = (x, [3, 3], [1, 2], [1, 1], [1, 1], 1, True, "ieee", 16, 16, 0)
    torch.library.opcheck(torch.ops.consequential_ext_triton.im2col_gram, gram_args)
    jobs = torch.tensor([[0, 0, 0, 5, 0, 6, 0, 60], [1, -1, 1, 4, 2, 5, 0, 18]],
                        dtype=torch.int32, device=DEVICE)  # (s, t, y0, y1, u0, u1, p0, p1)
    torch.library.opcheck(torch.ops.consequential_ext_triton.shift_correlations,
                          (x, jobs, 1, [1, 1], "ieee", 16, 16))
    a = torch.randn(2, 9, 20, device=DEVICE)
    a = a @ a.transpose(1, 2)
    torch.library.opcheck(torch.ops.consequential_ext_triton.cholesky, (a, 1e-3))
    factor, _ = triton_ops.cholesky(a, 1e-3)
    torch.library.opcheck(torch.ops.consequential_ext_triton.cholesky_solve,
                          (factor, torch.randn(2, 4, 9, device=DEVICE), torch.bfloat16, 0, 0))

    def gram_of(x):
        return triton_ops.im2col_gram(x, 3, (1, 2), 1, 1, 1, True, input_precision="ieee")
    compiled = torch.compile(gram_of, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), gram_of(x), rtol=0, atol=0)


def _run_native_probe(probe):
    """Run ``probe`` in a fresh interpreter from the repo root with Triton in native mode
    (TRITON_INTERPRET=0), where no GPU may be touched."""
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "TRITON_INTERPRET": "0"})


def test_compiled_kernels_trace_into_torch_compile_graphs():
    """The GPU registration (triton_op + wrap_triton, TRITON_INTERPRET=0): AOTAutograd sees
    the Triton kernels themselves, as triton_kernel_wrapper_functional nodes. Traced on
    meta tensors, so no GPU is needed; the compiled graph is inspected, never run."""
    probe = (
        "import torch\n"
        "from torch._dynamo.backends.common import aot_autograd\n"
        "import consequential_ext.ops.triton\n"
        "ops = torch.ops.consequential_ext_triton\n"
        "def f(x, a, g):\n"
        "    gram = ops.im2col_gram(x, [3, 3], [1, 1], [1, 1], [1, 1], 1, True, 'tf32', 0, 0, 0)\n"
        "    factor, info = ops.cholesky(a, 1e-3)\n"
        "    return gram, ops.cholesky_solve(factor, g, torch.bfloat16, 0, 0)\n"
        "graphs = []\n"
        "def record(gm, inputs):\n"
        "    graphs.append(gm.code)\n"
        "    raise RuntimeError('traced; not run')\n"
        "meta = dict(device='meta')\n"
        "args = (torch.empty(2, 3, 8, 8, **meta), torch.empty(2, 20, 20, **meta),\n"
        "        torch.empty(2, 5, 20, **meta))\n"
        "try:\n"
        "    torch.compile(f, backend=aot_autograd(fw_compiler=record), fullgraph=True)(*args)\n"
        "except Exception:\n"
        "    pass\n"
        "print('KERNEL_NODES', graphs[0].count('triton_kernel_wrapper_functional('))\n")
    done = _run_native_probe(probe)
    assert "KERNEL_NODES 3" in done.stdout, (done.stdout + done.stderr)[-3000:]


def rand(*shape):
    return torch.randn(*shape, device=DEVICE)


@pytest.mark.parametrize("call,match", [
    (lambda: triton_ops.im2col_gram(rand(2, 3, 4), 1), "x must be"),
    (lambda: triton_ops.im2col_gram(rand(1, 2, 3, 3).int(), 1), "x must be"),
    (lambda: triton_ops.im2col_gram(rand(1, 3, 4, 4), 3, groups=2), "groups"),
    (lambda: triton_ops.im2col_gram(rand(1, 3, 4, 4), 5), "does not fit"),
    (lambda: triton_ops.im2col_gram(rand(1, 3, 4, 4), 3, input_precision="tf16"),
     "input_precision"),
    (lambda: triton_ops.im2col_gram(rand(1, 3, 4, 4), 3, block_d=24), "block_d"),
    (lambda: triton_ops.im2col_gram(rand(1, 3, 5, 5), 3, 2, method="shift"), "stride"),
    (lambda: triton_ops.im2col_gram(rand(1, 3, 5, 5), 3, method="fft"), "method"),
    (lambda: triton_ops.linear_gram(rand(3, 4), side="x"), "side"),
    # a string bias used to be taken as True (the dispatcher's im2col_gram refused it)
    (lambda: triton_ops.im2col_gram(rand(1, 3, 4, 4), 3, bias="no"), "bias must be a bool"),
    (lambda: triton_ops.linear_gram(rand(3, 4), bias="no", side="n"), "bias must be a bool"),
    (lambda: triton_ops.ridge_solve(rand(3, 3), rand(2, 4), 1e-3, None), "grad"),
    (lambda: triton_ops.ridge_solve(rand(3, 3), rand(2, 3), float("inf"), None), "ridge"),
    (lambda: triton_ops.cholesky(rand(3, 4)), "a must be"),
    # compiled (not interpreted) kernels refuse CPU tensors up front
    (lambda: check_device("im2col_gram", "x", torch.randn(1), kernel=object()), "CUDA tensor"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def spd(*batch, d=5):
    x = torch.randn(*batch, d, 3 * d, device=DEVICE)
    return x @ x.transpose(-1, -2) / (3 * d)


def shift_gram(x=None, **changed):
    """``im2col_gram_shift`` of a (1, 4, 5, 5) input, 3×3 kernel, padding 1, but ``changed``."""
    args = dict(kernel_size=[3, 3], padding=[1, 1], dilation=[1, 1], groups=1, bias=False,
                input_precision="ieee")
    return triton_ops.im2col_gram_shift(rand(1, 4, 5, 5) if x is None else x,
                                        **{**args, **changed})


def implicit_gram(**kwargs):
    return triton_ops.im2col_gram(rand(1, 3, 4, 4), 3, **kwargs)


def solve(gram=None, grad=None, ridge=1e-3, out_dtype=None, **kwargs):
    gram = spd(d=3) if gram is None else gram
    return triton_ops.ridge_solve(gram, rand(2, 3) if grad is None else grad, ridge, out_dtype,
                                  **kwargs)


def bad(id, call, error, match):
    return pytest.param(call, error, match, id=id)


# Bad arguments of the Triton entry points that used to fail deep inside (a Triton, dispatcher
# or unpacking error) or return garbage (a negative / NaN / string ridge, groups not dividing
# C, a negative split): each is refused up front, naming the function and the argument.
BAD_ARGS = [
    bad("gram-block_d-float", lambda: implicit_gram(block_d=32.0), TypeError,
        "im2col_gram: block_d"),
    bad("gram-block_d-bool", lambda: implicit_gram(block_d=True), TypeError,
        "im2col_gram: block_d"),
    bad("gram-block_p-float", lambda: implicit_gram(block_p=16.5), TypeError,
        "im2col_gram: block_p"),
    bad("gram-split-float", lambda: implicit_gram(split=2.0), TypeError, "im2col_gram: split"),
    bad("gram-split-negative", lambda: implicit_gram(split=-3), ValueError, "im2col_gram: split"),
    bad("gram-precision", lambda: implicit_gram(input_precision="tf16"), ValueError,
        "im2col_gram: input_precision"),
    bad("linear-x-float8", lambda: triton_ops.linear_gram(rand(3, 4).to(torch.float8_e5m2)),
        ValueError, "linear_gram: x"),
    bad("linear-block_d", lambda: triton_ops.linear_gram(rand(3, 4), block_d=24), ValueError,
        "linear_gram: block_d"),
    bad("linear-block_p-float", lambda: triton_ops.linear_gram(rand(3, 4), block_p=16.0),
        TypeError, "linear_gram: block_p"),
    bad("linear-split-negative", lambda: triton_ops.linear_gram(rand(3, 4), split=-1),
        ValueError, "linear_gram: split"),
    bad("linear-precision", lambda: triton_ops.linear_gram(rand(3, 4), input_precision="fp8"),
        ValueError, "linear_gram: input_precision"),
    bad("shift-x-list", lambda: shift_gram([[1.0]]), ValueError, "x must be"),
    bad("shift-x-3d", lambda: shift_gram(rand(4, 5, 5)), ValueError, "x must be"),
    bad("shift-x-int", lambda: shift_gram(rand(1, 4, 5, 5).int()), TypeError, "x must be"),
    bad("shift-groups-not-dividing", lambda: shift_gram(groups=3), ValueError, "groups"),
    bad("shift-groups-zero", lambda: shift_gram(groups=0), ValueError, "groups"),
    bad("shift-groups-float", lambda: shift_gram(groups=2.0), ValueError, "groups"),
    bad("shift-kernel-length", lambda: shift_gram(kernel_size=[3]), TypeError, "kernel_size"),
    bad("shift-kernel-float", lambda: shift_gram(kernel_size=[3.0, 3]), TypeError,
        "kernel_size"),
    bad("shift-kernel-zero", lambda: shift_gram(kernel_size=[0, 3]), ValueError, "kernel_size"),
    bad("shift-kernel-too-big", lambda: shift_gram(kernel_size=[9, 9]), ValueError,
        "kernel_size .* does not fit"),
    bad("shift-padding-negative", lambda: shift_gram(padding=[-1, 1]), ValueError, "padding"),
    bad("shift-dilation-zero", lambda: shift_gram(dilation=[0, 1]), ValueError, "dilation"),
    bad("shift-bias", lambda: shift_gram(bias="no"), TypeError, "bias must be a bool"),
    bad("shift-precision", lambda: shift_gram(input_precision="tf16"), ValueError,
        "im2col_gram_shift: input_precision"),
    bad("shift-precision-unresolved", lambda: shift_gram(input_precision=None), ValueError,
        "im2col_gram_shift: input_precision"),
    bad("shift-block_c", lambda: shift_gram(block_c=24), ValueError,
        "im2col_gram_shift: block_c"),
    bad("shift-block_p-negative", lambda: shift_gram(block_p=-16), ValueError,
        "im2col_gram_shift: block_p"),
    bad("shift-chunk-negative", lambda: shift_gram(chunk=-5), ValueError,
        "im2col_gram_shift: chunk"),
    bad("shift-chunk-float", lambda: shift_gram(chunk=16.5), TypeError,
        "im2col_gram_shift: chunk"),
    *(bad(f"cholesky-ridge-{name}", lambda ridge=ridge: triton_ops.cholesky(spd(2), ridge),
          ValueError, "cholesky: ridge")
      for name, ridge in [("negative", -1.0), ("nan", float("nan")), ("inf", float("inf")),
                          ("bool", True), ("string", "1e-3"), ("none", None),
                          ("tensor", torch.tensor(1e-3))]),
    bad("solve-gram-list", lambda: solve(gram=[[1.0]]), TypeError, "ridge_solve: gram"),
    bad("solve-grad-list", lambda: solve(grad=[[1.0, 2.0, 3.0]]), TypeError,
        "ridge_solve: grad"),
    bad("solve-gram-int", lambda: solve(gram=torch.eye(3, dtype=torch.int32, device=DEVICE)),
        ValueError, "ridge_solve: gram"),
    bad("solve-grad-int", lambda: solve(grad=rand(2, 3).int()), ValueError, "ridge_solve: grad"),
    bad("solve-grad-float8", lambda: solve(grad=rand(2, 3).to(torch.float8_e4m3fn)), ValueError,
        "ridge_solve: grad"),
    bad("solve-out_dtype-int", lambda: solve(out_dtype=torch.int32), ValueError,
        "ridge_solve: out_dtype"),
    bad("solve-out_dtype-string", lambda: solve(out_dtype="float16"), ValueError,
        "ridge_solve: out_dtype"),
    bad("solve-block_m", lambda: solve(block_m=24), ValueError, "ridge_solve: block_m"),
    bad("solve-block_m-negative", lambda: solve(block_m=-16), ValueError, "ridge_solve: block_m"),
    bad("solve-block_m-float", lambda: solve(block_m=16.0), TypeError, "ridge_solve: block_m"),
    bad("solve-block_d-bool", lambda: solve(block_d=True), TypeError, "ridge_solve: block_d"),
]


@pytest.mark.parametrize("call,error,match", BAD_ARGS)
def test_bad_argument_is_refused_before_any_launch(monkeypatch, call, error, match):
    def no_launch(kernel):
        raise AssertionError(f"{kernel} launched with a bad argument")
    for module in (gram_module, shift_module, triton_solve):
        monkeypatch.setattr(module, "wrap_triton", no_launch)
    with pytest.raises(error, match=match):
        call()


def test_valid_awkward_input_matches_the_reference_backend():
    """The checks refuse nothing valid: odd sizes, sliced / channels_last input, groups,
    stride, dilation, NumPy integers and floats, empty batches: each entry point against
    ops.reference (float64, so the tolerance is tight). Plain ints for the shift form's
    geometry, a (2, 0, 0) Cholesky and the N-side Gram of no features used to fail."""
    np = pytest.importorskip("numpy")
    tight = dict(rtol=1e-12, atol=1e-12)
    x = make_input((3, 6, 7, 9), torch.float64, "sliced")
    args = ((3, 2), (2, 1), (1, 0), (1, 2), 2, True)
    got = triton_ops.im2col_gram(x, *args, block_d=np.int64(16), split=np.int64(3))
    torch.testing.assert_close(got, reference.im2col_gram(x, *args), **tight)
    x = make_input((2, 6, 7, 8), torch.float64, "channels_last")
    got = triton_ops.im2col_gram_shift(x, 3, 1, 2, np.int64(3), True, "ieee", chunk=40)
    want = reference.im2col_gram(x, (3, 3), (1, 1), (1, 1), (2, 2), 3, True)
    torch.testing.assert_close(got, want, **tight)
    rows = torch.randn(13, 41, dtype=torch.float64, device=DEVICE)[:, 1:40:2]
    got = triton_ops.linear_gram(rows, True, "d", block_p=np.int64(16))
    want = reference.im2col_gram(rows[:, :, None, None], (1, 1), (1, 1), (0, 0), (1, 1), 1, True)
    torch.testing.assert_close(got, want[0], **tight)
    got = triton_ops.linear_gram(rows, False, "n")
    want = reference.im2col_gram(rows[None, :, None], (1, 1), (1, 1), (0, 0), (1, 1), 1, False)
    torch.testing.assert_close(got, want[0], **tight)
    assert torch.equal(triton_ops.linear_gram(rows[:, :0], True, "n"),
                       torch.ones(13, 13, dtype=torch.float64, device=DEVICE))
    a = spd(2, 3, d=7).double()
    for ridge in (0, np.float64(1e-3)):
        factor, info = triton_ops.cholesky(a, ridge)
        eye = torch.eye(7, dtype=torch.float64, device=DEVICE)
        torch.testing.assert_close(factor, torch.linalg.cholesky(a + float(ridge) * eye), **tight)
        assert not info.any()
    factor, info = triton_ops.cholesky(torch.zeros(2, 0, 0, device=DEVICE))
    assert factor.shape == (2, 0, 0) and info.tolist() == [0, 0]
    grad = torch.randn(2, 9, 5, device=DEVICE).transpose(-1, -2)  # float32, strided
    gram = spd(2, d=9).double()
    got = triton_ops.ridge_solve(gram, grad, np.float64(1e-2), torch.float64,
                                 block_m=np.int64(16))
    want = reference.ridge_solve(gram, grad, 1e-2, torch.float64)
    torch.testing.assert_close(got, want, **tight)


def test_import_never_touches_the_gpu():
    probe = ("import torch\n"
             "def refuse(*a, **k): raise AssertionError('GPU queried at import')\n"
             "for name in ('is_available', 'device_count', 'get_device_properties', 'init',\n"
             "             'current_device', 'get_device_capability'):\n"
             "    setattr(torch.cuda, name, refuse)\n"
             "import consequential_ext.ops.triton\n"
             "import bench.bench_triton\n")
    done = _run_native_probe(probe)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gram_and_solve_match_reference():  # pragma: no cover - GPU suite only
    torch.manual_seed(8)
    x = torch.randn(4, 16, 15, 13, device="cuda").to(memory_format=torch.channels_last)
    args = ((3, 3), (1, 1), (1, 1), (1, 1), 2, True)
    for precision in ("ieee", "tf32"):
        for method in ("implicit", "shift"):
            got = triton_ops.im2col_gram(x, *args, input_precision=precision, method=method)
            assert_gram_close(got.cpu(), x.cpu(), args, GRAM_RTOL[precision])
    gram = got.double() / x.shape[0]
    grad = torch.randn(2, 40, gram.shape[-1], device="cuda")
    out = triton_ops.ridge_solve(gram.float(), grad, 1e-2, torch.bfloat16)
    want = solve_reference(gram.cpu(), grad.cpu(), 1e-2)
    torch.testing.assert_close(out.cpu().double(), want, rtol=1e-2, atol=1e-2)


def test_bench_functions_run_on_tiny_shapes(monkeypatch):
    """bench/bench_triton.py's bookkeeping with the timer replaced by one call, so the GPU
    suite does not find its bugs on lent time."""
    from bench import bench_triton as bt
    monkeypatch.setattr(bt, "_bench", lambda fn: (fn(), {"ms": 1.0, "ms_p20": 1.0,
                                                         "ms_p80": 1.0})[1])
    monkeypatch.setattr(bt, "_environment", lambda device: {"device_name": "interpreter"})
    monkeypatch.setattr(bt, "measure_matmul_ceiling", lambda device, dtype: 1.0)
    rows = bt.time_triton_kernels(DEVICE, shapes={
        "conv": [(2, 4, 5, 5, 1, 1, 0, 1, 2)], "linear": [(5, 12)],
        "solve": [((2,), 3, 9)], "cholesky": [(3, 6)]}, quick=True)
    rows += bt.sweep_gram_configs(DEVICE, shape=(1, 3, 4, 4, 3, 1, 1, 1, 1), blocks=((16, 16),))
    kernels = {(row["kernel"], row["provider"]) for row in rows}
    assert {("im2col_gram", "triton-tf32"), ("im2col_gram", "triton-shift-tf32"),
            ("im2col_gram", "cudnn"), ("linear_gram_n", "triton"),
            ("ridge_solve", "triton"), ("cholesky", "triton"),
            ("im2col_gram_sweep", "triton")} <= kernels
    errors = {(row["kernel"], row["provider"]): row["max_rel_err"] for row in rows
              if row["provider"].startswith("triton") and "max_rel_err" in row}
    assert len(errors) == 8, errors
    assert errors.pop(("ridge_solve", "triton")) < 1e-2  # bfloat16 output
    for (kernel, provider), err in errors.items():  # linear_gram runs at the tf32 default
        real_tf32 = not INTERPRETED and ("tf32" in provider or kernel.startswith("linear"))
        assert err < (5e-3 if real_tf32 else 1e-5), (kernel, provider, err)
    # out of time: every case comes back as a skipped row, none is run
    late = bt.time_triton_kernels(DEVICE, quick=True, budget_s=-1.0)
    assert len(late) == 9 and all(row["skipped"] == "time budget" for row in late)
