"""AMP on CPU with bfloat16: float32 Gram/solve, parameter-dtype gradients, GradScaler skips
non-finite steps."""
import pytest
import torch
import torch.nn as nn

import consequential_ext as cx
from relative_error import rel_err
import matched_reference as ref

RIDGE = 0.05
# Float32 accumulation keeps the matched gradient within ~1e-6 of the float64 reference of
# the same (bf16) operands; a bf16 Gram or solve would be off by ~1e-2.
FP32_BOUND = 1e-4
# bf16 parameters: the result is rounded to bf16 (relative spacing 2⁻⁸) once, at the end.
BF16_BOUND = 2.0 ** -8


def _layers():
    torch.manual_seed(0)
    return [(cx.CLinear(13, 4), lambda: torch.randn(9, 13)),          # row side
            (cx.CLinear(13, 4), lambda: torch.randn(5, 13)),          # column side
            (cx.CConv2d(3, 4, 3, padding=1, groups=1), lambda: torch.randn(2, 3, 5, 5))]


def _reference(layer, x, gy):
    if isinstance(layer, nn.Conv2d):
        return ref.matched_conv2d(x, layer.weight, layer.bias, gy, layer.stride, layer.padding,
                                  layer.dilation, layer.groups, RIDGE)
    return ref.matched_linear(x, layer.weight, layer.bias, gy, RIDGE)


@pytest.mark.parametrize("case", range(3))
@pytest.mark.parametrize("backward_in_autocast", [False, True])
def test_autocast_bf16_gives_fp32_matched_gradients(case, backward_in_autocast):
    layer, make_input = _layers()[case]
    layer.ridge = RIDGE
    x = make_input()
    captured = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        with torch.no_grad():
            plain = (nn.Linear if isinstance(layer, nn.Linear) else nn.Conv2d).forward(layer, x)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, plain)  # forward is exactly the autocast nn layer's
        y.register_hook(lambda g: captured.setdefault("gy", g))
        loss = y.float().square().mean()
        if backward_in_autocast:
            loss.backward()
    if not backward_in_autocast:
        loss.backward()
    assert captured["gy"].dtype == torch.bfloat16
    assert layer.weight.grad.dtype == layer.bias.grad.dtype == torch.float32
    gw, gb = _reference(layer, x, captured["gy"])
    assert rel_err(layer.weight.grad, gw) < FP32_BOUND
    assert rel_err(layer.bias.grad, gb) < FP32_BOUND


@pytest.mark.parametrize("case", range(3))
def test_bf16_parameters_get_bf16_gradients_from_fp32_solves(case):
    layer, make_input = _layers()[case]
    layer.ridge = RIDGE
    layer.to(torch.bfloat16)
    x = make_input().to(torch.bfloat16)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    assert layer.weight.grad.dtype == layer.bias.grad.dtype == torch.bfloat16
    gw, gb = _reference(layer, x, gy)
    assert rel_err(layer.weight.grad, gw) < BF16_BOUND
    assert rel_err(layer.bias.grad, gb) < BF16_BOUND


def test_grad_scaler_skips_the_step_of_a_non_finite_batch():
    torch.manual_seed(0)
    model = cx.consequentialize(nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(), nn.Flatten(),
                                              nn.Linear(3 * 3 * 3, 2)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)

    def step(x):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()  # must not raise inside backward
        scaler.step(opt)
        scaler.update()

    before = [p.detach().clone() for p in model.parameters()]
    bad = torch.randn(4, 2, 5, 5)
    bad[1, 0, 2, 2] = float("inf")
    step(bad)
    assert not all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() < 2.0 ** 8
    step(torch.randn(4, 2, 5, 5))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert not any(torch.equal(p, b) for p, b in zip(model.parameters(), before))
