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

from . import backmatch, layerwise
from ._validate import DEFAULT_RULE, RuleAttribute

__all__ = ["BackMatchBatchNorm1d", "BackMatchBatchNorm2d", "BackMatchBatchNormFunction"]

_MATCHING_RULES = ("backmatch", "backmatch-layerwise")


class BackMatchBatchNormFunction(torch.autograd.Function):
    """y = bn_forward(input); backward per ``rule`` (``"backmatch"`` or the layerwise one)."""

    @staticmethod
    def forward(input, weight, bias, bn_forward, batch_stats, running, eps, rule, producer_sq):
        # bn_forward is nn's own forward: same output bits, same running-statistics update.
        return bn_forward(input)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, weight, bias, _, batch_stats, running, eps, rule, producer_sq = inputs
        ctx.save_for_backward(input, weight)
        ctx.batch_stats, ctx.running, ctx.eps = batch_stats, running, eps
        ctx.rule, ctx.producer_sq, ctx.has_bias = rule, producer_sq, bias is not None

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        work = torch.float64 if input.dtype == torch.float64 else torch.float32
        x, gy = input.to(work), grad_output.to(work)
        dims = [0] + list(range(2, x.dim()))
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if ctx.batch_stats:
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
        else:
            mean, var = (r.to(work) for r in ctx.running)
        std = (var + ctx.eps).sqrt()
        x_hat = (x - mean.reshape(shape)) / std.reshape(shape)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if ctx.rule == "backmatch":
                grad_input = backmatch.match_batchnorm_input(gy, std, weight)
            else:
                gamma = 1.0 if weight is None else weight.to(work).reshape(shape)
                centred = gy
                if ctx.batch_stats:  # BP through the batch mean and variance as well
                    centred = gy - gy.mean(dims, keepdim=True) \
                        - x_hat * (gy * x_hat).mean(dims, keepdim=True)
                grad_input = gamma * centred / std.reshape(shape) \
                    * layerwise.batchnorm_factor(ctx.producer_sq, var, weight)
            grad_input = grad_input.to(input.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (gy * x_hat).sum(dims).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = gy.sum(dims).to(weight.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None


class _BackMatchBatchNorm(RuleAttribute):
    """The rule-dependent forward."""

    def forward(self, input):
        bn_forward = super().forward
        if self.rule not in _MATCHING_RULES or not torch.is_grad_enabled():
            return bn_forward(input)
        batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        running = None if batch_stats else (self.running_mean.clone(), self.running_var.clone())
        producer_sq = None
        if self.rule == "backmatch-layerwise":
            producer = layerwise.producer_weight(input)
            producer_sq = None if producer is None else layerwise.row_mean_sq(producer)
        return BackMatchBatchNormFunction.apply(input, self.weight, self.bias, bn_forward,
                                                batch_stats, running, self.eps, self.rule,
                                                producer_sq)

    def extra_repr(self):
        return f"{super().extra_repr()}, rule={self.rule!r}"


class BackMatchBatchNorm1d(_BackMatchBatchNorm, nn.BatchNorm1d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, rule=DEFAULT_RULE):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.rule = rule


class BackMatchBatchNorm2d(_BackMatchBatchNorm, nn.BatchNorm2d):
    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, rule=DEFAULT_RULE):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.rule = rule
