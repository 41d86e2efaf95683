"""The math contract's consequences (docs/design.md §2; paper 1, eqs. 58–62)."""
import pytest
import torch

import consequential_ext as cx
from consequential_ext import matching
import matched_reference as ref


def _one_sgd_step(n, d_in, d_out, ridge, bias):
    layer = cx.CLinear(d_in, d_out, bias=bias, dtype=torch.float64, ridge=ridge)
    x = torch.randn(n, d_in, dtype=torch.float64)
    t = torch.randn(n, d_out, dtype=torch.float64)
    y0 = layer(x)
    (0.5 * ((y0 - t) ** 2).sum(-1).mean()).backward()
    torch.optim.SGD(layer.parameters(), lr=1.0).step()
    with torch.no_grad():
        return x, t, y0.detach(), layer(x)


@pytest.mark.parametrize("bias", [True, False])
def test_one_step_reaches_targets_when_n_le_d(bias):
    x, t, _, y1 = _one_sgd_step(n=6, d_in=9, d_out=3, ridge=1e-10, bias=bias)
    torch.testing.assert_close(y1, t, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n,d_in", [(5, 8), (17, 4)])
def test_one_step_residual_formula(n, d_in):
    ridge = 0.3
    x, t, y0, y1 = _one_sgd_step(n, d_in, 2, ridge, bias=True)
    cols = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], 1).T        # X: (D, N)
    e = (y0 - t).T                                                     # E: (out, N)
    nl = n * ridge
    expected = e @ (nl * torch.linalg.inv(cols.T @ cols + nl * torch.eye(n, dtype=x.dtype)))
    torch.testing.assert_close((y1 - t).T, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n,d_in,bias", [(3, 10, True), (12, 5, False), (7, 7, True)])
def test_linear_row_side_equals_column_side(n, d_in, bias):
    x = torch.randn(n, d_in, dtype=torch.float64)
    gy = torch.randn(n, 4, dtype=torch.float64)
    row = matching.matched_linear(x, gy, bias, 0.01, side="row")
    col = matching.matched_linear(x, gy, bias, 0.01, side="column")
    for a, b in zip(row, col):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("stride,padding,dilation,groups", [(1, 1, 1, 1), (2, 0, 1, 2), (1, 2, 2, 3)])
def test_conv_row_side_equals_column_side(stride, padding, dilation, groups):
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)
    w_shape = (6, 6 // groups, 3, 3)
    ho = (7 + 2 * padding - dilation * 2 - 1) // stride + 1
    wo = (5 + 2 * padding - dilation * 2 - 1) // stride + 1
    gy = torch.randn(2, 6, ho, wo, dtype=torch.float64)
    args = (x, gy, w_shape, (stride, stride), (padding, padding), (dilation, dilation), groups,
            True, 0.05)
    row = matching.matched_conv2d(*args, side="row")
    col = matching.matched_conv2d(*args, side="column")
    for a, b in zip(row, col):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-11)


def test_solve_side_picks_the_smaller_system():
    assert matching.solve_side(p=8, d=1000) == "column"
    assert matching.solve_side(p=10000, d=64) == "row"
    assert matching.solve_side(p=144, d=145) == "column"   # flops nearly tied: the full-rank one
    assert matching.solve_side(p=145, d=145) == "row"


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_rank_deficient_row_side_is_not_solved_in_float32(kind):
    # P just below D at a tiny ridge: the D×D Gram has rank ≤ P and its float32 Cholesky
    # lost the small directions (10× off); the P×P side is well posed.
    torch.manual_seed(8)
    ridge = 1e-8
    if kind == "linear":
        layer, x = cx.CLinear(64, 7, ridge=ridge), torch.randn(64, 64)      # N = 64, D = 65
    else:
        layer, x = cx.CConv2d(16, 5, 3, stride=2, padding=1, ridge=ridge), \
            torch.randn(4, 16, 12, 12)                                      # P = 144, D = 145
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    w, b, x64, gy64 = (t.detach().double() for t in (layer.weight, layer.bias, x, gy))
    expected = ref.matched_linear(x64, w, b, gy64, ridge) if kind == "linear" else \
        ref.matched_conv2d(x64, w, b, gy64, (2, 2), (1, 1), (1, 1), 1, ridge)
    for got, want in zip((layer.weight.grad, layer.bias.grad), expected):
        assert (got.double() - want).norm() <= 2e-2 * want.norm()   # cond ~1e5: float32 allows ~5e-3


def test_non_finite_input_gives_non_finite_grads_without_exception():
    layer = cx.CConv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    layer(x).sum().backward()
    assert not torch.isfinite(layer.weight.grad).any()
    lin = cx.CLinear(4, 2)
    lin(torch.tensor([[1.0, float("inf"), 0.0, 2.0]] * 3)).sum().backward()
    assert not torch.isfinite(lin.weight.grad).all()


def test_bf16_input_accumulates_in_float32_and_returns_param_dtype():
    ridge = 0.1
    layer = cx.CLinear(8, 3, ridge=ridge, dtype=torch.bfloat16)
    x = torch.randn(20, 8, dtype=torch.bfloat16)
    layer(x).float().square().sum().backward()
    assert layer.weight.grad.dtype == torch.bfloat16
    # Reference from the same bf16 values in float64.
    xd = x.double()
    gy = 2 * (xd @ layer.weight.double().T + layer.bias.double())
    rows = torch.cat([xd, torch.ones(20, 1, dtype=xd.dtype)], 1)
    g = gy.T @ rows
    m = torch.linalg.solve(rows.T @ rows / 20 + ridge * torch.eye(9, dtype=xd.dtype), g.T).T
    err = (layer.weight.grad.double() - m[:, :-1]).norm() / m[:, :-1].norm()
    assert err < 3e-2   # bf16 output rounding of y and the gradient, not the solve


# 384 outputs: M ≥ 2·D right-hand sides, where the CPU solve once took an explicit inverse
# (potri + GEMM), 7 % off in ΔW·X here (csrc/cpu/lapack_solve.cpp).
@pytest.mark.parametrize("out", [48, 384])
def test_float32_rounding_lands_where_the_inputs_do_not_vary(out):
    """cond(A + λI) ≈ ‖A‖/λ: large inputs after a LayerNorm (outputs summing to ~0 over
    channels: a near-null direction of A) make the float32 weight gradient differ from the
    float64 one in that direction, which the batch's inputs barely see — the update's effect
    on the outputs, ΔW·X, stays at float32 rounding (docs/design.md §2, Numerics)."""
    torch.manual_seed(50)
    norm = torch.nn.LayerNorm(96)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.02)
    x = (100 * norm(torch.randn(512, 96) * 3 + 1)).detach()
    gy, weight = torch.randn(512, out), torch.randn(out, 96)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        layer = cx.CLinear(96, out, dtype=dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
        layer(x.to(dtype)).backward(gy.to(dtype))
        grads[dtype] = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).double()
    exact, error = grads[torch.float64], grads[torch.float32] - grads[torch.float64]
    rows = torch.cat([x.double(), torch.ones(512, 1, dtype=torch.float64)], 1)
    assert (error.norm() / exact.norm()).item() > 1e-3        # ill-conditioned in weights...
    assert ((error @ rows.T).norm() / (exact @ rows.T).norm()).item() < 1e-4  # not outputs


def test_each_call_and_each_accumulated_backward_is_matched_on_its_own_rows():
    """docs/design.md §2: two calls in one backward, or two backwards accumulated, sum two
    matched gradients, each on its own rows — which is not the matched gradient of the rows
    together (gradient accumulation is not a larger batch)."""
    torch.manual_seed(0)
    ridge = 1e-3
    layer = cx.CLinear(10, 3, dtype=torch.float64, ridge=ridge)
    parts = [torch.randn(4, 10, dtype=torch.float64) for _ in range(2)]
    signals = [torch.randn(4, 3, dtype=torch.float64) for _ in range(2)]
    expected = [sum(ref.matched_linear(x, layer.weight, layer.bias, g, ridge)[i]
                    for x, g in zip(parts, signals)) for i in (0, 1)]
    sum(layer(x).mul(g).sum() for x, g in zip(parts, signals)).backward()   # one backward
    once = (layer.weight.grad.clone(), layer.bias.grad.clone())
    layer.zero_grad()
    for x, g in zip(parts, signals):                                       # accumulated
        layer(x).backward(g)
    for got in (once, (layer.weight.grad, layer.bias.grad)):
        for a, e in zip(got, expected):
            torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)
    whole = ref.matched_linear(torch.cat(parts), layer.weight, layer.bias, torch.cat(signals),
                               ridge)[0]
    assert (whole - expected[0]).norm() > 0.1 * whole.norm()


# One group's Gram failing its float32 Cholesky at the layer's ridge (near-identical huge
# channels) escalates that group's ridge only: the other group is matched as a conv of its
# own would be (it was solved with λ = 1e3, 99% off, when the escalation was batch-wide).
@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("amortized", [False, True])
def test_a_groups_escalation_leaves_the_other_groups_ridge(backend, amortized, monkeypatch):
    monkeypatch.setattr(cx.ops.reference, "_escalation_warned", False)  # warns once a process
    if backend not in cx.ops.available_backends("ridge_solve", "cpu"):
        pytest.skip(f"no {backend} backend")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, 6, 6, generator=gen)
    x[:, :4] = 1e4 * torch.randn(4, 1, 6, 6, generator=gen) \
        + 1e-3 * torch.randn(4, 4, 6, 6, generator=gen)
    layer = cx.CConv2d(8, 4, 3, groups=2, ridge=1e-8)
    if amortized:   # every step a fresh, undamped Gram: the exact rule
        cx.amortize(layer, every=1, decay=0.0, damping=0.0, gram_oversample=None)
    grad_out = torch.randn(4, 4, 4, 4, generator=gen)
    with cx.ops.use_backend(backend), pytest.warns(RuntimeWarning, match="escalated|ridge"):
        layer(x).backward(grad_out)
    w, b = ref.matched_conv2d(x[:, 4:], layer.weight[2:], layer.bias[2:], grad_out[:, 2:],
                              (1, 1), 0, (1, 1), 1, 1e-8)
    for got, want in ((layer.weight.grad[2:], w), (layer.bias.grad[2:], b)):
        assert ((got.double() - want).norm() / want.norm()) < 1e-4
