"""Small helpers the Triton launchers share."""
from __future__ import annotations

import torch

from ..reference import accumulate_dtype

__all__ = ["accumulate_dtype", "default_precision", "check_precision", "num_programs_target"]

PRECISIONS = ("ieee", "tf32")


def default_precision(dtype: torch.dtype) -> str:
    """tf32 tensor cores for float32 input (documented bound in gram.py); IEEE otherwise —
    16-bit inputs ignore the setting, float64 has no tf32."""
    return "tf32" if dtype == torch.float32 else "ieee"


def check_precision(input_precision, dtype: torch.dtype) -> str:
    if input_precision is None:
        return default_precision(dtype)
    if input_precision not in PRECISIONS:
        raise ValueError(f"input_precision must be one of {PRECISIONS} or None, "
                         f"got {input_precision!r}")
    return "ieee" if dtype != torch.float32 else input_precision


def num_programs_target(device: torch.device) -> int:
    """Programs that keep every SM busy (two per SM); a small fixed number off-GPU, where
    the kernels only run under the interpreter."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4
