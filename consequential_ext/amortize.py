"""Amortised solves: a running (EMA) Gram, rebuilt every ``gram_every`` steps and
refactorised every ``every`` steps, with damping that keeps stale factors safe.

Per backward of a layer with D rows, P columns (patches) and M outputs, the exact row-side
solve pays the Gram ``O(D²·P)`` and the factorisation ``O(D³/3)`` every step. Amortised,
those run on refresh steps only, the Gram from a strided part of the batch holding
``gram_oversample·D`` columns; the other steps pay one ``O(M·D²)`` matmul with the kept
inverse and the safeguard's energy on a few columns (``O(M·D·safeguard_columns)``), so a
step costs little more than plain SGD's ``G``. Where the column (P×P) system is the smaller
(``matching.solve_side``: P < D, e.g. N < D for a Linear) the exact column solve is used
instead: it is exact where the row Gram is rank-deficient, and for N ≪ D cheaper than the
amortised one (``exact_when_cheaper``; docs/amortize.md).

Stale statistics are damped two ways (docs/amortize.md derives both):

* ridge ``λ' = λ + damping·tr(A_ema)/D`` (relative to the Gram's mean eigenvalue), so a
  direction the average barely holds is amplified at most ``1 / λ'``, not ``1 / λ``;
* the step ``Δ = G (A_ema + λ'I)⁻¹`` is shortened to the minimiser of the current batch's
  quadratic model ``-s⟨G, Δ⟩ + s²/2 ⟨Δ (A + λI), Δ⟩``: ``s = min(1, ⟨G, Δ⟩ / ⟨Δ (A + λI), Δ⟩)``,
  with ``⟨Δ A, Δ⟩ = |Δ X|²/N`` measured on ``safeguard_columns`` columns of the batch (from
  the Gram itself on refresh steps). Undamped and fresh, ``Δ`` is that model's minimiser and
  ``s = 1`` exactly; damping only shortens ``Δ``, so it keeps ``s = 1``; a stale ``Δ`` that
  overshoots on this batch is cut back.

The running state lives in buffers of an ``amortizer`` submodule, so it is saved and
restored with the model's ``state_dict``, moves with ``.to()`` (a cast to 16 bits leaves it
float32), and resumes bit-identically.
"""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.nn as nn

from ._validate import CLayerMixin
from .ops import reference

__all__ = ["GramAmortizer", "amortize", "DEFAULT_DAMPING", "DEFAULT_SAFEGUARD_COLUMNS"]

DEFAULT_DAMPING = 0.1            # docs/amortize.md, "Defaults"
DEFAULT_SAFEGUARD_COLUMNS = 256  # columns (rows of X, patches) the safeguard measures, at least
DEFAULT_GRAM_OVERSAMPLE = 32     # a refresh Gram holds at least 32·D columns of the batch


class GramAmortizer(nn.Module):
    """EMA of a layer's Gram ``A`` and the inverse of ``A_ema + λ'·I``, with the step count.

    shape: the Gram's shape, (D, D) or (groups, D, D). Step ``t`` (counted in ``steps``)
    folds this step's Gram into the average when ``t % gram_every == 0`` (the first one
    starts it: no zero-initialisation bias) and refactorises when ``t % every == 0``.
    ``decay`` is per step: one fold weighs the old average by ``decay ** gram_every``, so
    the average's horizon does not depend on how often it is fed. The inverse (from a
    Cholesky factor) is kept rather than the factor: one matmul costs a fraction of two
    triangular solves, and the damping bounds its condition number by ``1 + D / damping``.
    """

    def __init__(self, shape, *, every: int, decay: float, gram_every: int | None = None,
                 gram_oversample: float | None = DEFAULT_GRAM_OVERSAMPLE,
                 damping: float = DEFAULT_DAMPING,
                 safeguard_columns: int | None = DEFAULT_SAFEGUARD_COLUMNS,
                 exact_when_cheaper: bool = True, device=None, dtype=torch.float32):
        super().__init__()
        self.every = _check_count("every", every)
        self.gram_every = self.every if gram_every is None \
            else _check_count("gram_every", gram_every)
        if self.every % self.gram_every:
            raise ValueError(f"gram_every must divide every (each refactorisation uses a fresh "
                             f"Gram); got gram_every={gram_every!r}, every={every!r}")
        if not (_finite_real(decay) and 0 <= decay < 1):
            raise ValueError(f"decay must be a float in [0, 1); got {decay!r}")
        if gram_oversample is not None and not (_finite_real(gram_oversample)
                                                and gram_oversample >= 1):
            raise ValueError(f"gram_oversample must be a finite float >= 1 or None; got "
                             f"{gram_oversample!r}")
        self.gram_oversample = None if gram_oversample is None else float(gram_oversample)
        if not (_finite_real(damping) and damping >= 0):
            raise ValueError(f"damping must be a finite float >= 0; got {damping!r}")
        self.safeguard_columns = None if safeguard_columns is None \
            else _check_count("safeguard_columns", safeguard_columns)
        if not isinstance(exact_when_cheaper, bool):
            raise ValueError(f"exact_when_cheaper must be a bool; got {exact_when_cheaper!r}")
        self.decay, self.damping = float(decay), float(damping)
        self.exact_when_cheaper = exact_when_cheaper
        self.register_buffer("gram", torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("inverse", torch.zeros(shape, device=device, dtype=dtype))
        self.register_buffer("steps", torch.zeros((), device=device, dtype=torch.int64))
        # ``steps`` as a Python int: reading the buffer would synchronise a GPU for every layer
        # and step. Re-read only when the buffer is another tensor or was changed in place
        # (a loaded state, a move, a user's write), which its version counter tells.
        self._steps_seen = (None, None, 0)      # (tensor, its version and storage, value)
        self._graph_task = None   # the backward (autograd graph task) of the last step
        # The backward that recomputed this step's forward (a reentrant checkpoint runs the
        # step in a nested graph task of its own), set by the layer's Function.
        self.recomputed_in = None

    @torch.no_grad()
    def reset_parameters(self):
        """Start the running state afresh (no Gram, no inverse, step 0), as a new amortizer.
        Deferred initialisation calls it: a model amortised on the meta device and
        materialised by ``to_empty`` holds uninitialised memory here (a garbage step count
        and inverse), and the usual recipe calls ``reset_parameters()`` on every module that
        has one."""
        self.gram.zero_()
        self.inverse.zero_()
        self.steps.zero_()
        self._steps_seen = (None, None, 0)
        self._graph_task = None
        self.recomputed_in = None

    def _apply(self, fn, recurse=True):
        """Moves like any module, but a model's ``.half()`` / ``.to(torch.bfloat16)`` leaves
        the statistics in float32 (as every Gram): a 16-bit average would lose what it
        averages, and the Cholesky of a refresh has no 16-bit kernel."""
        def keep_wide(t):
            if not t.is_floating_point():
                return fn(t)
            target = fn(t.new_empty(0))           # where and in what ``fn`` puts a tensor
            if target.dtype not in (torch.float16, torch.bfloat16):
                return fn(t)
            return t.to(device=target.device, dtype=reference.accumulate_dtype(target.dtype))
        return super()._apply(keep_wide, recurse)

    # Outside Dynamo: reading the count is a graph break anyway (the schedule is data), and
    # traced it was one with torch's long ".item()" warning per compile.
    @torch.compiler.disable
    def _step_count(self) -> int:
        tensor, version, value = self._steps_seen
        now = _version_of(self.steps)
        if tensor is not self.steps or now is None or now != version:
            value = int(self.steps)
            self._steps_seen = (self.steps, now, value)
        return value

    def _count_step(self, step: int):
        self.steps += 1
        self._steps_seen = (self.steps, _version_of(self.steps), step + 1)

    def wants_gram(self) -> bool:
        """Whether this step folds a fresh Gram in (the caller builds it only then)."""
        return self._step_count() % self.gram_every == 0

    def gram_columns(self) -> int | None:
        """Columns a refresh Gram is built from (strided samples of the batch; None: all)."""
        if self.gram_oversample is None:
            return None
        return math.ceil(self.gram_oversample * self.gram.shape[-1])

    @torch.no_grad()
    def precondition(self, gram, grad, ridge, energy) -> torch.Tensor:
        """The damped, safeguarded ``grad @ (A_ema + λ'·I)⁻¹`` of this step.

        gram: this step's mean Gram ``A`` (..., D, D), or None when ``wants_gram()`` was
        False; grad: G (..., M, D); energy: ``energy(direction, columns)`` gives
        ``|direction·X|²/N`` per system (...,) from evenly strided samples holding at least
        ``columns`` columns. Non-finite or absurd statistics give NaN and one warning, never
        an exception; a refused Gram leaves the running average and inverse as they were
        (``steps`` too), while a Gram step whose Gram was folded keeps the fold even if the
        step itself is non-finite (an overflowing G: no warning).
        """
        if grad.requires_grad:     # G was recorded: a backward with create_graph=True
            _warn_no_graph()
        task, self.recomputed_in = self.recomputed_in, None
        task = graph_task() if task is None else task
        if task is not None and task == self._graph_task:
            _warn_called_twice()
        self._graph_task = task
        step = self._step_count()
        if gram is not None:
            if not self._refresh(gram, ridge, step):
                return torch.full_like(grad, float("nan"))
        direction = grad @ self.inverse.to(grad.dtype)
        self._count_step(step)
        if self.safeguard_columns is not None:
            if gram is not None:  # the exact energy, cheap once the Gram is there
                current = ((direction @ gram.to(grad.dtype)) * direction).sum((-2, -1))
            else:
                current = energy(direction, self.safeguard_columns)
            direction = self._shorten(direction, grad, current, ridge)
        if not _all_finite(direction):
            # A non-finite G alone (a GradScaler overflow) is a NaN step without a word, as
            # on the exact path; the warning is kept for the statistics and a diverging run.
            if _all_finite(grad):
                _warn_non_finite()
            return torch.full_like(grad, float("nan"))
        return direction

    def _refresh(self, gram, ridge, step) -> bool:
        """Fold ``gram`` in (and refactorise on schedule); False, state untouched, if the
        statistics are non-finite or no ridge makes the average positive definite."""
        if not bool(torch.isfinite(gram).all()):
            _warn_non_finite()
            return False
        gram = gram.to(self.gram.dtype)
        average = gram if step == 0 else torch.lerp(gram, self.gram,
                                                    self.decay ** self.gram_every)
        if step % self.every == 0:
            inverse = _damped_inverse(average, ridge, self.damping)
            if inverse is None:
                return False
            self.inverse.copy_(inverse)
        self.gram.copy_(average)
        return True

    def _shorten(self, direction, grad, current, ridge):
        """``direction·s``, s = min(1, ⟨G, Δ⟩ / (|ΔX|²/N + λ|Δ|²)) per system: the step
        length that minimises the current batch's quadratic model along Δ."""
        flat = direction.flatten(-2)           # one pass per product, no (…, M, D) temporary
        gain = torch.linalg.vecdot(grad.flatten(-2), flat)
        model = current + ridge * torch.linalg.vecdot(flat, flat)
        scale = torch.where(model > 0, gain / model, 1.0).clamp(max=1.0)
        # Non-finite statistics make the step NaN, which precondition's one host check of
        # the direction then reports (no read of gain and model here: a GPU would wait).
        scale = torch.where(torch.isfinite(gain) & torch.isfinite(model), scale, float("nan"))
        return direction.mul_(scale[..., None, None])

    def extra_repr(self):
        return (f"shape={tuple(self.gram.shape)}, every={self.every}, "
                f"gram_every={self.gram_every}, gram_oversample={self.gram_oversample}, "
                f"decay={self.decay:g}, damping={self.damping:g}, "
                f"safeguard_columns={self.safeguard_columns}, "
                f"exact_when_cheaper={self.exact_when_cheaper}")


def _version_of(t):
    """``t``'s in-place version counter and storage; None for an inference tensor, which
    keeps no counter. The storage too: ``torch.utils.swap_tensors`` (``load_state_dict``
    under ``torch.__future__.set_swap_module_params_on_conversion(True)``) swaps another
    tensor, version counter included, into the same Python object."""
    try:
        return t._version, t.data_ptr()
    except RuntimeError:
        return None


def _all_finite(t):
    """Whether every entry of ``t`` is finite: a finite sum proves it in one pass; only an
    inf/NaN sum (non-finite entries, or finite ones that overflowed) needs the exact test."""
    return math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def _finite_real(value) -> bool:
    # numbers.Real: NumPy's scalars pass, as they do for ridge and lr; never a bool
    return not isinstance(value, bool) and isinstance(value, numbers.Real) \
        and math.isfinite(value)


def _check_count(name, value):
    # numbers.Integral: NumPy's integers pass, as _finite_real's reals do
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    return int(value)


def _damped_inverse(gram, ridge, damping, max_escalations=12):
    """``(gram + λ·I)⁻¹`` by Cholesky, ``λ = ridge + damping·tr(gram)/D`` per system,
    escalating a system's λ ×10 on its failure with the warning ``ops.ridge_solve`` gives;
    None (and that warning) if no escalation helps."""
    d = gram.shape[-1]
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    # The mean eigenvalue in float64: a huge but finite float32 Gram must not overflow here.
    mean_eig = gram.diagonal(dim1=-2, dim2=-1).double().mean(-1)
    lam = (ridge + damping * mean_eig).to(gram.dtype)
    for attempt in range(max_escalations):
        factor, info = torch.linalg.cholesky_ex(gram + lam[..., None, None] * eye)
        failed = info != 0
        if bool(torch.isfinite(lam).all()) and not bool(failed.any()):
            if attempt:
                reference.warn_escalated(ridge, float(lam.max()))
            return torch.cholesky_inverse(factor)
        # per system (group): one group's failure must not raise the others' ridge
        lam = torch.where(failed | ~torch.isfinite(lam), lam * 10.0, lam)
    reference.warn_escalated(ridge, math.inf)
    return None


_non_finite_warned = False


def _warn_non_finite():
    """One RuntimeWarning per process, as the exact path's escalation warning."""
    global _non_finite_warned
    if not _non_finite_warned:
        _non_finite_warned = True
        warnings.warn("consequential_ext.amortize: non-finite statistics or step (an overflow "
                      "or a diverging run); the matched gradient is NaN for this step and the "
                      "running Gram is kept as it was.", RuntimeWarning, stacklevel=2)


def graph_task():
    """The id of the autograd backward running now (None outside one, under torch.compile,
    or on a torch without the private API torch.utils.checkpoint also uses)."""
    get = getattr(torch._C, "_current_graph_task_id", None)
    if get is None or torch.compiler.is_compiling():
        return None
    task = get()
    return None if task < 0 else task


_called_twice_warned = False


def _warn_called_twice():
    """One UserWarning per process: an amortised layer stepped twice in one backward — it
    was called more than once in the forward (siamese branches, an unrolled loop, one block
    at two resolutions). The exact rule matches each call on its own Gram; the calls of an
    amortised layer share one running Gram, and each counts as a step."""
    global _called_twice_warned
    if not _called_twice_warned:
        _called_twice_warned = True
        warnings.warn("consequential_ext.amortize: an amortised layer was called more than once "
                      "in one forward. Its calls share one running Gram (the exact rule matches "
                      "each call on its own) and each call counts as a step of every / "
                      "gram_every: where the calls' inputs differ in statistics (one block at "
                      "two resolutions, different features) a call's gradient can be far from "
                      "its exact matched one; leave such a layer exact "
                      "(cx.amortize(layer, every=None)).", UserWarning, stacklevel=2)


_no_graph_warned = False


def _warn_no_graph():
    """One UserWarning per process: a backward with create_graph=True reached an amortised
    layer, whose step comes from kept state (an EMA, an inverse) rather than from this
    batch's graph, so its weight gradient carries no graph of its own (the exact path's
    does)."""
    global _no_graph_warned
    if not _no_graph_warned:
        _no_graph_warned = True
        warnings.warn("consequential_ext.amortize: an amortised layer's weight gradient has no "
                      "autograd graph (create_graph=True): a loss built from it gets no second-"
                      "order term from that layer; remove the amortizer (cx.amortize(model, "
                      "every=None)) for a differentiable matched gradient.", UserWarning,
                      stacklevel=2)


def check_amortizer(amortizer, gram_shape, weight):
    """``amortizer`` if it fits a layer whose Gram has ``gram_shape`` (checked in forward:
    an exception inside backward is much harder to read)."""
    if amortizer is None:
        return None
    if not isinstance(amortizer, GramAmortizer):
        raise TypeError(f"amortizer must be a GramAmortizer or None; got "
                        f"{type(amortizer).__name__}")
    # Only a trained weight's backward uses the amortizer: an eval forward, or an input
    # gradient through a frozen model (an adversarial attack), of a layer whose bias was
    # frozen since ``amortize`` must not fail.
    if torch.is_grad_enabled() and weight.requires_grad \
            and tuple(amortizer.gram.shape) != tuple(gram_shape):
        raise ValueError(f"amortizer holds a Gram of shape {tuple(amortizer.gram.shape)}, but "
                         f"this layer's Gram is {tuple(gram_shape)} (the Gram has a bias row "
                         f"only while the bias requires grad: after freezing or unfreezing a "
                         f"bias, call cx.amortize again)")
    return amortizer


def amortize(model: nn.Module, *, every: int | None = 10, decay: float = 0.95,
             gram_every: int | None = None,
             gram_oversample: float | None = DEFAULT_GRAM_OVERSAMPLE,
             damping: float = DEFAULT_DAMPING,
             safeguard_columns: int | None = DEFAULT_SAFEGUARD_COLUMNS,
             exact_when_cheaper: bool = True) -> nn.Module:
    """Give every C-layer of ``model`` (or ``model`` itself) that solves with a Gram — all
    but CEmbedding, CMultiheadAttention and the recurrent cells, which stay exact; ValueError
    if there is none — a running Gram (a recurrent layer one per weight, in an
    ``nn.ModuleDict`` under the weights' names): rebuilt every
    ``gram_every`` (default: ``every``) backward calls that ask for the layer's weight
    gradient, or its bias's where the bias is matched jointly with it (``autograd.grad(loss,
    [bias])`` alone counts too, except for a transposed conv, whose bias is matched apart;
    not ``autograd.grad(loss, x)``'s, nor an empty batch's) from strided samples holding
    ``gram_oversample·D`` columns (a float ≥ 1; None: the whole batch), refactorised every
    ``every``; ``every=None`` removes it (exact solves). ``damping``: ridge added relative to the Gram's
    mean eigenvalue; ``safeguard_columns``: columns (rows, patches) per step on which the
    step is shortened to the current batch's quadratic model (None: off); ``exact_when_cheaper``: solve the
    exact column system where it is the smaller one (P < D; a recurrent weight, which has
    no column side: the exact row system where its rows are fewer than D). docs/amortize.md has the
    derivation and when to use which. In place; returns ``model``; adds no parameters."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}")
    if every is not None:  # validate once, before any layer changes
        GramAmortizer((1, 1), every=every, decay=decay, gram_every=gram_every,
                      gram_oversample=gram_oversample, damping=damping,
                      safeguard_columns=safeguard_columns, exact_when_cheaper=exact_when_cheaper)
    # Layers without a Gram of their own (attention, embeddings, recurrent cells) stay exact.
    layers = [m for m in model.modules() if isinstance(m, CLayerMixin)
              and (m.cx_gram_shape() is not None or m.cx_grams())]
    if not layers:
        exact = [type(m).__name__ for m in model.modules() if isinstance(m, CLayerMixin)]
        raise ValueError("amortize: model has no C-layer with a Gram to amortize " + (
            f"(its {', '.join(sorted(set(exact)))} layers solve exactly: attention, "
            f"embeddings and recurrent cells have no Gram to keep)" if exact
            else "(call consequentialize first)"))
    settings = dict(every=every, decay=decay, gram_every=gram_every,
                    gram_oversample=gram_oversample, damping=damping,
                    safeguard_columns=safeguard_columns, exact_when_cheaper=exact_when_cheaper)
    for layer in layers:
        if every is None:
            layer._modules.pop("amortizer", None)
            continue
        grams = layer.cx_grams()
        layer.amortizer = nn.ModuleDict({
            name: _amortizer_for(shape, weight, settings)
            for name, (shape, weight) in grams.items()}) if grams \
            else _amortizer_for(layer.cx_gram_shape(), layer.cx_weight(), settings)
    return model


def _amortizer_for(shape, weight, settings):
    return GramAmortizer(shape, device=weight.device,
                         dtype=reference.accumulate_dtype(weight.dtype), **settings)


def amortizer_of(layer: nn.Module) -> GramAmortizer | nn.ModuleDict | None:
    # Read from _modules: a class-level default would shadow the registered submodule.
    return layer._modules.get("amortizer")
