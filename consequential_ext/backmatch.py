"""Exact back-matching signals (paper 2, §2): what rule ``"backmatch"`` sends to the layer below.

Each input unit is matched on its own against the output signal, a scalar least-squares
problem ``min ‖δb − w δ'a‖²`` per unit (eq. 11), whose solution is the ordinary BP value
divided by the squared norm of the weights that touch the unit (eqs. 12, 14, 22). Where no
weight touches a unit (a zero column, a location a stride skips), the minimum-norm solution
0 is sent: the ordinary value is 0 there as well, so nothing is lost.
"""
from __future__ import annotations

import torch

from .ops.reference import accumulate_dtype

__all__ = ["match_linear_input", "match_conv2d_input", "match_batchnorm_input"]


def _divide_or_zero(numerator, denominator):
    nonzero = denominator != 0
    quotient = numerator / torch.where(nonzero, denominator, torch.ones_like(denominator))
    return torch.where(nonzero, quotient, torch.zeros_like(quotient))


def match_linear_input(grad_input, weight):
    """Eq. 12: δ'a_j = (w_jᵀ w_j)⁻¹ w_jᵀ δb, w_j the j-th column of W (out × in).

    grad_input: the ordinary BP value wⱼᵀ δb, shape (..., in).
    """
    work = accumulate_dtype(grad_input.dtype)
    column_sq = weight.to(work).square().sum(0)                       # (in,)
    return _divide_or_zero(grad_input.to(work), column_sq).to(grad_input.dtype)


def match_conv2d_input(grad_input, weight, stride, padding, dilation, groups, output_hw):
    """Eq. 22, exact: each input location's BP value over the squared norm of the weights
    that touch it.

    The norm at location (j, u) is Σ over the outputs (k, u') that read (j, u) of
    W[k, j, v]², v the kernel offset linking u to u': a transposed convolution of ones with
    the squared weights, which counts padding, stride and borders exactly.
    grad_input: (B, C, H, W), the ordinary value on the (symmetrically) padded input; any
    number of spatial dims works alike (Conv3d passes (B, C, D, H, W)).
    """
    work = accumulate_dtype(grad_input.dtype)
    sq = weight.to(work).square()
    ones = torch.ones((1, weight.shape[0]) + tuple(output_hw), dtype=work,
                      device=grad_input.device)
    probe = torch.empty((1,) + tuple(grad_input.shape[1:]), dtype=work, device=grad_input.device)
    touch_sq, _, _ = torch.ops.aten.convolution_backward(
        ones, probe, sq, None, list(stride), list(padding), list(dilation), False,
        [0] * len(stride), groups, [True, False, False])
    return _divide_or_zero(grad_input.to(work), touch_sq).to(grad_input.dtype)


def match_batchnorm_input(grad_output, std, weight):
    """Eq. 26, δ'a_k = δb_k · √Var[a_k], generalised to an affine γ: δb_k · σ_k / γ_k.

    std: (C,) the σ = √(var + eps) the forward divided by; weight: γ (C,) or None
    (identity affine, the paper's setting). Channels are dim 1 of ``grad_output``.
    """
    work = accumulate_dtype(grad_output.dtype)
    scale = std.to(work) if weight is None else _divide_or_zero(std.to(work), weight.to(work))
    shape = (1, -1) + (1,) * (grad_output.dim() - 2)
    return (grad_output.to(work) * scale.reshape(shape)).to(grad_output.dtype)
