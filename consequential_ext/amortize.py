"""Amortised solves for large D: a running (EMA) Gram refactorised every k steps.

Cost per backward of a layer with D rows, P columns (patches) and M outputs:

* Gram ``X Xᵀ``: ``O(D²·P)``, every step (it feeds the running average);
* factorisation of ``A + λI``: ``O(D³)``; exact mode pays it every step, amortised mode
  every ``every`` steps (the Cholesky factor is kept as a buffer);
* applying it to ``G`` (two triangular solves): ``O(M·D²)`` either way.

So amortisation pays off once ``D³ / 3`` dominates ``D²·P + M·D²``, i.e. ``D ≳ 3 (P + M)``.
Without amortisation the library already picks the cheaper of the row (D×D) and column
(P×P, the "N-side" when each sample is one column) systems per call (``matching.cheaper_side``).

The running state lives in buffers of an ``amortizer`` submodule, so it is saved and
restored with the model's ``state_dict``, moves with ``.to()``, and resumes bit-identically.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ._validate import CLayerMixin
from .ops import reference

__all__ = ["GramAmortizer", "amortize"]


class GramAmortizer(nn.Module):
    """EMA of a layer's Gram ``A`` and the Cholesky factor of ``A_ema + λI``.

    shape: the Gram's shape, (D, D) or (groups, D, D). The first step starts the average at
    that step's Gram (no zero-initialisation bias); the factor is recomputed at step 0,
    every, 2·every, ... It is kept rather than the inverse: G lies in the range of A, where
    an explicit inverse loses accuracy as cond², triangular solves as cond.
    """

    def __init__(self, shape, *, every: int, decay: float, device=None,
                 dtype=torch.float32):
        super().__init__()
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1; got {every!r}")
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) \
                or not math.isfinite(decay) or not 0 <= decay < 1:
            raise ValueError(f"decay must be a float in [0, 1); got {decay!r}")
        self.every, self.decay = every, float(decay)
        self.register_buffer("gram", torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("factor", torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("steps", torch.zeros((), device=device, dtype=torch.int64))

    @torch.no_grad()
    def precondition(self, gram: torch.Tensor, grad: torch.Tensor, ridge: float) -> torch.Tensor:
        """``grad @ (A_ema + ridge·I)⁻¹`` after folding this step's mean Gram into the EMA.

        A non-finite Gram (an fp16 overflow) leaves the state untouched and gives a
        non-finite result, so ``GradScaler`` skips the step and the average stays usable.
        """
        if not bool(torch.isfinite(gram).all()):
            return torch.full_like(grad, float("nan"))
        step = int(self.steps)
        gram = gram.to(self.gram.dtype)
        if step == 0:
            self.gram.copy_(gram)
        else:
            self.gram.lerp_(gram, 1.0 - self.decay)
        if step % self.every == 0:
            self.factor.copy_(_ridge_cholesky(self.gram, ridge))
        self.steps += 1
        factor = self.factor.to(grad.dtype)
        return torch.cholesky_solve(grad.transpose(-1, -2), factor).transpose(-1, -2)

    def extra_repr(self):
        return f"shape={tuple(self.gram.shape)}, every={self.every}, decay={self.decay:g}"


def _ridge_cholesky(gram, ridge, max_escalations=12):
    """Lower Cholesky factor of ``gram + λI`` (finite gram), escalating λ ×10 on failure
    with the warning ``ops.ridge_solve`` gives."""
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    lam = ridge
    for attempt in range(max_escalations):
        factor, info = torch.linalg.cholesky_ex(gram + lam * eye)
        if not bool((info != 0).any()):
            if attempt:
                reference.warn_escalated(ridge, lam)
            return factor
        lam *= 10.0
    raise RuntimeError(f"amortize: (EMA gram + ridge*I) is not positive definite even with "
                       f"ridge escalated to {lam:g}")


def check_amortizer(amortizer, gram_shape):
    """``amortizer`` if it fits a layer whose Gram has ``gram_shape`` (checked in forward:
    an exception inside backward is much harder to read)."""
    if amortizer is None:
        return None
    if not isinstance(amortizer, GramAmortizer):
        raise TypeError(f"amortizer must be a GramAmortizer or None; got "
                        f"{type(amortizer).__name__}")
    if tuple(amortizer.gram.shape) != tuple(gram_shape):
        raise ValueError(f"amortizer holds a Gram of shape {tuple(amortizer.gram.shape)}, but "
                         f"this layer's Gram is {tuple(gram_shape)}")
    return amortizer


def amortize(model: nn.Module, *, every: int | None = 10, decay: float = 0.95) -> nn.Module:
    """Give every C-layer of ``model`` (or ``model`` itself) an EMA Gram refreshed every
    ``every`` backward calls; ``every=None`` removes it (exact solves). In place; returns
    ``model``. Build the optimizer after or before, either way: no parameters are added."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, CLayerMixin)]
    if not layers:
        raise ValueError("amortize: model has no CLinear / CConv2d layers (call "
                         "consequentialize first)")
    for layer in layers:
        if every is None:
            layer._modules.pop("amortizer", None)
            continue
        acc = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
        layer.amortizer = GramAmortizer(layer.cx_gram_shape(), every=every, decay=decay,
                                        device=layer.weight.device, dtype=acc)
    return model


def amortizer_of(layer: nn.Module) -> GramAmortizer | None:
    # Read from _modules: a class-level default would shadow the registered submodule.
    return layer._modules.get("amortizer")
