"""Argument checks and the validated attributes shared by the functional API, the modules,
the converter and the amortizer. Imports only the rule table and the ops' reference, which
import nothing above them: everything may use this module."""
from __future__ import annotations

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


def check_rule(rule):
    rule_named(rule)  # ValueError naming the argument and the known rules
    return rule


class RuleAttribute:
    """Mixin: ``rule`` as a module attribute validated on every assignment."""

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

    def _cx_repr(self):
        return f"rule={self.rule!r}, ridge={self.ridge:g}"
