"""CConvTranspose1d / 2d / 3d: matched on the pre-overlap blocks (docs/design.md §2), every
rule against the float64 references of conv_nd_reference.py on awkward shapes (stride,
padding, output_padding, dilation, groups, bias, the column side)."""
import math
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

import consequential_ext as cx
import conv_nd_reference as ref
from consequential_ext.gradients import ConvTransposeGradients

RIDGE = 0.02
NN = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
C_LAYER = {1: cx.CConvTranspose1d, 2: cx.CConvTranspose2d, 3: cx.CConvTranspose3d}

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
    3: [  # B, Cin, Cout, (D, H, W), kernel, stride, padding, output_padding, groups, dilation, bias
        (2, 3, 4, (3, 4, 5), 3, 2, 1, 1, 1, 1, True),
        (2, 4, 6, (2, 3, 3), (2, 3, 2), (1, 2, 2), (0, 1, 1), (0, 1, 0), 2, (2, 1, 1), True),
        (1, 2, 3, (2, 2, 3), 2, 1, 0, (1, 0, 1), 1, 2, False),  # output_padding ≥ stride
        # P = 4 < D = 6 per group: the column side, on dZ cut from a strided, dilated im2col
        (1, 12, 4, (2, 1, 2), (2, 3, 2), (2, 1, 2), (1, 1, 0), (1, 0, 1), 2, (1, 2, 1), True),
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


@pytest.mark.parametrize("dims,index", [(2, 1), (2, 3), (1, 1), (3, 1), (3, 2)])
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


@pytest.mark.parametrize("dims,index", [(2, 1), (1, 0), (3, 1)])
def test_sgd_rule_is_bit_identical_to_nn(dims, index):
    layer, plain, x = _pair_of_layers(dims, CASES[dims][index], "sgd")
    grad_x, plain_grad_x, _, _ = ref.run_pair(layer, plain, x)
    assert torch.equal(grad_x, plain_grad_x)
    for a, b in zip(layer.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("dims,shape,output_size", [(2, (3, 4, 5), [8, 10]),
                                                   (3, (3, 2, 3, 4), [4, 5, 8])])
def test_output_size_and_unbatched_input(dims, shape, output_size):
    torch.manual_seed(6)
    layer = C_LAYER[dims](3, 2, 3, stride=2, padding=1, ridge=RIDGE, dtype=torch.float64)
    plain = NN[dims](3, 2, 3, stride=2, padding=1, dtype=torch.float64)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(shape, dtype=torch.float64)                     # unbatched (C, …)
    y = layer(x, output_size=output_size)
    assert y.shape == (2, *output_size) and torch.equal(y, plain(x, output_size=output_size))
    gy = torch.randn_like(y)
    y.backward(gy)
    output_padding = [o - n for o, n in zip(output_size, plain(x).shape[1:])]
    gw, gb = ref.matched_conv_transpose(x, layer.weight, layer.bias, gy, 2, 1, output_padding,
                                        1, 1, RIDGE)
    ref.close(layer.weight.grad, gw)
    ref.close(layer.bias.grad, gb)


def test_float32_functional_forms_match_reference():
    torch.manual_seed(7)
    x, w, b = torch.randn(4, 4, 3, 5), torch.randn(4, 3, 2, 3), torch.randn(6)
    x3, w3 = torch.randn(2, 4, 3, 2, 3), torch.randn(4, 3, 3, 2, 2)
    for fn, args in ((cx.functional.cconv_transpose2d, (x, w)),
                     (cx.functional.cconv_transpose1d, (x[:, :, 0], w[:, :, 0])),
                     (cx.functional.cconv_transpose3d, (x3, w3))):
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


@pytest.mark.parametrize("dims,x_shape", [(2, (5, 4, 3, 3)), (3, (3, 4, 2, 3, 2))])
def test_amortizer_without_averaging_equals_the_exact_solve(dims, x_shape):
    torch.manual_seed(8)
    model = cx.amortize(cx.consequentialize(nn.Sequential(
        NN[dims](4, 6, 3, stride=2, groups=2)).double(), ridge=RIDGE),
        every=1, decay=0.0, damping=0.0, gram_oversample=None, safeguard_columns=None,
        exact_when_cheaper=False)  # no averaging, damping or safeguard: the exact solve
    assert model[0].amortizer.gram.shape == (2, 2, 2)
    x = torch.randn(x_shape, dtype=torch.float64)
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
                          nn.Unflatten(1, (2, 2)), nn.ConvTranspose2d(2, 1, 2),
                          nn.Unflatten(1, (1, 1)), nn.ConvTranspose3d(1, 2, 2, stride=2))
    x = torch.randn(2, 3, 5)
    reference = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cx.consequentialize(model)
    assert [type(model[i]) for i in (0, 3, 5)] == [cx.CConvTranspose1d, cx.CConvTranspose2d,
                                                   cx.CConvTranspose3d]
    assert torch.equal(model(x), reference)
    assert cx.coverage(model).share == 1.0
    for dims in (2, 3):
        with pytest.raises(ValueError, match="zeros"):
            C_LAYER[dims](2, 2, 3, padding_mode="reflect")(torch.randn((1, 2) + (4,) * dims))


def test_conv_transpose3d_keeps_nn_state_dict_keys_and_pickles():
    layer = cx.CConvTranspose3d(4, 6, 2, stride=2, groups=2, rule="backmatch", ridge=0.5)
    assert layer.state_dict().keys() == nn.ConvTranspose3d(4, 6, 2, groups=2).state_dict().keys()
    loaded = pickle.loads(pickle.dumps(layer))
    assert type(loaded) is cx.CConvTranspose3d and (loaded.rule, loaded.ridge) == ("backmatch", 0.5)
    x = torch.randn(2, 4, 2, 3, 2)
    assert torch.equal(loaded(x), layer(x))


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_a_frozen_weight_or_bias_of_a_3d_transposed_conv(frozen):
    """The transposed bias is matched apart anyway (on its own constant input), so freezing
    either part leaves the other's matched gradient as it was (docs/design.md §2)."""
    case = CASES[3][1]
    layer, plain, x = _pair_of_layers(3, case, "consequential")
    getattr(layer, frozen).requires_grad_(False)
    y = layer(x)
    y.backward(gy := torch.randn_like(y))
    _, _, _, _, _, s, p, op, g, d, _ = case
    gw, gb = ref.matched_conv_transpose(x, layer.weight, layer.bias, gy, s, p, op, g, d, RIDGE)
    assert getattr(layer, frozen).grad is None
    trained, want = (layer.bias, gb) if frozen == "weight" else (layer.weight, gw)
    ref.close(trained.grad, want)


@pytest.mark.parametrize("layout", ["channels_last_3d", "strided"])
def test_3d_inputs_of_any_layout(layout):
    case = CASES[3][0]
    layer, plain, x = _pair_of_layers(3, case, "consequential")
    if layout == "channels_last_3d":
        x = x.contiguous(memory_format=torch.channels_last_3d)
    else:
        x = torch.cat([x, x], -2)[..., ::2, :].transpose(-1, -2).contiguous().transpose(-1, -2)
        assert not x.is_contiguous()
    grad_x, plain_grad_x, gy, (out, plain_out) = ref.run_pair(layer, plain, x)
    assert torch.equal(out, plain_out)
    _, _, _, _, _, s, p, op, g, d, _ = case
    gw, gb = ref.matched_conv_transpose(x, layer.weight, layer.bias, gy, s, p, op, g, d, RIDGE)
    ref.close(layer.weight.grad, gw)
    ref.close(layer.bias.grad, gb)
    torch.testing.assert_close(grad_x, plain_grad_x, rtol=1e-12, atol=1e-12)


def test_3d_autocast_bf16_gives_fp32_matched_gradients():
    torch.manual_seed(11)
    layer = cx.CConvTranspose3d(3, 4, 3, stride=2, padding=1, ridge=0.05)
    x = torch.randn(3, 3, 2, 3, 3)
    captured = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        with torch.no_grad():
            plain = nn.ConvTranspose3d.forward(layer, x)
        assert y.dtype == torch.bfloat16 and torch.equal(y, plain)
        y.register_hook(lambda g: captured.setdefault("gy", g))
        y.float().square().mean().backward()
    assert layer.weight.grad.dtype == layer.bias.grad.dtype == torch.float32
    gw, gb = ref.matched_conv_transpose(x, layer.weight, layer.bias, captured["gy"], 2, 1, 0, 1,
                                        1, 0.05)
    ref.close(layer.weight.grad, gw, 1e-4)   # float32 accumulation of bf16 operands
    ref.close(layer.bias.grad, gb, 1e-4)


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


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("rule", ["consequential", "backmatch-layerwise"])
def test_the_row_side_never_unfolds_the_output_signal(monkeypatch, rule, dims):
    """dZ = im2col(dy) is k…/stride… times the signal: the row side takes G from the
    transposed conv's own weight gradient and the layer-wise s from a col2im of ones."""
    case = CASES[dims][0]
    layer, plain, x = _pair_of_layers(dims, case, rule)
    out = layer(x.requires_grad_())
    gy = torch.randn_like(out)

    def no_unfold(*args, **kwargs):
        raise AssertionError("im2col of the output signal")
    with monkeypatch.context() as patch:
        patch.setattr(ConvTransposeGradients, "_block_signal", no_unfold)
        patch.setattr(torch.nn.functional, "unfold", no_unfold)
        out.backward(gy)
    if rule == "consequential":
        _, _, _, _, _, s, p, op, g, d, _ = case
        gw, gb = ref.matched_conv_transpose(x, layer.weight, layer.bias, gy, s, p, op, g, d,
                                            RIDGE)
        ref.close(layer.weight.grad, gw)
        ref.close(layer.bias.grad, gb)


def _im2col_cut(gy, kernel, s, p, d, input_size):
    """dZ by the reference's explicit patches: (B, C·k…, *input size), the windows past the
    input's cut."""
    dims = len(kernel)
    cols = ref.patches(ref.pad_like_nn(gy, p, kernel, d), kernel, s, d)  # (B, C, *win, *k)
    cols = cols[(..., *map(slice, input_size)) + (slice(None),) * dims]
    cols = cols.permute(0, 1, *range(2 + dims, 2 + 2 * dims), *range(2, 2 + dims))
    return cols.reshape(gy.shape[0], -1, *input_size)


@pytest.mark.parametrize("dims", [2, 3])
def test_block_signal_and_sharing_are_the_explicit_im2cols(dims):
    """dZ (the column side's signal) equals the explicit im2col of the output signal cut to
    the input's windows, and the layer-wise rule's s of dZ from the signal's non-zeros and a
    col2im of ones equals the count on it, over random geometries with sparse signals."""
    from consequential_ext import layerwise
    gen = torch.Generator().manual_seed(40 + dims)
    checked = 0
    for _ in range(60 if dims == 2 else 30):
        pick = lambda *options: options[torch.randint(len(options), (1,), generator=gen)]  # noqa: E731
        k, s, d = (tuple(pick(*v) for _ in range(dims)) for v in ((1, 2, 3), (1, 2, 3), (1, 2)))
        p = tuple(pick(*range(0, di * (ki - 1) + 1)) for ki, di in zip(k, d))
        op = tuple(pick(*[o for o in range(3) if o < max(si, di)]) for si, di in zip(s, d))
        size = tuple(pick(1, 2, 3, 5) for _ in range(dims))
        if any(n - 1 < (2 * pi - di * (ki - 1) - oi) / si
               for n, ki, si, pi, di, oi in zip(size, k, s, p, d, op)):
            continue                                               # an empty output
        x = torch.randn(2, 2, *size)
        weight = torch.randn(2, 3, *k)
        gy = ref.CONV_TRANSPOSE[dims](x, weight, None, s, p, op, 1, d)
        gy = gy * (torch.rand(gy.shape, generator=gen) < 0.4)      # a sparse signal
        grads = ConvTransposeGradients(x, weight, gy, s, p, op, d, 1, has_bias=False,
                                       needs_weight=True, needs_bias=False, ridge=0.1,
                                       amortizer=None)
        dz = _im2col_cut(gy, k, s, p, d, size)
        assert torch.equal(grads._block_signal(), dz), (k, s, p, op, d, size)
        assert torch.equal(grads._block_sharing(), layerwise.sharing_factor(dz))
        checked += 1
    assert checked >= 15
