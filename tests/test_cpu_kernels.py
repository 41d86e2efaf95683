"""CPU kernels (csrc/cpu) against the float64 reference: im2col_gram (shift-correlation
form for stride 1, a tap-major panel and its GEMM for stride 1 with few channels, tiled form
otherwise, im2col + GEMM for few patches, groups in lanes; each also by name) and ridge_solve
(batched Cholesky)."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import consequential_ext as cx
from consequential_ext.ops import reference

gram_op = torch.ops.consequential_ext.im2col_gram
solve_op = torch.ops.consequential_ext.ridge_solve

pytestmark = pytest.mark.skipif("cpu" not in cx.ops.available_backends("im2col_gram", "cpu"),
                                reason="consequential_ext._C was built without CPU kernels")


def _ref_gram(x, k, s, p, d, groups, bias):
    """Float64 Gram from explicit unfold over the same (already rounded) input values."""
    cols = F.unfold(x.double(), k, dilation=d, padding=p, stride=s)
    b, L = x.shape[0], cols.shape[-1]
    cols = cols.reshape(b, groups, -1, L).permute(1, 2, 0, 3).reshape(groups, -1, b * L)
    if bias:
        cols = torch.cat([cols, cols.new_ones(groups, 1, cols.shape[-1])], dim=1)
    return cols @ cols.transpose(1, 2)


def _assert_gram_close(out, ref, tol):
    """Entry-wise error scaled by sqrt(G_ii G_jj), the Cauchy–Schwarz bound of |G_ij|:
    off-diagonal entries near zero are judged on the scale of their rows, not their value."""
    assert out.shape == ref.shape
    diag = ref.diagonal(dim1=-2, dim2=-1).clamp_min(1e-30).sqrt()
    scale = diag.unsqueeze(-1) * diag.unsqueeze(-2)
    err = ((out.double() - ref).abs() / scale).max().item()
    assert err <= tol, f"scaled max error {err:.3g} > {tol:.3g}"


def check_gram(out, x, geometry, bias, tol):
    """``out``, the Gram of ``x`` for ``geometry`` (shape, kernel, stride, padding, dilation,
    groups), against the float64 reference: accumulation dtype, entries within ``tol``,
    exact symmetry, and with a bias the constant-1 row's diagonal counting the patches exactly."""
    _, k, s, p, d, groups = geometry
    assert out.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    ref = _ref_gram(x, k, s, p, d, groups, bias)
    _assert_gram_close(out, ref, tol)
    assert torch.equal(out, out.transpose(1, 2))
    if bias:
        assert out[:, -1, -1].eq(ref[0, -1, -1]).all()


# (B, C, H, W), kernel, stride, padding, dilation, groups — odd sizes, non-square kernels,
# padding 0 / "same" / larger than the kernel, dilation, groups; stride 1 exercises the
# shift-correlation form (the rows form where D ≤ 48: few channels), the others the tiled form.
GEOMETRIES = [
    ((3, 5, 9, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((2, 4, 11, 6), (3, 3), (1, 1), (0, 0), (1, 1), 2),
    ((2, 3, 7, 10), (3, 2), (1, 1), (2, 0), (1, 1), 1),
    ((2, 6, 9, 9), (5, 3), (1, 1), (4, 1), (1, 2), 3),
    ((1, 3, 5, 5), (5, 5), (1, 1), (6, 6), (1, 1), 1),   # padding > kernel: no border rows
    ((2, 2, 4, 13), (3, 3), (1, 1), (1, 0), (2, 3), 1),  # windows with no common core
    ((2, 17, 8, 7), (1, 1), (1, 1), (0, 0), (1, 1), 1),
    ((3, 19, 6, 5), (3, 3), (1, 1), (1, 1), (1, 1), 1),  # C just over a 16-channel vector
    ((2, 5, 10, 9), (3, 3), (2, 2), (1, 1), (1, 1), 1),
    ((2, 6, 11, 8), (3, 2), (2, 3), (0, 1), (1, 1), 2),
    ((3, 4, 13, 12), (3, 3), (3, 1), (2, 2), (2, 1), 4),
    # The correlation kernel's K-blocks (64 rows, csrc/cpu/corr_kernel.cpp): runs longer than
    # a block with a partial last one, in the shift form (17 columns of several images, 20
    # channels: two column strips) and in the tiled form (tiles of over 64 patches); 120
    # channels padded to 128, whose pixels the shift form lays out a vector further apart
    # than the padded width; 141 channels, whose K-block panels in float64 are too wide to
    # block (whole runs per tile).
    ((9, 20, 5, 17), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((6, 5, 30, 22), (3, 3), (2, 2), (1, 1), (1, 1), 1),
    ((4, 120, 9, 10), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((8, 141, 6, 7), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    # 3×3 stride-1 dilation-1 Grams take their core in 4 × 4 Winograd tiles, the strips left
    # in 2 × 2 ones (csrc/cpu/lag_winograd.h): an even core (no direct remainder), 'valid' (core
    # from row 2), padding 2 (every row core), an odd core on one axis only, 33 channels (48
    # lanes), a 7 × 6 core (4 × 4 tiles, 2-wide strips right and below, a direct last row).
    ((2, 7, 8, 10), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((2, 6, 10, 9), (3, 3), (1, 1), (0, 0), (1, 1), 1),
    ((2, 5, 7, 8), (3, 3), (1, 1), (2, 2), (1, 1), 1),
    ((3, 33, 6, 9), (3, 3), (1, 1), (1, 2), (1, 1), 1),
    ((2, 9, 9, 8), (3, 3), (1, 1), (1, 1), (1, 1), 1),
]


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: f"{g[0]}k{g[1]}s{g[2]}p{g[3]}d{g[4]}g{g[5]}")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5),
                                       (torch.bfloat16, 2e-5), (torch.float16, 2e-5)])
def test_gram_matches_reference(geometry, bias, dtype, tol):
    shape, k, s, p, d, groups = geometry
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    check_gram(gram_op(x, k, s, p, d, groups, bias), x, geometry, bias, tol)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed_hw"])
@pytest.mark.parametrize("stride", [1, 2])
def test_gram_any_memory_layout(layout, stride):
    base = torch.randn(3, 6, 9, 11)
    if layout == "channels_last":
        x = base.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(3, 12, 10, 23)[:, ::2, 1:, ::2]
    else:
        x = torch.randn(3, 6, 11, 9).transpose(2, 3)
    assert not x.is_contiguous()
    out = gram_op(x, (3, 3), (stride, stride), (1, 1), (1, 1), 2, True)
    _assert_gram_close(out, _ref_gram(x, (3, 3), (stride, stride), (1, 1), (1, 1), 2, True), 2e-5)


# Very few patches per Gram entry — P = B·Ho·Wo with 32·P <= D (kBlasRatio in
# csrc/cpu/gram_cpu.h) — take im2col + one GEMM per group: stride 1 and 2 on tiny maps with
# many channels, a row-only stride with dilation, groups of >= 16 channels, a 1×1 kernel on a
# 1×1 map.
BLAS_GEOMETRIES = [
    ((2, 72, 2, 2), (3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((1, 40, 3, 3), (3, 3), (2, 2), (1, 1), (1, 1), 1),
    ((2, 72, 2, 2), (3, 3), (1, 1), (1, 1), (1, 1), 2),
    ((1, 24, 3, 4), (3, 3), (2, 2), (1, 1), (1, 1), 1),
    ((1, 40, 4, 3), (3, 2), (2, 1), (2, 0), (2, 1), 1),
    ((1, 40, 1, 1), (1, 1), (1, 1), (0, 0), (1, 1), 1),
]
BLAS_RATIO = 32  # csrc/cpu/gram_cpu.h: kBlasRatio


def _patches(shape, k, s, p, d):
    return shape[0] * ((shape[2] + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1) \
        * ((shape[3] + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1)


@pytest.mark.parametrize("geometry", BLAS_GEOMETRIES, ids=lambda g: f"{g[0]}k{g[1]}s{g[2]}g{g[5]}")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5),
                                       (torch.bfloat16, 2e-5)])
def test_gram_few_patches_matches_reference(geometry, bias, layout, dtype, tol):
    shape, k, s, p, d, groups = geometry
    assert BLAS_RATIO * _patches(shape, k, s, p, d) <= shape[1] // groups * k[0] * k[1]
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        wide = torch.randn(shape[0], 2 * shape[1], shape[2], shape[3] + 1, dtype=torch.float64)
        x = wide.to(dtype)[:, ::2, :, 1:]
    check_gram(gram_op(x, k, s, p, d, groups, bias), x, geometry, bias, tol)


algorithm_op = torch.ops.consequential_ext._im2col_gram_algorithm
# Every CPU algorithm by name (the automatic choice picks one per shape): shift takes stride
# 1; grouped is run where it is chosen, under 16 channels per group (its strided prefix sums
# cancel: ~1e-12 in float64 on 40 channels); the others take any geometry. Grouped subtracts
# border corrections from whole-image sums, so an entry's rounding error scales with the
# image's energy: on the few-patch geometries (a 2×2 map of one image, windows of one pixel)
# that is not small against the entry's own Cauchy–Schwarz scale, and those geometries go to
# the GEMM anyway. Shift multiplies each in-image pixel pair once, so it runs on them too.
ALGORITHMS = ("shift", "tiled", "grouped", "blas", "rows", "runs")


def _algorithm_cases():
    for geometry in GEOMETRIES + BLAS_GEOMETRIES:
        shape, _, s, _, _, groups = geometry
        for algorithm in ALGORITHMS:
            if geometry in BLAS_GEOMETRIES and algorithm == "grouped":
                continue
            if algorithm == "grouped" and shape[1] // groups >= 16:
                continue
            if algorithm in ("shift", "rows") and s != (1, 1):
                continue
            if algorithm == "runs" and geometry[4][1] != 1:  # runs of kw·C need dw = 1
                continue
            yield geometry, algorithm


@pytest.mark.parametrize("geometry,algorithm", list(_algorithm_cases()),
                         ids=lambda v: v if isinstance(v, str) else f"{v[0]}k{v[1]}s{v[2]}p{v[3]}d{v[4]}g{v[5]}")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5),
                                       (torch.bfloat16, 2e-5)])
def test_every_algorithm_matches_reference(geometry, algorithm, bias, dtype, tol):
    shape, k, s, p, d, groups = geometry
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    check_gram(algorithm_op(x, k, s, p, d, groups, bias, algorithm), x, geometry, bias, tol)


@pytest.mark.parametrize("algorithm", ["shift", "tiled", "blas", "rows"])
def test_bias_entries_of_small_windows_beside_large_values(algorithm):
    # A tap whose window holds small values in rows of large ones: its bias entry (Σ x over
    # the window) must be accurate on its own scale, not the row's (the shift kernel once took
    # the row total minus the outside columns: 25 % off here); a tap that sees only padding
    # has exactly 0.
    torch.manual_seed(3)
    x = torch.randn(2, 2, 6, 9) * 1e3
    x[..., :2] = torch.randn(2, 2, 6, 2) * 1e-3
    # tap 0 sees columns 0–1 only (no column is in every window); then a 'same' 3×3, whose
    # middle columns every tap sees
    for geometry in (((1, 3), (1, 1), (0, 0), (1, 3)), ((3, 3), (1, 1), (1, 1), (1, 1))):
        out = algorithm_op(x, *geometry, 1, True, algorithm)[0]
        ref = _ref_gram(x, *geometry, 1, True)[0]
        bias_col, ref_col = out[:-1, -1].double(), ref[:-1, -1]
        assert ((bias_col - ref_col).abs() <= 1e-5 * ref_col.abs()).all(), (bias_col, ref_col)
    x = torch.randn(2, 3, 3, 3)
    dead_geometry = ((7, 7), (1, 1), (2, 2), (1, 1))
    ref = _ref_gram(x, *dead_geometry, 1, True)[0]
    out = algorithm_op(x, *dead_geometry, 1, True, algorithm)[0]
    dead = ref.diagonal()[:-1] == 0
    assert dead.sum() == 120 and not out[:-1, -1][dead].any()


def test_automatic_choice_is_one_of_the_algorithms():
    # 16 × 16 × 32 × 32 takes the shift form, stride 2 the runs one (16 and 32 channels a run
    # step of sw·C ≤ 64) but the tiled one over 64 channels or with dilation across the rows,
    # 4 × 256 × 2 × 2 the GEMM
    # (32·P <= D: kBlasRatio in gram_cpu.h) but 32 × 256 × 4 × 4 (4·P <= D) the shift form,
    # 8 groups of 4 channels the grouped one, 3 and 5 channels (D = 28, 46 <= kRowsMaxD) and
    # a 1×1 over 47 the rows form, 6 channels (D = 55) the shift form again
    for shape, k, stride, groups, algorithm in (((16, 16, 32, 32), 3, 1, 1, "shift"),
                                                ((16, 16, 32, 32), 3, 2, 1, "runs"),
                                                ((4, 32, 16, 16), 3, 2, 1, "runs"),
                                                ((4, 64, 16, 16), 3, 2, 1, "tiled"),
                                                ((4, 256, 2, 2), 3, 1, 1, "blas"),
                                                ((32, 256, 4, 4), 3, 1, 1, "shift"),
                                                ((8, 32, 9, 9), 3, 1, 8, "grouped"),
                                                ((4, 3, 32, 32), 3, 1, 1, "rows"),
                                                ((4, 5, 9, 9), 3, 1, 1, "rows"),
                                                ((4, 47, 9, 9), 1, 1, 1, "rows"),
                                                ((4, 6, 9, 9), 3, 1, 1, "shift")):
        x = torch.randn(shape)
        st, ks, pd = (stride, stride), (k, k), (k // 2, k // 2)
        assert torch.equal(gram_op(x, ks, st, pd, (1, 1), groups, True),
                           algorithm_op(x, ks, st, pd, (1, 1), groups, True, algorithm))


@pytest.mark.parametrize("algorithm,stride,dilation,match", [
    ("shift", 2, 1, "shift algorithm needs stride 1"),
    ("rows", 2, 1, "rows algorithm needs stride 1"),
    ("runs", 1, 2, "runs algorithm needs dilation 1 along the width"),
    ("fft", 1, 1, "algorithm must be one of"),
])
def test_algorithm_refuses_what_it_cannot_do(algorithm, stride, dilation, match):
    with pytest.raises(RuntimeError, match=match):
        algorithm_op(torch.randn(2, 4, 6, 6), (3, 3), (stride, stride), (1, 1), (1, dilation),
                     1, False, algorithm)


# The strided and 1×1 forms, by name, on every layout. The runs kernel's pieces of work
# (csrc/cpu/gram_runs_cpu.cpp): one image cut into chunks of output rows (fewer than 4 images
# a thread), batches of many small pieces, of one piece, and a piece wider than a batch
# (3 rows × 702 × 32 > 2^16); runs padded to 16 lanes (3·7 = 21 of 32 columns real), row
# dilation, groups of 16 channels, kernel = stride, 1×1 strided. Then what the automatic
# choice leaves to the tiled kernel: a wide column step (2·48 > 64) and dilation across the
# rows (no runs there).
STRIDED_GEOMETRIES = [
    ((1, 24, 13, 11), (3, 3), (2, 2), (1, 1), (1, 1), 1),
    ((40, 16, 5, 6), (3, 3), (2, 2), (1, 0), (1, 1), 1),
    ((2, 48, 40, 37), (3, 3), (2, 2), (1, 1), (1, 1), 1),
    ((1, 32, 5, 700), (3, 3), (2, 2), (1, 1), (1, 1), 1),
    ((3, 7, 9, 12), (3, 3), (1, 2), (1, 1), (1, 1), 1),
    ((3, 20, 12, 9), (3, 3), (2, 2), (2, 1), (2, 1), 1),
    ((2, 32, 9, 8), (3, 3), (2, 2), (1, 1), (1, 1), 2),
    ((4, 16, 8, 12), (4, 4), (4, 4), (0, 0), (1, 1), 1),
    ((3, 64, 7, 5), (1, 1), (2, 2), (0, 0), (1, 1), 1),
    ((3, 48, 9, 9), (3, 3), (2, 2), (1, 1), (1, 1), 1),
    ((2, 5, 10, 9), (3, 3), (2, 2), (1, 1), (1, 2), 1),
]


def _strided_cases():
    for geometry in STRIDED_GEOMETRIES:
        for algorithm in ("runs", "tiled"):
            if algorithm == "runs" and geometry[4][1] != 1:
                continue
            yield algorithm, geometry


def _case_id(value):
    return value if isinstance(value, str) else "{}k{}s{}p{}d{}g{}".format(*value)


@pytest.mark.parametrize("algorithm,geometry", list(_strided_cases()), ids=_case_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5),
                                       (torch.float16, 2e-5)])
@pytest.mark.parametrize("threads", [1, 3])
def test_strided_forms_match_reference(algorithm, geometry, layout, dtype, tol, threads):
    shape, k, s, p, d, groups = geometry
    x = torch.randn(shape, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(shape[0], shape[1] * 2, shape[2], shape[3] + 3, dtype=torch.float64)
        x = x[:, 1::2, :, 2:-1]
    x = x.to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bias in (False, True):
            check_gram(algorithm_op(x, k, s, p, d, groups, bias, algorithm), x, geometry, bias,
                       tol)
    finally:
        torch.set_num_threads(before)


def test_rows_form_refuses_an_output_row_wider_than_its_panel():
    # 28 taps × 30000 output columns is past the panel's 2^16 elements; the automatic choice
    # then takes the shift form, which has no such bound.
    x = torch.randn(1, 3, 2, 30000)
    with pytest.raises(RuntimeError, match="an output row that fits a panel"):
        algorithm_op(x, (3, 3), (1, 1), (1, 1), (1, 1), 1, False, "rows")
    assert torch.equal(gram_op(x, (3, 3), (1, 1), (1, 1), (1, 1), 1, False),
                       algorithm_op(x, (3, 3), (1, 1), (1, 1), (1, 1), 1, False, "shift"))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_gram_after_caller_padding_modes(mode):
    x = torch.randn(2, 3, 8, 7)
    xp = F.pad(x, (2, 1, 1, 2), mode=mode)  # other padding modes are applied before the op
    out = gram_op(xp, (3, 3), (1, 1), (0, 0), (1, 1), 1, True)
    _assert_gram_close(out, _ref_gram(xp, (3, 3), (1, 1), (0, 0), (1, 1), 1, True), 2e-5)


def test_gram_across_batch_chunks():
    # 33 × 35 pixels × 16 channels per image: the 2^18-element copy holds 14 images, so 64
    # images take five chunks, the last one smaller.
    x = torch.randn(64, 16, 33, 33)
    out = gram_op(x, (3, 3), (1, 1), (1, 1), (1, 1), 1, True)
    _assert_gram_close(out, _ref_gram(x, (3, 3), (1, 1), (1, 1), (1, 1), 1, True), 2e-5)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed_hw"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float16, 2e-5)])
def test_rows_form_any_layout_across_chunks(layout, dtype, tol):
    # The rows form's panels hold 2^16 elements: 3 channels × 3×3 over 333-wide rows take 7
    # output rows a chunk (45 rows: the last chunk 3, its columns no whole number of
    # vectors); 1200-wide rows one output row a chunk.
    for shape in ((5, 3, 9, 333), (2, 3, 3, 1200)):
        if layout == "channels_last":
            x = torch.randn(shape, dtype=dtype).to(memory_format=torch.channels_last)
        elif layout == "sliced":
            x = torch.randn(shape[0], 2 * shape[1], shape[2] + 1, shape[3], dtype=dtype)
            x = x[:, ::2, 1:]
        else:
            x = torch.randn(shape[0], shape[1], shape[3], shape[2], dtype=dtype).transpose(2, 3)
        assert not x.is_contiguous()
        for p in ((1, 1), (0, 2)):
            out = algorithm_op(x, (3, 3), (1, 1), p, (1, 2), 1, True, "rows")
            check_gram(out, x, (shape, (3, 3), (1, 1), p, (1, 2), 1), True, tol)


def test_gram_is_exactly_symmetric():
    x = torch.randn(2, 7, 9, 8)
    for stride in (1, 2):
        g = gram_op(x, (3, 3), (stride, stride), (1, 1), (1, 1), 1, True)
        assert torch.equal(g, g.transpose(1, 2))


def test_gram_is_bit_identical_across_calls():
    # threads sum their chunks in a fixed order (checkpoint resumes rely on it)
    x = torch.randn(24, 8, 13, 11)
    for stride in (1, 2):
        first = gram_op(x, (3, 3), (stride, stride), (1, 1), (1, 1), 1, True)
        for _ in range(3):
            assert torch.equal(first, gram_op(x, (3, 3), (stride, stride), (1, 1), (1, 1), 1, True))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_reference_im2col_pointwise_is_unfold(layout):
    # 1×1, stride 1, no padding takes a reshape instead of unfold (the column side of SE
    # and pointwise layers): the same columns, in the same order.
    x = torch.randn(3, 12, 5, 7, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(3, 24, 5, 14, dtype=torch.float64)[:, ::2, :, ::2]
    for groups, bias in ((1, False), (3, True)):
        cols = reference.im2col(x, (1, 1), (1, 1), (0, 0), (1, 1), groups, bias)
        unfolded = F.unfold(x, (1, 1)).reshape(3, groups, 12 // groups, 35).permute(1, 2, 0, 3)
        unfolded = unfolded.reshape(groups, 12 // groups, 105)
        if bias:
            unfolded = torch.cat([unfolded, unfolded.new_ones(groups, 1, 105)], dim=1)
        assert torch.equal(cols, unfolded)


def test_gram_empty_batch_counts_no_patches():
    out = gram_op(torch.empty(0, 4, 5, 5), (3, 3), (1, 1), (1, 1), (1, 1), 2, True)
    assert out.shape == (2, 19, 19) and not out.any()


def test_public_op_dispatches_to_cpu_kernel():
    assert cx.ops.available_backends("im2col_gram", "cpu")[0] == "cpu"
    assert cx.ops.available_backends("ridge_solve", "cpu")[0] == "cpu"
    x = torch.randn(2, 3, 6, 5)
    with cx.ops.use_backend("cpu"):
        a = cx.ops.im2col_gram(x, 3, padding=1, bias=True)
    b = reference.im2col_gram(x, (3, 3), (1, 1), (1, 1), (1, 1), 1, True)[0]
    _assert_gram_close(a.unsqueeze(0), b.double().unsqueeze(0), 2e-5)


def test_cconv2d_backward_runs_the_cpu_kernels_by_default():
    # P = 4·81 patches ≫ D = 46: the matched gradient takes the row side, the Gram and G
    # from one _conv_gram_grad call (the rows form: D ≤ 48).
    x = torch.randn(4, 5, 9, 9, requires_grad=True)
    conv = cx.CConv2d(5, 7, 3, padding=1)
    go = torch.randn(4, 7, 9, 9)
    with torch.profiler.profile() as prof:
        conv(x).backward(go)
    names = {e.name for e in prof.events()}
    assert {"consequential_ext::_conv_gram_grad", "consequential_ext::ridge_solve"} <= names
    by_kernel = conv.weight.grad.clone()
    conv.weight.grad = None
    with cx.ops.use_backend("reference"):
        conv(x).backward(go)
    assert torch.allclose(by_kernel, conv.weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("args,match", [
    (((2, 3, 5), (3, 3), (1, 1), (0, 0), (1, 1), 1), "x must be a 4-D"),
    (((2, 3, 5, 5), (3,), (1, 1), (0, 0), (1, 1), 1), "kernel_size"),
    (((2, 3, 5, 5), (3, 3), (0, 1), (0, 0), (1, 1), 1), "stride"),
    (((2, 3, 5, 5), (3, 3), (1, 1), (-1, 0), (1, 1), 1), "padding"),
    (((2, 3, 5, 5), (3, 3), (1, 1), (0, 0), (1, 0), 1), "dilation"),
    (((2, 3, 5, 5), (3, 3), (1, 1), (0, 0), (1, 1), 2), "groups"),
    (((2, 3, 2, 5), (3, 3), (1, 1), (0, 0), (1, 1), 1), "does not fit"),
    (((2, 3, 0, 5), (1, 1), (1, 1), (1, 1), (1, 1), 1), "non-empty spatial dims"),
    # past int64 inside the kernel: the padded size wrapped ("does not fit", wrongly)
    (((1, 2, 3, 3), (1, 1), (1, 1), (2 ** 62, 0), (1, 1), 1), "below 2\\^62"),
    (((1, 2, 3, 3), (3, 3), (1, 1), (0, 0), (1, 2 ** 61), 1), "below 2\\^62"),
    (((1, 2, 3, 3), (1, 1), (1, 1), (2 ** 40, 2 ** 40), (1, 1), 1), "than int64 counts"),
])
def test_gram_rejects_bad_arguments(args, match):
    shape, *rest = args
    with pytest.raises(RuntimeError, match=match):
        gram_op(torch.randn(shape), *rest, False)
    with pytest.raises(RuntimeError, match="float16, bfloat16, float32 or float64"):
        gram_op(torch.ones(2, 3, 5, 5, dtype=torch.int32), (3, 3), (1, 1), (0, 0), (1, 1), 1, False)


def test_gram_opcheck():
    x = torch.randn(2, 4, 6, 5)
    torch.library.opcheck(gram_op.default, (x, [3, 3], [1, 1], [1, 1], [1, 1], 2, True))
    torch.library.opcheck(gram_op.default, (x.double(), [3, 2], [2, 1], [0, 1], [1, 1], 1, False))


# ---- ridge_solve -------------------------------------------------------------------------

def _spd_batch(batch, d, m, dtype=torch.float64):
    x = torch.randn(*batch, d, 2 * d + 3, dtype=torch.float64)
    gram = x @ x.transpose(-1, -2) / x.shape[-1]
    grad = torch.randn(*batch, m, d, dtype=torch.float64)
    return gram.to(dtype), grad.to(dtype)


def _ref_solve(gram, grad, ridge):
    eye = torch.eye(gram.shape[-1], dtype=torch.float64)
    a = gram.double() + ridge * eye
    return torch.linalg.solve(a, grad.double().transpose(-1, -2)).transpose(-1, -2)


@pytest.mark.parametrize("batch,d,m", [((), 7, 5), ((3,), 13, 1), ((2, 3), 5, 9), ((1,), 33, 17)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4),
                                       (torch.bfloat16, 1e-4)])
def test_ridge_solve_matches_linalg_solve(batch, d, m, dtype, tol):
    gram, grad = _spd_batch(batch, d, m, dtype)
    out = solve_op(gram, grad, 1e-2, None)
    assert out.dtype == dtype and out.shape == grad.shape
    # the work dtype is float32 or better: compare before the final rounding to dtype
    work = solve_op(gram, grad, 1e-2, torch.float64 if dtype == torch.float64 else torch.float32)
    ref = _ref_solve(gram, grad, 1e-2)
    rel = (work.double() - ref).norm() / ref.norm()
    assert rel <= tol, f"relative error {rel:.3g}"
    assert torch.equal(out, work.to(dtype))  # the rescale is a plain cast of the solution


def test_ridge_solve_out_dtype_rescale():
    gram, grad = _spd_batch((2,), 6, 4, torch.float32)
    out = solve_op(gram, grad, 1e-3, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    ref = _ref_solve(gram, grad, 1e-3)
    assert ((out.double() - ref).abs() <= 2 ** -8 * ref.abs() + 1e-6).all()


def test_ridge_solve_escalates_records_and_warns_once(monkeypatch):
    monkeypatch.setattr(reference, "_escalation_warned", False)  # the flag every backend shares
    torch.ops.consequential_ext.take_ridge_escalations()  # forget earlier records
    gram, grad = _spd_batch((2,), 6, 3)
    gram[1] -= 0.5 * torch.eye(6, dtype=torch.float64) * gram[1].diagonal().max()  # indefinite
    out = solve_op(gram, grad, 1e-3, None)
    requested, escalated = torch.ops.consequential_ext.take_ridge_escalations()
    steps = math.log10(escalated / requested)      # ×10 a step, the whole batch at once
    assert requested == 1e-3 and steps >= 1 and abs(steps - round(steps)) < 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.allclose(out, reference.ridge_solve(gram, grad, escalated), rtol=1e-9,
                              atol=1e-12)
    with cx.ops.use_backend("cpu"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = cx.ops.ridge_solve(gram, grad, 1e-3)
        ref = reference.ridge_solve(gram, grad, 1e-3)  # escalates system 1's ridge alone
    assert torch.allclose(out, ref, rtol=1e-9, atol=1e-12)
    assert torch.allclose(out[0], _ref_solve(gram[:1], grad[:1], 1e-3)[0], rtol=1e-9,
                          atol=1e-12)
    monkeypatch.setattr(reference, "_escalation_warned", False)
    with cx.ops.use_backend("cpu"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cx.ops.ridge_solve(gram, grad, 1e-3)
        cx.ops.ridge_solve(gram, grad, 1e-3)
    escalations = [w for w in caught if "escalated" in str(w.message)]
    assert len(escalations) == 1 and escalations[0].category is RuntimeWarning


@pytest.mark.parametrize("bad", ["gram_nan", "grad_inf"])
def test_ridge_solve_non_finite_gives_nan_not_exception(bad):
    gram, grad = _spd_batch((2,), 5, 3, torch.float32)
    if bad == "gram_nan":
        gram[0, 1, 1] = float("nan")
    else:
        grad[1, 0, 2] = float("inf")
    out = solve_op(gram, grad, 1e-3, torch.float16)
    assert out.dtype == torch.float16 and out.isnan().all()


def test_ridge_solve_rejects_bad_arguments():
    gram, grad = _spd_batch((2,), 4, 3)
    with pytest.raises(RuntimeError, match="ridge"):
        solve_op(gram, grad, 0.0, None)
    with pytest.raises(RuntimeError, match="gram must be"):
        solve_op(gram[..., :3], grad, 1e-3, None)
    with pytest.raises(RuntimeError, match="grad must be"):
        solve_op(gram, grad[..., :3], 1e-3, None)


def test_ridge_solve_opcheck():
    gram, grad = _spd_batch((3,), 5, 2, torch.float32)
    torch.library.opcheck(solve_op.default, (gram, grad, 1e-2, None))
    torch.library.opcheck(solve_op.default, (gram, grad, 1e-2, torch.float64))
