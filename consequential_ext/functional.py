"""Functional C-layers: one autograd.Function per layer kind, the only place rules meet autograd.

Forward is exactly ``F.linear`` / ``F.conv2d``. Backward builds the layer kind's primitives
(``gradients.py``) and asks the layer's rule (``rules.py``) for the signal to the input and
the weight/bias gradients; no Function branches on a rule. A rule that ``bypass``es (``"sgd"``)
skips the Function, so its gradients are bit-identical to the nn layers'.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair, _single, _triple

from .amortize import check_amortizer
from .gradients import Conv2dGradients, LinearGradients
from .gradients import (Conv1dGradients, Conv3dGradients, ConvTranspose1dGradients,
                        ConvTranspose2dGradients)
from .rules import rule_named
from ._validate import DEFAULT_RIDGE, DEFAULT_RULE, check_ridge

__all__ = ["clinear", "cconv2d", "clinear_like", "CLinearFunction", "CConv2dFunction",
           "CLinearLikeFunction"]
__all__ += ["cconv1d", "cconv3d", "cconv_transpose1d", "cconv_transpose2d", "CConv1dFunction",
            "CConv3dFunction", "CConvTranspose1dFunction", "CConvTranspose2dFunction"]


def _apply_rule(ctx, layer):
    """(grad_input, grad_weight, grad_bias) of ``layer`` under the rule saved in ``ctx``."""
    grad_input = ctx.rule.input_signal(layer) if ctx.needs_input_grad[0] else None
    grad_weight, grad_bias = ctx.rule.weight_grads(layer)
    return grad_input, grad_weight, grad_bias


def _save_common(ctx, input, weight, bias, rule, ridge, amortizer):
    # Both Functions save (input, weight): layerwise.producer_weight reads index 1.
    ctx.save_for_backward(input, weight)
    ctx.has_bias, ctx.rule, ctx.ridge, ctx.amortizer = (bias is not None, rule_named(rule), ridge,
                                                        amortizer)


def _needs(ctx):
    return dict(has_bias=ctx.has_bias, needs_weight=ctx.needs_input_grad[1],
                needs_bias=ctx.has_bias and ctx.needs_input_grad[2], ridge=ctx.ridge,
                amortizer=ctx.amortizer)


class CLinearFunction(torch.autograd.Function):
    """``F.linear`` forward; backward by the rule (``clinear`` is the entry point)."""
    cx_saved_weight_index = 1

    @staticmethod
    def forward(input, weight, bias, rule, ridge, amortizer=None):
        return F.linear(input, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, rule, ridge, amortizer = inputs
        _save_common(ctx, input, weight, bias, rule, ridge, amortizer)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        layer = LinearGradients(input, weight, grad_output, **_needs(ctx))
        return *_apply_rule(ctx, layer), None, None, None


class CLinearLikeFunction(torch.autograd.Function):
    """A registered linear-like layer: forward is the module's own ``module_forward``,
    backward CLinear's on ``weight_view``, the weight as (out, in) (``clinear_like``)."""
    cx_saved_weight_index = 1

    @staticmethod
    def forward(input, weight_view, bias, module_forward, rule, ridge, amortizer=None):
        return module_forward(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight_view, bias, _, rule, ridge, amortizer = inputs
        _save_common(ctx, input, weight_view, bias, rule, ridge, amortizer)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight_view = ctx.saved_tensors
        layer = LinearGradients(input, weight_view, grad_output, **_needs(ctx))
        return *_apply_rule(ctx, layer), None, None, None, None


class CConv2dFunction(torch.autograd.Function):
    """``F.conv2d`` forward; backward by the rule (``cconv2d`` is the entry point)."""
    cx_saved_weight_index = 1

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups, rule, ridge,
                amortizer=None):
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups, rule, ridge, amortizer = inputs
        _save_common(ctx, input, weight, bias, rule, ridge, amortizer)
        padding = padding if isinstance(padding, str) else _pair(padding)
        ctx.conf = (_pair(stride), padding, _pair(dilation), groups)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        layer = Conv2dGradients(input, weight, grad_output, *ctx.conf, **_needs(ctx))
        return *_apply_rule(ctx, layer), None, None, None, None, None, None, None


def clinear(input, weight, bias=None, *, rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, amortizer=None):
    """``F.linear`` whose backward gives weight/bias the matched gradient of ``rule``
    (with ``amortizer``, an ``amortize.GramAmortizer``: from its running Gram).

    Raises ValueError for an unknown ``rule`` or a ridge that is not a finite float > 0,
    TypeError/ValueError for an amortizer of the wrong type or Gram shape.
    """
    bypass = rule_named(rule).bypass
    ridge = check_ridge(ridge)
    if bypass:
        return F.linear(input, weight, bias)
    d = weight.shape[1] + (bias is not None)
    amortizer = check_amortizer(amortizer, (d, d))
    return CLinearFunction.apply(input, weight, bias, rule, ridge, amortizer)


def cconv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
            rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, amortizer=None):
    """``F.conv2d`` (zero padding: int, pair, 'same' or 'valid') whose backward gives
    weight/bias the matched gradient of ``rule`` (``amortizer``: as in ``clinear``).

    Raises ValueError for an unknown ``rule``, a bad ``ridge`` or a padding string other
    than 'same' / 'valid'; TypeError/ValueError for a mismatched amortizer.
    """
    bypass = rule_named(rule).bypass
    ridge = check_ridge(ridge)
    if isinstance(padding, str) and padding not in ("same", "valid"):
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid'; got {padding!r}")
    if bypass:
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)
    d = weight[0].numel() + (bias is not None)
    amortizer = check_amortizer(amortizer, (groups, d, d))
    if input.dim() == 3:  # unbatched (C, H, W), as F.conv2d accepts: one sample
        return CConv2dFunction.apply(input.unsqueeze(0), weight, bias, stride, padding, dilation,
                                     groups, rule, ridge, amortizer).squeeze(0)
    return CConv2dFunction.apply(input, weight, bias, stride, padding, dilation, groups, rule,
                                 ridge, amortizer)


def clinear_like(input, weight, bias, module_forward, *, transposed=False, rule=DEFAULT_RULE,
                 ridge=DEFAULT_RIDGE, amortizer=None):
    """``module_forward(input)`` — a linear-like layer's own forward, ``x W_viewᵀ + b`` over
    the last dim — whose backward is CLinear's on ``W_view``: ``weight`` (out, in), or its
    transpose when ``transposed`` (a weight stored (in, out), as Hugging Face's Conv1D).

    Raises ValueError for an unknown ``rule`` or a bad ``ridge``; TypeError/ValueError for a
    mismatched amortizer.
    """
    bypass = rule_named(rule).bypass
    ridge = check_ridge(ridge)
    if bypass:
        return module_forward(input)
    view = weight.t() if transposed else weight
    d = view.shape[1] + (bias is not None)
    amortizer = check_amortizer(amortizer, (d, d))
    # The gradient reaches ``weight`` through the view (autograd transposes it back).
    return CLinearLikeFunction.apply(input, view, bias, module_forward, rule, ridge, amortizer)


def _conv_conf(stride, padding, dilation, groups, tuple_of):
    padding = padding if isinstance(padding, str) else tuple_of(padding)
    return (tuple_of(stride), padding, tuple_of(dilation), groups)


def _transpose_conf(stride, padding, output_padding, groups, dilation, tuple_of):
    return (tuple_of(stride), tuple_of(padding), tuple_of(output_padding), tuple_of(dilation),
            groups)


class CConv1dFunction(torch.autograd.Function):
    """``F.conv1d`` forward; backward by the rule (``cconv1d`` is the entry point)."""
    cx_saved_weight_index = 1

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups, rule, ridge,
                amortizer=None):
        return F.conv1d(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups, rule, ridge, amortizer = inputs
        _save_common(ctx, input, weight, bias, rule, ridge, amortizer)
        ctx.conf = _conv_conf(stride, padding, dilation, groups, _single)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        layer = Conv1dGradients(input, weight, grad_output, *ctx.conf, **_needs(ctx))
        return *_apply_rule(ctx, layer), None, None, None, None, None, None, None


class CConv3dFunction(torch.autograd.Function):
    """``F.conv3d`` forward; backward by the rule (``cconv3d`` is the entry point)."""
    cx_saved_weight_index = 1

    @staticmethod
    def forward(input, weight, bias, stride, padding, dilation, groups, rule, ridge,
                amortizer=None):
        return F.conv3d(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, stride, padding, dilation, groups, rule, ridge, amortizer = inputs
        _save_common(ctx, input, weight, bias, rule, ridge, amortizer)
        ctx.conf = _conv_conf(stride, padding, dilation, groups, _triple)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        layer = Conv3dGradients(input, weight, grad_output, *ctx.conf, **_needs(ctx))
        return *_apply_rule(ctx, layer), None, None, None, None, None, None, None


class CConvTranspose1dFunction(torch.autograd.Function):
    """``F.conv_transpose1d`` forward; backward by the rule (``cconv_transpose1d`` is the
    entry point)."""
    cx_saved_weight_index = 1

    @staticmethod
    def forward(input, weight, bias, stride, padding, output_padding, groups, dilation, rule,
                ridge, amortizer=None):
        return F.conv_transpose1d(input, weight, bias, stride, padding, output_padding, groups,
                                  dilation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, *geometry, rule, ridge, amortizer = inputs
        _save_common(ctx, input, weight, bias, rule, ridge, amortizer)
        ctx.conf = _transpose_conf(*geometry, _single)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        layer = ConvTranspose1dGradients(input, weight, grad_output, *ctx.conf, **_needs(ctx))
        return *_apply_rule(ctx, layer), None, None, None, None, None, None, None, None


class CConvTranspose2dFunction(torch.autograd.Function):
    """``F.conv_transpose2d`` forward; backward by the rule (``cconv_transpose2d`` is the
    entry point)."""
    cx_saved_weight_index = 1

    @staticmethod
    def forward(input, weight, bias, stride, padding, output_padding, groups, dilation, rule,
                ridge, amortizer=None):
        return F.conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups,
                                  dilation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, *geometry, rule, ridge, amortizer = inputs
        _save_common(ctx, input, weight, bias, rule, ridge, amortizer)
        ctx.conf = _transpose_conf(*geometry, _pair)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        layer = ConvTranspose2dGradients(input, weight, grad_output, *ctx.conf, **_needs(ctx))
        return *_apply_rule(ctx, layer), None, None, None, None, None, None, None, None


def _cconv(function, conv, spatial, gram_shape, input, weight, bias, geometry, rule, ridge,
           amortizer):
    """Validate, then ``conv`` itself for a bypassing rule, else ``function`` (an unbatched
    input — ``spatial`` + 1 dims, as the F functions accept — as one sample)."""
    bypass = rule_named(rule).bypass
    ridge = check_ridge(ridge)
    if bypass:
        return conv(input, weight, bias, *geometry)
    amortizer = check_amortizer(amortizer, gram_shape)
    if input.dim() == spatial + 1:
        return function.apply(input.unsqueeze(0), weight, bias, *geometry, rule, ridge,
                              amortizer).squeeze(0)
    return function.apply(input, weight, bias, *geometry, rule, ridge, amortizer)


def _check_padding(padding):
    if isinstance(padding, str) and padding not in ("same", "valid"):
        raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid'; got {padding!r}")


def _conv_gram_shape(weight, bias, groups):
    d = weight[0].numel() + (bias is not None)
    return (groups, d, d)


def cconv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
            rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, amortizer=None):
    """``F.conv1d`` (zero padding: int, 1-tuple, 'same' or 'valid') whose backward gives
    weight/bias the matched gradient of ``rule``: X every patch of every sample, per group,
    N the batch size; computed as ``cconv2d``'s on a unit height (exact).

    Raises ValueError for an unknown ``rule``, a bad ``ridge`` or a padding string other
    than 'same' / 'valid'; TypeError/ValueError for a mismatched amortizer.
    """
    _check_padding(padding)
    return _cconv(CConv1dFunction, F.conv1d, 1, _conv_gram_shape(weight, bias, groups), input,
                  weight, bias, (stride, padding, dilation, groups), rule, ridge, amortizer)


def cconv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
            rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, amortizer=None):
    """``F.conv3d`` (zero padding: int, triple, 'same' or 'valid') whose backward gives
    weight/bias the matched gradient of ``rule``: X every 3-D patch of every sample, per
    group, N the batch size (``gradients.Conv3dGradients``: the ``im2col_gram`` kernels on a
    fold of the depth taps into channels).

    Raises ValueError for an unknown ``rule``, a bad ``ridge`` or a padding string other
    than 'same' / 'valid'; TypeError/ValueError for a mismatched amortizer.
    """
    _check_padding(padding)
    return _cconv(CConv3dFunction, F.conv3d, 3, _conv_gram_shape(weight, bias, groups), input,
                  weight, bias, (stride, padding, dilation, groups), rule, ridge, amortizer)


def _transpose_gram_shape(weight, groups):
    channels = weight.shape[0] // groups
    return (groups, channels, channels)


def cconv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                      dilation=1, *, rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, amortizer=None):
    """``F.conv_transpose1d`` whose backward gives weight/bias the gradient of ``rule``,
    matched on the pre-overlap blocks as in ``cconv_transpose2d`` (on a unit height, exact).

    Raises ValueError for an unknown ``rule`` or a bad ``ridge``; TypeError/ValueError for a
    mismatched amortizer (its Gram is (groups, C_in/groups, C_in/groups)).
    """
    return _cconv(CConvTranspose1dFunction, F.conv_transpose1d, 1,
                  _transpose_gram_shape(weight, groups), input, weight, bias,
                  (stride, padding, output_padding, groups, dilation), rule, ridge, amortizer)


def cconv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                      dilation=1, *, rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, amortizer=None):
    """``F.conv_transpose2d`` whose backward gives weight/bias the gradient of ``rule``,
    matched on the pre-overlap blocks ``Z_p = Wᵀ x_p`` (docs/design.md §2): X the input's
    channel vectors (one column per input pixel), N the batch size, weight.grad
    ``(G (A + λI)⁻¹)ᵀ``; the bias, added after the overlap, ``g_b / (H_out·W_out + λ)``.

    Raises ValueError for an unknown ``rule`` or a bad ``ridge``; TypeError/ValueError for a
    mismatched amortizer (its Gram is (groups, C_in/groups, C_in/groups)).
    """
    return _cconv(CConvTranspose2dFunction, F.conv_transpose2d, 2,
                  _transpose_gram_shape(weight, groups), input, weight, bias,
                  (stride, padding, output_padding, groups, dilation), rule, ridge, amortizer)
