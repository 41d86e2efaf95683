"""Functional C-layers: the autograd.Functions, the only place the rules touch autograd.

Forward is exactly ``F.linear`` / ``F.conv2d``. Backward sends the ordinary gradient to the
input and the matched gradient G (A + λI)⁻¹ (``matching.py``) to weight and bias. Rule
``"backmatch"`` sends the matched input signal instead (``backmatch.py``); rule
``"backmatch-layerwise"`` replaces the solve by Algorithm 1's scalar factors
(``layerwise.py``). Rule ``"sgd"`` bypasses the Function, so its gradients are
bit-identical to the nn layers'.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from . import backmatch, layerwise, matching
from .amortize import check_amortizer
from ._validate import DEFAULT_RIDGE, DEFAULT_RULE, check_ridge, check_rule

__all__ = ["clinear", "cconv2d", "CLinearFunction", "CConv2dFunction"]


class CLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(input, weight, bias, rule, ridge, amortizer=None):
        return F.linear(input, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, rule, ridge, amortizer = inputs
        ctx.save_for_backward(input, weight)
        ctx.has_bias, ctx.rule, ctx.ridge = bias is not None, rule, ridge
        ctx.amortizer = amortizer

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = (grad_output @ weight.to(grad_output.dtype)).to(input.dtype)
            if ctx.rule == "backmatch":
                grad_input = backmatch.match_linear_input(grad_input, weight)
            elif ctx.rule == "backmatch-layerwise":
                grad_input = layerwise.divide_signal(grad_input, layerwise.column_mean_sq(weight))
        if ctx.rule == "backmatch-layerwise":
            grad_weight, grad_bias = layerwise.linear_weight_grads(
                input, grad_output, weight.dtype, ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2])
        elif ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            gw, gb = matching.matched_linear(input.reshape(-1, input.shape[-1]),
                                             grad_output.reshape(-1, grad_output.shape[-1]),
                                             ctx.has_bias, ctx.ridge, amortizer=ctx.amortizer)
            grad_weight = gw.to(weight.dtype)
            grad_bias = gb.to(weight.dtype) if gb is not None else None
        return grad_input, grad_weight, grad_bias, None, None, None


def _explicit_padding(padding, kernel_size, dilation):
    """(top, bottom, left, right) for int / pair / 'same' / 'valid' padding."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        pads = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    ph, pw = _pair(padding)
    return (ph, ph, pw, pw)


class CConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups, rule, ridge,
                amortizer=None):
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups, rule, ridge, amortizer = inputs
        ctx.save_for_backward(input, weight)
        ctx.conf = (_pair(stride), padding, _pair(dilation), groups)
        ctx.has_bias, ctx.rule, ctx.ridge = bias is not None, rule, ridge
        ctx.amortizer = amortizer

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        top, bottom, left, right = _explicit_padding(padding, weight.shape[2:], dilation)
        # 'same' with an even receptive field pads unevenly: pad the excess explicitly so
        # the kernels only ever see symmetric zero padding.
        ph, pw = min(top, bottom), min(left, right)
        extra = (left - pw, right - pw, top - ph, bottom - ph)
        x = F.pad(input, extra) if any(extra) else input
        grad_input = grad_weight = grad_bias = None
        if ctx.rule == "backmatch-layerwise":
            sharing = layerwise.sharing_factor(grad_output)
        if ctx.needs_input_grad[0]:
            grad_x, _, _ = torch.ops.aten.convolution_backward(
                grad_output, x, weight.to(grad_output.dtype), None, list(stride), [ph, pw],
                list(dilation), False, [0, 0], groups, [True, False, False])
            if ctx.rule == "backmatch":
                grad_x = backmatch.match_conv2d_input(grad_x, weight, stride, (ph, pw), dilation,
                                                      groups, grad_output.shape[2:])
            elif ctx.rule == "backmatch-layerwise":
                grad_x = layerwise.divide_signal(grad_x, layerwise.conv2d_input_factor(
                    weight, groups, input.shape[2:], sharing))
            if any(extra):
                grad_x = grad_x[..., extra[2]: grad_x.shape[-2] - extra[3],
                                extra[0]: grad_x.shape[-1] - extra[1]]
            grad_input = grad_x.to(input.dtype)
        if ctx.rule == "backmatch-layerwise":
            grad_weight, grad_bias = layerwise.conv2d_weight_grads(
                x, grad_output, weight, stride, (ph, pw), dilation, groups, sharing,
                ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        elif ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            gw, gb = matching.matched_conv2d(x, grad_output, weight.shape, stride, (ph, pw),
                                             dilation, groups, ctx.has_bias, ctx.ridge,
                                             amortizer=ctx.amortizer)
            grad_weight = gw.to(weight.dtype)
            grad_bias = gb.to(weight.dtype) if gb is not None else None
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def clinear(input, weight, bias=None, *, rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, amortizer=None):
    """``F.linear`` whose backward gives weight/bias the matched gradient of ``rule``
    (with ``amortizer``, an ``amortize.GramAmortizer``: from its running Gram)."""
    check_rule(rule)
    ridge = check_ridge(ridge)
    if rule == "sgd":
        return F.linear(input, weight, bias)
    d = weight.shape[1] + (bias is not None)
    amortizer = check_amortizer(amortizer, (d, d))
    return CLinearFunction.apply(input, weight, bias, rule, ridge, amortizer)


def cconv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
            rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, amortizer=None):
    """``F.conv2d`` (zero padding: int, pair, 'same' or 'valid') whose backward gives
    weight/bias the matched gradient of ``rule`` (``amortizer``: as in ``clinear``)."""
    check_rule(rule)
    ridge = check_ridge(ridge)
    if isinstance(padding, str) and padding not in ("same", "valid"):
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid'; got {padding!r}")
    if rule == "sgd":
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    d = weight[0].numel() + (bias is not None)
    amortizer = check_amortizer(amortizer, (groups, d, d))
    if input.dim() == 3:  # unbatched (C, H, W), as F.conv2d accepts: one sample
        return CConv2dFunction.apply(input.unsqueeze(0), weight, bias, stride, padding, dilation,
                                     groups, rule, ridge, amortizer).squeeze(0)
    return CConv2dFunction.apply(input, weight, bias, stride, padding, dilation, groups, rule,
                                 ridge, amortizer)
