"""Argument checks and the validated attributes shared by the functional API, the modules,
the converter and the amortizer. Imports only the rule table and the ops' reference, which
import nothing above them: everything may use this module."""
from __future__ import annotations

import functools
import math

import torch

from .ops.reference import check_ridge  # noqa: F401  (one check, shared with the ops)
from .rules import RULE_TABLE, rule_named

# Rules a C-layer understands (docs/design.md §2); ``rules.py`` holds one entry per name.
RULES = tuple(RULE_TABLE)
DEFAULT_RULE = "consequential"
# Relative to the per-sample second moment A = X Xᵀ / N; chosen on digits (README, "ridge").
DEFAULT_RIDGE = 1e-3
# Set by consequentialize on modules the user chose to leave plain (exclude / include).
USER_REASON = "_cx_plain_reason"
EXCLUDED = "excluded by the user"
# Set by consequentialize on a layer left plain because its kind has no form under the rule
# asked for (``CLayerMixin.cx_takes_rule``): the rule's name.
RULE_REFUSED = "_cx_rule_refused"


def trains(bias) -> bool:
    """Whether ``bias`` (a tensor or None) trains, i.e. requires grad: only then is it a
    weight on a constant-1 row of X, matched jointly with W (docs/design.md §2); a frozen
    bias is a constant, as if the layer had none."""
    return bias is not None and bias.requires_grad


def gram_bias_row(weight, bias) -> bool:
    """Whether an amortised layer's Gram gets the bias row: while the weight trains, whether
    the bias does; a layer whose weight is frozen uses no amortizer, so it is sized for when
    it is unfrozen whole (``requires_grad_(True)``, a backbone after a frozen warm-up)."""
    return trains(bias) or (bias is not None and not weight.requires_grad)


# The shape of an amortised layer's Gram, one place for the functional entries' amortizer
# checks and the modules' ``cx_gram_shape``.
def linear_gram_shape(weight, bias):
    """A linear layer's (D, D), ``weight`` as (out, in)."""
    d = weight.shape[1] + gram_bias_row(weight, bias)
    return (d, d)


def conv_gram_shape(weight, bias, groups):
    """A conv's (groups, D, D): not weight[0].numel(), as a conv may have 0 outputs."""
    d = math.prod(weight.shape[1:]) + gram_bias_row(weight, bias)
    return (groups, d, d)


def transpose_gram_shape(weight, bias, groups):
    """A transposed conv's (groups, C_in/g, C_in/g): its bias is matched apart, no row."""
    channels = weight.shape[0] // groups
    return (groups, channels, channels)


def check_rule(rule):
    rule_named(rule)  # ValueError naming the argument and the known rules
    return rule


def fx_leaf(forward):
    """Decorate a C-layer's ``forward``: under ``torch.fx`` symbolic tracing (a Proxy among the
    arguments) the call is recorded as one ``call_module`` node, whatever the tracer's
    ``is_leaf_module`` says — the layer's backward is an autograd.Function, which traced ops
    would drop — so the traced GraphModule runs the layer itself and keeps its gradient."""
    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        proxy = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.fx.Proxy)),
                     None)
        if proxy is None:
            return forward(self, *args, **kwargs)
        tracer = proxy.tracer
        try:
            path = tracer.path_of_module(self)
        except NameError:
            path = ""
        if not path:   # the traced root itself: a leaf of itself would call itself
            raise TypeError(f"torch.fx cannot trace {type(self).__name__} itself: its matched "
                            f"backward is an autograd.Function, not traced ops; trace a model "
                            f"that contains it (C-layers are kept as call_module leaves)")
        if _has_forward_hooks(self):
            # Module.__call__ has run the layer's forward (pre-)hooks on the proxies already:
            # they are in the graph. A call_module node would run them again; call the bare
            # forward of the layer instead.
            layer = tracer.create_proxy("get_attr", path, (), {})
            return tracer.create_proxy("call_method", "forward", (layer, *args), kwargs)
        return tracer.create_proxy("call_module", path, args, kwargs)
    wrapper._cx_fx_leaf = True
    return wrapper


def _has_forward_hooks(module):
    from torch.nn.modules import module as nn_module
    return bool(module._forward_hooks or module._forward_pre_hooks
                or nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


class RuleAttribute:
    """Mixin: ``rule`` as a module attribute validated on every assignment."""

    def __init_subclass__(cls, **kwargs):
        # Every forward a subclass defines — each C-layer's and back-matching norm's, and a
        # user's class of one — is made a torch.fx leaf (``fx_leaf``): the outermost forward
        # is then the leaf, and a user subclass's own steps are not traced into the graph
        # and run again by the leaf (which calls them).
        super().__init_subclass__(**kwargs)
        # The forward the class resolves, not only one it defines: ``class C(Sub, cx.CLSTM)``
        # (register_layer's form for a subclass with its own forward) runs Sub's forward,
        # which no C-class wraps; unwrapped, torch.fx would trace Sub's steps into the graph
        # and the leaf below (reached through super()) would run them a second time.
        forward = getattr(cls, "forward", None)
        if forward is not None and not getattr(forward, "_cx_fx_leaf", False):
            cls.forward = fx_leaf(forward)

    # What a scripting user should do instead (a recurrent layer cannot be jit-traced while
    # it trains).
    _cx_script_advice = "use torch.jit.trace or torch.compile"

    def __prepare_scriptable__(self):
        raise NotImplementedError(
            f"torch.jit.script cannot compile {type(self).__name__}: its backward is a Python "
            f"autograd.Function (README, 'Not supported'); {self._cx_script_advice}")

    @property
    def rule(self):
        return self._cx_rule

    @rule.setter
    def rule(self, value):
        self._cx_rule = check_rule(value)


class CLayerMixin(RuleAttribute):
    """What every C-layer has: ``rule`` and ``ridge`` as validated attributes (checked on
    every assignment), and the shape of its Gram (``cx_gram_shape``) for ``amortize``."""

    @property
    def ridge(self):
        return self._cx_ridge

    @ridge.setter
    def ridge(self, value):
        self._cx_ridge = check_ridge(value)

    def cx_gram_shape(self) -> tuple[int, ...] | None:
        """(D, D), or (groups, D, D): the shape of the Gram this layer solves with; None for a
        layer without one Gram to amortize (``amortize`` leaves it exact)."""
        raise NotImplementedError

    def cx_weight(self):
        """The weight this layer matches (its dtype and device are the Gram's)."""
        return self.weight

    def cx_grams(self) -> dict:
        """``{name: (Gram shape, weight)}`` of a layer that solves with several Grams, each
        amortised on its own (a recurrent layer: one per weight; ``amortize`` gives it an
        ``nn.ModuleDict`` of amortizers under these names); ``{}`` for a layer with one Gram
        (``cx_gram_shape``) or none."""
        return {}

    @classmethod
    def cx_takes_rule(cls, rule) -> bool:
        """Whether this kind has a form under ``rule`` (``consequentialize`` leaves a layer of
        a kind without one plain, and names it)."""
        return True

    @classmethod
    def cx_unsupported(cls, module) -> str | None:
        """Why ``module``, of a type this class converts, cannot be converted as configured
        (it stays plain with this reason), or None."""
        return None

    def _cx_repr(self):
        return f"rule={self.rule!r}, ridge={self.ridge:g}"
