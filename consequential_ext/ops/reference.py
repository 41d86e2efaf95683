"""Pure-PyTorch definition of every fused op: the spec each kernel is tested against.

Kept deliberately plain (explicit ``unfold``, dense products, ``torch.linalg``); speed is
the kernels' job.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn.functional as F

__all__ = ["accumulate_dtype", "conv_gram_grad", "conv_weight_grad", "im2col", "im2col_gram",
           "ridge_solve"]


# Solves of float32 (and 16-bit) layers run in float32: a larger ridge is inf there, and one
# below its smallest normal number is subnormal or 0, no λ·I at all (a zero Gram's G/λ was
# NaN). One range for every dtype: a float64 layer's ridge means the same.
_MAX_RIDGE = torch.finfo(torch.float32).max
_MIN_RIDGE = torch.finfo(torch.float32).tiny


def check_ridge(ridge, name="ridge") -> float:
    """``ridge`` as a float, or ValueError naming ``name``. Comparisons, not math.isfinite:
    they also hold for torch.compile's symbolic floats, and NaN fails them; numbers.Real lets
    NumPy's floats in."""
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) \
            or not _MIN_RIDGE <= ridge <= _MAX_RIDGE:
        raise ValueError(f"{name} must be a finite float > 0, within float32's normal range "
                         f"[{_MIN_RIDGE:.3g}, {_MAX_RIDGE:.3g}]; got {ridge!r}")
    return float(ridge)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Grams and solves accumulate in float32 or better whatever the input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def im2col(x, kernel_size, stride, padding, dilation, groups=1, bias=False):
    """Patches of ``x`` (B, C, H, W) as (groups, D, B·L) columns, D = C/groups·kh·kw (+1).

    Row order matches ``weight.reshape(out, -1)`` of a Conv2d (channel, then kernel row,
    then kernel column); with ``bias`` a constant-1 row is appended per group.
    """
    b, c = x.shape[:2]
    d = c // groups * kernel_size[0] * kernel_size[1]    # explicit: -1 is ambiguous when b == 0
    if tuple(kernel_size) == (1, 1) and tuple(stride) == (1, 1) and tuple(padding) == (0, 0):
        cols = x.reshape(b, c, x.shape[2] * x.shape[3])   # a 1×1 patch is a pixel: no unfold
    elif c == 0:  # F.unfold refuses a map without channels: no rows, still one column a patch
        locations = math.prod((x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel_size[i] - 1)
                               - 1) // stride[i] + 1 for i in range(2))
        cols = x.new_zeros(b, 0, locations)
    else:
        cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
    cols = cols.reshape(b, groups, d, cols.shape[-1]).permute(1, 2, 0, 3)
    cols = cols.reshape(groups, d, b * cols.shape[-1])
    if bias:
        cols = torch.cat([cols, cols.new_ones(groups, 1, cols.shape[-1])], dim=1)
    return cols


def im2col_gram(x, kernel_size, stride, padding, dilation, groups=1, bias=False):
    """Σ over patches of patch·patchᵀ, unnormalised: (groups, D, D) in the accumulate dtype."""
    cols = im2col(x.to(accumulate_dtype(x.dtype)), kernel_size, stride, padding, dilation,
                  groups, bias)
    return cols @ cols.transpose(1, 2)


def conv_gram_grad(x, grad_output, kernel_size, stride, padding, dilation, groups=1,
                   bias=False):
    """(im2col_gram, G = dZ Xᵀ per group (groups, out/groups, D)) from one explicit im2col;
    G's bias column (with ``bias``) is Σ dZ, the constant-1 row's product."""
    work = accumulate_dtype(x.dtype)
    cols = im2col(x.to(work), kernel_size, stride, padding, dilation, groups, bias)
    b, out = grad_output.shape[:2]
    locations = grad_output.shape[2] * grad_output.shape[3]   # explicit, as in im2col
    dz = grad_output.to(work).reshape(b, groups, out // groups, locations).permute(1, 2, 0, 3)
    dz = dz.reshape(groups, out // groups, b * locations)
    return cols @ cols.transpose(1, 2), dz @ cols.transpose(1, 2)


def conv_weight_grad(x, grad_output, kernel_size, stride, padding, dilation, groups=1,
                     bias=False):
    """``conv_gram_grad``'s G alone."""
    return conv_gram_grad(x, grad_output, kernel_size, stride, padding, dilation, groups,
                          bias)[1]


_escalation_warned = False


def ridge_solve(gram, grad, ridge, out_dtype=None, max_escalations=12):
    """``grad @ inverse(gram + ridge·I)`` for a batch of systems, by Cholesky.

    gram: (..., D, D) symmetric PSD; grad: (..., M, D) with the same batch dims.
    A failed factorisation of finite input escalates that system's ridge ×10 and tries again,
    at most ``max_escalations`` factorisations in all (``max_escalations - 1`` escalations; one
    warning per process), then gives that system NaN (a warning each time; the others keep
    their solve, as separate layers would); non-finite input gives non-finite output rather
    than an exception, so ``GradScaler`` can skip the step.
    """
    out_dtype = grad.dtype if out_dtype is None else out_dtype
    work = torch.float64 if torch.float64 in (gram.dtype, grad.dtype) else torch.float32
    a, g = gram.to(work), grad.to(work)
    if a.device.type == "meta":   # shapes only: nothing to factor or check
        return g.new_empty(g.shape, dtype=out_dtype)
    if not (torch.isfinite(a).all() and torch.isfinite(g).all()):
        return torch.full_like(g, float("nan"), dtype=out_dtype)
    eye = torch.eye(a.shape[-1], dtype=work, device=a.device)
    # One ridge per system: a batch is independent systems (the groups of a conv), and one
    # that fails must not escalate the others' (a grouped conv equals its groups apart).
    lam = torch.full(a.shape[:-2], float(ridge), dtype=torch.float64, device=a.device)
    chol, info = torch.linalg.cholesky_ex(a + lam.to(work)[..., None, None] * eye)
    failed = info != 0
    if not bool(failed.any()):   # the common case: one host sync
        return torch.cholesky_solve(g.transpose(-1, -2), chol).transpose(-1, -2).to(out_dtype)
    with torch.no_grad():      # the search; where autograd records, refactored below
        for _ in range(max_escalations - 1):
            lam = torch.where(failed, lam * 10.0, lam)
            # Only the failed systems are factored again, at their escalated ridge (a
            # depthwise conv's hundreds of groups where a few escalate): the others keep
            # their factor.
            escalated_lam = lam[failed].to(work)[:, None, None]
            part, info = torch.linalg.cholesky_ex(a[failed] + escalated_lam * eye)
            chol[failed] = part
            failed = failed.masked_scatter(failed, info != 0)
            if not bool(failed.any()):
                break
    if torch.is_grad_enabled() and (a.requires_grad or g.requires_grad):
        # ops.ridge_solve runs this reference where autograd records (a double backward, a
        # hand-made graph): the search wrote into the factor cholesky_ex saved for its
        # backward, so the batch is factored once more, differentiably, at the ridges found.
        chol = torch.linalg.cholesky_ex(a + lam.to(work)[..., None, None] * eye)[0]
    out = torch.cholesky_solve(g.transpose(-1, -2), chol).transpose(-1, -2)
    if not bool(failed.any()):
        warn_escalated(ridge, float(lam.max()))
        return out.to(out_dtype)
    # Still indefinite (finite but absurd input, e.g. a diverging run): NaN for those systems,
    # never an exception inside backward, so GradScaler / the user sees a non-finite step;
    # the others keep their solve, as the compiled and Triton solves give them (out of
    # place: cholesky_solve's backward saves its result). A system rescued beside them has
    # its ridge named as well.
    rescued = float(lam.masked_fill(failed, ridge).max())
    if rescued > ridge:
        warn_escalated(ridge, rescued)
    warn_escalated(ridge, math.inf)
    return out.masked_fill(failed[..., None, None], float("nan")).to(out_dtype)


def warn_escalated(ridge, lam):
    """The RuntimeWarning of an escalated solve, whichever backend escalated: once per process
    for a ridge that escalation rescued; every time for ``lam = inf`` — no ridge helped and
    the solve returned NaN — since an earlier rescue says nothing about this NaN step (the
    warnings filter still shows a repeated message once per call site by default)."""
    global _escalation_warned
    if math.isinf(lam):
        outcome = "no escalation helped, so the gradient is NaN (non-finite step)"
    elif _escalation_warned:
        return
    else:
        _escalation_warned = True
        outcome = f"ridge escalated from {ridge:g} to {lam:g}"
    warnings.warn(f"consequential_ext.ridge_solve: Cholesky of (gram + ridge*I) failed; "
                  f"{outcome}. Consider a larger ridge.", RuntimeWarning, stacklevel=3)