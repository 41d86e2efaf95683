"""C-layers used beyond one call per forward with [W | b] all trained (docs/design.md §2):
frozen biases and weights, gradients asked for part of the parameters, layers called twice,
and amortised layers under those usages. Against an independent float64 reference: explicit
patches (``Tensor.unfold``), ``torch.linalg.solve`` on the trained parameters' rows."""
import copy
import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import consequential_ext as cx
from matched_reference import matched_conv2d

amortize_module = importlib.import_module("consequential_ext.amortize")
RIDGE = 0.05
F64 = torch.float64


def _columns(x, weight, stride, padding):
    """(X as D_w × P columns, the signal's layout for dZ, N) of a Linear (2-D weight) or a
    conv of any spatial rank, from explicit padding and unfold."""
    if weight.dim() == 2:
        rows = x.detach().double().reshape(-1, weight.shape[1])
        return rows.T, rows.shape[0]
    spatial = weight.dim() - 2
    x = F.pad(x.detach().double(), [padding] * 2 * spatial)
    for i in range(spatial):
        x = x.unfold(2 + i, weight.shape[2 + i], stride)        # (B, C, *out, *k)
    batch = x.shape[0]
    order = (1, *range(2 + spatial, 2 + 2 * spatial), 0, *range(2, 2 + spatial))
    return x.permute(order).reshape(weight[0].numel(), -1), batch


def _signal(gy, weight):
    if weight.dim() == 2:
        return gy.double().reshape(-1, weight.shape[0]).T
    return gy.double().transpose(0, 1).reshape(weight.shape[0], -1)


def reference(x, weight, gy, stride, padding, trains_weight, trains_bias):
    """G (A + λI)⁻¹ with X the rows of the parameters that train: the input's patches for
    the weight, a constant-1 row for the bias."""
    cols, n = _columns(x, weight, stride, padding)
    rows = ([cols] if trains_weight else []) \
        + ([torch.ones(1, cols.shape[1], dtype=F64)] if trains_bias else [])
    big_x = torch.cat(rows)
    g = _signal(gy, weight) @ big_x.T
    a = big_x @ big_x.T / n
    m = torch.linalg.solve(a + RIDGE * torch.eye(a.shape[0], dtype=F64), g.T).T
    gw = m[:, :cols.shape[0]].reshape(weight.shape) if trains_weight else None
    gb = m[:, -1] if trains_bias else None
    return gw, gb


KINDS = {
    "linear": (lambda: cx.CLinear(5, 3, ridge=RIDGE, dtype=F64), (2, 3, 5), 1, 0),
    "linear-column": (lambda: cx.CLinear(7, 3, ridge=RIDGE, dtype=F64), (4, 7), 1, 0),
    "conv1d": (lambda: cx.CConv1d(2, 3, 3, stride=2, padding=1, ridge=RIDGE, dtype=F64),
               (3, 2, 9), 2, 1),
    "conv2d": (lambda: cx.CConv2d(2, 3, 3, padding=1, ridge=RIDGE, dtype=F64),
               (3, 2, 5, 4), 1, 1),
    "conv2d-column": (lambda: cx.CConv2d(3, 2, 3, stride=2, ridge=RIDGE, dtype=F64),
                      (1, 3, 7, 7), 2, 0),
    "conv3d": (lambda: cx.CConv3d(2, 3, (2, 3, 2), padding=1, ridge=RIDGE, dtype=F64),
               (2, 2, 3, 4, 3), 1, 1),
}


def _close(got, want):
    """float64: entrywise; float32: the solve's rounding, in norm."""
    if got.dtype == F64:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    else:
        assert ((got.double() - want).norm() / want.norm()) < 1e-4


def _backward(layer, x):
    """Runs the backward of ``layer(x)`` with a random output gradient; returns it."""
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    return gy


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("rule", ["consequential", "backmatch"])
@pytest.mark.parametrize("frozen", ["bias", "weight"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_frozen_parameter_is_no_row_of_the_matched_system(kind, frozen, rule, dtype):
    """A frozen bias is a constant (X without the ones row, as bias=False); a bias trained
    under a frozen weight is matched alone (X the ones row: g_b / (locations + λ))."""
    torch.manual_seed(0)
    make, shape, stride, padding = KINDS[kind]
    layer = make().to(dtype)
    layer.rule = rule
    getattr(layer, frozen).requires_grad_(False)
    x = torch.randn(shape, dtype=dtype) + 1.0    # a mean: the joint solve differs from these
    gy = _backward(layer, x)
    gw, gb = reference(x, layer.weight.double(), gy, stride, padding, frozen != "weight",
                       frozen != "bias")
    assert getattr(layer, frozen).grad is None
    trained, want = (layer.bias, gb) if frozen == "weight" else (layer.weight, gw)
    _close(trained.grad, want)


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("batch,channels,groups,stride", [(4, 16, 2, 1), (3, 4, 2, 2)])
def test_a_frozen_parameter_of_a_grouped_conv(dtype, batch, channels, groups, stride):
    """Per group, as ungrouped: the bias alone over the output locations, the weight on its
    group's patches without the ones row (reference: ``matched_reference``)."""
    torch.manual_seed(1)
    x = torch.randn(batch, channels, 5, 5, dtype=dtype) + 1
    conf = dict(stride=stride, padding=1, groups=groups)
    layer = cx.CConv2d(channels, 4, 3, ridge=RIDGE, dtype=dtype, **conf)
    layer.weight.requires_grad_(False)
    gy = _backward(layer, x)
    want = gy.double().sum((0, 2, 3)) / (gy.shape[2] * gy.shape[3] + RIDGE)
    _close(layer.bias.grad, want)

    layer = cx.CConv2d(channels, 4, 3, ridge=RIDGE, dtype=dtype, **conf)
    layer.bias.requires_grad_(False)
    layer(x).backward(gy)
    want, _ = matched_conv2d(x, layer.weight, None, gy, (stride, stride), 1, (1, 1), groups,
                             RIDGE)
    _close(layer.weight.grad, want)


@pytest.mark.parametrize("input_grad", [False, True])
@pytest.mark.parametrize("frozen", ["bias", "weight"])
def test_a_frozen_parameter_on_the_float32_conv_kernels(frozen, input_grad):
    """float32 3×3 stride-1 with 16 channels a side: the Gram kernel's pass gives G as well,
    or the input gradient's conv backward does (with ``input_grad``): neither may keep the
    frozen parameter's row."""
    torch.manual_seed(1)
    layer = cx.CConv2d(16, 16, 3, padding=1, ridge=RIDGE)
    getattr(layer, frozen).requires_grad_(False)
    x = (torch.randn(4, 16, 8, 8) + 1.0).requires_grad_(input_grad)
    gy = _backward(layer, x)
    gw, gb = reference(x, layer.weight.double(), gy, 1, 1, frozen != "weight", frozen != "bias")
    trained, want = (layer.bias, gb) if frozen == "weight" else (layer.weight, gw)
    torch.testing.assert_close(trained.grad.double(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("frozen", ["bias", "weight"])
def test_one_step_keeps_the_consequence_with_a_frozen_parameter(frozen):
    """Paper 1's consequence for what trains: with N ≤ D, a frozen bias and a tiny ridge one
    SGD step (lr 1) moves every output onto its target; a bias alone removes the mean
    residual of every output."""
    layer = cx.CLinear(6, 3, ridge=1e-9, dtype=F64)
    getattr(layer, frozen).requires_grad_(False)
    x, t = torch.randn(4, 6, dtype=F64) + 2.0, torch.randn(4, 3, dtype=F64)
    (0.5 * (layer(x) - t).square().sum(-1).mean()).backward()
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p -= p.grad
        residual = layer(x) - t
    if frozen == "bias":
        assert residual.abs().max() < 1e-6
    else:
        assert residual.mean(0).abs().max() < 1e-6 and residual.abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_gradients_asked_for_part_of_the_parameters_are_the_full_backwards(kind):
    """Which rows X holds is decided by requires_grad, not by what a backward asks for:
    autograd.grad(out, [weight]) and backward(inputs=[bias]) give what backward() does."""
    make, shape, stride, padding = KINDS[kind]
    layer = make()
    x = torch.randn(shape, dtype=F64) + 1.0
    gy = torch.randn_like(layer(x))
    gw, gb = reference(x, layer.weight, gy, stride, padding, True, True)
    (only_w,) = torch.autograd.grad(layer(x), [layer.weight], gy)
    torch.testing.assert_close(only_w, gw, rtol=1e-9, atol=1e-12)
    layer(x).backward(gy, inputs=[layer.bias])
    assert layer.weight.grad is None
    torch.testing.assert_close(layer.bias.grad, gb, rtol=1e-9, atol=1e-12)


def test_a_conv_called_at_two_resolutions_with_a_weight_shared_by_another_layer():
    """Each call is matched on its own Gram and autograd sums them, also through a weight
    that two modules share (``b.weight = a.weight``)."""
    a = cx.CConv2d(2, 3, 3, padding=1, ridge=RIDGE, dtype=F64)
    b = cx.CConv2d(2, 3, 3, padding=1, ridge=RIDGE, dtype=F64)
    b.weight = a.weight
    xs = [torch.randn(2, 2, 4, 4, dtype=F64), torch.randn(2, 2, 9, 7, dtype=F64),
          torch.randn(3, 2, 5, 5, dtype=F64)]
    ys = [a(xs[0]), a(xs[1]), b(xs[2])]
    gys = [torch.randn_like(y) for y in ys]
    torch.autograd.backward(ys, gys)
    refs = [reference(x, a.weight, gy, 1, 1, True, True) for x, gy in zip(xs, gys)]
    torch.testing.assert_close(a.weight.grad, sum(r[0] for r in refs), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(a.bias.grad, refs[0][1] + refs[1][1], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(b.bias.grad, refs[2][1], rtol=1e-9, atol=1e-12)


def _exact_amortizer(layer):
    return cx.amortize(layer, every=1, decay=0.0, damping=0.0, safeguard_columns=None,
                       exact_when_cheaper=False)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_an_amortised_layer_with_a_frozen_bias_solves_without_its_row(kind):
    make, shape, stride, padding = KINDS[kind]
    layer = make()
    layer.bias.requires_grad_(False)
    _exact_amortizer(layer)
    x = torch.randn(shape, dtype=F64) + 1.0
    gy = _backward(layer, x)
    gw, _ = reference(x, layer.weight, gy, stride, padding, True, False)
    torch.testing.assert_close(layer.weight.grad, gw, rtol=1e-9, atol=1e-12)
    layer.bias.requires_grad_(True)        # the running Gram has no bias row
    with torch.no_grad():
        layer(x)                           # no backward: nothing to check
    with pytest.raises(ValueError, match="cx.amortize again"):
        layer(x)


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_an_input_gradient_through_a_frozen_amortised_layer(kind):
    """Frozen after ``amortize`` (an adversarial attack on a trained model): the amortizer
    is not used, so its bias row is no error."""
    make, shape, stride, padding = KINDS[kind]
    layer = make()
    _exact_amortizer(layer)
    layer.requires_grad_(False)
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    gy = _backward(layer, x)
    plain = x.detach().requires_grad_(True)
    out = F.linear(plain, layer.weight, layer.bias) if kind == "linear" else \
        F.conv2d(plain, layer.weight, layer.bias, stride=stride, padding=padding)
    torch.testing.assert_close(x.grad, torch.autograd.grad(out, plain, gy)[0])


def test_an_amortised_layer_with_a_frozen_weight_matches_its_bias_alone_exactly():
    make, shape, stride, padding = KINDS["conv2d"]
    layer = make()
    cx.amortize(layer, every=3)
    layer.weight.requires_grad_(False)
    x = torch.randn(shape, dtype=F64) + 1.0
    gy = _backward(layer, x)
    _, gb = reference(x, layer.weight, gy, stride, padding, False, True)
    torch.testing.assert_close(layer.bias.grad, gb, rtol=1e-9, atol=1e-12)
    assert int(layer.amortizer.steps) == 0   # the running state is not used


def test_an_amortised_layer_with_a_frozen_bias_between_refactorisations():
    """Every 2 steps a refactorisation, damping and the safeguard on: the weight's step is
    G_W M⁻¹ · s, M the damped running Gram of the weight's rows (no ones row while the bias
    is frozen), s the safeguard's."""
    torch.manual_seed(6)
    lam, damp, decay = 0.05, 0.3, 0.8
    layer = cx.CLinear(3, 2, ridge=lam, dtype=F64)
    layer.bias.requires_grad_(False)
    cx.amortize(layer, every=2, gram_every=1, decay=decay, damping=damp, gram_oversample=None,
                safeguard_columns=10 ** 6, exact_when_cheaper=False)
    running = None
    for step in range(4):
        x = torch.randn(12, 3, dtype=F64) * (1 + step) + 1
        gy = torch.randn(12, 2, dtype=F64) / 12
        layer.zero_grad()
        (layer(x) * gy).sum().backward()
        a = x.T @ x / 12
        running = a if running is None else decay * running + (1 - decay) * a
        if step % 2 == 0:
            m = running + (lam + damp * running.trace() / 3) * torch.eye(3, dtype=F64)
        g = gy.T @ x
        step_w = torch.linalg.solve(m, g.T).T
        s = min(1.0, float((g * step_w).sum()
                           / ((step_w @ a * step_w).sum() + lam * step_w.square().sum())))
        torch.testing.assert_close(layer.weight.grad, s * step_w, rtol=1e-10, atol=1e-12)


def test_attention_with_a_frozen_in_proj_weight_trains_its_bias_alone():
    """Each projection's bias on its constant-1 row alone: nn's gradient over 1 + λ."""
    torch.manual_seed(7)
    mha = cx.CMultiheadAttention(4, 2, ridge=RIDGE).double()
    mha.in_proj_weight.requires_grad_(False)
    plain = copy.deepcopy(mha)
    plain.rule = "sgd"
    x = torch.randn(3, 2, 4, dtype=F64)
    gy = torch.randn(3, 2, 4, dtype=F64)
    (mha(x, x, x)[0] * gy).sum().backward()
    (plain(x, x, x)[0] * gy).sum().backward()
    torch.testing.assert_close(mha.in_proj_bias.grad, plain.in_proj_bias.grad / (1 + RIDGE))


@pytest.fixture
def twice_warning(monkeypatch):
    monkeypatch.setattr(amortize_module, "_called_twice_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield lambda: [w for w in caught if "called more than once" in str(w.message)]


def test_an_amortised_layer_called_twice_in_one_forward_warns(twice_warning):
    """Its calls share one running Gram (the exact rule matches each call on its own)."""
    layer = _exact_amortizer(cx.CConv2d(2, 3, 3, padding=1, ridge=RIDGE, dtype=F64))
    x = torch.randn(4, 2, 5, 5, dtype=F64)
    for _ in range(2):          # micro-batches, and a second backward of a retained graph
        y = layer(x)
        y.sum().backward(retain_graph=True)
        y.sum().backward()
    assert not twice_warning()
    (layer(x).sum() + layer(torch.randn(4, 2, 9, 9, dtype=F64)).sum()).backward()
    assert len(twice_warning()) == 1


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_an_amortised_layer_called_in_two_checkpointed_segments_warns(twice_warning,
                                                                     use_reentrant):
    """A block shared across checkpointed repetitions: a reentrant checkpoint runs each
    segment's backward in a nested graph task, yet both calls step in one backward."""
    from torch.utils.checkpoint import checkpoint
    layer = _exact_amortizer(cx.CLinear(4, 4, ridge=RIDGE, dtype=F64))
    for _ in range(2):          # once per forward, over two steps: no warning
        x = torch.randn(8, 4, dtype=F64, requires_grad=True)
        checkpoint(layer, x, use_reentrant=use_reentrant).sum().backward()
    assert not twice_warning()
    x = torch.randn(8, 4, dtype=F64, requires_grad=True)
    h = checkpoint(layer, checkpoint(layer, x, use_reentrant=use_reentrant),
                   use_reentrant=use_reentrant)
    h.sum().backward()
    assert len(twice_warning()) == 1


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_a_layer_amortised_while_frozen_whole_trains_once_unfrozen(kind):
    """A frozen warm-up: a layer frozen whole when ``amortize`` runs uses no amortizer until
    it is unfrozen, then with its bias (``requires_grad_(True)`` unfreezes both)."""
    make, shape, stride, padding = KINDS[kind]
    layer = make().requires_grad_(False)
    _exact_amortizer(layer)
    layer.requires_grad_(True)
    x = torch.randn(shape, dtype=F64) + 1.0
    gy = _backward(layer, x)
    gw, gb = reference(x, layer.weight, gy, stride, padding, True, True)
    torch.testing.assert_close(layer.weight.grad, gw, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, gb, rtol=1e-9, atol=1e-12)
