"""A one-time check, on a converted model's first forward, that every matched parameter
reaches the output only through its C-layer.

``weight_reads`` finds a parent's direct use of a child's weight in the parent's source, but
source analysis misses uses it cannot follow (``super().forward``, a loop over a ModuleList,
the child handed to a helper function). The autograd graph of one forward shows them all: a
parameter whose gradient would also arrive through another op (an ``F.linear`` of the
parent's own) gets the ordinary gradient there. ``consequentialize`` hooks this check onto
the model's first forward under grad; it warns, names the layers, and removes itself.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.nn as nn

from .coverage import coverage, matched_parameters

__all__ = ["install", "direct_uses"]

# Nodes that only view or cast a parameter on its way into a C-layer's Function (HF Conv1D's
# transposed weight, attention's packed in-projection split into q/k/v).
_VIEWS = {"TBackward0", "TransposeBackward0", "PermuteBackward0", "ViewBackward0",
          "UnsafeViewBackward0", "ReshapeAliasBackward0", "SplitBackward0",
          "SplitWithSizesBackward0", "UnsafeSplitBackward0", "SliceBackward0", "SelectBackward0",
          "UnbindBackward0", "AliasBackward0", "ExpandBackward0", "ToCopyBackward0",
          "CloneBackward0", "NarrowBackward0", "SqueezeBackward0", "SqueezeBackward1",
          "UnsqueezeBackward0"}


def install(model: nn.Module) -> None:
    """Check ``model``'s next forward under grad (once; again after a reconversion) — unless
    every module in it runs only torch's and this library's code: torch's forwards use their
    children's weights through the children (fast paths aside, which run without grad), and a
    hook would switch nn.TransformerEncoderLayer's inference fast path off. A converted
    subclass runs its own forward (a bias added after the routed ``F.linear``, say): checked."""
    remove(model)
    if any(_runs_user_code(m) for m in model.modules()):
        model.register_forward_hook(_check_on_first_forward)


def _runs_user_code(module: nn.Module) -> bool:
    """Whether a class ``module`` derives from is defined outside torch and this library."""
    return any(cls.__module__.split(".")[0] not in ("torch", "consequential_ext", "builtins")
               for cls in type(module).__mro__)


def remove(model: nn.Module) -> None:
    for key, hook in list(model._forward_hooks.items()):
        if hook is _check_on_first_forward:
            del model._forward_hooks[key]


def _check_on_first_forward(model, args, output):
    if torch.compiler.is_compiling():
        return
    roots = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
    if not roots:
        return                         # no graph (no_grad, eval without grad): next time
    remove(model)
    used = direct_uses(model, roots)
    if used:
        warnings.warn("consequential_ext: these matched layers' parameters are also used "
                      "outside their layer's forward, and the gradient through those uses is "
                      "the ordinary one (found in the first forward's autograd graph): "
                      + "; ".join(f"{name} ({', '.join(sorted(ops))})"
                                  for name, ops in used.items())
                      + ". Where that use is the layer's own computation (a parent applying "
                        "the weight itself), leave the layer plain: "
                        "consequentialize(..., exclude=[...]); a penalty on the weights adds "
                        "its ordinary gradient as intended.",
                      UserWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The warnings stacklevel of the first frame outside torch and this package: the
    user's ``model(x)``, not the hook's caller in torch's module.py."""
    frame, level = sys._getframe(1), 1
    while frame is not None and any(part in frame.f_code.co_filename
                                    for part in (_TORCH_DIR, _PACKAGE_DIR)):
        frame, level = frame.f_back, level + 1
    return level


_TORCH_DIR = os.path.dirname(torch.__file__)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def direct_uses(model: nn.Module, roots) -> dict[str, set[str]]:
    """Matched layer name → the graph ops, other than its C-layer's Function (through views),
    that consume one of its matched parameters in the graph behind ``roots``."""
    owners = matched_parameters(model)            # id(parameter) → its matched layer's name
    if not owners:
        return {}
    # A weight tied to a layer left plain (an embedding whose head is matched) gets that
    # layer's ordinary gradient too, by design (docs/design.md §2); coverage names the layer.
    plain = {p.name for p in coverage(model).plain}
    for name, module in model.named_modules():
        if name in plain:
            for p in module._parameters.values():
                owners.pop(id(p), None)
    consumers, seen, stack = {}, set(), list(roots)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for child, _ in node.next_functions:
            if child is None:
                continue
            consumers.setdefault(child, []).append(node)
            stack.append(child)
    used = {}
    for node, users in consumers.items():
        param = getattr(node, "variable", None)
        if param is None or id(param) not in owners:
            continue
        for op in _foreign(users, consumers):
            used.setdefault(owners[id(param)], set()).add(op)
    return used


def _foreign(users, consumers):
    """Names of the ops among ``users`` (through views) that are no C-layer's Function."""
    out, stack, seen = set(), list(users), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        cls = getattr(node, "_forward_cls", None)
        if getattr(cls, "cx_saved_weight_index", None) is not None \
                or getattr(cls, "cx_matches_weights", False):   # recurrent.py's
            continue
        name = type(node).__name__
        if name in _VIEWS:
            stack.extend(consumers.get(node, ()))
        else:
            out.add(name)
    return out


def _tensors(output):
    if isinstance(output, torch.Tensor):
        return [output]
    leaves, _ = torch.utils._pytree.tree_flatten(output)
    found = [t for t in leaves if isinstance(t, torch.Tensor)]
    if not found and isinstance(output, dict):      # a dict subclass pytree does not know
        found = [t for v in output.values() for t in _tensors(v)]
    return found
