"""CRNN / CLSTM / CGRU (``consequential_ext/recurrent.py``) against the independent float64
reference of ``recurrent_reference.py``: every ``[weight | bias]`` of every layer and
direction matched on the rows it multiplied (the layer's input at each valid step, the state
each valid step starts from), over layers, directions, packed variable lengths, batch_first,
unbatched input, initial states, frozen / absent biases, frozen weights, dropout between
layers and several calls per backward; the forward and the gradients to the inputs and
initial states are nn's own."""
from __future__ import annotations

import copy
import fnmatch
import pickle
from dataclasses import dataclass, field, replace

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as parametrize
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, PackedSequence

from consequential_ext import recurrent
from consequential_ext.recurrent import CGRU, CLSTM, CRNN
from recurrent_reference import dropout_masks, match, suffix, unroll
from relative_error import rel_err

BOUND = 1e-9           # float64 against the float64 reference (norm-wise relative)
BOUND_F32 = 1e-4       # float32 layer against the float64 reference

MODES = {
    "RNN_TANH": (nn.RNN, CRNN, {"nonlinearity": "tanh"}),
    "RNN_RELU": (nn.RNN, CRNN, {"nonlinearity": "relu"}),
    "LSTM": (nn.LSTM, CLSTM, {}),
    "GRU": (nn.GRU, CGRU, {}),
}


@dataclass
class Case:
    mode: str
    input_size: int = 3
    hidden: int = 5
    layers: int = 1
    bidir: bool = False
    batch_first: bool = False
    bias: bool = True
    layout: str = "padded"          # "padded", "packed" (enforce_sorted=False), "unbatched"
    lengths: tuple = (4, 4, 4)      # one per sequence; padded / unbatched: all equal
    h0: bool = False                # pass h0 (and c0) or let nn use zeros
    dropout: float = 0.0
    train: bool = True
    frozen: tuple = ()              # fnmatch patterns of parameter names frozen
    loss: str = "all"               # "all": output, h_n, c_n; "state": h_n, c_n; "c": c_n
    noncontig: bool = False         # the input a strided view (every other feature)
    dtype: torch.dtype = torch.float64
    ridge: float = 1e-3

    @property
    def dirs(self):
        return 2 if self.bidir else 1


@dataclass
class Call:
    """One forward call's inputs and the cotangents of its loss, all float64 (time-major,
    zero past each sequence's length)."""
    values: torch.Tensor            # (T, B, in)
    lengths: list
    seed: int
    h0: torch.Tensor | None = None  # (layers·dirs, B, H)
    c0: torch.Tensor | None = None
    gy: torch.Tensor | None = None  # (T, B, dirs·H)
    ghn: torch.Tensor | None = None
    gcn: torch.Tensor | None = None
    sorted_indices: list | None = field(default=None)   # packed: filled by the C-side build


def modules(case, rule="consequential"):
    nn_cls, c_cls, extra = MODES[case.mode]
    kwargs = dict(input_size=case.input_size, hidden_size=case.hidden,
                  num_layers=case.layers, bias=case.bias, batch_first=case.batch_first,
                  dropout=case.dropout, bidirectional=case.bidir, dtype=case.dtype, **extra)
    plain = nn_cls(**kwargs)
    for p in plain.parameters():           # O(1) weights: states away from saturation
        with torch.no_grad():
            p.uniform_(-0.6, 0.6)
    layer = c_cls(**kwargs, rule=rule, ridge=case.ridge)
    layer.load_state_dict(plain.state_dict())
    for m in (plain, layer):
        m.train(case.train)
        for name, p in m.named_parameters():
            if any(fnmatch.fnmatchcase(name, pat) for pat in case.frozen):
                p.requires_grad_(False)
    return plain, layer


def new_call(case, seed=1234, lengths=None):
    lengths = list(lengths or case.lengths)
    t, b, h = max(lengths), len(lengths), case.hidden
    values = torch.randn(t, b, case.input_size, dtype=torch.float64)
    valid = (torch.arange(t)[:, None] < torch.tensor(lengths)[None]).double()[..., None]
    values = values * valid
    states = case.layers * case.dirs
    call = Call(values, lengths, seed)
    if case.h0:
        call.h0 = torch.randn(states, b, h, dtype=torch.float64) * 0.5
        if case.mode == "LSTM":
            call.c0 = torch.randn(states, b, h, dtype=torch.float64) * 0.5
    if case.loss == "all":
        call.gy = torch.randn(t, b, case.dirs * h, dtype=torch.float64) * valid
    if case.loss in ("all", "state"):
        call.ghn = torch.randn(states, b, h, dtype=torch.float64)
    if case.mode == "LSTM" and case.loss in ("all", "state", "c"):
        call.gcn = torch.randn(states, b, h, dtype=torch.float64)
    return call


def run_layer(module, case, call, hx_override=None):
    """Run ``module`` on ``call`` as the user would (layout, batch_first, strides); returns
    (raw output, time-major padded output, h_n, c_n (B-dim restored), loss, leaves)."""
    dtype = case.dtype
    lstm = case.mode == "LSTM"
    if case.noncontig:
        big = torch.zeros(*call.values.shape[:2], 2 * case.input_size, dtype=dtype)
        big[..., ::2] = call.values.to(dtype)
        leaf = big.requires_grad_()
        x_tm = leaf[..., ::2]
    else:
        leaf = call.values.to(dtype, copy=True).requires_grad_()
        x_tm = leaf
    leaves = {"input": leaf}
    if case.layout == "unbatched":
        x = x_tm[:, 0]
    else:
        x = x_tm.transpose(0, 1) if case.batch_first else x_tm
        if case.batch_first and not case.noncontig:
            x = x.contiguous()
    if case.noncontig:
        assert not x.is_contiguous()
    if case.layout == "packed":
        x = pack_padded_sequence(x, call.lengths, batch_first=case.batch_first,
                                 enforce_sorted=False)
        call.sorted_indices = x.sorted_indices.tolist()
    hx = None
    if call.h0 is not None:
        squeeze = (lambda s: s[:, 0]) if case.layout == "unbatched" else (lambda s: s)
        h0 = call.h0.to(dtype, copy=True).requires_grad_()
        leaves["h0"] = h0
        hx = squeeze(h0)
        if lstm:
            c0 = call.c0.to(dtype, copy=True).requires_grad_()
            leaves["c0"] = c0
            hx = (hx, squeeze(c0))
    if hx_override is not None:
        hx = hx_override
    torch.manual_seed(call.seed)
    out, state = module(x, hx)
    h_n, c_n = state if lstm else (state, None)
    if case.layout == "packed":
        assert isinstance(out, PackedSequence)
        out_tm = pad_packed_sequence(out, total_length=max(call.lengths))[0]
    elif case.layout == "unbatched":
        out_tm = out[:, None]
        h_n = h_n[:, None]
        c_n = None if c_n is None else c_n[:, None]
    else:
        out_tm = out.transpose(0, 1) if case.batch_first else out
    loss = 0
    for g, y in ((call.gy, out_tm), (call.ghn, h_n), (call.gcn, c_n)):
        if g is not None:
            loss = loss + (y.double() * g).sum()
    return out, out_tm, h_n, c_n, loss, leaves


def per_sequence_masks(case, call):
    """The dropout multipliers nn draws for ``call`` (reseeded), as per-sequence (L_b, ·)."""
    if not (case.dropout and case.train and case.layers > 1):
        return None
    lengths, width = call.lengths, case.dirs * case.hidden
    t, b = max(lengths), len(lengths)
    shape = (sum(lengths), width) if case.layout == "packed" else (t, b, width)
    torch.manual_seed(call.seed)
    drawn = dropout_masks(case.layers, case.dropout, shape, case.dtype)
    out = []
    for m in drawn:
        if case.layout != "packed":
            out.append([m[:n, i] for i, n in enumerate(lengths)])
            continue
        # packed data: time-major, at step s the sequences still running, longest first
        rows = {i: [] for i in range(b)}
        k = 0
        for s in range(t):
            for i in call.sorted_indices:
                if lengths[i] > s:
                    rows[i].append(m[k])
                    k += 1
        assert k == m.shape[0]
        out.append([torch.stack(rows[i]) for i in range(b)])
    return out


def reference(case, params, calls, chain=False):
    """Per call: its float64 unroll (own weight leaves, so each call's G is its own) and
    rows; one joint loss; then the matched gradient summed over the calls. ``chain``: each
    call after the first starts from the previous call's final state.
    Returns (outputs per call, expected parameter grads, input / h0 / c0 grads per call)."""
    lstm = case.mode == "LSTM"
    per_call, loss = [], 0
    prev = None
    for call in calls:
        w = {n: p.detach().double().clone().requires_grad_() for n, p in params.items()}
        x = call.values.clone().requires_grad_()
        seqs = [x[:n, i] for i, n in enumerate(call.lengths)]
        h0 = None if call.h0 is None else call.h0.clone().requires_grad_()
        c0 = None if call.c0 is None else call.c0.clone().requires_grad_()
        if chain and prev is not None:
            h0, c0 = prev
        outs, h_n, c_n, rows = unroll(case.mode, w, seqs, h0, c0, case.layers, case.dirs,
                                      case.hidden, per_sequence_masks(case, call))
        prev = (h_n, c_n)
        if call.gy is not None:
            loss = loss + sum((o * call.gy[:n, i]).sum()
                              for i, (o, n) in enumerate(zip(outs, call.lengths)))
        if call.ghn is not None:
            loss = loss + (h_n * call.ghn).sum()
        if call.gcn is not None:
            loss = loss + (c_n * call.gcn).sum()
        out_tm = torch.zeros(max(call.lengths), len(call.lengths), case.dirs * case.hidden,
                             dtype=torch.float64)
        for i, (o, n) in enumerate(zip(outs, call.lengths)):
            out_tm[:n, i] = o.detach()
        per_call.append(dict(w=w, x=x, h0=h0, c0=c0, rows=rows, out=out_tm,
                             h_n=h_n.detach(), c_n=None if c_n is None else c_n.detach()))
    loss.backward()
    expected = {}
    for layer in range(case.layers):
        for d in range(case.dirs):
            s = suffix(layer, d)
            for kind in ("ih", "hh"):
                wn, bn = f"weight_{kind}{s}", f"bias_{kind}{s}"
                w_trains = params[wn].requires_grad
                b_trains = bn in params and params[bn].requires_grad
                total_w = total_b = None
                for r in per_call:
                    gw = r["w"][wn].grad
                    gb = r["w"][bn].grad if bn in params else None
                    mw, mb = match(gw, gb, r["rows"][wn], case.ridge, w_trains, b_trains)
                    total_w = mw if total_w is None else total_w + mw
                    total_b = mb if total_b is None else total_b + mb
                expected[wn] = total_w
                if bn in params:
                    expected[bn] = total_b
    return per_call, expected


def final_state(case, run):
    """A run's (h_n, c_n) as the next call's hx."""
    h_n, c_n = run[2], run[3]
    if case.layout == "unbatched":
        h_n, c_n = h_n[:, 0], (None if c_n is None else c_n[:, 0])
    return (h_n, c_n) if case.mode == "LSTM" else h_n


def check_case(case, calls=None, chain=False):
    plain, layer = modules(case)
    calls = calls or [new_call(case)]
    bound = BOUND if case.dtype == torch.float64 else BOUND_F32
    params = dict(layer.named_parameters())

    runs, plain_runs, loss, plain_loss = [], [], 0, 0
    prev = prev_plain = None
    for call in calls:
        override = prev if chain and prev is not None else None
        run = run_layer(layer, case, call, override)
        plain_override = prev_plain if chain and prev_plain is not None else None
        plain_run = run_layer(plain, case, call, plain_override)
        prev, prev_plain = final_state(case, run), final_state(case, plain_run)
        # nn's forward, bit for bit (the same dropout draws)
        for a, b in zip(run[:4], plain_run[:4]):
            if isinstance(a, PackedSequence):
                a, b = a.data, b.data
            if a is not None:
                assert torch.equal(a, b)
        runs.append(run)
        plain_runs.append(plain_run)
        loss = loss + run[4]
        plain_loss = plain_loss + plain_run[4]
    loss.backward()
    plain_loss.backward()

    per_call, expected = reference(case, params, calls, chain)
    f_bound = 1e-12 if case.dtype == torch.float64 else 1e-5
    for run, ref in zip(runs, per_call):
        # the reference's forward is nn's (so its dropout masks and rows are nn's too)
        assert rel_err(run[1].detach(), ref["out"]) < f_bound
        assert rel_err(run[2].detach(), ref["h_n"]) < f_bound
        if ref["c_n"] is not None:
            assert rel_err(run[3].detach(), ref["c_n"]) < f_bound
    checked = 0
    for name, p in layer.named_parameters():
        want = expected[name]
        if not p.requires_grad:
            assert p.grad is None
            continue
        assert p.grad is not None and p.grad.dtype == case.dtype, name
        if not want.any():      # W_hh of one step from zeros: G = 0 (and so matched)
            assert not p.grad.any(), name
            continue
        err = rel_err(p.grad, want)
        assert err < bound, (name, err)
        # and it is not the ordinary gradient (a frozen weight's bias: off by λ/(1+λ))
        assert rel_err(p.grad, plain.get_parameter(name).grad) > 5e-4, name
        checked += 1
    assert checked > 0
    # the gradients to the input and the initial states: nn's, and the reference's
    for run, plain_run, ref in zip(runs, plain_runs, per_call):
        for key in run[5]:
            got = run[5][key].grad
            assert got is not None
            tol = 1e-12 if case.dtype == torch.float64 else 1e-6
            torch.testing.assert_close(got, plain_run[5][key].grad, rtol=tol, atol=tol)
            if case.noncontig and key == "input":
                assert not got[..., 1::2].any()
                got = got[..., ::2]
            want = {"input": ref["x"], "h0": ref["h0"], "c0": ref["c0"]}[key].grad
            assert rel_err(got, want) < f_bound * 10, key
    return layer, plain


ALL = tuple(MODES)
L, G, T, R = "LSTM", "GRU", "RNN_TANH", "RNN_RELU"
CASES = {
    "one-layer-h0": ([T, R, L, G], Case("", h0=True, lengths=(4, 4, 4))),
    "deep-bidir-batch-first": ([T, L, G], Case("", input_size=4, hidden=3, layers=3,
                                                bidir=True, batch_first=True,
                                                lengths=(5, 5))),
    "packed-unsorted-bidir-h0": ([T, R, L, G], Case("", layers=2, bidir=True, layout="packed",
                                                      lengths=(2, 5, 1, 5, 3), h0=True)),
    "packed-batch-first": ([L, G], Case("", batch_first=True, layout="packed",
                                        lengths=(3, 1, 4), input_size=2, hidden=4)),
    "unbatched-bidir-h0": ([R, L, G], Case("", input_size=5, hidden=4, layers=2, bidir=True,
                                           layout="unbatched", lengths=(6,), h0=True)),
    "unbatched-batch-first": ([L], Case("", batch_first=True, layout="unbatched",
                                        lengths=(3,))),
    "fewer-rows-than-columns": ([T, R, L, G], Case("", input_size=11, hidden=9, layers=2,
                                                    lengths=(1,), h0=True)),
    "T1-bidir": ([L, G], Case("", input_size=7, hidden=6, bidir=True, lengths=(1, 1, 1))),
    "no-bias": ([T, L, G], Case("", bias=False, layers=2, bidir=True, lengths=(3, 3))),
    "frozen-biases": ([T, L], Case("", frozen=("bias_*",), layers=2, h0=True)),
    "frozen-weights": ([G, L], Case("", frozen=("weight_hh_l0", "weight_ih_l1_reverse",
                                                "bias_ih_l1"), layers=2, bidir=True)),
    "dropout-deep-bidir": ([L, G, R], Case("", layers=3, bidir=True, dropout=0.4,
                                           lengths=(4, 4), hidden=4)),
    "dropout-packed": ([T, L], Case("", layers=2, dropout=0.5, layout="packed",
                                    lengths=(3, 5, 2, 5), bidir=True)),
    "dropout-batch-first": ([L, G], Case("", layers=2, dropout=0.3, batch_first=True,
                                         lengths=(4, 4, 4))),
    "dropout-eval": ([L], Case("", layers=2, dropout=0.5, train=False)),
    "noncontig": ([L, G], Case("", noncontig=True, layers=2, lengths=(3, 3))),
    "noncontig-batch-first": ([T], Case("", noncontig=True, batch_first=True, bidir=True)),
    "loss-on-states": ([L, T], Case("", loss="state", layers=2, bidir=True, h0=True)),
    "loss-on-c-only": ([L], Case("", loss="c", layers=2, lengths=(3, 3))),
    "float32-packed": ([L, G], Case("", dtype=torch.float32, layers=2, bidir=True,
                                    layout="packed", lengths=(6, 2, 7, 4), hidden=4)),
    "float32-padded-h0": ([T], Case("", dtype=torch.float32, h0=True, lengths=(8, 8, 8))),
    "everything-at-once": (ALL, Case("", input_size=13, hidden=17, layers=3, bidir=True,
                                     batch_first=True, layout="packed", h0=True, dropout=0.25,
                                     lengths=(7, 1, 4, 7, 2, 5, 3), frozen=("bias_ih_l1",))),
    "batch-1-long": ([R, G], Case("", lengths=(9,), input_size=2, hidden=3, layers=2)),
    # float32 LSTM, padded: CPU's mkldnn path; dropout masks drawn in float32
    "float32-dropout-batch-first": ([L], Case("", dtype=torch.float32, layers=3, dropout=0.3,
                                              batch_first=True, lengths=(5, 5, 5), hidden=4)),
}
PARAMS = [pytest.param(replace(case, mode=mode), id=f"{name}-{mode}")
          for name, (modes, case) in CASES.items() for mode in modes]


@pytest.mark.parametrize("case", PARAMS)
def test_matched_gradients_against_reference(case):
    check_case(case)


@pytest.mark.parametrize("frozen,grams", [((), 6), (("bias_ih_l0_reverse",), 7),
                                          (("weight_ih_l1",), 6)])
def test_bidirectional_layer_builds_its_input_gram_once(monkeypatch, frozen, grams):
    """Both directions' ``[W_ih | b_ih]`` multiply the layer's input rows: one Gram serves
    the two — per layer that one and each direction's W_hh Gram, 3 — and the gradients are
    still the reference's. A direction whose bias is frozen has no 1-row: a Gram of its own
    (7); a frozen weight solves nothing (its bias: A = 1), so the other direction builds it."""
    built = []
    original = recurrent._linear_gram

    def counted(x, has_bias):
        built.append((x.shape, has_bias))
        return original(x, has_bias)

    monkeypatch.setattr(recurrent, "_linear_gram", counted)
    check_case(Case(G, layers=2, bidir=True, h0=True, lengths=(3, 3), frozen=frozen))
    assert len(built) == grams, built


@pytest.mark.parametrize("mode", [L, G])
def test_second_backward_through_a_kept_graph_gets_the_same_matched_gradient(mode):
    """retain_graph: the second backward solves with the Gram the first kept for both
    directions, unchanged by the first's solves, so it adds exactly the same gradient."""
    case = Case(mode, layers=2, bidir=True, lengths=(4, 4))
    _, layer = modules(case)
    loss = run_layer(layer, case, new_call(case))[4]
    loss.backward(retain_graph=True)
    first = {n: p.grad.clone() for n, p in layer.named_parameters()}
    loss.backward()
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, 2 * first[name], rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode,layout", [(L, "padded"), (G, "packed"), (T, "unbatched")])
def test_two_calls_sum_their_matched_gradients(mode, layout):
    """Two forward calls, the second starting from the first's final state, one backward:
    each call's own G matched on its own rows, summed."""
    case = Case(mode, layers=2, bidir=layout != "unbatched", layout=layout, h0=True,
                lengths=(1,) if layout == "unbatched" else (3, 3))
    calls = [new_call(case, seed=1),
             new_call(case, seed=2, lengths=(5,) if layout == "unbatched" else
                      ((4, 2) if layout == "packed" else (2, 2)))]
    calls[1].h0 = calls[1].c0 = None      # it starts from the first call's final state
    layer, _ = check_case(case, calls, chain=True)
    # one call alone differs
    single, _ = modules(case)
    single.load_state_dict(layer.state_dict())
    run_layer(single, case, new_call(case, seed=1))[4].backward()
    assert rel_err(single.weight_hh_l0.grad, layer.weight_hh_l0.grad) > 1e-3


@pytest.mark.parametrize("mode", ALL)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_sgd_rule_is_nn_bit_for_bit(mode, layout):
    case = Case(mode, layers=2, bidir=True, dropout=0.3, layout=layout, lengths=(3, 1, 4),
                h0=True, dtype=torch.float32)
    plain, _ = modules(case)
    _, layer = modules(case, rule="sgd")
    layer.load_state_dict(plain.state_dict())
    call = new_call(case)
    for m in (plain, layer):
        run_layer(m, case, call)[4].backward()
    for name, p in layer.named_parameters():
        assert torch.equal(p.grad, plain.get_parameter(name).grad), name
    # switching the rule on the same layer switches the gradient
    layer.zero_grad()
    layer.rule = "consequential"
    run_layer(layer, case, call)[4].backward()
    assert rel_err(layer.weight_hh_l1.grad, plain.weight_hh_l1.grad) > 1e-3


@pytest.mark.parametrize("mode", [L, G])
def test_no_grad_and_inference_forward_are_nn(mode):
    case = Case(mode, layers=2, bidir=True, dropout=0.5, layout="packed", lengths=(2, 4, 3))
    plain, layer = modules(case)
    x = torch.randn(4, 3, case.input_size, dtype=case.dtype)
    packed = pack_padded_sequence(x, [2, 4, 3], enforce_sorted=False)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            torch.manual_seed(7)
            out, state = layer(packed)
            torch.manual_seed(7)
            want, want_state = plain(packed)
        assert torch.equal(out.data, want.data)
        assert not out.data.requires_grad
        for a, b in zip(state if mode == L else (state,), want_state if mode == L
                        else (want_state,)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", [L, T])
def test_grad_with_respect_to_input_only(mode):
    """``torch.autograd.grad(loss, x)``: nn's input gradient, no parameter .grad written."""
    case = Case(mode, layers=2, bidir=True, h0=True)
    plain, layer = modules(case)
    call = new_call(case)
    run = run_layer(layer, case, call)
    plain_run = run_layer(plain, case, call)
    got = torch.autograd.grad(run[4], run[5]["input"])[0]
    want = torch.autograd.grad(plain_run[4], plain_run[5]["input"])[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert all(p.grad is None for p in layer.parameters())


def test_deepcopy_pickle_state_dict_keep_the_rule():
    case = Case(L, layers=2, bidir=True, ridge=0.05)
    plain, layer = modules(case)
    layer.rule = "consequential"
    clones = [copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))]
    fresh = CLSTM(3, 5, num_layers=2, bidirectional=True, dtype=torch.float64, ridge=0.05)
    fresh.load_state_dict(layer.state_dict())
    assert set(layer.state_dict()) == set(plain.state_dict())
    call = new_call(case)
    run_layer(layer, case, call)[4].backward()
    for other in clones + [fresh]:
        assert other.ridge == 0.05 and other.rule == "consequential"
        run_layer(other, case, call)[4].backward()
        for name, p in layer.named_parameters():
            torch.testing.assert_close(other.get_parameter(name).grad, p.grad,
                                       rtol=1e-12, atol=0)


@pytest.mark.parametrize("cls", [CRNN, CLSTM, CGRU])
def test_bad_arguments_name_themselves(cls):
    for rule in ("backmatch", "backmatch-layerwise"):
        with pytest.raises(ValueError, match=f"rule.*'{rule}'"):
            cls(3, 4, rule=rule)
    with pytest.raises(ValueError, match="rule"):
        cls(3, 4, rule="nope")
    layer = cls(3, 4)
    with pytest.raises(ValueError, match="backmatch"):
        layer.rule = "backmatch"
    assert layer.rule == "consequential"
    for ridge in (0, -1e-3, float("nan"), float("inf"), True, "1e-3"):
        with pytest.raises(ValueError, match="ridge"):
            cls(3, 4, ridge=ridge)
    with pytest.raises(ValueError, match="ridge"):
        layer.ridge = 0.0
    assert layer.ridge == 1e-3


def test_lstm_projection_is_refused():
    with pytest.raises(ValueError, match="proj_size"):
        CLSTM(3, 6, proj_size=2)
    CLSTM(3, 6, proj_size=0)


@pytest.mark.parametrize("asked", [("bias_hh_l0",), ("weight_hh_l0",),
                                   ("weight_ih_l0_reverse", "bias_hh_l0")])
def test_partial_backward_gets_the_full_backwards_gradient(asked):
    """``backward(inputs=...)`` naming some of the parameters: those get what a full backward
    gives them (the formula follows which parameters train, not which are asked for), the
    others nothing."""
    case = Case(G, bidir=True, h0=True)
    plain, full = modules(case)
    _, part = modules(case)
    part.load_state_dict(full.state_dict())
    call = new_call(case)
    run_layer(full, case, call)[4].backward()
    run_layer(part, case, call)[4].backward(inputs=[part.get_parameter(n) for n in asked])
    for name, p in part.named_parameters():
        if name in asked:
            assert rel_err(p.grad, full.get_parameter(name).grad) < 1e-12, name
        else:
            assert p.grad is None, name


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


@pytest.mark.parametrize("no_grad_call_before", [False, True])
def test_parametrized_weight_is_matched(no_grad_call_before):
    """W = 2 V by a parametrization: V's gradient is 2 × the matched gradient of W — also
    when V is the only trainable tensor and the previous call ran under no_grad (the
    layer's weight list is refreshed before it decides to match)."""
    case = Case(L, bidir=True)
    _, layer = modules(case)
    _, direct = modules(case)
    direct.load_state_dict(layer.state_dict())
    with torch.no_grad():
        direct.weight_hh_l0_reverse.mul_(2)
    for p in list(layer.parameters()) + list(direct.parameters()):
        p.requires_grad_(False)
    direct.weight_hh_l0_reverse.requires_grad_(True)
    parametrize.register_parametrization(layer, "weight_hh_l0_reverse", _Double())
    original = layer.parametrizations.weight_hh_l0_reverse.original
    original.requires_grad_(True)
    call = new_call(case)
    if no_grad_call_before:
        with torch.no_grad():
            run_layer(layer, case, call)
    run_layer(layer, case, call)[4].backward()
    run_layer(direct, case, call)[4].backward()
    assert rel_err(original.grad, 2 * direct.weight_hh_l0_reverse.grad) < 1e-12
    # and that is not nn's gradient
    plain = MODES[L][0](3, 5, bidirectional=True, dtype=torch.float64)
    plain.load_state_dict(direct.state_dict())
    run_layer(plain, case, call)[4].backward()
    assert rel_err(direct.weight_hh_l0_reverse.grad, plain.weight_hh_l0_reverse.grad) > 1e-3
