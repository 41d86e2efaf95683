"""Triton kernels for the matched gradient ``grad @ inverse(gram + ridge·I)``.

* ``_cholesky_kernel``: batched Cholesky of ``gram + ridge·I`` for small D, one matrix per
  program, held in registers (right-looking, one column per step). Depthwise / grouped
  convolutions give many tiny systems, which this factors in one launch.
* ``_cholesky_solve_kernel``: given the factor L (gram + λI = L Lᵀ), both triangular
  solves and the cast to the parameter dtype in one launch. Each program owns a block of
  gradient rows: forward substitution y Lᵀ = g, then backward substitution x L = y, both
  blocked by ``BLOCK_D`` columns (left-looking: the off-diagonal blocks are tensor-core
  products, the diagonal block is solved column by column in registers). Small D is one
  block, so one program does everything in registers.
Solves run in IEEE float32 (float64 for float64 input): substitution amplifies operand
rounding by the condition number, which tf32 would make visible.
"""
from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .. import check_solve_args, reference
from ._common import check_size, describe, num_programs_target
from ._register import check_device, on_device_of, register_kernel_op

# Largest D the register-resident Cholesky takes; above it torch.linalg.cholesky_ex
# (cuSOLVER) factors. Not yet measured against cuSOLVER on a GPU: bench_triton.py's
# cholesky comparison is the evidence this number should come from.
TRITON_CHOLESKY_MAX_D = 64
_MAX_ESCALATIONS = 12  # as reference.ridge_solve


@triton.jit
def _cholesky_kernel(
    a_ptr,             # (batch, D, D) symmetric; only the lower triangle is read
    l_ptr,             # (batch, D, D) out: lower factor of a + ridge·I (upper part zero)
    info_ptr,          # (batch,) int32 out: 0, or k+1 for the first non-positive pivot k
    ridge_ptr,         # (1,) ridge in the factor's dtype (a float argument would be float32)
    D,
    a_sb, a_sr, a_sc, l_sb, l_sr, l_sc,
    BLOCK: tl.constexpr,
):
    batch = tl.program_id(0).to(tl.int64)
    r = tl.arange(0, BLOCK)
    inside = (r < D)[:, None] & (r < D)[None, :]
    # Symmetric from the lower triangle, like LAPACK's potrf.
    hi = tl.maximum(r[:, None], r[None, :])
    lo = tl.minimum(r[:, None], r[None, :])
    a = tl.load(a_ptr + batch * a_sb + hi * a_sr + lo * a_sc, mask=inside, other=0.0)
    a = a.to(l_ptr.dtype.element_ty)
    # + ridge on the diagonal; 1 on the padding's diagonal keeps it positive definite.
    diag = r[:, None] == r[None, :]
    ridge = tl.load(ridge_ptr)
    a += tl.where(diag, tl.where(r < D, ridge, 1.0)[:, None], 0.0).to(a.dtype)
    factor = tl.zeros((BLOCK, BLOCK), dtype=a.dtype)
    info = tl.full((), 0, tl.int32)
    for k in range(D):
        col = tl.sum(tl.where(r[None, :] == k, a, 0.0), axis=1)   # a[:, k]
        row = tl.sum(tl.where(r[:, None] == k, a, 0.0), axis=0)   # a[k, :] (= a[:, k])
        pivot = tl.sum(tl.where(r == k, col, 0.0), axis=0)
        positive = pivot > 0.0  # false for NaN too
        info = tl.where((info == 0) & ~positive, k + 1, info)
        inv_sqrt = 1.0 / tl.sqrt(tl.where(positive, pivot, 1.0))
        col_k = tl.where(r >= k, col * inv_sqrt, 0.0)
        row_k = tl.where(r >= k, row * inv_sqrt, 0.0)
        factor = tl.where(r[None, :] == k, col_k[:, None], factor)
        a -= col_k[:, None] * row_k[None, :]
    tl.store(l_ptr + batch * l_sb + r[:, None] * l_sr + r[None, :] * l_sc, factor, mask=inside)
    tl.store(info_ptr + batch, info)


@triton.jit
def _cholesky_solve_kernel(
    l_ptr,             # (batch, D, D) lower Cholesky factor; only the lower triangle is read
    g_ptr,             # (batch, M, D) gradient rows
    work_ptr,          # (batch, M, D) work dtype: y, then x (may be out itself)
    out_ptr,           # (batch, M, D) out dtype (written only when SEPARATE_OUT)
    M, D,
    l_sb, l_sr, l_sc, g_sb, g_sm, g_sd, w_sb, w_sm, w_sd, o_sb, o_sm, o_sd,
    SEPARATE_OUT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One grid axis (systems × row blocks, row blocks fastest so that neighbours share L):
    # a second axis would cap the systems at CUDA's 65535.
    row_blocks = tl.cdiv(M, BLOCK_M)
    batch = (tl.program_id(0) // row_blocks).to(tl.int64)
    rows = (tl.program_id(0) % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    lane = tl.arange(0, BLOCK_D)
    l_base = l_ptr + batch * l_sb
    # Offsets in int64 (rows folded into per-row pointers, columns widened where used): one
    # system's M·D or D·D may pass 2³¹ elements (a 262144 × 8193 LM-head gradient; D = 53248
    # for a 405B model's down_proj), where int32 offsets wrap.
    g_rows = g_ptr + batch * g_sb + rows.to(tl.int64) * g_sm
    w_rows = work_ptr + batch * w_sb + rows.to(tl.int64) * w_sm
    o_rows = out_ptr + batch * o_sb + rows.to(tl.int64) * o_sm
    n_blocks = tl.cdiv(D, BLOCK_D)

    # Forward substitution, y Lᵀ = g: y_k = (g_k - Σ_{j<k} y_j L[k, j]) / L[k, k].
    for kb in range(n_blocks):
        cols = kb * BLOCK_D + lane
        col_ok = cols < D
        tile_ok = row_ok[:, None] & col_ok[None, :]
        cols64 = cols.to(tl.int64)
        w = tl.load(g_rows[:, None] + (cols64 * g_sd)[None, :], mask=tile_ok, other=0.0)
        w = w.to(work_ptr.dtype.element_ty)
        for jb in range(kb):
            jcols64 = (jb * BLOCK_D + lane).to(tl.int64)
            y_j = tl.load(w_rows[:, None] + (jcols64 * w_sd)[None, :],
                          mask=row_ok[:, None], other=0.0)
            l_kj = tl.load(l_base + (cols64 * l_sr)[:, None] + (jcols64 * l_sc)[None, :],
                           mask=col_ok[:, None], other=0.0)
            w -= tl.dot(y_j, tl.trans(l_kj), input_precision="ieee")
        for k in range(BLOCK_D):
            kk = kb * BLOCK_D + k
            kk64 = tl.cast(kk, tl.int64)
            l_kk = tl.load(l_base + kk64 * (l_sr + l_sc), mask=kk < D, other=1.0)
            y_k = tl.sum(tl.where(lane[None, :] == k, w, 0.0), axis=1) / l_kk
            l_col = tl.load(l_base + cols64 * l_sr + kk64 * l_sc, mask=col_ok & (cols > kk),
                            other=0.0)
            w -= y_k[:, None] * l_col[None, :]
            w = tl.where(lane[None, :] == k, y_k[:, None], w)
        tl.store(w_rows[:, None] + (cols64 * w_sd)[None, :], w, mask=tile_ok)
        tl.debug_barrier()  # later blocks re-read y through memory, from other threads

    # Backward substitution, x L = y: x_k = (y_k - Σ_{j>k} x_j L[j, k]) / L[k, k].
    for i in range(n_blocks):
        kb = n_blocks - 1 - i
        cols = kb * BLOCK_D + lane
        col_ok = cols < D
        tile_ok = row_ok[:, None] & col_ok[None, :]
        cols64 = cols.to(tl.int64)
        w = tl.load(w_rows[:, None] + (cols64 * w_sd)[None, :], mask=tile_ok, other=0.0)
        for jb in range(kb + 1, n_blocks):
            jcols = jb * BLOCK_D + lane
            jcol_ok = jcols < D
            jcols64 = jcols.to(tl.int64)
            x_j = tl.load(w_rows[:, None] + (jcols64 * w_sd)[None, :],
                          mask=row_ok[:, None] & jcol_ok[None, :], other=0.0)
            l_jk = tl.load(l_base + (jcols64 * l_sr)[:, None] + (cols64 * l_sc)[None, :],
                           mask=jcol_ok[:, None] & col_ok[None, :], other=0.0)
            w -= tl.dot(x_j, l_jk, input_precision="ieee")
        for t in range(BLOCK_D):
            k = BLOCK_D - 1 - t
            kk = kb * BLOCK_D + k
            kk64 = tl.cast(kk, tl.int64)
            l_kk = tl.load(l_base + kk64 * (l_sr + l_sc), mask=kk < D, other=1.0)
            x_k = tl.sum(tl.where(lane[None, :] == k, w, 0.0), axis=1) / l_kk
            # row kk of L left of the diagonal; none for padding rows (kk ≥ D)
            l_row = tl.load(l_base + kk64 * l_sr + cols64 * l_sc,
                            mask=cols < tl.where(kk < D, kk, 0), other=0.0)
            w -= x_k[:, None] * l_row[None, :]
            w = tl.where(lane[None, :] == k, x_k[:, None], w)
        tl.store(w_rows[:, None] + (cols64 * w_sd)[None, :], w, mask=tile_ok)
        if SEPARATE_OUT:  # the rescale into the parameter dtype
            tl.store(o_rows[:, None] + (cols64 * o_sd)[None, :],
                     w.to(out_ptr.dtype.element_ty), mask=tile_ok)
        tl.debug_barrier()


def _cholesky_launch(a: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, info) for a (batch, D, D) + ridge·I: L lower, info as cholesky_ex's. The matrix
    lives in registers, so D up to 128 at most."""
    batch, D = a.shape[0], a.shape[-1]
    factor = a.new_empty(a.shape, dtype=reference.accumulate_dtype(a.dtype))
    info = a.new_empty((batch,), dtype=torch.int32)
    block = max(16, triton.next_power_of_2(D))
    ridge_value = torch.full((1,), ridge, dtype=factor.dtype, device=a.device)
    with on_device_of(a):
        wrap_triton(_cholesky_kernel)[(batch,)](
            a, factor, info, ridge_value, D, a.stride(0), a.stride(1), a.stride(2),
            factor.stride(0), factor.stride(1), factor.stride(2),
            BLOCK=block, num_warps=8 if block >= 128 else 4)
    return factor, info


def _cholesky_solve_launch(factor: torch.Tensor, grad: torch.Tensor, out_dtype: torch.dtype,
                           block_m: int, block_d: int) -> torch.Tensor:
    """grad @ inverse(L Lᵀ) for factor L (batch, D, D), grad (batch, M, D); in out_dtype."""
    batch, M, D = grad.shape
    if block_d <= 0:
        block_d = min(64, max(16, triton.next_power_of_2(D)))
    if block_m <= 0:  # rows per program: fewer when that is what it takes to fill the GPU
        block_m = 32 if block_d >= 64 else 64
        while block_m > 16 and triton.cdiv(M, block_m) * batch < num_programs_target(grad.device):
            block_m //= 2
    work = factor.dtype
    out = grad.new_empty(grad.shape, dtype=out_dtype)
    separate = out_dtype != work
    scratch = grad.new_empty(grad.shape, dtype=work) if separate else out
    with on_device_of(grad):
        wrap_triton(_cholesky_solve_kernel)[(triton.cdiv(M, block_m) * batch,)](
            factor, grad, scratch, out, M, D,
            factor.stride(0), factor.stride(1), factor.stride(2),
            grad.stride(0), grad.stride(1), grad.stride(2),
            scratch.stride(0), scratch.stride(1), scratch.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            SEPARATE_OUT=separate, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4)
    return out


register_kernel_op(
    "consequential_ext_triton::cholesky", _cholesky_launch, kernels=(_cholesky_kernel,),
    fake=lambda a, ridge: (a.new_empty(a.shape, dtype=reference.accumulate_dtype(a.dtype)),
                           a.new_empty(a.shape[:1], dtype=torch.int32)))
register_kernel_op(
    "consequential_ext_triton::cholesky_solve", _cholesky_solve_launch,
    kernels=(_cholesky_solve_kernel,),
    fake=lambda factor, grad, out_dtype, block_m, block_d: grad.new_empty(grad.shape,
                                                                          dtype=out_dtype))


def cholesky(a, ridge=0.0):
    """Batched Cholesky of ``a + ridge·I`` (…, D, D) → (L, info) like ``cholesky_ex``:
    the Triton kernel up to ``TRITON_CHOLESKY_MAX_D``, ``torch.linalg.cholesky_ex`` above.
    Float32 or better (float64 for float64 input). ``ridge``: 0, or a ridge as the solves
    take it (``reference.check_ridge``)."""
    if not isinstance(a, torch.Tensor) or a.dim() < 2 or a.shape[-1] != a.shape[-2] \
            or not a.is_floating_point():
        raise ValueError(f"cholesky: a must be a floating-point (..., D, D) tensor, got "
                         f"{describe(a)}")
    if isinstance(ridge, bool) or not (isinstance(ridge, numbers.Real) and ridge == 0):
        ridge = reference.check_ridge(ridge, "cholesky: ridge")
    return _cholesky(a, ridge)


def _cholesky(a, ridge):
    """``cholesky`` of checked arguments: ``ridge_solve`` factors at its escalated ridge, which
    may pass the bound ``check_ridge`` puts on a ridge it is given."""
    D = a.shape[-1]
    flat = a.reshape(math.prod(a.shape[:-2]), D, D)  # explicit: -1 is ambiguous when D == 0
    if 0 < D <= TRITON_CHOLESKY_MAX_D and flat.shape[0] > 0:
        check_device("cholesky", "a", a, _cholesky_kernel)
        factor, info = torch.ops.consequential_ext_triton.cholesky(flat, float(ridge))
    else:
        work = flat.to(reference.accumulate_dtype(a.dtype))
        eye = torch.eye(D, dtype=work.dtype, device=a.device)
        factor, info = torch.linalg.cholesky_ex(work + ridge * eye)
    return factor.reshape(a.shape), info.reshape(a.shape[:-2])


def ridge_solve(gram, grad, ridge, out_dtype=None, *, block_m=0, block_d=0):
    """``grad @ inverse(gram + ridge·I)`` (contract of ``reference.ridge_solve``): Cholesky,
    then the fused two-solve-and-cast kernel. A failed factorisation of finite input
    escalates the ridge ×10, of each system on its own (one warning per process); non-finite
    input → all-NaN."""
    ridge = check_solve_args(gram, grad, ridge, out_dtype)   # as the dispatching op checks
    block_m, block_d = (check_size("ridge_solve", name, value)
                        for name, value in (("block_m", block_m), ("block_d", block_d)))
    return solve_checked(gram, grad, ridge, out_dtype, block_m, block_d)


def solve_checked(gram, grad, ridge, out_dtype, block_m=0, block_d=0):
    """``ridge_solve`` of checked arguments (``ops.ridge_solve`` dispatches here)."""
    check_device("ridge_solve", "grad", grad, _cholesky_solve_kernel)
    out_dtype = grad.dtype if out_dtype is None else out_dtype
    work = torch.float64 if torch.float64 in (gram.dtype, grad.dtype) else torch.float32
    if grad.numel() == 0:
        return grad.new_empty(grad.shape, dtype=out_dtype)
    D, M = gram.shape[-1], grad.shape[-2]
    a = gram.reshape(-1, D, D).to(work)
    g = grad.reshape(-1, M, D)
    non_finite = ~(torch.isfinite(a).all() & torch.isfinite(g).all())
    lam = float(ridge)
    for attempt in range(_MAX_ESCALATIONS):
        factor, info = _cholesky(a, lam)
        # One host sync per attempt: both flags come back together.
        bad_input, failed = torch.stack([non_finite, (info != 0).any()]).tolist()
        if bad_input:
            return torch.full(grad.shape, float("nan"), dtype=out_dtype, device=grad.device)
        if not failed:
            break
        if a.shape[0] > 1:   # one ridge per system: the reference's batched escalation (a
            # solve per system would cost a launch and a host sync for each of hundreds of groups)
            return reference.ridge_solve(gram, grad, ridge, out_dtype)
        lam *= 10.0
        if lam > torch.finfo(work).max:   # past what the work dtype holds: nothing rescues it
            return _unrescued(ridge, grad, out_dtype)
    else:  # still indefinite: NaN, never an exception inside backward
        return _unrescued(ridge, grad, out_dtype)
    if attempt:
        reference.warn_escalated(ridge, lam)
    out = torch.ops.consequential_ext_triton.cholesky_solve(factor, g, out_dtype, block_m, block_d)
    return out.reshape(grad.shape)


def _unrescued(ridge, grad, out_dtype):
    """A system no escalation of the ridge makes positive definite: NaN and the warning."""
    reference.warn_escalated(ridge, math.inf)
    return torch.full(grad.shape, float("nan"), dtype=out_dtype, device=grad.device)
