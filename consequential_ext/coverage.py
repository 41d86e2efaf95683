"""``coverage(model)``: how much of a model gets matched gradients, and why the rest does not.

Every module that owns a parameter of 2 or more dimensions (a weight matrix or kernel) is
either matched — a C-layer whose rule does not bypass — or listed as plain with its reason.
The matched share counts parameters (each tensor once, shared ones too).
"""
from __future__ import annotations

import dataclasses

import torch.nn as nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

from .registry import (ATTENTION_WEIGHTS, derived_tensor, kind_of, matched_weights,
                       recomputed_bias_name, set_before_forward, subclass_kind)
from .rules import rule_named
from .weight_reads import weights_used_in_forward
from ._validate import RULE_REFUSED, USER_REASON, CLayerMixin

__all__ = ["coverage", "Coverage", "PlainLayer"]

# Parents that use a child's weight without calling the child's forward.
WEIGHT_USERS = (nn.MultiheadAttention,)
# Layer types refused, with the reason coverage gives.
UNSUPPORTED = {
    nn.EmbeddingBag: "nn.EmbeddingBag is not supported: a bag sums or averages several rows, so "
                     "A = X Xᵀ / N is not diagonal (a V × V solve over the vocabulary)",
}


@dataclasses.dataclass(frozen=True)
class PlainLayer:
    """A module with a weight matrix that is left plain: its qualified name, type, reason,
    and the number of parameters it owns."""
    name: str
    type_name: str
    reason: str
    params: int
    chosen_by_user: bool = False


@dataclasses.dataclass(frozen=True)
class Coverage:
    """The result of ``coverage(model)``. ``str()`` gives a table."""
    matched: tuple[str, ...]
    plain: tuple[PlainLayer, ...]
    matched_params: int
    total_params: int

    @property
    def share(self) -> float:
        """Matched parameters over all parameters (0 for a model without parameters)."""
        return self.matched_params / self.total_params if self.total_params else 0.0

    def __str__(self):
        lines = [f"{len(self.matched)} layers matched, {self.matched_params:,} of "
                 f"{self.total_params:,} parameters ({self.share:.1%}); "
                 f"{len(self.plain)} layers with weight matrices left plain"]
        if self.plain:
            lines += ["", "| layer | type | parameters | reason |", "|---|---|---|---|"]
            lines += [f"| {p.name or '(model)'} | {p.type_name} | {p.params:,} | {p.reason} |"
                      for p in self.plain]
        return "\n".join(lines)


def _own_params(module):
    return [p for p in module._parameters.values() if p is not None]


def _matched_params(module):
    """The parameters a matched layer matches: ``cx_matched_parameters()`` where the layer
    matches more than its own (an attention layer, its ``out_proj`` too)."""
    listed = getattr(module, "cx_matched_parameters", None)
    return listed() if listed is not None else _own_params(module)


def _is_matched(module) -> bool:
    return isinstance(module, CLayerMixin) and not rule_named(module.rule).bypass \
        and _trained(module) and not transformed_after_conversion(module)


REPARAMETRIZED = ("its weight or bias was reparametrized after conversion (a parametrization, "
                  "nn.utils.weight_norm / spectral_norm, nn.utils.prune): the C-layer matches the "
                  "transformed weight and its parameters get that gradient pulled back through "
                  "the transformation, neither the ordinary nor the matched one; "
                  "consequentialize(model) again leaves it plain")


def transformed_after_conversion(module) -> bool:
    """Whether ``module`` is a C-layer whose weight (or a bias it matches jointly) is no
    parameter of its own any more but recomputed before each forward (a parametrization's property, a weight_norm / prune hook's
    attribute): reparametrized after ``consequentialize`` converted it. Computes nothing."""
    if not isinstance(module, CLayerMixin):
        return False
    kind = getattr(module, "_cx_kind", None)
    return any(n not in m._parameters and (n in m.__dict__ or isinstance(
        getattr(type(m), n, None), property) or set_before_forward(m))
        for m, n in matched_weights(module, kind)) \
        or recomputed_bias_name(module, kind) is not None


def _trained(module) -> bool:
    """Whether any parameter the layer matches requires a gradient (a frozen layer gets none
    to match)."""
    return any(p.requires_grad for p in _matched_params(module))


def _registered_base(module_type):
    for base in module_type.__mro__[1:]:
        if kind_of(base) is not None:
            return base
    return None


def _derived_reason(name, kind, module):
    """Why ``module``, whose weight or bias ``name`` (``registry.derived_tensor``) is
    recomputed, stays plain."""
    recurrent = set_before_forward(module)
    if name in (kind.weight, "out_proj.weight", *ATTENTION_WEIGHTS) \
            or (recurrent and name.startswith("weight_")):      # weight_hh_l0, weight_ih
        how = "nn.utils.weight_norm / spectral_norm" + (
            ", AWD-LSTM's WeightDrop" if recurrent else "")
        return (f"its {name} is no parameter but recomputed from others before each "
                f"forward ({how}): the layer uses the transformed weight")
    return (f"its {name} is no parameter but recomputed from others before each forward "
            f"(nn.utils.prune, a parametrization): the bias is a weight on a constant-1 row "
            f"of X, so the layer would match the transformed bias on the wrong row")


def plain_reason(module, parent=None) -> tuple[str, bool]:
    """(why ``module`` is left plain, whether the user chose so)."""
    user = getattr(module, USER_REASON, None)
    if user:
        return user, True
    refused_rule = module.__dict__.get(RULE_REFUSED)
    if refused_rule is not None:
        return (f"rule {refused_rule!r} has no form for a {type(module).__name__}: it changes "
                f"the signal to the layer below, which this layer sends through time inside "
                f"its op (it is matched under 'consequential')"), False
    if transformed_after_conversion(module):
        return REPARAMETRIZED, False
    if isinstance(module, CLayerMixin) and not _trained(module):
        return "frozen: none of its parameters requires a gradient", True
    # A matched rule left plain only for its parent's use of the weight (a C-layer the user
    # converted on its own) has the parent's reason below, not its rule's.
    if isinstance(module, CLayerMixin) and (parent is None or rule_named(module.rule).bypass):
        return f"rule {module.rule!r} (the ordinary gradient)", True
    # The parent's own choice explains the child only where the parent would match it (an
    # attention's out_proj); a container that merely was not selected by ``include`` does not.
    if parent is not None and (isinstance(parent, CLayerMixin) or (
            getattr(parent, USER_REASON, None) and isinstance(parent, WEIGHT_USERS))):
        reason, chosen = plain_reason(parent)
        return f"its parent {type(parent).__name__} is plain: {reason}", chosen
    if parent is not None:
        return (f"its weight is used directly by its parent {type(parent).__name__}, not "
                f"only through its own forward (all a C-layer matches)"), False
    if isinstance(module, parametrize.ParametrizationList):
        return ("the parametrization of a weight (weight norm, spectral norm): the layer uses "
                "the transformed weight, not this parameter"), False
    kind = kind_of(type(module))
    derived = None if kind is None else derived_tensor(module, kind)
    if derived is not None:
        return _derived_reason(derived, kind, module), False
    unsupported = None if kind is None else kind.c_type.cx_unsupported(module)
    if unsupported is not None:
        return unsupported, False
    # A refused kind the user registered with a C-class of its own (register_layer's c_type)
    # is converted like any other: not refused.
    registered = kind is not None or _registered_base(type(module)) is not None
    refused = None if registered else next(
        (r for t, r in UNSUPPORTED.items() if isinstance(module, t)), None)
    if refused is not None:
        return refused, False
    if kind is not None:
        return (f"a {type(module).__name__} not converted (yet): consequentialize converts "
                f"this kind"), False
    base = _registered_base(type(module))
    if base is not None:
        kind, why_not = subclass_kind(module)
        derived = None if kind is None else derived_tensor(module, kind)
        if derived is not None:
            return _derived_reason(derived, kind, module), False     # a parametrized bias
        if kind is not None:
            call = getattr(kind.c_type, "_cx_call", None)
            how = f"matches its F.{call.__name__} call" if call else \
                f"converts it as {base.__name__}"
            return f"a subclass of {base.__name__} not converted yet (consequentialize " \
                   f"{how})", False
        if why_not:
            return f"a subclass of {base.__name__}: {why_not}", False
        c_type = kind_of(base).c_type
        hint = (f"if its forward is {base.__name__}'s with extra steps, make a class of "
                f"it and cx.{c_type.__name__}, in that order (its forward first), and pass "
                f"both to cx.register_layer"
                if c_type is not None and issubclass(c_type, CLayerMixin) else
                "register it with cx.register_layer if it is linear-like")
        return f"a subclass of {base.__name__} with its own forward: {hint}", False
    # Name the parameters: a model's own (ViT's pos_embed, cls_token) are often no weight
    # matrix at all, and the user should see which ones the report means.
    names = [n for n, p in module._parameters.items() if p is not None and p.dim() >= 2]
    return (f"unknown layer type ({type(module).__name__}) holding {', '.join(names)}, used "
            f"by its own code: a model's tensors (ViT's pos_embed, a bias table) stay plain; a "
            f"linear-like layer can be taught with cx.register_layer"), False


def matched_parameters(model: nn.Module, users=None) -> dict[int, str]:
    """id(parameter) → the name of the matched layer that matches it (the last one, for a
    parameter tied between two); ``users``: ``weight_users(model)`` if already known."""
    users = weight_users(model) if users is None else users
    return {id(p): name for name, module in model.named_modules()
            if _is_matched(module) and id(module) not in users
            for p in _matched_params(module)}


def weight_users(model: nn.Module) -> dict[int, nn.Module]:
    """id(child) → the parent that uses the child's weight directly, not only by calling it:
    ``WEIGHT_USERS``, and any other parent whose ``forward`` computes with
    ``self.<child>.weight`` (``weight_reads``): the child's forward never runs, so a C-layer
    there would silently get the ordinary gradient."""
    users = {}
    for parent in model.modules():
        if isinstance(parent, WEIGHT_USERS):
            users.update((id(child), parent) for child in parent.modules() if child is not parent)
            continue
        for path in weights_used_in_forward(type(parent)):
            child = _submodule(parent, path)
            if child is not None and child is not parent:
                users.setdefault(id(child), parent)
    return users


def _submodule(parent, path):
    """The submodule at ``path`` (``layers.-1``: negative indices of a ModuleList or
    Sequential too), or None."""
    module = parent
    for part in path.split("."):
        child = module._modules.get(part)
        if child is None and isinstance(module, (nn.ModuleList, nn.Sequential)) \
                and part.lstrip("-").isdigit() and -len(module) <= int(part) < len(module):
            child = module[int(part)]
        if child is None:
            return None
        module = child
    return module


def check_model(model, caller: str):
    """TypeError unless ``model`` is an nn.Module; ValueError naming its lazy layers
    (nn.LazyLinear, ...) whose parameters have no shape yet: a layer's kind and weight are
    only known after the first forward, so nothing is looked at, or changed, before it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    lazy = [f"{name or '(the model)'} ({type(m).__name__})" for name, m in model.named_modules()
            if any(is_lazy(p) for p in m.parameters(recurse=False))]
    if lazy:
        raise ValueError(f"{caller}: uninitialised lazy layers {', '.join(lazy)}; run one "
                         f"forward pass first (it gives them their shapes)")


def coverage(model: nn.Module) -> Coverage:
    """Which layers of ``model`` get matched gradients, which are left plain and why, and the
    matched share of all parameters. Raises TypeError if ``model`` is not an nn.Module,
    ValueError if it holds uninitialised lazy layers."""
    check_model(model, "coverage")
    users = weight_users(model)
    matched = [name for name, module in model.named_modules()
               if _is_matched(module) and id(module) not in users]
    matched_by = matched_parameters(model, users)
    # A parametrization's list → the layer it belongs to (a C-layer reparametrized after
    # conversion gives its parameters neither gradient the list's own reason says).
    owner_of = {id(p): m for m in model.modules() if parametrize.is_parametrized(m)
                for p in m.parametrizations.values()}
    plain = []
    for name, module in model.named_modules():
        own = _own_params(module)
        if name in matched or not any(p.dim() >= 2 for p in own):
            continue
        owners = {matched_by.get(id(p)) for p in own}
        if all(o is not None and name.startswith(o + ".") for o in owners):
            continue                                # matched by the layer above it (attention)
        reason, chosen = plain_reason(module, users.get(id(module)))
        if transformed_after_conversion(owner_of.get(id(module))):
            reason, chosen = REPARAMETRIZED, False
        shared = sorted({matched_by[id(p)] for p in own if id(p) in matched_by})
        if shared:  # tied weights: autograd sums this layer's ordinary gradient and the match
            reason += f"; shares a parameter with matched {', '.join(shared)}"
        plain.append(PlainLayer(name, type(module).__name__, reason,
                                sum(p.numel() for p in own), chosen))
    unique = {id(p): p for p in model.parameters()}
    return Coverage(tuple(matched), tuple(plain),
                    sum(p.numel() for i, p in unique.items() if i in matched_by),
                    sum(p.numel() for p in unique.values()))

