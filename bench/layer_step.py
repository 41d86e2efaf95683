"""Section 2: one forward+backward of CConv2d / CLinear per rule vs nn.Conv2d / nn.Linear
(oneDNN on CPU, cuDNN on GPU), timed side by side in one interleaved run (each sample at
least ``timing.MIN_SAMPLE_S`` of repeated calls). The recurrent layers also amortised
(``cx.amortize`` at its defaults): a sample's repeated calls hold its refresh steps (in quick
mode the 16 × 8 rows are fewer than W_hh's 129 columns: its solve stays exact)."""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn

import consequential_ext as cx

from .kernel_cases import RESNET20_LAYERS
from .timing import MIN_SAMPLE_S, interleaved, summarize

QUICK = {"conv_batch": 16, "linear_batch": 32, "seq_batch": 8, "steps": 16, "repeats": 15}
FULL = {"conv_batch": 128, "linear_batch": 32, "seq_batch": 32, "steps": 32, "repeats": 15}
LINEAR_LAYERS = ((256, 256), (64, 10))      # the MLP's hidden and an output layer
# (kind, input size, hidden size, layers): recurrent layers, time-major input.
RECURRENT_LAYERS = ((nn.LSTM, 64, 128, 2), (nn.GRU, 64, 128, 1))


def _layers(cfg):
    """(label, make nn layer, input shape, input gradient?) for the ResNet-20 convs, with
    and without the input's gradient (a first layer has none), and two linears."""
    for c, side in RESNET20_LAYERS:
        for input_grad in (True, False):
            yield (f"conv 3×3 {c}→{c}, {cfg['conv_batch']}×{c}×{side}×{side}"
                   + ("" if input_grad else ", no input grad"),
                   lambda c=c: nn.Conv2d(c, c, 3, padding=1), (cfg["conv_batch"], c, side, side),
                   input_grad)
    for i, o in LINEAR_LAYERS:
        yield (f"linear {i}→{o}, batch {cfg['linear_batch']}", lambda i=i, o=o: nn.Linear(i, o),
               (cfg["linear_batch"], i), True)
    for kind, i, h, depth in RECURRENT_LAYERS:
        yield (f"{kind.__name__} {depth}×{i}→{h}, {cfg['steps']} steps × batch "
               f"{cfg['seq_batch']}", lambda kind=kind, i=i, h=h, depth=depth: kind(i, h, depth),
               (cfg["steps"], cfg["seq_batch"], i), True)


def _amortised(rule, layer):
    """A recurrent C-layer amortised too (its own candidate), else None."""
    if rule != "consequential" or not isinstance(layer, nn.RNNBase):
        return None
    return cx.amortize(copy.deepcopy(layer))


def _output(out):
    return out[0] if isinstance(out, tuple) else out     # a recurrent layer's (output, state)


def _step(layer, x, gy):
    def call():
        x.grad = None
        layer.zero_grad(set_to_none=True)
        _output(layer(x)).backward(gy)
    return call


def run(ctx):
    cfg = ctx.pick(QUICK, FULL)
    rows, notes = [], []
    native = "cuDNN" if ctx.device.startswith("cuda") else "oneDNN/ATen"
    for label, make, shape, input_grad in ctx.progress(list(_layers(cfg)), desc="layer step"):
        torch.manual_seed(0)
        base = make().to(ctx.device)
        x = torch.randn(shape, device=ctx.device, requires_grad=input_grad)
        gy = torch.randn_like(_output(base(x)))
        candidates = {"nn": _step(base, x, gy)}
        for rule in cx.RULES:
            with warnings.catch_warnings():      # a kind left plain under a rule: said below
                warnings.simplefilter("ignore")
                layer = cx.consequentialize(make().to(ctx.device), rule=rule)
            if type(layer) is type(base):       # not converted
                notes.append(f"rule {rule!r} leaves a {type(layer).__name__} plain ({label})")
                continue
            layer.load_state_dict(base.state_dict())
            try:
                _step(layer, x, gy)()
            except Exception as exc:        # a rule that needs a whole network, say
                notes.append(f"rule {rule!r} could not run on a lone layer ({label}): "
                             f"{type(exc).__name__}: {exc}")
                continue
            candidates[rule] = _step(layer, x, gy)
            amortised = _amortised(rule, layer)
            if amortised is not None:
                candidates[f"{rule}, amortised"] = _step(amortised, x, gy)
        cpu, wall = interleaved(candidates, cfg["repeats"],
                                sync=ctx.sync if ctx.device.startswith("cuda") else None,
                                min_sample_s=MIN_SAMPLE_S)
        ref, ref_wall = summarize(cpu["nn"]), summarize(wall["nn"])
        for name, ts in cpu.items():
            st, wt = summarize(ts), summarize(wall[name])
            rows.append({"layer": label, "module": native if name == "nn" else f"C, rule {name}",
                         "median CPU ms": st.median * 1e3, "IQR CPU ms": st.iqr * 1e3,
                         "ratio to nn (CPU time)": st.median / ref.median,
                         "median wall ms": wt.median * 1e3,
                         "ratio to nn (wall)": wt.median / ref_wall.median})
    verdicts = ["Rule `sgd` runs exactly the nn layer's computation, so its spread around 1 "
                "is this machine's timing noise."]
    for rule in cx.RULES:
        ratios = [r["ratio to nn (CPU time)"] for r in rows if r["module"] == f"C, rule {rule}"]
        if ratios:
            verdicts.append(f"rule `{rule}`: forward+backward takes {min(ratios):.2f}–"
                            f"{max(ratios):.2f}× the CPU time of the {native} layer over "
                            f"{len(ratios)} layer shapes.")
    return {"name": "layer_step", "title": "Layer step: C-layers vs nn layers, forward+backward",
            "claim": "(Paper 1, sec. 5.3–5.4, on cost.) The consequential update costs extra "
                     "time per step for the pseudo-inverse; the papers compare by wall-clock "
                     "time for that reason.",
            "verdicts": verdicts, "notes": notes,
            "tables": [{"title": f"Forward+backward per layer on {ctx.device}",
                        "columns": list(rows[0]),
                        "rows": rows}],
            "plots": [], "config": {**cfg, "device": ctx.device, "rules": list(cx.RULES)}}
