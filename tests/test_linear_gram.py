"""A Linear layer's Gram (and the column side's) from the compiled kernel where it pays:
against the float64 product of explicit rows, on both sides of the switch, and through
CLinear against the float64 matched reference."""
import pytest
import torch

import consequential_ext as cx
import matched_reference as ref
from consequential_ext import matching, ops


def _explicit_gram(x, bias):
    rows = x.double()
    if bias:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=torch.float64)], dim=1)
    return rows.T @ rows


def _rel_err(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


def _compiled_calls(fn):
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "consequential_ext::im2col_gram")


def _rows(n, d, layout, dtype):
    if layout == "transposed":               # the column side's (D, P) view of (P, D) rows
        return torch.randn(d, n, dtype=torch.float64).to(dtype).T
    if layout == "sliced":
        return torch.randn(n, 2 * d + 1, dtype=torch.float64).to(dtype)[:, 1::2]
    return torch.randn(n, d, dtype=torch.float64).to(dtype)


# (N, D): the kernel's side (D >= 128, N >= 2·D, odd sizes) and the GEMMs' (too few rows,
# too few columns).
KERNEL_SHAPES = [(269, 131), (517, 129), (300, 150)]
GEMM_SHAPES = [(255, 131), (400, 127), (9, 200)]


@pytest.mark.parametrize("shape", KERNEL_SHAPES + GEMM_SHAPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_linear_gram_matches_explicit_rows(shape, bias, layout, dtype, tol):
    x = _rows(*shape, layout, dtype)
    got = matching._linear_gram(x, bias)
    assert got.dtype == dtype and got.shape == (shape[1] + bias,) * 2
    if shape in KERNEL_SHAPES:              # mirrored from one triangle: exactly symmetric
        assert torch.equal(got, got.T)
    assert _rel_err(got, _explicit_gram(x, bias)) < tol


@pytest.mark.parametrize("shape", KERNEL_SHAPES + GEMM_SHAPES, ids=str)
def test_kernel_runs_exactly_where_it_pays(shape):
    x = torch.randn(shape)
    expected = int(shape in KERNEL_SHAPES)
    assert _compiled_calls(lambda: matching._linear_gram(x, True)) == expected
    with ops.use_backend("reference"):          # forced off the compiled ops: the GEMMs
        assert _compiled_calls(lambda: matching._linear_gram(x, True)) == 0


@pytest.mark.parametrize("lead,fin,fout,side", [
    ((2, 150), 133, 5, "row"),        # N = 300 >= 2·134: the row side's Gram from the kernel
    ((130,), 300, 4, "column"),       # the column side's 130 × 130 Gram of 301 rows
])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_clinear_with_the_kernel_gram_matches_reference(lead, fin, fout, side, dtype, tol):
    ridge = 0.05
    layer = cx.CLinear(fin, fout, dtype=dtype, ridge=ridge)
    x = torch.randn(*lead, fin, dtype=dtype, requires_grad=True)
    n = x[..., 0].numel()
    assert matching.solve_side(n, fin + 1) == side
    y = layer(x)
    gy = torch.randn_like(y)
    assert _compiled_calls(lambda: y.backward(gy)) == 1
    gw, gb = ref.matched_linear(x.detach().double(), layer.weight.double(),
                                layer.bias.double(), gy.double(), ridge)
    assert _rel_err(layer.weight.grad, gw) < tol
    assert _rel_err(layer.bias.grad, gb) < tol
