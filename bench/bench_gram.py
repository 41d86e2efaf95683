"""CPU im2col-Gram benchmark: the compiled kernel vs the reference (unfold + matmul).

    python bench/bench_gram.py [--quick] [--out DIR]

For ResNet-20's stride-1 3×3 layer shapes (batch 128) and one large image whose ``unfold``
needs ≥ 500 MB, measures side by side in one run (providers interleaved A, B, B, A, …;
medians with 20/80 % quantiles):

* Gram build time, kernel / reference (goal ≤ 0.35);
* extra peak memory of the Gram build, kernel / reference (goal ≤ 0.10): each build runs in
  a fresh subprocess (Linux) and reports its peak RSS (VmHWM, reset just before) over the
  RSS after a warm-up and after the input is allocated — output Gram included;
* ``CConv2d`` forward+backward / ``nn.Conv2d`` forward+backward (oneDNN) (goal ≤ 2.0);

plus ResNet-20's two stride-2 shapes (the runs path), resnet18's 8×8, 4×4 and 2×2 stages,
and the depthwise (grouped path) and 1×1 (rows, runs or tiled path, by width) layers of
EfficientNet and ConvNeXt at 64 px, no goal for those. ``--only a,b`` runs the cases whose names contain a or b. Writes ``gram_cpu.json``
and ``gram_cpu.md`` (``gram_cpu_Nthread.*`` with ``--threads N``) to DIR (default
``results/gram_cpu``). ``run(...)`` returns the rows;
importing this module runs nothing.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOALS = {"time_ratio": 0.35, "memory_ratio": 0.10, "conv_ratio": 2.0}


def shapes(quick: bool) -> list[dict]:
    """Benchmark cases: (B, C, H, W) input of a convolution with ``kernel`` (default 3),
    ``stride``, ``padding`` (default kernel // 2) and ``groups`` (default 1)."""
    batch = 16 if quick else 128
    cases = [
        {"name": "resnet20-32x32x16", "shape": (batch, 16, 32, 32), "stride": 1, "goal": True},
        {"name": "resnet20-16x16x32", "shape": (batch, 32, 16, 16), "stride": 1, "goal": True},
        {"name": "resnet20-8x8x64", "shape": (batch, 64, 8, 8), "stride": 1, "goal": True},
        {"name": "resnet20-down-32x32x16-s2", "shape": (batch, 16, 32, 32), "stride": 2,
         "goal": False},
        {"name": "resnet20-down-16x16x32-s2", "shape": (batch, 32, 16, 16), "stride": 2,
         "goal": False},
    ]
    # resnet18's last three stages on 64 px inputs: 8×8 and 4×4 (the shift form), then very
    # few patches per Gram entry (2×2: 32·P <= D, im2col + GEMM).
    small = 16 if quick else 32
    cases += [{"name": f"resnet18-8x8x128-b{small}", "shape": (small, 128, 8, 8), "stride": 1,
               "goal": False},
              {"name": f"resnet18-4x4x256-b{small}", "shape": (small, 256, 4, 4), "stride": 1,
               "goal": False},
              {"name": f"resnet18-2x2x512-b{small}", "shape": (small, 512, 2, 2), "stride": 1,
               "goal": False}]
    # unfold of 8 × 16 × 344 × 344 (3×3): 8·144·344² floats = 545 MB (520 MiB).
    large = (2, 16, 96, 96) if quick else (8, 16, 344, 344)
    cases.append({"name": f"large-{large[2]}x{large[3]}x{large[1]}", "shape": large, "stride": 1,
                  "goal": True})
    # Depthwise layers (efficientnet_b0, convnext_atto at 64 px) and ConvNeXt's 1×1 MLP convs.
    for c, h, k, s in ((96, 32, 3, 2), (240, 8, 5, 1), (40, 16, 7, 1), (160, 4, 7, 1),
                       (320, 2, 7, 1)):
        cases.append({"name": f"depthwise-{h}x{h}x{c}-k{k}" + (f"s{s}" if s > 1 else ""),
                      "shape": (small, c, h, h), "kernel": k, "stride": s, "groups": c,
                      "goal": False})
    for c, h in ((160, 16), (640, 4)):
        cases.append({"name": f"1x1-{h}x{h}x{c}", "shape": (small, c, h, h), "kernel": 1,
                      "stride": 1, "goal": False})
    return cases


def geometry(case: dict) -> tuple:
    """(kernel, stride, padding, groups) of a case, defaults filled in."""
    kernel = case.get("kernel", 3)
    return kernel, case["stride"], case.get("padding", kernel // 2), case.get("groups", 1)


def _gram_fn(provider, x, geom):
    import consequential_ext as cx
    from consequential_ext.ops import reference
    k, s, p, g = geom
    args = ((k, k), (s, s), (p, p), (1, 1), g, False)
    if provider == "reference":
        return lambda: reference.im2col_gram(x, *args)
    if provider == "cpu":
        assert "cpu" in cx.ops.available_backends("im2col_gram", "cpu"), "CPU kernel not built"
        return lambda: torch.ops.consequential_ext.im2col_gram(x, *args)
    raise ValueError(f"unknown provider {provider!r}")


def _conv_fn(provider, x, geom):
    import consequential_ext as cx
    k, s, p, g = geom
    c = x.shape[1]
    cls = nn.Conv2d if provider == "nn.Conv2d" else cx.CConv2d
    conv = cls(c, c * s if g == 1 else c, k, stride=s, padding=p, groups=g, bias=False)
    x = x.detach().requires_grad_(True)
    grad_out = torch.randn_like(conv(x))

    def step():
        conv.weight.grad = x.grad = None
        conv(x).backward(grad_out)
    return step


def interleaved_medians(fns: dict, reps: int) -> dict:
    """Median (and 20/80 % quantiles) seconds per provider, run side by side: each rep times
    every provider once, the order reversed on alternate reps so drift cancels."""
    for fn in fns.values():
        fn()  # warm-up: thread pools, oneDNN primitives, first-touch allocations
    times = {name: [] for name in fns}
    cpu_times = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            start, cpu_start = time.perf_counter(), time.process_time()
            fns[name]()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=5) if len(ts) >= 2 else [ts[0]] * 4
        # process CPU time: with one thread, immune to waiting for a core on a busy machine
        out[name] = {"median_s": statistics.median(ts), "q20_s": q[0], "q80_s": q[3], "reps": reps,
                     "cpu_median_s": statistics.median(cpu_times[name])}
    return out


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_probe(provider: str, shape, geom) -> dict:
    """Runs in a fresh process: peak RSS of one Gram build over the RSS just before it."""
    warm = torch.randn(2, shape[1], 8, 8)
    _gram_fn(provider, warm, geom)()  # load kernels and thread pools before the baseline
    x = torch.randn(shape)
    base_kb = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark VmHWM to the current RSS (Linux >= 4.0)
    gram = _gram_fn(provider, x, geom)()
    peak_kb = _rss_kb("VmHWM")
    return {"extra_peak_mib": (peak_kb - base_kb) / 1024, "input_mib": x.numel() * 4 / 2**20,
            "gram_mib": gram.numel() * gram.element_size() / 2**20}


def extra_peak_memory(provider: str, shape, geom) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe",
           json.dumps({"provider": provider, "shape": list(shape), "geometry": list(geom)})]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool = False, cases: list[dict] | None = None, reps: int | None = None,
        memory: bool = True, conv: bool = True, log=print) -> list[dict]:
    """One row per case with time, memory and conv ratios (kernel / baseline)."""
    from bench.record import MIN_REPS
    rows = []
    for case in cases or shapes(quick):
        shape, geom = tuple(case["shape"]), geometry(case)
        k, stride, pad, groups = geom
        large = shape[2] * shape[3] >= 100_000
        n = reps or (MIN_REPS if quick else (7 if large else 25))
        torch.manual_seed(0)
        x = torch.randn(shape)
        row = {"name": case["name"], "shape": list(shape), "kernel": [k, k], "stride": stride,
               "padding": pad, "groups": groups, "goal": case["goal"],
               "unfold_mib": shape[0] * shape[1] * k * k * _out(shape[2], k, stride, pad)
               * _out(shape[3], k, stride, pad) * 4 / 2**20}
        t = interleaved_medians({p: _gram_fn(p, x, geom) for p in ("reference", "cpu")}, n)
        row["gram_time"] = t
        row["time_ratio"] = t["cpu"]["median_s"] / t["reference"]["median_s"]
        row["time_cpu_ratio"] = t["cpu"]["cpu_median_s"] / t["reference"]["cpu_median_s"]
        if memory:
            mem = {p: extra_peak_memory(p, shape, geom) for p in ("reference", "cpu")}
            row["gram_memory"] = mem
            ref_mb = mem["reference"]["extra_peak_mib"]
            row["memory_ratio"] = mem["cpu"]["extra_peak_mib"] / ref_mb if ref_mb > 0 else None
        if conv:
            t = interleaved_medians({p: _conv_fn(p, x, geom) for p in ("nn.Conv2d", "CConv2d")}, n)
            row["conv_fwd_bwd_time"] = t
            row["conv_ratio"] = t["CConv2d"]["median_s"] / t["nn.Conv2d"]["median_s"]
            row["conv_cpu_ratio"] = t["CConv2d"]["cpu_median_s"] / t["nn.Conv2d"]["cpu_median_s"]
        log(_summary(row))
        rows.append(row)
    return rows


def _fmt(ratio):
    return "–" if ratio is None else f"{ratio:.3f}"


def _out(size, kernel, stride, padding):
    return (size + 2 * padding - kernel) // stride + 1


def _summary(row):
    parts = [f"{row['name']}: gram {row['gram_time']['cpu']['median_s'] * 1e3:.1f} ms vs "
             f"{row['gram_time']['reference']['median_s'] * 1e3:.1f} ms (x{row['time_ratio']:.3f})"]
    if "memory_ratio" in row:
        m = row["gram_memory"]
        parts.append(f"extra peak {m['cpu']['extra_peak_mib']:.1f} MiB vs "
                     f"{m['reference']['extra_peak_mib']:.1f} MiB (x{_fmt(row['memory_ratio'])})")
    if "conv_ratio" in row:
        parts.append(f"CConv2d/nn.Conv2d fwd+bwd x{row['conv_ratio']:.2f} "
                     f"(CPU time x{row['conv_cpu_ratio']:.2f})")
    return "; ".join(parts)


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# CPU im2col Gram benchmark\n",
             f"`{meta['command']}` — commit {meta.get('commit', 'unknown')}, {meta['timestamp']}, "
             f"{meta['cpu']}, {meta['threads']} threads, "
             f"torch {meta['torch']}, load average before/after {meta['loadavg_before']} / "
             f"{meta['loadavg_after']}.\n",
             "Ratios are kernel / baseline medians measured side by side (goals: time ≤ "
             f"{GOALS['time_ratio']}, extra peak memory ≤ {GOALS['memory_ratio']}, CConv2d fwd+bwd "
             f"≤ {GOALS['conv_ratio']}× nn.Conv2d; stride-2 rows have no goal).\n",
             "Wall-clock medians; the CPU-time ratios (process time) are the fairer measure with "
             "`--threads 1` on a machine shared with other jobs.\n",
             "| case | input (B,C,H,W) | kernel, stride, groups | unfold MiB | gram ref ms | gram cpu ms | time ratio "
             "| (CPU time) | extra MiB ref | extra MiB cpu | memory ratio | nn.Conv2d ms "
             "| CConv2d ms | conv ratio | (CPU time) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g, m, c = r["gram_time"], r.get("gram_memory"), r.get("conv_fwd_bwd_time")
        lines.append(
            f"| {r['name']} | {tuple(r['shape'])} | {r['kernel'][0]}, {r['stride']}, "
            f"{r.get('groups', 1)} | {r['unfold_mib']:.0f} "
            f"| {g['reference']['median_s'] * 1e3:.1f} | {g['cpu']['median_s'] * 1e3:.1f} "
            f"| {r['time_ratio']:.3f} | {r['time_cpu_ratio']:.3f} "
            + (f"| {m['reference']['extra_peak_mib']:.1f} | {m['cpu']['extra_peak_mib']:.1f} "
               f"| {_fmt(r['memory_ratio'])} " if m else "| – | – | – ")
            + (f"| {c['nn.Conv2d']['median_s'] * 1e3:.1f} | {c['CConv2d']['median_s'] * 1e3:.1f} "
               f"| {r['conv_ratio']:.2f} | {r['conv_cpu_ratio']:.2f} |" if c else "| – | – | – | – |"))
    return "\n".join(lines) + "\n"


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    from bench.record import MIN_REPS, at_least, command_line, ensure_out_dir, git_commit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch, few reps (smoke run)")
    parser.add_argument("--out", default=os.path.join(REPO, "results", "gram_cpu"))
    parser.add_argument("--reps", type=at_least(MIN_REPS), default=None,
                        help=f"timed reps per provider (≥ {MIN_REPS})")
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess memory probes")
    parser.add_argument("--no-conv", action="store_true", help="skip CConv2d vs nn.Conv2d")
    parser.add_argument("--threads", type=at_least(1), default=None,
                        help="torch intra-op threads (default: torch's); 1 is the fairest on a "
                             "machine shared with other jobs")
    parser.add_argument("--only", default="",
                        help="comma-separated substrings: run the cases whose names contain one")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_probe:
        probe = json.loads(args.memory_probe)
        print(json.dumps(_memory_probe(probe["provider"], tuple(probe["shape"]),
                                       tuple(probe["geometry"]))))
        return None

    meta = {"command": command_line("python bench/bench_gram.py", argv),
            "commit": git_commit(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "loadavg_before": [round(v, 2) for v in os.getloadavg()], "goals": GOALS}
    cases = select_cases(shapes(args.quick), args.only, parser)
    ensure_out_dir(parser, args.out)
    rows = run(quick=args.quick, cases=cases, reps=args.reps, memory=not args.no_memory,
               conv=not args.no_conv)
    meta["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    stem = f"gram_cpu_{args.threads}thread" if args.threads else "gram_cpu"
    write_record(args.out, stem, meta, rows, markdown(rows, meta))
    return rows


def select_cases(cases: list[dict], only: str, parser) -> list[dict]:
    """The cases whose names contain one of the comma-separated substrings ``only`` (all when
    empty); a parser error when none does."""
    wanted = [w for w in only.split(",") if w]
    chosen = [c for c in cases if not wanted or any(w in c["name"] for w in wanted)]
    if not chosen:
        parser.error(f"--only {only!r} matches no case")
    return chosen


def write_record(out_dir: str, stem: str, meta: dict, rows: list, table: str) -> None:
    """``stem``.json (meta and rows) and ``stem``.md (the table) in ``out_dir``; prints it."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, stem + ".json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, stem + ".md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    if REPO not in sys.path:  # run by path: make the package in this checkout importable
        sys.path.insert(0, REPO)
    main()
