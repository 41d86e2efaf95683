#!/usr/bin/env python
"""The one script a lent GPU runs, within its --budget-s (7.5 minutes by default).

    python bench/gpu_suite.py --out DIR [--quick] [--skip-build] [--skip-tests] [--budget-s S]

1. builds the CUDA extension in place (FORCE_CUDA=1, nvcc for the device's architecture);
2. runs the CUDA tests (``pytest -m cuda tests/test_cuda_ops.py``), then the Triton tests with
   the kernels compiled (TRITON_INTERPRET=0);
3. times CUDA vs Triton vs reference vs cuDNN on the ResNet-20 (CIFAR) conv shapes and a
   VGG-style one — im2col_gram and ridge_solve — checks each result against a float64
   reference, and measures the matmul ceiling;
4. runs the harness's GPU sections (``python -m bench --only layer_step,real_models
   --device cuda``: C-layer and C-SGD steps against cuDNN and plain SGD) into --out/bench;
5. runs compute-sanitizer's memcheck and racecheck over subsets of the CUDA tests (every
   kernel and placement, small shapes), then bench/bench_triton.py's timings;
6. runs the rest of the test suite with the Triton kernels compiled, with the budget left;
Without a CUDA device the build stage fails (its reason in results.md and build.log) and
the script exits 1; with --skip-build every GPU stage reports "no CUDA device" the same way.
It writes results.json and results.md (a short table) to --out (default: $OUT), after
every stage, so a run cut short still leaves what it measured. Stages stop early rather
than overrun --budget-s. Logs of the build and the test runs go beside the results.

The lent machine returns at most 8 files from $OUT, so write elsewhere and pack:
    python3 bench/gpu_suite.py --out /tmp/suite; tar czf $OUT/suite.tgz -C /tmp suite
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the timings import the in-place build from the checkout
    sys.path.insert(0, str(ROOT))
# One call of the lent machine (start and transfers took 30–60 s on the H200) within half
# the 15 minutes a session gets, so that a second call fits. Stages in results/gpu_h200:
# build 21–30 s, CUDA tests ~1 min, Triton tests ~1 min, timings ~1 min, harness ~70 s,
# memcheck under 1 min.
DEFAULT_BUDGET_S = 450.0
RESERVE_S = 15.0           # kept back from every stage for writing the results

# (name, batch, C_in, C_out, H, W, kernel, stride, padding): every distinct conv of
# ResNet-20 on CIFAR-10 at batch 128, and a VGG-style layer whose D = 2304 takes the
# cuSOLVER factorisation path.
CONV_SHAPES = [
    ("resnet20.conv1", 128, 3, 16, 32, 32, 3, 1, 1),
    ("resnet20.stage1", 128, 16, 16, 32, 32, 3, 1, 1),
    ("resnet20.stage2.down", 128, 16, 32, 32, 32, 3, 2, 1),
    ("resnet20.stage2", 128, 32, 32, 16, 16, 3, 1, 1),
    ("resnet20.stage3.down", 128, 32, 64, 16, 16, 3, 2, 1),
    ("resnet20.stage3", 128, 64, 64, 8, 8, 3, 1, 1),
    ("vgg.conv3", 64, 256, 256, 16, 16, 3, 1, 1),
]
QUICK_SHAPES = ("resnet20.stage1", "resnet20.stage3.down", "vgg.conv3")
# Many small systems in one launch (e.g. a grouped conv's per-group Grams): (batch, M, D).
# Many-systems cases straddle the CUDA backend's factor-placement choice (shared memory /
# global workspace / cuSOLVER).
BATCHED_SOLVES = [("many-small", 64, 16, 37), ("many-medium", 64, 32, 300),
                  ("grouped-medium", 8, 64, 289),
                  # where Triton led the first H200 run (results/gpu_h200): more points
                  # before batches of medium systems are routed to it
                  ("batch16-D400", 16, 32, 400), ("batch32-D256", 32, 32, 256),
                  ("batch8-D500", 8, 64, 500)]

# compute-sanitizer's subsets of tests/test_cuda_ops.py. memcheck: float32 Grams on both
# kernels, float32 solves on every placement but the two largest D, non-finite input, bad
# input (~6 s under it on an H200). racecheck (shared-memory hazards, ~2.4 s a test there):
# the Grams, and the solves whose factor sits in shared memory or the global workspace.
SANITIZED_TESTS = {
    "memcheck": "(dtype0 and (shift or tiled)) or (work0-out_dtype0 and not batch4 and not batch5)"
                " or non_finite or bad_input",
    "racecheck": "(dtype0 and (shift or tiled)) or (work0-out_dtype0 and (batch0 or batch2))",
}
STAGES = ("build", "tests_cuda", "tests_triton", "timings", "harness", "memcheck", "racecheck",
          "triton_kernels", "tests_all")

# triton.ieee: Triton's Gram in exact float32 (no tf32), the candidate for float32's default.
GRAM_PROVIDERS = ("cuda", "cuda.tiled", "cuda.shift", "triton", "triton.ieee", "reference",
                  "cudnn.wgrad")
SOLVE_PROVIDERS = ("cuda", "triton", "reference")


class Budget:
    """Seconds left of the run's wall-clock budget (clock injectable for tests)."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self.seconds, self.clock, self.start = seconds, clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, seconds: float) -> bool:
        return self.remaining() - RESERVE_S >= seconds


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output directory (default: $OUT, else results/gpu_suite)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and shorter timings")
    parser.add_argument("--skip-build", action="store_true", help="use the extension already built")
    parser.add_argument("--skip-tests", action="store_true", help="run no pytest")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"wall-clock budget of the whole run (default {DEFAULT_BUDGET_S:g})")
    args = parser.parse_args(argv)
    if not args.budget_s > RESERVE_S:
        parser.error(f"--budget-s must exceed {RESERVE_S:g} seconds, got {args.budget_s:g}")
    return args


def resolve_out_dir(out_arg, environ) -> Path:
    if out_arg:
        return Path(out_arg)
    if environ.get("OUT"):
        return Path(environ["OUT"])
    return ROOT / "results" / "gpu_suite"


def selected_shapes(quick: bool):
    return [s for s in CONV_SHAPES if s[0] in QUICK_SHAPES] if quick else list(CONV_SHAPES)


def run_logged(cmd, log_path: Path, timeout: float, env=None) -> dict:
    """Run `cmd` from the repository root, output to `log_path`; rc 124 on timeout."""
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(map(str, cmd)) + "\n")
        log.flush()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                timeout=max(timeout, 1.0)).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    with open(log_path) as log:
        tail = log.read().replace(f"{ROOT}{os.sep}", "")[-2000:]   # paths relative to the checkout
    return {"cmd": " ".join(map(str, cmd)), "rc": rc, "seconds": round(time.monotonic() - start, 1),
            "log": log_path.name, "tail": tail}


def _child_env(**extra):
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def build_extension(out_dir: Path, budget: Budget) -> dict:
    """setup.py build_ext --inplace with the CUDA sources, for this device's architecture."""
    import torch
    arch = os.environ.get("CX_CUDA_ARCH_LIST")
    if not arch and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        arch = "90a" if (major, minor) == (9, 0) else f"{major}{minor}"
    env = _child_env(FORCE_CUDA=1, MAX_JOBS=os.cpu_count() or 4, NVCC_THREADS=2,
                     **({"CX_CUDA_ARCH_LIST": arch} if arch else {}))
    result = run_logged([sys.executable, "setup.py", "-q", "build_ext", "--inplace"],
                        out_dir / "build.log", budget.remaining() - RESERVE_S, env)
    result["arch"] = arch
    return result


def _pytest_summary(tail: str) -> str:
    lines = [ln for ln in tail.splitlines() if ln.strip()]
    return lines[-1].strip("= ") if lines else ""


TRITON_TESTS = "tests/test_triton.py"
PYTEST = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
CUDA_TESTS = ["-m", "cuda", "tests/test_cuda_ops.py"]


def run_tests(out_dir: Path, budget: Budget, which: str) -> dict:
    """`which`: "cuda" (the CUDA tests), "triton" (the Triton tests, compiled) or "all" (the
    rest of the suite, Triton compiled). The Triton tests go before the rest so that a run cut
    short by its budget has them."""
    env = _child_env(TRITON_INTERPRET=0)
    if which == "cuda":
        cmd = PYTEST + CUDA_TESTS
        timeout = min(150.0, budget.remaining() - RESERVE_S)
    elif which == "triton":
        cmd = PYTEST + [TRITON_TESTS]
        timeout = min(180.0, budget.remaining() - RESERVE_S)
    else:
        cmd = PYTEST + ["tests", f"--ignore={TRITON_TESTS}"]
        timeout = budget.remaining() - RESERVE_S
    result = run_logged(cmd, out_dir / f"pytest_{which}.log", timeout, env)
    result["summary"] = _pytest_summary(result["tail"])
    return result


def run_harness(out_dir: Path, budget: Budget) -> dict:
    """The harness's GPU sections into out_dir/bench (report.md, results.json, plots)."""
    cmd = [sys.executable, "-m", "bench", "--only", "layer_step,real_models", "--device", "cuda",
           "--out", str(out_dir / "bench")]
    return run_logged(cmd, out_dir / "harness.log", min(180.0, budget.remaining() - RESERVE_S))


def run_sanitizer(out_dir: Path, budget: Budget, tool_name: str) -> dict:
    """compute-sanitizer --tool ``tool_name`` (memcheck, racecheck) over its SANITIZED_TESTS;
    rc 9 when it reports errors."""
    tool = shutil.which("compute-sanitizer")
    if tool is None:
        return {"skipped": "no compute-sanitizer on PATH"}
    cmd = [tool, "--tool", tool_name, "--error-exitcode", "9", "--print-limit", "20",
           *PYTEST, *CUDA_TESTS, "-k", SANITIZED_TESTS[tool_name]]
    result = run_logged(cmd, out_dir / f"{tool_name}.log", min(120.0, budget.remaining() - RESERVE_S))
    result["summary"] = _pytest_summary(result["tail"])
    return result


def environment_info() -> dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "host": platform.node(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}",
                    sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


# ---- timing (GPU) --------------------------------------------------------------------------

def _bench_ms(fn, quick):
    """Median and 20/80 % of a CUDA callable, in ms (triton.testing.do_bench when available)."""
    import torch
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=10 if quick else 25,
                                    rep=30 if quick else 100)
        return median, p20, p80
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(10 if quick else 30):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return statistics.median(times), times[len(times) // 5], times[(4 * len(times)) // 5]


def _rel_err(got, want) -> float:
    got, want = got.double(), want.double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def measure_matmul_ceiling(quick) -> dict:
    """TFLOP/s of a large square matmul: bf16, and float32 with TF32 allowed."""
    import torch
    n = 4096 if quick else 8192
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("tf32", torch.float32)):
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            ms = _bench_ms(lambda: a @ b, quick)[0]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        out[f"{name}_tflops"] = round(2 * n ** 3 / (ms * 1e-3) / 1e12, 1)
    return out


def _gram_callables(x, shape):
    """provider -> (callable, is_gram): the Gram providers and the cuDNN weight gradient."""
    import torch
    import consequential_ext as cx
    from consequential_ext.ops import reference
    _, _, _, cout, _, _, k, s, p = shape

    def op(backend, algorithm=None):
        def run():
            if algorithm:
                os.environ["CX_CUDA_GRAM_ALGORITHM"] = algorithm
            try:
                with cx.ops.use_backend(backend):
                    return cx.ops.im2col_gram(x, k, s, p, 1, bias=True)
            finally:
                os.environ.pop("CX_CUDA_GRAM_ALGORITHM", None)
        return run

    weight = torch.randn(cout, x.shape[1], k, k, device=x.device, dtype=x.dtype)
    grad_out = torch.nn.functional.conv2d(x, weight, stride=s, padding=p)

    def wgrad():
        return torch.ops.aten.convolution_backward(grad_out, x, weight, None, [s, s], [p, p], [1, 1],
                                                   False, [0, 0], 1, [False, True, False])[1]

    available = cx.ops.available_backends("im2col_gram", x.device)
    calls = {}
    if "cuda" in available:
        calls["cuda"] = (op("cuda"), True)
        calls["cuda.tiled"] = (op("cuda", "tiled"), True)
        if s == 1 and k <= 3:
            calls["cuda.shift"] = (op("cuda", "shift"), True)
    if "triton" in available:
        calls["triton"] = (op("triton"), True)
        if x.dtype == torch.float32:
            from consequential_ext.ops import triton as triton_ops
            calls["triton.ieee"] = (lambda: triton_ops.im2col_gram(
                x, (k, k), (s, s), (p, p), (1, 1), 1, True, input_precision="ieee")[0], True)
    calls["reference"] = (lambda: reference.im2col_gram(x, (k, k), (s, s), (p, p), (1, 1), 1, True)[0], True)
    calls["cudnn.wgrad"] = (wgrad, False)
    return calls


def time_gram(shape, dtype_name, quick) -> list:
    import torch
    from consequential_ext.ops import reference
    name, b, cin, _, h, w, k, s, p = shape
    x = torch.randn(b, cin, h, w, device="cuda", dtype=getattr(torch, dtype_name))
    x = x.contiguous(memory_format=torch.channels_last)
    want = reference.im2col_gram(x.double(), (k, k), (s, s), (p, p), (1, 1), 1, True)[0]
    d = cin * k * k + 1
    patches = b * ((h + 2 * p - k) // s + 1) * ((w + 2 * p - k) // s + 1)
    rows = []
    for provider, (fn, is_gram) in _gram_callables(x, shape).items():
        row = {"op": "im2col_gram", "shape": name, "dtype": dtype_name, "provider": provider,
               "D": d, "patches": patches}
        try:
            result = fn()
            if is_gram:
                row["max_rel_err"] = _rel_err(result, want)
            ms, p20, p80 = _bench_ms(fn, quick)
            row.update(ms=ms, ms_p20=p20, ms_p80=p80,
                       tflops=2.0 * patches * d * d / (ms * 1e-3) / 1e12 if is_gram else None)
        except Exception as exc:  # one provider failing must not stop the others
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
    return rows


def time_solve(name, batch, m, d, quick, gram=None) -> list:
    import torch
    import consequential_ext as cx
    from consequential_ext.ops import reference
    if gram is None:
        a = torch.randn(batch, d, d + 5, device="cuda")
        gram = a @ a.transpose(1, 2) / d
    grad = torch.randn(batch, m, d, device="cuda")
    ridge = 1e-3 * float(gram.diagonal(dim1=-2, dim2=-1).mean())
    want = reference.ridge_solve(gram.double(), grad.double(), ridge)
    calls = {}
    for backend in ("cuda", "triton"):
        if backend in cx.ops.available_backends("ridge_solve", "cuda"):
            calls[backend] = (lambda be=backend: _with_backend(be, cx.ops.ridge_solve, gram, grad, ridge))
    calls["reference"] = lambda: reference.ridge_solve(gram, grad, ridge)
    rows = []
    for provider, fn in calls.items():
        row = {"op": "ridge_solve", "shape": name, "dtype": "float32", "provider": provider,
               "batch": batch, "M": m, "D": d}
        try:
            row["max_rel_err"] = _rel_err(fn(), want)
            ms, p20, p80 = _bench_ms(fn, quick)
            flops = batch * (d ** 3 / 3 + 2 * m * d * d)
            row.update(ms=ms, ms_p20=p20, ms_p80=p80, tflops=flops / (ms * 1e-3) / 1e12)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(row)
    return rows


def _with_backend(backend, fn, *args):
    import consequential_ext as cx
    with cx.ops.use_backend(backend):
        return fn(*args)


def time_triton_suite(out_dir: Path, budget: Budget, quick: bool) -> dict:
    """bench/bench_triton.py's timings, in a child process so its time stays bounded."""
    if not (ROOT / "bench" / "bench_triton.py").exists():
        return {"skipped": "bench/bench_triton.py not present"}
    if not budget.allows(60):
        return {"skipped": "out of time budget"}
    out_json = out_dir / "triton_kernels.json"
    code = ("import json, sys; sys.path.insert(0, 'bench'); from bench_triton import time_triton_kernels; "
            f"rows = time_triton_kernels('cuda', quick={quick!r}); "
            f"open({str(out_json)!r}, 'w').write(json.dumps(rows, default=str))")
    result = run_logged([sys.executable, "-c", code], out_dir / "triton_kernels.log",
                        min(150.0, budget.remaining() - RESERVE_S), _child_env(TRITON_INTERPRET=0))
    if result["rc"] == 0 and out_json.exists():
        result["rows"] = json.loads(out_json.read_text())
    return result


def time_everything(out_dir: Path, budget: Budget, quick: bool) -> dict:
    import torch
    if not torch.cuda.is_available():
        return {"rc": 1, "error": "no CUDA device"}
    torch.backends.cuda.matmul.allow_tf32 = False   # references in true float32
    timings = {"rows": [], "skipped": []}
    timings["matmul_ceiling"] = measure_matmul_ceiling(quick)
    dtypes = ("float32",) if quick else ("float32", "bfloat16")
    for shape in selected_shapes(quick):
        for dtype_name in dtypes:
            if not budget.allows(20):
                timings["skipped"].append(f"im2col_gram {shape[0]} {dtype_name}")
                continue
            timings["rows"] += time_gram(shape, dtype_name, quick)
        if not budget.allows(20):
            timings["skipped"].append(f"ridge_solve {shape[0]}")
            continue
        name, b, cin, cout, h, w, k, s, p = shape
        x = torch.randn(b, cin, h, w, device="cuda")
        from consequential_ext.ops import reference
        gram = reference.im2col_gram(x, (k, k), (s, s), (p, p), (1, 1), 1, True) / b
        timings["rows"] += time_solve(name, 1, cout, gram.shape[-1], quick, gram)
    for name, batch, m, d in BATCHED_SOLVES[:1] if quick else BATCHED_SOLVES:
        if budget.allows(20):
            timings["rows"] += time_solve(name, batch, m, d, quick)
        else:
            timings["skipped"].append(f"ridge_solve {name}")
    return timings


# ---- report ----------------------------------------------------------------------------------

def format_table(results: dict) -> str:
    """Markdown: stage outcomes, then one line per (op, shape, dtype), providers as columns (ms)."""
    env = results.get("environment") or {}
    lines = [f"# GPU suite — {env.get('device', 'no CUDA device')} (torch {env.get('torch', '?')})", ""]
    for stage in STAGES:
        r = results.get(stage)
        if r is None or (stage == "timings" and "error" not in r):
            continue
        detail = r.get("error") or r.get("summary") or r.get("skipped") or f"{r.get('seconds', '?')} s"
        if r.get("rc") not in (None, 0) and not r.get("error") and r.get("tail", "").strip():
            detail += " — " + r["tail"].strip().splitlines()[-1][:300]   # why it failed
        lines.append(f"- **{stage}**: rc={r.get('rc', '-')} — {detail}")
    timings = results.get("timings") or {}
    if timings.get("matmul_ceiling"):
        lines.append("- **matmul ceiling**: " + ", ".join(f"{k} {v}" for k, v in
                                                         timings["matmul_ceiling"].items()))
    rows = timings.get("rows") or []
    if rows:
        providers = sorted({r["provider"] for r in rows},
                           key=lambda p: (GRAM_PROVIDERS + SOLVE_PROVIDERS + (p,)).index(p))
        lines += ["", "| op | shape | dtype | D | " + " | ".join(providers) + " | worst rel. err |",
                  "|---|---|---|---|" + "---|" * len(providers) + "---|"]
        groups = {}
        for r in rows:
            groups.setdefault((r["op"], r["shape"], r["dtype"]), []).append(r)
        for (op, shape, dtype), group in groups.items():
            by_provider = {r["provider"]: r for r in group}
            cells = []
            for p in providers:
                r = by_provider.get(p)
                cells.append("" if r is None else ("error" if "error" in r else f"{r['ms']:.3f}"))
            errs = [r["max_rel_err"] for r in group if r.get("max_rel_err") is not None]
            worst = f"{max(errs):.1e}" if errs else ""
            lines.append(f"| {op} | {shape} | {dtype} | {group[0].get('D', '')} | " + " | ".join(cells)
                         + f" | {worst} |")
        lines += ["", "Times in ms (median); errors are max |Δ| / max |ref| against float64."]
    for item in timings.get("skipped") or []:
        lines.append(f"- skipped (time budget): {item}")
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, results: dict):
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(results, indent=2, default=str, allow_nan=True))
    md_path.write_text(format_table(results))
    return json_path, md_path


def _stage(results, name, out_dir, fn):
    """Run one stage; an exception is recorded under `name` instead of ending the run."""
    try:
        results[name] = fn()
    except Exception as exc:
        results[name] = {"rc": 1, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    write_results(out_dir, results)
    return results[name]


def main(argv=None, environ=None) -> int:
    args = parse_args(argv)
    environ = os.environ if environ is None else environ
    out_dir = resolve_out_dir(args.out, environ)
    budget = Budget(args.budget_s)
    # Not --out: where results.json lies is no result (and a scratch path of the GPU machine).
    results = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "budget_s": args.budget_s}
    write_results(out_dir, results)
    _stage(results, "environment", out_dir, environment_info)
    if args.skip_build:
        results["build"] = {"skipped": "--skip-build"}
    else:
        _stage(results, "build", out_dir, lambda: build_extension(out_dir, budget))
    built = results["build"].get("rc", 0) == 0
    failed = not built
    # Correctness before speed, then the rest of the suite with whatever budget is left; the
    # first test stage and the kernel timings run whatever the budget says.
    runs = {"tests_cuda": lambda: run_tests(out_dir, budget, "cuda"),
            "tests_triton": lambda: run_tests(out_dir, budget, "triton"),
            "timings": lambda: time_everything(out_dir, budget, args.quick),
            "harness": lambda: run_harness(out_dir, budget),
            "memcheck": lambda: run_sanitizer(out_dir, budget, "memcheck"),
            "racecheck": lambda: run_sanitizer(out_dir, budget, "racecheck"),
            "triton_kernels": lambda: time_triton_suite(out_dir, budget, args.quick),
            "tests_all": lambda: run_tests(out_dir, budget, "all")}
    for stage, run in runs.items() if built else ():
        if args.skip_tests and stage in ("tests_cuda", "tests_triton", "memcheck", "racecheck",
                                         "tests_all"):
            continue
        if stage in ("tests_cuda", "timings") or budget.allows(60):
            failed |= _stage(results, stage, out_dir, run).get("rc", 0) != 0
        else:
            results[stage] = {"skipped": "out of time budget"}
    results["elapsed_s"] = round(budget.elapsed(), 1)
    json_path, md_path = write_results(out_dir, results)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path} in {results['elapsed_s']} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
