"""Every convolution geometry parameter anisotropic in one axis at a time — kernel, stride,
padding, dilation and the uneven 'same' padding — through every rule, both sides of the
solve and every CPU Gram backend, against the float64 references.

A bug that swaps H and W (the F.pad order of the extra 'same' padding, a stride or padding
read from the other axis) only shows when the two axes differ, and only in the axis the
case makes odd; a case that is uneven in both axes, or in neither, lets it through.
"""
import pytest
import torch
import torch.nn.functional as F

import consequential_ext as cx
import rule_reference as rr
from rule_reference import pair
from consequential_ext import matching

RIDGE = 0.03
# nn's own note that an even 'same' kernel pads a copy of the input: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

# B, Cin, Cout, (H, W), kernel, stride, padding, dilation, groups, bias — H ≠ W throughout.
CASES = {
    "same-uneven-H-k43": (2, 2, 3, (7, 6), (4, 3), 1, "same", 1, 1, True),
    "same-uneven-W-k32": (2, 3, 2, (6, 7), (3, 2), 1, "same", 1, 1, True),
    "same-uneven-H-k23-d12": (1, 2, 4, (6, 9), (2, 3), 1, "same", (1, 2), 2, False),
    "same-uneven-W-k22-d21": (2, 2, 2, (8, 5), (2, 2), 1, "same", (2, 1), 1, True),
    "same-uneven-W-k14": (2, 2, 3, (5, 7), (1, 4), 1, "same", 1, 1, True),
    "kernel-H-31": (2, 2, 3, (7, 6), (3, 1), 1, 0, 1, 1, True),
    "kernel-W-13": (2, 2, 3, (7, 6), (1, 3), 1, 0, 1, 1, True),
    "stride-H-21": (2, 2, 3, (9, 7), 3, (2, 1), (1, 0), 1, 1, True),
    "stride-W-12": (2, 2, 3, (9, 7), 3, (1, 2), (0, 1), 1, 1, True),
    "padding-H-20": (2, 2, 3, (5, 7), 3, 1, (2, 0), 1, 1, True),
    "padding-W-02": (2, 2, 4, (5, 7), 3, 1, (0, 2), 1, 2, True),
    "dilation-H-21": (2, 2, 3, (8, 7), 3, 1, 1, (2, 1), 1, True),
    "dilation-W-12": (2, 2, 3, (8, 7), 3, 1, 1, (1, 2), 1, False),
}


def _inputs(case, seed):
    b, cin, cout, (h, w), k, stride, padding, dilation, groups, bias = case
    torch.manual_seed(seed)
    x = torch.randn(b, cin, h, w, dtype=torch.float64)
    layer = torch.nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias,
                            dtype=torch.float64)
    return x, layer.weight.detach(), None if layer.bias is None else layer.bias.detach()


@pytest.mark.parametrize("rule", rr.RULES)
@pytest.mark.parametrize("name", CASES)
def test_every_rule_matches_reference_one_axis_at_a_time(name, rule):
    case = CASES[name]
    _, _, _, _, _, stride, padding, dilation, groups, _ = case
    x, weight, bias = _inputs(case, seed=len(name))
    w = weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    xg = x.clone().requires_grad_()
    y = cx.functional.cconv2d(xg, w, b, stride, padding, dilation, groups, rule=rule, ridge=RIDGE)
    gy = torch.randn_like(y)
    y.backward(gy)
    gx, gw, gb = rr.conv2d(rule, x, weight, bias, gy, stride, padding, dilation, groups, RIDGE)
    rr.close(xg.grad, gx, 1e-9, f"{rule} input signal")
    rr.close(w.grad, gw, 1e-9, f"{rule} weight")
    if bias is not None:
        rr.close(b.grad, gb, 1e-9, f"{rule} bias")


def _explicit_padding(x, padding, kernel_size, dilation):
    """x padded by nn's 'same' rule (extra on the bottom/right), independent of the library."""
    if padding != "same":
        return x, padding
    (kh, kw), (dh, dw) = kernel_size, dilation
    th, tw = dh * (kh - 1), dw * (kw - 1)
    return F.pad(x, (tw // 2, tw - tw // 2, th // 2, th - th // 2)), 0


@pytest.mark.parametrize("side", ["row", "column"])
@pytest.mark.parametrize("name", CASES)
def test_both_sides_of_the_solve_one_axis_at_a_time(name, side):
    case = CASES[name]
    _, _, cout, _, _, stride, padding, dilation, groups, has_bias = case
    x, weight, bias = _inputs(case, seed=len(name) + 1)
    gy = torch.randn_like(F.conv2d(x, weight, bias, stride, padding, dilation, groups))
    xp, pad = _explicit_padding(x, padding, weight.shape[2:], pair(dilation))
    gw, gb = matching.matched_conv2d(xp, gy, weight.shape, pair(stride), pair(pad),
                                     pair(dilation), groups, has_bias, RIDGE, side=side)
    _, ew, eb = rr.conv2d("consequential", x, weight, bias, gy, stride, padding, dilation,
                          groups, RIDGE)
    rr.close(gw, ew, 1e-9, "weight")
    if has_bias:
        rr.close(gb, eb, 1e-9, "bias")


@pytest.mark.parametrize("backend", cx.ops.available_backends("im2col_gram", "cpu"))
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("name", [n for n in CASES if CASES[n][6] != "same"])
def test_gram_kernels_one_axis_at_a_time(name, dtype, rtol, backend):
    _, _, _, _, k, stride, padding, dilation, groups, bias = CASES[name]
    x, _, _ = _inputs(CASES[name], seed=len(name) + 2)
    x = x.to(dtype)
    with cx.ops.use_backend(backend):
        got = cx.ops.im2col_gram(x, k, stride, padding, dilation, groups=groups, bias=bias)
    expected = rr.unfold_gram(x, pair(k), pair(stride), pair(padding), pair(dilation), groups,
                              bias)
    got = got.reshape(expected.shape)
    err = ((got.double() - expected).norm() / expected.norm()).item()
    assert err < rtol, f"{backend}: relative error {err:.3e} >= {rtol:.1e}"
