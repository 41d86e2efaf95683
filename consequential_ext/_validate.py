"""Argument checks shared by the functional API, the modules and the converter."""
from __future__ import annotations

import math

# Rules a C-layer understands; see DESIGN.md §2. Extended as rules are implemented.
RULES = ("consequential", "backmatch", "backmatch-layerwise", "sgd")
DEFAULT_RULE = "consequential"
# Relative to the per-sample second moment A = X Xᵀ / N; chosen on digits (README, "ridge").
DEFAULT_RIDGE = 1e-3


def check_rule(rule):
    if rule not in RULES:
        raise ValueError(f"rule must be one of {', '.join(map(repr, RULES))}; got {rule!r}")
    return rule


def check_ridge(ridge):
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) \
            or not math.isfinite(ridge) or ridge <= 0:
        raise ValueError(f"ridge must be a finite float > 0; got {ridge!r}")
    return float(ridge)


class RuleAttribute:
    """Mixin: ``rule`` as a module attribute validated on every assignment."""

    @property
    def rule(self):
        return self._cx_rule

    @rule.setter
    def rule(self, value):
        self._cx_rule = check_rule(value)
