"""Section 7: real architectures (timm, random init) — a C-SGD step against plain SGD.

Per model, the plain model and a ``cx.consequentialize``d copy with the same weights take
training steps (forward + backward + SGD step) interleaved, timed in CPU process time (all
threads of this process, so other jobs on a shared machine count less than in wall time)
with wall time beside it. An amortised copy's step is costed over its refresh period: the
median refresh step and the median other step, weighted 1 : every − 1 (a plain median of
steps would miss the refreshes). The Gram and solve calls of one C step are recorded and
replayed in the same rotation: plain + that replay is the floor of an exact C step with its
kernels as they are, everything else free. A profiled C step splits its time into Gram,
solve, G (the ordinary weight gradient the solve preconditions) and the rest.

On a CUDA device (``--device cuda``) every timed step ends in a synchronize, the ratios
that count are the wall-time ones (CPU time there is mostly launching and waiting), and the
breakdown is the ops' device (kernel) time.

timm is optional (`make bench` installs it and torchvision, without their dependencies, in
its own venv). On machines whose only torchvision wheel is a
CUDA build, torchvision's compiled ops fail to load and its import then stops at the fake
registrations of ``nms``/``qnms``; ``import_timm`` declares those two schemas (no kernel:
detection code would fail loudly, model code never calls them) and imports timm again.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import sys
import time

import torch
import torch.nn as nn
from torch.autograd import DeviceType

import consequential_ext as cx

from consequential_ext import matching, ops
from consequential_ext.amortize import GramAmortizer

from . import plots
from .models import ResNet20

# The CIFAR-style ResNet-20 of bench/models.py without batch norm (no timm needed).
RESNET20 = "resnet20 (no BN)"
# name, timm kwargs (None: not a timm model), input side
MODELS = (
    ("resnet18", {}, 64),
    ("mobilenetv3_small_100", {}, 64),
    ("efficientnet_b0", {}, 64),
    ("convnext_atto", {}, 64),
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, 32),
    (RESNET20, None, 32),
)
# batch: per model where it differs from "batch" (ResNet-20 at its usual 128 in full mode).
# steps: timed steps per candidate, refreshes · AMORTIZE_EVERY, so that the amortised
# column's median refresh step is a median of that many samples (quick mode, a smoke run of
# `make bench`: one, said in the report; full mode: MIN_REFRESHES).
AMORTIZE_EVERY = 10     # the amortised column: cx.amortize(model, every=10), other defaults
MIN_REFRESHES = 5
QUICK = {"models": ("resnet18", "convnext_atto", RESNET20), "batch": 8,
         "batches": {RESNET20: 32}, "steps": AMORTIZE_EVERY, "refreshes": 1, "profile_steps": 1}
FULL = {"models": tuple(m[0] for m in MODELS), "batch": 32, "batches": {RESNET20: 128},
        "steps": MIN_REFRESHES * AMORTIZE_EVERY, "refreshes": MIN_REFRESHES, "profile_steps": 2}
# What a C step's Gram and solve go through (matching.py): recorded, then replayed. A conv's
# Gram built together with its G (ops.conv_gram_grad) is replayed as the Gram alone: the
# plain step has a G of its own.
GRAM_AND_SOLVE = ((ops, "im2col_gram"), (ops, "conv_gram_grad"), (ops, "ridge_solve"),
                  (matching, "_linear_gram"))

# Profiler names per bucket of the breakdown (everything else is "rest"): the ops, and the
# ranges consequential_ext.matching marks while a profiler runs. "G" is the ordinary weight
# gradient where it is computed on its own (Linear layers, amortised steps); a conv whose
# Gram kernel also gives G (ops.conv_gram_grad) has it inside "Gram", and one whose input
# gradient's native backward also returns G has it inside that op (rest).
BUCKETS = {
    "Gram": ("consequential_ext::im2col_gram", "consequential_ext::_conv_gram_grad",
             "cx::linear_gram"),
    "solve": ("consequential_ext::ridge_solve",),
    "G": ("cx::weight_grad",),
}


def import_timm():
    """``timm``, importable even when torchvision's compiled ops are missing (see above)."""
    try:
        import timm
        return timm
    except RuntimeError as exc:
        if "torchvision::" not in str(exc):
            raise
    for name in [m for m in sys.modules if m.split(".")[0] in ("timm", "torchvision")]:
        del sys.modules[name]
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import_timm._schemas = lib              # the declarations live as long as the Library
    import timm
    return timm


def make_models(name, kwargs, seed=0, device="cpu"):
    """(plain model, C model, amortised C model) with identical random weights, in train
    mode: timm's ``name`` (``kwargs`` None: ResNet-20 without batch norm)."""
    torch.manual_seed(seed)
    if kwargs is None:
        plain = ResNet20(in_channels=3, bn=False)
    else:
        plain = import_timm().create_model(name, pretrained=False, num_classes=10, **kwargs)
    matched = cx.consequentialize(copy.deepcopy(plain))
    amortised = cx.amortize(cx.consequentialize(copy.deepcopy(plain)), every=AMORTIZE_EVERY)
    return tuple(m.to(device).train() for m in (plain, matched, amortised))


def _stepper(model, x, y, sync=None):
    """One SGD training step; ``sync`` (e.g. ``torch.cuda.synchronize``) waits for its
    device work before it returns."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        if sync is not None:
            sync()
    return step


def time_pair(plain, matched, x, y, steps, amortised=None, replay=None, sync=None):
    """Per-step CPU process time and wall time (seconds) of each candidate, interleaved,
    and which of the amortised model's timed steps refreshed (None without it). The
    candidates: 'plain', 'C-SGD', 'C-SGD amortised' (given ``amortised``) and
    'Gram + solve' (given ``replay``, e.g. ``replay_calls(record_gram_and_solve(...))``).
    ``sync`` runs at the end of every timed step (asynchronous devices)."""
    fns = {"plain": _stepper(plain, x, y, sync), "C-SGD": _stepper(matched, x, y, sync)}
    refreshes = None
    if amortised is not None:
        fns["C-SGD amortised"] = _stepper(amortised, x, y, sync)
        amortizer = next(m for m in amortised.modules() if isinstance(m, GramAmortizer))
        refreshes = []
    if replay is not None:
        fns["Gram + solve"] = replay
    for fn in fns.values():
        fn()                                                    # warm-up
    cpu = {k: [] for k in fns}
    wall = {k: [] for k in fns}
    names = list(fns)
    for r in range(steps):
        for k in (names if r % 2 == 0 else names[::-1]):
            if k == "C-SGD amortised":
                refreshes.append(amortizer.wants_gram())
            c0, w0 = time.process_time(), time.perf_counter()
            fns[k]()
            cpu[k].append(time.process_time() - c0)
            wall[k].append(time.perf_counter() - w0)
    return cpu, wall, refreshes


def per_step_over_period(times, refreshes, every, min_fresh=MIN_REFRESHES):
    """Mean cost of a step over a refresh period, from robust parts: (median refresh step +
    (every − 1) · median other step) / every. ValueError when fewer than ``min_fresh`` timed
    steps refreshed (a median of one sample is that sample, outliers and all)."""
    fresh = [t for t, r in zip(times, refreshes) if r]
    other = [t for t, r in zip(times, refreshes) if not r]
    if len(fresh) < min_fresh or len(other) < min_fresh:
        raise ValueError(f"need {min_fresh} refresh and {min_fresh} other steps among the timed "
                         f"ones; got {len(fresh)} and {len(other)} (time at least "
                         f"{min_fresh}·every={min_fresh * every} steps)")
    return (statistics.median(fresh) + (every - 1) * statistics.median(other)) / every


@contextlib.contextmanager
def _patched(targets, wrap):
    saved = [(owner, name, getattr(owner, name)) for owner, name in targets]
    try:
        for owner, name, fn in saved:
            setattr(owner, name, wrap(fn))
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def record_gram_and_solve(model, x, y):
    """The Gram and ridge-solve calls (function, arguments) one training step of ``model``
    makes, its arguments cloned; the step itself is taken. A call made inside another
    recorded one (a Linear's Gram through ``ops.im2col_gram``) is part of it, not a call
    of its own."""
    calls = []
    gram_alone, fused = ops.im2col_gram, ops.conv_gram_grad
    depth = [0]

    def recorder(fn):
        def record(*args, **kwargs):
            if depth[0] == 0:
                clone = lambda a: a.detach().clone() if isinstance(a, torch.Tensor) else a  # noqa: E731
                kept = {k: clone(v) for k, v in kwargs.items()}
                if fn is fused:               # (x, grad_output, geometry...): the Gram's part
                    calls.append((gram_alone, [clone(args[0]), *args[2:]], kept))
                else:
                    calls.append((fn, [clone(a) for a in args], kept))
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1
        return record
    with _patched(GRAM_AND_SOLVE, recorder):
        _stepper(model, x, y)()
    return calls


def replay_calls(calls, sync=None):
    """A callable making ``calls`` again, in order (then ``sync``, if given)."""
    def replay():
        for fn, args, kwargs in calls:
            fn(*args, **kwargs)
        if sync is not None:
            sync()
    return replay


def bucket_times(events, time_attr="cpu_time_total"):
    """µs per bucket of profiler ``events`` (``prof.events()``): each bucket op's time
    (``time_attr``: CPU, or ``device_time_total`` for its kernels), children included,
    except where a bucket op runs inside another (a Linear's Gram range holding the Gram
    kernel's op): only the outermost counts."""
    def bucket(event):
        return next((b for b, names in BUCKETS.items() if event.name in names), None)
    parts = dict.fromkeys(BUCKETS, 0.0)
    for event in events:
        b = bucket(event)
        parent = event.cpu_parent
        while b is not None and parent is not None:
            if bucket(parent) is not None:
                b = None
            parent = parent.cpu_parent
        if b is not None:
            parts[b] += getattr(event, time_attr)
    return parts


def profiled_total_us(events, cuda):
    """µs of profiler ``events``: the ops' self CPU time; on a CUDA device each kernel's time
    once, from its own event (the op that launched it counts it in its self device time too,
    so summing every event would count each kernel twice)."""
    if cuda:
        return sum(e.self_device_time_total for e in events if e.device_type != DeviceType.CPU)
    return sum(e.self_cpu_time_total for e in events)


def breakdown(model, x, y, steps, device="cpu"):
    """ms per step of each bucket (``bucket_times``) in a profiled C step; 'rest' is the
    step total (the ops' self time) minus the buckets. CPU time on the CPU; on a CUDA
    device, the kernels' device time."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.startswith("cuda")
    step = _stepper(model, x, y, torch.cuda.synchronize if cuda else None)
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
    total = profiled_total_us(prof.events(), cuda) / 1e3 / steps
    parts = {b: t / 1e3 / steps for b, t in bucket_times(
        prof.events(), "device_time_total" if cuda else "cpu_time_total").items()}
    parts["rest"] = max(total - sum(parts.values()), 0.0)
    return parts, total


def _plot(path, rows, breakdown_rows, prefix=""):
    """Left: C-SGD / plain per model with the 2× target (``prefix`` "wall ": the wall-time
    ratios); right: the profiled C step by bucket."""
    plt = plots.plt
    names = [r["model"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.bar(names, [r[f"{prefix}ratio"] for r in rows], color="tab:blue", label="C-SGD")
    left.scatter(names, [r[f"{prefix}floor ratio"] for r in rows], color="k", marker="_", s=300,
                 zorder=3, label="floor: plain + Gram + solve")
    left.scatter(names, [r[f"{prefix}amortised ratio"] for r in rows], color="tab:orange",
                 marker="o", zorder=3, label="amortised")
    left.axhline(2.0, color="k", ls="--", lw=1, label="2× target")
    left.set_ylabel(f"C-SGD step / plain step ({prefix or 'CPU '}time)")
    left.legend(fontsize=8)
    bottom = [0.0] * len(rows)
    for bucket in (*BUCKETS, "rest"):
        values = [b[f"{bucket} ms"] for b in breakdown_rows]
        right.bar(names, values, bottom=bottom, label=bucket)
        bottom = [a + v for a, v in zip(bottom, values)]
    right.set_ylabel("profiled C step, ms")
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=plots.DPI)
    plt.close(fig)
    return path


def run(ctx):
    cfg = ctx.pick(QUICK, FULL)
    title = "Real models (timm, random init): C-SGD vs SGD step"
    notes = []
    models = [m for m in MODELS if m[0] in cfg["models"]]
    try:
        import_timm()
    except ImportError as exc:
        models = [m for m in models if m[1] is None]
        notes.append(f"timm models skipped: timm is not installed ({exc}); it comes with "
                     f"`make bench`'s venv")
    cuda = ctx.device.startswith("cuda")
    sync = ctx.sync if cuda else None
    rows, breakdown_rows = [], []
    for name, kwargs, side in ctx.progress(models, desc="real models"):
        plain, matched, amortised = make_models(name, kwargs, device=ctx.device)
        batch = cfg["batches"].get(name, cfg["batch"])
        torch.manual_seed(1)
        x = torch.randn(batch, 3, side, side, device=ctx.device)
        y = torch.randint(0, 10, (batch,), device=ctx.device)
        replay = replay_calls(record_gram_and_solve(copy.deepcopy(matched), x, y), sync)
        cpu, wall, refreshes = time_pair(plain, matched, x, y, cfg["steps"], amortised, replay,
                                         sync)
        med = {k: statistics.median(v) * 1e3 for k, v in cpu.items()}
        wmed = {k: statistics.median(v) * 1e3 for k, v in wall.items()}
        amortised_ms = per_step_over_period(cpu["C-SGD amortised"], refreshes,
                                            AMORTIZE_EVERY, cfg["refreshes"]) * 1e3
        layers = sum(isinstance(m, (cx.CLinear, cx.CConv2d)) for m in matched.modules())
        row = {"model": name, "input": f"{batch}×3×{side}×{side}",
               "C layers": layers, "plain ms": med["plain"], "C-SGD ms": med["C-SGD"],
               "ratio": med["C-SGD"] / med["plain"], "plain wall ms": wmed["plain"],
               "C-SGD wall ms": wmed["C-SGD"],
               "wall ratio": wmed["C-SGD"] / wmed["plain"],
               "Gram + solve ms": med["Gram + solve"],
               "floor ratio": 1 + med["Gram + solve"] / med["plain"],
               "amortised ms": amortised_ms,
               "amortised ratio": amortised_ms / med["plain"]}
        if cuda:     # on a GPU the wall times are what count
            wall_amortised = per_step_over_period(wall["C-SGD amortised"], refreshes,
                                                  AMORTIZE_EVERY, cfg["refreshes"]) * 1e3
            row.update({"wall floor ratio": 1 + wmed["Gram + solve"] / wmed["plain"],
                        "wall amortised ratio": wall_amortised / wmed["plain"]})
        rows.append(row)
        parts, total = breakdown(matched, x, y, cfg["profile_steps"], ctx.device)
        breakdown_rows.append({"model": name, "profiled C step ms": total,
                               **{f"{b} ms": v for b, v in parts.items()}})
    if not rows:
        return {"name": "real_models", "title": title, "verdicts": [], "notes": notes,
                "tables": [], "plots": [], "config": cfg}
    prefix = "wall " if cuda else ""
    plot = _plot(ctx.plot_path("real_models.png"), rows, breakdown_rows, prefix)
    worst = max(rows, key=lambda r: r[f"{prefix}ratio"])
    clock = (f"wall time on {torch.cuda.get_device_name(ctx.device)}, synchronized every step"
             if cuda else "CPU process time")

    def span(column):
        values = [r[prefix + column] for r in rows]
        return f"{min(values):.2f}–{max(values):.2f}"
    return {"name": "real_models", "title": title,
            "claim": "A consequential step should cost a small constant factor over plain SGD "
                     "on real architectures (target: within 2×).",
            "verdicts": [f"C-SGD step / plain step ({clock}, median of {cfg['steps']} "
                         f"interleaved steps): {span('ratio')}×, worst {worst['model']}; amortised "
                         f"(`cx.amortize(model, every={AMORTIZE_EVERY})`, over its refresh "
                         f"period): {span('amortised ratio')}×. Floor of an exact step with "
                         f"these kernels (plain + its Gram and solve calls replayed, everything "
                         f"else free): {span('floor ratio')}×."],
            "notes": notes + [
                f"{torch.get_num_threads()} CPU threads, batch {cfg['batch']} (ResNet-20: "
                f"{cfg['batches'][RESNET20]}); breakdown from torch.profiler over "
                f"{cfg['profile_steps']} C step(s) ({'kernel time' if cuda else 'CPU time'}; "
                f"profiling adds overhead, so its total "
                f"exceeds the timed step); G there is the ordinary weight gradient where it is "
                f"computed on its own; on the CPU a conv whose Gram kernel also computes G (3×3-like "
                f"stride-1 convs with ≥ 16 channels a side, ops.conv_gram_grad) has it in Gram, "
                f"and one that needs its input gradient otherwise gets G from the same native "
                f"conv backward, counted in rest, as in the plain step.",
                f"amortised ms: (median refresh step + {AMORTIZE_EVERY - 1} · median other "
                f"step) / {AMORTIZE_EVERY}, the mean cost over a refresh period from robust "
                f"parts (refresh steps timed: at least {cfg['refreshes']}"
                f"{'; quick mode: one sample, indicative only' if cfg['refreshes'] < 2 else ''}"
                f"); Gram + solve ms: the median replay of the Gram and ridge-solve calls "
                f"one C step made (same arguments; a Gram built with its G replayed as the "
                f"Gram alone), in the same rotation; floor ratio: 1 + that / plain ms — where "
                f"the Gram kernel computes G the C step skips the native weight-gradient pass "
                f"the plain step runs, so it can come in under this floor."],
            "tables": [{"title": "Training step, plain vs consequentialize(model)",
                        "columns": list(rows[0]), "rows": rows},
                       {"title": "Where a C step's time goes (profiler)",
                        "columns": list(breakdown_rows[0]), "rows": breakdown_rows}],
            "plots": [str(plot.relative_to(ctx.out))], "config": cfg}
