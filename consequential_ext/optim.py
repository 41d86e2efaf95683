"""The layer-wise adaptive-rate baselines of paper 2 (§1.1, §4.1), for any model.

* ``LARS`` (You et al., 2017, Algorithm 1): layer l steps with rate
  γ · η · ‖W_l‖ / (‖∇L(W_l)‖ + β‖W_l‖), γ the global learning rate, η the trust coefficient
  (0.001 in their paper), β the weight decay. Without η a global rate of 2 (paper 2's
  choice) moves every layer by twice its own norm per step and diverges.
* ``LSALR`` (Singh et al., 2015): layer l steps with rate γ · (1 + log(1 + 1/‖δW_l‖)).

A "layer" is one parameter tensor (a weight, a bias), as in common LARS implementations.
δW = ∇L + β·W is the gradient after weight decay; the rate multiplies it and momentum
accumulates the scaled step (You et al.'s Algorithm 1): ``v ← µ v + rate·δW``,
``W ← W − v`` (Nesterov: ``W ← W − (rate·δW + µ v)``).

Nothing maintained implements LSALR, and ``timm.optim.Lars`` would add a dependency for one
class; hence this module.
"""
from __future__ import annotations

import math
import numbers

import torch

__all__ = ["LARS", "LSALR"]


def _finite(value, name, positive):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite float {'>' if positive else '>='} 0; "
                         f"got {value!r}")
    return float(value)


def _norm(t):
    """``‖t‖`` in float32 or wider: in float16 a norm above 65504 is inf and ``1/‖t‖`` of a
    norm below 1/65504 overflows, so the rate would be inf or NaN for finite values (the
    rate is then cast back where it multiplies δW, whose dtype the step keeps)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.norm()


class _LayerwiseRateSGD(torch.optim.Optimizer):
    """SGD with (Nesterov) momentum and weight decay whose step is ``rate(W, δW) · δW``."""

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0, **extra):
        defaults = self._checked(dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      weight_decay=weight_decay, **extra), "")
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        """torch's, then each group's own settings checked as the defaults are."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        try:
            self._checked(self.param_groups[index], f"param group {index}: ")
        except ValueError:
            self.param_groups.pop()
            raise

    def _checked(self, group, where):
        """``group`` with its settings validated (ValueError naming them) and made floats."""
        group["lr"] = _finite(group["lr"], f"{where}lr", positive=True)
        for name in ("momentum", "weight_decay"):
            group[name] = _finite(group[name], where + name, positive=False)
        if group["nesterov"] not in (True, False):   # bool() would make "False" True
            raise ValueError(f"{where}nesterov must be True or False; got {group['nesterov']!r}")
        group["nesterov"] = bool(group["nesterov"])
        if group["nesterov"] and group["momentum"] == 0:
            raise ValueError(f"{where}nesterov=True needs momentum > 0")
        return group

    def _rate(self, group, param, grad, decayed):
        """The per-tensor scalar that multiplies δW (``decayed``); ``grad`` is ∇L alone."""
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
                step = d * self._rate(group, p, p.grad, d)
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
    """Per-tensor rate lr · η · ‖W‖ / (‖∇L‖ + weight_decay · ‖W‖), η = ``trust_coefficient``
    — with weight decay also where ∇L = 0 (lr · η / weight_decay there, the formula's limit: the
    step does not jump at a zero gradient); lr itself where ‖W‖ = 0 (a zero-initialised bias
    must still move) or where ∇L = 0 without decay (δW = 0: nothing moves)."""

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0,
                 trust_coefficient=0.001):
        super().__init__(params, lr, momentum, nesterov, weight_decay,
                         trust_coefficient=trust_coefficient)

    def _checked(self, group, where):
        group["trust_coefficient"] = _finite(group["trust_coefficient"],
                                             f"{where}trust_coefficient", positive=True)
        return super()._checked(group, where)

    def _rate(self, group, param, grad, decayed):
        param_norm, grad_norm = _norm(param), _norm(grad)
        denom = grad_norm + group["weight_decay"] * param_norm
        usable = (param_norm > 0) & (denom > 0)
        ratio = group["trust_coefficient"] * param_norm / torch.where(usable, denom,
                                                                      torch.ones_like(denom))
        return group["lr"] * torch.where(usable, ratio, torch.ones_like(ratio))


class LSALR(_LayerwiseRateSGD):
    """Per-tensor rate lr · (1 + log(1 + 1/‖δW‖)); lr where δW = 0 (nothing moves)."""

    def __init__(self, params, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
        # Explicit, as LARS's: the base's ``**extra`` would swallow a misspelt or unsupported
        # option (weight_decy=, maximize=True) instead of raising TypeError.
        super().__init__(params, lr, momentum, nesterov, weight_decay)

    def _rate(self, group, param, grad, decayed):
        grad_norm = _norm(decayed)
        safe = torch.where(grad_norm > 0, grad_norm, torch.ones_like(grad_norm))
        boost = torch.log1p(1.0 / safe)
        return group["lr"] * (1.0 + torch.where(grad_norm > 0, boost, torch.zeros_like(boost)))
