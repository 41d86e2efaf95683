"""Rule "backmatch-layerwise" (paper 2, Algorithm 1): the factors of the supplement's LeNet
walk-through, written out literally, and the general forms of s, c and the BN factor."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import consequential_ext as cx
from consequential_ext.layerwise import producer_weight


def _close(actual, expected, rtol=1e-10):
    err = (actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)
    assert err < rtol, f"relative error {err:.3e} >= {rtol:.1e}"


def _row(w):   # ‖W‖²_{2,µ}: mean squared norm of the rows (outputs) of W / W_row
    return w.detach().double().square().sum() / w.shape[0]


def _col(w):   # ‖Wᵀ‖²_{2,µ} / ‖W_col‖²_{2,µ}: mean squared norm of the weights leaving an input
    return w.detach().double().square().sum() / w.shape[1]


def _lenet(side, pad):
    """Paper 2, Figure 1: no biases, BN (no affine) before each ReLU, max pooling 2."""
    bn2, bn1 = (lambda c: nn.BatchNorm2d(c, affine=False)), (lambda c: nn.BatchNorm1d(c,
                                                                                      affine=False))
    flat = 16 * (((side + 2 * pad - 4) // 2 - 4) // 2) ** 2
    return nn.Sequential(
        nn.Conv2d(3, 6, 5, padding=pad, bias=False), nn.MaxPool2d(2), bn2(6), nn.ReLU(),
        nn.Conv2d(6, 16, 5, bias=False), nn.MaxPool2d(2), bn2(16), nn.ReLU(), nn.Flatten(),
        nn.Linear(flat, 120, bias=False), bn1(120), nn.ReLU(),
        nn.Linear(120, 84, bias=False), bn1(84), nn.ReLU(),
        nn.Linear(84, 10, bias=False)).double()


@pytest.mark.parametrize("side,pad", [(32, 0), (28, 2)])     # CIFAR-sized / MNIST-sized
def test_lenet_gradients_equal_the_supplement_walkthrough(side, pad):
    torch.manual_seed(0)
    plain = _lenet(side, pad)
    model = cx.consequentialize(copy.deepcopy(plain), rule="backmatch-layerwise")
    x = torch.randn(4, 3, side, side, dtype=torch.float64)
    t = torch.tensor([1, 7, 3, 3])
    F.cross_entropy(plain(x), t).backward()
    F.cross_entropy(model(x), t).backward()
    cv1, cv2, fc1, fc2, fc3 = (plain[i].weight for i in (0, 4, 9, 12, 15))
    # The supplement, term by term (s_cv1 = 196, s_cv2 = 25, c_cv2 = 196/25).
    expected = {
        15: fc3.grad,
        12: _row(fc2) / _col(fc3) * fc2.grad,
        9: _row(fc2) * _row(fc1) / (_col(fc3) * _col(fc2)) * fc1.grad,
        4: _row(fc2) * _row(fc1) * _row(cv2) / (25 * _col(fc3) * _col(fc2) * _col(fc1))
        * cv2.grad,
        0: _row(fc2) * _row(fc1) * _row(cv2) * _row(cv1)
        / (196 * _col(fc3) * _col(fc2) * _col(fc1) * _col(cv2) / (196 / 25)) * cv1.grad,
    }
    for index, grad in expected.items():
        _close(model[index].weight.grad, grad)


@pytest.mark.parametrize("stride,padding,groups,pool", [(2, 1, 1, False), (1, 0, 2, False),
                                                        (1, 1, 1, True)])
def test_conv_sharing_factor_and_input_factor(stride, padding, groups, pool):
    """s = output locations the loss reaches (H_o·W_o, /4 under 2×2 max pooling) and the
    signal below divided by ‖W_col‖²_{2,µ}/c with c = H_in·W_in/s (eqs. 33, 35)."""
    torch.manual_seed(1)
    plain = nn.Conv2d(4, 6, 3, stride, padding, groups=groups).double()
    layer = cx.consequentialize(copy.deepcopy(plain), rule="backmatch-layerwise")
    x = torch.randn(3, 4, 9, 11, dtype=torch.float64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [net(v) for net, v in zip((plain, layer), xs)]
    if pool:
        outs = [F.max_pool2d(o, 2) for o in outs]
    gy = torch.randn_like(outs[0])
    for o in outs:
        o.backward(gy)
    s = outs[0].shape[2] * outs[0].shape[3] if pool else plain(x).shape[2] * plain(x).shape[3]
    _close(layer.weight.grad, plain.weight.grad / s)
    _close(layer.bias.grad, plain.bias.grad / s)
    c = 9 * 11 / s
    _close(xs[1].grad, xs[0].grad / (_col(plain.weight) / groups / c))


def test_layer_called_twice_with_bn_between_and_repeated_backward():
    """x → L → BN → tanh → L: each call is scaled by the factor m at its own output."""
    torch.manual_seed(2)
    layer = cx.CLinear(5, 5, dtype=torch.float64, rule="backmatch-layerwise")
    norm = cx.BackMatchBatchNorm1d(5, affine=False, dtype=torch.float64,
                                   rule="backmatch-layerwise")
    x = torch.randn(7, 5, dtype=torch.float64)
    y = layer(torch.tanh(norm(layer(x))))
    gy = torch.randn_like(y)
    y.backward(gy, retain_graph=True)
    first = layer.weight.grad.clone()
    y.backward(gy)
    _close(layer.weight.grad, 2 * first)
    w_top, w_bottom = (layer.weight.detach().clone().requires_grad_() for _ in range(2))
    y_ref = F.linear(torch.tanh(F.batch_norm(F.linear(x, w_bottom, layer.bias), None, None,
                                             training=True)), w_top, layer.bias)
    y_ref.backward(gy)
    w = layer.weight
    _close(first, w_top.grad + w_bottom.grad * _row(w) / _col(w))


def test_batchnorm_factor_fallback_and_affine():
    """No C-layer below the norm: eq. 36's batch variance (channel mean); an affine γ
    divides the factor by the mean γ²."""
    torch.manual_seed(3)
    norm = cx.BackMatchBatchNorm1d(4, dtype=torch.float64, rule="backmatch-layerwise")
    plain = nn.BatchNorm1d(4, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    plain.load_state_dict(norm.state_dict())
    x = (torch.randn(10, 4, dtype=torch.float64) * torch.tensor([1.0, 2, 3, 4])) \
        .requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    gy = torch.randn(10, 4, dtype=torch.float64)
    norm(x).backward(gy)
    plain(x2).backward(gy)
    factor = x.detach().var(0, unbiased=False).mean() / norm.weight.detach().square().mean()
    _close(x.grad, x2.grad * factor)
    _close(norm.weight.grad, plain.weight.grad)


def test_producer_is_found_through_single_input_ops_only():
    lin = cx.CLinear(3, 4, rule="backmatch-layerwise")
    conv = cx.CConv2d(2, 3, 3, rule="backmatch")
    x = torch.randn(2, 3)
    assert producer_weight(F.relu(lin(x)).mul(2)) is lin.weight
    assert producer_weight(F.max_pool2d(conv(torch.randn(1, 2, 6, 6)), 2)) is conv.weight
    assert producer_weight(lin(x) + lin(x)) is None          # a branch: no single producer
    assert producer_weight(x.requires_grad_()) is None        # a leaf
    assert producer_weight(nn.Linear(3, 4)(x)) is None        # not a C-layer
    assert producer_weight(F.dropout(F.relu(lin(x)), 0.5, training=True)) is lin.weight
    # an embedding holds its weight by reference, not as a saved tensor (functional.py)
    emb = cx.CEmbedding(5, 3, max_norm=1.0)
    assert producer_weight(F.relu(emb(torch.tensor([[1, 2], [2, 4]]))).flatten(1)) is emb.weight
    # A frozen nn layer hides its weight from the graph: it still ends the walk.
    frozen_lin = nn.Linear(4, 4).requires_grad_(False)
    frozen_conv = nn.Conv2d(3, 3, 1, bias=False).requires_grad_(False)
    assert producer_weight(frozen_lin(F.relu(lin(x)))) is None
    assert producer_weight(frozen_conv(conv(torch.randn(1, 2, 6, 6)))) is None
    assert producer_weight(F.relu(lin(x)) @ torch.randn(4, 4)) is None
    # oneDNN's fused float32 LSTM (MkldnnRnnLayerBackward0): one node whose only graph input,
    # frozen, is its input (a build without oneDNN decomposes it: a branch ends the walk).
    frozen_lstm = nn.LSTM(4, 5).requires_grad_(False)
    assert producer_weight(frozen_lstm(lin(x)[:, None])[0]) is None
    # Ops whose names merely contain a matmul's letters are single-input ops like any other.
    through = torch.lgamma(F.relu(lin(x)) + 1).cummax(1)[0]
    assert producer_weight(F.interpolate(through[:, None], scale_factor=2, mode="linear")) \
        is lin.weight


def _conv_bn_relu_stack(seed):
    torch.manual_seed(seed)
    return cx.consequentialize(nn.Sequential(
        nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 36, 3)), rule="backmatch-layerwise").double()


@pytest.mark.parametrize("reentrant", [False, True])
def test_layerwise_norms_under_activation_checkpointing(reentrant):
    # The segment starts at the first norm's input: non-reentrant checkpointing keeps the
    # graph to the conv below (eq. 36 as without checkpointing); a reentrant one recomputes
    # the norm on a detached leaf, where the factor cannot be found: a clear error.
    x, t = torch.randn(5, 3, 6, 6, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    grads = []
    for checkpointed in (False, True):
        model = _conv_bn_relu_stack(0)
        h = model[0](x)
        head = lambda h: model[2](model[1](h))
        h = torch.utils.checkpoint.checkpoint(head, h, use_reentrant=reentrant) \
            if checkpointed else head(h)
        loss = (model[7](model[6](model[5](model[4](model[3](h))))) - t).square().mean()
        if checkpointed and reentrant:
            with pytest.raises(RuntimeError, match="use_reentrant=False"):
                loss.backward()
            return
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for checkpointed_grad, grad in zip(*grads[::-1]):
        _close(checkpointed_grad, grad)


def test_a_norm_on_the_input_under_non_reentrant_checkpointing():
    # The recomputation reaches the model's input (a leaf that requires grad): no producer,
    # eq. 36's first form, as without checkpointing — not the reentrant case's error.
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(2)
        norm = cx.BackMatchBatchNorm2d(3, rule="backmatch-layerwise").double()
        conv = cx.CConv2d(3, 2, 3, rule="backmatch-layerwise").double()
        xi = x.clone().requires_grad_()
        head = lambda h: conv(F.relu(norm(h)))    # noqa: E731
        out = torch.utils.checkpoint.checkpoint(head, xi, use_reentrant=False) \
            if checkpointed else head(xi)
        out.square().mean().backward()
        grads.append([xi.grad] + [p.grad for p in (*norm.parameters(), *conv.parameters())])
    for checkpointed_grad, grad in zip(*grads[::-1]):
        _close(checkpointed_grad, grad)


@pytest.mark.parametrize("rule", ["backmatch", "backmatch-layerwise"])
def test_rules_run_under_bf16_autocast(rule):
    model = cx.consequentialize(nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.MaxPool2d(2), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Linear(12, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)), rule=rule)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(5, 2, 6, 6))
    out.float().square().sum().backward()
    for p in model.parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_all_zero_weights_send_a_zero_signal():
    """δa/δ'a = 0 (no weight leaves any input): the minimum-norm signal 0, not 0/0."""
    for layer, x in [(cx.CLinear(3, 2, rule="backmatch-layerwise"), torch.randn(4, 3)),
                     (cx.CConv2d(2, 3, 3, rule="backmatch-layerwise"), torch.randn(2, 2, 5, 5))]:
        nn.init.zeros_(layer.weight)
        x.requires_grad_()
        layer(x).sum().backward()
        assert torch.equal(x.grad, torch.zeros_like(x))
        assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_layerwise_factor_counts_the_unpadded_map(dims, mode):
    # Eq. 35's c = input locations / s: the border a non-zero padding_mode adds is no input
    # location of the layer, so the signal is BP's over the same factor as with zero padding
    # (whose factor the tests above check by hand): padding the map must not scale it.
    size = {1: (7,), 2: (5, 6), 3: (3, 4, 5)}[dims]
    kind = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    x = torch.randn(3, 2, *size, dtype=torch.float64)
    ratios = []
    for padding_mode in ("zeros", mode):
        torch.manual_seed(1)
        plain = kind(2, 4, 3, padding=1, padding_mode=padding_mode).double()
        layer = cx.consequentialize(copy.deepcopy(plain), rule="backmatch-layerwise")
        gy = torch.randn_like(plain(x))
        signals = []
        for module in (plain, layer):
            xi = x.clone().requires_grad_()
            module(xi).backward(gy)
            signals.append(xi.grad)
        ratio = signals[1] / signals[0]
        _close(ratio, ratio.flatten()[0].expand_as(ratio))   # BP over one scalar factor
        ratios.append(ratio.flatten()[0])
    _close(ratios[1], ratios[0])


def test_zero_initialised_norm_sends_zero_not_nan():
    # timm's zero_init_last / torchvision's zero_init_residual: γ = 0 in the branch's last
    # norm. BP's signal through it is 0; the layer-wise one must be 0 too (it was 0·∞ = NaN,
    # flowing through the residual sum into every layer below).
    torch.manual_seed(4)
    conv_in, conv_a = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
    norm = nn.BatchNorm2d(4)
    nn.init.zeros_(norm.weight)
    head = nn.Linear(4 * 25, 2)
    model = cx.consequentialize(nn.ModuleDict(dict(conv_in=conv_in, conv_a=conv_a, norm=norm,
                                                   head=head)), rule="backmatch-layerwise").double()
    x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
    h = model["conv_in"](x)
    out = model["head"]((h + model["norm"](model["conv_a"](h))).flatten(1))
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert not model["conv_a"].weight.grad.any() and not model["conv_a"].bias.grad.any()
    assert model["conv_in"].weight.grad.abs().sum() > 0     # the identity path still carries


def test_a_tiny_gamma_in_float32_gives_the_float64_signal():
    # γ = 1e-20: its mean square is a float32 denormal, the factor var/γ² (~1e40) is not a
    # float32 — the signal must still be the float64 computation's, not inf or NaN.
    torch.manual_seed(6)
    x = torch.randn(8, 3, dtype=torch.float64) * 2 + 1
    gy = torch.randn(8, 3, dtype=torch.float64)
    signals = []
    for dtype in (torch.float32, torch.float64):
        norm = cx.BackMatchBatchNorm1d(3, rule="backmatch-layerwise").to(dtype)
        with torch.no_grad():
            norm.weight.fill_(1e-20)
        xi = x.to(dtype).requires_grad_()
        norm(xi).backward(gy.to(dtype))
        signals.append(xi.grad.double())
    assert torch.isfinite(signals[0]).all()
    _close(signals[0], signals[1], rtol=1e-4)
