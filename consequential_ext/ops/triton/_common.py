"""Small helpers the Triton launchers share."""
from __future__ import annotations

import torch

from ..reference import accumulate_dtype

__all__ = ["accumulate_dtype", "check_precision", "describe", "num_programs_target"]

PRECISIONS = ("ieee", "tf32")


def check_precision(input_precision, dtype: torch.dtype) -> str:
    """The ``tl.dot`` input precision: for float32 the caller's choice, tf32 tensor cores by
    default (bound in gram.py). Other dtypes ignore it (16-bit MMAs are exact products,
    float64 has no tf32), so they get Triton's own default, the common compiled path."""
    if input_precision is not None and input_precision not in PRECISIONS:
        raise ValueError(f"input_precision must be one of {PRECISIONS} or None, "
                         f"got {input_precision!r}")
    if dtype != torch.float32 or input_precision is None:
        return "tf32"
    return input_precision


def num_programs_target(device: torch.device) -> int:
    """Programs that keep every SM busy (two per SM); a small fixed number off-GPU, where
    the kernels only run under the interpreter (or are traced on meta tensors)."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def describe(value) -> str:
    """What an argument is, for error messages: dtype and shape of a tensor, else its type."""
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {tuple(value.shape)}"
    return type(value).__name__
