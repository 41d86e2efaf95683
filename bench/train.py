"""The training loop shared by the MLP, ResNet and LeNet sections.

Mini-batches come from a seeded shuffle per epoch, so two methods given one seed see the
same batches in the same order. ``cpu_seconds`` (process time, all threads) and
``wall_seconds`` count training steps only (evaluations are excluded), which is what the
papers' loss-vs-time plots compare; process time is what other load on a shared machine
disturbs least. On CUDA, process time counts the host's share only: read wall time there.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F


def batches(n: int, batch: int, seed: int):
    """Endless index batches: a fresh seeded permutation per epoch, last partial batch dropped."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch]


@torch.no_grad()
def evaluate(model, x, y, chunk=1024):
    """(mean cross-entropy, accuracy) over a whole set, in eval mode."""
    was_training = model.training
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), chunk):
        out = model(x[i:i + chunk])
        loss += F.cross_entropy(out, y[i:i + chunk], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + chunk]).sum().item()
    model.train(was_training)
    return loss / len(y), correct / len(y)


def train(model, optimizer, split, *, iters, batch, eval_every, seed, sync=None,
          eval_train_limit=None):
    """Train with cross-entropy; returns the curve: iters, CPU and wall seconds, train loss/acc
    on the training set (its first ``eval_train_limit`` samples if given: a fixed subset, to
    keep evaluation of big models cheap) and test loss/acc, at iteration 0 and every
    ``eval_every``. A non-finite loss, or a backward that raises, stops the run
    (``diverged``); the rest of the curve is NaN."""
    curve = {k: [] for k in ("iters", "cpu_seconds", "wall_seconds", "train_loss", "train_acc",
                             "test_loss", "test_acc")}

    def record(it):
        tl, ta = evaluate(model, split.x_train[:eval_train_limit],
                          split.y_train[:eval_train_limit])
        vl, va = evaluate(model, split.x_test, split.y_test)
        for k, v in zip(curve, (it, cpu, wall, tl, ta, vl, va)):
            curve[k].append(v)
        return tl

    points = sorted(set(range(0, iters + 1, eval_every)) | {iters})
    at_points = set(points)
    model.train()
    cpu = wall = 0.0
    record(0)
    stream = batches(len(split.y_train), batch, seed)
    diverged = False
    for it in range(1, iters + 1):
        idx = next(stream)
        c0, w0 = time.process_time(), time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
        try:
            loss.backward()
        except RuntimeError as exc:
            # The solves return NaN rather than raise (then the loss check below stops the
            # run); any other failure of a backward ends the run as diverged too.
            curve["error"] = f"iteration {it}: {exc}"
            diverged = True
            break
        optimizer.step()
        if sync:
            sync()
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
        if not math.isfinite(loss.item()) or (it in at_points and not math.isfinite(
                record(it))):
            diverged = True
            break
    if diverged:   # NaN for the evaluation points not reached: all runs share one x-axis
        for it in points[len(curve["iters"]):]:
            curve["iters"].append(it)
            for k in list(curve)[1:]:
                curve[k].append(math.nan)
    curve["diverged"] = diverged
    return curve
