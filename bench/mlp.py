"""Section 4, paper 1 sec. 5.3: an 8-hidden-layer ReLU MLP (batch 32, Kaiming init,
softmax + cross-entropy), SGD vs C-SGD (exact and amortised), each at its best learning rate
from one grid picked on a held-out part of the training set, on digits and MNIST-1D with
inputs in [0, 1] and standardised (NF)."""
from __future__ import annotations

import torch

import consequential_ext as cx

from . import data, plots, protocol, targets
from .models import relu_mlp

BATCH = 32
DEPTH = 8
# Paper 1's λ (on the unnormalised XᵀX of a batch) per input scaling; ridge = λ / batch.
PAPER_LAMBDA = {"unit": 1e-3, "standard": 1e-2}
AMORTIZE_EVERY = 10
# label → (rule, amortised?, baseline); one grid for all, so every side gets the same size.
METHODS = {"SGD": ("sgd", False, None), "C-SGD": ("consequential", False, "SGD"),
           "C-SGD (amortised)": ("consequential", True, "SGD")}
QUICK = {"width": 64, "iters": 200, "select_iters": 100, "eval_every": 25, "grid": (0.03, 0.1),
         "seeds": 1, "holdout": 0.2, "batch": BATCH}
FULL = {"width": 256, "iters": 1000, "select_iters": 500, "eval_every": 25,
        "grid": (0.01, 0.03, 0.1, 0.3, 1.0), "seeds": 3, "holdout": 0.2, "batch": BATCH}
CLAIM = ("C-SGD lowers the training loss faster than SGD from the beginning, whatever the "
         "input distribution ([0, 1] or NF), is more stable, and stays competitive when "
         "plotted against wall-clock time (paper: CIFAR-10/100, Fashion-MNIST, 100 epochs).")
SETTING = ("dataset", "inputs")


def builder(n_in, n_out, width, rule, amortised, ridge, device):
    def build(lr, seed):
        model = relu_mlp(n_in, n_out, width, DEPTH, seed)
        cx.consequentialize(model, rule=rule, ridge=ridge)
        if amortised:
            cx.amortize(model, every=AMORTIZE_EVERY)
        model.to(device)
        return model, torch.optim.SGD(model.parameters(), lr=lr)
    return build


def to_device(split, device):
    return data.Split(*(t.to(device) for t in (split.x_train, split.y_train, split.x_test,
                                               split.y_test)))


def run(ctx):
    cfg = ctx.pick(QUICK, FULL)
    n_seeds = ctx.n_seeds(cfg["seeds"], cfg["seeds"])
    rows, selection, target_rows, results, notes = [], [], [], {}, []
    for ds in data.DATASETS:
        for sc in data.SCALINGS:
            split = to_device(data.load(ds, sc), ctx.device)
            methods = {label: protocol.Method(
                cfg["grid"], builder(split.x_train.shape[1], split.num_classes, cfg["width"],
                                     rule, amortised, PAPER_LAMBDA[sc] / BATCH, ctx.device),
                split, base) for label, (rule, amortised, base) in METHODS.items()}
            outcomes = protocol.run_methods(ctx, methods, cfg, f"mlp {ds} {sc}")
            prefix = {"dataset": ds, "inputs": "[0, 1]" if sc == "unit" else "NF"}
            results[ds, sc] = outcomes
            rows += protocol.result_rows(outcomes, prefix)
            selection += protocol.selection_rows(outcomes, prefix)
            target_rows += targets.rows(outcomes, {k: v[2] for k, v in METHODS.items() if v[2]},
                                        prefix)
    notes.append(protocol.grids_note(methods, cfg))
    notes.append(f"Scaled down: width {cfg['width']} (paper 800), {cfg['iters']} iterations, "
                 f"digits and MNIST-1D instead of CIFAR/Fashion-MNIST. Loss is on the full "
                 f"training set, as in the paper. ridge = paper λ / batch (λ 1e-3 for [0, 1] "
                 f"inputs, 1e-2 for NF). Amortised C-SGD: `cx.amortize(model, "
                 f"every={AMORTIZE_EVERY})`.")
    plot_paths = [str(_plot(ctx, ds, results).relative_to(ctx.out)) for ds in data.DATASETS]
    return {"name": "mlp", "title": "Paper 1 MLP: SGD vs C-SGD, 8 hidden layers (sec. 5.3)",
            "claim": CLAIM, "verdicts": targets.verdicts(target_rows, SETTING),
            "plots": plot_paths, "notes": notes,
            "tables": [{"title": "Final results (mean ± std over seeds)",
                        "columns": list(rows[0]), "rows": rows},
                       targets.table(target_rows, SETTING),
                       {"title": "Learning-rate selection on the held-out split",
                        "columns": list(selection[0]), "rows": selection}],
            "config": {**cfg, "depth": DEPTH, "seeds": n_seeds, "paper_lambda": PAPER_LAMBDA,
                       "amortize_every": AMORTIZE_EVERY, "train_threads": protocol.TRAIN_THREADS,
                       "device": ctx.device}}


def _plot(ctx, ds, results):
    specs = []
    for sc in data.SCALINGS:
        tag = "[0,1]" if sc == "unit" else "NF"
        specs += plots.loss_specs(results[ds, sc], f"{ds} {tag}",
                                  "cross-entropy (full train set)")
    return plots.panels(ctx.plot_path(f"mlp_{ds}.png"), specs, ncols=2)
