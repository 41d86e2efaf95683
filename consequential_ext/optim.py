"""The layer-wise adaptive-rate baselines of paper 2 (§1.1, §4.1), for any model.

* ``LARS`` (You et al., 2017): layer l steps with rate η · ‖W_l‖ / ‖δW_l‖.
* ``LSALR`` (Singh et al., 2015): layer l steps with rate η · (1 + log(1 + 1/‖δW_l‖)).

A "layer" is one parameter tensor (a weight, a bias), as in common LARS implementations.
δW is the gradient after weight decay (paper 2 applies the decay first), the rate
multiplies it and momentum accumulates the scaled step (You et al.'s Algorithm 1):
``v ← µ v + rate·δW``, ``W ← W − v`` (Nesterov: ``W ← W − (rate·δW + µ v)``).

No maintained package provides both faithfully: ``timm.optim.Lars`` is LARS with a trust
coefficient and the decay in the ratio's denominator (a different rate), and nothing
maintained implements LSALR; hence this module.
"""
from __future__ import annotations

import math

import torch

__all__ = ["LARS", "LSALR"]


def _check_nonnegative(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite float >= 0; got {value!r}")
    return float(value)


class _LayerwiseRateSGD(torch.optim.Optimizer):
    """SGD with (Nesterov) momentum and weight decay whose step is ``rate(W, δW) · δW``."""

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) \
                or lr <= 0:
            raise ValueError(f"lr must be a finite float > 0; got {lr!r}")
        momentum = _check_nonnegative(momentum, "momentum")
        weight_decay = _check_nonnegative(weight_decay, "weight_decay")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        super().__init__(params, dict(lr=float(lr), momentum=momentum, nesterov=bool(nesterov),
                                      weight_decay=weight_decay))

    @staticmethod
    def _rate(lr, param_norm, grad_norm):
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["weight_decay"]:
                    d = d.add(p, alpha=group["weight_decay"])
                step = d * self._rate(group["lr"], p.norm(), d.norm())
                if group["momentum"]:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = step.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(step)
                    step = step.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                p.sub_(step)
        return loss


class LARS(_LayerwiseRateSGD):
    """Per-tensor rate lr · ‖W‖ / ‖δW‖; lr itself where either norm is 0 (a zero-initialised
    bias must still move, and a zero gradient moves nothing anyway)."""

    @staticmethod
    def _rate(lr, param_norm, grad_norm):
        usable = (param_norm > 0) & (grad_norm > 0)
        ratio = param_norm / torch.where(usable, grad_norm, torch.ones_like(grad_norm))
        return lr * torch.where(usable, ratio, torch.ones_like(ratio))


class LSALR(_LayerwiseRateSGD):
    """Per-tensor rate lr · (1 + log(1 + 1/‖δW‖)); lr where δW = 0 (nothing moves)."""

    @staticmethod
    def _rate(lr, param_norm, grad_norm):
        safe = torch.where(grad_norm > 0, grad_norm, torch.ones_like(grad_norm))
        boost = torch.log1p(1.0 / safe)
        return lr * (1.0 + torch.where(grad_norm > 0, boost, torch.zeros_like(boost)))
