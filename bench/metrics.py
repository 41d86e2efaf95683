"""Metric math on curves and paths, used by the sections' computed verdicts."""
from __future__ import annotations

import math
import warnings

import numpy as np


def first_reach(xs, ys, threshold):
    """The first x at which y ≤ threshold (None if never)."""
    for x, y in zip(xs, ys):
        if y is not None and math.isfinite(y) and y <= threshold:
            return x
    return None


def straightness(points) -> float:
    """|end − start| / path length, in [0, 1]; 1 is a straight line (a still path gives 1)."""
    p = np.asarray(points, dtype=np.float64)
    length = float(np.linalg.norm(np.diff(p, axis=0), axis=1).sum())
    if length == 0.0:
        return 1.0
    return float(np.linalg.norm(p[-1] - p[0]) / length)


def seed_band(curves):
    """Mean, min and max over seeds of equally long curves (NaN where a run diverged)."""
    a = np.asarray(curves, dtype=np.float64)
    with warnings.catch_warnings():     # a column of NaN (every seed diverged) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(a, 0), np.nanmin(a, 0), np.nanmax(a, 0)


def mean_std(values):
    """(mean, sample std) of finite values; (nan, nan) if none, std 0 for one value."""
    v = [float(x) for x in values if x is not None and math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    mean = sum(v) / len(v)
    if len(v) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))


def fmt_mean_std(values, digits=3) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "diverged"
    return f"{mean:.{digits}g} ± {std:.2g}"
