"""C-layers of nn.RNN / nn.LSTM / nn.GRU: each weight matched on the rows it multiplies.

A recurrent layer applies ``W_ih`` to its input ``x_t`` and ``W_hh`` to its previous hidden
state ``h_{t-1}`` at every time step, inside one fused op. Each is a linear map shared over
the steps, as a conv's kernel is shared over positions, so each gets the contract of
docs/design.md §2 with X = the rows it multiplies at every valid step of every sequence:
``[W_ih | b_ih]`` on ``[x_t; 1]``, ``[W_hh | b_hh]`` on ``[h_{t-1}; 1]`` (``h_{-1}`` = the
initial state; the reverse direction's previous state is its ``h_{t+1}``), N = those rows, G
the call's ordinary gradient (summed over the steps by the op's own backward).

The forward is nn's own, with its fused op routed (``routing.py``) to one call of the same op
per layer, so that each layer's hidden states — X of its ``W_hh`` and of the next layer's
``W_ih`` — are seen; between layers nn's dropout runs as the fused op runs it. Each weight
reaches the op through ``MatchedRecurrentWeights``, an identity whose backward turns the op's
G into ``G (A + λI)⁻¹``. Only the rules that keep BP's signal to the layer below (the
default, and ``"sgd"``) apply: the back-matching rules change that signal, which a recurrent
layer sends through time inside the op. nn.LSTM's ``proj_size`` projects ``o_t ⊙ tanh(c_t)``,
which the op does not return: such a layer stays plain.
"""
from __future__ import annotations

import contextlib
import functools
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import _VF

from . import distributed, ops
from .amortize import amortizer_of, check_amortizer, graph_task
from .functional import _wanted, _warn_export
from .matching import (_autocast_off, _empty_amortised, _linear_energy, _linear_gram,
                       _pending_gram, _solve)
from .ops.reference import accumulate_dtype
from .routing import FunctionalRoute
from .rules import RULE_TABLE, Rule, rule_named
from ._validate import DEFAULT_RIDGE, DEFAULT_RULE, CLayerMixin, linear_gram_shape

__all__ = ["CRNN", "CLSTM", "CGRU", "CRNNCell", "CLSTMCell", "CGRUCell",
           "MatchedRecurrentWeights", "RECURRENT_RULES"]

# The rules whose signal to the layer below is BP's (``Rule.input_signal`` not overridden).
RECURRENT_RULES = tuple(name for name, rule in RULE_TABLE.items()
                        if type(rule).input_signal is Rule.input_signal)
_OPS = (_VF.rnn_tanh, _VF.rnn_relu, _VF.lstm, _VF.gru)
_CELL_OPS = (_VF.rnn_tanh_cell, _VF.rnn_relu_cell, _VF.lstm_cell, _VF.gru_cell)
_NOT_CONTIGUOUS = "RNN module weights are not part of single contiguous chunk of memory"
_PROJECTED = ("an LSTM with proj_size > 0 projects o_t ⊙ tanh(c_t), which its op does not "
              "return: weight_hr's X is unseen, so the layer stays plain")


class _Rows:
    """The rows X a weight multiplies, (N, in): a hidden state's are known only after the
    layer's op has run, so the forward fills this in after it and the backward reads it.
    ``grams``: None, or (rows that several weights multiply: a bidirectional layer's input)
    a dict where the first exact backward leaves its Gram for the others, by (dtype, bias).
    ``graphed``: the rows keep their autograd history (a cell's: its call's own input and
    state), so a backward with create_graph=True differentiates the matched gradient through
    them too. A fused layer's rows are detached: its states come out of the op that the
    weights' own node feeds, and rows kept on that node's ctx with their history would make a
    reference cycle through the graph, which Python's collector cannot break."""
    __slots__ = ("rows", "grams", "graphed")

    def __init__(self, rows=None, shared=False, graphed=False):
        self.rows, self.graphed = rows, graphed
        self.grams = {} if shared else None


_rows_constant_warned = False


def _warn_rows_constant():
    """One UserWarning per process: create_graph=True through a fused recurrent C-layer, whose
    matched gradient's graph holds its rows X constant (``_Rows``)."""
    global _rows_constant_warned
    if not _rows_constant_warned:
        _rows_constant_warned = True
        warnings.warn("consequential_ext: a recurrent C-layer's (CRNN / CLSTM / CGRU) matched "
                      "weight gradient is differentiated (create_graph=True) with its rows X — "
                      "the layer's inputs and states — held constant: derivatives of a loss "
                      "built from it miss the terms through X. The cells (CLSTMCell, …) and "
                      "nn's layers (rule='sgd') differentiate through everything.", UserWarning,
                      stacklevel=2)


class RecurrentGradients:
    """Backward primitives (``rules.py``) of one weight (and its bias) of a recurrent layer:
    the op's ordinary gradients, and X."""

    def __init__(self, rows, grad_weight, grad_bias, *, needs_weight, needs_bias, trains_weight,
                 trains_bias, ridge, amortizer=None, grams=None):
        self.rows, self.grad_weight, self.grad_bias = rows, grad_weight, grad_bias
        self.grams = grams   # _Rows.grams
        self.needs_weight, self.needs_bias, self.ridge = needs_weight, needs_bias, ridge
        self.amortizer = amortizer
        # What trains (requires grad) decides the formula, what this backward is asked for
        # only what it returns (as functional._needs): ``backward(inputs=[bias])`` gives the
        # bias a full backward's gradient.
        self.trains_weight, self.trains_bias = trains_weight, trains_bias

    def plain_weight_grads(self):
        return (self.grad_weight if self.needs_weight else None,
                self.grad_bias if self.needs_bias else None)

    def matched_weight_grads(self):
        if not (self.needs_weight or self.needs_bias):
            return None, None
        if not self.trains_weight:       # frozen weight: the bias alone on its 1-row, A = 1
            return None, self.grad_bias / (1 + self.ridge)
        has_bias = self.trains_bias      # a frozen bias is a constant: no 1-row
        matched = matched_from_grad(self.rows, self.grad_weight, self.grad_bias if has_bias
                                    else None, self.ridge, self.amortizer, self.grams)
        weight = matched[:, :-1] if has_bias else matched
        return (weight.to(self.grad_weight.dtype) if self.needs_weight else None,
                matched[:, -1].to(self.grad_bias.dtype) if has_bias and self.needs_bias
                else None)


@_autocast_off
def matched_from_grad(rows, grad_weight, grad_bias, ridge, amortizer=None, grams=None):
    """``[G | g_b] (A + λI)⁻¹`` with ``A = [X; 1][X; 1]ᵀ / N`` of ``rows`` (N, in), G the
    ordinary gradient (out, in) already summed over the rows (a recurrent op's), g_b (or
    None: no 1-row). Row side only (the column side needs each row's output gradient, which
    the op keeps to itself); with fewer rows than columns the D × D Gram's rank is N and only
    the ridge keeps it invertible, so it is solved in float64 there (``matching.solve_side``).
    Under torch.distributed the Gram is summed across ranks (``distributed.py``), in float64
    on every rank. amortizer: a ``GramAmortizer`` to solve with its running Gram instead,
    except where rows < D and it prefers exact solves there (``exact_when_cheaper``; under
    torch.distributed never: every rank must take the same path). grams: a dict that keeps
    the exact path's Gram, by (dtype, bias), for another weight on the same rows (None: not
    kept); the amortised path has a running Gram per weight and neither reads nor fills it."""
    has_bias = grad_bias is not None
    d = rows.shape[1] + int(has_bias)
    group = distributed.gram_group()
    amortised = amortizer is not None and (
        group is not None or not amortizer.exact_when_cheaper or rows.shape[0] >= d)
    # Ranks all-reduce their Grams, so they must agree on its dtype, and N < D is a property
    # of the global batch, not of one rank's rows (a rank with one short sequence, or none):
    # float64 on every rank, unless every rank takes the amortised path.
    work = torch.float64 if not amortised and (group is not None or rows.shape[0] < d) \
        else accumulate_dtype(rows.dtype)
    x = rows.to(work)
    grad = grad_weight.to(work)
    if has_bias:
        grad = torch.cat([grad, grad_bias.to(work)[:, None]], dim=1)
    if not amortised:
        # Every rank takes this branch for the same weights (as above), so the one that finds
        # the Gram kept skips the all-reduce on every rank alike.
        key = (work, has_bias)
        gram = None if grams is None else grams.get(key)
        if gram is None:
            gram = distributed.PendingGram(_linear_gram(x, has_bias), x.shape[0], group).wait()
            if grams is not None:
                grams[key] = gram
        return ops.ridge_solve(gram, grad, ridge)
    if _empty_amortised(x.shape[0], group, amortizer):
        return torch.zeros_like(grad)
    pending = _pending_gram(functools.partial(_linear_gram, has_bias=has_bias), x, 1, group,
                            amortizer)
    return _solve(pending, grad, ridge, amortizer, functools.partial(_linear_energy, x))


class MatchedRecurrentWeights(torch.autograd.Function):
    """Identity on a recurrent weight (and its bias) in forward; in backward, the op's
    ordinary gradient of them by the rule, X from ``rows`` (a ``_Rows``)."""
    # A C-layer's Function for graph_check: the parameters reach the op through it.
    cx_matches_weights = True

    @staticmethod
    def forward(ctx, weight, bias, rows, rule, ridge, amortizer):
        ctx.rows, ctx.rule, ctx.ridge, ctx.amortizer = rows, rule_named(rule), ridge, amortizer
        ctx.has_bias = bias is not None
        # as functional._save_common: the backward that a checkpoint's recomputation steps in
        ctx.recomputed_in = None if amortizer is None else graph_task()
        if bias is None:
            return weight.view_as(weight)
        return weight.view_as(weight), bias.view_as(bias)

    @staticmethod
    def backward(ctx, grad_weight, grad_bias=None):
        if ctx.amortizer is not None:
            ctx.amortizer.recomputed_in = ctx.recomputed_in
        if torch.is_grad_enabled() and not ctx.rows.graphed:   # create_graph=True
            _warn_rows_constant()
        layer = RecurrentGradients(ctx.rows.rows, grad_weight, grad_bias, grams=ctx.rows.grams,
                                   needs_weight=_wanted(ctx, 0),
                                   needs_bias=ctx.has_bias and _wanted(ctx, 1),
                                   trains_weight=ctx.needs_input_grad[0],
                                   trains_bias=ctx.has_bias and ctx.needs_input_grad[1],
                                   ridge=ctx.ridge, amortizer=ctx.amortizer)
        return *ctx.rule.weight_grads(layer), None, None, None, None


def _matched(rows, rule, ridge, weight, bias, amortizer=None):
    """(weight, bias) as the op takes them: through ``MatchedRecurrentWeights`` when either
    trains."""
    if not (weight.requires_grad or (bias is not None and bias.requires_grad)):
        return weight, bias
    out = MatchedRecurrentWeights.apply(weight, bias, rows, rule, ridge, amortizer)
    return (out, None) if bias is None else out


def _previous_states(out, h0, direction, hidden, batch_sizes, batch_first):
    """X of one direction's ``W_hh``, (N, hidden): the state each valid step starts from.
    Forward: ``h0`` at the first step of each sequence, else the step before's output; the
    reverse direction runs from each sequence's last step, starting from ``h0`` there."""
    own = out[..., direction * hidden:(direction + 1) * hidden]
    if batch_sizes is None:
        time = 1 if batch_first else 0
        before = own.narrow(time, 0, own.shape[time] - 1) if direction == 0 else \
            own.narrow(time, 1, own.shape[time] - 1)
        steps = before.reshape(-1, hidden)
    elif direction == 0:
        # Packed: time-major rows, batch_sizes[t] of step t (a CPU tensor). Row b of step t-1
        # precedes row b of step t where b < batch_sizes[t]: rows starts[t-1] + 0 … sizes[t]-1.
        starts = batch_sizes.cumsum(0) - batch_sizes
        counts = batch_sizes[1:]
        first = torch.repeat_interleave(starts[:-1], counts)
        index = first + torch.arange(len(first)) - torch.repeat_interleave(
            counts.cumsum(0) - counts, counts)
        steps = own[index.to(own.device)]
    else:
        steps = own[int(batch_sizes[0]):]   # every row past the first step: row b's next
    parts = (h0, steps) if direction == 0 else (steps, h0)
    return torch.cat(parts)


@contextlib.contextmanager
def _cudnn_copy_unsaid():
    """cuDNN warns that a layer above the first's weights are not where one flat buffer for a
    one-layer call would hold them (they are where nn's buffer for all layers holds them), and
    copies them; the advice it gives, flatten_parameters(), does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NOT_CONTIGUOUS)
        yield


class _Recurrent(CLayerMixin):
    """What the recurrent C-layers and cells share: their rules, and nn's forward with its op
    routed (``_cx_ops`` to ``_cx_call``) while a backward can reach the weights."""

    _cx_ops = ()
    _cx_script_advice = ("train the eager or torch.compile'd model (torch.jit.trace only under "
                         "torch.no_grad(), for inference)")

    def __init__(self, *args, rule=DEFAULT_RULE, ridge=DEFAULT_RIDGE, **kwargs):
        """nn's arguments, then ``rule`` and ``ridge``."""
        super().__init__(*args, **kwargs)
        if getattr(self, "proj_size", 0) > 0:
            raise ValueError(f"{type(self).__name__}: proj_size must be 0, got "
                             f"{self.proj_size}: {_PROJECTED}")
        self.rule, self.ridge = rule, ridge

    @property
    def rule(self):
        return self._cx_rule

    @rule.setter
    def rule(self, value):
        if not self.cx_takes_rule(value):
            raise ValueError(f"rule must be one of {', '.join(map(repr, RECURRENT_RULES))} for "
                             f"a recurrent layer; got {value!r} (the back-matching rules change "
                             f"the signal to the layer below, which a recurrent layer sends "
                             f"through time inside its op)")
        self._cx_rule = value

    @classmethod
    def cx_takes_rule(cls, rule) -> bool:
        return rule_named(rule).name in RECURRENT_RULES

    def cx_gram_shape(self):
        return None  # one Gram per weight (cx_grams); a cell's calls each have their own

    def forward(self, input, hx=None):
        # Every parameter, a parametrization's too (nn's _flat_weights would be the previous
        # call's tensors here, before nn's forward refreshes them).
        if rule_named(self.rule).bypass or not (torch.is_grad_enabled() and any(
                p.requires_grad for p in self.parameters())):
            return super().forward(input, hx)
        if torch.compiler.is_exporting():
            # As the other C-layers (functional._bypassed): exported as nn's forward, said.
            if not torch.compiler.is_dynamo_compiling():
                _warn_export()
            return super().forward(input, hx)
        if torch.jit.is_tracing():
            # X of W_hh reaches the backward as a Python object filled after the op, outside
            # the traced graph: a traced module would solve with the trace input's rows on
            # every later call.
            raise NotImplementedError(
                f"torch.jit.trace cannot trace {type(self).__name__} while its weights train: "
                f"the rows its matched backward solves with are not traced ops, so the traced "
                f"module would reuse the trace input's rows on every call. Trace under "
                f"torch.no_grad() for inference (nn's forward), or train the eager or "
                f"torch.compile'd model")
        with FunctionalRoute({op: self._cx_route(op) for op in self._cx_ops}):
            return super().forward(input, hx)

    def _cx_route(self, op):
        return lambda *args: self._cx_call(op, *args)

    def extra_repr(self):
        return f"{super().extra_repr()}, {self._cx_repr()}"


class _CRNNBase(_Recurrent):
    """What CRNN / CLSTM / CGRU share: nn's fused op (all layers, both directions) as one op
    call per layer, whose weights go through ``MatchedRecurrentWeights``."""

    _cx_ops = _OPS

    @classmethod
    def cx_unsupported(cls, module):
        if getattr(module, "proj_size", 0) > 0:
            return _PROJECTED
        return None

    def cx_grams(self):
        """Each weight's Gram, amortised on its own: ``weight_ih_l0``'s on the layer's input
        rows, ``weight_hh_l0``'s on its states, … (with a bias row while the bias trains)."""
        return {name: (linear_gram_shape(getattr(self, name),
                                         getattr(self, "bias" + name[len("weight"):], None)),
                       getattr(self, name))
                for name in self._flat_weights_names if name.startswith("weight_")}

    def _cx_amortizer(self, name, weight, bias):
        """The amortizer of weight ``name`` (the op's ``weight``, ``bias``), checked, or None
        (exact)."""
        amortizers = amortizer_of(self)
        if amortizers is None:
            return None
        if not isinstance(amortizers, nn.ModuleDict) or name not in amortizers:
            got = list(amortizers) if isinstance(amortizers, nn.ModuleDict) \
                else type(amortizers).__name__
            raise ValueError(f"{type(self).__name__}: amortizer must be an nn.ModuleDict of "
                             f"GramAmortizers by weight name ({name!r} included), as "
                             f"cx.amortize makes it; got {got}")
        try:
            return check_amortizer(amortizers[name], linear_gram_shape(weight, bias), weight)
        except ValueError as error:     # which of the layer's amortizers is stale
            raise ValueError(f"{type(self).__name__}.{name}: {error}") from None

    def _cx_call(self, op, *args):
        """``op`` (nn's fused call: all layers, both directions) as one call per layer."""
        packed = isinstance(args[1], torch.Tensor) and args[1].dim() == 1 \
            and not args[1].is_floating_point()
        if packed:
            data, batch_sizes, hx, weights, has_biases, layers, dropout, train, bidir = args
            batch_first = False
        else:
            data, hx, weights, has_biases, layers, dropout, train, bidir, batch_first = args
            batch_sizes = None
        lstm = isinstance(hx, (tuple, list))
        h0 = hx[0] if lstm else hx
        dirs = 2 if bidir else 1
        per = len(weights) // (layers * dirs)
        names = self._flat_weights_names      # the op's weights, in the same order
        layer_input, states = data, []
        for layer in range(layers):
            first = layer * dirs
            # Both directions' W_ih multiply these rows: one Gram for both (exact solves).
            inputs = _Rows(layer_input.detach().reshape(-1, layer_input.shape[-1]),
                           shared=dirs == 2)
            hidden_rows = [_Rows() for _ in range(dirs)]
            flat = []
            for d in range(dirs):
                w = weights[(first + d) * per:(first + d + 1) * per]
                name = names[(first + d) * per:(first + d + 1) * per]
                b_ih, b_hh = (w[2], w[3]) if has_biases else (None, None)
                w_ih, b_ih = _matched(inputs, self.rule, self.ridge, w[0], b_ih,
                                      self._cx_amortizer(name[0], w[0], b_ih))
                w_hh, b_hh = _matched(hidden_rows[d], self.rule, self.ridge, w[1], b_hh,
                                      self._cx_amortizer(name[1], w[1], b_hh))
                flat += [w_ih, w_hh] + ([b_ih, b_hh] if has_biases else [])
            h0_layer = h0[first:first + dirs]
            hx_layer = (h0_layer, hx[1][first:first + dirs]) if lstm else h0_layer
            call = (layer_input, batch_sizes, hx_layer, flat, has_biases, 1, 0.0, train, bidir) \
                if packed else (layer_input, hx_layer, flat, has_biases, 1, 0.0, train, bidir,
                                batch_first)
            with _cudnn_copy_unsaid() if layer_input.is_cuda else contextlib.nullcontext():
                out, *state = op(*call)
            for d in range(dirs):
                # detached first: the rows' slicing and concatenation record no graph
                hidden_rows[d].rows = _previous_states(out.detach(), h0_layer[d].detach(), d,
                                                       h0.shape[-1], batch_sizes, batch_first)
            states.append(state)
            # nn's dropout between layers (at::dropout, as the fused op applies it)
            layer_input = F.dropout(out, dropout, True) \
                if dropout and train and layer < layers - 1 else out
        return (out, *(torch.cat(parts) for parts in zip(*states)))


class CRNN(_CRNNBase, nn.RNN):
    """``nn.RNN`` (its arguments, then keyword-only ``rule`` and ``ridge``) whose weights get
    the gradient of ``rule``: per layer and direction, ``[weight_ih | bias_ih]`` matched on
    the layer's input rows and ``[weight_hh | bias_hh]`` on the states each step starts from
    (``h_{t-1}``; ``h0``, given or zeros, at a sequence's first step; the reverse
    direction's ``h_{t+1}``), every valid step of every sequence (a ``PackedSequence``'s own
    lengths), N = those rows, G the call's ordinary gradient. A layer above the first is
    matched on what it received: the layer below's output after nn's dropout. Forward is
    nn's, bit-identical, dropout included, on CPU (on CUDA cuDNN's fused call draws other
    dropout masks, docs/design.md §2); the gradients to the input and ``h0`` are BP's.
    rule: ``"consequential"`` (default) or ``"sgd"`` (the back-matching rules change the
    signal to the layer below, which this layer sends through time: ValueError); ridge: as
    in ``CLinear``. ``cx.amortize`` gives it one running Gram per weight
    (``self.amortizer[name]``)."""


class CLSTM(_CRNNBase, nn.LSTM):
    """``nn.LSTM`` matched as ``CRNN`` is, each weight's four gates together (``c0`` gets BP's
    gradient). ``proj_size`` must be 0 (ValueError): the projection's input
    ``o_t ⊙ tanh(c_t)`` is not returned by the op."""


class CGRU(_CRNNBase, nn.GRU):
    """``nn.GRU`` matched as ``CRNN`` is, each weight's three gates together: ``[W_hh | b_hh]``
    on ``[h_{t-1}; 1]``, its new gate's ``W_hn h + b_hn`` taken before the reset gate scales
    it."""


class _CCellBase(_Recurrent):
    """What CRNNCell / CLSTMCell / CGRUCell share: one step, ``W_ih`` on the input rows and
    ``W_hh`` on the state rows the call is given (both known before the op)."""

    _cx_ops = _CELL_OPS

    def _cx_call(self, op, input, hx, w_ih, w_hh, b_ih, b_hh):
        state = hx[0] if isinstance(hx, (tuple, list)) else hx
        # With their history (no cycle: they come from before this call), so that
        # create_graph=True differentiates through X too.
        w_ih, b_ih = _matched(_Rows(input, graphed=True), self.rule, self.ridge, w_ih, b_ih)
        w_hh, b_hh = _matched(_Rows(state, graphed=True), self.rule, self.ridge, w_hh, b_hh)
        return op(input, hx, w_ih, w_hh, b_ih, b_hh)


class CRNNCell(_CCellBase, nn.RNNCell):
    """``nn.RNNCell`` (its arguments, then keyword-only ``rule`` and ``ridge``) whose
    ``[weight_ih | bias_ih]`` is matched on the input rows and ``[weight_hh | bias_hh]`` on
    the state rows of the call (``hx``, or zeros), N = the batch; each call (each step of a
    loop) is matched on its own rows. Forward nn's; rule, ridge: as in ``CRNN``."""


class CLSTMCell(_CCellBase, nn.LSTMCell):
    """``nn.LSTMCell`` matched as ``CRNNCell`` is, ``W_hh`` on ``h`` (``c`` gets BP's
    gradient)."""


class CGRUCell(_CCellBase, nn.GRUCell):
    """``nn.GRUCell`` matched as ``CRNNCell`` is (``W_hn h + b_hn`` before the reset gate)."""
