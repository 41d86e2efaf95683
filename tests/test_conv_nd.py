"""CConv1d / CConv3d: every rule against the float64 references of conv_nd_reference.py, on
awkward shapes covering the whole Conv2d surface (stride, padding int / tuple / 'same' /
'valid', dilation, groups, bias, every padding_mode)."""
import math
import warnings

import pytest
import torch
import torch.nn as nn

import consequential_ext as cx
import conv_nd_reference as ref

RIDGE = 0.02
NN = {1: nn.Conv1d, 3: nn.Conv3d}
C_LAYER = {1: cx.CConv1d, 3: cx.CConv3d}

CASES = {
    1: [  # B, Cin, Cout, L, kernel, stride, padding, dilation, groups, bias, padding_mode
        (2, 3, 4, (11,), 3, 1, 1, 1, 1, True, "zeros"),
        (3, 4, 6, (13,), 4, 2, (2,), 1, 2, True, "zeros"),
        (2, 6, 6, (12,), 3, 1, 2, 2, 3, False, "zeros"),
        (2, 2, 3, (9,), 4, 1, "same", 1, 1, True, "zeros"),          # even kernel: uneven
        (1, 2, 3, (10,), 3, 1, "same", 2, 1, True, "zeros"),
        (2, 3, 5, (10,), 3, 3, "valid", 1, 1, True, "zeros"),
        (2, 3, 4, (9,), 3, 1, 1, 1, 1, True, "reflect"),
        (2, 2, 4, (10,), 3, 2, 2, 1, 2, True, "replicate"),
        (3, 3, 3, (8,), 3, 1, 1, 1, 1, False, "circular"),
        (1, 8, 4, (5,), 3, 1, 0, 1, 1, True, "zeros"),                # P < D: column side
    ],
    3: [  # B, Cin, Cout, (D, H, W), kernel, stride, padding, dilation, groups, bias, mode
        (2, 3, 4, (5, 6, 5), 3, 1, 1, 1, 1, True, "zeros"),
        (2, 4, 6, (6, 5, 7), (2, 3, 2), (2, 1, 2), (1, 0, 1), 1, 2, True, "zeros"),
        (2, 4, 4, (5, 5, 6), (3, 2, 2), 1, "same", (2, 1, 1), 2, True, "zeros"),
        (1, 2, 3, (4, 5, 5), 2, 1, "valid", 1, 1, False, "zeros"),
        (2, 2, 3, (4, 5, 4), 3, 1, 1, 1, 1, True, "reflect"),
        (2, 2, 2, (4, 4, 5), (2, 3, 3), (1, 2, 1), (1, 1, 2), 1, 2, True, "replicate"),
        (2, 3, 3, (4, 4, 4), 3, 1, 1, 1, 1, True, "circular"),
        (1, 6, 2, (3, 3, 3), 2, 1, 0, 1, 1, True, "zeros"),          # P < D: column side
    ],
}
ALL = [(dims, i) for dims in CASES for i in range(len(CASES[dims]))]


def _pair_of_layers(dims, case, rule):
    b, cin, cout, size, k, s, p, d, g, bias, mode = case
    layer = C_LAYER[dims](cin, cout, k, s, p, d, g, bias, mode, dtype=torch.float64,
                          rule=rule, ridge=RIDGE)
    plain = NN[dims](cin, cout, k, s, p, d, g, bias, mode, dtype=torch.float64)
    plain.load_state_dict(layer.state_dict())
    return layer, plain, torch.randn((b, cin) + size, dtype=torch.float64)


@pytest.mark.parametrize("dims,index", ALL)
def test_consequential_matches_reference(dims, index):
    case = CASES[dims][index]
    layer, plain, x = _pair_of_layers(dims, case, "consequential")
    grad_x, plain_grad_x, gy, (out, plain_out) = ref.run_pair(layer, plain, x)
    assert torch.equal(out, plain_out)                       # forward: nn's, bit for bit
    _, _, _, _, _, s, p, d, g, bias, mode = case
    gw, gb = ref.matched_conv(x, layer.weight, layer.bias, gy, s, p, d, g, RIDGE, mode)
    ref.close(layer.weight.grad, gw)
    if bias:
        ref.close(layer.bias.grad, gb)
    torch.testing.assert_close(grad_x, plain_grad_x, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dims,index", [(1, 0), (1, 1), (1, 3), (3, 1), (3, 2)])
def test_backmatch_signal_is_eq22_and_weights_are_matched(dims, index):
    case = CASES[dims][index]
    layer, plain, x = _pair_of_layers(dims, case, "backmatch")
    grad_x, _, gy, _ = ref.run_pair(layer, plain, x)
    _, _, _, _, _, s, p, d, g, bias, mode = case
    expected = ref.matched_input_by_jacobian(plain, x.shape, gy)
    ref.close(grad_x, expected, 1e-9)
    gw, gb = ref.matched_conv(x, layer.weight, layer.bias, gy, s, p, d, g, RIDGE, mode)
    ref.close(layer.weight.grad, gw)


@pytest.mark.parametrize("dims,index", ALL)
def test_layerwise_divides_by_sharing_and_column_norm(dims, index):
    case = CASES[dims][index]
    layer, plain, x = _pair_of_layers(dims, case, "backmatch-layerwise")
    grad_x, plain_grad_x, gy, (out, _) = ref.run_pair(layer, plain, x)
    gw, gb, gx = ref.layerwise_conv(plain.weight.grad, plain.bias.grad if case[9] else None,
                                    plain_grad_x, plain.weight, case[8],
                                    math.prod(out.shape[2:]), math.prod(x.shape[2:]))
    ref.close(layer.weight.grad, gw, 1e-12)
    if case[9]:
        ref.close(layer.bias.grad, gb, 1e-12)
    if case[10] == "zeros":   # else F.pad's backward folds the padded border back in
        ref.close(grad_x, gx, 1e-12)


@pytest.mark.parametrize("dims,index", [(1, 1), (1, 8), (3, 1), (3, 6)])
def test_sgd_rule_is_bit_identical_to_nn(dims, index):
    layer, plain, x = _pair_of_layers(dims, CASES[dims][index], "sgd")
    grad_x, plain_grad_x, _, _ = ref.run_pair(layer, plain, x)
    assert torch.equal(grad_x, plain_grad_x)
    for a, b in zip(layer.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("dims", [1, 3])
def test_unbatched_float32_input(dims):
    layer = C_LAYER[dims](3, 4, 3, padding=1, ridge=0.1)
    x = torch.randn((3,) + (6,) * dims)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    gw, gb = ref.matched_conv(x, layer.weight, layer.bias, gy, 1, 1, 1, 1, 0.1)
    assert layer.weight.grad.dtype == torch.float32
    ref.close(layer.weight.grad, gw, 2e-4)
    ref.close(layer.bias.grad, gb, 2e-4)


@pytest.mark.parametrize("dims", [1, 3])
def test_functional_form_matches_module(dims):
    conv = C_LAYER[dims](4, 4, 3, stride=2, padding="valid", groups=2, dtype=torch.float64)
    fn = {1: cx.functional.cconv1d, 3: cx.functional.cconv3d}[dims]
    x = torch.randn((2, 4) + (7,) * dims, dtype=torch.float64)
    w = conv.weight.detach().clone().requires_grad_()
    bvec = conv.bias.detach().clone().requires_grad_()
    fn(x, w, bvec, 2, "valid", 1, 2).square().sum().backward()
    conv(x).square().sum().backward()
    torch.testing.assert_close(w.grad, conv.weight.grad)
    torch.testing.assert_close(bvec.grad, conv.bias.grad)


@pytest.mark.parametrize("dims", [1, 3])
def test_amortizer_without_averaging_equals_the_exact_solve(dims):
    """decay 0, refactorised every step: the running Gram is this step's, so the update is the
    exact one (Conv3d: the folded Gram A/D_out with ridge λ/D_out, rescaled, is exact)."""
    torch.manual_seed(4)
    model = nn.Sequential(NN[dims](3, 4, 3, stride=(2,) + (1,) * (dims - 1), padding=1))
    model.double()
    cx.consequentialize(model, ridge=RIDGE)
    # no averaging, damping or step safeguard: the amortised path's solve is the exact one
    cx.amortize(model, every=1, decay=0.0, damping=0.0, gram_oversample=None,
                safeguard_columns=None, exact_when_cheaper=False)
    x = torch.randn((5, 3) + (6,) * dims, dtype=torch.float64)
    for _ in range(2):
        model.zero_grad()
        y = model(x)
        gy = torch.randn_like(y)
        y.backward(gy)
    gw, gb = ref.matched_conv(x, model[0].weight, model[0].bias, gy,
                              model[0].stride, 1, 1, 1, RIDGE)
    ref.close(model[0].weight.grad, gw, 1e-9)
    ref.close(model[0].bias.grad, gb, 1e-9)


def test_amortised_conv3d_averages_its_own_gram_over_inputs_of_different_depths():
    """docs/amortize.md: the running Gram is the EMA of the layer's A = X Xᵀ / B and the step
    G (A_ema + λ'I)⁻¹. The fold's Gram is A/D_out: averaged as such over clips of 6 and 3
    frames it mixed scales, and an inverse kept from one depth made the other's steps 2×
    too long or short."""
    torch.manual_seed(6)
    layer = cx.CConv3d(2, 3, 3, padding=1, dtype=torch.float64, ridge=RIDGE)
    decay, damping = 0.5, 0.1
    cx.amortize(layer, every=2, gram_every=1, decay=decay, damping=damping,
                gram_oversample=None, safeguard_columns=None, exact_when_cheaper=False)
    average = inverse = None
    for step, depth in enumerate([6, 3, 6, 3]):
        x = torch.randn(2, 2, depth, 4, 4, dtype=torch.float64)
        layer.zero_grad()
        y = layer(x)
        gy = torch.randn_like(y)
        y.backward(gy)
        cols = ref.patches(ref.pad_like_nn(x, 1, (3, 3, 3), (1, 1, 1)), (3, 3, 3), (1, 1, 1),
                           (1, 1, 1))                               # (B, C, D, H, W, 3, 3, 3)
        rows = cols.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, 2 * 27)
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
        a = rows.T @ rows / x.shape[0]
        average = a if average is None else decay * average + (1 - decay) * a
        if step % 2 == 0:
            lam = RIDGE + damping * average.diagonal().mean()
            inverse = torch.linalg.inv(average + lam * torch.eye(a.shape[0], dtype=a.dtype))
        gw, gb = ref.ordinary_grads(lambda v, w, b: nn.functional.conv3d(v, w, b, padding=1),
                                    x, layer.weight, layer.bias, gy)
        step_ = torch.cat([gw.reshape(3, -1), gb[:, None]], 1) @ inverse
        ref.close(layer.weight.grad, step_[:, :-1].reshape(gw.shape), 1e-9)
        ref.close(layer.bias.grad, step_[:, -1], 1e-9)


def test_consequentialize_converts_conv1d_and_conv3d_silently():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv1d(2, 4, 3, padding="same", padding_mode="reflect"),
                          nn.ReLU(), nn.Unflatten(1, (1, 2, 2)),
                          nn.Conv3d(1, 2, (1, 2, 3), padding=(0, 1, 1)))
    x = torch.randn(3, 2, 5)
    reference = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # nothing is left plain
        cx.consequentialize(model)
    assert type(model[0]) is cx.CConv1d and type(model[3]) is cx.CConv3d
    assert isinstance(model[0], nn.Conv1d) and isinstance(model[3], nn.Conv3d)
    assert torch.equal(model(x), reference)
    assert cx.coverage(model).share == 1.0


@pytest.mark.parametrize("fn", [cx.functional.cconv1d, cx.functional.cconv3d])
def test_bad_arguments_are_named(fn):
    dims = 1 if fn is cx.functional.cconv1d else 3
    x, w = torch.randn((1, 2) + (5,) * dims), torch.randn((3, 2) + (3,) * dims)
    with pytest.raises(ValueError, match="padding"):
        fn(x, w, padding="full")
    with pytest.raises(ValueError, match="ridge"):
        fn(x, w, ridge=0.0)
    with pytest.raises(ValueError, match="rule"):
        fn(x, w, rule="adam")
