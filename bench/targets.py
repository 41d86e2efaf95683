"""Time to target: the papers' central claim ("C-SGD gets to a given training loss faster,
also per second") measured directly.

In one setting of a section, the targets are fixed multiples of the best final training loss
of any method there (mean over seeds). For each method and target: the iterations and CPU
seconds at the first evaluation point where the training loss is at or below the target,
averaged over seeds (resolution: the section's evaluation interval), or "not reached" if a
seed never gets there; for a method with a baseline (C-SGD → SGD), the ratios of the two.
"""
from __future__ import annotations

import math

from .metrics import first_reach, mean_std

FACTORS = (2.0, 1.1)
CLAIM = ("Paper 1: C-SGD lowers the training loss faster than SGD from the start, and stays "
         "ahead when plotted against wall-clock time, despite its costlier step (MLP, sec. "
         "5.3; ResNet-20 without BN, sec. 5.4). Paper 2: back-matching's layer-wise rates "
         "train at least as fast as SGD.")


def _reach(curve, target):
    """(iterations, CPU s, wall s) at the first evaluation with train loss ≤ target."""
    i = first_reach(range(len(curve["iters"])), curve["train_loss"], target)
    return None if i is None else (curve["iters"][i], curve["cpu_seconds"][i],
                                   curve["wall_seconds"][i])


def _final_mean(curves):
    return mean_std([c["train_loss"][-1] for c in curves])[0]


def rows(outcomes: dict, baselines: dict, prefix: dict | None = None) -> list:
    """Time-to-target rows for one setting; ``baselines`` maps method → plain method."""
    finals = {label: _final_mean(o.curves) for label, o in outcomes.items()}
    finite = [v for v in finals.values() if math.isfinite(v)]
    if not finite:
        return []
    best = min(finite)
    out = []
    for factor in FACTORS:
        target = factor * best
        reached = {}
        for label, o in outcomes.items():
            hits = [_reach(c, target) for c in o.curves]
            reached[label] = None if None in hits else [list(h) for h in zip(*hits)]
        for label in outcomes:
            row = {**(prefix or {}), "target": f"{factor:g}× best = {target:.3g}",
                   "method": label, "iterations": None, "CPU s": None, "wall s": None}
            hits = reached[label]
            if hits is None:
                n_hit = sum(_reach(c, target) is not None for c in outcomes[label].curves)
                row["iterations"] = f"not reached ({n_hit}/{len(outcomes[label].curves)} seeds)"
            else:
                row["iterations"] = mean_std(hits[0])[0]
                row["CPU s"] = mean_std(hits[1])[0]
                row["wall s"] = mean_std(hits[2])[0]
            base = baselines.get(label)
            if base is not None:
                row["baseline"] = base
                if hits is None:
                    row["per CPU second"] = "method did not reach it"
                elif reached[base] is None:
                    row["per CPU second"] = "baseline did not reach it"
                elif 0 in (mean_std(reached[base][0])[0], mean_std(reached[base][1])[0]):
                    row["per CPU second"] = "baseline reached it at the start"   # no ratio
                else:
                    row["iterations ratio"] = row["iterations"] / mean_std(reached[base][0])[0]
                    row["CPU-time ratio"] = row["CPU s"] / mean_std(reached[base][1])[0]
                    row["per CPU second"] = "faster" if row["CPU-time ratio"] < 1 else "slower"
            out.append(row)
    return out


COLUMNS = ["target", "method", "iterations", "CPU s", "wall s", "baseline", "iterations ratio",
           "CPU-time ratio", "per CPU second"]


def table(target_rows: list, prefix_columns=()) -> dict:
    """The section's table; ``summary`` finds it by its kind and setting columns."""
    return {"title": "Time to training-loss target (mean over seeds; ratio = method / "
                     "baseline)", "columns": list(prefix_columns) + COLUMNS, "rows": target_rows,
            "kind": "time to target", "setting": list(prefix_columns)}


def verdicts(target_rows: list, prefix_columns=()) -> list:
    """One sentence per compared method and target."""
    out = []
    for r in target_rows:
        if "baseline" not in r:
            continue
        where = ", ".join(str(r[c]) for c in prefix_columns)
        head = f"{where + ': ' if where else ''}{r['method']} vs {r['baseline']} to {r['target']}"
        if "CPU-time ratio" in r:
            out.append(f"{head}: ×{r['iterations ratio']:.2f} the iterations, "
                       f"×{r['CPU-time ratio']:.2f} the CPU time ({r['per CPU second']}).")
        else:
            out.append(f"{head}: {r['per CPU second']}.")
    return out


def summary(sections: list) -> dict | None:
    """The report's closing section: every method-vs-baseline comparison of every training
    section, the claim beside the measured answer."""
    rows = []
    found = [(s["name"], t) for s in sections for t in s.get("tables", [])
             if t.get("kind") == "time to target"]
    for name, t in found:
        for r in t["rows"]:
            if "baseline" not in r:
                continue
            setting = ", ".join(str(r[c]) for c in t["setting"])
            rows.append({"section": name, "setting": setting or "—", "target": r["target"],
                         "method": r["method"], "baseline": r["baseline"],
                         "iterations ratio": r.get("iterations ratio"),
                         "CPU-time ratio": r.get("CPU-time ratio"),
                         "per CPU second": r["per CPU second"]})
    if not rows:
        return None
    verdicts = []
    for pair in dict.fromkeys((r["method"], r["baseline"]) for r in rows):
        mine = [r for r in rows if (r["method"], r["baseline"]) == pair]
        won = [r for r in mine if r["per CPU second"] == "baseline did not reach it"]
        fewer = sum(r.get("iterations ratio") is not None and r["iterations ratio"] < 1
                    for r in mine) + len(won)
        faster = sum(r["per CPU second"] == "faster" for r in mine) + len(won)
        missed = sum(r["per CPU second"] == "method did not reach it" for r in mine)
        verdicts.append(f"{pair[0]} vs {pair[1]}: reached the target in fewer iterations in "
                        f"{fewer} of {len(mine)} comparisons, in less CPU time in {faster} of "
                        f"{len(mine)}" + (f"; never reached it in {missed}" if missed else "")
                        + ".")
    return {"name": "time_to_target", "title": "Time to target: the papers' central claim",
            "claim": CLAIM, "verdicts": verdicts,
            "notes": ["Targets per setting: 2× and 1.1× the best final training loss of any "
                      "method in it. Ratios are method / baseline means over seeds; CPU time "
                      "is the training loop's process time, single-threaded."],
            "tables": [{"title": "Every comparison", "columns": list(rows[0]), "rows": rows}]}
