"""Section 4, paper 1 sec. 5.3: an 8-hidden-layer ReLU MLP (batch 32, Kaiming init,
softmax + cross-entropy), SGD vs C-SGD, each at its best learning rate from an equally
sized grid picked on a held-out part of the training set, on digits and MNIST-1D with
inputs in [0, 1] and standardised (NF)."""
from __future__ import annotations

import math

import numpy as np
import torch

import consequential_ext as cx

from . import data, plots
from .metrics import first_reach, fmt_mean_std, seed_band
from .models import relu_mlp
from .train import train

BATCH = 32
DEPTH = 8
# Paper 1's λ (on the unnormalised XᵀX of a batch) per input scaling; ridge = λ / batch.
PAPER_LAMBDA = {"unit": 1e-3, "standard": 1e-2}
METHODS = {"SGD": "sgd", "C-SGD": "consequential"}
QUICK = {"width": 64, "iters": 200, "select_iters": 100, "eval_every": 25,
         "grid": {"SGD": (0.01, 0.03, 0.1), "C-SGD": (0.01, 0.03, 0.1)}, "seeds": 1,
         "holdout": 0.2}
FULL = {"width": 256, "iters": 1000, "select_iters": 500, "eval_every": 50,
        "grid": {"SGD": (0.01, 0.03, 0.1, 0.3), "C-SGD": (0.003, 0.01, 0.03, 0.1)}, "seeds": 3,
        "holdout": 0.2}
CLAIM = ("C-SGD lowers the training loss faster than SGD from the beginning, whatever the "
         "input distribution ([0, 1] or NF), is more stable, and stays competitive when "
         "plotted against wall-clock time (paper: CIFAR-10/100, Fashion-MNIST, 100 epochs).")


def run_one(split, method, lr, scaling, cfg, iters, seed, ctx):
    model = relu_mlp(split.x_train.shape[1], split.num_classes, cfg["width"], DEPTH, seed)
    cx.consequentialize(model, rule=METHODS[method], ridge=PAPER_LAMBDA[scaling] / BATCH)
    model.to(ctx.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return train(model, opt, split, iters=iters, batch=BATCH, eval_every=cfg["eval_every"],
                 seed=seed, sync=ctx.sync if ctx.device.startswith("cuda") else None)


def select_lr(split, method, scaling, cfg, ctx, bar):
    """Learning rate with the lowest final held-out loss (training part minus a held-out
    part, so the test set is never looked at); returns (lr, {lr: held-out loss})."""
    tune = data.holdout(split, cfg["holdout"], seed=1234)
    scores = {}
    for lr in cfg["grid"][method]:
        curve = run_one(tune, method, lr, scaling, cfg, cfg["select_iters"], 0, ctx)
        final = curve["test_loss"][-1]
        scores[lr] = final if math.isfinite(final) else math.inf
        bar.update()
    return min(scores, key=scores.get), scores


def _to_device(split, device):
    return data.Split(*(t.to(device) for t in (split.x_train, split.y_train, split.x_test,
                                               split.y_test)))


def run(ctx):
    cfg = ctx.pick(QUICK, FULL)
    n_seeds = ctx.n_seeds(cfg["seeds"], cfg["seeds"])
    combos = [(ds, sc) for ds in data.DATASETS for sc in data.SCALINGS]
    n_runs = len(combos) * sum(len(g) + n_seeds for g in cfg["grid"].values())
    bar = ctx.progress(total=n_runs, desc="mlp runs")
    rows, verdicts, selection_rows, results = [], [], [], {}
    for ds, sc in combos:
        split = _to_device(data.load(ds, sc), ctx.device)
        for method in METHODS:
            lr, scores = select_lr(split, method, sc, cfg, ctx, bar)
            selection_rows += [{"dataset": ds, "inputs": sc, "method": method, "lr": g,
                                "held-out loss": s, "chosen": g == lr} for g, s in scores.items()]
            curves = []
            for seed in range(n_seeds):
                curves.append(run_one(split, method, lr, sc, cfg, cfg["iters"], seed, ctx))
                bar.update()
            results[ds, sc, method] = (lr, curves)
            rows.append({"dataset": ds, "inputs": sc, "method": method, "lr": lr,
                         "final train loss": fmt_mean_std([c["train_loss"][-1] for c in curves]),
                         "test accuracy": fmt_mean_std([c["test_acc"][-1] for c in curves]),
                         "train seconds": fmt_mean_std([c["seconds"][-1] for c in curves]),
                         "diverged runs": sum(c["diverged"] for c in curves)})
        verdicts.append(_verdict(ds, sc, results))
    bar.close()
    plot_paths = [str(_plot(ctx, ds, results).relative_to(ctx.out)) for ds in data.DATASETS]
    return {"name": "mlp", "title": "Paper 1 MLP: SGD vs C-SGD, 8 hidden layers (sec. 5.3)",
            "claim": CLAIM, "verdicts": verdicts, "plots": plot_paths,
            "notes": [f"Scaled down: width {cfg['width']} (paper 800), {cfg['iters']} iterations, "
                      f"digits and MNIST-1D instead of CIFAR/Fashion-MNIST. Loss is on the full "
                      f"training set, as in the paper; seconds count training steps only. "
                      f"ridge = paper λ / batch (λ 1e-3 for [0, 1] inputs, 1e-2 for NF)."],
            "tables": [{"title": "Final results (mean ± std over seeds)",
                        "columns": list(rows[0]), "rows": rows},
                       {"title": "Learning-rate selection on the held-out split",
                        "columns": list(selection_rows[0]), "rows": selection_rows}],
            "config": {**cfg, "batch": BATCH, "depth": DEPTH, "seeds": n_seeds,
                       "paper_lambda": PAPER_LAMBDA, "device": ctx.device}}


def _mean_curve(curves, key):
    return seed_band([c[key] for c in curves])[0]


def _verdict(ds, sc, results):
    (lr_s, sgd), (lr_c, csgd) = results[ds, sc, "SGD"], results[ds, sc, "C-SGD"]
    iters = sgd[0]["iters"]
    loss_s, loss_c = _mean_curve(sgd, "train_loss"), _mean_curve(csgd, "train_loss")
    sec_s, sec_c = _mean_curve(sgd, "seconds"), _mean_curve(csgd, "seconds")
    target = float(loss_s[-1])
    hit = first_reach(iters, loss_c, target)
    label = f"{ds}, {'[0, 1]' if sc == 'unit' else 'NF'} inputs"
    if not math.isfinite(target):
        return f"{label}: SGD (lr {lr_s}) diverged; C-SGD (lr {lr_c}) final loss {loss_c[-1]:.3g}."
    if hit is None:
        return (f"{label}: C-SGD (lr {lr_c}) did not reach SGD's final training loss "
                f"{target:.3g} (lr {lr_s}, {iters[-1]} iterations); its own final loss "
                f"{loss_c[-1]:.3g}.")
    k = iters.index(hit)
    return (f"{label}: C-SGD (lr {lr_c}) reached SGD's final training loss {target:.3g} at "
            f"iteration {hit} ({sec_c[k]:.1f} s) vs SGD (lr {lr_s}) at iteration {iters[-1]} "
            f"({sec_s[-1]:.1f} s); final loss C-SGD {loss_c[-1]:.3g} vs SGD {target:.3g}.")


def _plot(ctx, ds, results):
    specs = []
    for sc in data.SCALINGS:
        tag = "[0,1]" if sc == "unit" else "NF"
        for xkey, xlabel in (("iters", "iteration"), ("seconds", "training seconds")):
            series = []
            for method in METHODS:
                lr, curves = results[ds, sc, method]
                mean, lo, hi = seed_band([c["train_loss"] for c in curves])
                x = np.asarray(curves[0]["iters"], float) if xkey == "iters" \
                    else _mean_curve(curves, "seconds")
                series.append({"label": f"{method} (lr {lr})", "x": x, "y": mean, "lo": lo,
                               "hi": hi})
            specs.append({"title": f"{ds} {tag}: train loss vs {xlabel}", "xlabel": xlabel,
                          "ylabel": "cross-entropy (full train set)", "logy": True,
                          "series": series})
    return plots.panels(ctx.plot_path(f"mlp_{ds}.png"), specs, ncols=2)
