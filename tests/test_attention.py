"""nn.MultiheadAttention and the Transformer layers as C-layers: packed, encoder-decoder and
separate (kdim/vdim) in-projections and the out-projection, against the float64 reference of
``attention_reference.py`` (docs/design.md §2)."""
import copy
import re
import warnings

import pytest
import torch
import torch.nn as nn

import consequential_ext as cx
from relative_error import rel_err
from attention_reference import expected_grads, match
from matched_reference import matched_linear

RIDGE = 1e-3
BOUND = 1e-8          # relative (norm-wise) error against the float64 reference


def _convert_silently(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # nothing may be left plain
        return cx.consequentialize(model, ridge=RIDGE, **kwargs)


def _record(model):
    """Per attention / linear layer outside attention: its inputs and the gradient reaching
    its (first) output."""
    seen = {}

    def pre(module, args, kwargs):
        seen.setdefault(module, {}).update(args=args, kwargs=kwargs)

    def post(module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        out.register_hook(lambda g: seen[module].__setitem__("gy", g.detach()))
    inside = {id(c) for m in model.modules() if isinstance(m, nn.MultiheadAttention)
              for c in m.modules() if c is not m}
    for m in model.modules():
        if isinstance(m, (nn.MultiheadAttention, nn.Linear)) and id(m) not in inside:
            m.register_forward_pre_hook(pre, with_kwargs=True)
            m.register_forward_hook(post, with_kwargs=True)
    return seen


def _check_against_reference(model, seen):
    checked = 0
    for module, io in seen.items():
        if isinstance(module, nn.MultiheadAttention):
            q, k, v = io["args"][:3]
            expected = expected_grads(module, q, k, v, io["gy"], RIDGE, **io["kwargs"])
            for name, grad in expected.items():
                actual = module.get_parameter(name).grad
                assert rel_err(actual, grad) < BOUND, (name, rel_err(actual, grad))
                checked += 1
        else:
            gw, gb = matched_linear(io["args"][0], module.weight, module.bias, io["gy"], RIDGE)
            assert rel_err(module.weight.grad, gw) < BOUND
            assert rel_err(module.bias.grad, gb) < BOUND
            checked += 2
    return checked


# (name, constructor kwargs, which inputs are shared, call kwargs, query/key shapes)
E, H = 12, 3
CASES = {
    "self": (dict(), "qkv", dict(), (7, 3), (7, 3)),
    "self-batch-first-masks": (dict(batch_first=True), "qkv", "masks", (3, 7), (3, 7)),
    "encoder-decoder": (dict(batch_first=True), "kv", dict(need_weights=False), (3, 7), (3, 5)),
    "separate": (dict(), "", dict(average_attn_weights=False), (7, 3), (5, 3)),
    "kdim-vdim": (dict(kdim=5, vdim=7), "", dict(need_weights=False), (4, 2), (6, 2)),
    "no-bias-few-rows": (dict(bias=False, batch_first=True), "qkv", dict(), (1, 4), (1, 4)),
    "unbatched": (dict(), "qkv", dict(need_weights=False), (6,), (6,)),
}


def _inputs(mha, shared, q_shape, k_shape):
    query = torch.randn(*q_shape, E, dtype=torch.float64)
    key = query if "k" in shared else torch.randn(*k_shape, mha.kdim, dtype=torch.float64)
    value = key if shared.endswith("kv") else torch.randn(*k_shape, mha.vdim,
                                                          dtype=torch.float64)
    return query, key, value


def _masks(mha, q_shape, k_shape):
    """Boolean attention and key padding masks that leave every query something to see."""
    b, lq = q_shape if mha.batch_first else q_shape[::-1]
    ls = k_shape[-1] if mha.batch_first else k_shape[0]
    pad = torch.zeros(b, ls, dtype=torch.bool)
    pad[0, -2:] = True
    return dict(attn_mask=torch.rand(lq, ls) < 0.3, key_padding_mask=pad)


@pytest.mark.parametrize("case", sorted(CASES))
def test_multihead_attention_matches_the_reference(case):
    config, shared, call, q_shape, k_shape = CASES[case]
    torch.manual_seed(sorted(CASES).index(case))
    plain = nn.MultiheadAttention(E, H, dtype=torch.float64, **config)
    model = _convert_silently(nn.Sequential(copy.deepcopy(plain)))[0]
    assert type(model) is cx.CMultiheadAttention
    query, key, value = _inputs(plain, shared, q_shape, k_shape)
    call = _masks(plain, q_shape, k_shape) if call == "masks" else call
    out, weights = model(query, key, value, **call)
    ref_out, ref_weights = plain(query, key, value, **call)
    assert torch.equal(out, ref_out)                    # forward is nn's, bit for bit
    assert (weights is None and ref_weights is None) or torch.equal(weights, ref_weights)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    expected = expected_grads(plain, query, key, value, grad_out, RIDGE, **call)
    assert set(expected) == {n for n, p in model.named_parameters()}
    for name, grad in expected.items():
        err = rel_err(model.get_parameter(name).grad, grad)
        assert err < BOUND, (name, err)


@pytest.mark.parametrize("batch_first, norm_first", [(True, False), (False, True)])
def test_encoder_layer_in_proj_is_the_packed_matched_gradient(batch_first, norm_first):
    """The in_proj gradient is [G | g] (X Xᵀ/N + λI)⁻¹ with X the rows of the attention's
    input — the layer input itself when norm_first is False."""
    torch.manual_seed(5)
    plain = nn.TransformerEncoderLayer(E, H, dim_feedforward=10, dropout=0.0,
                                       batch_first=batch_first, norm_first=norm_first,
                                       dtype=torch.float64)
    model = _convert_silently(copy.deepcopy(plain))
    seen = _record(model)
    x = torch.randn(3, 7, E, dtype=torch.float64)
    y = model(x)
    assert torch.equal(y, plain(x))
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    plain(x).backward(grad_out)
    attn_in = seen[model.self_attn]["args"][0]
    if not norm_first:
        assert attn_in is x
    g = torch.cat([plain.self_attn.in_proj_weight.grad,
                   plain.self_attn.in_proj_bias.grad[:, None]], 1)
    expected_w, expected_b = match(g[:, :-1], g[:, -1], attn_in, RIDGE)
    assert rel_err(model.self_attn.in_proj_weight.grad, expected_w) < BOUND
    assert rel_err(model.self_attn.in_proj_bias.grad, expected_b) < BOUND
    assert _check_against_reference(model, seen) == 4 + 2 + 2     # attention, linear1, linear2


def test_decoder_layer_matches_the_reference():
    torch.manual_seed(6)
    plain = nn.TransformerDecoderLayer(E, H, dim_feedforward=9, dropout=0.0, batch_first=True,
                                       dtype=torch.float64)
    model = _convert_silently(copy.deepcopy(plain))
    assert type(model.multihead_attn) is cx.CMultiheadAttention
    seen = _record(model)
    tgt, memory = torch.randn(2, 5, E, dtype=torch.float64), torch.randn(2, 6, E,
                                                                         dtype=torch.float64)
    causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
    pad = torch.tensor([[False] * 6, [False] * 4 + [True] * 2])
    kwargs = dict(tgt_mask=causal, memory_key_padding_mask=pad)
    y = model(tgt, memory, **kwargs)
    assert torch.equal(y, plain(tgt, memory, **kwargs))
    y.square().sum().backward()
    assert _check_against_reference(model, seen) == 2 * 4 + 2 + 2


def test_rule_sgd_gives_nn_gradients_bit_for_bit():
    torch.manual_seed(7)
    plain = nn.MultiheadAttention(E, H, kdim=5, vdim=4)
    model = copy.deepcopy(plain)
    cx.consequentialize(model, rule="sgd")
    q, k, v = torch.randn(4, 2, E), torch.randn(3, 2, 5), torch.randn(3, 2, 4)
    model(q, k, v)[0].sum().backward()
    plain(q, k, v)[0].sum().backward()
    for (name, p), r in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, r.grad), name


def test_backmatch_changes_only_what_lies_below_out_proj():
    """out_proj's G comes from above, so "backmatch" matches it as "consequential" does; the
    in-projection sees paper 2's matched signal from out_proj instead of BP's."""
    torch.manual_seed(10)
    x = torch.randn(6, 2, E, dtype=torch.float64)
    grads = {}
    for rule in ("consequential", "backmatch"):
        torch.manual_seed(11)
        layer = cx.CMultiheadAttention(E, H, dtype=torch.float64, rule=rule, ridge=RIDGE)
        layer(x, x, x)[0].square().sum().backward()
        grads[rule] = {n: p.grad for n, p in layer.named_parameters()}
    for name in ("out_proj.weight", "out_proj.bias"):
        assert torch.equal(grads["backmatch"][name], grads["consequential"][name])
    assert rel_err(grads["backmatch"]["in_proj_weight"],
                    grads["consequential"]["in_proj_weight"]) > 1e-3


def test_inference_takes_nn_fast_paths(monkeypatch):
    """Without grad, nn's fused kernels run, untouched (the routing is only for backward)."""
    calls = []
    for name in ("_native_multi_head_attention", "_transformer_encoder_layer_fwd"):
        fused = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _f=fused, _n=name, **k: (calls.append(_n),
                                                                             _f(*a, **k))[1])
    torch.manual_seed(8)
    # nn's fast paths need an even number of heads
    layer = nn.TransformerEncoderLayer(E, 2, dim_feedforward=10, batch_first=True).eval()
    plain = copy.deepcopy(layer)
    cx.consequentialize(layer)
    x = torch.randn(2, 5, E)
    with torch.no_grad():
        assert torch.equal(layer(x), plain(x))
        assert torch.equal(layer.self_attn(x, x, x)[0], plain.self_attn(x, x, x)[0])
    assert calls == ["_transformer_encoder_layer_fwd"] * 2 + ["_native_multi_head_attention"] * 2


def test_coverage_and_warnings_of_a_transformer():
    torch.manual_seed(9)
    model = nn.Transformer(E, H, num_encoder_layers=1, num_decoder_layers=1,
                           dim_feedforward=8, batch_first=True)
    _convert_silently(model)
    report = cx.coverage(model)
    assert report.plain == ()
    norms = sum(p.numel() for m in model.modules() if isinstance(m, nn.LayerNorm)
                for p in m.parameters())
    assert report.matched_params == report.total_params - norms
    # Leaving attention out by type warns about nothing, and names its out_proj as chosen.
    model = nn.TransformerEncoderLayer(E, H, dim_feedforward=8)
    _convert_silently(model, exclude=nn.MultiheadAttention)
    plain = {p.name: p for p in cx.coverage(model).plain}
    assert set(plain) == {"self_attn", "self_attn.out_proj"}
    assert all(p.chosen_by_user for p in plain.values())
    assert "excluded by the user" in plain["self_attn.out_proj"].reason
    _convert_silently(model, rule="sgd")
    assert all(p.chosen_by_user for p in cx.coverage(model).plain)


L, S, B, HEADS, EMBED = 4, 5, 3, 2, 8
BAD_ARGUMENTS = {
    "2D mask (1, S)": dict(attn_mask=torch.zeros(1, S)),
    "2D mask (L, 1)": dict(attn_mask=torch.zeros(L, 1)),
    "3D mask (1, L, S)": dict(attn_mask=torch.zeros(1, L, S)),
    "3D mask (B·H, 1, S)": dict(attn_mask=torch.zeros(B * HEADS, 1, S)),
    "key padding (1, S)": dict(key_padding_mask=torch.zeros(1, S, dtype=torch.bool)),
    "key padding (B, 1)": dict(key_padding_mask=torch.zeros(B, 1, dtype=torch.bool)),
    "value of another length": dict(value=torch.randn(S + 1, B, EMBED)),
    # nn asserts; the converted layer raised a ValueError of its own
    "query of another width": dict(query=torch.randn(L, B, EMBED + 2),
                                   key=torch.randn(S, B, EMBED + 2),
                                   value=torch.randn(S, B, EMBED + 2)),
}


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("case", BAD_ARGUMENTS)
def test_bad_masks_and_shapes_raise_what_nn_raises(case, need_weights):
    """The masks are broadcast inside: without nn's checks a wrong shape would pass in
    training (the C path) and fail only in inference (nn's)."""
    torch.manual_seed(15)
    plain = nn.MultiheadAttention(EMBED, HEADS)
    layer = _convert_silently(nn.Sequential(copy.deepcopy(plain)))[0]
    args = dict(query=torch.randn(L, B, EMBED), key=torch.randn(S, B, EMBED),
                value=torch.randn(S, B, EMBED), need_weights=need_weights)
    args.update(BAD_ARGUMENTS[case])
    with pytest.raises(Exception) as nn_error:
        plain(**args)
    with pytest.raises(nn_error.type, match=re.escape(str(nn_error.value))):
        layer(**args)


def test_an_excluded_out_proj_gets_the_ordinary_gradient():
    """The layer drives out_proj through its own function: excluding it by name still leaves
    it plain (and says so), while the in-projection stays matched."""
    torch.manual_seed(12)
    plain = nn.MultiheadAttention(E, H, dtype=torch.float64)
    whole, part = copy.deepcopy(plain), copy.deepcopy(plain)
    cx.consequentialize(whole, ridge=RIDGE)
    cx.consequentialize(part, ridge=RIDGE, exclude=["out_proj"])
    x = torch.randn(5, 2, E, dtype=torch.float64)
    for model in (plain, whole, part):
        model(x, x, x)[0].square().sum().backward()
    assert torch.equal(part.out_proj.weight.grad, plain.out_proj.weight.grad)
    assert torch.equal(part.out_proj.bias.grad, plain.out_proj.bias.grad)
    assert rel_err(part.in_proj_weight.grad, whole.in_proj_weight.grad) < 1e-12
    assert rel_err(part.in_proj_weight.grad, plain.in_proj_weight.grad) > 1e-3
    report = cx.coverage(part)
    assert [(p.name, p.reason) for p in report.plain] == [("out_proj", "excluded by the user")]


def test_an_excluded_out_proj_stays_plain_through_a_later_include():
    torch.manual_seed(13)
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(E, H), "fc": nn.Linear(E, E)})
    cx.consequentialize(model, exclude=["attn.out_proj"])
    cx.consequentialize(model, include=["fc"])    # selects neither: left as they are
    assert model.attn._cx_out_proj_plain()
    assert [p.name for p in cx.coverage(model).plain] == ["attn.out_proj"]


def test_jit_trace_with_a_key_padding_mask_trains_as_eager():
    """torch.jit.trace of a CMultiheadAttention given a key_padding_mask: the mask's shape
    check ran on traced sizes (TypeError 'cond must be a bool'); nn skips it while tracing."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H, dtype=torch.float64)

        def forward(self, x, kpm):
            return self.attn(x, x, x, key_padding_mask=kpm)[0]
    torch.manual_seed(8)
    model = _convert_silently(Block())
    x = torch.randn(5, 2, E, dtype=torch.float64)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, -2:] = True
    model(x, mask).square().sum().backward()
    eager = [p.grad.clone() for p in model.parameters()]
    traced = torch.jit.trace(model, (x, mask), check_trace=False)
    model.zero_grad()
    traced(x, mask).square().sum().backward()
    for p, e in zip(model.parameters(), eager, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=0)
