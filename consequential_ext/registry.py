"""The layer kinds ``consequentialize`` knows: one table from module types to C-layer classes.

Built-in kinds (nn.Linear → CLinear, nn.Conv2d → CConv2d) are entries of the same table a
user extends with ``register_layer``. A *linear-like* layer — any module whose forward is
``y = x W_viewᵀ + b`` on the last dim of its input, ``W_view`` its weight as (out, in) or the
transpose of it — needs no code of its own: ``register_layer(MyLayer)`` makes a C-class for it
whose forward is the module's own (bit-identical) and whose backward is CLinear's, on
``W_view``. Types can also be registered by qualified name, so that a library's layer
(``transformers.pytorch_utils.Conv1D``) is known without importing that library.

Lookup is by exact type: a subclass of a registered type with a forward of its own is a
different layer and is left plain, named in ``consequentialize``'s warning.
"""
from __future__ import annotations

import dataclasses
import pickle

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize, prune

from ._validate import EXCLUDED, USER_REASON, CLayerMixin

from .modules import (CConv2d, CEmbedding, CFunctionalCall, CLinear, CLinearLike, input_name,
                      CMultiheadAttention)
from .routing import passes_own_weight
from .modules import CConv1d, CConv3d, CConvTranspose1d, CConvTranspose2d, CConvTranspose3d
from .recurrent import CGRU, CGRUCell, CLSTM, CLSTMCell, CRNN, CRNNCell

__all__ = ["LayerKind", "register_layer", "kind_of", "registered_kinds", "kind_for",
           "subclass_kind"]


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """How one module type maps to the contract (docs/design.md §2).

    c_type: the C-layer class swapped in; transposed: the weight is stored (in, out);
    weight, bias: the attribute names of the weight and (optional) bias parameters.
    """
    name: str
    c_type: type
    transposed: bool = False
    weight: str = "weight"
    bias: str | None = "bias"


_KINDS: dict[str, LayerKind] = {}


def _qualified_name(module_type: type) -> str:
    return f"{module_type.__module__}.{module_type.__qualname__}"


def register_layer(module_type, c_type=None, *, transposed=False, weight="weight", bias="bias"):
    """Teach ``consequentialize`` a layer kind; returns its ``LayerKind``.

    module_type: an nn.Module subclass, or its qualified name as a string
    (``"transformers.pytorch_utils.Conv1D"``) to register it without importing its library.
    c_type: the C-layer class to swap in (a subclass of ``module_type`` mixing in
    ``CLayerMixin``); None for a linear-like layer — one whose forward computes
    ``x W_viewᵀ + b`` over the last dim of the input, with ``W_view`` = the ``weight``
    parameter as (out, in), or its transpose with ``transposed=True`` — for which a C-class is
    made: forward the module's own, backward CLinear's on ``W_view``.
    weight / bias: the attribute names of the weight and bias (bias may be absent or None).

    Registering a type again replaces its entry. Raises TypeError for a module_type that is
    neither an nn.Module subclass nor a dotted name, a c_type that is not a subclass of
    module_type or does not mix in ``CLayerMixin``, a c_type that would run a library
    C-layer's forward instead of module_type's own (``class C(cx.CEmbedding, Sub)``: write
    ``class C(Sub, cx.CEmbedding)``), a ``transposed`` that is not a bool, or no c_type for a
    conv, embedding or recurrent layer (torch's, a registered one or a subclass of either:
    not linear-like); ValueError for empty attribute names.
    """
    if isinstance(module_type, str):
        if "." not in module_type:
            raise TypeError(f"module_type must be an nn.Module subclass or a qualified name "
                            f"'package.module.Class'; got {module_type!r}")
        key = module_type
    elif isinstance(module_type, type) and issubclass(module_type, nn.Module):
        key = _qualified_name(module_type)
    else:
        raise TypeError(f"module_type must be an nn.Module subclass or a qualified name; got "
                        f"{module_type!r}")
    if not isinstance(weight, str) or not weight or (bias is not None and
                                                     (not isinstance(bias, str) or not bias)):
        raise ValueError(f"weight and bias must be attribute names (bias may be None); got "
                         f"weight={weight!r}, bias={bias!r}")
    if transposed not in (True, False):     # bool("False") would be True
        raise TypeError(f"transposed must be True or False; got {transposed!r}")
    if c_type is not None and not (isinstance(module_type, type) and isinstance(c_type, type)
                                   and issubclass(c_type, module_type)):
        raise TypeError(f"c_type must be a subclass of module_type; got {c_type!r}")
    if c_type is not None and not issubclass(c_type, CLayerMixin):
        # consequentialize, coverage and amortize ask a C-class (``cx_unsupported``,
        # ``cx_takes_rule``, ``cx_gram_shape``): without the mixin they failed deep inside.
        raise TypeError(f"c_type must mix in consequential_ext's CLayerMixin (a C-layer such "
                        f"as cx.CLSTM among its bases); got {c_type.__name__}")
    if c_type is not None and _forward_owner(module_type).__module__.split(".")[0] != "torch" \
            and _forward_owner(c_type).__module__.startswith(__package__ + "."):
        # cx.CEmbedding's forward is nn's: before the subclass in the bases, it would drop the
        # subclass's own steps (Hugging Face's scaled embeddings) — another model, silently.
        raise TypeError(f"c_type {c_type.__name__} runs "
                        f"{_forward_owner(c_type).__name__}.forward instead of "
                        f"{module_type.__name__}'s own: put {module_type.__name__} first in its "
                        f"bases, class {c_type.__name__}({module_type.__name__}, "
                        f"cx.{_forward_owner(c_type).__name__}), so its forward runs and reaches "
                        f"the C-layer's through super()")
    if c_type is None and isinstance(module_type, type):
        # A conv or embedding is not linear-like: CLinear's backward would fail on its weight.
        # The type itself too: registering nn.Conv2d again without c_type would swap CConv2d
        # for CLinear's backward.
        base = next((b for b in module_type.__mro__ if not _linear_like(_KINDS.get(
            _qualified_name(b)))), None)
        if base is not None:
            c_base = _KINDS[_qualified_name(base)].c_type.__name__
            what = (f"is registered with cx.{c_base}" if base is module_type
                    else f"is a {base.__name__}")
            raise TypeError(f"{module_type.__name__} {what}, not linear-like: pass "
                            f"c_type, a class of cx.{c_base} and {module_type.__name__}")
        # A convolution or embedding bag without a C-class here (a direct _ConvNd subclass,
        # nn.EmbeddingBag): a conv's weight has more than two dims, and CLinear's backward
        # would fail on it; a bag sums several rows. A recurrent layer returns (output,
        # state) and applies its weights once per time step.
        if issubclass(module_type, _NOT_LINEAR_LIKE):
            raise TypeError(f"{module_type.__name__} is a convolution, embedding or recurrent "
                            f"layer, not linear-like: it needs a C-class of its own (c_type)")
    kind = LayerKind(key, c_type, bool(transposed), weight, bias)
    _KINDS[key] = kind
    return kind


def _forward_owner(cls: type) -> type:
    """The class whose ``forward`` instances of ``cls`` run."""
    return next(c for c in cls.__mro__ if "forward" in vars(c))


_NOT_LINEAR_LIKE = (_ConvNd, nn.Embedding, nn.EmbeddingBag, nn.RNNBase, nn.RNNCellBase)


def _linear_like(kind: LayerKind | None) -> bool:
    """Whether ``kind`` (None: no kind) is CLinear's or a registered linear-like one."""
    return kind is None or kind.c_type is None or issubclass(kind.c_type, (CLinear, CLinearLike))


def _made_class(mixin, module_type, doc, **attributes) -> type:
    """``C<Name>``: ``mixin`` over ``module_type``, made at run time. Its instances pickle
    (and deep-copy) by ``module_type``, which is importable, and remake the class on load:
    the class itself is an attribute of no module."""
    def __reduce_ex__(self, protocol):
        return _remade, (module_type, mixin is CLinearLike), self.__dict__
    return type(f"C{module_type.__name__}", (mixin, module_type),
                {**attributes, "__module__": module_type.__module__, "__doc__": doc,
                 "_cx_made_of": module_type,
                 "__reduce_ex__": __reduce_ex__})


def _remade(module_type: type, registered: bool):
    """An empty instance of ``module_type``'s made C-class (``_made_class``), for unpickling."""
    if _thin_base_kind(module_type) is not None:
        c_type = _thin_class(module_type)
    elif registered or _functional_base(module_type) is None:   # a thin one's base is gone
        kind = kind_of(module_type)
        if kind is None:
            raise pickle.UnpicklingError(
                f"a C{module_type.__name__} (a registered linear-like layer, or a subclass of "
                f"one) needs cx.register_layer of {_qualified_name(module_type)} or of the class "
                f"it subclasses in this process before it is loaded")
        c_type = kind.c_type
    else:
        c_type = _functional_class(module_type)
    return c_type.__new__(c_type)


def _linear_like_class(module_type: type, kind: LayerKind) -> type:
    return _made_class(CLinearLike, module_type, f"{module_type.__name__} with CLinear's "
                       f"backward (registered linear-like layer).", _cx_kind=kind,
                       _cx_input_name=input_name(module_type))


def kind_of(module_type: type) -> LayerKind | None:
    """The registered kind of exactly ``module_type`` (a C-class of a linear-like kind is made
    on first lookup), or None."""
    kind = _KINDS.get(_qualified_name(module_type))
    if kind is None:
        return None
    if kind.c_type is None:
        kind = dataclasses.replace(kind, c_type=_linear_like_class(module_type, kind))
        _KINDS[kind.name] = kind
    return kind


def registered_kinds() -> dict[str, LayerKind]:
    """A copy of the table: qualified type name → LayerKind."""
    return dict(_KINDS)


register_layer(nn.Linear, CLinear)
register_layer(nn.Conv2d, CConv2d)
register_layer(nn.Embedding, CEmbedding)
register_layer(nn.MultiheadAttention, CMultiheadAttention)
register_layer(nn.Conv1d, CConv1d)
register_layer(nn.Conv3d, CConv3d)
register_layer(nn.ConvTranspose1d, CConvTranspose1d)
register_layer(nn.ConvTranspose2d, CConvTranspose2d)
register_layer(nn.ConvTranspose3d, CConvTranspose3d)
register_layer(nn.RNN, CRNN)
register_layer(nn.LSTM, CLSTM)
register_layer(nn.GRU, CGRU)
register_layer(nn.RNNCell, CRNNCell)
register_layer(nn.LSTMCell, CLSTMCell)
register_layer(nn.GRUCell, CGRUCell)
# Hugging Face GPT-2 and relatives: a Linear whose weight is stored (in, out), applied by addmm.
register_layer("transformers.pytorch_utils.Conv1D", transposed=True)


# Subclasses matched through the functional call their forward makes with their own weight
# (``modules.CFunctionalCall``): base type → (that call, the shape of a probe input, or a list
# of shapes tried in turn while the forward fails: ``routing.passes_own_weight``).
def _conv_probe(m):
    spatial = tuple(
        2 * (d * (k - 1) + 1) + s for k, d, s in zip(m.kernel_size, m.dilation, m.stride))
    # Channels first, as nn takes them; else channels last, for a forward that moves them
    # first (Hugging Face's LASR / Parakeet CTC heads: (batch, time, channels) in and out).
    return [(1, m.in_channels) + spatial, (1,) + spatial + (m.in_channels,)]


_FUNCTIONAL_CALLS = {
    nn.Linear: (F.linear, lambda m: (2, m.in_features)),
    nn.Conv1d: (F.conv1d, _conv_probe),
    nn.Conv2d: (F.conv2d, _conv_probe),
    nn.Conv3d: (F.conv3d, _conv_probe),
    # Hugging Face's scaled embeddings (BART, Gemma, M2M100): super().forward(ids) · scale.
    # Ids (batch, tokens); else their shape, as the learned positions of LED and Blenderbot
    # take (input_ids.shape: arange(seq_len) looked up).
    nn.Embedding: (F.embedding, lambda m: [(2, 2), torch.Size((2, 2))]),
}
_PROBE_DTYPES = {nn.Embedding: torch.long}    # indices; the others take the weight's dtype
# Thin subclasses of these (no forward of their own) go through the functional call too;
# those of Conv1d / Conv3d / Embedding keep their base's C-class, as before their call was
# routed.
_ROUTED_EVEN_THIN = (nn.Linear, nn.Conv2d)
_SUBCLASS_TYPES: dict[type, type] = {}


def _functional_base(module_type):
    return next((base for base in _FUNCTIONAL_CALLS if issubclass(module_type, base)), None)


def _thin_base_kind(module_type: type) -> LayerKind | None:
    """The kind of the registered class ``module_type`` subclasses without a forward of its
    own (torchvision's Conv3DSimple: nn.Conv3d plus a static method), if that kind has a
    C-class; None otherwise. Linear / Conv2d subclasses go through their functional call."""
    if kind_of(module_type) is not None or issubclass(module_type, _ROUTED_EVEN_THIN):
        return None
    for depth, base in enumerate(module_type.__mro__[1:], start=1):
        kind = kind_of(base)             # a registered linear-like base's C-class made here
        if kind is None:
            continue
        own = module_type.__mro__[:depth]
        if any(hook in vars(cls) for cls in own for hook in _FORWARDS):
            return None
        return kind
    return None


# What a subclass may not define for the base's C-class to stand in for it.
_FORWARDS = ("forward", "_conv_forward")
_THIN_TYPES: dict[type, type] = {}


def _thin_class(module_type: type) -> type:
    """The C-class of a thin subclass: its base's C-class over it."""
    c_type = _THIN_TYPES.get(module_type)
    if c_type is None:
        base_c_type = _thin_base_kind(module_type).c_type
        c_type = _made_class(base_c_type, module_type, f"{module_type.__name__} with "
                             f"{base_c_type.__name__}'s forward and backward (a subclass that "
                             f"adds no forward of its own).")
        _THIN_TYPES[module_type] = c_type
    return c_type


def subclass_kind(module) -> tuple[LayerKind | None, str | None]:
    """(kind, None) for a subclass of nn.Linear / nn.Conv1d / Conv2d / Conv3d / nn.Embedding
    whose forward passes its own weight to ``F.linear`` / ``F.convNd`` / ``F.embedding`` —
    checked by running that forward on a probe input on the meta device
    (``routing.passes_own_weight``) — or of another registered class without
    a forward of its own (its C-class over it); (None, why not) otherwise; (None, None) for a
    module that is no such subclass."""
    module_type = type(module)
    thin = _thin_base_kind(module_type)
    if thin is not None:
        return dataclasses.replace(thin, name=_qualified_name(module_type),
                                   c_type=_thin_class(module_type)), None
    base = _functional_base(module_type)
    if base is None:
        return None, None
    call, probe_shape = _FUNCTIONAL_CALLS[base]
    why_not = passes_own_weight(module, call, probe_shape(module), _PROBE_DTYPES.get(base))
    if why_not is not None:
        return None, why_not
    return LayerKind(_qualified_name(module_type), _functional_class(module_type)), None


def _functional_class(module_type: type) -> type:
    """The C-class of a Linear / ConvNd / Embedding subclass matched through its functional
    call."""
    c_type = _SUBCLASS_TYPES.get(module_type)
    if c_type is None:
        call = _FUNCTIONAL_CALLS[_functional_base(module_type)][0]
        c_type = _made_class(CFunctionalCall, module_type, f"{module_type.__name__} with its "
                             f"F.{call.__name__} call on its own weight matched.",
                             _cx_call=staticmethod(call))  # F.embedding is a Python function
        _SUBCLASS_TYPES[module_type] = c_type
    return c_type


def made_from(module_type: type) -> tuple:
    """The C-classes a conversion has made of ``module_type`` (its kind's, a thin or a
    functional-call subclass's): a module of one of them turns back into ``module_type``."""
    kind = kind_of(module_type)
    return tuple(c for c in (kind.c_type if kind is not None else None,
                             _THIN_TYPES.get(module_type), _SUBCLASS_TYPES.get(module_type))
                 if c is not None)


def kind_for(module) -> LayerKind | None:
    """The kind ``consequentialize`` converts ``module`` with: its exact type's, else the
    ``subclass_kind`` of a Linear / ConvNd / Embedding subclass; None if it stays plain (also
    when its weight is ``derived_weight``, or its C-class refuses its configuration:
    ``cx_unsupported``, an LSTM's ``proj_size``)."""
    kind = kind_of(type(module)) or subclass_kind(module)[0]
    if kind is None or derived_weight(module, kind) or kind.c_type.cx_unsupported(module):
        return None
    return kind


def derived_weight(module, kind: LayerKind) -> bool:
    """Whether the kind's weight (or bias) attribute is there but no parameter: recomputed
    from others before each forward (``nn.utils.weight_norm`` / ``spectral_norm``'s hooks,
    ``nn.utils.prune``'s, a parametrization). A matched gradient of it would reach the
    parameters through that transformation. A bias kept as a buffer or as a plain tensor
    that takes no gradient is a constant, as a frozen one; a property giving a parameter is
    that parameter; a bias attribute that is no tensor (None, a flag) is no bias
    (``recomputed_bias``)."""
    return derived_tensor(module, kind) is not None


def recomputed_bias(owner, name) -> bool:
    """Whether ``owner``'s bias ``name`` is recomputed from trained tensors before each
    forward (a parametrization, ``nn.utils.prune``, a hook of one's own): not a parameter or
    buffer, not a constant tensor (one that takes no gradient), and not another name (a
    property) for a parameter, whose matched gradient lands on that parameter itself."""
    if name in owner._parameters or name in owner._buffers:
        return False
    if parametrize.is_parametrized(owner, name) or any(
            isinstance(hook, prune.BasePruningMethod) and hook._tensor_name == name
            for hook in owner._forward_pre_hooks.values()):
        return True           # also when the last forward ran without grad mode
    value = getattr(owner, name, None)
    return isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) \
        and value.requires_grad


def derived_tensor(module, kind: LayerKind) -> str | None:
    """The name (``out_proj.bias`` for an attention's out_proj) of the first weight or bias
    ``derived_weight`` finds recomputed; None if none is."""
    for owner, name in matched_weights(module, kind):
        if name not in owner._parameters and (hasattr(owner, name)
                                              or set_before_forward(owner)):
            return name if owner is module else f"out_proj.{name}"
    return recomputed_bias_name(module, kind)


def set_before_forward(owner) -> bool:
    """Whether ``owner`` is a recurrent layer or cell, whose forward reads every one of its
    weights: one missing from its parameters, even with no attribute left, is set by
    something else before each call (AWD-LSTM's WeightDrop deletes ``weight_hh_l0`` and sets
    a dropped copy of ``weight_hh_l0_raw``)."""
    return isinstance(owner, (nn.RNNBase, nn.RNNCellBase))


def recomputed_bias_name(module, kind: LayerKind | None) -> str | None:
    """The name (``out_proj.bias`` for an attention's out_proj) of the first bias the C-layer
    of ``module`` matches jointly that is ``recomputed_bias``; None if none is."""
    for owner, name in matched_biases(module, kind):
        if recomputed_bias(owner, name):
            return name if owner is module else f"out_proj.{name}"
    return None


# The weights an attention's C-layer matches besides its out_proj's (which it matches too).
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def matched_weights(module, kind: LayerKind | None):
    """(owner, attribute) of each weight the C-layer of ``module`` matches: an attention's
    in-projection(s) and, unless the user excluded it, its out_proj's weight; else the kind's
    weight (``weight`` without a kind)."""
    if isinstance(module, nn.MultiheadAttention):
        pairs = [(module, name) for name in ATTENTION_WEIGHTS]
        if module.out_proj.__dict__.get(USER_REASON) != EXCLUDED:
            pairs.append((module.out_proj, "weight"))
        return pairs
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):    # weight_ih(_l0), weight_hh(_l0), …
        return [(module, n) for n in _recurrent_names(module) if n.startswith("weight")]
    return [(module, kind.weight if kind is not None else "weight")]


def matched_biases(module, kind: LayerKind | None):
    """(owner, attribute) of each bias the C-layer of ``module`` matches jointly with its
    weight (``matched_weights``): a bias is a weight on a constant-1 row of X, so one that is
    recomputed from others (pruned, parametrized) is matched on the wrong row."""
    if isinstance(module, nn.MultiheadAttention):
        pairs = [(module, "in_proj_bias")]
        if module.out_proj.__dict__.get(USER_REASON) != EXCLUDED:
            pairs.append((module.out_proj, "bias"))
        return pairs
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):    # bias_ih(_l0), bias_hh(_l0), …
        return [(module, n) for n in _recurrent_names(module) if n.startswith("bias")]
    name = kind.bias if kind is not None else "bias"
    return [] if name is None else [(module, name)]


def _recurrent_names(module):
    """A recurrent layer's or cell's weight and bias names, parametrized ones included."""
    if isinstance(module, nn.RNNBase):
        return module._flat_weights_names
    return ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if module.bias else [])
