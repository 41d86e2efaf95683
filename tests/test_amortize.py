"""Amortised solves: an EMA Gram refactorised every k steps, against a float64
re-implementation of that schedule from the ordinary gradients."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import consequential_ext as cx
import matched_reference as ref

RIDGE = 0.05


def _rows(x, bias=True):
    rows = x.detach().double().reshape(-1, x.shape[-1])
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1) if bias else rows


def test_every_step_without_memory_is_the_exact_matched_gradient():
    torch.manual_seed(0)
    exact = cx.CLinear(12, 3, ridge=RIDGE, dtype=torch.float64)
    amortized = cx.amortize(cx.CLinear(12, 3, ridge=RIDGE, dtype=torch.float64), every=1,
                            decay=0.0)
    amortized.load_state_dict(exact.state_dict(), strict=False)
    for n in (5, 20):  # column side, then row side, for the exact layer
        x = torch.randn(n, 12, dtype=torch.float64)
        for layer in (exact, amortized):
            layer.zero_grad()
            layer(x).square().sum().backward()
        torch.testing.assert_close(amortized.weight.grad, exact.weight.grad, rtol=1e-9,
                                   atol=1e-12)
        torch.testing.assert_close(amortized.bias.grad, exact.bias.grad, rtol=1e-9, atol=1e-12)


def test_linear_schedule_matches_float64_reimplementation():
    torch.manual_seed(0)
    every, decay = 3, 0.7
    layer = cx.amortize(cx.CLinear(6, 2, ridge=RIDGE, dtype=torch.float64), every=every,
                        decay=decay)
    ema = inverse = None
    for step in range(7):
        x = torch.randn(4, 6, dtype=torch.float64) * (1 + step)  # the Gram drifts
        layer.zero_grad()
        y = layer(x)
        gy = torch.randn_like(y)
        y.backward(gy)
        rows = _rows(x)
        a = rows.T @ rows / rows.shape[0]
        ema = a if ema is None else decay * ema + (1 - decay) * a
        if step % every == 0:
            inverse = torch.linalg.inv(ema + RIDGE * torch.eye(7, dtype=torch.float64))
        gw, gb = ref.ordinary_grads(F.linear, x, layer.weight, layer.bias, gy)
        expected = torch.cat([gw, gb[:, None]], 1) @ inverse
        torch.testing.assert_close(layer.weight.grad, expected[:, :-1], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, expected[:, -1], rtol=1e-9, atol=1e-12)
    assert int(layer.amortizer.steps) == 7


def test_grouped_conv_schedule_matches_float64_reimplementation():
    torch.manual_seed(0)
    every, decay = 2, 0.5
    layer = cx.amortize(cx.CConv2d(4, 6, 3, padding=1, groups=2, ridge=RIDGE,
                                   dtype=torch.float64), every=every, decay=decay)
    ema = inverse = None
    for step in range(4):
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
        layer.zero_grad()
        y = layer(x)
        gy = torch.randn_like(y)
        y.backward(gy)
        cols = F.unfold(F.pad(x, (1, 1, 1, 1)), 3)                      # (B, 4·9, L)
        grams = []
        for g in range(2):
            xg = cols[:, g * 18:(g + 1) * 18].permute(1, 0, 2).reshape(18, -1)
            xg = torch.cat([xg, torch.ones(1, xg.shape[1], dtype=xg.dtype)])
            grams.append(xg @ xg.T / x.shape[0])
        a = torch.stack(grams)
        ema = a if ema is None else decay * ema + (1 - decay) * a
        if step % every == 0:
            inverse = torch.linalg.inv(ema + RIDGE * torch.eye(19, dtype=torch.float64))
        conv = lambda inp, w, b: F.conv2d(inp, w, b, 1, 1, 1, 2)  # noqa: E731
        gw, gb = ref.ordinary_grads(conv, x, layer.weight, layer.bias, gy)
        g = torch.cat([gw.reshape(2, 3, 18), gb.reshape(2, 3, 1)], -1)
        expected = g @ inverse
        torch.testing.assert_close(layer.weight.grad, expected[..., :-1].reshape(6, 2, 3, 3),
                                   rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(layer.bias.grad, expected[..., -1].reshape(6),
                                   rtol=1e-9, atol=1e-12)


def test_non_finite_batch_leaves_the_running_state_untouched():
    torch.manual_seed(0)
    layer = cx.amortize(cx.CLinear(5, 2), every=2, decay=0.9)
    layer(torch.randn(8, 5)).sum().backward()
    state = {k: v.clone() for k, v in layer.amortizer.state_dict().items()}
    layer.zero_grad()
    bad = torch.randn(8, 5)
    bad[3, 1] = float("nan")
    layer(bad).sum().backward()
    assert not torch.isfinite(layer.weight.grad).any()
    for key, value in layer.amortizer.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_amortize_is_in_state_dict_and_removable():
    model = cx.consequentialize(nn.Sequential(nn.Conv2d(2, 3, 3, groups=1), nn.Flatten(),
                                              nn.Linear(3, 2, bias=False)))
    cx.amortize(model, every=4)
    keys = set(model.state_dict())
    assert {"0.amortizer.gram", "0.amortizer.factor", "0.amortizer.steps",
            "2.amortizer.gram"} <= keys
    assert model[0].amortizer.gram.shape == (1, 19, 19)
    assert model[2].amortizer.gram.shape == (3, 3)
    cx.amortize(model, every=None)
    assert not any("amortizer" in k for k in model.state_dict())


@pytest.mark.parametrize("kwargs, match", [({"every": 0}, "every"), ({"every": 2.5}, "every"),
                                           ({"decay": 1.0}, "decay"),
                                           ({"decay": float("nan")}, "decay")])
def test_bad_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cx.amortize(cx.CLinear(3, 2), **kwargs)


def test_model_without_c_layers_is_an_error():
    with pytest.raises(ValueError, match="consequentialize"):
        cx.amortize(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TypeError, match="model"):
        cx.amortize("not a model")


def test_functional_checks_the_amortizer_in_forward():
    from consequential_ext.amortize import GramAmortizer
    x, w = torch.randn(4, 3), torch.randn(2, 3)
    with pytest.raises(TypeError, match="amortizer"):
        cx.functional.clinear(x, w, amortizer="yes")
    wrong = GramAmortizer((4, 4), every=1, decay=0.5)  # a bias row too many
    with pytest.raises(ValueError, match=r"amortizer holds a Gram of shape \(4, 4\)"):
        cx.functional.clinear(x, w, amortizer=wrong)
    right = GramAmortizer((3, 3), every=1, decay=0.5)
    w.requires_grad_()
    cx.functional.clinear(x, w, amortizer=right).sum().backward()
    assert int(right.steps) == 1
    with pytest.raises(ValueError, match="amortizer"):
        cx.functional.cconv2d(torch.randn(1, 4, 5, 5), torch.randn(2, 2, 3, 3), groups=2,
                              amortizer=GramAmortizer((1, 18, 18), every=1, decay=0.5))
