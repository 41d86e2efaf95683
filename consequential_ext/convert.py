"""consequentialize(model): turn a model's layers of registered kinds into C-layers in place.

The kinds come from ``registry.py`` (nn.Linear, nn.Conv2d, nn.Embedding, nn.MultiheadAttention,
nn.RNN / LSTM / GRU and their cells, Hugging Face's Conv1D, what users register, and
subclasses of nn.Linear / nn.ConvNd / nn.Embedding that pass their own weight to F.linear /
F.convNd / F.embedding). The conversion swaps each layer's class, so parameters keep their
identity (an optimizer built before the call keeps working), device, dtype, hooks and
state_dict keys.
Whatever holds a weight matrix and stays plain is named in one warning (``coverage.py``),
except what the user chose to leave plain.
"""
from __future__ import annotations

import fnmatch
import warnings

import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.modules.batchnorm import _BatchNorm

from . import graph_check
from .coverage import (USER_REASON, check_model, coverage, transformed_after_conversion,
                       weight_users)
from .norm import BackMatchBatchNorm1d, BackMatchBatchNorm2d
from .registry import kind_for, kind_of, made_from
from .rules import rule_named
from ._validate import (DEFAULT_RIDGE, DEFAULT_RULE, EXCLUDED, RULE_REFUSED, CLayerMixin,
                        check_ridge, check_rule)

__all__ = ["consequentialize"]

_NORM_TARGETS = {nn.BatchNorm1d: BackMatchBatchNorm1d, nn.BatchNorm2d: BackMatchBatchNorm2d}
# Norms with no back-matching version (every batch norm but 1d / 2d, which come first): they
# pass BP's signal, which a back-matching rule would change (eq. 26 / eq. 36's factor), so
# they are named in the warning.
_OTHER_NORMS = tuple(t for t in (_BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                                 getattr(nn, "RMSNorm", None),
                                 nn.modules.instancenorm._InstanceNorm) if t is not None)


def _matches(name, module, selectors):
    for sel in selectors:
        if isinstance(sel, type):
            if isinstance(module, sel):
                return True
        elif isinstance(sel, str):
            # A name selects the module itself or anything below it; globs allowed. Equality
            # first: a ModuleDict key may hold a glob's "[", "*" or "?" ("head[0]").
            if name == sel or fnmatch.fnmatchcase(name, sel) or name.startswith(sel + "."):
                return True
        else:
            raise TypeError(f"include/exclude entries must be module types or name strings; "
                            f"got {sel!r}")
    return False


def _selectors(value, arg):
    if value is None:
        return None
    if isinstance(value, (str, type)):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise TypeError(f"{arg} must be a module type, a name, or an iterable of them; "
                        f"got {value!r}") from None


def _warn_unmatched_names(model, **selectors):
    """Warn of include / exclude names that select no module: a misspelt exclude would
    otherwise convert the layer the user meant to keep plain, without a word. (A type may
    well be absent from a model; a name or glob is written for this one.)"""
    names = [name for name, _ in model.named_modules()]
    unmatched = [f"{arg}={sel!r}" for arg, sels in selectors.items() for sel in sels or ()
                 if isinstance(sel, str) and not any(_matches(n, None, (sel,)) for n in names)]
    if unmatched:
        warnings.warn(f"consequentialize: {', '.join(unmatched)} matches no module of the model "
                      f"(a misspelt name?), so selects nothing", UserWarning, stacklevel=3)


def _unconvert(module):
    """Make a C-layer (or back-matching norm) plain again: its class back to the nn (or user)
    class it was converted from, under a parametrization's own subclass where it has one; its
    amortizer dropped. Its parameters and buffers are untouched. A user's own class of a
    C-layer (one no conversion makes) keeps its class and gets the ordinary gradient."""
    cls = type(module)
    plain = next(c for c in cls.__mro__ if issubclass(c, nn.Module)
                 and not issubclass(c, _C_CLASSES))
    # torch's ``Parametrized<C-class>`` (parametrized after conversion: the properties are
    # its own); parametrized before conversion, ``plain`` is torch's class already.
    wrapper = parametrize.is_parametrized(module) and any(
        name in vars(cls) for name in module.parametrizations)
    if not _made_from(cls.__bases__[0] if wrapper else cls, plain):
        module.rule = "sgd"         # its forward and methods are the user's: keep them
        module._modules.pop("amortizer", None)
        return
    if wrapper:                     # remake it over the plain class
        attrs = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
        plain = type(f"Parametrized{plain.__name__}", (plain,), attrs)
    module.__class__ = plain
    module._modules.pop("amortizer", None)
    for key in ("_cx_rule", "_cx_ridge"):
        module.__dict__.pop(key, None)


_C_CLASSES = (CLayerMixin, BackMatchBatchNorm1d, BackMatchBatchNorm2d)


def _current_class(module):
    """The C-class of a converted ``module`` under its kind's current registration and
    configuration: a class the registry made of a registered type (``registry._made_class``)
    whose type was registered again since (``register_layer`` replaces the entry: new weight /
    bias names, ``transposed``, a ``c_type`` of the user's) is remade; None where the layer is
    now refused (``cx_unsupported``: a parameter unfrozen since, say)."""
    cls = type(module)
    made_of = vars(cls).get("_cx_made_of")
    kind = None if made_of is None else kind_of(made_of)
    c_type = cls if kind is None else kind.c_type
    return None if c_type.cx_unsupported(module) else c_type


def _made_from(c_cls, plain) -> bool:
    """Whether ``c_cls`` is a class a conversion makes of ``plain``, so that setting ``plain``
    back undoes exactly the conversion."""
    return c_cls is _NORM_TARGETS.get(plain) or c_cls in made_from(plain) \
        or vars(c_cls).get("_cx_made_of") is plain      # made under an earlier registration


def consequentialize(model: nn.Module, *, rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, include=None,
                     exclude=None, batchnorm=None) -> nn.Module:
    """Make every layer of a registered kind (nn.Linear → CLinear, nn.Conv2d → CConv2d,
    nn.Conv1d / Conv3d / ConvTranspose1d / 2d / 3d → CConv1d / …, nn.Embedding →
    CEmbedding, nn.MultiheadAttention → CMultiheadAttention, nn.RNN / LSTM / GRU and their
    cells → CRNN / CLSTM / CGRU / CRNNCell / …, Hugging Face's Conv1D,
    ``cx.register_layer``) and every subclass of nn.Linear / nn.Conv1d / Conv2d / Conv3d /
    nn.Embedding whose forward passes its own weight to F.linear / F.convNd / F.embedding
    (``registry.subclass_kind``) a C-layer with
    ``rule`` / ``ridge``, in place.

    include / exclude: module types or qualified names (exact, or globs; a name also selects
    what is below it; one that selects no module is warned of). Layers already converted get the
    new ``rule`` / ``ridge``, and excluded ones become plain again (an ``include`` leaves
    layers it does not select as they are). Every
    other module that holds a weight matrix — a layer whose weight its parent uses directly
    (not only through its forward: ``weight_reads``), a subclass that transforms its weight
    before use, a C-layer reparametrized since its conversion (made plain again), an unknown
    type, a refused one (nn.EmbeddingBag, an LSTM with ``proj_size``), a kind with no form
    under ``rule`` (a recurrent layer under the back-matching rules, made plain again if
    converted before) — is named with its reason in one warning, except
    those the user left out with include / exclude (``cx.coverage(model)`` lists all, with
    the matched share of the parameters); uses the source does not show are named on the
    first forward under grad (``graph_check``). batchnorm: also make nn.BatchNorm1d / 2d
    back-matching norms (``norm.py``) with ``rule``; None (default) does so for the
    back-matching rules, whose signals cross batch norms; norms with no back-matching version
    (BatchNorm3d, SyncBatchNorm, LayerNorm, GroupNorm, InstanceNorm, RMSNorm,
    LocalResponseNorm) keep BP's signal and are then named in the warning. Returns ``model``.

    Raises TypeError if ``model`` is not an nn.Module, an include/exclude entry is neither a
    module type nor a name, or ``batchnorm`` is not True/False/None; ValueError for an
    unknown ``rule``, a bad ``ridge`` or an uninitialised lazy layer (nothing is changed).
    """
    check_rule(rule)
    ridge = check_ridge(ridge)
    if batchnorm is None:
        batchnorm = rule_named(rule).changes_batchnorm
    elif not isinstance(batchnorm, bool):
        raise TypeError(f"batchnorm must be True, False or None; got {batchnorm!r}")
    check_model(model, "consequentialize")
    include, exclude = _selectors(include, "include"), _selectors(exclude, "exclude")
    _warn_unmatched_names(model, include=include, exclude=exclude)
    users = weight_users(model)
    skipped_norms = []
    for name, module in model.named_modules():
        if include is not None and not _matches(name, module, include):
            # Left as it is: an earlier exclude (an attention's plain out_proj) stands.
            module.__dict__.setdefault(USER_REASON, "not selected by include")
            continue
        if exclude is not None and _matches(name, module, exclude):
            module.__dict__[USER_REASON] = EXCLUDED
            if isinstance(module, _C_CLASSES):
                _unconvert(module)          # converted before: "keep it plain" all the same
            continue
        module.__dict__.pop(USER_REASON, None)
        module.__dict__.pop(RULE_REFUSED, None)
        if isinstance(module, (BackMatchBatchNorm1d, BackMatchBatchNorm2d)):
            module.rule = rule                  # converted before: the new rule, as any C-layer
            continue
        if batchnorm and isinstance(module, tuple(_NORM_TARGETS)):
            if type(module) in _NORM_TARGETS:
                module.__class__ = _NORM_TARGETS[type(module)]
                module.rule = rule
            else:
                skipped_norms.append(f"{name} ({type(module).__name__} is a subclass with its "
                                     f"own behaviour)")
            continue
        if batchnorm and isinstance(module, _OTHER_NORMS):   # BatchNorm3d, LayerNorm, …
            skipped_norms.append(f"{name} ({type(module).__name__} has no back-matching "
                                 f"version: BatchNorm1d/2d only)")
            continue
        if id(module) in users:
            continue
        if transformed_after_conversion(module):
            _unconvert(module)      # as a layer reparametrized before conversion: plain
            continue
        c_type = _current_class(module) if isinstance(module, CLayerMixin) else getattr(
            kind_for(module), "c_type", None)
        if c_type is None:
            if isinstance(module, CLayerMixin):
                _unconvert(module)          # its kind, registered again, now refuses it
            continue
        if not c_type.cx_takes_rule(rule):     # a recurrent layer under a back-matching rule
            if isinstance(module, CLayerMixin):
                _unconvert(module)
            module.__dict__[RULE_REFUSED] = rule
            continue
        module.__class__ = c_type
        module.rule, module.ridge = rule, ridge
    graph_check.install(model)
    left = [f"{p.name} ({p.reason})" for p in coverage(model).plain if not p.chosen_by_user]
    if left or skipped_norms:
        warnings.warn("consequentialize left these layers as they are: "
                      + "; ".join(left + skipped_norms), UserWarning, stacklevel=2)
    return model
