"""Routing a module's functional calls to C-layer entry points during its forward.

Some layers do not expose their weighted computation as a child's forward: a subclass of
nn.Conv2d pads its input itself and then calls ``F.conv2d`` with its own weight (timm's
Conv2dSame), and nn.MultiheadAttention hands its projection weights to
``F.multi_head_attention_forward``. Their C-classes run the layer's own forward inside a
``FunctionalRoute`` — a ``TorchFunctionMode`` that sends chosen functional calls to a C-layer
entry point — so the forward stays the layer's own code, and the matched gradient is computed
on the input actually passed to the call (docs/design.md §2, §5).

A mode sees the outermost call only: inside a Python-level torch function (one that checks
``has_torch_function``, as ``F.multi_head_attention_forward`` does) the mode is suspended, so
a route replaces such a function whole rather than the calls inside it.
"""
from __future__ import annotations

import copy

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["FunctionalRoute", "passes_own_weight"]

# What a route returns to let the call run unchanged.
PASS = NotImplemented


class FunctionalRoute(TorchFunctionMode):
    """While active, a call of a function in ``routes`` (function → route) goes to its route,
    which returns the result, or ``PASS`` to run the call unchanged."""

    def __init__(self, routes):
        super().__init__()
        self.routes = routes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = self.routes.get(func)
        if route is not None:
            out = route(*args, **kwargs)
            if out is not PASS:
                return out
        return func(*args, **kwargs)


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``module`` with every parameter and buffer on the meta device (no data)."""
    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, t.requires_grad) \
            if isinstance(t, torch.nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def passes_own_weight(module: torch.nn.Module, func, probe_shape,
                      probe_dtype=None) -> str | None:
    """None if ``module.forward``, run on an input of ``probe_shape`` (``probe_dtype``, else
    the weight's), calls ``func`` with its own ``weight`` parameter as the second argument;
    otherwise why not.

    ``probe_shape`` may be a list of shapes, tried in turn while the forward fails on them
    (the first it runs on decides); a ``torch.Size`` in it is passed as it is, for a forward
    that takes a shape (the learned positions of Hugging Face's LED and Blenderbot).

    The probe runs on a copy of the module on the meta device: no computation, and no side
    effect on the module (its buffers, its hooks' state).
    """
    weight = module._parameters.get("weight")
    if weight is None:
        return "its weight is not a parameter of its own (a parametrization computes it)"
    shapes = probe_shape if isinstance(probe_shape, list) else [probe_shape]
    first_error = None
    for shape in shapes:
        seen = []
        try:
            probe = _meta_copy(module)

            def record(input, weight, *args, **kwargs):
                seen.append(weight is probe._parameters["weight"])
                return PASS
            x = shape if type(shape) is torch.Size else torch.zeros(
                shape, device="meta", dtype=probe_dtype or weight.dtype)
            with torch.no_grad(), FunctionalRoute({func: record}):
                probe.forward(x)
        except Exception as error:  # noqa: BLE001  (any failure: the layer stays plain, saying why)
            first_error = first_error or error
            continue
        if not any(seen):
            return (f"its forward does not pass its own weight to F.{func.__name__} (it "
                    f"transforms or indexes the weight first, or calls something else)")
        return None
    # The first line: an overload error of torch lists every signature on the lines below.
    message = (str(first_error).strip().splitlines() or [type(first_error).__name__])[0]
    others = "".join(f" (and on {tuple(s) if type(s) is not torch.Size else s})"
                     for s in shapes[1:])
    return (f"its forward failed on a probe input of shape {tuple(shapes[0])}{others}: "
            f"{message}")
