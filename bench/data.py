"""Real data without network: scikit-learn's digits and MNIST-1D generated locally.

Every loader returns a ``Split`` of float32 / int64 tensors. Scalings are fitted on the
training part only: ``"unit"`` maps features into [0, 1] (paper 1's plain MLP inputs),
``"standard"`` gives each feature zero mean and unit variance (paper 1's "NF").
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SCALINGS = ("unit", "standard")
DATASETS = ("digits", "mnist1d")


@dataclass(frozen=True)
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1


@functools.cache
def _raw(name: str):
    """(x, y) numpy arrays of a dataset, before any scaling; train/test split fixed here."""
    if name == "digits":
        from sklearn.datasets import load_digits
        x, y = load_digits(return_X_y=True)
        # sklearn ships digits ordered by writer; a seeded permutation makes the 80/20
        # test split a fair sample.
        perm = np.random.default_rng(0).permutation(len(y))
        x, y = x[perm], y[perm]
        cut = int(0.8 * len(y))
        return x[:cut], y[:cut], x[cut:], y[cut:]
    if name == "mnist1d":
        from mnist1d.data import get_dataset_args, make_dataset
        args = get_dataset_args()   # generated from templates: no download
        ds = make_dataset(args)
        return ds["x"], ds["y"], ds["x_test"], ds["y_test"]
    raise ValueError(f"unknown dataset {name!r}; choose from {DATASETS}")


def scale(train: np.ndarray, test: np.ndarray, scaling: str):
    """Scale features by statistics of ``train`` only (test values may leave [0, 1])."""
    if scaling == "unit":
        lo, hi = train.min(0), train.max(0)
        span = np.where(hi > lo, hi - lo, 1.0)
        return (train - lo) / span, (test - lo) / span
    if scaling == "standard":
        mean, std = train.mean(0), train.std(0)
        std = np.where(std > 0, std, 1.0)
        return (train - mean) / std, (test - mean) / std
    raise ValueError(f"unknown scaling {scaling!r}; choose from {SCALINGS}")


def load(name: str, scaling: str) -> Split:
    """A dataset as flat feature vectors, scaled."""
    x_tr, y_tr, x_te, y_te = _raw(name)
    x_tr, x_te = scale(np.asarray(x_tr, np.float64), np.asarray(x_te, np.float64), scaling)
    return Split(torch.tensor(x_tr, dtype=torch.float32), torch.tensor(y_tr, dtype=torch.int64),
                 torch.tensor(x_te, dtype=torch.float32), torch.tensor(y_te, dtype=torch.int64))


def holdout(split: Split, fraction: float, seed: int) -> Split:
    """Carve a validation set out of the training part: (train − val) as train, val as test.

    Used to pick learning rates without looking at the test set.
    """
    n = len(split.y_train)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(fraction * n)))
    val, rest = perm[:n_val], perm[n_val:]
    return Split(split.x_train[rest], split.y_train[rest], split.x_train[val], split.y_train[val])


def as_images(split: Split, side: int | None = None, low: float = 0.0, high: float = 1.0) -> Split:
    """Digits as (N, 1, 8, 8) images, rescaled from [0, 1] to [low, high] and optionally
    resized (bilinear) to side×side."""
    def conv(x):
        img = x.reshape(-1, 1, 8, 8) * (high - low) + low
        if side is not None and side != 8:
            img = F.interpolate(img, size=(side, side), mode="bilinear", align_corners=False)
        return img.contiguous()
    if split.x_train.shape[1] != 64:
        raise ValueError("as_images expects digits (64 features)")
    return Split(conv(split.x_train), split.y_train, conv(split.x_test), split.y_test)


def as_signals(split: Split) -> Split:
    """Flat features as (N, 1, 1, L) one-row images, for (1×k) Conv2d layers."""
    def conv(x):
        return x.reshape(len(x), 1, 1, -1).contiguous()
    return Split(conv(split.x_train), split.y_train, conv(split.x_test), split.y_test)
