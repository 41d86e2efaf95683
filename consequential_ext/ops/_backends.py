"""Which backend runs an op on a given tensor: cuda → triton → cpu → reference."""
from __future__ import annotations

import functools
import importlib.util

import torch

_COMPILED = {"cuda": "CUDA", "cpu": "CPU"}


@functools.cache
def _compiled_has(op: str, dispatch_key: str) -> bool:
    try:
        import consequential_ext._C  # noqa: F401  (registers the operators)
    except ImportError:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"consequential_ext::{op}", dispatch_key)


@functools.cache
def _triton_has(op: str) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    from . import triton as triton_ops
    return hasattr(triton_ops, op)


# Evaluated at trace time under torch.compile (the result is a constant of the graph): which
# kernels are registered does not change while a graph runs, and dynamo cannot trace the
# dispatcher query.
@torch.compiler.assume_constant_result
def available_backends(op: str, device: torch.device | str) -> list[str]:
    """Backends able to run ``op`` on tensors of ``device``, in dispatch order."""
    device = torch.device(device)
    names = []
    if device.type == "cuda":
        if _compiled_has(op, "CUDA"):
            names.append("cuda")
        if _triton_has(op):
            names.append("triton")
    elif device.type == "cpu" and _compiled_has(op, "CPU"):
        names.append("cpu")
    return names + ["reference"]


def backend_for(op: str, tensor: torch.Tensor, forced: str | None) -> str:
    names = available_backends(op, tensor.device)
    if forced is None:
        return names[0]
    if forced not in names:
        raise RuntimeError(f"backend {forced!r} cannot run {op} on {tensor.device} "
                           f"(available: {names})")
    return forced
