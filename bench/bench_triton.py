"""GPU timings of the Triton kernels (ops/triton), for bench/gpu_suite.py.

Importable anywhere: no GPU query and no kernel import at module level (the caller sets
TRITON_INTERPRET=0 before calling). Every function returns a list of flat dicts (one per
provider × shape) ready for a CSV: median and 20/80 % times from
``triton.testing.do_bench``, analytic FLOP counts turned into TFLOP/s, the fraction of the
device's measured matmul ceiling, and the kernel's error against the reference.

Providers: ``triton-<precision>`` (ours, the implicit-im2col GEMM), ``triton-shift-<precision>``
(ours, stride-1 shifted correlations), ``triton`` (ours, other kernels), ``reference``
(ops/reference.py: explicit unfold + matmul, torch.linalg), ``cudnn`` (the convolution
weight gradient of the same layer, for scale), ``torch`` (cholesky_ex / a dense matmul).
"""
from __future__ import annotations

import math
import time

# Conv layers (B, C, H, W, kernel, stride, padding, dilation, groups): ResNet-like stages,
# a depthwise and a pointwise layer.
CONV_SHAPES = [
    (64, 64, 56, 56, 3, 1, 1, 1, 1),
    (64, 128, 28, 28, 3, 1, 1, 1, 1),
    (64, 256, 14, 14, 3, 1, 1, 1, 1),
    (64, 512, 7, 7, 3, 1, 1, 1, 1),
    (64, 256, 28, 28, 1, 1, 0, 1, 1),
    (64, 128, 56, 56, 3, 2, 1, 1, 1),
    (64, 256, 28, 28, 3, 1, 1, 1, 256),
]
LINEAR_SHAPES = [(128, 1024), (256, 4096), (4096, 1024)]         # (N rows, features)
SOLVE_SHAPES = [((1,), 64, 577), ((1,), 512, 2305), ((1,), 512, 4609), ((256,), 1, 10),
                ((16,), 128, 64)]                                # (batch, M, D)
CHOLESKY_SHAPES = [(256, 10), (64, 28), (16, 64), (1024, 16)]    # (batch, D)
QUICK = {"conv": CONV_SHAPES[2:4], "linear": LINEAR_SHAPES[:1], "solve": SOLVE_SHAPES[:2],
         "cholesky": CHOLESKY_SHAPES[:2]}


class Deadline:
    """Wall-clock budget shared by the timing functions: a case that starts after it has
    passed is reported as skipped, so a bounded caller still gets every finished row
    (Triton compiles each new specialisation on first call, seconds apiece)."""

    def __init__(self, seconds=None, clock=time.monotonic):
        self._clock = clock
        self._end = None if seconds is None else clock() + seconds

    def passed(self):
        return self._end is not None and self._clock() > self._end


def _skipped(kernel, shape):
    return {"kernel": kernel, "shape": shape, "skipped": "time budget"}


def _bench(fn):
    from triton.testing import do_bench
    median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
    return {"ms": median, "ms_p20": p20, "ms_p80": p80}


def _environment(device):
    import torch
    import triton
    return {"device_name": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "triton": triton.__version__}


def measure_matmul_ceiling(device, dtype, n=8192):
    """TFLOP/s of a large square matmul in ``dtype`` (float32 with tf32 allowed): the
    ceiling a GEMM-shaped kernel is judged against."""
    import torch
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        timing = _bench(lambda: a @ b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return 2 * n ** 3 / timing["ms"] / 1e9


def _rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def time_gram(device, shapes=CONV_SHAPES, dtypes=("float32", "bfloat16"), deadline=None):
    """im2col_gram: triton (tf32 and ieee for float32) vs reference vs cuDNN weight grad."""
    import torch

    from consequential_ext.ops import reference
    from consequential_ext.ops import triton as triton_ops
    ceilings = {}   # dtype name → the matmul ceiling, measured once per dtype
    env, rows = _environment(device), []
    deadline = deadline or Deadline()
    for (b, c, h, w, k, s, p, d, g) in shapes:
        for dtype_name in dtypes:
            label = f"B{b}C{c}H{h}W{w}k{k}s{s}p{p}d{d}g{g}"
            if deadline.passed():
                rows.append(_skipped("im2col_gram", f"{label} {dtype_name}"))
                continue
            dtype = getattr(torch, dtype_name)
            x = torch.randn(b, c, h, w, device=device, dtype=dtype)
            oh = (h + 2 * p - d * (k - 1) - 1) // s + 1
            ow = (w + 2 * p - d * (k - 1) - 1) // s + 1
            dim = c // g * k * k
            dense_flops = 2 * g * b * oh * ow * dim * dim  # the GEMM P Pᵀ it replaces
            if dtype_name not in ceilings:
                ceilings[dtype_name] = measure_matmul_ceiling(device, dtype)
            want = reference.im2col_gram(x, (k, k), (s, s), (p, p), (d, d), g, False)
            providers = {"reference": lambda: reference.im2col_gram(
                x, (k, k), (s, s), (p, p), (d, d), g, False)}
            methods = ("implicit", "shift") if s == 1 else ("implicit",)
            for precision in (("tf32", "ieee") if dtype_name == "float32" else ("ieee",)):
                for method in methods:
                    label = "triton" if method == "implicit" else "triton-shift"
                    providers[f"{label}-{precision}"] = (
                        lambda precision=precision, method=method: triton_ops.im2col_gram(
                            x, k, s, p, d, g, False, input_precision=precision, method=method))
            weight = torch.randn(c, c // g, k, k, device=device, dtype=dtype)
            grad_out = torch.randn(b, c, oh, ow, device=device, dtype=dtype)
            providers["cudnn"] = lambda: torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, (s, s), (p, p), (d, d), False, (0, 0), g,
                (False, True, False))
            for name, fn in providers.items():
                timing = _bench(fn)
                # cuDNN's weight gradient does 2·B·OH·OW·C_out·D flops: same count here.
                tflops = dense_flops / timing["ms"] / 1e9
                rows.append({"kernel": "im2col_gram", "provider": name, "dtype": dtype_name,
                             "shape": label, **timing,
                             "tflops": tflops, "ceiling_tflops": ceilings[dtype_name],
                             "fraction_of_ceiling": tflops / ceilings[dtype_name],
                             "max_rel_err": (_rel_err(fn(), want) if name.startswith("triton")
                                             else float("nan")), **env})
    return rows


def time_linear_gram(device, shapes=LINEAR_SHAPES, dtype_name="float32", deadline=None):
    """N-side and D-side Gram of a Linear input: triton vs a plain matmul."""
    import torch

    from consequential_ext.ops import triton as triton_ops
    env, rows = _environment(device), []
    dtype = getattr(torch, dtype_name)
    deadline = deadline or Deadline()
    for n, f in shapes:
        if deadline.passed():
            rows.append(_skipped("linear_gram", f"N{n}F{f}"))
            continue
        x = torch.randn(n, f, device=device, dtype=dtype)
        for side, want_fn, size in (("n", lambda: x.float() @ x.float().T, n),
                                    ("d", lambda: x.float().T @ x.float(), f)):
            flops = 2 * size * size * (f if side == "n" else n)
            want = want_fn()
            for name, fn in (("triton", lambda side=side: triton_ops.linear_gram(x, False, side)),
                             ("torch", want_fn)):
                timing = _bench(fn)
                rows.append({"kernel": f"linear_gram_{side}", "provider": name,
                             "dtype": dtype_name, "shape": f"N{n}F{f}", **timing,
                             "tflops": flops / timing["ms"] / 1e9,
                             "max_rel_err": _rel_err(fn(), want), **env})
    return rows


def time_ridge_solve(device, shapes=SOLVE_SHAPES, ridge=1e-3, deadline=None):
    """Cholesky + fused two solves + cast (triton) vs reference.ridge_solve."""
    import torch

    from consequential_ext.ops import reference
    from consequential_ext.ops import triton as triton_ops
    env, rows = _environment(device), []
    deadline = deadline or Deadline()
    for batch, m, d in shapes:
        if deadline.passed():
            rows.append(_skipped("ridge_solve", f"batch{batch}M{m}D{d}"))
            continue
        x = torch.randn(*batch, d, 2 * d, device=device)
        gram = x @ x.transpose(-1, -2) / (2 * d)
        grad = torch.randn(*batch, m, d, device=device)
        flops = math.prod(batch) * (d ** 3 / 3 + 2 * m * d * d)  # potrf + two trsm
        want = reference.ridge_solve(gram.double(), grad.double(), ridge)
        for name, fn in (("triton", lambda: triton_ops.ridge_solve(gram, grad, ridge,
                                                                    torch.bfloat16)),
                         ("reference", lambda: reference.ridge_solve(gram, grad, ridge,
                                                                     torch.bfloat16))):
            timing = _bench(fn)
            rows.append({"kernel": "ridge_solve", "provider": name, "dtype": "float32->bfloat16",
                         "shape": f"batch{batch}M{m}D{d}", **timing,
                         "tflops": flops / timing["ms"] / 1e9,
                         "max_rel_err": _rel_err(fn(), want), **env})
    return rows


def time_cholesky(device, shapes=CHOLESKY_SHAPES, ridge=1e-3, deadline=None):
    """Register-resident batched Cholesky (triton) vs torch.linalg.cholesky_ex: the numbers
    that should set ops/triton/solve.py's TRITON_CHOLESKY_MAX_D."""
    import torch

    from consequential_ext.ops.triton import solve
    env, rows = _environment(device), []
    deadline = deadline or Deadline()
    for batch, d in shapes:
        if deadline.passed():
            rows.append(_skipped("cholesky", f"batch{batch}D{d}"))
            continue
        x = torch.randn(batch, d, 2 * d, device=device)
        gram = x @ x.transpose(1, 2) / (2 * d)
        eye = torch.eye(d, device=device)
        want = torch.linalg.cholesky(gram.double() + ridge * eye.double())
        for name, fn in (("triton", lambda: torch.ops.consequential_ext_triton.cholesky(gram,
                                                                                         ridge)),
                         ("torch", lambda: torch.linalg.cholesky_ex(gram + ridge * eye))):
            timing = _bench(fn)
            rows.append({"kernel": "cholesky", "provider": name, "dtype": "float32",
                         "shape": f"batch{batch}D{d}", **timing,
                         "tflops": batch * d ** 3 / 3 / timing["ms"] / 1e9,
                         "max_rel_err": _rel_err(fn()[0], want),
                         "triton_max_d": solve.TRITON_CHOLESKY_MAX_D, **env})
    return rows


def sweep_gram_configs(device, shape=CONV_SHAPES[2], dtype_name="float32",
                       blocks=((64, 32), (64, 64), (128, 32), (128, 64)), deadline=None):
    """Gram kernel tile sizes (block_d, block_p) on one layer, for tuning the defaults."""
    import torch

    from consequential_ext.ops import triton as triton_ops
    b, c, h, w, k, s, p, d, g = shape
    x = torch.randn(b, c, h, w, device=device, dtype=getattr(torch, dtype_name))
    env, rows = _environment(device), []
    deadline = deadline or Deadline()
    for block_d, block_p in blocks:
        if deadline.passed():
            rows.append(_skipped("im2col_gram_sweep", f"block_d{block_d}block_p{block_p}"))
            continue
        timing = _bench(lambda: triton_ops.im2col_gram(x, k, s, p, d, g, False,
                                                       block_d=block_d, block_p=block_p))
        rows.append({"kernel": "im2col_gram_sweep", "provider": "triton", "dtype": dtype_name,
                     "shape": f"B{b}C{c}H{h}W{w}k{k}", "block_d": block_d, "block_p": block_p,
                     **timing, **env})
    return rows


def time_triton_kernels(device="cuda", shapes=None, quick=False, budget_s=120.0):
    """Every Triton benchmark above, most important first; ``shapes`` maps "conv" /
    "linear" / "solve" / "cholesky" to shape lists (missing keys: defaults, or QUICK's with
    ``quick``). Cases starting after ``budget_s`` seconds come back as skipped rows."""
    shapes = dict(QUICK if quick else {}, **(shapes or {}))
    deadline = Deadline(budget_s)
    return (time_gram(device, shapes.get("conv", CONV_SHAPES), deadline=deadline)
            + time_ridge_solve(device, shapes.get("solve", SOLVE_SHAPES), deadline=deadline)
            + time_cholesky(device, shapes.get("cholesky", CHOLESKY_SHAPES), deadline=deadline)
            + time_linear_gram(device, shapes.get("linear", LINEAR_SHAPES), deadline=deadline)
            + ([] if quick else sweep_gram_configs(device, deadline=deadline)))
