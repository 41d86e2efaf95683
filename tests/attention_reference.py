"""Independent float64 reference of the matched gradients of nn.MultiheadAttention
(docs/design.md §2): the ordinary gradients from plain autograd of a float64 nn copy, the
inputs X of each projection rebuilt from scratch (the attention output by an explicit
softmax(q kᵀ/√d) v per head), and ``torch.linalg.solve``. Shares no code with the library."""
import torch
import torch.nn as nn

from matched_reference import solve_right


def _rows(x):
    """Rows of ``x`` over its last dim with a constant 1 appended (the bias input)."""
    rows = x.detach().double().reshape(-1, x.shape[-1])
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)


def match(grad_weight, grad_bias, x, ridge):
    """[G | g] (X Xᵀ/N + λI)⁻¹ with X the rows of ``x`` (N of them), split back; without a
    bias the constant row is left out."""
    rows = _rows(x)
    if grad_bias is None:
        rows = rows[:, :-1]
        g = grad_weight
    else:
        g = torch.cat([grad_weight, grad_bias[:, None]], 1)
    m = solve_right(g, rows.T @ rows / rows.shape[0], ridge)
    return (m, None) if grad_bias is None else (m[:, :-1], m[:, -1])


def _seq_first(x, batch_first):
    if x.dim() == 2:                      # unbatched (L, E): one sample
        return x[:, None]
    return x.transpose(0, 1) if batch_first else x


def attention_rows(mha, query, key, value, attn_mask=None, key_padding_mask=None):
    """The rows the out-projection multiplies: softmax(q kᵀ/√d + masks) v of each head,
    heads concatenated, one row per (query position, sample)."""
    w = {n: p.detach().double() for n, p in mha.named_parameters()}
    e, h = mha.embed_dim, mha.num_heads
    q, k, v = (_seq_first(t.detach().double(), mha.batch_first) for t in (query, key, value))
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = w["in_proj_weight"].chunk(3)
    else:
        w_q, w_k, w_v = w["q_proj_weight"], w["k_proj_weight"], w["v_proj_weight"]
    b_q, b_k, b_v = w["in_proj_bias"].chunk(3) if "in_proj_bias" in w else (0, 0, 0)
    q, k, v = q @ w_q.T + b_q, k @ w_k.T + b_k, v @ w_v.T + b_v         # (L|S, B, E)
    (lq, b, _), ls = q.shape, k.shape[0]
    split = lambda t: t.reshape(t.shape[0], b, h, e // h).permute(1, 2, 0, 3)  # noqa: E731
    scores = split(q) @ split(k).transpose(-1, -2) / (e // h) ** 0.5      # (B, H, L, S)
    if attn_mask is not None:                     # (L, S), or (B·H, L, S)
        mask = attn_mask.reshape(b, h, lq, ls) if attn_mask.dim() == 3 else attn_mask
        scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool \
            else scores + mask.double()
    if key_padding_mask is not None:
        pad = key_padding_mask.reshape(b, 1, 1, ls)
        scores = scores.masked_fill(pad, float("-inf"))
    out = torch.softmax(scores, -1) @ split(v)                            # (B, H, L, d)
    return out.permute(2, 0, 1, 3).reshape(lq * b, e)


def expected_grads(mha, query, key, value, grad_out, ridge, **kwargs):
    """{parameter name: matched gradient} of ``mha`` called on (query, key, value, **kwargs)
    with ``grad_out`` reaching its output: the ordinary gradients of a float64 nn copy,
    matched on each projection's input rows."""
    plain = nn.MultiheadAttention(
        mha.embed_dim, mha.num_heads, mha.dropout, mha.in_proj_bias is not None,
        mha.bias_k is not None, mha.add_zero_attn, mha.kdim, mha.vdim, mha.batch_first,
        dtype=torch.float64)
    plain.load_state_dict(mha.state_dict())
    plain.train(mha.training)
    args = [t.detach().double() for t in (query, key, value)]
    # nn's own identity tests pick the packing: keep query is key is value where it holds.
    if key is query:
        args[1] = args[0]
    if value is key:
        args[2] = args[1]
    out, _ = plain(*args, **kwargs)
    out.backward(grad_out.double())
    g = {n: p.grad for n, p in plain.named_parameters()}
    rows = attention_rows(plain, *args, attn_mask=kwargs.get("attn_mask"),
                          key_padding_mask=kwargs.get("key_padding_mask"))
    # The reference checks itself: the out-projection of its rows is nn's output.
    out_bias = plain.out_proj.bias
    rebuilt = rows @ plain.out_proj.weight.detach().T + (0 if out_bias is None else out_bias)
    expected_out = _seq_first(out.detach(), plain.batch_first).reshape(-1, plain.embed_dim)
    assert (rebuilt - expected_out).abs().max() < 1e-10
    result = {}
    result["out_proj.weight"], out_bias = match(g["out_proj.weight"], g.get("out_proj.bias"),
                                                rows, ridge)
    if out_bias is not None:
        result["out_proj.bias"] = out_bias
    bias = g.get("in_proj_bias")
    biases = bias.chunk(3) if bias is not None else (None,) * 3
    if plain._qkv_same_embed_dim:
        blocks = g["in_proj_weight"].chunk(3)
    else:
        blocks = [g["q_proj_weight"], g["k_proj_weight"], g["v_proj_weight"]]
    matched = [match(gw, gb, x, ridge) for gw, gb, x in zip(blocks, biases, args)]
    if plain._qkv_same_embed_dim:
        result["in_proj_weight"] = torch.cat([m[0] for m in matched])
    else:
        for name, m in zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), matched):
            result[name] = m[0]
    if bias is not None:
        result["in_proj_bias"] = torch.cat([m[1] for m in matched])
    return result
