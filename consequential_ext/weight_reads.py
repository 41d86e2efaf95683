"""Which children's weights a module's own ``forward`` computes with, read from its source.

torchvision's Swin hands ``self.qkv.weight`` to ``F.linear`` itself, and timm's BEiT/EVA do
when they have q/v biases: the child's forward never runs, so as a C-layer it would silently
get the ordinary gradient. ``coverage.weight_users`` leaves such children plain.

What counts is any read of a child's weight's values — ``self.<path>.weight``, through
``self.blocks[-1]``, ``self.heads["a"]``, ``getattr(self.fc, "weight")`` or a local alias
``fc = self.fc`` — in ``forward`` or in a method of the module that ``forward`` calls
(``self._proj(x)``): passed to a call, an operand, put in a list, assigned, chunked. Metadata
does not count (``w.shape``, ``w.dtype``, ``w.size()``, ``isinstance(w, …)``, ``x.to(w)``,
``x.type_as(w)``, ``w is None``, a condition), nor do comments. Out of its sight: a weight
reached through a module passed to ``forward``, ``super().forward``, loops over a ModuleList,
a child handed to a helper function — ``graph_check`` names those on the first forward. A
forward that calls the child in one branch and uses its weight in another counts: the child
then stays plain, named in the warning — never silently matched.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap

__all__ = ["weights_used_in_forward"]

# What reads a tensor's metadata, not its values: attributes, methods, calls taking it.
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim", "requires_grad", "layout", "is_leaf",
                   "is_cuda", "is_sparse", "is_quantized", "is_meta", "names"}
_METADATA_METHODS = {"size", "dim", "numel", "nelement", "element_size", "is_floating_point",
                     "is_complex", "is_contiguous", "stride", "data_ptr", "get_device",
                     "new_empty", "new_zeros", "new_ones", "new_full", "new_tensor"}
_METADATA_CALLS = {"isinstance", "getattr", "hasattr", "type", "len", "id", "print", "repr",
                   "str"}
_METADATA_ARGUMENT_OF = {"to", "type_as", "view_as", "expand_as", "reshape_as", "new_empty",
                         "new_zeros", "new_ones", "new_full", "new_tensor"}


@functools.lru_cache(maxsize=None)
def weights_used_in_forward(module_type: type) -> tuple[str, ...]:
    """The submodule paths (``blocks.0.fc``, ``layers.-1``) whose ``weight`` the ``forward``
    of ``module_type`` computes with. torch.nn's own forwards are skipped: they read child
    weights only on no-grad inference fast paths (nn.TransformerEncoderLayer), and
    MultiheadAttention is handled on its own (``coverage.WEIGHT_USERS``)."""
    paths, seen, pending = set(), set(), ["forward"]
    while pending:
        name = pending.pop()
        seen.add(name)
        tree = _method_tree(module_type, name)
        if tree is None:
            continue
        found, called = _scan(tree)
        paths |= found
        pending += [m for m in called - seen if callable(getattr(module_type, m, None))]
    return tuple(sorted(paths))


def _method_tree(module_type, name):
    """The parsed source of method ``name`` as ``module_type`` resolves it; None where it
    comes from torch.nn or has no source (built in C, made at run time)."""
    owner = next((c for c in module_type.__mro__ if name in vars(c)), None)
    if owner is None or owner.__module__.startswith("torch."):
        return None
    try:
        return ast.parse(textwrap.dedent(inspect.getsource(getattr(owner, name))))
    except (OSError, TypeError, SyntaxError):
        return None


def _scan(tree):
    """(paths of weights computed with, names of ``self.<name>(…)`` calls) in one method."""
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    aliases = {}
    for node in ast.walk(tree):      # fc = self.fc
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            path = _self_path(node.value, {})
            if path:
                aliases[node.targets[0].id] = path
    paths, called = set(), set()
    for node in ast.walk(tree):
        owner = None
        if isinstance(node, ast.Attribute) and node.attr == "weight":
            owner = node.value
        elif _getattr_weight(node):
            owner = node.args[0]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "self":
            called.add(node.func.attr)
        path = _self_path(owner, aliases) if owner is not None else None
        if path and _computes_with(node, parents):
            paths.add(path)
    return paths, called


def _getattr_weight(node) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "getattr" and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant) and node.args[1].value == "weight")


def _self_path(node, aliases) -> str | None:
    """``self.a.b[-1]["h"]`` → ``a.b.-1.h`` (an alias of such a path too); None for anything
    not rooted at ``self``."""
    parts = []
    while True:
        if isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        elif isinstance(node, ast.Subscript) and _index(node.slice) is not None:
            parts.append(_index(node.slice))
            node = node.value
        elif isinstance(node, ast.Name) and node.id == "self" and parts:
            return ".".join(reversed(parts))
        elif isinstance(node, ast.Name) and node.id in aliases:
            return ".".join([aliases[node.id], *reversed(parts)])
        else:
            return None


def _index(node) -> str | None:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        inner = _index(node.operand)
        return None if inner is None or not inner.isdigit() else f"-{inner}"
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, str)) \
            and not isinstance(node.value, bool):
        return str(node.value)
    return None


def _computes_with(node, parents) -> bool:
    """Whether the weight expression ``node`` is read for its values: anything but metadata
    (an attribute or method of it like ``.shape``, an argument of ``isinstance`` or
    ``x.to``, a comparison, a condition). Conservative on purpose: a value read the analysis
    cannot follow (a list, a local, ``.chunk``) counts, and leaves the child plain, named."""
    parent = parents.get(node)
    if isinstance(parent, ast.Attribute):
        if parent.attr in _METADATA_ATTRS:
            return False
        if parent.attr == "data":            # w.data.dtype: look at what the .data is for
            return _computes_with(parent, parents)
        call = parents.get(parent)
        return not (parent.attr in _METADATA_METHODS and isinstance(call, ast.Call)
                    and call.func is parent)
    if isinstance(parent, ast.keyword):
        node, parent = parent, parents.get(parent)
    if isinstance(parent, ast.Call) and parent.func is not node:
        return not _metadata_call(parent.func)
    if isinstance(parent, (ast.Compare, ast.BoolOp)):
        return False
    if isinstance(parent, (ast.If, ast.While, ast.IfExp, ast.Assert)) and parent.test is node:
        return False
    return True


def _metadata_call(func) -> bool:
    if isinstance(func, ast.Name):
        return func.id in _METADATA_CALLS
    return isinstance(func, ast.Attribute) and func.attr in _METADATA_ARGUMENT_OF
