"""Choose the default ridge: C-SGD on digits across ridges, each at its best learning rate.

    python -m bench.ridge_sweep [--steps 300] [--seeds 2] [--out results/ridge_sweep]

An MLP (64→4×64→10, ReLU, Kaiming init, batch 32, inputs in [0, 1]) is trained with C-SGD
for every (ridge, lr) pair; the held-out cross-entropy after training, averaged over seeds,
is reported per ridge at that ridge's best lr. Writes ridge_sweep.json and ridge_sweep.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import consequential_ext as cx

from .record import at_least, command_line, ensure_out_dir, git_commit
from .models import relu_mlp

RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)
LRS = (0.1, 0.3, 1.0)


def digits_split(seed=0, n_val=397):
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    val, train = perm[:n_val], perm[n_val:]
    return (x[train], y[train]), (x[val], y[val])


def train_once(ridge, lr, seed, steps, train, val, batch=32):
    model = cx.consequentialize(relu_mlp(64, 10, width=64, depth=4, seed=seed), ridge=ridge)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x, y = train
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        val_loss = F.cross_entropy(model(val[0]), val[1]).item()
        val_acc = (model(val[0]).argmax(1) == val[1]).float().mean().item()
    return val_loss if math.isfinite(val_loss) else float("inf"), val_acc


def sweep(steps, seeds):
    train, val = digits_split()
    rows = []
    for ridge in RIDGES:
        for lr in LRS:
            runs = [train_once(ridge, lr, s, steps, train, val) for s in range(seeds)]
            rows.append({"ridge": ridge, "lr": lr,
                         "val_loss": sum(r[0] for r in runs) / seeds,
                         "val_acc": sum(r[1] for r in runs) / seeds})
            print(f"ridge={ridge:g} lr={lr:g} val_loss={rows[-1]['val_loss']:.4f} "
                  f"val_acc={rows[-1]['val_acc']:.3f}", flush=True)
    return rows


def best_per_ridge(rows):
    best = {}
    for r in rows:
        if r["ridge"] not in best or r["val_loss"] < best[r["ridge"]]["val_loss"]:
            best[r["ridge"]] = r
    return [best[k] for k in sorted(best)]


def render(best, steps, seeds, seconds, command="python -m bench.ridge_sweep", commit="unknown"):
    lines = [f"# Ridge sweep: C-SGD on digits ({steps} steps, batch 32, {seeds} seeds, "
             f"{seconds:.0f} s)", "", f"`{command}` — commit {commit}.", "",
             "| ridge | best lr | held-out loss | held-out accuracy |", "|---|---|---|---|"]
    lines += [f"| {r['ridge']:g} | {r['lr']:g} | {r['val_loss']:.4f} | {r['val_acc']:.3f} |"
              for r in best]
    winner = min(best, key=lambda r: r["val_loss"])
    lines += ["", f"Lowest held-out loss: ridge = {winner['ridge']:g} (lr {winner['lr']:g})."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=at_least(1), default=300)
    parser.add_argument("--seeds", type=at_least(1), default=2)
    parser.add_argument("--out", default="results/ridge_sweep")
    args = parser.parse_args(argv)
    ensure_out_dir(parser, args.out)
    command = command_line("python -m bench.ridge_sweep", argv)
    commit = git_commit()
    start = time.time()
    rows = sweep(args.steps, args.seeds)
    best = best_per_ridge(rows)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ridge_sweep.json"), "w") as f:
        json.dump({"command": command, "commit": commit, "steps": args.steps,
                   "seeds": args.seeds, "rows": rows, "best": best}, f, indent=1)
    report = render(best, args.steps, args.seeds, time.time() - start, command, commit)
    with open(os.path.join(args.out, "ridge_sweep.md"), "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    main()
