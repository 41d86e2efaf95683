"""Drop-in C-layers: nn.Linear / nn.Conv2d subclasses whose weight gradient is matched.

Same parameters, same state_dict keys, ``isinstance`` still true, forward bit-identical to
the nn layer; only backward differs (see ``functional.py``).
"""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

from . import functional as CF
from .amortize import amortizer_of
from ._validate import DEFAULT_RIDGE, DEFAULT_RULE, CLayerMixin

__all__ = ["CLinear", "CConv2d", "CLinearLike"]


class CLinear(CLayerMixin, nn.Linear):
    """``nn.Linear`` whose weight and bias get the gradient of ``rule`` (default: the matched
    gradient ``G (A + λI)⁻¹``, docs/design.md §2); forward is bit-identical to nn.Linear.

    rule: one of ``cx.RULES``; ridge: λ, a finite float > 0 relative to ``A = X Xᵀ / N``.
    Both are attributes validated on every assignment (ValueError naming them). Any number of
    leading input dims; N is the number of input rows.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.rule, self.ridge = rule, ridge

    def cx_gram_shape(self):
        d = self.in_features + (self.bias is not None)
        return (d, d)

    def forward(self, input):
        return CF.clinear(input, self.weight, self.bias, rule=self.rule, ridge=self.ridge,
                          amortizer=amortizer_of(self))

    def extra_repr(self):
        return f"{super().extra_repr()}, {self._cx_repr()}"


class CConv2d(CLayerMixin, nn.Conv2d):
    """``nn.Conv2d`` whose weight and bias get the gradient of ``rule`` (default: the matched
    gradient ``G (A + λI)⁻¹`` with X the im2col patches per group, N the batch size;
    docs/design.md §2); forward is bit-identical to nn.Conv2d.

    Every nn.Conv2d argument works (stride, padding int / pair / 'same' / 'valid', dilation,
    groups, bias, every padding_mode; batched or unbatched input). rule, ridge: as in
    ``CLinear``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *,
                 rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        self.rule, self.ridge = rule, ridge

    def cx_gram_shape(self):
        d = self.weight[0].numel() + (self.bias is not None)
        return (self.groups, d, d)

    def forward(self, input):
        # The same two steps as nn.Conv2d._conv_forward, so outputs are bit-identical.
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        return CF.cconv2d(input, self.weight, self.bias, self.stride, padding, self.dilation,
                          self.groups, rule=self.rule, ridge=self.ridge,
                          amortizer=amortizer_of(self))

    def extra_repr(self):
        return f"{super().extra_repr()}, {self._cx_repr()}"


class CLinearLike(CLayerMixin):
    """Mixin of the C-classes ``registry.register_layer`` makes for linear-like layers: the
    module's own forward (bit-identical), CLinear's backward on the weight viewed as (out, in).

    ``_cx_kind`` (a ``registry.LayerKind``) names the weight and bias attributes and whether
    the weight is stored transposed.
    """

    _cx_kind = None

    def _cx_weight_bias(self):
        kind = self._cx_kind
        return getattr(self, kind.weight), getattr(self, kind.bias, None) if kind.bias else None

    def cx_gram_shape(self):
        weight, bias = self._cx_weight_bias()
        d = weight.shape[0 if self._cx_kind.transposed else 1] + (bias is not None)
        return (d, d)

    def forward(self, input):
        weight, bias = self._cx_weight_bias()
        return CF.clinear_like(input, weight, bias, super().forward,
                               transposed=self._cx_kind.transposed, rule=self.rule,
                               ridge=self.ridge, amortizer=amortizer_of(self))

    def extra_repr(self):
        return ", ".join(filter(None, [super().extra_repr(), self._cx_repr()]))
