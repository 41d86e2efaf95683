"""Peak extra memory of one call: how far memory use rises above where it stood before.

CPU: Linux's peak resident set (VmHWM) is reset through /proc/self/clear_refs ("5"), so
``VmHWM after − VmRSS before`` is the call's peak extra host memory, counting every
allocation (BLAS/LAPACK workspaces too) at page granularity. ``malloc_trim`` first hands
the C allocator's free pages back, so memory it would reuse from its cache is counted. CUDA: the caching allocator's peak over the call.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import re

import torch

_libc = ctypes.CDLL(ctypes.util.find_library("c"))


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1)) * 1024


def _reset_host_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra_bytes(fn, device="cpu"):
    """Peak extra bytes while ``fn()`` runs; None where the platform cannot tell."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    if not _reset_host_peak():
        return None
    if hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
    base = _status_bytes("VmRSS")
    fn()
    return max(0, _status_bytes("VmHWM") - base)
