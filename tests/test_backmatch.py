"""Rule "backmatch" (paper 2, §2): matched weight gradients and matched input signals of
Linear (eq. 12), Conv2d (eq. 22, exact), BatchNorm (eq. 26) and their composition through
ReLU (eq. 31), against the float64 least-squares references."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

import backmatch_reference as bref
import consequential_ext as cx
import matched_reference as ref


def _close(actual, expected, rtol=1e-9):
    err = (actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)
    assert err < rtol, f"relative error {err:.3e} >= {rtol:.1e}"


@pytest.mark.parametrize("lead,fin,fout,bias", [((7,), 5, 3, True), ((2, 3), 6, 9, False),
                                                ((), 4, 2, True)])
def test_linear_input_signal_and_weight_match_eq12_eq13(lead, fin, fout, bias):
    ridge = 0.05
    layer = cx.CLinear(fin, fout, bias=bias, dtype=torch.float64, rule="backmatch", ridge=ridge)
    with torch.no_grad():
        layer.weight[:, 1] = 0            # a unit no weight leaves: the min-norm signal is 0
    x = torch.randn(*lead, fin, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(*lead, fout, dtype=torch.float64)
    layer(x).backward(gy)
    _close(x.grad, bref.matched_linear_input(layer.weight, gy))
    assert torch.all(x.grad[..., 1] == 0)
    gw, gb = ref.matched_linear(x, layer.weight, layer.bias, gy, ridge)
    _close(layer.weight.grad, gw)
    if bias:
        _close(layer.bias.grad, gb)


CONV_CASES = [
    # B, Cin, Cout, H, W, kernel, stride, padding, dilation, groups, bias
    (2, 3, 4, 7, 6, 3, 1, 0, 1, 1, True),
    (3, 4, 6, 8, 7, (3, 2), 2, 1, 1, 2, False),     # stride skips locations, groups
    (2, 2, 3, 9, 9, 3, 1, 2, 2, 1, True),           # dilation, padding wider than the border
    (1, 3, 2, 6, 5, 2, 1, "same", 1, 1, False),     # uneven 'same' padding
]


@pytest.mark.parametrize("b,cin,cout,h,w,k,stride,padding,dilation,groups,bias", CONV_CASES)
def test_conv2d_input_signal_is_exact_eq22(b, cin, cout, h, w, k, stride, padding, dilation,
                                           groups, bias):
    ridge = 0.1
    layer = cx.CConv2d(cin, cout, k, stride, padding, dilation, groups, bias,
                       dtype=torch.float64, rule="backmatch", ridge=ridge)
    x = torch.randn(b, cin, h, w, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    expected = bref.matched_conv2d_input(x.shape, layer.weight, gy, layer.stride, layer.padding,
                                         layer.dilation, groups)
    _close(x.grad, expected)
    gw, gb = ref.matched_conv2d(x, layer.weight, layer.bias, gy, layer.stride, padding,
                                layer.dilation, groups, ridge)
    _close(layer.weight.grad, gw)
    if bias:
        _close(layer.bias.grad, gb)


@pytest.mark.parametrize("norm_cls,shape", [(cx.BackMatchBatchNorm2d, (5, 3, 4, 3)),
                                            (cx.BackMatchBatchNorm1d, (7, 4)),
                                            (cx.BackMatchBatchNorm1d, (6, 2, 5))])
@pytest.mark.parametrize("affine", [True, False])
def test_batchnorm_signal_matches_eq26_and_forward_is_nn(norm_cls, shape, affine):
    plain_cls = nn.BatchNorm2d if norm_cls is cx.BackMatchBatchNorm2d else nn.BatchNorm1d
    norm = norm_cls(shape[1], affine=affine, dtype=torch.float64, rule="backmatch")
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 2.0).mul_(torch.tensor([1.0, -1.0] * 2)[:shape[1]])
            norm.bias.normal_()
    plain = plain_cls(shape[1], affine=affine, dtype=torch.float64)
    plain.load_state_dict(norm.state_dict())
    x = torch.randn(*shape, dtype=torch.float64).mul(3).add(1).requires_grad_()
    x_plain = x.detach().clone().requires_grad_()
    y, y_plain = norm(x), plain(x_plain)
    assert torch.equal(y, y_plain)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_plain.backward(gy)
    for key, value in plain.state_dict().items():       # running statistics updated alike
        assert torch.equal(norm.state_dict()[key], value), key
    _close(x.grad, bref.matched_batchnorm_input(x, norm.weight, gy, norm.eps))
    if affine:                                          # γ, β: ordinary gradients
        _close(norm.weight.grad, plain.weight.grad)
        _close(norm.bias.grad, plain.bias.grad)
    norm.eval()                                         # eval: the running variance's σ
    x.grad = None
    norm(x).backward(gy)
    _close(x.grad, bref.matched_batchnorm_input(x, norm.weight, gy, norm.eps, norm.running_var))


def test_network_composes_the_rules_through_relu():
    """Linear → BN → ReLU → Linear: each layer's gradient is its rule applied to the signal
    the layer above sent (ReLU passes it unchanged, eq. 31)."""
    ridge = 0.02
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    model = cx.consequentialize(model.double(), rule="backmatch", ridge=ridge)
    assert isinstance(model[1], cx.BackMatchBatchNorm1d) and model[1].rule == "backmatch"
    x = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    h1 = model[0](x)
    h2 = model[1](h1)
    h3 = model[2](h2)
    y = model[3](h3)
    gy = torch.randn_like(y)
    y.backward(gy)
    gw, gb = ref.matched_linear(h3, model[3].weight, model[3].bias, gy, ridge)
    _close(model[3].weight.grad, gw)
    _close(model[3].bias.grad, gb)
    signal = bref.matched_linear_input(model[3].weight, gy) * (h2 > 0)
    signal = bref.matched_batchnorm_input(h1, model[1].weight, signal, model[1].eps)
    gw, gb = ref.matched_linear(x, model[0].weight, model[0].bias, signal, ridge)
    _close(model[0].weight.grad, gw)
    _close(model[0].bias.grad, gb)
    _close(x.grad, bref.matched_linear_input(model[0].weight, signal))


def test_rules_mix_in_one_model():
    """Each layer applies its own rule to the signal it receives: bottom to top, a layerwise
    layer, an sgd layer, a backmatch layer and a consequential layer."""
    ridge = 0.03
    model = nn.Sequential(cx.CLinear(3, 4, rule="backmatch-layerwise"), nn.Tanh(),
                          cx.CLinear(4, 6, rule="sgd"), nn.Tanh(),
                          cx.CLinear(6, 5, rule="backmatch", ridge=ridge), nn.Tanh(),
                          cx.CLinear(5, 2, rule="consequential", ridge=ridge)).double()
    x = torch.randn(9, 3, dtype=torch.float64, requires_grad=True)
    h = [x]
    for layer in model:
        h.append(layer(h[-1]))
    h = [v.detach() for v in h]
    gy = torch.randn_like(h[-1])
    model(x).backward(gy)
    gw, _ = ref.matched_linear(h[6], model[6].weight, model[6].bias, gy, ridge)
    _close(model[6].weight.grad, gw)
    signal = (gy @ model[6].weight.detach()) * (1 - h[6] ** 2)      # ordinary, then tanh'
    gw, _ = ref.matched_linear(h[4], model[4].weight, model[4].bias, signal, ridge)
    _close(model[4].weight.grad, gw)
    signal = bref.matched_linear_input(model[4].weight, signal) * (1 - h[4] ** 2)
    _close(model[2].weight.grad, signal.T @ h[2])                  # sgd: plain BP
    _close(model[2].bias.grad, signal.sum(0))
    signal = (signal @ model[2].weight.detach()) * (1 - h[2] ** 2)
    w = model[0].weight.detach()
    _close(model[0].weight.grad, signal.T @ x.detach())            # layerwise: δW / m_b, s = 1
    _close(x.grad, signal @ w / (w.square().sum() / w.shape[1]))   # eq. 34


def test_sgd_rule_with_batchnorm_is_bit_identical_to_nn():
    torch.manual_seed(3)
    plain = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))
    model = cx.consequentialize(copy.deepcopy(plain), rule="sgd", batchnorm=True)
    assert isinstance(model[1], cx.BackMatchBatchNorm2d)
    x = torch.randn(4, 2, 6, 6)
    out, out_plain = model(x), plain(x)
    assert torch.equal(out, out_plain)
    out.square().sum().backward()
    out_plain.square().sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)


def test_consequentialize_batchnorm_option():
    def net():
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    assert type(cx.consequentialize(net())[1]) is nn.BatchNorm1d        # not a backmatch rule
    assert type(cx.consequentialize(net(), rule="backmatch", batchnorm=False)[1]) \
        is nn.BatchNorm1d
    model = cx.consequentialize(net(), rule="backmatch-layerwise")
    assert model[1].rule == "backmatch-layerwise"
    cx.consequentialize(model, rule="backmatch", include=["1"])
    assert model[1].rule == "backmatch" and model[0].rule == "backmatch-layerwise"
    with pytest.raises(TypeError, match="batchnorm"):
        cx.consequentialize(net(), batchnorm="yes")


@pytest.mark.parametrize("second", ["consequential", "sgd"])
def test_reconversion_gives_converted_norms_the_new_rule_too(second):
    """Converted with a back-matching rule, then with one that leaves norms alone: the norm
    takes the new rule like every C-layer, so ``sgd`` is nn's step bit for bit again."""
    torch.manual_seed(13)
    plain = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    model = cx.consequentialize(copy.deepcopy(plain), rule="backmatch")
    cx.consequentialize(model, rule=second)
    assert all(m.rule == second for m in (model[0], model[1], model[3]))
    x = torch.randn(16, 4, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    model(x).square().sum().backward()
    plain(x_plain).square().sum().backward()
    assert torch.equal(x.grad, x_plain.grad)               # BP's signal into the first layer
    if second == "sgd":
        for p, q in zip(model.parameters(), plain.parameters()):
            assert torch.equal(p.grad, q.grad)


def test_norms_without_a_back_matching_version_are_named():
    model = nn.Sequential(nn.Conv3d(2, 3, 1), nn.BatchNorm3d(3), nn.Flatten(), nn.Linear(3, 2),
                          nn.BatchNorm1d(2))
    with pytest.warns(UserWarning, match=r"1 \(BatchNorm3d has no back-matching version"):
        cx.consequentialize(model, rule="backmatch")
    assert type(model[1]) is nn.BatchNorm3d and type(model[4]) is cx.BackMatchBatchNorm1d
    with pytest.raises(ValueError, match="rule"):
        cx.BackMatchBatchNorm2d(3, rule="backmatching")


@pytest.mark.parametrize("norm", [nn.LayerNorm(3), nn.GroupNorm(1, 3), nn.InstanceNorm1d(3)],
                         ids=lambda n: type(n).__name__)
@pytest.mark.parametrize("rule", ["backmatch", "backmatch-layerwise"])
def test_other_norms_are_named_as_passing_bp(norm, rule):
    """A LayerNorm / GroupNorm / InstanceNorm passes BP's signal under the back-matching rules
    (no eq. 26 / eq. 36 version): named like BatchNorm3d, not left silently; none under a rule
    that leaves norms alone, nor with batchnorm=False."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), norm).double()
    with pytest.warns(UserWarning, match=rf"1 \({type(norm).__name__} has no back-matching"):
        cx.consequentialize(copy.deepcopy(model), rule=rule)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cx.consequentialize(copy.deepcopy(model), rule="consequential")
        cx.consequentialize(copy.deepcopy(model), rule=rule, batchnorm=False)
    # still BP's signal through the norm: its input gradient is nn's
    x = torch.randn(4, 3, 3 if isinstance(norm, nn.InstanceNorm1d) else 1, dtype=torch.float64)
    x = x.squeeze(-1).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = cx.consequentialize(copy.deepcopy(model), rule=rule)
    h = converted[0](x)
    g = torch.randn_like(h)
    ref, = torch.autograd.grad(model[1](h), h, g)
    got, = torch.autograd.grad(converted[1](h), h, g)
    assert torch.equal(got, ref)
