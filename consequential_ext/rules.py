"""The rule table: what each rule does with a layer's backward, one object per rule.

A rule decides two things (docs/design.md §2): the gradient a layer's weight and bias get,
and the signal the layer sends to its input. It decides them by composing the primitives
every layer kind offers in backward (``gradients.py``):

* ``input_grad()``               the ordinary backprop signal to the input
* ``matched_input_signal()``     paper 2's matched signal (eqs. 12, 22, 26)
* ``layerwise_input_signal()``   BP's signal over Algorithm 1's factor δa/δ'a (eqs. 34–36)
* ``matched_weight_grads()``     ``G (A + λI)⁻¹`` for weight and bias (paper 1 eq. 63)
* ``layerwise_weight_grads()``   ``δW / m_b / s`` (paper 2 eq. 33)
* ``plain_weight_grads()``       the ordinary weight and bias gradients

so a layer kind's autograd.Function holds no rule branches, and a new rule is one new class
and one entry in ``RULE_TABLE``. Batch norms (``norm.py``) have no matched weight, so only
the input side of a rule applies to them.
"""
from __future__ import annotations

from . import layerwise

__all__ = ["Rule", "RULE_TABLE", "rule_named"]


class Rule:
    """A rule's interface; the defaults are paper 1's consequentialism."""

    name: str = ""
    # C-layers skip their autograd.Function: nn's own gradients, bit for bit.
    bypass: bool = False
    # Batch norms swap their backward under this rule (otherwise they are nn's).
    changes_batchnorm: bool = False

    def input_signal(self, layer):
        """The signal ``layer`` sends to its input (before any cropping of padding)."""
        return layer.input_grad()

    def weight_grads(self, layer):
        """(grad_weight, grad_bias) of ``layer``, in the parameter dtype (None where not
        needed)."""
        return layer.matched_weight_grads()

    def batchnorm_forward_state(self, input):
        """What a batch norm must record in forward for this rule's backward (or None)."""
        return None

    def __repr__(self):
        return f"<rule {self.name!r}>"


class Consequential(Rule):
    """Paper 1: matched weight gradient, ordinary input signal."""
    name = "consequential"


class BackMatch(Rule):
    """Paper 2 §2, exact: matched weight gradient (eqs. 13, 23) and matched input signal
    (eqs. 12, 22, 26)."""
    name = "backmatch"
    changes_batchnorm = True

    def input_signal(self, layer):
        return layer.matched_input_signal()


class BackMatchLayerwise(Rule):
    """Paper 2 Algorithm 1: no solve; the backward factor rides inside the signal
    (``layerwise.py``)."""
    name = "backmatch-layerwise"
    changes_batchnorm = True

    def input_signal(self, layer):
        return layer.layerwise_input_signal()

    def weight_grads(self, layer):
        return layer.layerwise_weight_grads()

    def batchnorm_forward_state(self, input):
        # Eq. 36 needs ‖W‖²_{2,µ} of the C-layer feeding the norm, found in the graph now.
        producer = layerwise.producer_weight(input)
        return None if producer is None else layerwise.row_mean_sq(producer)


class PlainSGD(Rule):
    """The ordinary gradient (same module, for A/B comparisons)."""
    name = "sgd"
    bypass = True

    def weight_grads(self, layer):
        return layer.plain_weight_grads()


RULE_TABLE: dict[str, Rule] = {rule.name: rule for rule in
                               (Consequential(), BackMatch(), BackMatchLayerwise(), PlainSGD())}


def rule_named(name: str) -> Rule:
    """The rule object for ``name``; ValueError naming the argument otherwise."""
    try:
        return RULE_TABLE[name]
    except (KeyError, TypeError):
        raise ValueError(f"rule must be one of {', '.join(map(repr, RULE_TABLE))}; "
                         f"got {name!r}") from None
