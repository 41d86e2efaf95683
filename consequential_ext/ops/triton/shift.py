"""Stride-1 im2col Gram from shifted channel correlations (the CPU issue's shift form).

With stride 1 the Gram block of kernel offsets (i, j) and (i + s, j + t) is
    Σ_{y ∈ Y_i, u ∈ X_j} x[:, y, u] · x[:, y + dh·s, u + dw·t]ᵀ      (C × C, per group)
(partner zero outside the image = zero padding), where Y_i / X_j are the rows / columns
the offset's patches read. Every window contains one core range; the ≤ 2·dh·(kh−1) rows
(and columns) outside it are border positions, each its own class. The image splits into
cells (row class × column class), and each block is a 0/1 combination of per-cell
correlations P[shift][cell]. Blocks with the reverse shift are transposes, so a 3×3 layer
correlates 13 shifts over the image instead of 81 (or the ≈ 40 upper-triangular) blocks:
≤ 3× fewer tensor-core FLOPs than ``gram.py``'s implicit GEMM, paid for with thin border
cells and a small host-side assembly. Whether that wins on a GPU is what
``bench_triton.time_gram`` measures ("triton-shift"); ``im2col_gram`` only uses it when
asked (``method="shift"``).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .._conv_args import check_bias_flag, check_conv_args
from ._common import PRECISIONS, accumulate_dtype, check_size, num_programs_target
from ._register import check_device, is_interpreted, on_device_of, register_kernel_op

_JOB_FIELDS = 8  # s, t, y0, y1, u0, u1, first pixel, end pixel
_PARTIALS_BYTES = 256 << 20


@triton.jit
def _shift_corr_kernel(
    x_ptr,            # input (B, C, H, W), any strides
    jobs_ptr,         # (n_jobs, 8) int32: shift (s, t), cell rectangle, pixel range
    out_ptr,          # (groups, n_jobs, C_per_group, C_per_group) per-job correlations
    C_per_group, H, W,
    stride_b, stride_c, stride_h, stride_w,
    DH, DW, out_stride_group, out_stride_job,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # the CPU interpreter's bfloat16 arithmetic reads raw bits
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    tile = tl.program_id(0)
    job = tl.program_id(1)
    group = tl.program_id(2)
    n_cblocks = tl.cdiv(C_per_group, BLOCK_C)
    chan_i = (tile // n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    chan_j = (tile % n_cblocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok_i = chan_i < C_per_group
    ok_j = chan_j < C_per_group
    off_i = (group * C_per_group + chan_i).to(tl.int64) * stride_c
    off_j = (group * C_per_group + chan_j).to(tl.int64) * stride_c

    fields = jobs_ptr + job * 8
    s = tl.load(fields)
    t = tl.load(fields + 1)
    y0 = tl.load(fields + 2)
    y1 = tl.load(fields + 3)
    u0 = tl.load(fields + 4)
    u1 = tl.load(fields + 5)
    p_start = tl.load(fields + 6)
    p_stop = tl.load(fields + 7)
    width = u1 - u0
    area = (y1 - y0) * width

    acc = tl.zeros((BLOCK_C, BLOCK_C), dtype=out_ptr.dtype.element_ty)
    for p0 in range(p_start, p_stop, BLOCK_P):
        pix = p0 + tl.arange(0, BLOCK_P)
        valid = pix < p_stop
        b = pix // area
        rest = pix % area
        # int64 offsets, as in gram.py: an axis may span 2³¹ elements through its stride.
        y = (y0 + rest // width).to(tl.int64)
        u = (u0 + rest % width).to(tl.int64)
        base = b.to(tl.int64) * stride_b
        a = tl.load(x_ptr + off_i[:, None] + (base + y * stride_h + u * stride_w)[None, :],
                    mask=ok_i[:, None] & valid[None, :], other=0.0)
        yy = y + DH * s
        uu = u + DW * t
        inside = valid & (yy >= 0) & (yy < H) & (uu >= 0) & (uu < W)
        bt = tl.load(x_ptr + off_j[:, None] + (base + yy * stride_h + uu * stride_w)[None, :],
                     mask=ok_j[:, None] & inside[None, :], other=0.0)
        if DOT_IN_FP32:  # exact: bfloat16 products fit float32
            a = a.to(tl.float32)
            bt = bt.to(tl.float32)
        acc = tl.dot(a, tl.trans(bt), acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)

    dst = out_ptr + group.to(tl.int64) * out_stride_group + job.to(tl.int64) * out_stride_job
    tl.store(dst + chan_i[:, None] * C_per_group + chan_j[None, :], acc,
             mask=ok_i[:, None] & ok_j[None, :])


def _shift_corr_launch(x: torch.Tensor, jobs: torch.Tensor, groups: int, dilation: list[int],
                       input_precision: str, block_c: int, block_p: int) -> torch.Tensor:
    B, C, H, W = x.shape
    c_per_group = C // groups
    n_cblocks = triton.cdiv(c_per_group, block_c)
    out = x.new_empty((groups, jobs.shape[0], c_per_group, c_per_group),
                      dtype=accumulate_dtype(x.dtype))
    if jobs.shape[0] == 0:
        return out
    with on_device_of(x):
        wrap_triton(_shift_corr_kernel)[(n_cblocks * n_cblocks, jobs.shape[0], groups)](
            x, jobs, out, c_per_group, H, W, x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            dilation[0], dilation[1], out.stride(0), out.stride(1),
            INPUT_PRECISION=input_precision,
            DOT_IN_FP32=x.dtype == torch.bfloat16 and is_interpreted(_shift_corr_kernel),
            BLOCK_C=block_c, BLOCK_P=block_p, num_warps=4, num_stages=3)
    return out


register_kernel_op(
    "consequential_ext_triton::shift_correlations", _shift_corr_launch,
    kernels=(_shift_corr_kernel,),
    fake=lambda x, jobs, groups, dilation, input_precision, block_c, block_p: x.new_empty(
        (groups, jobs.shape[0], x.shape[1] // groups, x.shape[1] // groups),
        dtype=accumulate_dtype(x.dtype)))


def _axis_classes(n, k, d, p):
    """Position classes along one axis and which offsets' windows contain each class.

    Returns ([(begin, end), …], contains[k][class]) — the core range (inside every
    window) is one class, every other position is its own.
    """
    out = n + 2 * p - d * (k - 1)
    core0, core1 = min(max(d * (k - 1) - p, 0), n), min(max(n + p - d * (k - 1), 0), n)
    if core0 < core1:
        classes = [(q, q + 1) for q in range(core0)] + [(core0, core1)] \
            + [(q, q + 1) for q in range(core1, n)]
    else:
        classes = [(q, q + 1) for q in range(n)]
    contains = [[int(d * i - p <= lo and hi <= d * i - p + out) for lo, hi in classes]
                for i in range(k)]
    return classes, contains


def _shifts(kh, kw):
    """Half of the offset differences; the other half are transposes."""
    return [(s, t) for s in range(kh) for t in range(1 - kw, kw) if s > 0 or t >= 0]


@functools.lru_cache(maxsize=64)
def _plan(shape, kernel_size, padding, dilation, chunk):
    """Jobs (shift, cell, pixel chunk) and the 0/1 matrix combining them into blocks;
    pure Python, so cached per layer geometry."""
    B, _, H, W = shape
    (kh, kw), (ph, pw), (dh, dw) = kernel_size, padding, dilation
    rows, row_in = _axis_classes(H, kh, dh, ph)
    cols, col_in = _axis_classes(W, kw, dw, pw)
    shifts = _shifts(kh, kw)
    jobs, job_keys = [], []
    for si, (s, t) in enumerate(shifts):
        for ri, (y0, y1) in enumerate(rows):
            if y0 + dh * s >= H:  # every partner row below the image
                continue
            for ci, (u0, u1) in enumerate(cols):
                if u1 - 1 + dw * t < 0 or u0 + dw * t >= W:  # partner columns outside
                    continue
                n_pix = B * (y1 - y0) * (u1 - u0)
                for p0 in range(0, n_pix, chunk):
                    jobs.append((s, t, y0, y1, u0, u1, p0, min(p0 + chunk, n_pix)))
                    job_keys.append((si, ri, ci))
    blocks, combine = [], []  # block (a, b) of kernel positions ← Σ selected jobs
    for si, (s, t) in enumerate(shifts):
        for i in range(kh - s):
            for j in range(max(0, -t), min(kw, kw - t)):
                blocks.append((i * kw + j, (i + s) * kw + j + t))
                combine.append([float(key[0] == si and row_in[i][key[1]] and col_in[j][key[2]])
                                for key in job_keys])
    return jobs, blocks, combine


@functools.lru_cache(maxsize=64)
def _device_plan(shape, kernel_size, padding, dilation, chunk, device, dtype):
    """``_plan``'s tables on ``device``: job table, combination weights, block indices."""
    jobs, blocks, combine = _plan(shape, kernel_size, padding, dilation, chunk)
    job_table = torch.tensor(jobs, dtype=torch.int32).reshape(-1, _JOB_FIELDS).to(device)
    weights = torch.tensor(combine, dtype=dtype).reshape(len(blocks), len(jobs)).to(device)
    a_idx, b_idx = torch.tensor(blocks).reshape(-1, 2).to(device).unbind(1)
    return job_table, weights, a_idx, b_idx


def _window_indicator(n, k, d, p, device, dtype):
    """(k, n): 1 where position y is read by kernel offset i (stride 1)."""
    out = n + 2 * p - d * (k - 1)
    pos = torch.arange(n, device=device)
    start = torch.arange(k, device=device)[:, None] * d - p
    return ((pos >= start) & (pos < start + out)).to(dtype)


def im2col_gram_shift(x, kernel_size, padding, dilation, groups, bias, input_precision,
                      block_c=0, block_p=0, chunk=0):
    """(groups, D, D) im2col Gram of a stride-1 layer by shifted correlations (arguments as
    ``gram.im2col_gram`` passes them: ``input_precision`` resolved to "ieee" or "tf32")."""
    ks, _, pd, dl = check_conv_args(x, kernel_size, 1, padding, dilation, groups)
    bias = check_bias_flag(bias)
    if input_precision not in PRECISIONS:
        raise ValueError(f"im2col_gram_shift: input_precision must be one of {PRECISIONS}, got "
                         f"{input_precision!r}")
    block_c, block_p = (check_size("im2col_gram_shift", name, value)
                        for name, value in (("block_c", block_c), ("block_p", block_p)))
    chunk = check_size("im2col_gram_shift", "chunk", chunk, power_of_two=False)
    return shift_gram_checked(x, ks, pd, dl, int(groups), bias, input_precision, block_c,
                              block_p, chunk)


def shift_gram_checked(x, kernel_size, padding, dilation, groups, bias, input_precision,
                       block_c=0, block_p=0, chunk=0):
    """``im2col_gram_shift`` of checked arguments (``gram.im2col_gram`` calls it with its
    own)."""
    check_device("im2col_gram_shift", "x", x, _shift_corr_kernel)
    (kh, kw), (ph, pw), (dh, dw) = kernel_size, padding, dilation
    B, C, H, W = x.shape
    cg, kk = C // groups, kh * kw
    acc = accumulate_dtype(x.dtype)
    if cg == 0:  # no channels, no correlations to plan: at most the bias row's patch count
        gram = x.new_zeros((groups, int(bias), int(bias)), dtype=acc)
        gram[:, :1, :1] = B * (H + 2 * ph - dh * (kh - 1)) * (W + 2 * pw - dw * (kw - 1))
        return gram
    block_c = block_c or min(64, max(16, triton.next_power_of_2(cg)))
    block_p = block_p or (64 if x.dtype in (torch.float16, torch.bfloat16) else 32)
    if not chunk:  # enough programs to fill the GPU, within the partials' memory budget
        n_cells = len(_shifts(kh, kw)) * groups * triton.cdiv(cg, block_c) ** 2
        spread = max(1, num_programs_target(x.device) // n_cells)
        chunk = max(8 * block_p, triton.cdiv(B * H * W, spread))
    chunk = triton.cdiv(chunk, block_p) * block_p
    geometry = (tuple(x.shape), (kh, kw), (ph, pw), (dh, dw))
    while len(_plan(*geometry, chunk)[0]) * groups * cg * cg * 4 > _PARTIALS_BYTES \
            and chunk < B * H * W:
        chunk *= 2
    job_table, weights, a_idx, b_idx = _device_plan(*geometry, chunk, x.device, acc)
    partials = torch.ops.consequential_ext_triton.shift_correlations(
        x, job_table, groups, [dh, dw], input_precision, block_c, block_p)
    found = (weights @ partials.reshape(groups, job_table.shape[0], cg * cg)).reshape(
        groups, a_idx.shape[0], cg, cg)
    grid = found.new_zeros((groups, kk, kk, cg, cg))
    grid[:, b_idx, a_idx] = found.transpose(-1, -2)  # the reverse shifts
    grid[:, a_idx, b_idx] = found
    D = cg * kk
    gram = found.new_zeros((groups, D + int(bias), D + int(bias)))
    gram[:, :D, :D] = grid.permute(0, 3, 1, 4, 2).reshape(groups, D, D)
    if bias:  # patch sums: Σ_b x over each offset's window; count = patches
        rows_in = _window_indicator(H, kh, dh, ph, x.device, acc)
        cols_in = _window_indicator(W, kw, dw, pw, x.device, acc)
        sums = torch.einsum("iy,cyu,ju->cij", rows_in, x.sum(0, dtype=acc), cols_in)
        sums = sums.reshape(groups, D)
        gram[:, D, :D] = sums
        gram[:, :D, D] = sums
        gram[:, D, D] = B * (H + 2 * ph - dh * (kh - 1)) * (W + 2 * pw - dw * (kw - 1))
    return gram
