"""consequentialize(model): turn a model's nn.Linear / nn.Conv2d layers into C-layers in place.

The conversion swaps each layer's class, so parameters keep their identity (an optimizer
built before the call keeps working), device, dtype, hooks and state_dict keys.
"""
from __future__ import annotations

import fnmatch
import warnings

import torch.nn as nn

from ._validate import DEFAULT_RIDGE, DEFAULT_RULE, check_ridge, check_rule
from .modules import CConv2d, CLinear
from .norm import BackMatchBatchNorm1d, BackMatchBatchNorm2d

__all__ = ["consequentialize"]

_TARGETS = {nn.Linear: CLinear, nn.Conv2d: CConv2d}
_NORM_TARGETS = {nn.BatchNorm1d: BackMatchBatchNorm1d, nn.BatchNorm2d: BackMatchBatchNorm2d}
# Parents known to use a child's weight without calling the child's forward.
_WEIGHT_USERS = (nn.MultiheadAttention,)


def _matches(name, module, selectors):
    for sel in selectors:
        if isinstance(sel, type):
            if isinstance(module, sel):
                return True
        elif isinstance(sel, str):
            # A name selects the module itself or anything below it; globs allowed.
            if fnmatch.fnmatchcase(name, sel) or name.startswith(sel + "."):
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


def consequentialize(model: nn.Module, *, rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, include=None,
                     exclude=None, batchnorm=None) -> nn.Module:
    """Make every nn.Linear / nn.Conv2d of ``model`` a CLinear / CConv2d, in place.

    include / exclude: module types or qualified names (globs; a name also selects what is
    below it). Layers already converted get the new ``rule`` / ``ridge``. Layers whose
    weights their parent uses without calling their forward (the ``out_proj`` of
    nn.MultiheadAttention), and subclasses of nn.Linear / nn.Conv2d with behaviour of their
    own, are left alone with a warning naming them. batchnorm: also make nn.BatchNorm1d /
    2d back-matching norms (``norm.py``) with ``rule``; None (default) does so for the
    back-matching rules, whose signals cross batch norms. Returns ``model``.

    Raises TypeError if ``model`` is not an nn.Module, an include/exclude entry is neither a
    module type nor a name, or ``batchnorm`` is not True/False/None; ValueError for an
    unknown ``rule`` or a bad ``ridge``.
    """
    check_rule(rule)
    ridge = check_ridge(ridge)
    if batchnorm is None:
        batchnorm = rule.startswith("backmatch")
    elif not isinstance(batchnorm, bool):
        raise TypeError(f"batchnorm must be True, False or None; got {batchnorm!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    include, exclude = _selectors(include, "include"), _selectors(exclude, "exclude")
    bypassed = {id(child) for parent in model.modules() if isinstance(parent, _WEIGHT_USERS)
                for child in parent.modules() if child is not parent}
    skipped = []
    for name, module in model.named_modules():
        is_norm = batchnorm and isinstance(module, tuple(_NORM_TARGETS))
        if not (is_norm or isinstance(module, (nn.Linear, nn.Conv2d))):
            continue
        if include is not None and not _matches(name, module, include):
            continue
        if exclude is not None and _matches(name, module, exclude):
            continue
        if id(module) in bypassed:
            skipped.append(f"{name} (its weight is used by its parent without calling forward)")
            continue
        if is_norm:
            if type(module) in _NORM_TARGETS:
                module.__class__ = _NORM_TARGETS[type(module)]
            if isinstance(module, (BackMatchBatchNorm1d, BackMatchBatchNorm2d)):
                module.rule = rule
            else:
                skipped.append(f"{name} ({type(module).__name__} is a subclass with its own "
                               f"behaviour)")
            continue
        if isinstance(module, (CLinear, CConv2d)):
            module.rule, module.ridge = rule, ridge
            continue
        target = _TARGETS.get(type(module))
        if target is None:
            skipped.append(f"{name} ({type(module).__name__} is a subclass with its own behaviour)")
            continue
        module.__class__ = target
        module.rule, module.ridge = rule, ridge
    if skipped:
        warnings.warn("consequentialize left these layers as they are: " + "; ".join(skipped),
                      UserWarning, stacklevel=2)
    return model
