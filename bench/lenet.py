"""Section 7, paper 2 sec. 3.3: LeNet with BN on digits (upsampled to 32×32): momentum SGD
vs back-matching (exact and layer-wise, Algorithm 1) vs LARS vs LSALR, plus C-SGD (exact and
amortised), each at its best rate of an equally sized grid around paper 2's choice.

Methods the installed library lacks (rules or ``cx.optim``) are skipped and named in the
report's notes, so the section runs on any build."""
from __future__ import annotations

import math

import torch

import consequential_ext as cx

from . import data, plots, protocol, targets
from .metrics import mean_std
from .mlp import AMORTIZE_EVERY, to_device
from .models import LeNetBN

BATCH = 128
MOMENTUM = 0.9
# Paper 2's chosen rates (sec. 3.3 for SGD and its algorithm, sec. 4.1 for LARS / LSALR);
# exact back-matching and C-SGD have none in the paper and take the layer-wise rule's. Each
# method's grid is its rate times LR_FACTORS.
LRS = {"SGD": 0.1, "back-matching (layer-wise)": 0.02, "back-matching (exact)": 0.02,
       "C-SGD": 0.02, "C-SGD (amortised)": 0.02, "LARS": 2.0, "LSALR": 0.1}
QUICK = {"iters": 100, "select_iters": 50, "eval_every": 25, "seeds": 1, "side": 32,
         "holdout": 0.2, "batch": BATCH, "lr_factors": (1 / 3, 1)}
FULL = {"iters": 300, "select_iters": 150, "eval_every": 25, "seeds": 3, "side": 32,
        "holdout": 0.2, "batch": BATCH, "lr_factors": (1 / 3, 1, 3)}
CLAIM = ("With BN and the same initialisation and batches, the layer-wise back-matching "
         "rate (lr 0.02) drives the training loss down at least as fast as momentum SGD "
         "(lr 0.1) and reaches a clearly higher test accuracy (CIFAR-10, 200 epochs); in the "
         "VGG experiments it beats LARS and LSALR by a small margin.")


def available_methods():
    """(method → (rule, amortised?, optimizer)) for what this build of the library offers, and notes."""
    methods, notes = {"SGD": ("sgd", False, "sgd")}, []
    for label, rule in (("back-matching (exact)", "backmatch"),
                        ("back-matching (layer-wise)", "backmatch-layerwise")):
        if rule in cx.RULES:
            methods[label] = (rule, False, "sgd")
        else:
            notes.append(f"Fallback: rule {rule!r} is not in this build (cx.RULES = "
                         f"{cx.RULES}); '{label}' skipped.")
    methods["C-SGD"] = ("consequential", False, "sgd")
    methods["C-SGD (amortised)"] = ("consequential", True, "sgd")
    optim = getattr(cx, "optim", None)
    for name in ("LARS", "LSALR"):
        if optim is not None and hasattr(optim, name):
            methods[name] = ("sgd", False, name)
        else:
            notes.append(f"Fallback: cx.optim.{name} is not in this build; '{name}' skipped.")
    return methods, notes


def builder(method_spec, device):
    rule, amortised, opt_name = method_spec

    def build(lr, seed):
        torch.manual_seed(seed)
        model = LeNetBN(in_channels=1)
        if rule != "sgd":
            cx.consequentialize(model, rule=rule)
        if amortised:
            cx.amortize(model, every=AMORTIZE_EVERY)
        model.to(device)
        if opt_name == "sgd":
            return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
        return model, getattr(cx.optim, opt_name)(model.parameters(), lr=lr, momentum=MOMENTUM)
    return build


def run(ctx):
    cfg = ctx.pick(QUICK, FULL)
    available, notes = available_methods()
    split = to_device(data.as_images(data.load("digits", "unit"), cfg["side"]), ctx.device)
    todo = {label: protocol.Method(tuple(round(LRS[label] * f, 6) for f in cfg["lr_factors"]),
                                   builder(spec, ctx.device), split,
                                   None if label == "SGD" else "SGD")
            for label, spec in available.items()}
    outcomes = protocol.run_methods(ctx, todo, cfg, "lenet")
    rows = protocol.result_rows(outcomes)
    target_rows = targets.rows(outcomes, {k: m.baseline for k, m in todo.items() if m.baseline})
    notes.append(protocol.grids_note(todo, cfg) + " Grids: paper 2's rate (SGD 0.1, "
                 "back-matching 0.02, LARS 2, LSALR 0.1; C-SGD and exact back-matching take the "
                 "layer-wise rule's 0.02) times " + ", ".join(f"{f:.3g}" for f in
                                                           cfg["lr_factors"]) + ".")
    notes.append(f"LARS: `cx.optim.LARS` with its defaults (trust coefficient 0.001, You et "
                 f"al.'s Algorithm 1). Scaled down: digits (1 channel, bilinear 8→{cfg['side']} "
                 f"px) instead of CIFAR-10, {cfg['iters']} iterations of batch {BATCH}, no "
                 f"weight decay, momentum {MOMENTUM} for every method (paper 2 sec. 3.3 "
                 f"setting).")
    plot_specs = (plots.loss_specs(outcomes, "LeNet-BN on digits",
                                   "cross-entropy (full train set)")
                  + plots.loss_specs(outcomes, "LeNet-BN on digits", "test accuracy",
                                     key="test_acc", logy=False)[:1])
    plot = plots.panels(ctx.plot_path("lenet_digits.png"), plot_specs, ncols=3)
    return {"name": "lenet", "title": "Paper 2 LeNet with BN: SGD vs back-matching vs LARS/LSALR "
                                      "(sec. 3.3)",
            "claim": CLAIM, "verdicts": _verdicts(outcomes) + targets.verdicts(target_rows),
            "notes": notes,
            "tables": [{"title": "LeNet-BN on digits (mean ± std over seeds)",
                        "columns": list(rows[0]), "rows": rows},
                       targets.table(target_rows),
                       {"title": "Learning-rate selection on the held-out split",
                        "columns": ["method", "lr", "held-out loss", "chosen"],
                        "rows": protocol.selection_rows(outcomes)}],
            "plots": [str(plot.relative_to(ctx.out))],
            "config": {**cfg, "momentum": MOMENTUM,
                       "seeds": ctx.n_seeds(cfg["seeds"], cfg["seeds"]),
                       "paper_lrs": {m: LRS[m] for m in available},
                       "amortize_every": AMORTIZE_EVERY,
                       "train_threads": protocol.TRAIN_THREADS, "device": ctx.device}}


def _final(curves, key):
    return mean_std([c[key][-1] for c in curves])[0]


def _verdicts(outcomes):
    sgd = outcomes["SGD"]
    base_loss, base_acc = _final(sgd.curves, "train_loss"), _final(sgd.curves, "test_acc")
    out = [f"SGD (lr {sgd.lr:g}): final train loss {base_loss:.3g}, test accuracy "
           f"{base_acc:.3f}."]
    for label, o in outcomes.items():
        if label == "SGD":
            continue
        loss, acc = _final(o.curves, "train_loss"), _final(o.curves, "test_acc")
        if not math.isfinite(loss):
            out.append(f"{label} (lr {o.lr:g}) diverged.")
            continue
        out.append(f"{label} (lr {o.lr:g}): final train loss {loss:.3g} "
                   f"({'lower' if loss < base_loss else 'higher'} than SGD), test accuracy "
                   f"{acc:.3f} ({acc - base_acc:+.3f} vs SGD).")
    return out
