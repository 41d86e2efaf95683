"""glibc malloc's thresholds, fixed for a benchmark run.

glibc serves a block above its mmap threshold (128 KiB at start) with a fresh mapping, whose
pages fault in, zeroed, on first touch, and raises the threshold to the size of any such
block freed, up to 32 MiB: where a timed training step's tensors come from — a mapping that
faults every step or reused heap — depends on what the process freed before. In one run of
the report that was the profiler of the sections before: ResNet-20's C-SGD/SGD ratio read
1.17–1.23 after a ``torch.profiler`` session and 1.10–1.15 without one (same code, 30 steps
interleaved, 2 threads); with the thresholds fixed as here, 1.17–1.21 either way. Fixed, a
timing does not depend on the sections or models timed before it in the process.
"""
from __future__ import annotations

import ctypes
import ctypes.util

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20     # glibc's largest dynamic value: blocks below it reuse the heap
TRIM_THRESHOLD = 256 << 20    # free heap kept, not returned to the system, up to this


def pin_malloc_thresholds() -> str:
    """Fix glibc malloc's mmap and trim thresholds (which also stops their dynamic
    adjustment) for this process; returns what was done, for the report's header."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = getattr(libc, "mallopt", None)
    gnu = getattr(libc, "gnu_get_libc_version", None)
    if mallopt is None or gnu is None:
        return "allocator as is (not glibc)"
    if not (mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD,
                                                                   TRIM_THRESHOLD)):
        return "allocator as is (glibc refused mallopt)"
    return (f"glibc malloc, mmap threshold {MMAP_THRESHOLD >> 20} MiB and trim threshold "
            f"{TRIM_THRESHOLD >> 20} MiB fixed (bench/allocator.py)")
