"""Drop-in C-layers: subclasses of nn.Linear, nn.Conv1d/2d/3d, nn.ConvTranspose1d/2d/3d,
nn.Embedding and nn.MultiheadAttention whose weight gradient is matched, and the mixins
``registry`` makes C-classes of other layers with.

Same parameters, same state_dict keys, ``isinstance`` still true, forward bit-identical to
the nn layer; only backward differs (see ``functional.py``).
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import functional as CF
from .amortize import amortizer_of
from .routing import PASS, FunctionalRoute
from .rules import rule_named
from ._validate import (DEFAULT_RIDGE, DEFAULT_RULE, EXCLUDED, USER_REASON, CLayerMixin,
                        conv_gram_shape, linear_gram_shape, transpose_gram_shape)

__all__ = ["CLinear", "CConv2d", "CLinearLike", "CEmbedding", "CMultiheadAttention",
           "CFunctionalCall"]
__all__ += ["CConv1d", "CConv3d", "CConvTranspose1d", "CConvTranspose2d", "CConvTranspose3d"]


class CLinear(CLayerMixin, nn.Linear):
    """``nn.Linear`` whose weight and bias get the gradient of ``rule`` (default: the matched
    gradient ``G (A + λI)⁻¹``, docs/design.md §2); forward is bit-identical to nn.Linear.

    rule: one of ``cx.RULES``; ridge: λ, a finite float > 0 relative to ``A = X Xᵀ / N``.
    Both are attributes validated on every assignment (ValueError naming them). Any number of
    leading input dims; N is the number of input rows.
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, *,
                 rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.rule, self.ridge = rule, ridge

    def cx_gram_shape(self):
        return linear_gram_shape(self.weight, self.bias)

    def forward(self, input):
        return CF.clinear(input, self.weight, self.bias, rule=self.rule, ridge=self.ridge,
                          amortizer=amortizer_of(self))

    def extra_repr(self):
        return f"{super().extra_repr()}, {self._cx_repr()}"


class _CConvNd(CLayerMixin):
    """What CConv1d / CConv2d / CConv3d share: nn's ``_conv_forward`` steps (non-zero
    ``padding_mode`` padded first) around the functional C-entry ``_cx_conv``, and one Gram
    per group."""

    _cx_conv = None

    def cx_gram_shape(self):
        return conv_gram_shape(self.weight, self.bias, self.groups)

    def forward(self, input):
        if self.padding_mode != "zeros":
            return CF.cconv_padded(input, self._reversed_padding_repeated_twice,
                                   self.padding_mode, self.weight, self.bias, self.stride,
                                   self.dilation, self.groups, rule=self.rule, ridge=self.ridge,
                                   amortizer=amortizer_of(self))
        return self._cx_conv(input, self.weight, self.bias, self.stride, self.padding,
                             self.dilation, self.groups, rule=self.rule, ridge=self.ridge,
                             amortizer=amortizer_of(self))

    def extra_repr(self):
        return f"{super().extra_repr()}, {self._cx_repr()}"


class CConv2d(_CConvNd, nn.Conv2d):
    """``nn.Conv2d`` whose weight and bias get the gradient of ``rule`` (default: the matched
    gradient ``G (A + λI)⁻¹`` with X the im2col patches per group, N the batch size;
    docs/design.md §2); forward is bit-identical to nn.Conv2d.

    Every nn.Conv2d argument works (stride, padding int / pair / 'same' / 'valid', dilation,
    groups, bias, every padding_mode; batched or unbatched input). rule, ridge: as in
    ``CLinear``.
    """

    # nn.Conv2d._conv_forward's two steps around cconv2d, so outputs are bit-identical.
    _cx_conv = staticmethod(CF.cconv2d)

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *,
                 rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        self.rule, self.ridge = rule, ridge


def input_name(module_type: type) -> str | None:
    """The name ``module_type.forward`` gives its first argument after ``self`` (the input a
    registered linear-like layer may be called with by keyword), or None. Read once, when the
    C-class is made: ``inspect.signature`` inside a compiled forward breaks
    ``torch.compile(fullgraph=True)``."""
    try:
        params = list(inspect.signature(module_type.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    usable = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return params[0].name if params and params[0].kind in usable else None


class CLinearLike(CLayerMixin):
    """Mixin of the C-classes ``registry.register_layer`` makes for linear-like layers: the
    module's own forward (bit-identical), CLinear's backward on the weight viewed as (out, in).

    ``_cx_kind`` (a ``registry.LayerKind``) names the weight and bias attributes and whether
    the weight is stored transposed.
    """

    _cx_kind = None
    _cx_input_name = None       # set on the made class (registry): ``input_name``

    def _cx_weight_bias(self):
        kind = self._cx_kind
        return getattr(self, kind.weight), getattr(self, kind.bias, None) if kind.bias else None

    def cx_weight(self):
        return self._cx_weight_bias()[0]     # the registered name (README's Dense: "kernel")

    def cx_gram_shape(self):
        weight, bias = self._cx_weight_bias()
        return linear_gram_shape(weight.t() if self._cx_kind.transposed else weight, bias)

    @classmethod
    def cx_unsupported(cls, module):
        # The layer's own forward runs inside the matched Function, where autograd records
        # nothing: a parameter it uses besides the registered weight and bias would get no
        # gradient, silently.
        kind = cls._cx_kind
        weight = getattr(module, kind.weight, None)
        if not isinstance(weight, torch.Tensor):
            return (f"registered weight {kind.weight!r} is no tensor attribute of this "
                    f"{type(module).__name__} (cx.register_layer's weight= names it)")
        bias = getattr(module, kind.bias, None) if kind.bias else None
        others = [name for name, p in module.named_parameters()
                  if p.requires_grad and p is not weight and p is not bias]
        if others:
            return (f"trains parameters besides its registered weight and bias "
                    f"({', '.join(others)}): a registered linear-like layer's own forward "
                    f"runs inside its matched backward's Function, where they would get no "
                    f"gradient (cx.register_layer's weight= / bias= name the layer's two)")
        return None

    def forward(self, *args, **kwargs):
        # The input alone, positionally or by the layer's own name for it: its forward runs
        # inside the matched Function, where autograd records nothing, so any other argument
        # (a residual added, a gain) would be cut from the graph or mismatch the backward.
        name = self._cx_input_name
        if len(args) + len(kwargs) != 1 or (kwargs and name not in kwargs):
            raise TypeError(f"{type(self).__name__} (a registered linear-like layer, converted) "
                            f"takes its input alone"
                            + (f", positionally or as {name}=" if name else ", positionally")
                            + f"; got {len(args)} positional and keywords {sorted(kwargs)}: "
                            f"its own forward runs inside the matched backward's Function, "
                            f"where other arguments would get no gradient")
        input = args[0] if args else kwargs[name]
        weight, bias = self._cx_weight_bias()
        return CF.clinear_like(input, weight, bias, super().forward,
                               transposed=self._cx_kind.transposed, rule=self.rule,
                               ridge=self.ridge, amortizer=amortizer_of(self))

    def extra_repr(self):
        return ", ".join(filter(None, [super().extra_repr(), self._cx_repr()]))


class CEmbedding(CLayerMixin, nn.Embedding):
    """``nn.Embedding`` whose weight gets the gradient of ``rule``: for the matched rules, row
    v of the ordinary gradient divided by (count_v / N + λ), N the number of indices
    (one-hot inputs: A = diag(count_v / N), docs/design.md §2); forward is bit-identical to
    nn.Embedding. ``padding_idx``, ``max_norm``, ``scale_grad_by_freq`` and ``sparse`` work as
    in nn. rule, ridge: as in ``CLinear``.
    """

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None,
                 norm_type=2.0, scale_grad_by_freq=False, sparse=False, _weight=None,
                 _freeze=False, device=None, dtype=None, *, rule=DEFAULT_RULE,
                 ridge=DEFAULT_RIDGE):
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type,
                         scale_grad_by_freq, sparse, _weight, _freeze, device, dtype)
        self.rule, self.ridge = rule, ridge

    def cx_gram_shape(self):
        return None  # A is diagonal and exact at O(V): nothing to amortize

    def extra_repr(self):
        return f"{super().extra_repr()}, {self._cx_repr()}"

    def forward(self, input):
        return CF.cembedding(input, self.weight, self.padding_idx, self.max_norm,
                             self.norm_type, self.scale_grad_by_freq, self.sparse,
                             rule=self.rule, ridge=self.ridge)


class CMultiheadAttention(CLayerMixin, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose projections get the gradient of ``rule``: the
    in-projection (packed ``in_proj_weight``/``in_proj_bias``, or ``q/k/v_proj_weight`` when
    ``kdim``/``vdim`` differ) matched per projection on its own input rows, ``out_proj`` on the
    rows of the attention output (``functional.cmulti_head_attention_forward``). Forward is
    nn's own, bit-identical: when a backward can reach the layer, nn's forward runs with its
    ``F.multi_head_attention_forward`` call routed to the matched one (``routing.py``);
    otherwise (inference) nn's forward runs untouched, fast path included. rule, ridge: as in
    ``CLinear``. ``bias_k``/``bias_v`` (``add_bias_kv``) get ordinary gradients.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, *, rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim,
                         vdim, batch_first, device, dtype)
        self.rule, self.ridge = rule, ridge

    def cx_gram_shape(self):
        return None  # one Gram per projection: amortize leaves this layer exact

    def cx_matched_parameters(self):
        """The parameters this layer matches (its own and its ``out_proj``'s)."""
        names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                 "in_proj_bias")
        own = [getattr(self, n) for n in names]
        if not self._cx_out_proj_plain():
            own += [self.out_proj.weight, self.out_proj.bias]
        return [p for p in own if p is not None]

    def _cx_out_proj_plain(self):
        """Whether the user excluded ``out_proj`` (``consequentialize(exclude=...)``): its
        ordinary gradient then, as for any layer left plain. (An ``include`` selecting this
        layer by type matches it whole.)"""
        return self.out_proj.__dict__.get(USER_REASON) == EXCLUDED

    def _matched_forward(self, *args, **kwargs):
        return CF.cmulti_head_attention_forward(
            *args, **kwargs, rule=self.rule, ridge=self.ridge,
            out_proj_rule="sgd" if self._cx_out_proj_plain() else None)

    def forward(self, query, key, value, *args, **kwargs):
        tensors = (query, key, value, *self.parameters())
        if rule_named(self.rule).bypass or not (torch.is_grad_enabled() and
                                                any(t.requires_grad for t in tensors)):
            return super().forward(query, key, value, *args, **kwargs)
        # nn's fast path needs no grad: it is never taken here, routed or not.
        with FunctionalRoute({F.multi_head_attention_forward: self._matched_forward}):
            return super().forward(query, key, value, *args, **kwargs)

    def extra_repr(self):
        return ", ".join(filter(None, [super().extra_repr(), self._cx_repr()]))


_FUNCTIONAL_ENTRIES = {F.linear: CF.clinear, F.conv1d: CF.cconv1d, F.conv2d: CF.cconv2d,
                       F.conv3d: CF.cconv3d, F.embedding: CF.cembedding}


class CFunctionalCall(CLayerMixin):
    """Mixin of the C-classes ``registry`` makes for subclasses of nn.Linear / nn.Conv1d /
    Conv2d / Conv3d / nn.Embedding whose forward passes their own ``weight`` to ``F.linear`` /
    ``F.convNd`` / ``F.embedding`` (timm's Conv2dSame pads itself first, Hugging Face's scaled
    embeddings scale after): the forward is the subclass's own, with that call routed to
    ``clinear`` / ``cconvNd`` / ``cembedding`` (``routing.py``), so the weight is matched on the
    input actually passed to it.
    Calls with any other weight run unchanged.
    """

    _cx_call = None  # F.linear, F.conv1d / conv2d / conv3d or F.embedding

    def cx_gram_shape(self):
        if self._cx_call is F.embedding:
            return None      # as CEmbedding's: A is diagonal and exact at O(V)
        if self._cx_call is F.linear:
            return linear_gram_shape(self.weight, self.bias)
        return conv_gram_shape(self.weight, self.bias, self.groups)

    def _cx_route(self, input, weight, *args, **kwargs):
        if weight is not self.weight:
            return PASS
        if self._cx_call is not F.embedding:
            kwargs["amortizer"] = amortizer_of(self)
        return _FUNCTIONAL_ENTRIES[self._cx_call](input, weight, *args, **kwargs, rule=self.rule,
                                                  ridge=self.ridge)

    def forward(self, *args, **kwargs):
        if rule_named(self.rule).bypass:
            return super().forward(*args, **kwargs)
        with FunctionalRoute({self._cx_call: self._cx_route}):
            return super().forward(*args, **kwargs)

    def extra_repr(self):
        return ", ".join(filter(None, [super().extra_repr(), self._cx_repr()]))


class CConv1d(_CConvNd, nn.Conv1d):
    """``nn.Conv1d`` whose weight and bias get the gradient of ``rule`` (default: the matched
    gradient ``G (A + λI)⁻¹`` with X the patches per group, N the batch size; docs/design.md
    §2), computed as CConv2d's on a unit height; forward is bit-identical to nn.Conv1d.

    Every nn.Conv1d argument works (stride, padding int / 1-tuple / 'same' / 'valid',
    dilation, groups, bias, every padding_mode; batched or unbatched input). rule, ridge: as
    in ``CLinear``.
    """

    _cx_conv = staticmethod(CF.cconv1d)

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *,
                 rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        self.rule, self.ridge = rule, ridge


class CConv3d(_CConvNd, nn.Conv3d):
    """``nn.Conv3d`` whose weight and bias get the gradient of ``rule`` (default: the matched
    gradient ``G (A + λI)⁻¹`` with X the 3-D patches per group, N the batch size;
    docs/design.md §2); forward is bit-identical to nn.Conv3d.

    Every nn.Conv3d argument works (stride, padding int / triple / 'same' / 'valid',
    dilation, groups, bias, every padding_mode; batched or unbatched input). rule, ridge: as
    in ``CLinear``. The Gram comes from the 2-D ``im2col_gram`` kernels on the input with its
    depth taps folded into channels (``gradients.Conv3dGradients``), which takes k_d/s_d
    times the input's memory in backward.
    """

    _cx_conv = staticmethod(CF.cconv3d)

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *,
                 rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation,
                         groups, bias, padding_mode, device, dtype)
        self.rule, self.ridge = rule, ridge


class _CConvTransposeNd(CLayerMixin):
    """What CConvTranspose1d / 2d / 3d share: nn's forward (``output_size`` → output_padding)
    around the functional C-entry ``_cx_conv``; one Gram of the input channels per group."""

    _cx_conv = None
    _cx_dims = 0

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 output_padding=0, groups=1, bias=True, dilation=1, padding_mode="zeros",
                 device=None, dtype=None, *, rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE):
        # nn.ConvTranspose1d / 2d / 3d's arguments (one signature for the three)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding,
                         groups, bias, dilation, padding_mode, device, dtype)
        self.rule, self.ridge = rule, ridge

    def cx_gram_shape(self):
        return transpose_gram_shape(self.weight, self.bias, self.groups)

    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros":
            raise ValueError(f"Only `zeros` padding mode is supported for "
                             f"{type(self).__name__}")
        output_padding = self._output_padding(input, output_size, self.stride, self.padding,
                                              self.kernel_size, self._cx_dims, self.dilation)
        return self._cx_conv(input, self.weight, self.bias, self.stride, self.padding,
                             output_padding, self.groups, self.dilation, rule=self.rule,
                             ridge=self.ridge, amortizer=amortizer_of(self))

    def extra_repr(self):
        return f"{super().extra_repr()}, {self._cx_repr()}"


class CConvTranspose1d(_CConvTransposeNd, nn.ConvTranspose1d):
    """``nn.ConvTranspose1d`` matched on the pre-overlap blocks as ``CConvTranspose2d`` is;
    forward is bit-identical to nn.ConvTranspose1d."""

    _cx_conv = staticmethod(CF.cconv_transpose1d)
    _cx_dims = 1


class CConvTranspose2d(_CConvTransposeNd, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose weight gets the gradient of ``rule``, matched on the
    pre-overlap blocks ``Z_p = Wᵀ x_p`` (one per input pixel; X the input's channel vectors,
    N the batch size): ``(G (A + λI)⁻¹)ᵀ``; the bias, added after the overlap, gets
    ``g_b / (H_out·W_out + λ)`` (docs/design.md §2). Forward is bit-identical to
    nn.ConvTranspose2d, ``output_size`` included; stride, padding, output_padding, groups,
    dilation, bias all work. rule, ridge: as in ``CLinear``.
    """

    _cx_conv = staticmethod(CF.cconv_transpose2d)
    _cx_dims = 2


class CConvTranspose3d(_CConvTransposeNd, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` matched on the pre-overlap blocks as ``CConvTranspose2d`` is (X
    the input's channel vectors, one column per input voxel; N the batch size); the bias gets
    ``g_b / (D_out·H_out·W_out + λ)``. Forward is bit-identical to nn.ConvTranspose3d,
    ``output_size`` included; every nn.ConvTranspose3d argument works. rule, ridge: as in
    ``CLinear``.
    """

    _cx_conv = staticmethod(CF.cconv_transpose3d)
    _cx_dims = 3
