"""Paper 1 toys: the two-weight loss surface (sec. 5.1) and output paths of a 20→2 FC
layer on 10 samples (sec. 5.2). C-SGD is the library's CLinear with plain torch SGD."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

import consequential_ext as cx

from . import plots
from .metrics import straightness

SURFACE_STEPS = 40
SURFACE_SCALES = (1.0, 3.0)          # input std of the two weights: a 9:1 ellipse
# Learning rates as fractions of 2/curvature_max (the SGD stability limit): the high one
# oscillates along the steep axis, the low one does not.
SURFACE_LR_FRACTIONS = {"high lr": 0.9, "low lr": 0.3}
PATH_LRS = {"left": 0.03, "right": 0.01}     # SGD, as in the paper's Fig. 4
PATH_CSGD_LR = 0.7
PATH_EPOCHS = 100
PATH_BATCH = 10      # the 10 samples form the mini-batch (sec. 5.2: mini-batch vs per-sample)
CLOSE = 1e-2                          # "reached": within this distance of the optimum/target

CLAIM_SURFACE = ("C-SGD moves the two weights straight to the optimum whatever the learning "
                 "rate; SGD follows the gradient across the ellipses (oscillating at a high "
                 "rate, slow along the flat axis at a low one) and momentum overshoots.")
CLAIM_PATHS = ("With mini-batches, C-SGD (lr 0.7) steers each output directly to its target; "
               "SGD (lr 0.03 and 0.01) takes indirect paths with oscillations that a smaller "
               "learning rate does not remove.")


def _two_weight_model(rule):
    return nn.ModuleList([cx.CLinear(1, 1, bias=False, rule=rule) for _ in range(2)])


def surface_data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(16, 2, generator=gen) * torch.tensor(SURFACE_SCALES)


def surface_lr(x, fraction):
    """``fraction`` of SGD's stability limit 2 / max curvature (curvature_i = mean x_i²)."""
    return fraction * 2.0 / float((x ** 2).mean(0).max())


def surface_paths(x, lr, steps=SURFACE_STEPS):
    """Weight paths (steps+1, 2) of SGD, momentum 0.9 and C-SGD from one start, on one
    full batch; returns (paths, optimum, surface function)."""
    w_opt = torch.tensor([1.0, 0.5])
    t = x * w_opt                                    # realisable targets: optimum at w_opt
    start = torch.tensor([-2.0, 2.0])
    methods = {"SGD": ("sgd", 0.0), "SGD+momentum": ("sgd", 0.9), "C-SGD": ("consequential", 0.0)}
    paths = {}
    for label, (rule, momentum) in methods.items():
        model = _two_weight_model(rule)
        with torch.no_grad():
            for layer, w in zip(model, start):
                layer.weight.fill_(float(w))
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        path = [start.tolist()]
        for _ in range(steps):
            opt.zero_grad()
            out = torch.cat([layer(x[:, i:i + 1]) for i, layer in enumerate(model)], 1)
            (0.5 * ((out - t) ** 2).sum(1).mean()).backward()
            opt.step()
            path.append([layer.weight.item() for layer in model])
        paths[label] = np.array(path)

    def loss(w1, w2):
        xs, ts = x.numpy().astype(np.float64), t.numpy().astype(np.float64)
        return 0.5 * (((w1[..., None] * xs[:, 0] - ts[:, 0]) ** 2).mean(-1)
                      + ((w2[..., None] * xs[:, 1] - ts[:, 1]) ** 2).mean(-1))
    return paths, w_opt.numpy(), loss


def output_paths(rule, lr, seed=0):
    """Outputs of all 10 samples after every step, (steps+1, 10, 2), and the targets."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 20, generator=gen)
    targets = torch.randn(10, 2, generator=gen)
    torch.manual_seed(seed)
    layer = cx.CLinear(20, 2, rule=rule)
    nn.init.xavier_uniform_(layer.weight)
    nn.init.zeros_(layer.bias)
    opt = torch.optim.SGD(layer.parameters(), lr=lr)
    with torch.no_grad():
        trace = [layer(x).clone()]
    for _ in range(PATH_EPOCHS):
        for i in range(0, 10, PATH_BATCH):
            opt.zero_grad()
            out = layer(x[i:i + PATH_BATCH])
            (0.5 * ((out - targets[i:i + PATH_BATCH]) ** 2).sum(1).mean()).backward()
            opt.step()
            with torch.no_grad():
                trace.append(layer(x).clone())
    return torch.stack(trace).numpy(), targets.numpy()


def _steps_to(dist, tol):
    hit = np.nonzero(dist <= tol)[0]
    return int(hit[0]) if len(hit) else None


def run(ctx):
    tables, plot_paths, verdicts = [], [], []
    # --- 5.1: loss surface ---
    rows, specs = [], []
    x = surface_data()
    lrs = {panel: surface_lr(x, f) for panel, f in SURFACE_LR_FRACTIONS.items()}
    for panel, lr in lrs.items():
        paths, w_opt, loss = surface_paths(x, lr)
        allp = np.concatenate(list(paths.values()))
        lo, hi = allp.min(0) - 0.3, allp.max(0) + 0.3
        g1, g2 = np.meshgrid(np.linspace(lo[0], hi[0], 120), np.linspace(lo[1], hi[1], 120))
        specs.append({"title": f"loss surface, {panel} ({lr:.3g})", "xlabel": "w1", "ylabel": "w2",
                      "contour": (g1, g2, np.log(loss(g1, g2) + 1e-6)), "equal": True,
                      "series": [{"label": k, "x": p[:, 0], "y": p[:, 1], "style": ".-"}
                                 for k, p in paths.items()],
                      "markers": [{"x": w_opt[0], "y": w_opt[1], "label": "optimum"}]})
        for label, p in paths.items():
            dist = np.linalg.norm(p - w_opt, axis=1)
            rows.append({"panel": panel, "lr": lr, "method": label,
                         "straightness": straightness(p),
                         "final distance": float(dist[-1]),
                         f"steps to within {CLOSE}": _steps_to(dist, CLOSE)})
    plot_paths.append(str(plots.panels(ctx.plot_path("toy_loss_surface.png"), specs)
                          .relative_to(ctx.out)))
    tables.append({"title": "Two-weight loss surface (sec. 5.1)",
                   "columns": ["panel", "lr", "method", "straightness", "final distance",
                               f"steps to within {CLOSE}"], "rows": rows})
    for panel in lrs:
        r = {row["method"]: row for row in rows if row["panel"] == panel}
        verdicts.append(
            f"5.1, {panel}: straightness (1 = straight line) C-SGD {r['C-SGD']['straightness']:.3f}, "
            f"SGD {r['SGD']['straightness']:.3f}, momentum {r['SGD+momentum']['straightness']:.3f}; "
            f"distance to optimum after {SURFACE_STEPS} steps C-SGD "
            f"{r['C-SGD']['final distance']:.2g}, SGD {r['SGD']['final distance']:.2g}, momentum "
            f"{r['SGD+momentum']['final distance']:.2g}.")
    # --- 5.2: output paths ---
    rows, specs = [], []
    csgd, targets = output_paths("consequential", PATH_CSGD_LR)
    for panel, lr in PATH_LRS.items():
        sgd, _ = output_paths("sgd", lr)
        series = []
        for label, trace in ((f"SGD lr {lr}", sgd), (f"C-SGD lr {PATH_CSGD_LR}", csgd)):
            for s in (0, 1):
                series.append({"label": f"{label}, sample {s}", "x": trace[:, s, 0],
                               "y": trace[:, s, 1], "style": "-" if "C-" in label else ":"})
            dist = np.linalg.norm(trace - targets, axis=2).mean(1)
            rows.append({"panel": panel, "method": label,
                         "mean straightness (10 samples)":
                             float(np.mean([straightness(trace[:, s]) for s in range(10)])),
                         "final mean distance": float(dist[-1]),
                         f"steps to mean distance ≤ {CLOSE}": _steps_to(dist, CLOSE)})
        specs.append({"title": f"outputs → targets ({panel}: SGD lr {lr})", "xlabel": "output 1",
                      "ylabel": "output 2", "series": series, "equal": True,
                      "markers": [{"x": targets[s, 0], "y": targets[s, 1], "label": "targets"}
                                  for s in (0, 1)]
                      + [{"x": csgd[0, s, 0], "y": csgd[0, s, 1], "marker": "o",
                          "label": "start"} for s in (0, 1)]})
    plot_paths.append(str(plots.panels(ctx.plot_path("toy_output_paths.png"), specs)
                          .relative_to(ctx.out)))
    tables.append({"title": "Output paths of a 20→2 FC layer, 10 samples (sec. 5.2)",
                   "columns": ["panel", "method", "mean straightness (10 samples)",
                               "final mean distance", f"steps to mean distance ≤ {CLOSE}"],
                   "rows": rows})
    c = next(r for r in rows if r["method"].startswith("C-SGD"))
    for r in rows:
        if r["method"].startswith("SGD"):
            verdicts.append(
                f"5.2: {r['method']} mean path straightness {r['mean straightness (10 samples)']:.3f} "
                f"vs C-SGD {c['mean straightness (10 samples)']:.3f}; mean distance to targets "
                f"after {PATH_EPOCHS} epochs {r['final mean distance']:.2g} vs C-SGD "
                f"{c['final mean distance']:.2g}.")
    return {"name": "toys", "title": "Paper 1 toys: loss surface and output paths (sec. 5.1, 5.2)",
            "claim": f"(5.1) {CLAIM_SURFACE} (5.2) {CLAIM_PATHS}", "verdicts": verdicts,
            "tables": tables, "plots": plot_paths, "notes": [],
            "config": {"surface": {"steps": SURFACE_STEPS, "input_std": SURFACE_SCALES,
                                   "lr_fractions_of_2_over_max_curvature": SURFACE_LR_FRACTIONS,
                                   "lrs": lrs, "samples": 16, "momentum": 0.9,
                                   "ridge": cx.DEFAULT_RIDGE},
                       "paths": {"sgd_lrs": PATH_LRS, "csgd_lr": PATH_CSGD_LR,
                                 "epochs": PATH_EPOCHS, "batch": PATH_BATCH, "samples": 10,
                                 "init": "xavier_uniform", "ridge": cx.DEFAULT_RIDGE}}}
