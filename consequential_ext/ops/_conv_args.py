"""Checks of an im2col_gram call's convolution geometry, shared by every backend's entry."""
from __future__ import annotations

import numbers

import torch


_INT64 = range(-2 ** 63, 2 ** 63)    # what the compiled ops' int[2] arguments hold
_EXTENT_LIMIT = 2 ** 62              # a padded size or receptive field: int64 sums stay exact


def _is_int(v):
    # numbers.Integral: NumPy's integers too (torch's conv takes them), never a bool;
    # compared, not ``in _INT64``: Dynamo cannot trace range.__contains__ on a SymInt
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) \
        and _INT64[0] <= v <= _INT64[-1]


def _pair(value, name):
    if _is_int(value):
        return (int(value), int(value))
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(map(_is_int, value)):
        return tuple(map(int, value))
    raise TypeError(f"{name} must be an int or a pair of ints (64-bit), got {value!r}")


# What every backend's Gram reads (the compiled kernels refuse float8, the reference would
# take it): one answer whichever backend runs.
_GRAM_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_conv_args(x, kernel_size, stride, padding, dilation, groups):
    """Validate ``x`` (B, C, H, W) of a floating dtype the kernels read and the geometry;
    return the four pairs (kernel_size, stride, padding, dilation) as tuples of ints."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"im2col_gram: x must be a 4-D (B, C, H, W) tensor, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _GRAM_DTYPES:
        raise TypeError(f"im2col_gram: x must be float16, bfloat16, float32 or float64, got "
                        f"{x.dtype}")
    ks, st = _pair(kernel_size, "kernel_size"), _pair(stride, "stride")
    pd, dl = _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(ks) < 1 or min(st) < 1 or min(dl) < 1 or min(pd) < 0:
        raise ValueError(f"im2col_gram: need kernel_size, stride, dilation >= 1 and padding >= 0, "
                         f"got kernel_size={ks}, stride={st}, padding={pd}, dilation={dl}")
    if not _is_int(groups) or groups < 1 or x.shape[1] % groups:
        raise ValueError(f"im2col_gram: groups must be a positive int dividing C={x.shape[1]}, "
                         f"got {groups!r}")
    if 0 in x.shape[2:]:
        raise ValueError(f"im2col_gram: x must have non-empty spatial dims (F.conv2d refuses "
                         f"them too), got shape {tuple(x.shape)}")
    for i in range(2):
        padded, field = x.shape[2 + i] + 2 * pd[i], dl[i] * (ks[i] - 1) + 1
        if padded >= _EXTENT_LIMIT or field > _EXTENT_LIMIT:   # the kernels' int64 sums
            raise ValueError(f"im2col_gram: padding and dilation·(kernel_size − 1) must keep "
                             f"the padded input and the receptive field below 2**62, got "
                             f"padding={pd}, dilation={dl}, kernel_size={ks}")
        if padded < field:
            raise ValueError(f"im2col_gram: kernel_size {ks} (dilation {dl}) does not fit the "
                             f"padded input {tuple(x.shape[2:])} + 2·{pd}")
    out = output_size(x, ks, st, pd, dl)
    if x.shape[0] * out[0] * out[1] >= 2 ** 63:
        raise ValueError(f"im2col_gram: the conv has more output positions than int64 counts: "
                         f"{x.shape[0]}·{out[0]}·{out[1]} (padding={pd}, stride={st})")
    return ks, st, pd, dl


def check_bias_flag(bias):
    """``bias`` as a bool: the compiled ops take only a bool, the reference any truthy value,
    so a string would mean one thing on one backend and fail on another."""
    if bias is not None and bias not in (True, False):
        raise TypeError(f"bias must be a bool, got {bias!r}")
    return bool(bias)


def output_size(x, kernel_size, stride, padding, dilation):
    """(Ho, Wo) of a conv of ``x`` (B, C, H, W) with this geometry (four pairs)."""
    return tuple((x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1) - 1)
                 // stride[i] + 1 for i in range(2))
