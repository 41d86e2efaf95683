"""Functional C-layers: one autograd.Function per layer kind, the only place rules meet autograd.

Forward is exactly the corresponding ``torch.nn.functional`` call (``clinear_like``: the
module's own forward). Backward builds the layer kind's primitives
(``gradients.py``) and asks the layer's rule (``rules.py``) for the signal to the input and
the weight/bias gradients; no Function branches on a rule. A rule that ``bypass``es (``"sgd"``)
skips the Function, so its gradients are bit-identical to the nn layers'. Otherwise a
non-tensor or complex input / weight / bias is a TypeError naming it, in forward (matched
gradients are defined for real tensors).
"""
from __future__ import annotations

import math
import operator
import warnings

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair, _single, _triple

from .amortize import check_amortizer, graph_task
from .gradients import Conv2dGradients, EmbeddingGradients, LinearGradients
from .gradients import Conv1dGradients, Conv3dGradients, ConvTransposeGradients
from .rules import rule_named
from ._validate import (DEFAULT_RIDGE, DEFAULT_RULE, check_ridge, conv_gram_shape,
                        linear_gram_shape, transpose_gram_shape, trains)

__all__ = ["clinear", "cconv2d", "clinear_like", "CLinearFunction", "CConv2dFunction",
           "CLinearLikeFunction", "cembedding", "CEmbeddingFunction",
           "cmulti_head_attention_forward"]
__all__ += ["cconv1d", "cconv3d", "cconv_transpose1d", "cconv_transpose2d", "CConv1dFunction",
            "CConv3dFunction", "CConvTranspose1dFunction", "CConvTranspose2dFunction"]
__all__ += ["cconv_transpose3d", "CConvTranspose3dFunction"]


def _bypassed(rule, *tensors):
    """Whether the entry point runs the plain ``F`` call instead of its Function: a rule that
    ``bypass``es, or ``torch.export`` tracing (an exported program keeps the forward but not
    an autograd.Function's backward — non-strict export inlines the forward, strict export
    detaches it — so its parameters get the ordinary gradient; said once, by non-strict
    export: strict export's Dynamo drops warnings from traced code). Under
    ``torch.fx`` symbolic tracing of the functional form: a TypeError saying what to trace
    instead (the module forms are kept as leaves)."""
    if any(isinstance(t, torch.fx.Proxy) for t in tensors):
        raise TypeError("consequential_ext.functional cannot be traced by torch.fx: its "
                        "matched backward is an autograd.Function, not traced ops; use the "
                        "C-layer modules (cx.CLinear, cx.CConv2d, ...), which "
                        "torch.fx.symbolic_trace keeps as call_module leaves")
    if rule_named(rule).bypass:
        return True
    if torch.compiler.is_exporting():
        if not torch.compiler.is_dynamo_compiling():
            _warn_export()
        return True
    return False


_export_warned = False


def _warn_export():
    global _export_warned
    if not _export_warned:
        _export_warned = True
        warnings.warn("consequential_ext: torch.export traced a C-layer as its plain nn "
                      "forward: the exported program computes the same outputs, but its "
                      "backward gives the ordinary gradient, not the matched one (an "
                      "autograd.Function's backward cannot be exported). Train the eager or "
                      "torch.compile'd model.", UserWarning, stacklevel=3)


def _apply_rule(ctx, layer):
    """(grad_input, grad_weight, grad_bias) of ``layer`` under the rule saved in ``ctx``."""
    grad_input = ctx.rule.input_signal(layer) if ctx.needs_input_grad[0] else None
    grad_weight, grad_bias = ctx.rule.weight_grads(layer)
    return grad_input, grad_weight, grad_bias


def _save_common(ctx, input, weight, bias, rule, ridge, amortizer, *,
                 weight_by_reference=False):
    # Every C-layer Function saves (input, weight) and says so by cx_saved_weight_index = 1
    # (read by layerwise.producer_weight and graph_check) — or, with weight_by_reference, holds
    # the weight as ctx.cx_weight, outside autograd's in-place checks (a backward that reads
    # only its shape and dtype must not fail on a weight changed in place since).
    if weight_by_reference:
        ctx.save_for_backward(input)
        ctx.cx_weight = weight
    else:
        ctx.save_for_backward(input, weight)
    ctx.has_bias, ctx.rule, ctx.ridge, ctx.amortizer = (bias is not None, rule_named(rule), ridge,
                                                        amortizer)
    # A forward inside a backward is a reentrant checkpoint's recomputation: its backward runs
    # in a nested graph task, but steps in the backward that recomputed it (amortize.py's
    # check for a layer called twice in one backward).
    ctx.recomputed_in = None if amortizer is None else graph_task()


def _wanted(ctx, index):
    """Whether this backward's gradient for input ``index`` is used: it requires grad, and
    the engine runs the edge it flows into — not so under ``torch.autograd.grad(loss, x)`` or
    ``backward(inputs=...)`` without it (adversarial steps, gradient penalties), where a
    matched weight gradient would cost its Gram and solve for nothing and advance an
    amortiser's schedule. A compiled graph's backward is traced ahead: there, as required."""
    if not ctx.needs_input_grad[index]:
        return False
    if torch.compiler.is_compiling() or _will_execute is None:
        return True
    node = ctx.next_functions[index][0]
    try:
        return node is None or _will_execute(node)
    except RuntimeError:   # a leaf autograd.grad captures (asked for): the engine cannot say
        return True


# The engine's answer, as torch.utils.checkpoint asks it; a private API, so a torch without
# it computes every gradient that requires grad, as before.
_will_execute = getattr(torch._C, "_will_engine_execute_node", None)


def _needs(ctx, joint=True):
    # X holds the rows of the parameters that train (require grad), whichever of them this
    # backward is asked for: a frozen bias is a constant, not a ones row solved jointly, and
    # a frozen weight leaves the bias matched alone (docs/design.md §2). ``joint=False``: a
    # kind that matches its bias apart anyway (ConvTranspose), for which a frozen weight
    # changes nothing.
    trains_bias = ctx.has_bias and ctx.needs_input_grad[2]
    if ctx.amortizer is not None:   # which backward this step belongs to (_save_common)
        ctx.amortizer.recomputed_in = ctx.recomputed_in
    needs = dict(has_bias=trains_bias, needs_weight=_wanted(ctx, 1),
                 needs_bias=trains_bias and _wanted(ctx, 2), ridge=ctx.ridge,
                 amortizer=ctx.amortizer)
    return dict(needs, trains_weight=ctx.needs_input_grad[1]) if joint else needs


class CLinearFunction(torch.autograd.Function):
    """``F.linear`` forward; backward by the rule (``clinear`` is the entry point)."""
    cx_saved_weight_index = 1

    @staticmethod
    def forward(ctx, input, weight, bias, rule, ridge, amortizer=None):
        _save_common(ctx, input, weight, bias, rule, ridge, amortizer)
        return F.linear(input, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        layer = LinearGradients(input, weight, grad_output, **_needs(ctx))
        return *_apply_rule(ctx, layer), None, None, None


class CLinearLikeFunction(torch.autograd.Function):
    """A registered linear-like layer: forward is the module's own ``module_forward``,
    backward CLinear's on ``weight_view``, the weight as (out, in) (``clinear_like``)."""
    cx_saved_weight_index = 1

    @staticmethod
    def forward(ctx, input, weight_view, bias, module_forward, rule, ridge, amortizer=None):
        _save_common(ctx, input, weight_view, bias, rule, ridge, amortizer)
        return module_forward(input)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight_view = ctx.saved_tensors
        layer = LinearGradients(input, weight_view, grad_output, **_needs(ctx))
        return *_apply_rule(ctx, layer), None, None, None, None


class CConv2dFunction(torch.autograd.Function):
    """``F.conv2d`` forward; backward by the rule (``cconv2d`` is the entry point)."""
    cx_saved_weight_index = 1

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups, rule, ridge,
                amortizer=None, map_size=None):
        _save_common(ctx, input, weight, bias, rule, ridge, amortizer)
        ctx.map_size = map_size
        ctx.conf = _conv_conf(stride, padding, dilation, groups, _pair)
        return F.conv2d(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        layer = Conv2dGradients(input, weight, grad_output, *ctx.conf, map_size=ctx.map_size,
                                **_needs(ctx))
        return *_apply_rule(ctx, layer), None, None, None, None, None, None, None, None


def clinear(input, weight, bias=None, *, rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, amortizer=None):
    """``F.linear`` whose backward gives weight/bias the matched gradient of ``rule``
    (with ``amortizer``, an ``amortize.GramAmortizer``: from its running Gram).

    Raises ValueError for an unknown ``rule``, a ridge that is not a finite float > 0 or a
    bias that trains not of shape (out,) (F.linear would broadcast it; a frozen bias is a
    constant), TypeError/ValueError for an amortizer of the wrong type or Gram shape.
    """
    bypass = _bypassed(rule, input, weight)
    ridge = check_ridge(ridge)
    if bypass:
        return F.linear(input, weight, bias)
    _check_tensors(input, weight, bias)
    if weight.dim() == 1:   # F.linear's dot product: one output unit, its dim dropped
        if bias is not None:
            raise ValueError("a 1-D weight takes no bias (F.linear refuses one too)")
        return clinear(input, weight[None], None, rule=rule, ridge=ridge,
                       amortizer=amortizer).squeeze(-1)
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out, in) or (in,); got shape {tuple(weight.shape)}")
    _check_bias(bias, weight.shape[0])
    amortizer = check_amortizer(amortizer, linear_gram_shape(weight, bias), weight)
    return CLinearFunction.apply(input, weight, bias, rule, ridge, amortizer)


def cconv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
            rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, amortizer=None):
    """``F.conv2d`` (zero padding: int, pair, 'same' or 'valid') whose backward gives
    weight/bias the matched gradient of ``rule`` (``amortizer``: as in ``clinear``).

    Raises ValueError for an unknown ``rule``, a bad ``ridge`` or a padding string other
    than 'same' / 'valid'; TypeError/ValueError for a mismatched amortizer.
    """
    _check_padding(padding)
    return _cconv(CConv2dFunction, F.conv2d, 2, conv_gram_shape, input, weight, bias,
                  (stride, padding, dilation, groups), rule, ridge, amortizer)


def clinear_like(input, weight, bias, module_forward, *, transposed=False, rule=DEFAULT_RULE,
                 ridge=DEFAULT_RIDGE, amortizer=None):
    """``module_forward(input)`` — a linear-like layer's own forward, ``x W_viewᵀ + b`` over
    the last dim — whose backward is CLinear's on ``W_view``: ``weight`` (out, in), or its
    transpose when ``transposed`` (a weight stored (in, out), as Hugging Face's Conv1D).

    Raises ValueError for an unknown ``rule``, a bad ``ridge``, a weight that is not 2-D or
    an input whose last dim is not ``W_view``'s in-features (a wrong ``transposed``);
    TypeError/ValueError for a mismatched amortizer.
    """
    # Not under Dynamo: callable() of a bound method breaks torch.compile(fullgraph=True).
    if not torch.compiler.is_compiling() and not callable(module_forward):
        raise TypeError(f"module_forward must be callable (the layer's own forward); got "
                        f"{type(module_forward).__name__}")
    bypass = _bypassed(rule, input, weight)
    ridge = check_ridge(ridge)
    if bypass:
        return module_forward(input)
    if torch.jit.is_tracing():
        # The tracer cannot record a Function taking a Python callable (it failed with
        # "unordered_map::at"); without grad nothing is matched, so the forward is the trace.
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "torch.jit.trace cannot trace a registered linear-like C-layer while it "
                "trains: its own forward is an argument of its matched backward's Function, "
                "which the tracer cannot record. Trace under torch.no_grad() for inference, "
                "or train the eager or torch.compile'd model")
        return module_forward(input)
    _check_tensors(input, weight, bias)
    if weight.dim() != 2:   # checked here: CLinear's backward would fail on it
        raise ValueError(f"a linear-like layer's weight must be 2-D, (out, in) or (in, out); got "
                         f"shape {tuple(weight.shape)}: this layer is not linear-like")
    view = weight.t() if transposed else weight
    if input.dim() == 0 or input.shape[-1] != view.shape[1]:
        # The forward (x @ weight) may well run: only backward would find the mismatch.
        raise ValueError(f"input's last dim {tuple(input.shape)[-1:]} is not the in-features of "
                         f"the weight as (out, in) {tuple(view.shape)}, with transposed="
                         f"{transposed}: a weight stored (in, out) needs transposed=True "
                         f"(register_layer)")
    _check_bias(bias, view.shape[0])
    amortizer = check_amortizer(amortizer, linear_gram_shape(view, bias), view)
    # The gradient reaches ``weight`` through the view (autograd transposes it back).
    return CLinearLikeFunction.apply(input, view, bias, module_forward, rule, ridge, amortizer)


class CEmbeddingFunction(torch.autograd.Function):
    """``F.embedding`` forward; backward by the rule on ``EmbeddingGradients`` (``cembedding``
    is the entry point)."""
    cx_saved_weight_index = 1

    @staticmethod
    def forward(ctx, input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                sparse, rule, ridge):
        out = F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                          sparse)
        # The backward reads the weight's shape and dtype only, as nn's: max_norm renormalising
        # rows in place at a second lookup (a table shared by source and target), or an edit
        # under no_grad, must not fail it.
        _save_common(ctx, input, weight, None, rule, ridge, None, weight_by_reference=True)
        ctx.conf = dict(padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq,
                        sparse=sparse)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        input, = ctx.saved_tensors
        layer = EmbeddingGradients(input, ctx.cx_weight, grad_output,
                                   needs_weight=_wanted(ctx, 1),
                                   ridge=ctx.ridge, **ctx.conf)
        _, grad_weight, _ = _apply_rule(ctx, layer)
        return None, grad_weight, None, None, None, None, None, None, None


def cembedding(input, weight, padding_idx=None, max_norm=None, norm_type=2.0,
               scale_grad_by_freq=False, sparse=False, *, rule=DEFAULT_RULE,
               ridge=DEFAULT_RIDGE):
    """``F.embedding`` whose backward gives ``weight`` the gradient of ``rule``; for the
    matched rules, row v of the ordinary gradient divided by (count_v / N + ridge), N the number
    of indices (docs/design.md §2). ``padding_idx``'s row gets no gradient, as in nn;
    ``max_norm`` renormalises the looked-up rows in place first, as nn does; ``sparse=True``
    gives a sparse gradient.

    Raises ValueError for an unknown ``rule``, a bad ``ridge`` or a ``padding_idx`` outside the
    table; TypeError for a ``weight`` that is no tensor or (unless the rule bypasses) complex.
    """
    bypass = _bypassed(rule, input, weight)
    ridge = check_ridge(ridge)
    if not isinstance(weight, torch.Tensor):    # before padding_idx reads its shape
        raise TypeError(f"weight must be a Tensor; got {type(weight).__name__}")
    if padding_idx is not None:
        try:
            padding_idx = operator.index(padding_idx)     # NumPy's and 0-d tensors' ints too
        except TypeError:
            raise TypeError(f"padding_idx must be an int or None; got {padding_idx!r}") from None
        if not -weight.shape[0] <= padding_idx < weight.shape[0]:
            raise ValueError(f"padding_idx must be within num_embeddings ({weight.shape[0]}); "
                             f"got {padding_idx}")
        if padding_idx < 0:     # no arithmetic with the size otherwise: traced, it is a value
            padding_idx += weight.shape[0]   # the tracer cannot hand Function.apply
    if bypass:
        return F.embedding(input, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                           sparse)
    _check_tensors(input, weight, None)   # complex: backward would drop the imaginary part
    return CEmbeddingFunction.apply(input, weight, padding_idx, max_norm, norm_type,
                                    scale_grad_by_freq, sparse, rule, ridge)


def _heads_first(packed, parts, width):
    """(…, parts·width) → ``parts`` tensors of (…, width), laid out as nn's packed projection."""
    return packed.unflatten(-1, (parts, width)).unsqueeze(0).transpose(0, -2).squeeze(-2) \
        .contiguous()


def _in_projection(query, key, value, in_proj_weight, in_proj_bias, separate, project):
    """q, k, v as ``F._in_projection_packed`` / ``F._in_projection`` compute them, each
    projection a C-layer call on its own input (one call on the packed weight for
    self-attention, one on the key/value rows for encoder-decoder attention)."""
    e = query.size(-1)
    if separate is None:
        w, b = in_proj_weight, in_proj_bias
        if key is value and query is key:                       # self-attention
            q, k, v = _heads_first(project(query, w, b), 3, e)
            return q, k, v
        if key is value:                                        # encoder-decoder
            w_q, w_kv = w.split([e, e * 2])
            b_q, b_kv = (None, None) if b is None else b.split([e, e * 2])
            k, v = _heads_first(project(key, w_kv, b_kv), 2, e)
            return project(query, w_q, b_q), k, v
        w_q, w_k, w_v = w.chunk(3)
    else:
        w_q, w_k, w_v = separate
    b_q, b_k, b_v = (None,) * 3 if in_proj_bias is None else in_proj_bias.chunk(3)
    return project(query, w_q, b_q), project(key, w_k, b_k), project(value, w_v, b_v)


def _check_attention_shapes(key, value, attn_mask, bias_k, bias_v, static_k, static_v,
                            separate, tgt_len, heads_batch, head_dim):
    """F.multi_head_attention_forward's argument checks, same errors and messages: the
    masks are broadcast below, so a wrong shape would otherwise pass unnoticed."""
    if separate and key.shape[:2] != value.shape[:2]:
        raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match "
                             f"value's {value.shape[:2]}")
    if not separate and key.shape != value.shape:
        raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
    if attn_mask is not None:
        want = {2: (tgt_len, key.shape[0]), 3: (heads_batch, tgt_len, key.shape[0])}
        if attn_mask.dim() not in want:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if attn_mask.shape != want[attn_mask.dim()]:
            raise RuntimeError(f"The shape of the {attn_mask.dim()}D attn_mask is "
                               f"{attn_mask.shape}, but should be {want[attn_mask.dim()]}.")
    if (bias_k is None) != (bias_v is None):
        raise AssertionError("bias_k is set but bias_v is None" if bias_v is None
                             else "bias_v is set but bias_k is None")
    for name, what, static, bias in (("static_k", "key", static_k, bias_k),
                                     ("static_v", "value", static_v, bias_v)):
        if static is None:
            continue
        if bias is not None:
            raise AssertionError(f"bias cannot be added to static {what}.")
        for dim, size in ((0, heads_batch), (2, head_dim)):
            if static.size(dim) != size:
                raise AssertionError(f"expecting {name}.size({dim}) of {size}, but got "
                                     f"{static.size(dim)}")


def cmulti_head_attention_forward(
        query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k,
        bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True,
        key_padding_mask=None, need_weights=True, attn_mask=None,
        use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None,
        v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
        is_causal=False, *, rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, out_proj_rule=None):
    """``F.multi_head_attention_forward`` (same arguments, same result bit for bit) whose
    projections are C-layer calls (``clinear``): the in-projection weight and bias are matched
    per projection on that projection's input rows — one packed ``[W|b]`` on the query rows
    for self-attention, ``q`` on the query and ``k``/``v`` on the key rows for
    encoder-decoder attention, each of q/k/v on its own input otherwise — and ``out_proj`` on
    the rows of the attention output. N = the rows of that input (tokens × batch).
    ``out_proj_rule``: the rule of the output projection alone (None: ``rule``; ``"sgd"`` for
    an ``out_proj`` the user left plain).

    Raises ValueError for an unknown ``rule`` or a bad ``ridge``; otherwise what
    ``F.multi_head_attention_forward`` raises.
    """
    _bypassed(rule, query, key, value)      # torch.fx: the clear error before any shape check
    ridge = check_ridge(ridge)
    out_rule = rule if out_proj_rule is None else out_proj_rule     # clinear checks it

    def project(x, w, b, rule=rule):
        return clinear(x, w, b, rule=rule, ridge=ridge)

    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None                    # the causal mask is applied by SDPA itself
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                      other_name="", target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    if embed_dim != embed_dim_to_check:     # nn's AssertionErrors and messages
        raise AssertionError(f"was expecting embedding dimension of {embed_dim_to_check}, but "
                             f"got {embed_dim}")
    if embed_dim % num_heads:
        raise AssertionError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
    head_dim = embed_dim // num_heads
    _check_attention_shapes(key, value, attn_mask, bias_k, bias_v, static_k, static_v,
                            use_separate_proj_weight, tgt_len, bsz * num_heads, head_dim)
    separate = (q_proj_weight, k_proj_weight, v_proj_weight) if use_separate_proj_weight \
        else None
    q, k, v = _in_projection(query, key, value, in_proj_weight, in_proj_bias, separate, project)

    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    if bias_k is not None and bias_v is not None:
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    q = q.view(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1) if static_k is None \
        else static_k
    v = v.view(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1) if static_v is None \
        else static_v
    if add_zero_attn:
        zeros = (bsz * num_heads, 1, head_dim)
        k = torch.cat([k, torch.zeros(zeros, dtype=k.dtype, device=k.device)], dim=1)
        v = torch.cat([v, torch.zeros(zeros, dtype=v.dtype, device=v.device)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)
    if key_padding_mask is not None:
        if not torch.jit.is_tracing():   # as nn's: traced, its sizes are values, not ints
            F._check_key_padding_mask(key_padding_mask, src_len, bsz)
        key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len) \
            .expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if not training:
        dropout_p = 0.0

    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(q.shape[-1]))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        attn = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = project(attn, out_proj_weight, out_proj_bias, out_rule)
        out = out.view(tgt_len, bsz, out.size(1))
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            return out.squeeze(1), weights.squeeze(0)
        return out, weights
    if attn_mask is not None:
        if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(0)
        else:
            attn_mask = attn_mask.view(bsz, num_heads, -1, src_len)
    q = q.view(bsz, num_heads, tgt_len, head_dim)
    k = k.view(bsz, num_heads, src_len, head_dim)
    v = v.view(bsz, num_heads, src_len, head_dim)
    attn = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    attn = attn.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = project(attn, out_proj_weight, out_proj_bias, out_rule)
    out = out.view(tgt_len, bsz, out.size(1))
    return (out if is_batched else out.squeeze(1)), None


def _conv_conf(stride, padding, dilation, groups, tuple_of):
    padding = padding if isinstance(padding, str) else tuple_of(padding)
    return (tuple_of(stride), padding, tuple_of(dilation), groups)


class CConv1dFunction(torch.autograd.Function):
    """``F.conv1d`` forward; backward by the rule (``cconv1d`` is the entry point)."""
    cx_saved_weight_index = 1

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups, rule, ridge,
                amortizer=None, map_size=None):
        _save_common(ctx, input, weight, bias, rule, ridge, amortizer)
        ctx.map_size = map_size
        ctx.conf = _conv_conf(stride, padding, dilation, groups, _single)
        return F.conv1d(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        layer = Conv1dGradients(input, weight, grad_output, *ctx.conf, map_size=ctx.map_size,
                                **_needs(ctx))
        return *_apply_rule(ctx, layer), None, None, None, None, None, None, None, None


class CConv3dFunction(torch.autograd.Function):
    """``F.conv3d`` forward; backward by the rule (``cconv3d`` is the entry point)."""
    cx_saved_weight_index = 1

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, dilation, groups, rule, ridge,
                amortizer=None, map_size=None):
        _save_common(ctx, input, weight, bias, rule, ridge, amortizer)
        ctx.map_size = map_size
        ctx.conf = _conv_conf(stride, padding, dilation, groups, _triple)
        return F.conv3d(input, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        layer = Conv3dGradients(input, weight, grad_output, *ctx.conf, map_size=ctx.map_size,
                                **_needs(ctx))
        return *_apply_rule(ctx, layer), None, None, None, None, None, None, None, None


def _transpose_forward(ctx, conv, tuple_of, input, weight, bias, stride, padding,
                       output_padding, groups, dilation, rule, ridge, amortizer):
    _save_common(ctx, input, weight, bias, rule, ridge, amortizer)
    ctx.conf = (tuple_of(stride), tuple_of(padding), tuple_of(output_padding),
                tuple_of(dilation), groups)
    return conv(input, weight, bias, stride, padding, output_padding, groups, dilation)


class _CConvTransposeFunction(torch.autograd.Function):
    """The backward CConvTranspose1d/2d/3dFunction share (``gradients.ConvTransposeGradients``,
    any number of spatial dims); each subclass's forward is its ``F.conv_transposeNd``."""
    cx_saved_weight_index = 1

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        layer = ConvTransposeGradients(input, weight, grad_output, *ctx.conf,
                                       **_needs(ctx, joint=False))
        return *_apply_rule(ctx, layer), None, None, None, None, None, None, None, None


class CConvTranspose1dFunction(_CConvTransposeFunction):
    """``F.conv_transpose1d`` forward; backward by the rule (``cconv_transpose1d`` is the
    entry point)."""

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, output_padding, groups, dilation,
                rule, ridge, amortizer=None):
        return _transpose_forward(ctx, F.conv_transpose1d, _single, input, weight, bias, stride,
                                  padding, output_padding, groups, dilation, rule, ridge,
                                  amortizer)


class CConvTranspose2dFunction(_CConvTransposeFunction):
    """``F.conv_transpose2d`` forward; backward by the rule (``cconv_transpose2d`` is the
    entry point)."""

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, output_padding, groups, dilation,
                rule, ridge, amortizer=None):
        return _transpose_forward(ctx, F.conv_transpose2d, _pair, input, weight, bias, stride,
                                  padding, output_padding, groups, dilation, rule, ridge,
                                  amortizer)


class CConvTranspose3dFunction(_CConvTransposeFunction):
    """``F.conv_transpose3d`` forward; backward by the rule (``cconv_transpose3d`` is the
    entry point)."""

    @staticmethod
    def forward(ctx, input, weight, bias, stride, padding, output_padding, groups, dilation,
                rule, ridge, amortizer=None):
        return _transpose_forward(ctx, F.conv_transpose3d, _triple, input, weight, bias, stride,
                                  padding, output_padding, groups, dilation, rule, ridge,
                                  amortizer)


def _check_tensors(input, weight, bias):
    """What a matched backward needs of the tensors that ``F``'s own checks let through:
    checked in forward, where the error can name the argument (in backward it would be an
    AttributeError, a kernel's dtype error, or a complex gradient silently made real)."""
    for name, tensor in (("input", input), ("weight", weight), ("bias", bias)):
        if tensor is None and name == "bias":
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor; got {type(tensor).__name__}")
        if tensor.is_complex():
            raise TypeError(f"{name} is {tensor.dtype}: matched gradients are defined for real "
                            f"tensors only (rule='sgd' gives a complex layer nn's gradients)")


def _check_bias(bias, out_features):
    # F.linear broadcasts any bias, but the matched solve gives one bias entry per output:
    # autograd would reject that gradient for a (1, out) bias, in backward. A frozen bias is
    # a constant offset, not solved for (docs/design.md §2): any shape F.linear takes; so is
    # any bias without grad mode (an eval forward: no backward will solve for it).
    if torch.is_grad_enabled() and trains(bias) and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must be of shape (out_features,) = ({out_features},); got "
                         f"{tuple(bias.shape)}")


def _geometry_ints(value, spatial):
    """One conv geometry argument as F.conv reads it — an int or a 1-element sequence for
    every spatial dim (``spatial`` None: a single int, groups), numpy / 0-d tensor integers
    as ints — so that backward's kernels, which take Python ints, see what forward used;
    anything F.conv refuses is left for its own error (a string padding, a float, a bool, a
    sequence of the wrong length)."""
    if isinstance(value, str):
        return value
    items = list(value) if isinstance(value, (tuple, list)) and spatial else [value]
    if len(items) == 1 and spatial:
        items *= spatial
    if len(items) != (spatial or 1) or any(isinstance(v, bool) for v in items):
        return value
    try:
        ints = tuple(operator.index(v) for v in items)
    except TypeError:
        return value
    return ints if spatial else ints[0]


def _conv_geometry(geometry, spatial):
    """``geometry`` (conv: stride, padding, dilation, groups; transposed: stride, padding,
    output_padding, groups, dilation) with each argument as ``_geometry_ints`` makes it."""
    return tuple(_geometry_ints(v, None if i == 3 else spatial) for i, v in enumerate(geometry))


def _cconv(function, conv, spatial, gram_shape, input, weight, bias, geometry, rule, ridge,
           amortizer, map_size=None):
    """Validate, then ``conv`` itself for a bypassing rule, else ``function`` (an unbatched
    input — ``spatial`` + 1 dims, as the F functions accept — as one sample).
    ``gram_shape(weight, bias, groups)``: the shape of the layer's Gram."""
    bypass = _bypassed(rule, input, weight)
    ridge = check_ridge(ridge)
    if bypass:
        return conv(input, weight, bias, *geometry)
    _check_tensors(input, weight, bias)
    geometry = _conv_geometry(geometry, spatial)
    if amortizer is not None:   # the shape needs a weight and groups F.conv accepts
        amortizer = check_amortizer(amortizer, gram_shape(weight, bias, geometry[3]), weight)
    rest = (rule, ridge, amortizer) + (() if map_size is None else (map_size,))
    if input.dim() == spatial + 1:
        return function.apply(input.unsqueeze(0), weight, bias, *geometry, *rest).squeeze(0)
    return function.apply(input, weight, bias, *geometry, *rest)


_CONV_KINDS = {1: (CConv1dFunction, F.conv1d), 2: (CConv2dFunction, F.conv2d),
               3: (CConv3dFunction, F.conv3d)}


def cconv_padded(input, pad, padding_mode, weight, bias, stride, dilation, groups, *, rule,
                 ridge, amortizer):
    """What a C conv module with a non-zero ``padding_mode`` computes: ``F.pad`` (``pad`` in
    F.pad's order), then the conv with no padding — the map eq. 35's ``c`` counts being the
    unpadded one (the padded border is no input of the layer's own: ``docs/backmatch.md``)."""
    spatial = weight.dim() - 2
    function, conv = _CONV_KINDS[spatial]
    return _cconv(function, conv, spatial, conv_gram_shape,
                  F.pad(input, pad, mode=padding_mode), weight, bias,
                  (stride, 0, dilation, groups), rule, ridge, amortizer,
                  map_size=tuple(input.shape[-spatial:]))


def _check_padding(padding):
    if isinstance(padding, str) and padding not in ("same", "valid"):
        raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid'; got {padding!r}")


def cconv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
            rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, amortizer=None):
    """``F.conv1d`` (zero padding: int, 1-tuple, 'same' or 'valid') whose backward gives
    weight/bias the matched gradient of ``rule``: X every patch of every sample, per group,
    N the batch size; computed as ``cconv2d``'s on a unit height (exact).

    Raises ValueError for an unknown ``rule``, a bad ``ridge`` or a padding string other
    than 'same' / 'valid'; TypeError/ValueError for a mismatched amortizer.
    """
    _check_padding(padding)
    return _cconv(CConv1dFunction, F.conv1d, 1, conv_gram_shape, input, weight, bias,
                  (stride, padding, dilation, groups), rule, ridge, amortizer)


def cconv3d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
            rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, amortizer=None):
    """``F.conv3d`` (zero padding: int, triple, 'same' or 'valid') whose backward gives
    weight/bias the matched gradient of ``rule``: X every 3-D patch of every sample, per
    group, N the batch size (``gradients.Conv3dGradients``: the ``im2col_gram`` kernels on a
    fold of the depth taps into channels).

    Raises ValueError for an unknown ``rule``, a bad ``ridge`` or a padding string other
    than 'same' / 'valid'; TypeError/ValueError for a mismatched amortizer.
    """
    _check_padding(padding)
    return _cconv(CConv3dFunction, F.conv3d, 3, conv_gram_shape, input, weight, bias,
                  (stride, padding, dilation, groups), rule, ridge, amortizer)


def cconv_transpose1d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                      dilation=1, *, rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, amortizer=None):
    """``F.conv_transpose1d`` whose backward gives weight/bias the gradient of ``rule``,
    matched on the pre-overlap blocks as in ``cconv_transpose2d``.

    Raises ValueError for an unknown ``rule`` or a bad ``ridge``; TypeError/ValueError for a
    mismatched amortizer (its Gram is (groups, C_in/groups, C_in/groups)).
    """
    return _cconv(CConvTranspose1dFunction, F.conv_transpose1d, 1,
                  transpose_gram_shape, input, weight, bias,
                  (stride, padding, output_padding, groups, dilation), rule, ridge, amortizer)


def cconv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                      dilation=1, *, rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, amortizer=None):
    """``F.conv_transpose2d`` whose backward gives weight/bias the gradient of ``rule``,
    matched on the pre-overlap blocks ``Z_p = Wᵀ x_p`` (docs/design.md §2): X the input's
    channel vectors (one column per input pixel), N the batch size, weight.grad
    ``(G (A + λI)⁻¹)ᵀ``; the bias, added after the overlap, ``g_b / (H_out·W_out + λ)``.

    Raises ValueError for an unknown ``rule`` or a bad ``ridge``; TypeError/ValueError for a
    mismatched amortizer (its Gram is (groups, C_in/groups, C_in/groups)).
    """
    return _cconv(CConvTranspose2dFunction, F.conv_transpose2d, 2,
                  transpose_gram_shape, input, weight, bias,
                  (stride, padding, output_padding, groups, dilation), rule, ridge, amortizer)


def cconv_transpose3d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                      dilation=1, *, rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, amortizer=None):
    """``F.conv_transpose3d`` whose backward gives weight/bias the gradient of ``rule``,
    matched on the pre-overlap blocks as in ``cconv_transpose2d``: X the input's channel
    vectors (one column per input voxel), N the batch size; the bias
    ``g_b / (D_out·H_out·W_out + λ)``.

    Raises ValueError for an unknown ``rule`` or a bad ``ridge``; TypeError/ValueError for a
    mismatched amortizer (its Gram is (groups, C_in/groups, C_in/groups)).
    """
    return _cconv(CConvTranspose3dFunction, F.conv_transpose3d, 3,
                  transpose_gram_shape, input, weight, bias,
                  (stride, padding, output_padding, groups, dilation), rule, ridge, amortizer)
