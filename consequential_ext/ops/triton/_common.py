"""Small helpers the Triton launchers share."""
from __future__ import annotations

import torch

from .._conv_args import _is_int
from ..reference import accumulate_dtype

__all__ = ["accumulate_dtype", "check_precision", "check_size", "describe", "num_programs_target"]

PRECISIONS = ("ieee", "tf32")


def check_precision(op: str, input_precision, dtype: torch.dtype) -> str:
    """The ``tl.dot`` input precision: for float32 the caller's choice, tf32 tensor cores by
    default (bound in gram.py). Other dtypes ignore it (16-bit MMAs are exact products,
    float64 has no tf32), so they get Triton's own default, the common compiled path."""
    if input_precision is not None and input_precision not in PRECISIONS:
        raise ValueError(f"{op}: input_precision must be one of {PRECISIONS} or None, "
                         f"got {input_precision!r}")
    if dtype != torch.float32 or input_precision is None:
        return "tf32"
    return input_precision


def check_size(op: str, name: str, value, *, power_of_two: bool = True) -> int:
    """A launcher's tile size (``power_of_two``: ``tl.arange`` takes only powers of two, and a
    16-bit ``tl.dot`` 16 and up) or count, as an int; 0 means automatic."""
    if not _is_int(value):
        raise TypeError(f"{op}: {name} must be an int, got {value!r}")
    if value < 0 or power_of_two and value and (value < 16 or value & (value - 1)):
        expected = "a power of two >= 16" if power_of_two else "a positive int"
        raise ValueError(f"{op}: {name} must be 0 (automatic) or {expected}, got {value}")
    return int(value)


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
