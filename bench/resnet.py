"""Section 6, paper 1 sec. 5.4 scaled down: ResNet-20 on digits images; C-SGD (exact and
amortised), C-Nesterov and C-Adam (no BN, as the paper) vs their plain versions with and
without BN, each at its best rate of an equally sized grid picked on a held-out split."""
from __future__ import annotations

import torch

import consequential_ext as cx

from . import data, plots, protocol, targets
from .mlp import AMORTIZE_EVERY, to_device
from .models import ResNet20, count_params

PAPER_LAMBDA = 0.03         # on the unnormalised XᵀX of a batch; ridge = λ / batch
MOMENTUM = 0.95             # paper: best for both SGD and Nesterov
FC_LR_MULT_C = 0.1          # paper: the FC layer's learning-rate multiplier for C- runs
# The paper gives no learning rates: every method's comes from its optimizer's grid.
GRIDS = {"SGD": (0.003, 0.01, 0.03, 0.1), "Nesterov": (0.003, 0.01, 0.03, 0.1),
         "Adam": (3e-4, 1e-3, 3e-3, 1e-2)}
QUICK = {"batch": 32, "iters": 40, "select_iters": 20, "eval_every": 20, "seeds": 1, "side": 8,
         "eval_train": 256, "holdout": 0.2, "grid_size": 2}
FULL = {"batch": 32, "iters": 300, "select_iters": 150, "eval_every": 25, "seeds": 3, "side": 8,
        "eval_train": 512, "holdout": 0.2, "grid_size": 4}
CLAIM = ("Without BN, C-SGD and C-Nesterov train better than SGD and Nesterov (loss and "
         "accuracy, per iteration and per second), C-Adam changes little; C-SGD converges "
         "fast from the start and stays stable, SGD with BN overtakes it only late (CIFAR-10, "
         "batch 128, 30k iterations).")


def methods():
    """label → (optimizer, consequential?, amortised?, batch norm?, baseline)."""
    out = {}
    for opt in GRIDS:
        out[f"C-{opt}"] = (opt, True, False, False, opt)
        if opt == "SGD":
            out["C-SGD (amortised)"] = (opt, True, True, False, opt)
        out[opt] = (opt, False, False, False, None)
        out[f"{opt}-BN"] = (opt, False, False, True, None)
    return out


def _optimizer(name, model, lr, fc_mult):
    groups = [{"params": [p for n, p in model.named_parameters() if not n.startswith("fc.")]},
              {"params": list(model.fc.parameters()), "lr": lr * fc_mult}]
    if name == "Adam":
        return torch.optim.Adam(groups, lr=lr, betas=(0.9, 0.999))
    return torch.optim.SGD(groups, lr=lr, momentum=MOMENTUM, nesterov=name == "Nesterov")


def builder(spec, cfg, device):
    opt_name, consequential, amortised, bn, _ = spec

    def build(lr, seed):
        torch.manual_seed(seed)
        model = ResNet20(in_channels=1, bn=bn)
        if consequential:
            cx.consequentialize(model, rule="consequential", ridge=PAPER_LAMBDA / cfg["batch"])
            if amortised:
                cx.amortize(model, every=AMORTIZE_EVERY)
        model.to(device)
        return model, _optimizer(opt_name, model, lr, FC_LR_MULT_C if consequential else 1.0)
    return build


def run(ctx):
    cfg = ctx.pick(QUICK, FULL)
    base = data.load("digits", "unit")
    # paper: inputs in [-1, 1] for plain optimisers, [-0.5, 0.5] for consequentialism
    splits = {c: to_device(data.as_images(base, cfg["side"], -lim, lim), ctx.device)
              for c, lim in ((False, 1.0), (True, 0.5))}
    grid = {opt: g[-cfg["grid_size"]:]
            for opt, g in GRIDS.items()}
    specs = methods()
    todo = {label: protocol.Method(grid[spec[0]], builder(spec, cfg, ctx.device),
                                   splits[spec[1]], spec[4]) for label, spec in specs.items()}
    outcomes = protocol.run_methods(ctx, todo, cfg, "resnet")
    rows = protocol.result_rows(outcomes)
    target_rows = targets.rows(outcomes, {k: v[4] for k, v in specs.items() if v[4]})
    n_params = {bn: count_params(ResNet20(in_channels=1, bn=bn)) for bn in (False, True)}
    plot_specs = (plots.loss_specs(outcomes, "ResNet-20 on digits", "cross-entropy (train subset)")
                  + plots.loss_specs(outcomes, "ResNet-20 on digits", "test accuracy",
                                     key="test_acc", logy=False))
    plot = plots.panels(ctx.plot_path("resnet_digits.png"), plot_specs, ncols=2)
    return {"name": "resnet", "title": "Paper 1 ResNet-20: C-optimisers vs plain, with and "
                                       "without BN (sec. 5.4)",
            "claim": CLAIM, "verdicts": targets.verdicts(target_rows),
            "notes": [protocol.grids_note(todo, cfg),
                      f"Scaled down: digits as {cfg['side']}×{cfg['side']} images, batch "
                      f"{cfg['batch']} (paper 128), {cfg['iters']} iterations (paper ~30k); "
                      f"{n_params[False]} parameters without BN, {n_params[True]} with. FC lr "
                      f"×{FC_LR_MULT_C} for C- runs; ridge = λ / batch with the paper's λ = "
                      f"{PAPER_LAMBDA}; momentum {MOMENTUM}. Train loss and accuracy on a fixed "
                      f"subset of {cfg['eval_train']} training images (the paper plots Caffe's "
                      f"last mini-batch)."],
            "tables": [{"title": "ResNet-20 on digits (mean ± std over seeds)",
                        "columns": list(rows[0]), "rows": rows},
                       targets.table(target_rows),
                       {"title": "Learning-rate selection on the held-out split",
                        "columns": ["method", "lr", "held-out loss", "chosen"],
                        "rows": protocol.selection_rows(outcomes)}],
            "plots": [str(plot.relative_to(ctx.out))],
            "config": {**cfg, "seeds": ctx.n_seeds(cfg["seeds"], cfg["seeds"]),
                       "lambda": PAPER_LAMBDA, "momentum": MOMENTUM, "grids": grid,
                       "fc_lr_mult_c": FC_LR_MULT_C, "amortize_every": AMORTIZE_EVERY,
                       "train_threads": protocol.TRAIN_THREADS, "device": ctx.device}}
