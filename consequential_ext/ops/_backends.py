"""Which backend runs an op on a given tensor: cuda → triton → cpu → reference, except the
GPU Gram of 16-bit (or tf32-allowed float32) input, which goes to Triton first."""
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


# Triton's Gram (tensor cores) beat our CUDA kernels (no tensor cores) on 6 of the 7 conv
# shapes an H200 timed, by up to 20× over the better of them (results/gpu_h200/timings).
# Its 16-bit products are exact and accumulate in float32, as the CUDA kernel's do; float32
# goes through tf32, so it is taken only where torch lets float32 matmuls use tf32 as well
# (torch.backends.cuda.matmul.allow_tf32, set by torch.set_float32_matmul_precision("high")).
_TENSOR_CORE_EXACT = (torch.float16, torch.bfloat16)


# A constant of a compiled graph, as available_backends is: read when the graph is traced.
@torch.compiler.assume_constant_result
def _tf32_matmuls_allowed() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


def gram_backend_for(x: torch.Tensor, forced: str | None) -> str:
    """``backend_for("im2col_gram", x, forced)``, Triton first on a GPU where its tensor-core
    Gram keeps the precision asked for (above)."""
    if forced is None and x.device.type == "cuda" and (
            x.dtype in _TENSOR_CORE_EXACT
            or (x.dtype == torch.float32 and _tf32_matmuls_allowed())) \
            and "triton" in available_backends("im2col_gram", x.device):
        return "triton"
    return backend_for("im2col_gram", x, forced)
