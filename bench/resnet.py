"""Section 5, paper 1 sec. 5.4 scaled down: ResNet-20 on digits images; C-SGD, C-Nesterov
and C-Adam (no BN, as the paper) vs their plain versions with and without BN."""
from __future__ import annotations

import numpy as np
import torch

import consequential_ext as cx

from . import data, plots
from .metrics import first_above, fmt_mean_std, seed_band
from .models import ResNet20, count_params
from .train import train

PAPER_LAMBDA = 0.03         # on the unnormalised XᵀX of a batch; ridge = λ / batch
MOMENTUM = 0.95             # paper: best for both SGD and Nesterov
FC_LR_MULT_C = 0.1          # paper: the FC layer's learning-rate multiplier for C- runs
# Learning rates are not given in the paper; these are fixed here (not tuned per method).
LRS = {"SGD": 0.01, "Nesterov": 0.01, "Adam": 1e-3}
C_LRS = {"SGD": 0.01, "Nesterov": 0.01, "Adam": 1e-3}
QUICK = {"batch": 32, "iters": 40, "eval_every": 20, "seeds": 1, "side": 8, "eval_train": 256}
FULL = {"batch": 32, "iters": 150, "eval_every": 25, "seeds": 1, "side": 8, "eval_train": 512}
CLAIM = ("Without BN, C-SGD and C-Nesterov train better than SGD and Nesterov (loss and "
         "accuracy, per iteration and per second), C-Adam changes little; C-SGD converges "
         "fast from the start and stays stable, SGD with BN overtakes it only late (CIFAR-10, "
         "batch 128, 30k iterations).")


def methods():
    """label → (optimizer, consequential?, batch norm?)."""
    out = {}
    for opt in LRS:
        out[f"C-{opt}"] = (opt, True, False)
        out[opt] = (opt, False, False)
        out[f"{opt}-BN"] = (opt, False, True)
    return out


def _optimizer(name, model, lr, fc_mult):
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("fc.")]},
              {"params": list(model.fc.parameters()), "lr": lr * fc_mult}]
    if name == "Adam":
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999))
    return torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM, nesterov=name == "Nesterov")


def run_one(label, spec, splits, cfg, seed, ctx):
    opt_name, consequential, bn = spec
    torch.manual_seed(seed)
    model = ResNet20(in_channels=1, bn=bn)
    lr = (C_LRS if consequential else LRS)[opt_name]
    if consequential:
        cx.consequentialize(model, rule="consequential", ridge=PAPER_LAMBDA / cfg["batch"])
    model.to(ctx.device)
    opt = _optimizer(opt_name, model, lr, FC_LR_MULT_C if consequential else 1.0)
    curve = train(model, opt, splits[consequential], iters=cfg["iters"], batch=cfg["batch"],
                  eval_every=cfg["eval_every"], seed=seed, eval_train_limit=cfg["eval_train"],
                  sync=ctx.sync if ctx.device.startswith("cuda") else None)
    return lr, count_params(model), curve


def run(ctx):
    cfg = ctx.pick(QUICK, FULL)
    n_seeds = ctx.n_seeds(cfg["seeds"], cfg["seeds"])
    base = data.load("digits", "unit")
    # paper: inputs in [-1, 1] for plain optimisers, [-0.5, 0.5] for consequentialism
    splits = {c: data.as_images(base, cfg["side"], -lim, lim)
              for c, lim in ((False, 1.0), (True, 0.5))}
    splits = {c: data.Split(*(t.to(ctx.device) for t in (s.x_train, s.y_train, s.x_test,
                                                          s.y_test))) for c, s in splits.items()}
    todo = [(label, spec, seed) for label, spec in methods().items() for seed in range(n_seeds)]
    results = {}
    for label, spec, seed in ctx.progress(todo, desc="resnet runs"):
        lr, n_params, curve = run_one(label, spec, splits, cfg, seed, ctx)
        results.setdefault(label, (lr, n_params, []))[2].append(curve)
    rows = []
    for label, (lr, n_params, curves) in results.items():
        rows.append({"method": label, "lr": lr, "parameters": n_params,
                     "final train loss": fmt_mean_std([c["train_loss"][-1] for c in curves]),
                     "final train accuracy": fmt_mean_std([c["train_acc"][-1] for c in curves]),
                     "final test accuracy": fmt_mean_std([c["test_acc"][-1] for c in curves]),
                     "train seconds": fmt_mean_std([c["seconds"][-1] for c in curves]),
                     "diverged runs": sum(c["diverged"] for c in curves)})
    return {"name": "resnet", "title": "Paper 1 ResNet-20: C-optimisers vs plain, with and "
                                       "without BN (sec. 5.4)",
            "claim": CLAIM, "verdicts": _verdicts(results),
            "notes": [f"Scaled down: digits as {cfg['side']}×{cfg['side']} images, batch "
                      f"{cfg['batch']} (paper 128), {cfg['iters']} iterations (paper ~30k). "
                      f"Learning rates fixed, not tuned (the paper gives none): plain "
                      f"{LRS}, consequential {C_LRS}; FC lr ×{FC_LR_MULT_C} for C- runs; "
                      f"ridge = λ / batch with the paper's λ = {PAPER_LAMBDA}. Train loss and "
                      f"accuracy on a fixed subset of {cfg['eval_train']} training images "
                      f"(the paper plots Caffe's last mini-batch)."],
            "tables": [{"title": "ResNet-20 on digits (mean ± std over seeds)",
                        "columns": list(rows[0]), "rows": rows}],
            "plots": [str(_plot(ctx, results).relative_to(ctx.out))],
            "config": {**cfg, "seeds": n_seeds, "lambda": PAPER_LAMBDA, "momentum": MOMENTUM,
                       "lrs": LRS, "c_lrs": C_LRS, "fc_lr_mult_c": FC_LR_MULT_C,
                       "device": ctx.device}}


def _mean(curves, key):
    return seed_band([c[key] for c in curves])[0]


def _verdicts(results):
    out = []
    for opt in LRS:
        c_lr, _, c = results[f"C-{opt}"]
        parts = []
        for other in (opt, f"{opt}-BN"):
            lr, _, curves = results[other]
            loss_c, loss_o = float(_mean(c, "train_loss")[-1]), float(_mean(curves, "train_loss")[-1])
            acc_c, acc_o = float(_mean(c, "test_acc")[-1]), float(_mean(curves, "test_acc")[-1])
            parts.append(f"vs {other}: train loss {loss_c:.3g} vs {loss_o:.3g}, test accuracy "
                         f"{acc_c:.3f} vs {acc_o:.3f}")
        iters = c[0]["iters"]
        reach = {lab: first_above(iters, _mean(results[lab][2], "train_acc"), 0.95)
                 for lab in (f"C-{opt}", opt, f"{opt}-BN")}
        reach_txt = ", ".join(f"{k} {v if v is not None else 'not within the run'}"
                              for k, v in reach.items())
        out.append(f"C-{opt} (lr {c_lr}) " + "; ".join(parts)
                   + f". Iteration reaching 95% train accuracy: {reach_txt}.")
    return out


def _plot(ctx, results):
    specs = []
    for key, ylabel, logy in (("train_loss", "cross-entropy (train subset)", True),
                              ("test_acc", "test accuracy", False)):
        for xkey, xlabel in (("iters", "iteration"), ("seconds", "training seconds")):
            series = []
            for label, (lr, _, curves) in results.items():
                mean, lo, hi = seed_band([c[key] for c in curves])
                x = np.asarray(curves[0]["iters"], float) if xkey == "iters" \
                    else _mean(curves, "seconds")
                series.append({"label": label, "x": x, "y": mean, "lo": lo, "hi": hi,
                               "style": "-" if label.startswith("C-") else
                               ("--" if label.endswith("-BN") else ":")})
            specs.append({"title": f"ResNet-20 on digits: {ylabel} vs {xlabel}",
                          "xlabel": xlabel, "ylabel": ylabel, "logy": logy, "series": series})
    return plots.panels(ctx.plot_path("resnet_digits.png"), specs, ncols=2)
