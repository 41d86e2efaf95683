"""Batch norm under the back-matching rules (paper 2, §2.3 and eq. 36).

``BackMatchBatchNorm1d`` / ``2d`` subclass the nn layers (same parameters, buffers,
state_dict, forward bit-identical, running statistics updated the same way) and change only
the signal sent to their input:

* ``"backmatch"``: the matched signal of eq. 26, δb · σ / γ (σ the standard deviation the
  forward divided by), in place of BP's;
* ``"backmatch-layerwise"``: BP's signal times eq. 36's factor ‖W‖²_{2,µ} of the C-layer
  feeding the norm (found through the autograd graph at forward time), which is how
  Algorithm 1's backward factor m crosses a batch norm (see ``layerwise.py``);
* any other rule: exactly nn.BatchNorm.

γ and β, when present, get their ordinary gradients from the signal the norm receives.
``consequentialize(model, rule=..., batchnorm=True)`` swaps existing nn batch norms in.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .functional import _bypassed
from .gradients import BatchNormGradients
from .rules import rule_named
from ._validate import DEFAULT_RULE, RuleAttribute

__all__ = ["BackMatchBatchNorm1d", "BackMatchBatchNorm2d", "BackMatchBatchNormFunction"]


class BackMatchBatchNormFunction(torch.autograd.Function):
    """y = bn_forward(input); the input signal of ``rule`` in backward, ordinary γ/β grads."""

    @staticmethod
    def forward(ctx, input, weight, bias, bn_forward, batch_stats, running, eps, rule,
                producer_sq):
        ctx.save_for_backward(input, weight)
        ctx.batch_stats, ctx.running, ctx.eps = batch_stats, running, eps
        ctx.rule, ctx.producer_sq, ctx.has_bias = rule_named(rule), producer_sq, bias is not None
        # bn_forward is nn's own forward: same output bits, same running-statistics update.
        return bn_forward(input)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        layer = BatchNormGradients(input, weight, grad_output, batch_stats=ctx.batch_stats,
                                   running=ctx.running, eps=ctx.eps, producer_sq=ctx.producer_sq)
        grad_input = ctx.rule.input_signal(layer) if ctx.needs_input_grad[0] else None
        grad_weight, grad_bias = layer.affine_grads(
            weight is not None and ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2])
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class _BackMatchBatchNorm(RuleAttribute):
    """The rule-dependent forward."""

    def forward(self, input):
        bn_forward = super().forward
        rule = rule_named(self.rule)
        # torch.export: nn's forward, as a C-layer's (functional._bypassed): an exported
        # program keeps no autograd.Function backward (strict export would cut the gradient).
        if not rule.changes_batchnorm or not torch.is_grad_enabled() or _bypassed(self.rule,
                                                                                   input):
            return bn_forward(input)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        running = None if batch_stats else (self.running_mean.clone(), self.running_var.clone())
        return BackMatchBatchNormFunction.apply(input, self.weight, self.bias, bn_forward,
                                                batch_stats, running, self.eps, self.rule,
                                                rule.batchnorm_forward_state(input))

    def extra_repr(self):
        return f"{super().extra_repr()}, rule={self.rule!r}"


class BackMatchBatchNorm1d(_BackMatchBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose input signal follows ``rule`` (module docstring); forward,
    running statistics and γ/β gradients are nn's. rule: one of ``cx.RULES``, validated."""
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, rule=DEFAULT_RULE):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.rule = rule


class BackMatchBatchNorm2d(_BackMatchBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose input signal follows ``rule``; as ``BackMatchBatchNorm1d``."""
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, rule=DEFAULT_RULE):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.rule = rule
