"""Section 5: a small convnet on MNIST-1D (the dataset's paper shows convnets far ahead of
MLPs there), SGD vs C-SGD (exact and amortised), with the MLP section's protocol."""
from __future__ import annotations

import torch

import consequential_ext as cx

from . import data, plots, protocol, targets
from .mlp import AMORTIZE_EVERY, METHODS, PAPER_LAMBDA, to_device
from .models import SignalConvNet, count_params

SCALING = "standard"      # MNIST-1D's own convnet sees standardised signals
QUICK = {"iters": 200, "select_iters": 100, "eval_every": 25, "grid": (0.03, 0.1), "seeds": 1,
         "holdout": 0.2, "batch": 32}
FULL = {"iters": 1500, "select_iters": 750, "eval_every": 50,
        "grid": (0.01, 0.03, 0.1, 0.3, 1.0), "seeds": 3, "holdout": 0.2, "batch": 32}
CLAIM = ("(Not in the papers, which have no 1-D data.) Paper 1 claims C-SGD's advantage for "
         "convolutional networks too (sec. 5.4); MNIST-1D's paper shows convnets far ahead of "
         "MLPs on it, so this is the harder, more relevant test on this dataset.")


def builder(rule, amortised, ridge, device):
    def build(lr, seed):
        torch.manual_seed(seed)
        model = SignalConvNet()
        cx.consequentialize(model, rule=rule, ridge=ridge)
        if amortised:
            cx.amortize(model, every=AMORTIZE_EVERY)
        model.to(device)
        return model, torch.optim.SGD(model.parameters(), lr=lr)
    return build


def run(ctx):
    cfg = ctx.pick(QUICK, FULL)
    split = to_device(data.as_signals(data.load("mnist1d", SCALING)), ctx.device)
    ridge = PAPER_LAMBDA[SCALING] / cfg["batch"]
    methods = {label: protocol.Method(cfg["grid"], builder(rule, amortised, ridge, ctx.device),
                                      split, base)
               for label, (rule, amortised, base) in METHODS.items()}
    outcomes = protocol.run_methods(ctx, methods, cfg, "mnist1d conv")
    rows = protocol.result_rows(outcomes)
    target_rows = targets.rows(outcomes, {k: v[2] for k, v in METHODS.items() if v[2]})
    specs = plots.loss_specs(outcomes, "MNIST-1D convnet", "cross-entropy (full train set)")
    specs += plots.loss_specs(outcomes, "MNIST-1D convnet", "test accuracy", key="test_acc",
                              logy=False)[:1]
    plot = plots.panels(ctx.plot_path("mnist1d_conv.png"), specs, ncols=3)
    return {"name": "mnist1d_conv", "title": "MNIST-1D convnet: SGD vs C-SGD",
            "claim": CLAIM, "verdicts": targets.verdicts(target_rows),
            "notes": [protocol.grids_note(methods, cfg),
                      f"Network: 3 convolutions (25 channels, kernel 1×5, stride 2, padding 1, "
                      f"as MNIST-1D's baseline convnet) and a linear layer, "
                      f"{count_params(SignalConvNet())} parameters; standardised inputs; "
                      f"ridge = λ / batch with λ = {PAPER_LAMBDA[SCALING]} (paper 1's NF value); "
                      f"batch {cfg['batch']}, plain SGD steps (no momentum), as the MLP section."],
            "tables": [{"title": "Final results (mean ± std over seeds)", "columns": list(rows[0]),
                        "rows": rows}, targets.table(target_rows),
                       {"title": "Learning-rate selection on the held-out split",
                        "columns": ["method", "lr", "held-out loss", "chosen"],
                        "rows": protocol.selection_rows(outcomes)}],
            "plots": [str(plot.relative_to(ctx.out))],
            "config": {**cfg, "seeds": ctx.n_seeds(cfg["seeds"], cfg["seeds"]),
                       "scaling": SCALING, "ridge": ridge, "amortize_every": AMORTIZE_EVERY,
                       "train_threads": protocol.TRAIN_THREADS, "device": ctx.device}}
