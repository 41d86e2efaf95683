"""Float64 reference of what every rule gives a Linear / Conv2d call (docs/design.md §2, the
rules table): the weight and bias gradients and the signal sent to the input.

Built from the independent references (``matched_reference``: explicit padding, ``unfold``,
``torch.linalg.solve``; ``backmatch_reference``: per-unit least squares) and from paper 2's
layer-wise formulas written out here; shares no code with the library.
"""
import torch
import torch.nn.functional as F

import backmatch_reference as bref
import matched_reference as ref

RULES = ("consequential", "backmatch", "backmatch-layerwise", "sgd")


def _ordinary(fn, x, weight, bias, grad_out):
    """(grad_input, grad_weight, grad_bias) of plain backprop, float64."""
    xd = x.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    fn(xd, w, b).backward(grad_out.double())
    return xd.grad, w.grad, (None if b is None else b.grad)


def pair(v):
    """An int or a pair as a pair."""
    return (v, v) if isinstance(v, int) else tuple(v)


def _safe_div(numerator, denominator):
    """0 where the denominator is 0: the minimum-norm matched value."""
    return numerator / denominator if denominator != 0 else torch.zeros_like(numerator)


def linear(rule, x, weight, bias, grad_out, ridge):
    """Expected (grad_input, grad_weight, grad_bias) of ``F.linear`` under ``rule``."""
    gx, gw, gb = _ordinary(F.linear, x, weight, bias, grad_out)
    if rule in ("consequential", "backmatch"):
        gw, gb = ref.matched_linear(x, weight, bias, grad_out, ridge)
    if rule == "backmatch":
        gx = bref.matched_linear_input(weight, grad_out)
    elif rule == "backmatch-layerwise":
        # eq. 34: δa/δ'a = ‖Wᵀ‖²_{2,µ}, the mean over inputs of Σ_out w²; s = 1 (eq. 33)
        gx = _safe_div(gx, weight.detach().double().square().sum() / weight.shape[1])
    return gx, gw, gb


def conv2d(rule, x, weight, bias, grad_out, stride, padding, dilation, groups, ridge):
    """Expected (grad_input, grad_weight, grad_bias) of ``F.conv2d`` (zero padding: int,
    pair, 'same' or 'valid') under ``rule``."""
    def conv(inp, w, b):
        return F.conv2d(inp, w, b, stride, padding, dilation, groups)
    gx, gw, gb = _ordinary(conv, x, weight, bias, grad_out)
    if rule in ("consequential", "backmatch"):
        gw, gb = ref.matched_conv2d(x, weight, bias, grad_out, pair(stride), padding,
                                    pair(dilation), groups, ridge)
    if rule == "backmatch":
        gx = bref.matched_conv2d_input(x.shape, weight, grad_out, stride, padding, dilation,
                                       groups)
    elif rule == "backmatch-layerwise":
        # eq. 33: s = output locations per (sample, channel) the signal reaches, at least 1
        batch, channels = grad_out.shape[:2]
        s = max(1.0, torch.count_nonzero(grad_out).item() / (batch * channels))
        gw = gw / s
        gb = None if gb is None else gb / s
        # eq. 35: δa/δ'a = ‖W_col‖²_{2,µ} / c, c = H_in·W_in / s; ‖W_col‖²_{2,µ} is the mean
        # over the input channels of Σ w² of the weights leaving each one
        col = weight.detach().double().square().sum() / x.shape[1]
        gx = _safe_div(gx, col * s / (x.shape[2] * x.shape[3]))
    return gx, gw, gb


def unfold_gram(x, kernel_size, stride, padding, dilation, groups, bias):
    """(groups, D, D) Σ patch·patchᵀ of ``x`` from explicit ``unfold``, float64; all pairs."""
    cols = F.unfold(x.double(), kernel_size, dilation=dilation, padding=padding, stride=stride)
    b, _, locations = cols.shape
    cols = cols.reshape(b, groups, -1, locations).permute(1, 2, 0, 3)
    cols = cols.reshape(groups, -1, b * locations)
    if bias:
        cols = torch.cat([cols, cols.new_ones(groups, 1, cols.shape[-1])], dim=1)
    return cols @ cols.transpose(1, 2)


def close(actual, expected, rtol, what=""):
    """Norm-wise relative error below ``rtol``; an all-zero expectation must be met exactly."""
    assert actual is not None and actual.shape == expected.shape, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite entries"
    if not expected.any():
        assert not actual.any(), f"{what}: expected all zero"
        return
    err = ((actual.double() - expected).norm() / expected.norm()).item()
    assert err < rtol, f"{what}: relative error {err:.3e} >= {rtol:.1e}"
