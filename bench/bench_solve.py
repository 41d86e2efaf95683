"""CPU ridge-solve benchmark: the compiled solve vs ATen's Cholesky, with GEMM as the yardstick.

    python bench/bench_solve.py [--quick] [--only a,b] [--out DIR]

For the systems C-layers solve — one D×D Gram with M right-hand sides (D = C·k² + 1 of a
conv, M its outputs) and batches of tiny ones (depthwise layers: one system per channel) —
times side by side in one run (round-robin, CPU process time of all threads, medians):

* ``cx``: ``cx.ops.ridge_solve`` (csrc/cpu: LAPACK's potrf/potrs on the row-major buffers,
  MKL's threads for one large system, a system per thread for a batch, SIMD lanes for many
  tiny ones);
* ``aten``: ``torch.linalg.cholesky_ex`` + ``torch.cholesky_solve`` at torch's thread count
  (MKL's own threading);
* ``aten 1 thread``: the same with ``torch.set_num_threads(1)``;
* ``gemm``: ``gram @ gram`` (systems × D×D·D×D), the rate this CPU reaches on dense work of
  that size.

Rates are GFLOP per CPU-second from D³/3 + 2·M·D² per system (2·D³ for GEMM). Writes
``solve_cpu.json`` and ``solve_cpu.md`` to DIR (default ``results/solve_cpu``). ``run(...)``
returns the rows; importing this module runs nothing.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RIDGE = 1e-3


def cases(quick: bool) -> list[dict]:
    """(name, batch of systems, D, M): ResNet-20 / resnet18 convs, a ViT MLP, depthwise; a
    ViT's qkv and a 4× MLP's first Linear, where the outputs outnumber the inputs (one thread,
    blocked, csrc/cpu/lapack_solve.cpp)."""
    out = [{"name": "conv16", "batch": 1, "d": 145, "m": 16},
           {"name": "conv32", "batch": 1, "d": 289, "m": 32},
           {"name": "conv64", "batch": 1, "d": 577, "m": 64},
           {"name": "conv128", "batch": 1, "d": 1153, "m": 128},
           {"name": "linear768", "batch": 1, "d": 769, "m": 192},
           {"name": "qkv192", "batch": 1, "d": 193, "m": 576},
           {"name": "expand160", "batch": 1, "d": 161, "m": 640},
           {"name": "depthwise-k3x96", "batch": 96, "d": 10, "m": 1},
           {"name": "depthwise-k7x640", "batch": 640, "d": 50, "m": 1}]
    if not quick:
        out += [{"name": "conv256", "batch": 1, "d": 2305, "m": 256},
                {"name": "many-outputs", "batch": 1, "d": 577, "m": 2048}]
    return out


def problem(case: dict, seed: int = 0):
    """A well-conditioned Gram (mean of 4·D outer products per system) and G, float32."""
    g = torch.Generator().manual_seed(seed)
    b, d, m = case["batch"], case["d"], case["m"]
    x = torch.randn(b, d, 4 * d, generator=g)
    gram = (x @ x.transpose(1, 2)) / (4 * d)
    grad = torch.randn(b, m, d, generator=g)
    if b == 1:
        gram, grad = gram[0], grad[0]
    return gram, grad


def providers(gram, grad) -> dict:
    """name → call; each solving grad · (gram + RIDGE·I)⁻¹ (except the GEMM yardstick)."""
    import consequential_ext as cx

    eye = torch.eye(gram.shape[-1])

    def aten():
        chol, _ = torch.linalg.cholesky_ex(gram + RIDGE * eye)
        return torch.cholesky_solve(grad.mT, chol).mT

    def aten_one_thread():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return aten()
        finally:
            torch.set_num_threads(threads)

    return {"cx": lambda: cx.ops.ridge_solve(gram, grad, RIDGE), "aten": aten,
            "aten 1 thread": aten_one_thread, "gemm": lambda: gram @ gram}


def run(quick: bool = False, selected: list[dict] | None = None, repeats: int | None = None):
    from bench.timing import MIN_SAMPLE_S, interleaved, solve_flops

    rows = []
    for case in selected or cases(quick):
        gram, grad = problem(case)
        calls = providers(gram, grad)
        cpu, _ = interleaved(calls, repeats or (5 if quick else 15), min_sample_s=MIN_SAMPLE_S)
        med = {k: statistics.median(v) for k, v in cpu.items()}
        flops = solve_flops(case["d"], case["m"], case["batch"])
        rate = {k: flops / med[k] / 1e9 for k in ("cx", "aten", "aten 1 thread")}
        rate["gemm"] = 2 * case["batch"] * case["d"] ** 3 / med["gemm"] / 1e9
        rows.append({**case, "cpu_ms": {k: v * 1e3 for k, v in med.items()},
                     "gflop_per_cpu_s": rate,
                     "cx_vs_aten": med["cx"] / med["aten"],
                     "cx_vs_aten_1_thread": med["cx"] / med["aten 1 thread"],
                     "cx_rate_vs_gemm": rate["cx"] / rate["gemm"]})
        print(f"{case['name']}: cx {med['cx'] * 1e3:.2f} ms, aten {med['aten'] * 1e3:.2f}, "
              f"aten 1 thread {med['aten 1 thread'] * 1e3:.2f} (CPU)", flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["# CPU ridge-solve benchmark\n",
             f"`{meta['command']}` — commit {meta.get('commit', 'unknown')}, {meta['timestamp']}, "
             f"{meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}.\n",
             "CPU process time (all threads), medians of round-robin samples; rates in GFLOP "
             "per CPU-second (D³/3 + 2·M·D² per system; GEMM 2·D³ per system).\n",
             "| case | systems × D, M | cx ms | aten ms | aten 1 thread ms | cx / aten "
             "| cx / aten 1 thread | cx GFLOP/s | aten GFLOP/s | aten 1 thread GFLOP/s "
             "| GEMM GFLOP/s | cx rate / GEMM's |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms, g = r["cpu_ms"], r["gflop_per_cpu_s"]
        lines.append(f"| {r['name']} | {r['batch']} × {r['d']}, {r['m']} | {ms['cx']:.3f} "
                     f"| {ms['aten']:.3f} | {ms['aten 1 thread']:.3f} | {r['cx_vs_aten']:.2f} "
                     f"| {r['cx_vs_aten_1_thread']:.2f} | {g['cx']:.1f} | {g['aten']:.1f} "
                     f"| {g['aten 1 thread']:.1f} | {g['gemm']:.1f} | {r['cx_rate_vs_gemm']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    from bench.bench_gram import _cpu_name, select_cases, write_record
    from bench.record import MIN_REPS, at_least, command_line, ensure_out_dir, git_commit

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats")
    parser.add_argument("--out", default=os.path.join(REPO, "results", "solve_cpu"))
    parser.add_argument("--repeats", type=at_least(MIN_REPS), default=None,
                        help=f"samples per provider (≥ {MIN_REPS})")
    parser.add_argument("--only", default="",
                        help="comma-separated substrings: run the cases whose names contain one")
    args = parser.parse_args(argv)
    selected = select_cases(cases(args.quick), args.only, parser)
    ensure_out_dir(parser, args.out)
    meta = {"command": command_line("python bench/bench_solve.py", argv),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": _cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "commit": git_commit()}
    rows = run(args.quick, selected, args.repeats)
    write_record(args.out, "solve_cpu", meta, rows, markdown(rows, meta))
    return rows


if __name__ == "__main__":
    if REPO not in sys.path:  # run by path: make the package in this checkout importable
        sys.path.insert(0, REPO)
    main()
