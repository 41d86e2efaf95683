"""The fused ops, one entry each, with backend dispatch: cuda → triton → cpu → reference.

``cuda`` and ``cpu`` are the compiled operators in ``consequential_ext._C`` (reached through
``torch.ops.consequential_ext``), ``triton`` the kernels in ``ops/triton`` (CUDA tensors
only), ``reference`` the pure-PyTorch spec in ``ops/reference.py``. ``use_backend(name)``
forces one, for tests and benchmarks.
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch

from . import reference
from ._backends import available_backends, backend_for
from ._conv_args import check_conv_args
from ._fake import register_fakes

__all__ = ["im2col_gram", "ridge_solve", "use_backend", "available_backends", "reference"]

register_fakes()
_forced = threading.local()


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run the ops in this block on backend ``name`` (None: automatic)."""
    if name is not None and name not in ("cuda", "triton", "cpu", "reference"):
        raise ValueError(f"use_backend: backend must be one of 'cuda', 'triton', 'cpu', "
                         f"'reference' or None, got {name!r}")
    previous = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


def im2col_gram(x, kernel_size, stride=1, padding=0, dilation=1, *, groups=1, bias=False):
    """Σ over every im2col patch of ``x`` of patch·patchᵀ, unnormalised.

    x: (B, C, H, W), any memory format. Returns (D, D) for ``groups=1`` and
    (groups, D, D) otherwise, D = C/groups·kh·kw (+1 with ``bias``: the constant-1 row
    a bias multiplies). float32 accumulation (float64 for float64 input).
    """
    ks, st, pd, dl = check_conv_args(x, kernel_size, stride, padding, dilation, groups)
    backend = backend_for("im2col_gram", x, getattr(_forced, "name", None))
    if backend == "reference":
        gram = reference.im2col_gram(x, ks, st, pd, dl, groups, bias)
    elif backend == "triton":
        from . import triton as triton_ops
        gram = triton_ops.im2col_gram(x, ks, st, pd, dl, groups, bias)
    else:
        gram = torch.ops.consequential_ext.im2col_gram(x, ks, st, pd, dl, groups, bias)
    return gram[0] if groups == 1 else gram


def ridge_solve(gram, grad, ridge, *, out_dtype=None):
    """``grad @ inverse(gram + ridge·I)``, batched over leading dims, by Cholesky.

    gram: (..., D, D) symmetric positive semi-definite; grad: (..., M, D) with the same
    leading dims. Solved in float32 or better; returned in ``out_dtype`` (default: grad's).
    """
    if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or not math.isfinite(ridge) \
            or ridge <= 0:
        raise ValueError(f"ridge_solve: ridge must be a finite float > 0, got {ridge!r}")
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"ridge_solve: gram must be (..., D, D), got {tuple(gram.shape)}")
    if grad.dim() != gram.dim() or grad.shape[-1] != gram.shape[-1] \
            or grad.shape[:-2] != gram.shape[:-2]:
        raise ValueError(f"ridge_solve: grad must be (..., M, D) with the leading dims and D of "
                         f"gram {tuple(gram.shape)}, got {tuple(grad.shape)}")
    if gram.device != grad.device:
        raise ValueError(f"ridge_solve: gram on {gram.device} but grad on {grad.device}")
    backend = backend_for("ridge_solve", gram, getattr(_forced, "name", None))
    if backend == "reference":
        return reference.ridge_solve(gram, grad, float(ridge), out_dtype)
    if backend == "triton":
        from . import triton as triton_ops
        return triton_ops.ridge_solve(gram, grad, float(ridge), out_dtype)
    if torch.compiler.is_compiling():
        return torch.ops.consequential_ext.ridge_solve_reporting(gram, grad, float(ridge),
                                                                 out_dtype)
    return _solve_and_report(gram, grad, float(ridge), out_dtype)


def _solve_and_report(gram, grad, ridge, out_dtype):
    """The compiled solve, then its escalation record as a warning."""
    out = torch.ops.consequential_ext.ridge_solve(gram, grad, ridge, out_dtype)
    escalations = torch.ops.consequential_ext.take_ridge_escalations()
    if escalations:
        reference.warn_escalated(escalations[0], escalations[1])
    return out


# Under torch.compile, the solve and its escalation warning as one Python custom op: the
# compiler keeps a custom op opaque, so the kernels' escalation record is taken (and the
# warning given) each time the graph runs; traced inline, the record would be read once, at
# trace time. Eagerly the plain function runs: a custom op's Python dispatch (argument
# binding through inspect) costs ~0.1 ms per call, per layer and step.
@torch.library.custom_op("consequential_ext::ridge_solve_reporting", mutates_args=())
def _ridge_solve_reporting(gram: torch.Tensor, grad: torch.Tensor, ridge: float,
                           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    return _solve_and_report(gram, grad, ridge, out_dtype)


@_ridge_solve_reporting.register_fake
def _(gram, grad, ridge, out_dtype=None):
    return grad.new_empty(grad.shape, dtype=out_dtype or grad.dtype)
