"""Triton Gram kernel: Σ over im2col patches of patch·patchᵀ without materialising im2col.

The Gram of the patch matrix P (D rows × B·OH·OW columns, per group) is a GEMM-shaped
reduction G = P Pᵀ. Each program owns one (row-block i, row-block j) tile with i ≤ j of
one group and one slice of the patch columns; it loads both patch tiles straight from
the input by index arithmetic (stride / padding / dilation / groups → address + mask),
multiplies them on tensor cores, and writes the tile and its mirror image. Linear layers
reuse the same kernel on a 2-D input viewed as 1×1 "patches" (see ``linear_gram``).

Numerics (documented bound, checked by tests/test_triton.py):
  * float16 / bfloat16 input: products are exact in float32, accumulation in float32 —
    error ≈ float32 summation error, ≲ 1e-5 · (|P| |P|ᵀ) elementwise;
  * float32 input, ``input_precision="ieee"``: same ≲ 1e-5 bound;
  * float32 input, ``input_precision="tf32"`` (GPU default): each operand keeps 10
    mantissa bits (rounded, or truncated by the tensor core: < 2⁻¹⁰ each), so
    |G - G_exact| < 2⁻⁹ · (|P| |P|ᵀ) + float32 accumulation, ≈ 2e-3 relative to the Gram
    of absolute values (the interpreter does not emulate tf32, so CI checks the bound but
    cannot exercise it);
  * float64 input: float64 throughout (FMA path, no tensor cores).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from .._conv_args import _GRAM_DTYPES, check_bias_flag, check_conv_args
from ._common import (accumulate_dtype, check_precision, check_size, describe,
                      num_programs_target)
from ._register import check_device, is_interpreted, on_device_of, register_kernel_op

# Partial Grams of a split patch range are summed afterwards (deterministic, unlike
# atomics); this caps the memory those partials may take.
_SPLIT_BUFFER_BYTES = 256 << 20


@triton.jit
def _decode_rows(rows, group, C_per_group, D_patch, stride_c, stride_h, stride_w,
                 DH, DW, PH, PW,
                 KH: tl.constexpr, KW: tl.constexpr, CHANNELS_INNER: tl.constexpr):
    """Row index → (address offset, vertical / horizontal input shift, output row).

    ``CHANNELS_INNER`` walks rows as (kernel row, kernel col, channel) instead of the
    weight order (channel, kernel row, kernel col): for channels_last input the channel
    is the unit-stride axis, so this keeps a row tile's loads coalesced. The output row
    is always the weight order, so the permutation costs nothing but the scatter.
    """
    KK: tl.constexpr = KH * KW
    if CHANNELS_INNER:
        c = rows % C_per_group
        kk = rows // C_per_group
    else:
        c = rows // KK
        kk = rows % KK
    dy = (kk // KW) * DH - PH
    dx = (kk % KW) * DW - PW
    # 64-bit offsets throughout (here, for the columns and for the store): an input spanning
    # 2³¹ elements along one axis (a transposed (N, F) activation in linear_gram's N-side
    # view) or D ≥ 46341 wraps int32.
    offset = ((group * C_per_group + c).to(tl.int64) * stride_c + dy.to(tl.int64) * stride_h
              + dx.to(tl.int64) * stride_w)
    out_row = tl.where(rows < D_patch, c * KK + kk, rows)
    return offset, dy, dx, out_row


@triton.jit
def _patch_tile(x_ptr, row_offset, dy, dx, is_patch_row, is_bias_row,
                col_offset, iy0, ix0, col_valid, H, W, HAS_BIAS: tl.constexpr,
                DOT_IN_FP32: tl.constexpr):
    """(rows × columns) block of the implicit im2col matrix; zero padding via the mask."""
    iy = iy0[None, :] + dy[:, None]
    ix = ix0[None, :] + dx[:, None]
    inside = (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    mask = is_patch_row[:, None] & col_valid[None, :] & inside
    tile = tl.load(x_ptr + row_offset[:, None] + col_offset[None, :], mask=mask, other=0.0)
    if DOT_IN_FP32:  # exact: bfloat16 products fit float32
        tile = tile.to(tl.float32)
    if HAS_BIAS:
        # The constant-1 row a bias multiplies; masked out of the load above, so it is 0 here.
        tile += (is_bias_row[:, None] & col_valid[None, :]).to(tile.dtype)
    return tile


@triton.jit
def _im2col_gram_kernel(
    x_ptr,            # input (B, C, H, W), any strides
    out_ptr,          # (splits, groups, D, D) partial Grams, accumulate dtype
    C_per_group, H, W, OW, OHW, n_patches,  # n_patches = B·OH·OW
    D_patch, D,       # rows without / with the bias row
    stride_b, stride_c, stride_h, stride_w,
    SH, SW, PH, PW, DH, DW,
    patches_per_split,  # multiple of BLOCK_P
    out_stride_split, out_stride_group,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, CHANNELS_INNER: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # the CPU interpreter's bfloat16 arithmetic reads raw bits
    BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr,
):
    tile = tl.program_id(0)
    group = tl.program_id(1)
    split = tl.program_id(2)

    # Upper-triangular tile (ti ≤ tj), enumerated column by column: tile = tj(tj+1)/2 + ti.
    # Consecutive programs share the column block tj, which keeps its tile hot in L2.
    tj = ((tl.sqrt((8 * tile + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where(tj * (tj + 1) // 2 > tile, tj - 1, tj)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= tile, tj + 1, tj)
    ti = tile - tj * (tj + 1) // 2

    rows_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    rows_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    off_i, dy_i, dx_i, out_i = _decode_rows(rows_i, group, C_per_group, D_patch, stride_c,
                                            stride_h, stride_w, DH, DW, PH, PW,
                                            KH, KW, CHANNELS_INNER)
    off_j, dy_j, dx_j, out_j = _decode_rows(rows_j, group, C_per_group, D_patch, stride_c,
                                            stride_h, stride_w, DH, DW, PH, PW,
                                            KH, KW, CHANNELS_INNER)
    patch_i = rows_i < D_patch
    patch_j = rows_j < D_patch
    bias_i = rows_i == D_patch
    bias_j = rows_j == D_patch

    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=out_ptr.dtype.element_ty)
    p_start = split * patches_per_split
    p_stop = tl.minimum(p_start + patches_per_split, n_patches)
    for p0 in range(p_start, p_stop, BLOCK_P):
        cols = p0 + tl.arange(0, BLOCK_P)
        col_valid = cols < p_stop
        b = cols // OHW
        q = cols % OHW
        iy0 = (q // OW) * SH
        ix0 = (q % OW) * SW
        col_offset = (b.to(tl.int64) * stride_b + iy0.to(tl.int64) * stride_h
                      + ix0.to(tl.int64) * stride_w)
        a = _patch_tile(x_ptr, off_i, dy_i, dx_i, patch_i, bias_i,
                        col_offset, iy0, ix0, col_valid, H, W, HAS_BIAS, DOT_IN_FP32)
        bt = _patch_tile(x_ptr, off_j, dy_j, dx_j, patch_j, bias_j,
                         col_offset, iy0, ix0, col_valid, H, W, HAS_BIAS, DOT_IN_FP32)
        acc = tl.dot(a, tl.trans(bt), acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)

    base = out_ptr + split.to(tl.int64) * out_stride_split + group.to(tl.int64) * out_stride_group
    mask = (rows_i < D)[:, None] & (rows_j < D)[None, :]
    out_i, out_j = out_i.to(tl.int64), out_j.to(tl.int64)
    tl.store(base + out_i[:, None] * D + out_j[None, :], acc, mask=mask)
    if ti != tj:  # the mirror image of an off-diagonal tile
        tl.store(base + out_j[None, :] * D + out_i[:, None], acc, mask=mask)


def _output_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _choose_blocks(D, dtype, block_d, block_p):
    """Tile sizes: 128-row tiles once D is large enough to fill them, else 16…64; the
    patch step (the MMA's k) spans 128 bytes: 64 16-bit or 32 float32 elements."""
    if block_d <= 0:
        block_d = 128 if D >= 512 else min(64, max(16, triton.next_power_of_2(D)))
    if block_p <= 0:
        block_p = 64 if dtype in (torch.float16, torch.bfloat16) else 32
    return block_d, block_p


def _gram_size(x, kernel_size, groups, bias):
    return x.shape[1] // groups * kernel_size[0] * kernel_size[1] + int(bias)


def _im2col_gram_launch(x: torch.Tensor, kernel_size: list[int], stride: list[int],
                        padding: list[int], dilation: list[int], groups: int, bias: bool,
                        input_precision: str, block_d: int, block_p: int,
                        split: int) -> torch.Tensor:
    """Body of the registered op; block sizes / split 0 = automatic."""
    B, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    oh, ow = _output_size(H, kh, sh, ph, dh), _output_size(W, kw, sw, pw, dw)
    c_per_group = C // groups
    d_patch = c_per_group * kh * kw
    D = _gram_size(x, kernel_size, groups, bias)
    n_patches = B * oh * ow
    if D == 0:
        return x.new_zeros((groups, 0, 0), dtype=accumulate_dtype(x.dtype))
    block_d, block_p = _choose_blocks(D, x.dtype, block_d, block_p)
    n_blocks = triton.cdiv(D, block_d)
    n_tiles = n_blocks * (n_blocks + 1) // 2
    if split <= 0:
        wanted = triton.cdiv(num_programs_target(x.device), n_tiles * groups)
        by_work = max(1, n_patches // (4 * block_p))
        by_memory = max(1, _SPLIT_BUFFER_BYTES // (groups * D * D * 4))
        split = max(1, min(wanted, by_work, by_memory))
    per_split = max(1, triton.cdiv(triton.cdiv(n_patches, split), block_p)) * block_p
    split = max(1, triton.cdiv(n_patches, per_split))  # no empty trailing splits
    # channels_last: channel is the unit-stride axis, so walk rows channel-fastest.
    channels_inner = x.stride(1) == 1 and c_per_group > 1 and kh * kw > 1
    out = x.new_empty((split, groups, D, D), dtype=accumulate_dtype(x.dtype))
    with on_device_of(x):
        wrap_triton(_im2col_gram_kernel)[(n_tiles, groups, split)](
            x, out, c_per_group, H, W, ow, oh * ow, n_patches, d_patch, D,
            x.stride(0), x.stride(1), x.stride(2), x.stride(3),
            sh, sw, ph, pw, dh, dw, per_split, out.stride(0), out.stride(1),
            KH=kh, KW=kw, HAS_BIAS=bias, CHANNELS_INNER=channels_inner,
            INPUT_PRECISION=input_precision,
            DOT_IN_FP32=x.dtype == torch.bfloat16 and is_interpreted(_im2col_gram_kernel),
            BLOCK_D=block_d, BLOCK_P=block_p,
            num_warps=8 if block_d >= 128 else 4, num_stages=3)
    return out[0] if split == 1 else out.sum(0)


def _im2col_gram_fake(x, kernel_size, stride, padding, dilation, groups, bias,
                      input_precision, block_d, block_p, split):
    D = _gram_size(x, kernel_size, groups, bias)
    return x.new_empty((groups, D, D), dtype=accumulate_dtype(x.dtype))


register_kernel_op("consequential_ext_triton::im2col_gram", _im2col_gram_launch,
                   fake=_im2col_gram_fake, kernels=(_im2col_gram_kernel,))


def im2col_gram(x, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=False, *,
                input_precision=None, method="implicit", block_d=0, block_p=0, split=0):
    """(groups, D, D) Gram of the im2col patches of ``x`` (B, C, H, W); see the op contract
    in ``ops/reference.py``. ``input_precision``: "tf32" (float32 default) or "ieee";
    ``method``: "implicit" (implicit-im2col GEMM) or "shift" (stride-1 shifted
    correlations, ``shift.py``); ``block_d`` / ``block_p`` / ``split``: tile sizes and
    patch-range split of the implicit kernel (0: automatic).
    """
    ks, st, pd, dl = (list(p) for p in check_conv_args(x, kernel_size, stride, padding,
                                                     dilation, groups))
    bias = check_bias_flag(bias)
    check_device("im2col_gram", "x", x, _im2col_gram_kernel)
    block_d, block_p = (check_size("im2col_gram", name, value)
                        for name, value in (("block_d", block_d), ("block_p", block_p)))
    split = check_size("im2col_gram", "split", split, power_of_two=False)
    precision = check_precision("im2col_gram", input_precision, x.dtype)
    if method == "shift":
        if st != [1, 1]:
            raise ValueError(f"im2col_gram: method='shift' needs stride 1, got stride={st}")
        from .shift import shift_gram_checked
        return shift_gram_checked(x, ks, pd, dl, groups, bias, precision)
    if method != "implicit":
        raise ValueError(f"im2col_gram: method must be 'implicit' or 'shift', got {method!r}")
    return torch.ops.consequential_ext_triton.im2col_gram(
        x, ks, st, pd, dl, groups, bias, precision, block_d, block_p, split)


def linear_gram(x, bias=False, side="d", *, input_precision=None, block_d=0, block_p=0, split=0):
    """Gram of the rows of a 2-D input ``x`` (N, F) of a Linear layer, float32 (float64 in).

    side="d": XXᵀ over features, (F, F) (+1 with bias: constant-1 row → count and column
    sums); side="n": the N-side Gram x xᵀ (N, N) (+1 on every entry with bias, the
    constant feature's contribution), cheaper when N < F. Both reuse the im2col kernel with
    1×1 patches on a strided view, so nothing is copied.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in _GRAM_DTYPES:
        raise ValueError(f"linear_gram: x must be a float16, bfloat16, float32 or float64 (N, F) "
                         f"tensor, got {describe(x)}")
    if side not in ("d", "n"):
        raise ValueError(f"linear_gram: side must be 'd' (features) or 'n' (samples), got {side!r}")
    bias = check_bias_flag(bias)
    check_device("linear_gram", "x", x, _im2col_gram_kernel)
    # checked here too, so that an error names linear_gram rather than the im2col_gram it calls
    for name, value in (("block_d", block_d), ("block_p", block_p), ("split", split)):
        check_size("linear_gram", name, value, power_of_two=name != "split")
    check_precision("linear_gram", input_precision, x.dtype)
    n, f = x.shape
    if side == "d":  # samples are the patch columns: view as (N, F, 1, 1)
        view = x.as_strided((n, f, 1, 1), (x.stride(0), x.stride(1), 1, 1))
        return im2col_gram(view, 1, bias=bias, input_precision=input_precision,
                           block_d=block_d, block_p=block_p, split=split)[0]
    if f == 0:  # no features, so no patch column for the (1, N, 1, 0) view: x xᵀ is 0
        gram = x.new_zeros((n, n), dtype=accumulate_dtype(x.dtype))
        return gram + 1 if bias else gram
    # features are the patch columns: view as (1, N, 1, F)
    view = x.as_strided((1, n, 1, f), (0, x.stride(0), 0, x.stride(1)))
    gram = im2col_gram(view, 1, input_precision=input_precision,
                       block_d=block_d, block_p=block_p, split=split)[0]
    return gram + 1 if bias else gram
