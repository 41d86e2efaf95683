"""The fused ops, one entry each, with backend dispatch: cuda → triton → cpu → reference
(the GPU Gram of 16-bit input, or of float32 where torch allows tf32 matmuls: triton first).

``cuda`` and ``cpu`` are the compiled operators in ``consequential_ext._C`` (reached through
``torch.ops.consequential_ext``), ``triton`` the kernels in ``ops/triton`` (CUDA tensors
only), ``reference`` the pure-PyTorch spec in ``ops/reference.py``. ``use_backend(name)``
forces one, for tests and benchmarks.
"""
from __future__ import annotations

import contextlib

import torch

from .._blocks import BlockSetting
from . import reference
from ._backends import available_backends, backend_for, gram_backend_for
from ._conv_args import check_bias_flag, check_conv_args, output_size
from ._fake import register_fakes

__all__ = ["im2col_gram", "conv_gram_grad", "conv_weight_grad", "ridge_solve", "use_backend",
           "available_backends", "reference"]

register_fakes()
# Process-global, not thread-local (``_blocks.py``): CUDA backward runs on autograd's device
# threads, which would not see a thread-local choice made around ``loss.backward()``.
_forced = BlockSetting(None)


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run the ops in this block on backend ``name`` (None: automatic), in every thread of
    the process (autograd's device threads too) — except where autograd records, which
    always takes the differentiable reference (``_backend``). With blocks open in several
    threads, the newest open one's choice is in force."""
    if name is not None and name not in ("cuda", "triton", "cpu", "reference"):
        raise ValueError(f"use_backend: backend must be one of 'cuda', 'triton', 'cpu', "
                         f"'reference' or None, got {name!r}")
    with _forced.block(name):
        yield


def _backend(op, *tensors):
    """The backend ``op`` runs on here: the pure-PyTorch reference wherever autograd records
    (grad mode on and an input requiring grad: a double backward, a hand-made graph) — the
    compiled and Triton kernels have no derivative, and autograd differentiates the
    reference — else ``backend_for`` (``gram_backend_for`` for the Gram)."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return "reference"
    if op == "im2col_gram":
        return gram_backend_for(tensors[0], _forced.value)
    return backend_for(op, tensors[0], _forced.value)


def im2col_gram(x, kernel_size, stride=1, padding=0, dilation=1, *, groups=1, bias=False):
    """Σ over every im2col patch of ``x`` of patch·patchᵀ, unnormalised.

    x: (B, C, H, W), any memory format. Returns (D, D) for ``groups=1`` and
    (groups, D, D) otherwise, D = C/groups·kh·kw (+1 with ``bias``: the constant-1 row
    a bias multiplies). float32 accumulation (float64 for float64 input).

    Raises ValueError naming the argument for a geometry F.conv2d refuses (an empty map, a
    kernel that does not fit) or one past the kernels' int64 counts (docs/design.md §3).
    """
    ks, st, pd, dl = check_conv_args(x, kernel_size, stride, padding, dilation, groups)
    groups, bias = int(groups), check_bias_flag(bias)
    backend = _backend("im2col_gram", x)
    if backend == "reference":
        gram = reference.im2col_gram(x, ks, st, pd, dl, groups, bias)
    elif backend == "triton":
        from . import triton as triton_ops
        gram = triton_ops.im2col_gram(x, ks, st, pd, dl, groups, bias)
    else:
        gram = torch.ops.consequential_ext.im2col_gram(x, ks, st, pd, dl, groups, bias)
    return gram[0] if groups == 1 else gram


def conv_gram_grad(x, grad_output, kernel_size, stride=1, padding=0, dilation=1, *, groups=1,
                   bias=False):
    """``im2col_gram`` of a conv's input ``x`` and the conv's weight gradient G = dZ Xᵀ, per
    group: ((groups, D, D), (groups, out/groups, D)), G's last column Σ dZ with ``bias``.

    grad_output: dZ, (B, out, Ho, Wo), in x's dtype. Accumulated like the Gram (float32,
    float64 for float64 input). On CPU one compiled call, G from the shift or rows kernel's
    own pass over ``x`` where ``conv_gram_brings_grad``, else from ATen's conv backward; other
    devices have only the reference (explicit im2col): there the Gram op and the native conv
    backward are the faster pair.
    """
    return _grad_op("conv_gram_grad", x, grad_output, kernel_size, stride, padding, dilation,
                    groups, bias)


def conv_weight_grad(x, grad_output, kernel_size, stride=1, padding=0, dilation=1, *, groups=1,
                     bias=False):
    """``conv_gram_grad``'s G alone, (groups, out/groups, D): on CPU from the shift or rows
    kernel's pass without the Gram where ``conv_gram_brings_grad`` (there cheaper than ATen's
    weight-gradient pass, docs/performance.md, "Since 017cced"), elsewhere from ATen's conv
    backward; other devices have only the reference (explicit im2col)."""
    return _grad_op("conv_weight_grad", x, grad_output, kernel_size, stride, padding, dilation,
                    groups, bias)


def _grad_op(name, x, grad_output, kernel_size, stride, padding, dilation, groups, bias):
    """Op ``name`` (compiled ``_name`` on CPU, else ``reference.name``) after checking the conv
    arguments and that ``grad_output`` is the conv's output gradient in x's dtype."""
    ks, st, pd, dl = check_conv_args(x, kernel_size, stride, padding, dilation, groups)
    groups, bias = int(groups), check_bias_flag(bias)
    out_hw = output_size(x, ks, st, pd, dl)
    if not isinstance(grad_output, torch.Tensor) or grad_output.dim() != 4 \
            or grad_output.shape[0] != x.shape[0] or grad_output.shape[1] % groups \
            or grad_output.shape[1] == 0 \
            or tuple(grad_output.shape[2:]) != out_hw or grad_output.dtype != x.dtype:
        raise ValueError(f"{name}: grad_output must be (B, out, Ho, Wo) = "
                         f"({x.shape[0]}, a positive multiple of groups={groups}, {out_hw[0]}, "
                         f"{out_hw[1]}) in x's dtype {x.dtype}; got "
                         f"{tuple(getattr(grad_output, 'shape', ()))} "
                         f"{getattr(grad_output, 'dtype', type(grad_output).__name__)}")
    if grad_output.device != x.device:
        raise ValueError(f"{name}: grad_output must be on x's device ({x.device}); got "
                         f"{grad_output.device}")
    if _backend("_" + name, x, grad_output) == "cpu":
        return getattr(torch.ops.consequential_ext, "_" + name)(x, grad_output, ks, st, pd, dl,
                                                                groups, bias)
    return getattr(reference, name)(x, grad_output, ks, st, pd, dl, groups, bias)


def gram_is_native(x):
    """Whether ``im2col_gram`` of ``x`` runs the compiled CPU kernel here (not forced onto
    another backend)."""
    return _backend("im2col_gram", x) == "cpu"


def conv_gram_grad_is_native(x, grad_output):
    """Whether ``conv_gram_grad`` runs compiled here (CPU backend, the signal in x's dtype):
    only then is it cheaper than the Gram op beside a native conv backward."""
    return (grad_output.dtype == x.dtype
            and _backend("_conv_gram_grad", x, grad_output) == "cpu")


_CORR_ALIGN = 16  # csrc/cpu/corr_kernel.h: kCorrAlign
_BLAS_RATIO = 32  # csrc/cpu/gram_cpu.h: kBlasRatio
_ROWS_MAX_D = 48  # csrc/cpu/gram_cpu.h: kRowsMaxD
_PANEL_ELEMS = 1 << 16  # csrc/cpu/gram_cpu.h: kPanelElems


def conv_gram_brings_grad(x, grad_output, kernel_size, stride, padding, dilation, groups, bias):
    """Whether ``conv_gram_grad`` computes G in the Gram kernel's own pass (cheaper than a
    native conv backward's weight-gradient pass there); mirrors ``grad_algorithm`` in
    csrc/cpu/gram_cpu.cpp (a test holds the two together)."""
    if not conv_gram_grad_is_native(x, grad_output) or x.numel() == 0:
        return False
    (kh, kw), (sh, sw) = kernel_size, stride
    cg, og = x.shape[1] // groups, grad_output.shape[1] // groups
    ho, wo = output_size(x, kernel_size, stride, padding, dilation)
    d = cg * kh * kw + int(bias)
    ungrouped = (groups == 1 or cg >= _CORR_ALIGN) and x.shape[0] * ho * wo * _BLAS_RATIO > d \
        and sh == sw == 1
    if ungrouped and d <= _ROWS_MAX_D and (cg * kh * kw + 1 + og) * wo <= _PANEL_ELEMS:
        return True  # the rows kernel: G from its panel, whatever the channels
    cp, op = (-(-c // _CORR_ALIGN) * _CORR_ALIGN for c in (cg, og))
    return ungrouped and kh * kw > 1 and min(cg, og) >= _CORR_ALIGN \
        and 4 * cp * op <= 5 * cg * og


# What the solve reads (float8 has no arithmetic to check or factor with); out_dtype may be
# any floating dtype, a cast at the end.
_SOLVE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def ridge_solve(gram, grad, ridge, *, out_dtype=None):
    """``grad @ inverse(gram + ridge·I)``, batched over leading dims, by Cholesky.

    gram: (..., D, D) symmetric positive semi-definite; grad: (..., M, D) with the same
    leading dims. Solved in float32 or better; returned in ``out_dtype`` (default: grad's).
    """
    ridge = check_solve_args(gram, grad, ridge, out_dtype)
    backend = _backend("ridge_solve", gram, grad)
    if backend == "reference":
        return reference.ridge_solve(gram, grad, ridge, out_dtype)
    if backend == "triton":
        from .triton import solve as triton_solve
        return triton_solve.solve_checked(gram, grad, ridge, out_dtype)
    if torch.compiler.is_compiling():
        return torch.ops.consequential_ext.ridge_solve_reporting(gram, grad, ridge,
                                                                 out_dtype)
    return _solve_and_report(gram, grad, ridge, out_dtype)


def check_solve_args(gram, grad, ridge, out_dtype):
    """``ridge`` checked, after ``ridge_solve``'s tensors and ``out_dtype`` (every backend's
    entry point: ValueError / TypeError naming the argument)."""
    ridge = reference.check_ridge(ridge, "ridge_solve: ridge")
    for name, t in (("gram", gram), ("grad", grad)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"ridge_solve: {name} must be a Tensor; got {type(t).__name__}")
    if gram.dim() < 2 or gram.shape[-1] != gram.shape[-2]:
        raise ValueError(f"ridge_solve: gram must be (..., D, D), got {tuple(gram.shape)}")
    if grad.dim() != gram.dim() or grad.shape[-1] != gram.shape[-1] \
            or grad.shape[:-2] != gram.shape[:-2]:
        raise ValueError(f"ridge_solve: grad must be (..., M, D) with the leading dims and D of "
                         f"gram {tuple(gram.shape)}, got {tuple(grad.shape)}")
    if gram.device != grad.device:
        raise ValueError(f"ridge_solve: gram on {gram.device} but grad on {grad.device}")
    for name, dtype in (("gram", gram.dtype), ("grad", grad.dtype)):
        if dtype not in _SOLVE_DTYPES:
            raise ValueError(f"ridge_solve: {name} must be a floating dtype (float16, bfloat16, "
                             f"float32 or float64); got {dtype}")
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype)
                                      and out_dtype.is_floating_point):
        raise ValueError(f"ridge_solve: out_dtype must be a floating dtype; got {out_dtype}")
    return ridge


def _solve_and_report(gram, grad, ridge, out_dtype):
    """The compiled solve, then its escalation record as a warning. The kernels escalate the
    ridge of a whole batch at once; where a batch of several systems escalated, it is solved
    again by ``reference.ridge_solve``, which escalates each system's ridge alone (one
    group's failure must not change the others' ridge: a grouped conv equals its groups
    apart) in batched factorisations, at most 12, and warns itself — one kernel call per
    system took 35 ms for 2048 groups of D = 10 (0.8 ms for the batch), 7× the reference."""
    out = torch.ops.consequential_ext.ridge_solve(gram, grad, ridge, out_dtype)
    escalations = torch.ops.consequential_ext.take_ridge_escalations()
    if escalations and gram.shape[:-2].numel() > 1:
        return reference.ridge_solve(gram, grad, ridge, out_dtype)
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
