"""CConvTranspose1d / 2d: matched on the pre-overlap blocks (docs/design.md §2), every rule
against the float64 references of conv_nd_reference.py on awkward shapes (stride, padding,
output_padding, dilation, groups, bias)."""
import math
import warnings

import pytest
import torch
import torch.nn as nn

import consequential_ext as cx
import conv_nd_reference as ref

RIDGE = 0.02
NN = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}
C_LAYER = {1: cx.CConvTranspose1d, 2: cx.CConvTranspose2d}

CASES = {
    2: [  # B, Cin, Cout, (H, W), kernel, stride, padding, output_padding, groups, dilation, bias
        (2, 3, 4, (4, 5), 3, 1, 0, 0, 1, 1, True),
        (2, 4, 6, (3, 4), (3, 2), (2, 1), (1, 0), (1, 0), 2, 1, True),
        (3, 6, 3, (4, 3), 3, 2, 1, 1, 3, 2, False),
        (2, 2, 4, (3, 3), 2, 1, 0, 1, 1, 2, True),      # output_padding ≥ stride (< dilation)
        (1, 8, 2, (2, 2), 3, 3, 2, 2, 2, 1, True),
        (1, 16, 2, (2, 2), 1, 1, 0, 0, 1, 1, True),     # P < D: column side
    ],
    1: [  # B, Cin, Cout, (L,), kernel, stride, padding, output_padding, groups, dilation, bias
        (2, 3, 4, (7,), 3, 2, 1, 1, 1, 1, True),
        (3, 4, 6, (5,), 4, 1, 2, 0, 2, 2, True),
        (2, 2, 2, (6,), 2, 1, 0, 1, 1, 2, False),
    ],
}
ALL = [(dims, i) for dims in CASES for i in range(len(CASES[dims]))]


def _pair_of_layers(dims, case, rule):
    b, cin, cout, size, k, s, p, op, g, d, bias = case
    layer = C_LAYER[dims](cin, cout, k, s, p, op, g, bias, d, dtype=torch.float64, rule=rule,
                          ridge=RIDGE)
    plain = NN[dims](cin, cout, k, s, p, op, g, bias, d, dtype=torch.float64)
    plain.load_state_dict(layer.state_dict())
    return layer, plain, torch.randn((b, cin) + size, dtype=torch.float64)


@pytest.mark.parametrize("dims,index", ALL)
def test_consequential_matches_pre_overlap_reference(dims, index):
    case = CASES[dims][index]
    layer, plain, x = _pair_of_layers(dims, case, "consequential")
    grad_x, plain_grad_x, gy, (out, plain_out) = ref.run_pair(layer, plain, x)
    assert torch.equal(out, plain_out)
    _, _, _, _, _, s, p, op, g, d, bias = case
    gw, gb = ref.matched_conv_transpose(x, layer.weight, layer.bias, gy, s, p, op, g, d, RIDGE)
    ref.close(layer.weight.grad, gw)
    if bias:
        ref.close(layer.bias.grad, gb)
    torch.testing.assert_close(grad_x, plain_grad_x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dims,index", [(2, 1), (2, 3), (1, 1)])
def test_backmatch_signal_is_eq22(dims, index):
    layer, plain, x = _pair_of_layers(dims, CASES[dims][index], "backmatch")
    grad_x, _, gy, _ = ref.run_pair(layer, plain, x)
    ref.close(grad_x, ref.matched_input_by_jacobian(plain, x.shape, gy))


def _taps_per_weight(case, out_size):
    """How often each weight entry is used per sample on a dense signal (s of eq. 33)."""
    _, _, _, size, k, s, p, _, _, d, _ = case
    dims = len(size)
    k, s, p, d = (ref._tuple(v, dims) for v in (k, s, p, d))
    uses = [ref.valid_taps(*args) for args in zip(size, out_size, k, s, p, d)]
    return math.prod(uses) / math.prod(k)


@pytest.mark.parametrize("dims,index", ALL)
def test_layerwise_shares_weights_over_input_pixels_and_bias_over_outputs(dims, index):
    case = CASES[dims][index]
    layer, plain, x = _pair_of_layers(dims, case, "backmatch-layerwise")
    grad_x, plain_grad_x, gy, (out, _) = ref.run_pair(layer, plain, x)
    s_weight = _taps_per_weight(case, out.shape[2:])
    ref.close(layer.weight.grad, plain.weight.grad / s_weight, 1e-12)
    if case[-1]:
        ref.close(layer.bias.grad, plain.bias.grad / math.prod(out.shape[2:]), 1e-12)
    col = plain.weight.detach().square().sum() / case[1]            # ‖W_col‖²_{2,µ}, per C_in
    ref.close(grad_x, plain_grad_x / (col * s_weight / math.prod(x.shape[2:])), 1e-12)


@pytest.mark.parametrize("dims,index", [(2, 1), (1, 0)])
def test_sgd_rule_is_bit_identical_to_nn(dims, index):
    layer, plain, x = _pair_of_layers(dims, CASES[dims][index], "sgd")
    grad_x, plain_grad_x, _, _ = ref.run_pair(layer, plain, x)
    assert torch.equal(grad_x, plain_grad_x)
    for a, b in zip(layer.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def test_output_size_and_unbatched_input():
    torch.manual_seed(6)
    layer = cx.CConvTranspose2d(3, 2, 3, stride=2, padding=1, ridge=RIDGE, dtype=torch.float64)
    plain = nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, dtype=torch.float64)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 4, 5, dtype=torch.float64)                   # unbatched (C, H, W)
    y = layer(x, output_size=[8, 10])
    assert y.shape == (2, 8, 10) and torch.equal(y, plain(x, output_size=[8, 10]))
    gy = torch.randn_like(y)
    y.backward(gy)
    gw, gb = ref.matched_conv_transpose(x, layer.weight, layer.bias, gy, 2, 1, (1, 1), 1, 1,
                                        RIDGE)
    ref.close(layer.weight.grad, gw)
    ref.close(layer.bias.grad, gb)


def test_float32_functional_forms_match_reference():
    torch.manual_seed(7)
    x, w, b = torch.randn(4, 4, 3, 5), torch.randn(4, 3, 2, 3), torch.randn(6)
    for fn, args in ((cx.functional.cconv_transpose2d, (x, w)),
                     (cx.functional.cconv_transpose1d, (x[:, :, 0], w[:, :, 0]))):
        xi, wi = args
        wi = wi.clone().requires_grad_()
        bi = b.clone().requires_grad_()
        y = fn(xi, wi, bi, 2, 1, 1, 2, 1, ridge=0.1)
        gy = torch.randn_like(y)
        y.backward(gy)
        gw, gb = ref.matched_conv_transpose(xi, wi, bi, gy, 2, 1, 1, 2, 1, 0.1)
        assert wi.grad.dtype == torch.float32
        ref.close(wi.grad, gw, 2e-4)
        ref.close(bi.grad, gb, 2e-4)


def test_amortizer_without_averaging_equals_the_exact_solve():
    torch.manual_seed(8)
    model = cx.amortize(cx.consequentialize(nn.Sequential(
        nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)).double(), ridge=RIDGE),
        every=1, decay=0.0, damping=0.0, gram_oversample=None, safeguard_columns=None,
        exact_when_cheaper=False)  # no averaging, damping or safeguard: the exact solve
    assert model[0].amortizer.gram.shape == (2, 2, 2)
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    for _ in range(2):
        model.zero_grad()
        y = model(x)
        gy = torch.randn_like(y)
        y.backward(gy)
    gw, gb = ref.matched_conv_transpose(x, model[0].weight, model[0].bias, gy, 2, 0, 0, 2, 1,
                                        RIDGE)
    ref.close(model[0].weight.grad, gw)
    ref.close(model[0].bias.grad, gb)


def test_consequentialize_converts_transposed_convs_silently():
    torch.manual_seed(9)
    model = nn.Sequential(nn.ConvTranspose1d(3, 4, 3, stride=2), nn.ReLU(),
                          nn.Unflatten(1, (2, 2)), nn.ConvTranspose2d(2, 1, 2))
    x = torch.randn(2, 3, 5)
    reference = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cx.consequentialize(model)
    assert type(model[0]) is cx.CConvTranspose1d and type(model[3]) is cx.CConvTranspose2d
    assert torch.equal(model(x), reference)
    assert cx.coverage(model).share == 1.0
    with pytest.raises(ValueError, match="zeros"):
        cx.CConvTranspose2d(2, 2, 3, padding_mode="reflect")(torch.randn(1, 2, 4, 4))


def test_one_bias_step_removes_each_channels_mean_residual():
    """The bias, matched on its own constant input (A = H_out·W_out): one SGD step with lr 1
    and a tiny ridge on the bias alone leaves every channel's mean residual at 0."""
    torch.manual_seed(10)
    layer = cx.CConvTranspose2d(3, 4, 3, stride=2, padding=1, output_padding=1, ridge=1e-9,
                                dtype=torch.float64)
    layer.weight.requires_grad_(False)
    x, t = torch.randn(5, 3, 4, 3, dtype=torch.float64), torch.randn(5, 4, 8, 6,
                                                                    dtype=torch.float64)
    (0.5 * (layer(x) - t).square().sum((1, 2, 3)).mean()).backward()
    before = (layer(x) - t).mean((0, 2, 3))
    with torch.no_grad():
        layer.bias -= layer.bias.grad
    after = (layer(x) - t).mean((0, 2, 3))
    assert before.abs().min() > 1e-3 and after.abs().max() < 1e-8


@pytest.mark.parametrize("rule", ["consequential", "backmatch-layerwise"])
def test_the_row_side_never_unfolds_the_output_signal(monkeypatch, rule):
    """dZ = unfold(dy) is k_h·k_w/stride² times the signal: the row side takes G from the
    transposed conv's own weight gradient and the layer-wise s from a fold of ones."""
    case = CASES[2][0]
    layer, plain, x = _pair_of_layers(2, case, rule)
    out = layer(x.requires_grad_())
    gy = torch.randn_like(out)

    def no_unfold(*args, **kwargs):
        raise AssertionError("unfold of the output signal")
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "unfold", no_unfold)
        out.backward(gy)
    if rule == "consequential":
        _, _, _, _, _, s, p, op, g, d, _ = case
        gw, gb = ref.matched_conv_transpose(x, layer.weight, layer.bias, gy, s, p, op, g, d,
                                            RIDGE)
        ref.close(layer.weight.grad, gw)
        ref.close(layer.bias.grad, gb)


def test_block_sharing_counts_what_unfolding_would():
    """The layer-wise rule's s of dZ from the signal's non-zeros and a fold of ones equals
    the count on the unfolded dZ, over random geometries with sparse signals."""
    from consequential_ext import layerwise
    from consequential_ext.gradients import ConvTranspose2dGradients
    gen = torch.Generator().manual_seed(40)
    checked = 0
    for _ in range(80):
        pick = lambda *options: options[torch.randint(len(options), (1,), generator=gen)]  # noqa: E731
        k, s, d = pick(1, 2, 3), pick(1, 2, 3), pick(1, 2)
        p = pick(*range(0, d * (k - 1) + 1))
        op = pick(*[o for o in range(3) if o < max(s, d)])
        h, w = pick(1, 2, 3, 5), pick(2, 4)
        if min(h, w) - 1 < (2 * p - d * (k - 1) - op) / s:
            continue                                               # an empty output
        x = torch.randn(2, 2, h, w)
        weight = torch.randn(2, 3, k, k)
        gy = torch.nn.functional.conv_transpose2d(x, weight, None, s, p, op, 1, d)
        gy = gy * (torch.rand(gy.shape, generator=gen) < 0.4)      # a sparse signal
        grads = ConvTranspose2dGradients(x, weight, gy, (s, s), (p, p), (op, op), (d, d), 1,
                                         has_bias=False, needs_weight=True, needs_bias=False,
                                         ridge=0.1, amortizer=None)
        expected = layerwise.sharing_factor(grads._block_signal())
        assert torch.equal(grads._block_sharing(), expected), (k, s, p, op, d, h, w)
        checked += 1
    assert checked >= 40
