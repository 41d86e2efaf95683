"""Degenerate backward signals through every rule and layer kind: an all-zero output
gradient, a signal that reaches one channel (or one location) only, and a batch of one
sample — against the float64 references.

These are where a rule's normalisations meet 0/0 or a count below 1: the layer-wise sharing
factor ``s`` (paper 2 eq. 33) is at least 1, so a zero signal must give zero (not NaN)
gradients and a signal reaching one channel of a 1×1 output must not scale the gradient up
by the channel count.
"""
import pytest
import torch

import backmatch_reference as bref
import consequential_ext as cx
import rule_reference as rr

RIDGE = 0.04


def _zero(gy):
    return torch.zeros_like(gy)


def _one_channel(gy):
    """Only output channel (feature) 1 receives a signal, in every sample."""
    out = torch.zeros_like(gy)
    out[:, 1] = gy[:, 1]
    return out


def _one_location(gy):
    """A single entry of the whole output receives a signal."""
    out = torch.zeros_like(gy)
    out.view(-1)[gy.numel() // 2] = 1.5
    return out


SIGNALS = {"zero": _zero, "one-channel": _one_channel, "one-location": _one_location,
           "dense": lambda gy: gy}

# (input shape, layer factory, stride, padding, dilation, groups)
CONV_SHAPES = {
    "1x1-output": ((3, 2, 3, 4), lambda: torch.nn.Conv2d(2, 5, (3, 4), dtype=torch.float64)),
    "one-sample": ((1, 4, 5, 6), lambda: torch.nn.Conv2d(4, 4, 3, padding=1, groups=2,
                                                         dtype=torch.float64)),
    "batch": ((2, 3, 6, 5), lambda: torch.nn.Conv2d(3, 4, 3, stride=(2, 1),
                                                    dtype=torch.float64)),
}
LINEAR_SHAPES = {
    "one-sample": ((1, 6), lambda: torch.nn.Linear(6, 3, dtype=torch.float64)),
    "batch": ((5, 4), lambda: torch.nn.Linear(4, 3, dtype=torch.float64)),
}


def _run(fn, x, weight, bias, gy_of, rule):
    xg = x.clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_()
    y = fn(xg, w, b, rule)
    gy = gy_of(torch.randn_like(y))
    y.backward(gy)
    return gy, xg.grad, w.grad, b.grad


def _check(got, expected, rule):
    for actual, wanted, what in zip(got, expected, ("input signal", "weight", "bias")):
        rr.close(actual, wanted, 1e-9, f"{rule} {what}")


@pytest.mark.parametrize("rule", rr.RULES)
@pytest.mark.parametrize("signal", SIGNALS)
@pytest.mark.parametrize("shape", CONV_SHAPES)
def test_conv2d_degenerate_signals_every_rule(shape, signal, rule):
    torch.manual_seed(3)
    x_shape, make = CONV_SHAPES[shape]
    layer = make()
    x = torch.randn(x_shape, dtype=torch.float64)
    conf = layer.stride, layer.padding, layer.dilation, layer.groups

    def call(xg, w, b, rule):
        return cx.functional.cconv2d(xg, w, b, *conf, rule=rule, ridge=RIDGE)
    gy, *got = _run(call, x, layer.weight, layer.bias, SIGNALS[signal], rule)
    _check(got, rr.conv2d(rule, x, layer.weight, layer.bias, gy, *conf, RIDGE), rule)


@pytest.mark.parametrize("rule", rr.RULES)
@pytest.mark.parametrize("signal", SIGNALS)
@pytest.mark.parametrize("shape", LINEAR_SHAPES)
def test_linear_degenerate_signals_every_rule(shape, signal, rule):
    torch.manual_seed(4)
    x_shape, make = LINEAR_SHAPES[shape]
    layer = make()
    x = torch.randn(x_shape, dtype=torch.float64)

    def call(xg, w, b, rule):
        return cx.functional.clinear(xg, w, b, rule=rule, ridge=RIDGE)
    gy, *got = _run(call, x, layer.weight, layer.bias, SIGNALS[signal], rule)
    _check(got, rr.linear(rule, x, layer.weight, layer.bias, gy, RIDGE), rule)


@pytest.mark.parametrize("rule", rr.RULES)
@pytest.mark.parametrize("signal", ["zero", "one-channel", "dense"])
def test_batchnorm_of_one_sample_every_rule(signal, rule):
    """BN2d over a single sample (statistics over its locations only), fed by a C-layer."""
    torch.manual_seed(5)
    conv = cx.CConv2d(2, 3, 3, rule=rule, dtype=torch.float64)
    norm = cx.BackMatchBatchNorm2d(3, rule=rule, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(1, 2, 6, 5, dtype=torch.float64)
    a = conv(x).detach().requires_grad_()
    y = norm(a)
    gy = SIGNALS[signal](torch.randn_like(y))
    y.backward(gy)
    plain = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    plain.load_state_dict(norm.state_dict())
    a2 = a.detach().clone().requires_grad_()
    plain.train()(a2).backward(gy)
    if rule == "backmatch":
        expected = bref.matched_batchnorm_input(a, norm.weight, gy, norm.eps)
    elif rule == "backmatch-layerwise":   # no C-layer feeds `a` (detached): eq. 36's first form
        var = a.detach().var((0, 2, 3), unbiased=False).mean()
        expected = a2.grad * var / norm.weight.detach().square().mean()
    else:
        expected = a2.grad
    rr.close(a.grad, expected, 1e-9, f"{rule} input signal")
    rr.close(norm.weight.grad, plain.weight.grad, 1e-9, "gamma")
    rr.close(norm.bias.grad, plain.bias.grad, 1e-9, "beta")


@pytest.mark.parametrize("rule", ["backmatch", "backmatch-layerwise"])
def test_batchnorm_without_running_statistics_in_eval_uses_the_batch(rule):
    """track_running_stats=False: nn normalises by the batch in eval mode too, and so must the
    matched signal (there are no running statistics to use)."""
    torch.manual_seed(6)
    norm = cx.BackMatchBatchNorm2d(3, track_running_stats=False, rule=rule,
                                   dtype=torch.float64).eval()
    a = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    y = norm(a)
    assert torch.equal(y, torch.nn.functional.batch_norm(a, None, None, norm.weight, norm.bias,
                                                         True, 0.0, norm.eps))
    gy = torch.randn_like(y)
    y.backward(gy)
    if rule == "backmatch":
        expected = bref.matched_batchnorm_input(a, norm.weight, gy, norm.eps)
    else:
        a2 = a.detach().clone().requires_grad_()
        torch.nn.functional.batch_norm(a2, None, None, norm.weight.detach(), None, True, 0.0,
                                       norm.eps).backward(gy)
        var = a.detach().var((0, 2, 3), unbiased=False).mean()
        expected = a2.grad * var / norm.weight.detach().square().mean()
    rr.close(a.grad, expected, 1e-9, f"{rule} input signal")


# Empty batches: (nn factory, input shape with no samples, a non-empty shape for the twin steps)
EMPTY = {
    "linear": (lambda: torch.nn.Linear(5, 3), (0, 5), (7, 5)),
    "linear-rows-of-nothing": (lambda: torch.nn.Linear(5, 3), (4, 0, 5), (4, 2, 5)),
    "conv1d": (lambda: torch.nn.Conv1d(4, 3, 3, padding=1), (0, 4, 9), (3, 4, 9)),
    "conv2d-stride": (lambda: torch.nn.Conv2d(16, 8, 3, stride=2, padding=1), (0, 16, 8, 8),
                      (2, 16, 8, 8)),
    "conv2d-1x1-groups": (lambda: torch.nn.Conv2d(6, 4, 1, groups=2), (0, 6, 5, 3), (2, 6, 5, 3)),
    "conv3d": (lambda: torch.nn.Conv3d(3, 4, 3, padding=1), (0, 3, 4, 4, 4), (2, 3, 4, 4, 4)),
    "convtranspose1d": (lambda: torch.nn.ConvTranspose1d(5, 3, 3, stride=2), (0, 5, 4),
                        (3, 5, 4)),
    "convtranspose2d": (lambda: torch.nn.ConvTranspose2d(4, 3, 3, padding=1), (0, 4, 4, 5),
                        (2, 4, 4, 5)),
    "convtranspose3d": (lambda: torch.nn.ConvTranspose3d(4, 2, 2, stride=2, groups=2),
                        (0, 4, 2, 3, 2), (2, 4, 2, 3, 2)),
}


@pytest.mark.parametrize("amortised", [False, True])
@pytest.mark.parametrize("rule", rr.RULES)
@pytest.mark.parametrize("kind", EMPTY)
def test_empty_batch_gives_nn_zero_gradients_and_leaves_the_amortiser_alone(kind, rule,
                                                                             amortised):
    """No samples: every rule gives nn's (zero) gradients — no reshape error, no 0/0 — and an
    amortised layer neither counts the step nor folds anything in: the steps after it are
    those of a twin that never saw it."""
    make, empty_shape, shape = EMPTY[kind]
    torch.manual_seed(7)
    plain = make().double()
    layers = [cx.consequentialize(torch.nn.Sequential(make()), rule=rule).double()
              for _ in range(2)]
    for layer in layers:
        layer.load_state_dict(plain.state_dict(), strict=False)
        if amortised:
            cx.amortize(layer, every=2, exact_when_cheaper=False)
    batches = [torch.randn(shape, dtype=torch.float64) for _ in range(3)]
    empty = torch.randn(empty_shape, dtype=torch.float64, requires_grad=True)

    def step(model, x):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    step(layers[0], batches[0])
    step(layers[1], batches[0])
    got = step(layers[0], empty)
    want = step(plain, empty.detach().requires_grad_())
    assert empty.grad is not None and empty.grad.shape == empty.shape
    for g, w in zip(got, want):
        assert torch.equal(g, w) and not g.any()
    for x in batches[1:]:     # the twin skipped the empty batch
        for g, w in zip(step(layers[0], x), step(layers[1], x)):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, w, rtol=1e-12, atol=0)


@pytest.mark.parametrize("batch", [0, 5])
def test_safeguard_energy_is_the_explicit_one_and_zero_on_an_empty_batch(batch):
    """The amortiser's safeguard measures |Δ·X|²/N on the rank's own samples: under DDP a rank
    with an empty batch still measures it (its Gram is summed with the others'), so it must
    be 0 there, not 0/0 or an index error; otherwise the float64 value from explicit im2col."""
    from consequential_ext import matching
    torch.manual_seed(19)
    x = torch.randn(batch, 4, 5, 6, dtype=torch.float64)
    shape, groups = (6, 2, 3, 3), 2
    direction = torch.randn(groups, 3, 2 * 9 + 1, dtype=torch.float64)
    got = matching._conv_energy(x, 5 * 6, shape, (1, 1), (1, 1), (1, 1), groups, True,
                                direction, None)
    cols = torch.nn.functional.unfold(x, 3, padding=1)              # (B, 4·9, L)
    cols = cols.reshape(batch, groups, 2 * 9, 30).permute(1, 2, 0, 3).reshape(groups, 18, -1)
    cols = torch.cat([cols, torch.ones(groups, 1, cols.shape[-1], dtype=x.dtype)], 1)
    want = (direction @ cols).square().sum((1, 2)) / max(batch, 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    rows = torch.randn(batch, 7, dtype=torch.float64)
    linear = torch.randn(3, 8, dtype=torch.float64)
    want = (torch.cat([rows, torch.ones(batch, 1, dtype=rows.dtype)], 1) @ linear.T).square() \
        .sum() / max(batch, 1)
    torch.testing.assert_close(matching._linear_energy(rows, linear, None), want, rtol=1e-12,
                               atol=0)


@pytest.mark.parametrize("rule", ["consequential", "backmatch", "backmatch-layerwise"])
def test_a_linear_with_no_input_features_matches_its_bias_alone(rule):
    # nn.Linear(0, n) is a bias: X is the constant-1 row, A = 1, so the matched bias gradient
    # is G / (1 + λ) (the layer-wise rule: G itself); the weight's is (n, 0), as nn's.
    layer = cx.CLinear(0, 4, rule=rule, ridge=0.1).double()
    x = torch.randn(5, 3, 0, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(5, 3, 4, dtype=torch.float64)
    layer(x).backward(gy)
    g = gy.sum((0, 1))                                  # the ordinary bias gradient
    expected = g if rule == "backmatch-layerwise" else g / 1.1
    torch.testing.assert_close(layer.bias.grad, expected, rtol=1e-12, atol=0)
    assert layer.weight.grad.shape == (4, 0) and x.grad.shape == x.shape
