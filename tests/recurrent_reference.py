"""Independent float64 reference of the matched gradients of nn.RNN / nn.LSTM / nn.GRU
(docs/design.md §2 applied to ``consequential_ext/recurrent.py``): the cells written out from
the equations of PyTorch's documentation, unrolled step by step in Python over each sequence
of each layer and direction (no ``torch._VF``, no nn recurrent module), the rows X of every
weight collected while unrolling, the ordinary gradients from plain autograd of that unrolled
graph, and ``torch.linalg.solve`` for ``[G | g_b] (A + λI)⁻¹``. Shares no code with the
library.

Sequences are a list of (L_b, in) tensors, one per batch entry in the user's order; the
initial state is (layers·dirs, B, H) in the same order (what nn's ``permute_hidden`` maps)."""
import torch
import torch.nn.functional as F

def cell(mode, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """One step of one sequence (vectors): (h', c')."""
    gi = w_ih @ x + (0 if b_ih is None else b_ih)
    gh = w_hh @ h + (0 if b_hh is None else b_hh)
    if mode == "RNN_TANH":
        return torch.tanh(gi + gh), None
    if mode == "RNN_RELU":
        return torch.relu(gi + gh), None
    if mode == "LSTM":
        # i, f, g, o (the documented order of weight_ih's row blocks)
        i, f, g, o = (gi + gh).chunk(4)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c_new), c_new
    # GRU: r, z, n; n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
    i_r, i_z, i_n = gi.chunk(3)
    h_r, h_z, h_n = gh.chunk(3)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (1 - z) * n + z * h, None


def suffix(layer, direction):
    return f"_l{layer}" + ("_reverse" if direction else "")


def unroll(mode, weights, seqs, h0, c0, num_layers, dirs, hidden, masks=None):
    """The stack over ``seqs``. weights: name → tensor (float64; a missing bias: absent);
    h0 / c0: (num_layers·dirs, B, hidden) or None (zeros); masks: per layer below the last,
    a list over the sequences of (L_b, dirs·hidden) dropout multipliers, or None.
    Returns (outputs: list of (L_b, dirs·hidden), h_n, c_n or None, rows: weight name →
    (N, in) detached rows it multiplied)."""
    lstm = mode == "LSTM"
    layer_in, rows, h_n, c_n = list(seqs), {}, [], []
    for layer in range(num_layers):
        per_direction = []
        for d in range(dirs):
            s = suffix(layer, d)
            w_ih, w_hh = weights["weight_ih" + s], weights["weight_hh" + s]
            b_ih, b_hh = weights.get("bias_ih" + s), weights.get("bias_hh" + s)
            k = layer * dirs + d
            ih_rows, hh_rows, outs, last_h, last_c = [], [], [], [], []
            for b, xs in enumerate(layer_in):
                zero = torch.zeros(hidden, dtype=torch.float64)
                h = zero if h0 is None else h0[k, b]
                c = (zero if c0 is None else c0[k, b]) if lstm else None
                steps = [None] * xs.shape[0]
                for t in (range(xs.shape[0]) if d == 0 else reversed(range(xs.shape[0]))):
                    ih_rows.append(xs[t].detach())
                    hh_rows.append(h.detach())
                    h, c = cell(mode, xs[t], h, c, w_ih, w_hh, b_ih, b_hh)
                    steps[t] = h
                outs.append(torch.stack(steps))
                last_h.append(h)
                last_c.append(c)
            rows["weight_ih" + s] = torch.stack(ih_rows)
            rows["weight_hh" + s] = torch.stack(hh_rows)
            per_direction.append(outs)
            h_n.append(torch.stack(last_h))
            if lstm:
                c_n.append(torch.stack(last_c))
        layer_out = [torch.cat([per_direction[d][b] for d in range(dirs)], -1)
                     for b in range(len(seqs))]
        if masks is not None and layer < num_layers - 1:
            layer_in = [o * m for o, m in zip(layer_out, masks[layer])]
        else:
            layer_in = layer_out
    return layer_in, torch.stack(h_n), (torch.stack(c_n) if lstm else None), rows


def solve_right(grad, a, ridge):
    """grad @ inverse(a + ridge·I), float64."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype)
    return torch.linalg.solve(a + ridge * eye, grad.T).T


def match(grad_weight, grad_bias, rows, ridge, weight_trains=True, bias_trains=True):
    """[G | g_b] (XᵀX/N + λI)⁻¹ on ``rows`` (N, in) with a ones column where the bias trains;
    a frozen weight: g_b / (1 + λ); a frozen bias (or none): the weight alone."""
    if not weight_trains:
        return None, (None if grad_bias is None or not bias_trains
                      else grad_bias / (1 + ridge))
    x = rows.double()
    g = grad_weight
    with_bias = grad_bias is not None and bias_trains
    if with_bias:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
        g = torch.cat([g, grad_bias[:, None]], 1)
    m = solve_right(g, x.T @ x / x.shape[0], ridge)
    return (m[:, :-1], m[:, -1]) if with_bias else (m, None)


def dropout_masks(num_layers, p, shape, dtype):
    """The multipliers nn's fused op draws between layers (``at::dropout`` of each non-last
    layer's time-major output, in order), drawn again from the current RNG state."""
    return [F.dropout(torch.ones(shape, dtype=dtype), p, True).double()
            for _ in range(num_layers - 1)]
