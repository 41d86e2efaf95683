"""The matched weight gradient G (A + λI)⁻¹ of docs/design.md §2, for Linear and Conv2d inputs.

A = X Xᵀ / N with X the layer input as columns (plus a constant-1 row for a bias). By the
push-through identity G (XXᵀ/N + λI)⁻¹ = dZ (XᵀX/N + λI)⁻¹ Xᵀ (G = dZ Xᵀ), so the solve
can run on the row side (D × D) or the column side (P × P, one column per input row or
patch); ``solve_side`` picks the smaller one.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

from . import distributed, ops
from .ops.reference import accumulate_dtype, im2col


def solve_side(p: int, d: int) -> str:
    """'row' (the D×D system) or 'column' (the P×P one) for P columns and D rows: the
    smaller. With P < D the D×D Gram has rank ≤ P, only the ridge keeps it invertible, and a
    float32 factorisation of it loses the small directions (a 10× wrong gradient at ridge
    1e-8 with P = 144, D = 145) where the P×P one is well posed; with P ≥ D the D×D system
    is the smaller one and costs the fewer flops as well."""
    return "column" if p < d else "row"


def _with_ones(rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([rows, rows.new_ones(rows.shape[:-1] + (1,))], dim=-1)


def _shared_gram_side(side, group, amortizer):
    # Column-side (P×P) systems differ per rank and per step: only the D×D Gram can be
    # summed across ranks or averaged across steps. An amortizer that may go exact leaves
    # the column side to ``solve_side`` (exact and cheaper than amortising there).
    if group is not None or (amortizer is not None and not amortizer.exact_when_cheaper):
        return "row"
    return side


def _span(name):
    """A named profiler range (the benchmark's Gram / G / solve breakdown), free when no
    profiler runs."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def _pending_gram(build, batch, per_sample, group, amortizer):
    """The row-side Gram of ``batch`` on its way (``distributed.PendingGram``; ``build(b)``
    gives Σ x xᵀ over samples ``b``), or None on a step where the amortizer needs none:
    skipping the O(D²·P) build is what amortising saves. An amortizer's refresh Gram comes
    from strided samples holding ``amortizer.gram_columns()`` columns."""
    if amortizer is not None:
        if not amortizer.wants_gram():
            return None
        batch = _strided(batch, amortizer.gram_columns(), per_sample)
    return distributed.PendingGram(build(batch), batch.shape[0], group)


def _empty_amortised(samples, group, amortizer):
    """Whether this is an amortised step on an empty batch with no ranks to join: G = 0, and
    there are no statistics to fold in (a zero Gram would drag the running average down), so
    the amortiser skips the step: nothing is counted or folded in."""
    return samples == 0 and amortizer is not None and group is None


def _solve(pending, grad, ridge, amortizer, energy):
    if amortizer is not None:
        gram = None if pending is None else pending.wait()
        return amortizer.precondition(gram, grad, ridge, energy)
    return ops.ridge_solve(pending.wait(), grad, ridge)


def _strided(t, columns, per_sample=1):
    """Samples of ``t`` (dim 0) evenly spread over the batch, enough to hold ``columns``
    columns of X at ``per_sample`` columns each (None: all), at a stride coprime with their
    count. Dim 0 is often a grid flattened — a Linear's batch × tokens, a recurrent weight's
    steps × sequences, a Conv3d fold's samples × output depths — whose width divides the
    count: a stride sharing a factor with it would sample a few of its rows or columns only
    (of 32 sequences of 64 pixels, 64 rows wanted at stride 32: pixels 0 and 32 of each, the
    images' empty left edge), a coprime one every residue of either."""
    if columns is None:
        return t
    n, wanted = t.shape[0], -(-columns // per_sample)
    if n <= wanted:
        return t
    stride = n // wanted
    while math.gcd(stride, n) != 1:
        stride -= 1
    return t[::stride]


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for a device autocast has no mode
    for (meta tensors: asking would raise, in the backward of a shapes-only run)."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _autocast_off(fn):
    """Run ``fn`` with autocast disabled: backward may run inside an autocast region, whose
    bf16/fp16 matmuls would undo the float32 accumulation of Gram, G and solve. (Entering
    the disabled region costs ~20 µs per layer, so only where autocast is on.)"""
    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        if not autocast_on(x.device.type):
            return fn(x, *args, **kwargs)
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, *args, **kwargs)
    return wrapper


@_autocast_off
def matched_linear(x2d, gy2d, has_bias, ridge, side=None, amortizer=None):
    """Matched (grad_weight, grad_bias) of a Linear layer, float32-or-better.

    x2d: (N, in) layer inputs, gy2d: (N, out) gradient of the loss w.r.t. the outputs.
    amortizer: an ``amortize.GramAmortizer`` to solve with its running Gram instead.
    Under torch.distributed the Gram is summed across ranks (``distributed.py``).
    """
    work = accumulate_dtype(x2d.dtype)
    x, gy = x2d.to(work), gy2d.to(work)
    n, d = x.shape[0], x.shape[1] + int(has_bias)                # X is D × N
    group = distributed.gram_group()
    if _empty_amortised(n, group, amortizer):
        return x.new_zeros(gy.shape[1], x.shape[1]), x.new_zeros(gy.shape[1]) if has_bias else None
    side = _shared_gram_side(side, group, amortizer) or solve_side(n, d)
    if side == "row":
        with _span("cx::linear_gram"):
            pending = _pending_gram(functools.partial(_linear_gram, has_bias=has_bias), x, 1,
                                    group, amortizer)           # overlaps G
        with _span("cx::weight_grad"):
            grad = gy.T @ x                                     # G, (out, D)
            if has_bias:
                grad = torch.cat([grad, gy.sum(0)[:, None]], dim=1)
        matched = _solve(pending, grad, ridge, amortizer,       # A = ΣXXᵀ / ΣN
                         functools.partial(_linear_energy, x))
    else:
        rows = _with_ones(x) if has_bias else x                 # (N, D): Xᵀ
        gram = _linear_gram(rows.T, has_bias=False).div_(n)     # XᵀX / N, (N, N)
        matched = ops.ridge_solve(gram, gy.T.contiguous(), ridge) @ rows
    if has_bias:
        return matched[:, :-1], matched[:, -1]
    return matched, None


# Column blocks of the symmetric product: wide enough for an efficient GEMM, narrow enough
# that skipping the blocks below the diagonal saves a good share (~30% at D ≈ 800).
_GRAM_BLOCK = 256


# Where the compiled Gram kernel, fed the rows as N one-pixel images (a 1×1 conv's Gram,
# its upper-triangle tiles), beats the blocked GEMMs: ≥ 128 columns and at least twice as
# many rows (2 threads, CPU time, interleaved: 0.59–0.92 of the GEMMs' time there, e.g.
# 2080 × 769 16.1 against 22.9 ms; 1.1–3.5× it on 128–1536 rows of 769, where its per-thread
# D × D accumulators dominate; about even below 128 columns). docs/performance.md, "Since 590d7c9".
_KERNEL_MIN_D, _KERNEL_ROWS_PER_D = 128, 2


def _linear_gram(x, has_bias):
    """[X; 1][X; 1]ᵀ of rows ``x`` (N, D) without concatenating the ones: the compiled
    kernel's where it pays, else XXᵀ from the blocks on and above the diagonal (mirrored),
    the bias row from column sums. Also the column side's P × P Gram, with ``x`` the (D, P)
    columns."""
    n, d = x.shape
    if d >= _KERNEL_MIN_D and n >= _KERNEL_ROWS_PER_D * d and ops.gram_is_native(x):
        return ops.im2col_gram(x[:, :, None, None], 1, bias=has_bias)
    gram = x.new_empty(d + int(has_bias), d + int(has_bias))
    edges = list(range(0, d, _GRAM_BLOCK)) + [d]
    for a, (i0, i1) in enumerate(zip(edges, edges[1:])):
        for j0, j1 in zip(edges[a:], edges[a + 1:]):
            block = x[:, i0:i1].T @ x[:, j0:j1]
            gram[i0:i1, j0:j1] = block
            if j0 != i0:
                gram[j0:j1, i0:i1] = block.T
    if has_bias:
        sums = x.sum(0)
        gram[:d, d] = sums
        gram[d, :d] = sums
        gram[d, d] = x.shape[0]
    return gram


def conv_side(x, gy, weight_shape, has_bias, amortizer=None, side=None):
    """The side ``matched_conv2d`` solves on for these arguments: ``side`` if given (and
    the Gram is not shared), else the smaller one (``solve_side``)."""
    _, cg, kh, kw = weight_shape
    d = cg * kh * kw + int(has_bias)
    p = x.shape[0] * gy.shape[2] * gy.shape[3]
    return _shared_gram_side(side, distributed.gram_group(), amortizer) \
        or solve_side(p, d)


@_autocast_off
def matched_conv2d(x, gy, weight_shape, stride, padding, dilation, groups, has_bias, ridge,
                   side=None, amortizer=None, grad=None, gram=None):
    """Matched (grad_weight, grad_bias) of a Conv2d layer, float32-or-better.

    x: (B, C, H, W) input already padded so that ``padding`` (a pair) is symmetric;
    gy: (B, out, Ho, Wo). N = B, the number of samples a mean-reduced loss averages over.
    amortizer and torch.distributed: as in ``matched_linear``. grad: G as ``conv_grad``
    gives it, and gram: the unnormalised (groups, D, D) Gram of all of ``x``, when the caller
    has them already (the row side uses them; ``conv_gram_and_grad``).
    """
    work = accumulate_dtype(x.dtype)
    out, cg, kh, kw = weight_shape
    b = x.shape[0]
    og = out // groups
    d = cg * kh * kw + int(has_bias)
    p = b * gy.shape[2] * gy.shape[3]
    group = distributed.gram_group()
    if _empty_amortised(b, group, amortizer):
        return x.new_zeros(weight_shape, dtype=work), x.new_zeros(out, dtype=work) if has_bias \
            else None
    side = conv_side(x, gy, weight_shape, has_bias, amortizer, side)
    if side == "row":
        if gram is None and grad is None and amortizer is None \
                and ops.conv_gram_grad_is_native(x, gy):
            gram, grad = ops.conv_gram_grad(x, gy, (kh, kw), stride, padding, dilation,
                                            groups=groups, bias=has_bias)
        if gram is not None:
            pending = distributed.PendingGram(gram, b, group)
        else:
            build = lambda s: ops.im2col_gram(s, (kh, kw), stride, padding,  # noqa: E731
                                              dilation, groups=groups,
                                              bias=has_bias).reshape(groups, d, d)
            pending = _pending_gram(build, x, gy.shape[2] * gy.shape[3], group, amortizer)
        if grad is None:
            with _span("cx::weight_grad"):
                grad = _conv_weight_grad(x, gy, weight_shape, stride, padding, dilation, groups,
                                         has_bias, work)
        energy = functools.partial(_conv_energy, x, gy.shape[2] * gy.shape[3], weight_shape,
                                   stride, padding, dilation, groups, has_bias)
        matched = _solve(pending, grad, ridge, amortizer, energy)
    else:
        # dZ per group with columns in im2col order (sample, then output location).
        locations = gy.shape[2] * gy.shape[3]  # explicit: -1 is ambiguous when b == 0
        dz = gy.to(work).reshape(b, groups, og, locations).permute(1, 2, 0, 3) \
            .reshape(groups, og, p)
        cols = im2col(x.to(work), (kh, kw), stride, padding, dilation, groups, has_bias)
        if groups == 1:
            gram = _linear_gram(cols[0], has_bias=False)[None]  # (1, P, P)
        else:
            gram = cols.transpose(1, 2) @ cols                  # (groups, P, P)
        matched = ops.ridge_solve(gram.div_(b), dz, ridge) @ cols.transpose(1, 2)
    grad_weight = matched[..., : d - int(has_bias)].reshape(weight_shape)
    grad_bias = matched[..., -1].reshape(out) if has_bias else None
    return grad_weight, grad_bias


def conv_gram_and_grad(x, gy, weight_shape, stride, padding, dilation, groups, has_bias, *,
                       with_gram=True):
    """(unnormalised Gram, G) per group from the Gram kernel's one pass over ``x`` where it
    computes G there (``ops.conv_gram_brings_grad``: cheaper than the weight-gradient half of
    a native conv backward), else None: then the input gradient's conv backward gives G.
    Without ``with_gram`` (an amortised step, which builds its Gram, if at all, from part of
    the batch): (None, G) from that pass without the Gram's correlations."""
    kernel = tuple(weight_shape[2:])
    if not ops.conv_gram_brings_grad(x, gy, kernel, stride, padding, dilation, groups, has_bias):
        return None
    fn = ops.conv_gram_grad if with_gram else ops.conv_weight_grad
    out = fn(x, gy, kernel, stride, padding, dilation, groups=groups, bias=has_bias)
    return out if with_gram else (None, out)


def conv_grad(grad_weight, grad_bias, groups):
    """G per group, (groups, out/groups, D), from a native conv backward's weight (and, with
    a bias, bias) gradient: the bias is the last column, multiplying the constant-1 row."""
    grad = grad_weight.reshape(groups, grad_weight.shape[0] // groups, -1)
    if grad_bias is not None:
        grad = torch.cat([grad, grad_bias.reshape(groups, -1, 1)], dim=-1)
    return grad


def _conv_weight_grad(x, gy, weight_shape, stride, padding, dilation, groups, has_bias, work):
    """Ordinary G = dZ Xᵀ per group, (groups, out/groups, D): the compiled op's (the shift
    kernel's where it brings G, else ATen's), or the native conv backward's."""
    if ops.conv_gram_grad_is_native(x, gy):
        return ops.conv_weight_grad(x, gy, tuple(weight_shape[2:]), stride, padding, dilation,
                                    groups=groups, bias=has_bias)
    weight = torch.empty(weight_shape, dtype=work, device=x.device)
    _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        gy.to(work), x.to(work), weight, [weight_shape[0]] if has_bias else None, list(stride),
        list(padding), list(dilation), False, [0, 0], groups, [False, True, has_bias])
    return conv_grad(grad_weight, grad_bias, groups)


def _linear_energy(x, direction, columns):
    """|Δ·[x; 1]|² averaged over ``columns`` strided rows of ``x`` (N, in), the bias (if any)
    in Δ's last column: ⟨Δ A, Δ⟩ estimated."""
    sub = _strided(x, columns)
    out = sub @ direction[:, :sub.shape[1]].T
    if direction.shape[1] > sub.shape[1]:
        out = out + direction[:, -1]
    return out.square().sum() / max(sub.shape[0], 1)   # 0, not 0/0, on an empty batch


def _conv_energy(x, locations, weight_shape, stride, padding, dilation, groups, has_bias,
                 direction, columns):
    """Per group, |Δ ⋆ x|² summed over locations, averaged over strided samples of ``x``
    holding ``columns`` patches: ⟨Δ A, Δ⟩ of the conv Gram (A sums patches, divides by
    samples), estimated at the cost of a forward on those samples."""
    sub = _strided(x, columns, locations).to(direction.dtype)
    weight = direction[..., : direction.shape[-1] - int(has_bias)].reshape(weight_shape)
    bias = direction[..., -1].reshape(-1) if has_bias else None
    out = torch.nn.functional.conv2d(sub, weight, bias, stride, padding, dilation, groups)
    per_group = out.unflatten(1, (groups, -1))   # -1 within the channels: fine when empty
    return per_group.square().sum((0, 2, 3, 4)) / max(sub.shape[0], 1)   # 0, not 0/0
