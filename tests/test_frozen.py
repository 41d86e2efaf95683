"""A frozen weight or bias is a constant of the layer, not an unknown of the matching (paper 1
eq. 59 solves ΔW X = µE for the weights that change): a frozen bias leaves X without its ones
row, and a bias that trains under a frozen weight is matched alone on its constant-1 input
(A = output locations per sample). References: float64, explicit unfold,
``torch.linalg.solve`` (``matched_reference``), and the bias-alone formula written out."""
import copy

import pytest
import torch

import consequential_ext as cx
from matched_reference import matched_conv2d, matched_linear

RIDGE = 0.05


def _freeze(layer, which):
    getattr(layer, which).requires_grad_(False)
    return layer


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("rows", [3, 40])            # column side (N < D), row side
@pytest.mark.parametrize("rule", ["consequential", "backmatch"])
def test_linear_frozen_weight_or_bias(dtype, tol, rows, rule):
    torch.manual_seed(0)
    x = torch.randn(rows, 6, dtype=dtype) + 1          # a mean: the ones row correlates with X
    gy = torch.randn(rows, 2, dtype=dtype)
    layer = _freeze(cx.CLinear(6, 2, ridge=RIDGE, rule=rule, dtype=dtype), "weight")
    (layer(x) * gy).sum().backward()
    want = gy.double().sum(0) / (1 + RIDGE)            # A = 1 for the ones row
    assert torch.allclose(layer.bias.grad.double(), want, rtol=tol, atol=tol)

    layer = _freeze(cx.CLinear(6, 2, ridge=RIDGE, rule=rule, dtype=dtype), "bias")
    (layer(x) * gy).sum().backward()
    want, _ = matched_linear(x, layer.weight, None, gy, RIDGE)   # X without the ones row
    assert torch.allclose(layer.weight.grad.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("batch,channels,groups,stride", [(1, 16, 1, 1), (4, 16, 2, 1),
                                                          (3, 2, 1, 2)])
def test_conv2d_frozen_weight_or_bias(dtype, tol, batch, channels, groups, stride):
    torch.manual_seed(1)
    x = torch.randn(batch, channels, 5, 5, dtype=dtype) + 1
    conf = dict(stride=stride, padding=1, groups=groups)
    layer = _freeze(cx.CConv2d(channels, 4, 3, ridge=RIDGE, dtype=dtype, **conf), "weight")
    y = layer(x)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    locations = y.shape[2] * y.shape[3]
    want = gy.double().sum((0, 2, 3)) / (locations + RIDGE)
    assert torch.allclose(layer.bias.grad.double(), want, rtol=tol, atol=tol)

    layer = _freeze(cx.CConv2d(channels, 4, 3, ridge=RIDGE, dtype=dtype, **conf), "bias")
    (layer(x) * gy).sum().backward()
    want, _ = matched_conv2d(x, layer.weight, None, gy, (stride, stride), 1, (1, 1), groups,
                             RIDGE)
    assert torch.allclose(layer.weight.grad.double(), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["conv1d", "conv3d"])
def test_other_convs_frozen_weight_or_bias(kind):
    torch.manual_seed(2)
    make = {"conv1d": lambda bias: cx.CConv1d(2, 3, 3, bias=bias, ridge=RIDGE),
            "conv3d": lambda bias: cx.CConv3d(2, 3, 2, bias=bias, ridge=RIDGE)}[kind]
    x = torch.randn((2, 2, 7) if kind == "conv1d" else (2, 2, 3, 4, 3), dtype=torch.float64)
    layer = _freeze(make(True).double(), "weight")
    y = layer(x)
    gy = torch.randn_like(y)
    (y * gy).sum().backward()
    dims = [0] + list(range(2, y.dim()))
    want = gy.sum(dims) / (y[0, 0].numel() + RIDGE)
    torch.testing.assert_close(layer.bias.grad, want, rtol=1e-10, atol=1e-12)

    layer = _freeze(make(True).double(), "bias")
    bare = make(False).double()
    bare.weight.data.copy_(layer.weight)
    (layer(x) * gy).sum().backward()
    (bare(x) * gy).sum().backward()            # a frozen bias is a constant offset
    torch.testing.assert_close(layer.weight.grad, bare.weight.grad, rtol=1e-10, atol=1e-12)


def test_one_step_with_the_weight_frozen_removes_the_mean_residual():
    """Paper 1's consequence for the parameters that move: lr 1 and a tiny ridge on the bias
    alone leaves each output's mean residual at 0 (the joint solve's bias part does not)."""
    torch.manual_seed(3)
    layer = _freeze(cx.CLinear(8, 3, ridge=1e-9, dtype=torch.float64), "weight")
    x, t = torch.randn(4, 8, dtype=torch.float64) + 1, torch.randn(4, 3, dtype=torch.float64)
    (0.5 * (layer(x) - t).square().sum(-1).mean()).backward()
    before = (layer(x) - t).mean(0)
    with torch.no_grad():
        layer.bias -= layer.bias.grad
    assert before.abs().min() > 1e-2 and (layer(x) - t).mean(0).abs().max() < 1e-8


def test_one_step_with_the_bias_frozen_reaches_the_targets():
    """N ≤ in: the weight alone can move every output onto its target (eqs. 58–62)."""
    torch.manual_seed(4)
    layer = _freeze(cx.CLinear(8, 3, ridge=1e-9, dtype=torch.float64), "bias")
    x, t = torch.randn(5, 8, dtype=torch.float64) + 1, torch.randn(5, 3, dtype=torch.float64)
    (0.5 * (layer(x) - t).square().sum(-1).mean()).backward()
    with torch.no_grad():
        layer.weight -= layer.weight.grad
    assert (layer(x) - t).abs().max() < 1e-6


def test_bias_step_under_a_frozen_weight_is_a_descent_direction():
    for seed in range(20):
        torch.manual_seed(seed)
        layer = _freeze(cx.CLinear(4, 3, dtype=torch.float64), "weight")
        x, t = torch.randn(16, 4, dtype=torch.float64) + 2, torch.randn(16, 3, dtype=torch.float64)
        out = layer(x)
        (0.5 * (out - t).square().sum(-1).mean()).backward()
        assert (layer.bias.grad * (out - t).detach().mean(0)).sum() > 0


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_amortised_frozen_bias_is_the_solve_without_its_row(kind):
    """The amortizer's Gram has no ones row while the bias is frozen: fresh, undamped and
    unguarded, the step is the exact bias-free layer's."""
    torch.manual_seed(5)
    if kind == "linear":
        layer, bare = cx.CLinear(3, 2, ridge=0.1), cx.CLinear(3, 2, bias=False, ridge=0.1)
        x = torch.randn(12, 3, dtype=torch.float64) + 1
    else:
        layer, bare = cx.CConv2d(2, 3, 3, ridge=0.1), cx.CConv2d(2, 3, 3, bias=False, ridge=0.1)
        x = torch.randn(4, 2, 6, 6, dtype=torch.float64) + 1
    layer, bare = _freeze(layer.double(), "bias"), bare.double()
    bare.weight.data.copy_(layer.weight)
    cx.amortize(layer, every=1, decay=0.0, damping=0.0, gram_oversample=None,
                safeguard_columns=None, exact_when_cheaper=False)
    gy = torch.randn_like(bare(x))
    (layer(x) * gy).sum().backward()
    (bare(x) * gy).sum().backward()
    torch.testing.assert_close(layer.weight.grad, bare.weight.grad, rtol=1e-10, atol=1e-12)


def test_amortised_frozen_bias_stale_inverse_and_safeguard():
    """Every 2 steps a refactorisation, damping and the safeguard on: the weight's step is
    G_W M⁻¹ · s, M the damped running Gram of the weight's rows (no ones row while the bias
    is frozen), s the safeguard's."""
    torch.manual_seed(6)
    lam, damp, decay = 0.05, 0.3, 0.8
    layer = _freeze(cx.CLinear(3, 2, ridge=lam).double(), "bias")
    cx.amortize(layer, every=2, gram_every=1, decay=decay, damping=damp, gram_oversample=None,
                safeguard_columns=10 ** 6, exact_when_cheaper=False)
    running = None
    for step in range(4):
        x = torch.randn(12, 3, dtype=torch.float64) * (1 + step) + 1
        gy = torch.randn(12, 2, dtype=torch.float64) / 12
        layer.zero_grad()
        (layer(x) * gy).sum().backward()
        a = x.T @ x / 12
        running = a if running is None else decay * running + (1 - decay) * a
        if step % 2 == 0:
            m = running + (lam + damp * running.trace() / 3) * torch.eye(3, dtype=torch.float64)
        g = gy.T @ x
        step_w = torch.linalg.solve(m, g.T).T
        s = min(1.0, float((g * step_w).sum()
                           / ((step_w @ a * step_w).sum() + lam * step_w.square().sum())))
        torch.testing.assert_close(layer.weight.grad, s * step_w, rtol=1e-10, atol=1e-12)


def test_attention_frozen_in_proj_weight_trains_its_bias_alone():
    torch.manual_seed(7)
    mha = cx.CMultiheadAttention(4, 2, ridge=RIDGE).double()
    mha.in_proj_weight.requires_grad_(False)
    plain = copy.deepcopy(mha)
    plain.rule = "sgd"
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    gy = torch.randn(3, 2, 4, dtype=torch.float64)
    (mha(x, x, x)[0] * gy).sum().backward()
    (plain(x, x, x)[0] * gy).sum().backward()
    torch.testing.assert_close(mha.in_proj_bias.grad, plain.in_proj_bias.grad / (1 + RIDGE))


def test_weight_frozen_by_autograd_grad_only_is_not_frozen():
    """Asking autograd.grad for the bias alone does not freeze the weight: the bias gets its
    part of the joint solve, as before."""
    torch.manual_seed(8)
    layer = cx.CLinear(5, 2, ridge=RIDGE, dtype=torch.float64)
    x, gy = torch.randn(9, 5, dtype=torch.float64) + 1, torch.randn(9, 2, dtype=torch.float64)
    (gb,) = torch.autograd.grad((layer(x) * gy).sum(), [layer.bias])
    _, want = matched_linear(x, layer.weight, layer.bias, gy, RIDGE)
    torch.testing.assert_close(gb, want)
    assert not torch.allclose(gb, gy.sum(0) / (1 + RIDGE))
