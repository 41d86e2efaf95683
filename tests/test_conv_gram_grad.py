"""ops.conv_gram_grad — a conv's Gram and its weight gradient G = dZ Xᵀ in one call — and
ops.conv_weight_grad — that G alone — against float64 references (explicit ``unfold`` for the
Gram, autograd of ``F.conv2d`` for G), where the CPU shift or rows kernel computes G in its
own pass over x and where ATen's conv backward gives it; the predicate that picks between them for a
layer that also needs its input gradient (ops.conv_gram_brings_grad) against what the
compiled ops do; and C-layers, exact and amortised, on both paths."""
import copy
import zlib

import pytest
import torch
import torch.nn.functional as F

import consequential_ext as cx
from consequential_ext import ops
from matched_reference import ordinary_grads
from rule_reference import close, unfold_gram

pytestmark = pytest.mark.skipif("cpu" not in ops.available_backends("_conv_gram_grad", "cpu"),
                                reason="consequential_ext._C was built without CPU kernels")


def _reference_grad(x, gy, weight_shape, stride, padding, dilation, groups, bias):
    """(groups, out/groups, D) float64 G of F.conv2d by autograd; the bias column Σ dZ."""
    gw, gb = ordinary_grads(lambda inp, w, b: F.conv2d(inp, w, b, stride, padding, dilation,
                                                       groups),
                            x, torch.zeros(weight_shape),
                            torch.zeros(weight_shape[0]) if bias else None, gy)
    out = weight_shape[0]
    grad = gw.reshape(groups, out // groups, -1)
    return torch.cat([grad, gb.reshape(groups, -1, 1)], -1) if bias else grad


def _noncontiguous(t):
    """Same values, channels every other slot of a wider tensor."""
    wide = torch.zeros(t.shape[0], 2 * t.shape[1], *t.shape[2:], dtype=t.dtype)
    wide[:, ::2] = t
    return wide[:, ::2]


# (B, C, H, W), out, kernel, padding, dilation, groups, bias — stride 1 throughout. Where the
# shift kernel brings G: ≥ 16 channels per group a side with little padding to 16 lanes, odd
# maps, non-square kernels, uneven and oversize padding (Wo > W + kw − 1), 'valid', dilation,
# groups, channels not a multiple of 16 (48 of 48). The rest: ATen's conv backward gives G.
FUSED = [
    ((3, 16, 7, 9), 16, (3, 3), (1, 1), (1, 1), 1, True),
    ((2, 32, 5, 6), 48, (3, 2), (2, 0), (1, 1), 1, False),
    ((12, 48, 6, 5), 32, (5, 5), (3, 4), (1, 1), 1, True),
    ((4, 32, 9, 8), 32, (3, 3), (0, 0), (2, 1), 1, True),
    ((3, 64, 5, 5), 64, (3, 3), (1, 1), (1, 1), 2, True),
    ((2, 16, 4, 11), 16, (1, 3), (0, 1), (1, 3), 1, False),
    ((2, 32, 4, 4), 32, (3, 3), (1, 1), (1, 1), 1, True),    # few patches (P = 32, D = 289)
    # 3×3 dilation 1: G (and the Gram's core) in 2 × 2 Winograd tiles — even output maps,
    # 'valid', padding 2 with more output than input channels, fewer output than input
    # channels, uneven padding with an odd output row
    ((2, 16, 10, 8), 16, (3, 3), (0, 0), (1, 1), 1, True),
    ((2, 16, 6, 7), 32, (3, 3), (2, 2), (1, 1), 1, False),
    ((3, 32, 8, 8), 16, (3, 3), (1, 1), (1, 1), 1, True),
    ((2, 16, 8, 6), 16, (3, 3), (2, 1), (1, 1), 1, True),
    # The rows kernel (D ≤ 48, stride 1, any channels): G from its GEMM beside the Gram — a
    # 3-channel stem, one channel 5×5 'valid', 1×1 over 16 and over 47 (D = 48), a dilated
    # non-square kernel with oversize padding, more output channels than taps, groups of
    # ≥ 16 channels with a 1×1 kernel, output rows so wide that a panel holds one
    ((2, 3, 7, 6), 16, (3, 3), (1, 1), (1, 1), 1, True),
    ((3, 1, 9, 8), 6, (5, 5), (0, 0), (1, 1), 1, False),
    ((2, 16, 6, 6), 16, (1, 1), (0, 0), (1, 1), 1, True),
    ((2, 47, 5, 3), 9, (1, 1), (0, 0), (1, 1), 1, True),
    ((2, 4, 6, 9), 5, (2, 3), (3, 4), (2, 2), 1, True),
    ((3, 2, 5, 7), 70, (3, 3), (1, 1), (1, 1), 1, False),
    ((2, 32, 3, 5), 32, (1, 1), (0, 0), (1, 1), 2, True),
    ((1, 3, 3, 800), 40, (3, 3), (1, 1), (1, 1), 1, True),
]
NOT_FUSED = [
    ((2, 20, 6, 5), 24, (3, 3), (1, 1), (1, 1), 1, True),    # mostly padding lanes
    ((2, 6, 6, 7), 8, (3, 3), (1, 1), (1, 1), 1, True),      # D = 55: past the rows kernel
    ((2, 64, 4, 5), 32, (1, 1), (0, 0), (1, 1), 1, True),    # 1×1 over 64: the tiled Gram
    ((2, 8, 7, 7), 8, (3, 3), (1, 1), (1, 1), 8, False),     # depthwise: lanes
    ((1, 32, 2, 2), 32, (3, 3), (1, 1), (1, 1), 1, True),    # few patches: GEMM
]


def _case(shape, out, k, p, d, groups, dtype=torch.float32):
    x = torch.randn(shape, dtype=dtype)
    ho = shape[2] + 2 * p[0] - d[0] * (k[0] - 1)
    wo = shape[3] + 2 * p[1] - d[1] * (k[1] - 1)
    gy = torch.randn(shape[0], out, ho, wo, dtype=dtype)
    return x, gy, (out, shape[1] // groups, *k)


def _check(x, gy, weight_shape, p, d, groups, bias, tol):
    k = weight_shape[2:]
    gram, grad = ops.conv_gram_grad(x, gy, k, 1, p, d, groups=groups, bias=bias)
    assert gram.dtype == grad.dtype == (torch.float64 if x.dtype == torch.float64
                                        else torch.float32)
    close(gram, unfold_gram(x, k, 1, p, d, groups, bias), tol, "Gram")
    close(grad, _reference_grad(x, gy, weight_shape, 1, p, d, groups, bias), tol, "G")
    # G alone: the same passes without the Gram's, so the same sums in the same order
    assert torch.equal(ops.conv_weight_grad(x, gy, k, 1, p, d, groups=groups, bias=bias), grad)
    return gram, grad


@pytest.mark.parametrize("case", FUSED + NOT_FUSED)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "noncontiguous"])
def test_gram_and_grad_match_float64(case, layout):
    torch.manual_seed(zlib.crc32(repr((case, layout)).encode()))
    shape, out, k, p, d, groups, bias = case
    x, gy, weight_shape = _case(shape, out, k, p, d, groups)
    if layout == "channels_last":
        x, gy = (t.contiguous(memory_format=torch.channels_last) for t in (x, gy))
    elif layout == "noncontiguous":
        x, gy = _noncontiguous(x), gy.transpose(2, 3).contiguous().transpose(2, 3)
    _check(x, gy, weight_shape, p, d, groups, bias, 1e-5)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.bfloat16, 1e-5),
                                        (torch.float16, 1e-5)])
def test_narrow_and_wide_dtypes(dtype, tol):
    """float64 stays float64; bf16/fp16 values are accumulated in float32 (the reference is
    computed on the same rounded values)."""
    torch.manual_seed(3)
    shape, out, k, p, d, groups, bias = FUSED[0]
    x, gy, weight_shape = _case(shape, out, k, p, d, groups, dtype)
    _check(x, gy, weight_shape, p, d, groups, bias, tol)


def test_empty_batch_gives_zero_grad_and_the_bias_count():
    shape, out, k, p, d, groups, _ = FUSED[0]
    x, gy, _ = _case((0,) + shape[1:], out, k, p, d, groups)
    gram, grad = ops.conv_gram_grad(x, gy, k, 1, p, d, groups=groups, bias=True)
    assert not grad.any() and grad.shape == (1, out, gram.shape[-1])
    assert not gram[0, :-1].any() and gram[0, -1, -1] == 0
    alone = ops.conv_weight_grad(x, gy, k, 1, p, d, groups=groups, bias=True)
    assert not alone.any() and alone.shape == grad.shape


def _aten_backward_ran(fn):
    with torch.profiler.profile() as prof:
        fn()
    return any(e.name == "aten::convolution_backward" for e in prof.events())


@pytest.mark.parametrize("case", FUSED + NOT_FUSED)
def test_predicate_says_what_the_compiled_op_does(case):
    """conv_gram_brings_grad mirrors csrc/cpu/gram_cpu.cpp's grad_algorithm: the op runs
    ATen's conv backward exactly where the predicate says the kernel does not bring G."""
    shape, out, k, p, d, groups, bias = case
    x, gy, _ = _case(shape, out, k, p, d, groups)
    brings = ops.conv_gram_brings_grad(x, gy, k, (1, 1), p, d, groups, bias)
    assert brings == (case in FUSED)
    assert _aten_backward_ran(
        lambda: ops.conv_gram_grad(x, gy, k, 1, p, d, groups=groups, bias=bias)) != brings
    assert _aten_backward_ran(
        lambda: ops.conv_weight_grad(x, gy, k, 1, p, d, groups=groups, bias=bias)) != brings
    strided = ops.conv_gram_brings_grad(x, gy, k, (2, 1), p, d, groups, bias)
    assert not strided  # the shift and rows kernels are stride 1 only


def test_reference_backend_gives_the_same():
    torch.manual_seed(5)
    shape, out, k, p, d, groups, bias = FUSED[4]
    x, gy, weight_shape = _case(shape, out, k, p, d, groups)
    compiled = ops.conv_gram_grad(x, gy, k, 1, p, d, groups=groups, bias=bias)
    alone = ops.conv_weight_grad(x, gy, k, 1, p, d, groups=groups, bias=bias)
    with ops.use_backend("reference"):
        assert not ops.conv_gram_grad_is_native(x, gy)
        spec = ops.conv_gram_grad(x, gy, k, 1, p, d, groups=groups, bias=bias)
        spec_alone = ops.conv_weight_grad(x, gy, k, 1, p, d, groups=groups, bias=bias)
    for a, b in zip(compiled, spec, strict=True):
        close(a, b.double(), 1e-5)
    close(alone, spec_alone.double(), 1e-5)


@pytest.mark.parametrize("bad, match", [
    (lambda gy: gy[:, :, :-1], "grad_output must be"),
    (lambda gy: gy[:1], "grad_output must be"),
    (lambda gy: gy[:, :0], "grad_output must be"),     # no output channels
    (lambda gy: gy.double(), "grad_output must be"),
    (lambda gy: gy[0], "grad_output must be"),
    (lambda gy: gy.numpy(), "grad_output must be"),
    (lambda gy: gy.to("meta"), "grad_output must be on x's device"),
])
@pytest.mark.parametrize("name", ["conv_gram_grad", "conv_weight_grad"])
def test_bad_grad_output_is_named(bad, match, name):
    shape, out, k, p, d, groups, bias = FUSED[0]
    x, gy, _ = _case(shape, out, k, p, d, groups)
    with pytest.raises(ValueError, match=f"{name}: {match}"):
        getattr(ops, name)(x, bad(gy), k, 1, p, d, groups=groups, bias=bias)
    with ops.use_backend("reference"), pytest.raises(ValueError, match=f"{name}: {match}"):
        getattr(ops, name)(x, bad(gy), k, 1, p, d, groups=groups, bias=bias)
    if isinstance(bad(gy), torch.Tensor):   # the compiled op's own checks
        with pytest.raises(RuntimeError, match=f"{name}: grad_output must"):
            getattr(torch.ops.consequential_ext, "_" + name)(x, bad(gy), list(k), [1, 1],
                                                             list(p), list(d), groups, bias)


@pytest.mark.parametrize("input_grad", [False, True])
def test_c_layer_on_the_fused_path_matches_the_reference_backend(input_grad):
    """A CConv2d whose Gram kernel brings G, with and without an input gradient: the fused
    op ran, no native weight-gradient pass did, and the gradients are the reference's."""
    torch.manual_seed(7)
    conv = cx.CConv2d(16, 16, 3, padding=1, ridge=0.05)
    x = torch.randn(8, 16, 7, 6, requires_grad=input_grad)   # P = 336 > D = 145: row side
    go = torch.randn(8, 16, 7, 6)
    with torch.profiler.profile() as prof:
        conv(x).backward(go)
    names = [e.name for e in prof.events()]
    assert "consequential_ext::_conv_gram_grad" in names
    masks = [e for e in prof.events() if e.name == "aten::convolution_backward"]
    assert len(masks) == int(input_grad)   # only the input gradient's pass, where needed
    got = [conv.weight.grad.clone(), conv.bias.grad.clone()]
    got_x = x.grad.clone() if input_grad else None
    conv.zero_grad(set_to_none=True)
    x.grad = None
    with ops.use_backend("reference"):
        conv(x).backward(go)
    close(got[0], conv.weight.grad.double(), 1e-5, "weight")
    close(got[1], conv.bias.grad.double(), 1e-5, "bias")
    if input_grad:
        close(got_x, x.grad.double(), 1e-6, "input")


@pytest.mark.parametrize("input_grad", [False, True])
def test_amortised_c_layer_takes_g_alone_from_the_shift_kernel(input_grad):
    """An amortised CConv2d builds a Gram only on refresh steps; where the shift kernel brings
    G it gives it alone (no native weight-gradient pass), and over refresh and other steps
    the gradients are those of the same amortised layer on the reference backend (there G
    comes from the native conv backward, with the input gradient's where there is one)."""
    torch.manual_seed(11)
    conv = cx.amortize(cx.CConv2d(16, 16, 3, padding=1, ridge=0.05), every=2)
    twin = copy.deepcopy(conv)
    for step in range(3):                    # refresh, other, refresh
        x = torch.randn(8, 16, 7, 6, requires_grad=input_grad)
        go = torch.randn(8, 16, 7, 6)
        with torch.profiler.profile() as prof:
            conv(x).backward(go)
        names = [e.name for e in prof.events()]
        assert "consequential_ext::_conv_weight_grad" in names
        assert ("consequential_ext::im2col_gram" in names) == (step % 2 == 0)
        assert names.count("aten::convolution_backward") == int(input_grad)
        got_x = x.grad.clone() if input_grad else None
        x.grad = None
        with ops.use_backend("reference"):
            twin(x).backward(go)
        close(conv.weight.grad, twin.weight.grad.double(), 1e-5, "weight")
        close(conv.bias.grad, twin.bias.grad.double(), 1e-5, "bias")
        if input_grad:
            close(got_x, x.grad.double(), 1e-6, "input")
        for layer in (conv, twin):
            layer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("groups, k", [(1, 1), (2, 3)])
def test_an_input_without_channels_still_has_the_bias_column(groups, k):
    """x with C = 0: every patch is zero but the bias's ones row, so G's last column is Σ dZ
    (ATen's conv backward of an empty input zeroes its bias gradient: the column was 0)."""
    torch.manual_seed(0)
    x = torch.randn(2, 0, 5, 5)
    gy = torch.randn(2, 4, 5 - k + 1, 5 - k + 1)
    expected = gy.double().sum((0, 2, 3)).reshape(groups, 4 // groups)
    for backend in ops.available_backends("_conv_gram_grad", "cpu"):
        with ops.use_backend(backend):
            gram, grad = ops.conv_gram_grad(x, gy, k, groups=groups, bias=True)
            alone = ops.conv_weight_grad(x, gy, k, groups=groups, bias=True)
        for g in (grad, alone):
            assert g.shape == (groups, 4 // groups, 1)
            torch.testing.assert_close(g[..., -1].double(), expected, rtol=1e-6, atol=1e-6)
        patches = 2 * (5 - k + 1) ** 2
        assert gram.shape == (groups, 1, 1) and gram.flatten().tolist() == [patches] * groups


_ONEDNN_HEAP_BUG = """
import torch, torch.nn.functional as F, consequential_ext as cx
from consequential_ext import ops
torch.set_num_threads(1)
torch.manual_seed(0)
for c in (2, 3, 7):
    for stride in ((2, 2), (2, 1), (1, 2)):
        x = torch.randn(2, c, 16, 16).contiguous(memory_format=torch.channels_last)
        ho, wo = (16 - 1) // stride[0] + 1, (16 - 1) // stride[1] + 1
        gy = torch.randn(2, 4, ho, wo)
        w = torch.zeros(4, c, 1, 1, dtype=torch.float64, requires_grad=True)
        F.conv2d(x.double().contiguous(), w, None, stride).backward(gy.double())
        expected = w.grad.reshape(1, 4, c)
        for _ in range(3):
            g = ops.conv_weight_grad(x, gy, 1, stride)
            _, g2 = ops.conv_gram_grad(x, gy, 1, stride)
            for got in (g, g2):
                assert (got.double() - expected).abs().max() < 1e-4, (c, stride)
            layer = cx.CConv2d(c, 4, 1, stride).to(memory_format=torch.channels_last)
            layer(x.requires_grad_()).backward(gy)
            assert torch.isfinite(layer.weight.grad).all()
            x = x.detach()
print("survived")
"""


def test_a_strided_1x1_conv_over_a_few_channels_last_channels_survives_its_backward():
    """torch 2.13's oneDNN weight gradient of a 1×1 strided conv over a channels_last input of
    2–7 channels corrupts the heap (plain nn.Conv2d's backward aborts the process); the ops'
    ATen path and the C-layers' backward give that input NCHW. Run in a child process: the
    bug aborts it."""
    import os
    import pathlib
    import subprocess
    import sys
    root = pathlib.Path(__file__).parent.parent
    run = subprocess.run([sys.executable, "-c", _ONEDNN_HEAP_BUG], cwd=root,
                         env=dict(os.environ, PYTHONPATH=str(root)), capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and "survived" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
