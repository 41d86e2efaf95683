"""Independent float64 reference of docs/design.md §2, built directly from the formula:
explicit padding + ``unfold`` for X, ``torch.linalg.solve`` for (A + λI)⁻¹, and G from
plain autograd of F.linear / F.conv2d. Shares no code with the library."""
import torch
import torch.nn.functional as F


def solve_right(grad, a, ridge):
    """grad @ inverse(a + ridge·I), batched, float64."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    return torch.linalg.solve(a + ridge * eye, grad.transpose(-1, -2)).transpose(-1, -2)


def ordinary_grads(fn, x, weight, bias, grad_out):
    w = weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    y = fn(x.detach().double(), w, b)
    y.backward(grad_out.double())
    return w.grad, (None if b is None else b.grad)


def matched_linear(x, weight, bias, grad_out, ridge):
    gw, gb = ordinary_grads(F.linear, x, weight, bias, grad_out)
    rows = x.detach().double().reshape(-1, x.shape[-1])
    if bias is not None:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
        g = torch.cat([gw, gb[:, None]], 1)
    else:
        g = gw
    n = rows.shape[0]
    m = solve_right(g, rows.T @ rows / n, ridge)
    return (m[:, :-1], m[:, -1]) if bias is not None else (m, None)


def explicit_pad(x, padding, kernel_size, dilation, padding_mode="zeros"):
    """x padded as nn.Conv2d would, returning (padded x, remaining conv padding=0)."""
    kh, kw = kernel_size
    dh, dw = dilation
    if padding == "valid":
        pads = (0, 0, 0, 0)
    elif padding == "same":
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pads = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        ph, pw = (padding, padding) if isinstance(padding, int) else padding
        pads = (pw, pw, ph, ph)
    mode = "constant" if padding_mode == "zeros" else padding_mode
    return F.pad(x, pads, mode=mode) if any(pads) else x


def matched_conv2d(x, weight, bias, grad_out, stride, padding, dilation, groups, ridge,
                   padding_mode="zeros"):
    x = x.detach().double()
    if x.dim() == 3:
        x, grad_out = x[None], grad_out[None]
    out, cg, kh, kw = weight.shape
    xp = explicit_pad(x, padding, (kh, kw), dilation, padding_mode)
    conv = lambda inp, w, b: F.conv2d(inp, w, b, stride, 0, dilation, groups)  # noqa: E731
    gw, gb = ordinary_grads(conv, xp, weight, bias, grad_out)
    cols = F.unfold(xp, (kh, kw), dilation=dilation, stride=stride)       # (B, C·kh·kw, L)
    bsz = x.shape[0]
    og = out // groups
    w_out, b_out = torch.empty_like(gw), None if bias is None else torch.empty_like(gb)
    for g in range(groups):
        xg = cols[:, g * cg * kh * kw:(g + 1) * cg * kh * kw]             # (B, Dg, L)
        xg = xg.permute(1, 0, 2).reshape(cg * kh * kw, -1)                # (Dg, B·L)
        gg = gw[g * og:(g + 1) * og].reshape(og, -1)
        if bias is not None:
            xg = torch.cat([xg, torch.ones(1, xg.shape[1], dtype=xg.dtype)], 0)
            gg = torch.cat([gg, gb[g * og:(g + 1) * og, None]], 1)
        m = solve_right(gg, xg @ xg.T / bsz, ridge)
        if bias is not None:
            b_out[g * og:(g + 1) * og] = m[:, -1]
            m = m[:, :-1]
        w_out[g * og:(g + 1) * og] = m.reshape(og, cg, kh, kw)
    return w_out, b_out
