"""bf16 autocast on both sides of the solve of every layer kind, under every rule that
changes the gradients, with backward inside and outside the autocast region.

docs/design.md §2 (numerics): the Gram, G and the solve accumulate in float32 whatever
autocast does, so the weight gradients stay within float32 error of the float64 reference
of the same (bf16) operands. Only the input signal is a bf16 product, as nn's is.
"""
import pytest
import torch

import consequential_ext as cx
import rule_reference as rr
from consequential_ext import matching

RIDGE = 0.05
# Float32 accumulation: ~1e-6 from the float64 reference; a bf16 Gram, G or solve ~1e-3.
WEIGHT_BOUND = 1e-4
# The signal to the input is BP's bf16 product (as nn's under autocast), then divided.
INPUT_BOUND = 2.0 ** -6

# kind, side, input shape, layer; the side is what matching.solve_side picks for it
LAYERS = {
    "linear-row": (lambda: torch.randn(40, 5), lambda: cx.CLinear(5, 3)),
    "linear-column": (lambda: torch.randn(3, 20), lambda: cx.CLinear(20, 4)),
    "conv-row": (lambda: torch.randn(2, 3, 6, 5), lambda: cx.CConv2d(3, 4, 3, padding=1)),
    "conv-column": (lambda: torch.randn(1, 8, 3, 4), lambda: cx.CConv2d(8, 3, 3, padding=(0, 1))),
}


def _side(layer, x):
    if isinstance(layer, torch.nn.Linear):
        return matching.solve_side(x.shape[0], layer.in_features + 1)
    y = layer(x)
    d = layer.weight[0].numel() + 1
    return matching.solve_side(y.shape[0] * y.shape[2] * y.shape[3], d)


def _expected(layer, rule, x, gy):
    if isinstance(layer, torch.nn.Linear):
        return rr.linear(rule, x, layer.weight, layer.bias, gy, RIDGE)
    return rr.conv2d(rule, x, layer.weight, layer.bias, gy, layer.stride, layer.padding,
                     layer.dilation, layer.groups, RIDGE)


@pytest.mark.parametrize("backward_in_autocast", [False, True])
@pytest.mark.parametrize("rule", ["consequential", "backmatch", "backmatch-layerwise"])
@pytest.mark.parametrize("name", LAYERS)
def test_bf16_autocast_every_side_every_rule(name, rule, backward_in_autocast):
    torch.manual_seed(len(name) + len(rule))
    make_input, make_layer = LAYERS[name]
    layer, x = make_layer(), make_input()
    assert _side(layer, x) == name.split("-")[1]
    layer.rule, layer.ridge = rule, RIDGE
    x.requires_grad_()
    captured = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == torch.bfloat16
        y.register_hook(lambda g: captured.setdefault("gy", g))
        loss = y.float().square().mean()
        if backward_in_autocast:
            loss.backward()
    if not backward_in_autocast:
        loss.backward()
    gy = captured["gy"]
    assert gy.dtype == torch.bfloat16
    gx, gw, gb = _expected(layer, rule, x, gy)
    assert layer.weight.grad.dtype == layer.bias.grad.dtype == x.grad.dtype == torch.float32
    rr.close(layer.weight.grad, gw, WEIGHT_BOUND, "weight")
    rr.close(layer.bias.grad, gb, WEIGHT_BOUND, "bias")
    rr.close(x.grad, gx, INPUT_BOUND, "input signal")
