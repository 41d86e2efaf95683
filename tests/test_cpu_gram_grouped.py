"""CPU im2col_gram on its grouped path (groups > 1 with fewer than 16 channels per group:
depthwise, small groups; groups in SIMD lanes, strided prefix sums) against the float64
``unfold`` reference, on the shapes real models give it and awkward ones."""
import pytest
import torch

import consequential_ext as cx

from test_cpu_kernels import _assert_gram_close, _ref_gram, check_gram, gram_op

pytestmark = pytest.mark.skipif("cpu" not in cx.ops.available_backends("im2col_gram", "cpu"),
                                reason="consequential_ext._C was built without CPU kernels")

# (B, C, H, W), kernel, stride, padding, dilation, groups
GEOMETRIES = [
    ((3, 40, 16, 16), (7, 7), (1, 1), (3, 3), (1, 1), 40),   # ConvNeXt depthwise
    ((2, 33, 4, 4), (7, 7), (1, 1), (3, 3), (1, 1), 33),     # 7×7 on 4×4: mostly padding
    ((2, 17, 2, 2), (7, 7), (1, 1), (3, 3), (1, 1), 17),     # 2×2 map
    ((3, 24, 9, 7), (3, 3), (2, 2), (1, 1), (1, 1), 24),     # MobileNet stride-2 depthwise
    ((2, 20, 11, 13), (5, 5), (2, 2), (2, 2), (1, 1), 20),   # EfficientNet 5×5 stride 2
    ((2, 12, 13, 9), (3, 3), (4, 4), (1, 0), (1, 1), 12),    # stride 4 > kernel
    ((2, 8, 12, 8), (4, 4), (4, 4), (0, 0), (1, 1), 8),      # kernel = stride (patches)
    ((3, 18, 5, 7), (1, 1), (1, 1), (0, 0), (1, 1), 18),     # 1×1 depthwise
    ((2, 10, 7, 9), (1, 1), (2, 2), (0, 0), (1, 1), 5),      # 1×1 stride 2, 2 per group
    ((2, 12, 9, 10), (3, 2), (1, 2), (2, 0), (2, 1), 4),     # 3 per group, dilation
    ((2, 30, 7, 7), (3, 3), (1, 1), (1, 1), (1, 1), 2),      # 15 per group: just under 16
    ((1, 6, 3, 5), (5, 3), (3, 1), (4, 2), (1, 1), 3),       # padding past the kernel
    ((2, 20, 33, 31), (3, 3), (1, 1), (1, 1), (1, 1), 20),   # large map: tasks in several passes
]


@pytest.mark.parametrize("geometry", GEOMETRIES,
                         ids=lambda g: f"{g[0]}k{g[1]}s{g[2]}p{g[3]}d{g[4]}g{g[5]}")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5),
                                       (torch.bfloat16, 2e-5)])
def test_grouped_gram_matches_reference(geometry, bias, dtype, tol):
    torch.manual_seed(hash((geometry, bias)) % 2 ** 31)
    shape, k, s, p, d, groups = geometry
    x = torch.randn(shape, dtype=torch.float64).to(dtype)
    check_gram(gram_op(x, k, s, p, d, groups, bias), x, geometry, bias, tol)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed_hw"])
@pytest.mark.parametrize("stride", [1, 2])
def test_grouped_gram_any_memory_layout(layout, stride):
    torch.manual_seed(3)
    if layout == "channels_last":
        x = torch.randn(3, 20, 9, 11).to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(3, 40, 10, 23)[:, ::2, 1:, ::2]
    else:
        x = torch.randn(3, 20, 11, 9).transpose(2, 3)
    assert not x.is_contiguous()
    for groups in (20, 10):
        out = gram_op(x, (3, 3), (stride, stride), (1, 1), (1, 1), groups, True)
        ref = _ref_gram(x, (3, 3), (stride, stride), (1, 1), (1, 1), groups, True)
        _assert_gram_close(out, ref, 2e-5)


def test_grouped_gram_is_bit_identical_across_calls():
    x = torch.randn(8, 48, 9, 9)
    first = gram_op(x, (5, 5), (1, 1), (2, 2), (1, 1), 48, True)
    for _ in range(2):
        assert torch.equal(first, gram_op(x, (5, 5), (1, 1), (2, 2), (1, 1), 48, True))


@pytest.mark.parametrize("threads", [1, 3])
def test_grouped_gram_is_bit_identical_across_thread_counts(threads):
    # The tasks are split into passes by thread count; each entry is still summed by one
    # work item in one order.
    x = torch.randn(4, 16, 9, 11)  # one lane block: the passes are what the threads share
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = gram_op(x, (3, 3), (1, 1), (1, 1), (1, 1), 16, True)
        torch.set_num_threads(threads)
        other = gram_op(x, (3, 3), (1, 1), (1, 1), (1, 1), 16, True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(two, other)
    _assert_gram_close(other, _ref_gram(x, (3, 3), (1, 1), (1, 1), (1, 1), 16, True), 2e-5)


def test_depthwise_cconv2d_matched_gradient_matches_reference_backend():
    torch.manual_seed(0)
    conv = cx.CConv2d(24, 24, 5, stride=2, padding=2, groups=24)
    x = torch.randn(6, 24, 9, 9).to(memory_format=torch.channels_last)
    go = torch.randn(6, 24, 5, 5)
    conv(x).backward(go)
    by_kernel = conv.weight.grad.clone()
    conv.weight.grad = None
    with cx.ops.use_backend("reference"):
        conv(x).backward(go)
    assert torch.allclose(by_kernel, conv.weight.grad, rtol=1e-4, atol=1e-5)
