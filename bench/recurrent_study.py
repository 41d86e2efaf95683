"""C-SGD on recurrent models against SGD and Adam, each at its best learning rate.

    python -m bench.recurrent_study [--tasks digits8-lstm,...] [--steps 1000]
                                    [--out results/recurrent_study]

Sequence classifiers (an LSTM or GRU, hidden 64, and a linear head on the last step's output)
on local data: scikit-learn's digits read row by row (8 steps of 8 features) or pixel by pixel
(64 steps of 1), and MNIST-1D (40 steps of 1; ``bench/data.py``). Per task: every learning rate
of each optimizer's grid on seed 0, chosen by the final validation loss (a validation split
held out of the training part; the grid is extended ×10/3 once if its top wins); then seeds
1–3 at the chosen rate, with the test accuracy at the end and the steps to a validation
accuracy target; C-SGD again with larger ridges and, for the pixel-by-pixel LSTM, with the
matched gradient clipped (``clip_grad_norm_``). Each run records the largest global gradient
norm the optimizer received: a run that blows up stays finite (the recurrence saturates), so
that and the accuracy, not NaNs, tell a dead run. One training step of each optimizer is
timed interleaved in CPU process time. One thread. Writes recurrent_study.json and
recurrent_study.md. "C-SGD amortised" is C-SGD with ``cx.amortize(model)`` at its defaults
(each recurrent weight's running Gram, refreshed every 10 steps, damped).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import consequential_ext as cx

from . import data
from .metrics import first_reach, mean_std
from .record import at_least, command_line, ensure_out_dir, git_commit
from .timing import interleaved, summarize
from .train import batches

BATCH, HIDDEN, EVAL_EVERY, HOLDOUT_SEED = 32, 64, 25, 1234
GRIDS = {"SGD": (0.03, 0.1, 0.3, 1.0, 3.0), "C-SGD": (0.03, 0.1, 0.3, 1.0, 3.0),
         "C-SGD amortised": (0.03, 0.1, 0.3, 1.0, 3.0), "Adam": (1e-3, 3e-3, 1e-2)}
FINAL_SEEDS = (1, 2, 3)
RIDGES = (1e-2, 1e-1)
# (ridge, lr, clip) follow-ups of C-SGD per task, and SGD clipped alike for comparison.
CLIPPED = {"digits64-lstm": ((1e-3, 1.0, 1.0),)}
DEAD = 0.2          # final validation accuracy at or below: the run learnt nothing that stayed

# name → (dataset, scaling, layout, kind, layers, bidirectional, validation accuracy target)
TASKS = {
    "digits8-lstm": ("digits", "unit", "rows", nn.LSTM, 1, False, 0.90),
    "digits8-gru": ("digits", "unit", "rows", nn.GRU, 1, False, 0.90),
    "digits8-bilstm2": ("digits", "unit", "rows", nn.LSTM, 2, True, 0.90),
    "digits64-lstm": ("digits", "unit", "pixels", nn.LSTM, 1, False, 0.90),
    "digits64-gru": ("digits", "unit", "pixels", nn.GRU, 1, False, 0.90),
    "mnist1d-lstm": ("mnist1d", "standard", "pixels", nn.LSTM, 1, False, 0.60),
    "mnist1d-gru": ("mnist1d", "standard", "pixels", nn.GRU, 1, False, 0.60),
}
DEFAULT_TASKS = ("digits8-lstm", "digits8-gru", "digits8-bilstm2", "digits64-lstm",
                 "mnist1d-gru")


class SequenceClassifier(nn.Module):
    def __init__(self, kind, inputs, layers, bidirectional, classes=10):
        super().__init__()
        self.rnn = kind(inputs, HIDDEN, num_layers=layers, batch_first=True,
                        bidirectional=bidirectional)
        self.head = nn.Linear(HIDDEN * (2 if bidirectional else 1), classes)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def sequences(split, layout):
    """(N, F) → (N, T, D): 'rows' = 8 steps of 8 features, 'pixels' = F steps of 1."""
    def reshape(x):
        return x.reshape(len(x), 8, 8) if layout == "rows" else x.reshape(len(x), -1, 1)
    return data.Split(reshape(split.x_train).contiguous(), split.y_train,
                      reshape(split.x_test).contiguous(), split.y_test)


def build(task, optimizer, lr, seed, ridge=1e-3):
    _, _, layout, kind, layers, bidirectional, _ = TASKS[task]
    torch.manual_seed(seed)
    model = SequenceClassifier(kind, 8 if layout == "rows" else 1, layers, bidirectional)
    if optimizer.startswith("C-SGD"):
        cx.consequentialize(model, ridge=ridge)
    if optimizer == "C-SGD amortised":
        cx.amortize(model)                      # the defaults: every 10 steps, decay 0.95
    opt = torch.optim.Adam(model.parameters(), lr=lr) if optimizer == "Adam" \
        else torch.optim.SGD(model.parameters(), lr=lr)
    return model, opt


@torch.no_grad()
def evaluate(model, x, y):
    model.eval()
    out = model(x)
    model.train()
    return F.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def train_run(task, optimizer, lr, seed, tune, steps, *, ridge=1e-3, clip=None, test=None):
    """One run: the validation curve, CPU time of its training steps, the largest gradient
    norm the optimizer received (C-SGD's: the matched one), and the test accuracy."""
    model, opt = build(task, optimizer, lr, seed, ridge)
    stream = batches(len(tune.y_train), BATCH, seed)
    val = (tune.x_test, tune.y_test)
    curve, cpu, largest = [(0, 0.0, *evaluate(model, *val))], 0.0, 0.0
    for step in range(1, steps + 1):
        idx = next(stream)
        start = time.process_time()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(tune.x_train[idx]), tune.y_train[idx])
        loss.backward()
        cpu += time.process_time() - start
        with torch.no_grad():                                   # not timed
            norm = math.sqrt(sum(float(p.grad.double().square().sum())
                                 for p in model.parameters() if p.grad is not None))
        largest = max(largest, norm)
        start = time.process_time()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        cpu += time.process_time() - start
        if not (math.isfinite(loss.item()) and math.isfinite(norm)):
            curve.append((step, cpu, math.inf, 0.0))
            break
        if step % EVAL_EVERY == 0 or step == steps:
            curve.append((step, cpu, *evaluate(model, *val)))
    run = {"task": task, "optimizer": optimizer, "lr": lr, "seed": seed, "ridge": ridge,
           "clip": clip, "curve": curve, "max_grad_norm": largest,
           "val_loss": curve[-1][2], "val_acc": curve[-1][3]}
    if test is not None:
        run["test_acc"] = 0.0 if not math.isfinite(run["val_loss"]) else evaluate(model, *test)[1]
    return run


def step_costs(task, tune, chosen, repeats=15):
    """CPU ms of one training step per optimizer on one batch, timed interleaved."""
    xb, yb = tune.x_train[:BATCH], tune.y_train[:BATCH]
    steps = {}
    for name in GRIDS:
        model, opt = build(task, name, min(chosen[name], 1e-2), 0)   # a small lr: finite

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        steps[name] = step
    cpu, _ = interleaved(steps, repeats=repeats, warmup=2, min_sample_s=0.05)
    return {name: 1e3 * summarize(samples).median for name, samples in cpu.items()}


def run_task(task, steps, say):
    name, scaling, layout, *_ = TASKS[task]
    full = sequences(data.load(name, scaling), layout)
    tune = data.holdout(full, 0.2, seed=HOLDOUT_SEED)     # its test part is the validation set
    test = (full.x_test, full.y_test)
    out = {"task": task, "selection": [], "finals": [], "variants": [], "chosen": {}}
    for optimizer, grid in GRIDS.items():
        grid, losses = list(grid), {}
        for lr in grid:
            run = train_run(task, optimizer, lr, 0, tune, steps)
            out["selection"].append(run)
            losses[lr] = run["val_loss"]
            say(f"{task} select {optimizer} lr={lr:g}: val acc {run['val_acc']:.3f}, "
                f"max |grad| {run['max_grad_norm']:.3g}")
            if lr == grid[-1] and len(grid) == len(GRIDS[optimizer]) \
                    and min(losses, key=losses.get) == lr:
                grid.append(float(f"{lr * 10 / 3:.2g}"))
        out["chosen"][optimizer] = min(losses, key=losses.get)
    variants = [(ridge, out["chosen"]["C-SGD"], None) for ridge in RIDGES]
    variants += list(CLIPPED.get(task, ()))
    for seed in FINAL_SEEDS:
        for optimizer, lr in out["chosen"].items():
            out["finals"].append(train_run(task, optimizer, lr, seed, tune, steps, test=test))
        for ridge, lr, clip in variants:
            run = train_run(task, "C-SGD", lr, seed, tune, steps, ridge=ridge, clip=clip,
                            test=test)
            out["variants"].append(run)
            if clip is not None:                       # SGD clipped alike, at its best lr
                out["variants"].append(train_run(task, "SGD", out["chosen"]["SGD"], seed, tune,
                                                 steps, clip=clip, test=test))
        say(f"{task} seed {seed} done")
    out["cost_ms"] = step_costs(task, tune, out["chosen"])
    return out


def _steps_to(run, target):
    """The first evaluated step with validation accuracy ≥ ``target`` (None if none)."""
    return first_reach([c[0] for c in run["curve"]], [-c[3] for c in run["curve"]], -target)


def _group_row(task, label, runs):
    acc = mean_std([r["test_acc"] for r in runs])
    target = TASKS[task][-1]
    reached = [s for s in (_steps_to(r, target) for r in runs) if s is not None]
    dead = sum(r["val_acc"] <= DEAD for r in runs)
    steps = f"{sum(reached) / len(reached):.0f} ({len(reached)}/{len(runs)})" if reached else \
        f"— (0/{len(runs)})"
    return (f"| {task} | {label} | {acc[0]:.3f} ± {acc[1]:.3f} | {steps} | {dead}/{len(runs)} | "
            f"{max(r['max_grad_norm'] for r in runs):.3g} |")


def render(results, command, commit, seconds):
    lines = [f"# Recurrent models: C-SGD against SGD and Adam ({results['steps']} steps, batch "
             f"{BATCH}, seeds {', '.join(map(str, FINAL_SEEDS))}, {seconds / 60:.0f} min)", "",
             f"`{command}` — commit {commit}. Test accuracy after training (mean ± std over the "
             f"seeds), the mean steps to the task's validation-accuracy target (runs that got "
             f"there), the runs that ended at or below {DEAD:.0%} validation accuracy (dead: "
             f"the recurrence saturated after a blow-up; nothing is NaN), and the largest "
             f"gradient norm an optimizer received.", "",
             "| task | optimizer (lr) | test accuracy | steps to target | dead | max ‖grad‖ |",
             "|---|---|---|---|---|---|"]
    for task in results["tasks"]:
        for optimizer, lr in task["chosen"].items():
            runs = [r for r in task["finals"] if r["optimizer"] == optimizer]
            lines.append(_group_row(task["task"], f"{optimizer} ({lr:g})", runs))
        keys = sorted({(r["optimizer"], r["ridge"], r["lr"], r["clip"])
                       for r in task["variants"]}, key=str)
        for optimizer, ridge, lr, clip in keys:
            runs = [r for r in task["variants"] if (r["optimizer"], r["ridge"], r["lr"],
                                                    r["clip"]) == (optimizer, ridge, lr, clip)]
            label = f"{optimizer} ({lr:g}" + (f", ridge {ridge:g}" if optimizer == "C-SGD"
                                              else "") + (f", clip {clip:g}" if clip else "") + ")"
            lines.append(_group_row(task["task"], label, runs))
    others = [name for name in GRIDS if name != "SGD"]
    lines += ["", "CPU ms per training step, one batch, interleaved, each sample ≥ 50 ms of "
              "steps (so the amortised one's refresh steps are in its samples) (× SGD's):", "",
              f"| task | SGD | {' | '.join(others)} |", "|---|---|" + "---|" * len(others)]
    for task in results["tasks"]:
        cost = task["cost_ms"]
        lines.append(f"| {task['task']} | {cost['SGD']:.2f} | " + " | ".join(
            f"{cost[name]:.2f} ({cost[name] / cost['SGD']:.2f}×)" for name in others) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--steps", type=at_least(1), default=1000)
    parser.add_argument("--out", default="results/recurrent_study")
    args = parser.parse_args(argv)
    tasks = args.tasks.split(",")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        parser.error(f"--tasks: unknown {', '.join(unknown)} (known: {', '.join(TASKS)})")
    ensure_out_dir(parser, args.out)
    torch.set_num_threads(1)
    command = command_line("python -m bench.recurrent_study", argv)
    commit, start = git_commit(), time.time()
    results = {"command": command, "commit": commit, "steps": args.steps, "tasks": []}
    for task in tasks:
        results["tasks"].append(run_task(task, args.steps, lambda m: print(m, flush=True)))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "recurrent_study.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    report = render(results, command, commit, time.time() - start)
    with open(os.path.join(args.out, "recurrent_study.md"), "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
