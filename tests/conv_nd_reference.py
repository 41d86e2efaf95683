"""Independent float64 references for Conv1d / Conv3d and the transposed convolutions, built
from the formulas of docs/design.md §2: explicit ``F.pad`` and ``Tensor.unfold`` for the
patches X, ``torch.linalg.solve`` for (A + λI)⁻¹, G from plain autograd of the F functions,
explicit Jacobians for paper 2's matched signals. Shares no code with the library."""
import math

import torch
import torch.nn.functional as F

from backmatch_reference import per_unit_least_squares
from matched_reference import ordinary_grads, solve_right

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _tuple(value, dims):
    return (value,) * dims if isinstance(value, int) else tuple(value)


def pad_like_nn(x, padding, kernel_size, dilation, padding_mode="zeros"):
    """x padded as nn.ConvNd would (every padding explicit, 'same' uneven as PyTorch)."""
    dims = len(kernel_size)
    if padding == "valid":
        before = after = (0,) * dims
    elif padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
        before, after = [t // 2 for t in total], [t - t // 2 for t in total]
    else:
        before = after = _tuple(padding, dims)
    pads = [p for b, a in zip(reversed(before), reversed(after)) for p in (b, a)]
    mode = "constant" if padding_mode == "zeros" else padding_mode
    return F.pad(x, pads, mode=mode) if any(pads) else x


def patches(xp, kernel_size, stride, dilation):
    """(B, C, *out, *kernel): every patch of the padded input, by Tensor.unfold per dim."""
    dims = len(kernel_size)
    for i, (k, s, d) in enumerate(zip(kernel_size, stride, dilation)):
        xp = xp.unfold(2 + i, d * (k - 1) + 1, s)
    taps = (slice(None),) * (2 + dims) + tuple(slice(None, None, d) for d in dilation)
    return xp[taps]


def matched_conv(x, weight, bias, grad_out, stride, padding, dilation, groups, ridge,
                 padding_mode="zeros"):
    """G (X Xᵀ/B + λI)⁻¹ per group, X every patch of every sample (plus a ones row)."""
    dims = weight.dim() - 2
    x = x.detach().double()
    if x.dim() == dims + 1:
        x, grad_out = x[None], grad_out[None]
    stride, dilation = _tuple(stride, dims), _tuple(dilation, dims)
    kernel = tuple(weight.shape[2:])
    xp = pad_like_nn(x, padding, kernel, dilation, padding_mode)
    conv = lambda inp, w, b: CONV[dims](inp, w, b, stride, 0, dilation, groups)  # noqa: E731
    gw, gb = ordinary_grads(conv, xp, weight, bias, grad_out)
    cols = patches(xp, kernel, stride, dilation)                      # (B, C, *out, *kernel)
    out, cg = weight.shape[:2]
    og, rows = out // groups, cg * math.prod(kernel)
    w_out, b_out = torch.empty_like(gw), None if bias is None else torch.empty_like(gb)
    for g in range(groups):
        xg = cols[:, g * cg:(g + 1) * cg]
        xg = xg.permute([1] + list(range(2 + dims, 2 + 2 * dims)) + [0]
                        + list(range(2, 2 + dims))).reshape(rows, -1)  # (C_g·k…, B·out…)
        gg = gw[g * og:(g + 1) * og].reshape(og, -1)
        if bias is not None:
            xg = torch.cat([xg, torch.ones(1, xg.shape[1], dtype=xg.dtype)], 0)
            gg = torch.cat([gg, gb[g * og:(g + 1) * og, None]], 1)
        m = solve_right(gg, xg @ xg.T / x.shape[0], ridge)
        if bias is not None:
            b_out[g * og:(g + 1) * og] = m[:, -1]
            m = m[:, :-1]
        w_out[g * og:(g + 1) * og] = m.reshape((og, cg) + kernel)
    return w_out, b_out


def matched_conv_transpose(x, weight, bias, grad_out, stride, padding, output_padding, groups,
                           dilation, ridge):
    """The pre-overlap blocks Z_p = Wᵀ x_p: per group, weight.grad = (A + λI)⁻¹ G_W with
    A = X Xᵀ / B, X the input's channel vectors (C_in/g × B·pixels) and G_W the ordinary
    gradient as (C_in/g, C_out/g·k); the bias g_b / (output locations + λ)."""
    dims = weight.dim() - 2
    x = x.detach().double()
    if x.dim() == dims + 1:
        x, grad_out = x[None], grad_out[None]
    conv = lambda inp, w, b: CONV_TRANSPOSE[dims](  # noqa: E731
        inp, w, b, stride, padding, output_padding, groups, dilation)
    gw, gb = ordinary_grads(conv, x, weight, bias, grad_out)
    cin = weight.shape[0]
    cg = cin // groups
    w_out = torch.empty_like(gw)
    for g in range(groups):
        xg = x[:, g * cg:(g + 1) * cg].transpose(0, 1).reshape(cg, -1)
        a = xg @ xg.T / x.shape[0]
        eye = torch.eye(cg, dtype=a.dtype)
        grad = gw[g * cg:(g + 1) * cg].reshape(cg, -1)
        w_out[g * cg:(g + 1) * cg] = torch.linalg.solve(a + ridge * eye, grad).reshape(
            (cg,) + tuple(weight.shape[1:]))
    b_out = None if bias is None else gb / (math.prod(grad_out.shape[2:]) + ridge)
    return w_out, b_out


def matched_input_by_jacobian(fn, x_shape, grad_out):
    """Paper 2 eq. 11 per input unit against the explicit Jacobian of one sample's ``fn``."""
    sample = tuple(x_shape[1:])
    flat = lambda v: fn(v.reshape((1,) + sample)).reshape(-1)  # noqa: E731
    jac = torch.autograd.functional.jacobian(flat, torch.zeros(sample).double().reshape(-1))
    gy = grad_out.detach().double().reshape(grad_out.shape[0], -1)
    return per_unit_least_squares(jac, gy).reshape(x_shape)


def layerwise_conv(plain_weight_grad, plain_bias_grad, plain_input_grad, weight, groups,
                   output_locations, input_locations):
    """Algorithm 1 on a conv fed a dense signal: δW / s, δb / s with s the output locations
    per sample and channel; the signal below over ‖W_col‖²_{2,µ} / c, c = input locations / s
    (eqs. 33, 35)."""
    s = output_locations
    col = weight.detach().double().square().sum() / (weight.shape[1] * groups)
    return (plain_weight_grad / s, None if plain_bias_grad is None else plain_bias_grad / s,
            plain_input_grad / (col * s / input_locations))


def valid_taps(size_in, size_out, kernel, stride, padding, dilation):
    """Per dim, the number of (input position, kernel tap) pairs whose output lies inside:
    how often a transposed conv's weight entry is used per sample on a dense signal."""
    return sum(0 <= h * stride - padding + i * dilation < size_out
               for h in range(size_in) for i in range(kernel))


def close(actual, expected, rtol=1e-9):
    """Norm-wise relative error of ``actual`` against the float64 ``expected`` below ``rtol``."""
    err = (actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)
    assert err < rtol, f"relative error {err:.3e} >= {rtol:.1e}"


def run_pair(layer, plain, x):
    """A C-layer and its nn twin on x with the same random output signal:
    (x grad of each, the signal, the outputs)."""
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [layer(xs[0]), plain(xs[1])]
    gy = torch.randn_like(outs[0])
    for out in outs:
        out.backward(gy)
    return xs[0].grad, xs[1].grad, gy, outs
