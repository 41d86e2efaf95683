"""The protocol every training section follows, so that its comparisons are like for like:

* each method's learning rate is the one of a stated grid with the lowest final loss on a
  held-out part of the training set (the test set is never looked at); the sides of a
  comparison get grids of one size;
* the chosen rate is then trained from several seeds on the whole training part;
* training runs single-threaded, so that CPU process time measures each method's own work
  (with two threads, a busy machine makes idle OpenMP threads spin and inflate it).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import data
from .metrics import fmt_mean_std
from .train import train

TRAIN_THREADS = 1
HOLDOUT_SEED = 1234


@dataclass(frozen=True)
class Method:
    grid: tuple                  # learning rates tried on the held-out split
    build: Callable              # (lr, seed) → (model on the device, optimizer)
    split: data.Split            # this method's data (ResNet's C- and plain inputs differ)
    baseline: str | None = None  # the plain method this one is compared with, if any


@dataclass
class Outcome:
    lr: float
    scores: dict                 # lr → final held-out loss (inf if the run diverged)
    curves: list = field(default_factory=list)


@contextmanager
def threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _train(ctx, method, split, lr, iters, seed, cfg, eval_every):
    model, opt = method.build(lr, seed)
    return train(model, opt, split, iters=iters, batch=cfg["batch"], eval_every=eval_every,
                 seed=seed, eval_train_limit=cfg.get("eval_train"),
                 sync=ctx.sync if ctx.device.startswith("cuda") else None)


def run_methods(ctx, methods: dict, cfg: dict, desc: str) -> dict:
    """label → Outcome for every Method; ``cfg`` holds iters, select_iters, batch, eval_every,
    holdout (fraction), seeds and optionally eval_train (training-set evaluation subset)."""
    n_seeds = ctx.n_seeds(cfg["seeds"], cfg["seeds"])
    bar = ctx.progress(total=sum(len(m.grid) + n_seeds for m in methods.values()), desc=desc)
    out = {}
    with threads(TRAIN_THREADS):
        for label, m in methods.items():
            tune = data.holdout(m.split, cfg["holdout"], seed=HOLDOUT_SEED)
            scores = {}
            for lr in m.grid:
                # only the final held-out loss counts: evaluate at the end alone
                final = _train(ctx, m, tune, lr, cfg["select_iters"], 0, cfg,
                               cfg["select_iters"])["test_loss"][-1]
                scores[lr] = final if math.isfinite(final) else math.inf
                bar.update()
            out[label] = Outcome(min(scores, key=scores.get), scores)
        # The timed runs that the time-to-target ratios compare: per seed, every method's run
        # back to back, the order rotated by seed, so that the machine's load hits each alike.
        labels = list(methods)
        for seed in range(n_seeds):
            shift = seed % len(labels)
            for label in labels[shift:] + labels[:shift]:
                m, outcome = methods[label], out[label]
                outcome.curves.append(_train(ctx, m, m.split, outcome.lr, cfg["iters"], seed,
                                             cfg, cfg["eval_every"]))
                bar.update()
    bar.close()
    return out


def result_rows(outcomes: dict, prefix: dict | None = None) -> list:
    """One row per method: chosen rate, final losses/accuracies and training times."""
    rows = []
    for label, o in outcomes.items():
        cs = o.curves
        rows.append({**(prefix or {}), "method": label, "lr": o.lr,
                     "final train loss": fmt_mean_std([c["train_loss"][-1] for c in cs]),
                     "final test accuracy": fmt_mean_std([c["test_acc"][-1] for c in cs]),
                     "best test accuracy": fmt_mean_std([np.nanmax(c["test_acc"]) for c in cs]),
                     "train CPU s": fmt_mean_std([c["cpu_seconds"][-1] for c in cs]),
                     "train wall s": fmt_mean_std([c["wall_seconds"][-1] for c in cs]),
                     "seeds": len(cs), "diverged runs": sum(c["diverged"] for c in cs)})
    return rows


def selection_rows(outcomes: dict, prefix: dict | None = None) -> list:
    return [{**(prefix or {}), "method": label, "lr": lr,
             "held-out loss": s if math.isfinite(s) else None, "chosen": lr == o.lr}
            for label, o in outcomes.items() for lr, s in o.scores.items()]


def grids_note(methods: dict, cfg: dict) -> str:
    grids = "; ".join(f"{label} [{', '.join(f'{g:.3g}' for g in m.grid)}]"
                      for label, m in methods.items())
    return (f"Learning rates: each method's from its grid ({grids}) by the lowest final loss "
            f"on a held-out {cfg['holdout']:.0%} of the training set after {cfg['select_iters']} iterations (seed 0), then {cfg['iters']} iterations on the "
            f"whole training part from each seed. Training single-threaded; times are CPU "
            f"process time of the training steps (evaluations excluded), wall time beside it.")
