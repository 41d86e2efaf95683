"""Side-by-side timing and the analytic flop counts that turn times into GFLOP/s.

Candidates are timed interleaved (round-robin, order rotated every repeat) so that load
from other processes on a shared machine hits every candidate alike; a ratio of two
medians from one interleaved run is far steadier than two separate runs.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

# Shortest timed sample of a multi-millisecond call (see ``interleaved``): several scheduler
# ticks, so that every thread's CPU time is in the sample that spent it.
MIN_SAMPLE_S = 0.05
MAX_CALLS_PER_SAMPLE = 10_000


@dataclass(frozen=True)
class Stats:
    median: float
    q25: float
    q75: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25


def summarize(samples) -> Stats:
    """Median and inter-quartile range (linear interpolation, numpy's default)."""
    xs = sorted(float(s) for s in samples)
    if not xs:
        raise ValueError("summarize: no samples")
    return Stats(median=statistics.median(xs), q25=_quantile(xs, 0.25), q75=_quantile(xs, 0.75),
                 n=len(xs))


def _quantile(sorted_xs, q):
    pos = q * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def calls_per_sample(call_wall_s: float, min_sample_s: float) -> int:
    """Calls that make one timed sample of at least ``min_sample_s`` seconds of wall time."""
    if min_sample_s <= 0:
        return 1
    return min(MAX_CALLS_PER_SAMPLE, max(1, math.ceil(min_sample_s / max(call_wall_s, 1e-9))))


def interleaved(candidates: dict, repeats: int, warmup: int = 1, sync=None,
                min_sample_s: float = 0.0):
    """Seconds per call of each candidate, timed round-robin: (CPU process time, wall time),
    each a dict name → list of ``repeats`` samples. Process time (all threads of this
    process) is what other load on a shared machine disturbs least; wall time is what a user
    waits.

    ``min_sample_s``: each sample runs the candidate often enough to last that long (counted
    from its last warm-up call) and records the time per call. Linux adds a thread's CPU time
    to the process clock at its scheduler ticks and switches, so a sample of a few ms of a
    multi-threaded call catches up other threads' time unevenly: the median of single calls
    was 26.3 ms where the mean was 29.4 (a C conv layer step, 2 threads, 60 samples).

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs inside the timed region so that
    asynchronous devices are measured to completion (on CUDA only the wall time counts the
    device's work).
    """
    names = list(candidates)
    last = {name: 0.0 for name in names}
    for _ in range(warmup):
        for name in names:
            w0 = time.perf_counter()
            candidates[name]()
            if sync:
                sync()
            last[name] = time.perf_counter() - w0
    calls = {name: calls_per_sample(last[name], min_sample_s if warmup else 0.0)
             for name in names}
    cpu, wall = {name: [] for name in names}, {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(calls[name]):
                candidates[name]()
            if sync:
                sync()
            wall[name].append((time.perf_counter() - w0) / calls[name])
            cpu[name].append((time.process_time() - c0) / calls[name])
    return cpu, wall


def conv_out(size: int, k: int, stride: int, pad: int, dilation: int = 1) -> int:
    return (size + 2 * pad - dilation * (k - 1) - 1) // stride + 1


def gram_flops(b, c, h, w, k, stride=1, pad=0, bias=False) -> int:
    """Multiply-adds ×2 of Σ_patches patch·patchᵀ as a dense (D×P)(P×D) product.

    D = C·k² (+1 with bias), P = B·Ho·Wo patches. A kernel that exploits symmetry does
    half the work; we count the full product so that every backend is credited alike.
    """
    d = c * k * k + int(bias)
    p = b * conv_out(h, k, stride, pad) * conv_out(w, k, stride, pad)
    return 2 * p * d * d


def solve_flops(d: int, m: int, batch: int = 1) -> int:
    """Cholesky of D×D (D³/3) plus two triangular solves for M right-hand sides (2·M·D²)."""
    return batch * (d ** 3 // 3 + 2 * m * d * d)


def gflops(flops: float, seconds: float) -> float:
    return flops / seconds / 1e9
