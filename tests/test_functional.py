"""Matched weight/bias gradients of every supported configuration vs the float64 reference."""
import copy

import pytest
import torch
import torch.nn as nn

import consequential_ext as cx
import matched_reference as ref


def _close(actual, expected, rtol):
    """Norm-wise relative error: robust to individual near-zero entries, still strict."""
    err = (actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)
    assert err < rtol, f"relative error {err:.3e} >= {rtol:.1e}"


LINEAR_CASES = [
    # leading dims of the input, in, out, bias
    ((7,), 5, 3, True),          # N > D: row side
    ((3,), 11, 4, True),         # N < D: column side
    ((2, 3, 5), 6, 2, False),    # several leading dims
    ((), 9, 4, True),            # a single 1-D input
    ((4, 1), 13, 1, True),
]


@pytest.mark.parametrize("lead,fin,fout,bias", LINEAR_CASES)
def test_clinear_grads_match_reference(lead, fin, fout, bias):
    ridge = 0.05
    layer = cx.CLinear(fin, fout, bias=bias, dtype=torch.float64, ridge=ridge)
    x = torch.randn(*lead, fin, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    gw, gb = ref.matched_linear(x, layer.weight, layer.bias, gy, ridge)
    _close(layer.weight.grad, gw, 1e-9)
    if bias:
        _close(layer.bias.grad, gb, 1e-9)
    plain = nn.Linear(fin, fout, bias=bias, dtype=torch.float64)
    plain.load_state_dict(layer.state_dict())
    x2 = x.detach().clone().requires_grad_()
    plain(x2).backward(gy)
    torch.testing.assert_close(x.grad, x2.grad)  # input gradient is the ordinary one


def test_clinear_one_dimensional_weight_is_f_linear_dot_product():
    """F.linear takes a weight (in,) without a bias: one output unit, its dim dropped. The
    matched gradient is that of the (1, in) weight, against the float64 reference."""
    torch.manual_seed(11)
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    y = cx.functional.clinear(x, w, ridge=0.05)
    assert y.shape == (2, 7) and torch.equal(y, torch.nn.functional.linear(x, w))
    gy = torch.randn_like(y)
    y.backward(gy)
    gw, _ = ref.matched_linear(x, w[None], None, gy[..., None], 0.05)
    _close(w.grad, gw[0], 1e-9)
    with pytest.raises(ValueError, match="1-D weight takes no bias"):
        cx.functional.clinear(x, w, torch.zeros(()))
    with pytest.raises(ValueError, match="weight must be"):
        cx.functional.clinear(x, torch.randn(1, 5, 1))


def test_clinear_noncontiguous_float32_input():
    ridge = 0.1
    layer = cx.CLinear(6, 3, ridge=ridge)
    x = torch.randn(5, 4, 6).transpose(0, 1)                        # (4, 5, 6) non-contiguous
    assert not x.is_contiguous()
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    gw, gb = ref.matched_linear(x, layer.weight, layer.bias, gy, ridge)
    _close(layer.weight.grad, gw, 2e-4)
    _close(layer.bias.grad, gb, 2e-4)
    assert layer.weight.grad.dtype == torch.float32


CONV_CASES = [
    # B, Cin, Cout, H, W, kernel, stride, padding, dilation, groups, bias, padding_mode
    (2, 3, 4, 7, 6, 3, 1, 1, 1, 1, True, "zeros"),
    (3, 4, 6, 9, 8, (3, 2), (2, 1), (1, 0), 1, 2, True, "zeros"),
    (2, 6, 6, 8, 9, 3, 1, 2, 2, 3, False, "zeros"),
    (1, 2, 3, 5, 7, (2, 3), 1, "same", (2, 1), 1, True, "zeros"),   # uneven 'same'
    (2, 4, 2, 9, 7, 4, 1, "same", 1, 2, True, "zeros"),             # even kernel 'same'
    (2, 3, 5, 6, 6, 3, 2, "valid", 1, 1, True, "zeros"),
    (2, 3, 4, 7, 6, 3, 1, 1, 1, 1, True, "reflect"),
    (2, 2, 4, 6, 7, 3, 2, (2, 1), 1, 2, True, "replicate"),
    (3, 3, 3, 5, 5, 3, 1, 1, 1, 1, False, "circular"),
    (1, 8, 4, 3, 3, 3, 1, 0, 1, 1, True, "zeros"),                  # P < D: column side
]


@pytest.mark.parametrize("case", CONV_CASES, ids=[str(i) for i in range(len(CONV_CASES))])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_cconv2d_grads_match_reference(case, layout):
    b, cin, cout, h, w, k, s, p, d, g, bias, mode = case
    ridge = 0.02
    layer = cx.CConv2d(cin, cout, k, s, p, d, g, bias, mode, dtype=torch.float64, ridge=ridge)
    x = torch.randn(b, cin, h, w, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(b, cin, 2 * h, w + 3, dtype=torch.float64)[:, :, ::2, 1:w + 1]
    x.requires_grad_()
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    gw, gb = ref.matched_conv2d(x, layer.weight, layer.bias, gy, layer.stride, p, layer.dilation,
                                g, ridge, mode)
    _close(layer.weight.grad, gw, 1e-9)
    if bias:
        _close(layer.bias.grad, gb, 1e-9)
    plain = nn.Conv2d(cin, cout, k, s, p, d, g, bias, mode, dtype=torch.float64)
    plain.load_state_dict(layer.state_dict())
    x2 = x.detach().clone().requires_grad_()
    plain(x2).backward(gy)
    torch.testing.assert_close(x.grad, x2.grad)


def test_cconv2d_unbatched_and_float32():
    ridge = 0.1
    layer = cx.CConv2d(3, 5, 3, padding=1, ridge=ridge)
    x = torch.randn(3, 6, 7)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    gw, gb = ref.matched_conv2d(x, layer.weight, layer.bias, gy, (1, 1), 1, (1, 1), 1, ridge)
    _close(layer.weight.grad, gw, 2e-4)
    _close(layer.bias.grad, gb, 2e-4)


def test_functional_forms_match_modules():
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    conv = cx.CConv2d(4, 4, 3, padding=1, groups=2, dtype=torch.float64)
    w = conv.weight.detach().clone().requires_grad_()
    bvec = conv.bias.detach().clone().requires_grad_()
    cx.functional.cconv2d(x, w, bvec, 1, 1, 1, 2).sum().backward()
    conv(x).sum().backward()
    torch.testing.assert_close(w.grad, conv.weight.grad)
    torch.testing.assert_close(bvec.grad, conv.bias.grad)


def test_layer_called_several_times_sums_matched_grads():
    ridge = 0.05
    layer = cx.CLinear(4, 3, dtype=torch.float64, ridge=ridge)
    x1, x2 = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    y1, y2 = layer(x1), layer(x2)
    g1, g2 = torch.randn_like(y1), torch.randn_like(y2)
    torch.autograd.backward([y1, y2], [g1, g2])
    w1, b1 = ref.matched_linear(x1, layer.weight, layer.bias, g1, ridge)
    w2, b2 = ref.matched_linear(x2, layer.weight, layer.bias, g2, ridge)
    _close(layer.weight.grad, w1 + w2, 1e-9)
    _close(layer.bias.grad, b1 + b2, 1e-9)


def _differentiable_matched(fn, cols_of, x, weight, bias, grad_out, ridge):
    """[G | g_b] (A + λI)⁻¹ in float64, differentiable in x and grad_out: G by autograd of
    ``fn`` with create_graph, X = ``cols_of(x)`` (D × N) with a ones row, N the batch."""
    w, b = weight.detach().double().requires_grad_(), bias.detach().double().requires_grad_()
    gw, gb = torch.autograd.grad(fn(x, w, b), [w, b], grad_out, create_graph=True)
    cols = cols_of(x)
    cols = torch.cat([cols, torch.ones(1, cols.shape[1], dtype=cols.dtype)], 0)
    g = torch.cat([gw.reshape(gw.shape[0], -1), gb[:, None]], 1)
    m = ref.solve_right(g, cols @ cols.T / x.shape[0], ridge)
    return m[:, :-1].reshape(gw.shape), m[:, -1]


SECOND_ORDER_CASES = {
    "linear": (lambda: cx.CLinear(5, 3, dtype=torch.float64), (7, 5),
               torch.nn.functional.linear, lambda x: x.T),
    "conv2d": (lambda: cx.CConv2d(3, 4, 3, padding=1, dtype=torch.float64), (2, 3, 5, 6),
               lambda x, w, b: torch.nn.functional.conv2d(x, w, b, padding=1),
               lambda x: torch.nn.functional.unfold(x, 3, padding=1).transpose(0, 1)
               .reshape(27, -1)),
}


@pytest.mark.parametrize("case", SECOND_ORDER_CASES)
def test_create_graph_matches_the_second_order_signal_too(case):
    """docs/design.md §2: under create_graph, d⟨W.grad, V⟩/dW is the matched gradient of the
    second-order signal at the layer's output (not the plain Hessian-vector product), and
    d/dx is the exact derivative of the matched gradient (through X and through y)."""
    make, shape, fn, cols_of = SECOND_ORDER_CASES[case]
    torch.manual_seed(0)
    ridge = 0.1
    layer = make()
    layer.ridge = ridge
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    r = torch.randn_like(y)
    loss = (y * r).sum() + 0.1 * y.square().sum()          # dL/dy = r + 0.2 y
    gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias], create_graph=True)
    v, vb = torch.randn_like(gw), torch.randn_like(gb)
    dw, db, dx = torch.autograd.grad((gw * v).sum() + (gb * vb).sum(),
                                     [layer.weight, layer.bias, x])
    # The reference: φ(x, gy) = ⟨matched(x, gy), V⟩; the signal reaching y is 0.2·∂φ/∂gy.
    xr = x.detach().requires_grad_()
    gy = (r + 0.2 * y).detach().requires_grad_()
    mw, mb = _differentiable_matched(fn, cols_of, xr, layer.weight, layer.bias, gy, ridge)
    phi_gy, phi_x = torch.autograd.grad((mw * v).sum() + (mb * vb).sum(), [gy, xr])
    signal = 0.2 * phi_gy
    ew, eb = _differentiable_matched(fn, cols_of, xr.detach(), layer.weight, layer.bias,
                                     signal, ridge)
    _close(dw, ew.detach(), 1e-9)
    _close(db, eb.detach(), 1e-9)
    xin = x.detach().requires_grad_()
    through_y, = torch.autograd.grad(fn(xin, layer.weight.detach(), layer.bias.detach()), xin,
                                     signal)
    _close(dx, phi_x + through_y, 1e-9)
    # and it is not the plain second derivative
    plain = make()
    plain.load_state_dict(layer.state_dict())
    plain.rule = "sgd"
    pg, = torch.autograd.grad(((plain(x) * r).sum() + 0.1 * plain(x).square().sum()),
                              [plain.weight], create_graph=True)
    hv, = torch.autograd.grad((pg * v).sum(), [plain.weight])
    assert (hv - dw).norm() > 0.1 * hv.norm()


def test_sgd_rule_is_bit_identical_to_nn():
    torch.manual_seed(0)
    c = cx.CConv2d(3, 4, 3, padding=1, rule="sgd")
    n = nn.Conv2d(3, 4, 3, padding=1)
    n.load_state_dict(c.state_dict())
    x = torch.randn(2, 3, 7, 7)
    c(x).square().sum().backward()
    n(x).square().sum().backward()
    assert torch.equal(c.weight.grad, n.weight.grad) and torch.equal(c.bias.grad, n.bias.grad)


def test_input_only_gradients_skip_the_matched_weight_path(monkeypatch):
    """torch.autograd.grad(loss, x) (adversarial steps, gradient penalties) uses no weight
    gradient: no Gram or solve runs, an amortiser's schedule does not move, and the input
    gradient is nn's. backward(inputs=[weight]) still gives the matched gradient."""
    torch.manual_seed(12)
    model = cx.consequentialize(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 5),
        nn.Tanh(), nn.Linear(5, 2))).double()
    twin = copy.deepcopy(model)
    cx.amortize(model[5], every=3, exact_when_cheaper=False)
    cx.amortize(twin[5], every=3, exact_when_cheaper=False)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 25, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    plain.load_state_dict(model.state_dict(), strict=False)
    calls = []
    for name in ("ridge_solve", "im2col_gram", "conv_gram_grad"):
        original = getattr(cx.ops, name)
        monkeypatch.setattr(cx.ops, name, lambda *a, _f=original, _n=name, **k:
                            calls.append(_n) or _f(*a, **k))
    x = torch.randn(16, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    for _ in range(2):
        gx, = torch.autograd.grad(model(x).square().sum(), x)
    assert calls == [] and int(model[5].amortizer.steps) == 0
    torch.testing.assert_close(gx, torch.autograd.grad(plain(x).square().sum(), x)[0])
    batch = torch.randn(16, 3, 5, 5, dtype=torch.float64)
    for net in (model, twin):
        net(batch).square().sum().backward()
    assert calls                                       # a training step does run them
    for got, want in zip(model.parameters(), twin.parameters()):
        assert torch.equal(got.grad, want.grad)
    only = [model[3].weight]
    model.zero_grad(set_to_none=True)
    twin.zero_grad(set_to_none=True)
    model(batch).square().sum().backward(inputs=only)
    twin(batch).square().sum().backward()
    assert model[0].weight.grad is None and model[5].weight.grad is None
    assert int(model[5].amortizer.steps) == 1 and int(twin[5].amortizer.steps) == 2
    # autograd.grad asking for a weight (a leaf it captures): matched as by backward()
    got, = torch.autograd.grad(model(batch).square().sum(), model[0].weight)
    torch.testing.assert_close(got, twin[0].weight.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(model[3].weight.grad, twin[3].weight.grad, rtol=1e-12, atol=0)
