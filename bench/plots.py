"""PNG figures (matplotlib, Agg): panels of curves with seed bands, paths on a contour."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .metrics import seed_band  # noqa: E402

DPI = 90


def panels(path, specs, ncols=2, size=(5.0, 3.6)):
    """One figure of panels. A spec: title, xlabel, ylabel, optional logy / logx, and
    series [{label, x, y, optional lo/hi band, optional style}]; optional contour
    (X, Y, Z) drawn under the series, and markers [{x, y, marker, label}]."""
    n = len(specs)
    ncols = min(ncols, n)
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows),
                             squeeze=False)
    for ax, spec in zip(axes.flat, specs):
        if "contour" in spec:
            xx, yy, zz = spec["contour"]
            ax.contour(xx, yy, zz, levels=spec.get("levels", 20), cmap="Greys", linewidths=0.6)
        for s in spec["series"]:
            x, y = np.asarray(s["x"], float), np.asarray(s["y"], float)
            line, = ax.plot(x, y, s.get("style", "-"), label=s["label"], lw=1.3, ms=3)
            if s.get("lo") is not None:
                ax.fill_between(x, s["lo"], s["hi"], color=line.get_color(), alpha=0.2, lw=0)
        for m in spec.get("markers", []):
            ax.plot(m["x"], m["y"], m.get("marker", "x"), color=m.get("color", "k"), ms=8,
                    label=m.get("label"))
        if spec.get("logy"):
            ax.set_yscale("log")
        if spec.get("logx"):
            ax.set_xscale("log")
        ax.set_title(spec["title"], fontsize=10)
        ax.set_xlabel(spec.get("xlabel", ""))
        ax.set_ylabel(spec.get("ylabel", ""))
        if spec.get("equal"):
            ax.set_aspect("equal", adjustable="datalim")
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            uniq = dict(zip(labels, handles))
            ax.legend(uniq.values(), uniq.keys(), fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _style(label):
    """C-methods solid, BN variants dashed, the other plain methods dotted."""
    if label.startswith("C-"):
        return "-"
    return "--" if label.endswith("-BN") else ":"


def loss_specs(outcomes, where, ylabel, key="train_loss", logy=True):
    """Two panels of a metric over seeds (mean, min–max band) per method: against iterations
    and against the training loop's CPU seconds (mean over seeds)."""
    specs = []
    for xkey, xlabel in (("iters", "iteration"), ("cpu_seconds", "training CPU seconds")):
        series = []
        for label, o in outcomes.items():
            mean, lo, hi = seed_band([c[key] for c in o.curves])
            x = seed_band([c[xkey] for c in o.curves])[0]
            series.append({"label": f"{label} (lr {o.lr:g})", "x": x, "y": mean, "lo": lo,
                           "hi": hi, "style": _style(label)})
        specs.append({"title": f"{where}: {key.replace('_', ' ')} vs {xlabel}", "xlabel": xlabel,
                      "ylabel": ylabel, "logy": logy, "series": series})
    return specs
