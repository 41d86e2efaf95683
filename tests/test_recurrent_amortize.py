"""``cx.amortize`` of CRNN / CLSTM / CGRU: one running Gram per weight, against a float64
re-implementation of the schedule, damping and safeguard (amortize.py) from the independent
reference's ordinary gradients and rows (``recurrent_reference.py``); the exact solve where
a weight has fewer rows than columns; checkpoints, removal, the cells (exact) and the
forward check of a stale amortizer."""
from __future__ import annotations

import copy
import io
import sys
import warnings
from dataclasses import replace

import pytest
import torch
import torch.nn as nn

import consequential_ext as cx
from consequential_ext.recurrent import CLSTM
from recurrent_reference import suffix
from relative_error import rel_err
from test_recurrent import Case, modules, new_call, reference, run_layer

BOUND = 1e-9
ALL_ROWS = 10 ** 6     # safeguard columns past every batch here: the energy of all rows


def _grads(layer, case, call):
    layer.zero_grad()
    run_layer(layer, case, call)[4].backward()
    return {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


def _weights(case):
    for layer in range(case.layers):
        for d in range(case.dirs):
            for kind in ("ih", "hh"):
                yield f"weight_{kind}{suffix(layer, d)}", f"bias_{kind}{suffix(layer, d)}"


def _damped_inverse(a, ridge, damping):
    lam = ridge + damping * a.diagonal().mean()
    return torch.linalg.inv(a + lam * torch.eye(a.shape[0], dtype=a.dtype))


@pytest.mark.parametrize("case", [
    Case("LSTM", layers=2, bidir=True, ridge=0.05),
    Case("GRU", layout="packed", lengths=(5, 2, 4), h0=True, ridge=0.05),
    Case("RNN_TANH", bias=False, batch_first=True, ridge=0.05),
    Case("LSTM", frozen=("bias_hh_l0",), ridge=0.05),
], ids=lambda c: f"{c.mode}-{c.layers}x{c.dirs}-{c.layout}-bias{c.bias}-frozen{len(c.frozen)}")
def test_schedule_damping_and_safeguard_match_a_float64_reimplementation(case):
    """Per weight: the EMA of its own Gram (rows of this step) folded every ``gram_every``,
    the damped inverse every ``every``, the step shortened to this batch's quadratic model —
    the exact energy on a Gram step, all rows' energy between (safeguard past the batch)."""
    torch.manual_seed(3)
    every, gram_every, decay, damping = 4, 2, 0.7, 0.3
    _, layer = modules(case)
    cx.amortize(layer, every=every, gram_every=gram_every, decay=decay, damping=damping,
                gram_oversample=None, safeguard_columns=ALL_ROWS, exact_when_cheaper=False)
    params = dict(layer.named_parameters())
    state = {}
    for step in range(7):
        call = new_call(case, seed=step)
        call.values = call.values * (1 + 0.5 * step)          # the Gram drifts
        got = _grads(layer, case, call)
        per_call, _ = reference(case, params, [call])
        r = per_call[0]
        for wn, bn in _weights(case):
            with_bias = bn in params and params[bn].requires_grad
            x = r["rows"][wn]
            g = r["w"][wn].grad
            if with_bias:
                x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
                g = torch.cat([g, r["w"][bn].grad[:, None]], 1)
            a = x.T @ x / x.shape[0]
            ema, inverse = state.get(wn, (None, None))
            if step % gram_every == 0:
                ema = a if ema is None else \
                    decay ** gram_every * ema + (1 - decay ** gram_every) * a
            if step % every == 0:
                inverse = _damped_inverse(ema, case.ridge, damping)
            state[wn] = ema, inverse
            direction = g @ inverse
            energy = ((direction @ a) * direction).sum()       # all rows, either way
            gain = (g * direction).sum()
            scale = min(1.0, float(gain / (energy + case.ridge * direction.square().sum())))
            expected = direction * scale
            assert rel_err(got[wn], expected[:, :x.shape[1] - with_bias]) < BOUND, (step, wn)
            if with_bias:
                assert rel_err(got[bn], expected[:, -1]) < BOUND, (step, bn)
        assert int(layer.amortizer[wn].steps) == step + 1


def test_fresh_undamped_every_step_is_the_exact_matched_gradient():
    case = Case("LSTM", layers=2, bidir=True, input_size=4, hidden=3, lengths=(6, 6))
    torch.manual_seed(0)
    _, exact = modules(case)
    amortised = cx.amortize(copy.deepcopy(exact), every=1, decay=0.0, damping=0.0,
                            safeguard_columns=None, gram_oversample=None)
    for seed in range(3):
        call = new_call(case, seed=seed)
        want, got = _grads(exact, case, call), _grads(amortised, case, call)
        assert want.keys() == got.keys()
        for name in want:
            assert rel_err(got[name], want[name]) < BOUND, name
    assert int(amortised.amortizer.weight_hh_l1_reverse.steps) == 3


def test_a_weight_with_fewer_rows_than_columns_is_solved_exactly_and_its_state_untouched():
    """W_ih: 2 × 3 = 6 rows of 21 columns (rank 6): the exact float64 solve; W_hh: 6 rows of
    4 columns, amortised."""
    case = Case("GRU", input_size=20, hidden=3, lengths=(3, 3))
    torch.manual_seed(1)
    _, exact = modules(case)
    amortised = cx.amortize(copy.deepcopy(exact), every=2, damping=0.5)
    call = new_call(case)
    want, got = _grads(exact, case, call), _grads(amortised, case, call)
    assert rel_err(got["weight_ih_l0"], want["weight_ih_l0"]) < BOUND
    assert rel_err(got["bias_ih_l0"], want["bias_ih_l0"]) < BOUND
    assert int(amortised.amortizer.weight_ih_l0.steps) == 0
    assert not amortised.amortizer.weight_ih_l0.gram.any()
    assert int(amortised.amortizer.weight_hh_l0.steps) == 1
    assert rel_err(got["weight_hh_l0"], want["weight_hh_l0"]) > 1e-3   # damped: not exact
    # exact_when_cheaper=False: amortised there too
    cx.amortize(amortised, every=2, exact_when_cheaper=False)
    _grads(amortised, case, call)
    assert int(amortised.amortizer.weight_ih_l0.steps) == 1


def _tagger():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.emb = nn.Embedding(11, 6)
    model.lstm = nn.LSTM(6, 8, num_layers=2, batch_first=True)
    model.cell = nn.GRUCell(8, 8)
    model.head = nn.Linear(8, 3)
    return model


def _tag(model, ids):
    out, _ = model.lstm(model.emb(ids))
    return model.head(model.cell(out[:, -1])).square().sum()


def test_amortize_gives_each_weight_its_state_dict_entries_and_leaves_cells_exact():
    model = cx.amortize(cx.consequentialize(_tagger()), every=3)
    assert set(model.lstm.amortizer) == {"weight_ih_l0", "weight_hh_l0", "weight_ih_l1",
                                         "weight_hh_l1"}
    assert tuple(model.lstm.amortizer.weight_ih_l0.gram.shape) == (7, 7)
    assert tuple(model.lstm.amortizer.weight_ih_l1.gram.shape) == (9, 9)
    assert "lstm.amortizer.weight_hh_l1.inverse" in model.state_dict()
    assert type(model.cell) is cx.CGRUCell and not hasattr(model.cell, "amortizer")
    exact_cell = cx.consequentialize(_tagger())
    exact_cell.load_state_dict(model.state_dict(), strict=False)
    ids = torch.randint(0, 11, (4, 9))
    for m in (model, exact_cell):
        _tag(m, ids).backward()
    torch.testing.assert_close(model.cell.weight_hh.grad, exact_cell.cell.weight_hh.grad,
                               rtol=1e-5, atol=1e-7)
    assert int(model.lstm.amortizer.weight_hh_l0.steps) == 1
    cx.amortize(model, every=None)
    assert not hasattr(model.lstm, "amortizer") and not hasattr(model.head, "amortizer")
    with pytest.raises(ValueError, match="CGRUCell layers solve exactly"):
        cx.amortize(cx.consequentialize(nn.Sequential(nn.GRUCell(3, 4))))


def test_checkpoint_resumes_the_recurrent_amortizers_bit_identically():
    ids = [torch.randint(0, 11, (4, 9), generator=torch.Generator().manual_seed(s))
           for s in range(6)]

    def train(model, opt, batches):
        for b in batches:
            opt.zero_grad()
            _tag(model, b).backward()
            opt.step()

    def fresh():
        model = cx.amortize(cx.consequentialize(_tagger()), every=2, decay=0.8)
        return model, torch.optim.SGD(model.parameters(), lr=0.01)

    whole, opt = fresh()
    train(whole, opt, ids)
    first, opt = fresh()
    train(first, opt, ids[:3])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    resumed, opt = fresh()
    resumed.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    train(resumed, opt, ids[3:])
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_stale_or_foreign_amortizer_is_refused_in_forward_by_name():
    layer = cx.amortize(cx.CLSTM(3, 4), every=2)
    x = torch.randn(5, 2, 3)
    layer.bias_ih_l0.requires_grad_(False)       # the Gram of weight_ih_l0 loses its bias row
    with pytest.raises(ValueError, match=r"CLSTM.weight_ih_l0: amortizer holds a Gram of shape "
                                         r"\(4, 4\), but this layer's Gram is \(3, 3\)"):
        layer(x)
    layer = CLSTM(3, 4)
    layer.amortizer = cx.amortize(cx.CLinear(3, 4)).amortizer
    with pytest.raises(ValueError, match="amortizer must be an nn.ModuleDict of GramAmortizers "
                                         "by weight name \\('weight_ih_l0' included\\)"):
        layer(x)
    with torch.no_grad():                        # nn's forward: no amortizer read
        layer(x)


def test_a_partial_backward_leaves_the_amortizers_where_they_were():
    case = Case("LSTM", input_size=3, hidden=4)
    _, layer = modules(case)
    cx.amortize(layer, every=2)
    out, *_ , loss, leaves = run_layer(layer, case, new_call(case))
    torch.autograd.grad(loss, [leaves["input"]])
    assert all(int(a.steps) == 0 for a in layer.amortizer.values())


def _pixel_rows(case, seed, edge):
    """A batch of ``case`` whose every 8th step (an image's left edge, as in digits read
    pixel by pixel) is ``edge`` and the others ~1: statistics that depend on the step."""
    call = new_call(case, seed=seed)
    t = torch.arange(call.values.shape[0])
    call.values = 1 + 0.1 * call.values
    call.values[t % 8 == 0] = edge
    return call


@pytest.mark.parametrize("what", ["refresh_gram", "safeguard"])
def test_strided_rows_span_the_steps_and_sequences(what):
    """64 steps × 32 sequences, batch_first: the refresh Gram's 64 of 2,048 rows of W_ih (D =
    2) and the safeguard's 256 are strided at a step coprime with the row count, so they
    measure every step and sequence; a stride of 32 (or 8) would measure steps 0 and 32 (or
    every 8th) of each sequence only — the edge. Against the same layer measuring all rows."""
    case = Case("GRU", input_size=1, hidden=4, batch_first=True, lengths=(64,) * 32,
                ridge=1e-3)
    torch.manual_seed(0)
    _, layer = modules(case)
    if what == "refresh_gram":      # every step a fresh, undamped Gram: only the sample differs
        options = dict(every=1, decay=0.0, damping=0.0, safeguard_columns=None)
        sampled, whole = dict(options), dict(options, gram_oversample=None)
    else:                           # the Gram of all rows; step 2 measures its energy on rows
        options = dict(every=2, decay=0.0, damping=0.0, gram_oversample=None)
        sampled, whole = dict(options), dict(options, safeguard_columns=ALL_ROWS)
    a = cx.amortize(copy.deepcopy(layer), **sampled)
    b = cx.amortize(copy.deepcopy(layer), **whole)
    for step, edge in enumerate((0.0, 10.0)):
        call = _pixel_rows(case, step, edge)
        got, want = _grads(a, case, call), _grads(b, case, call)
    assert int(a.amortizer.weight_ih_l0.steps) == 2
    assert rel_err(got["weight_ih_l0"], want["weight_ih_l0"]) < 0.1


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_a_checkpointed_amortised_lstm_warns_only_when_called_twice(monkeypatch, use_reentrant):
    """As for the other layers (``functional._save_common``): a reentrant checkpoint runs each
    segment's backward in a nested graph task, so the recomputation says which backward its
    steps belong to — once per forward over three steps: no warning; one LSTM in two
    checkpointed segments of one forward: the warning."""
    from torch.utils.checkpoint import checkpoint
    monkeypatch.setattr(sys.modules["consequential_ext.amortize"], "_called_twice_warned", False)
    layer = cx.amortize(CLSTM(4, 4, num_layers=2, bidirectional=True), every=2)
    segment = lambda v: layer(v)[0][..., :4]                 # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            x = torch.randn(6, 3, 4, requires_grad=True)
            checkpoint(segment, x, use_reentrant=use_reentrant).sum().backward()
        twice = [w for w in caught if "called more than once" in str(w.message)]
        assert not twice and int(layer.amortizer.weight_hh_l1_reverse.steps) == 3
        x = torch.randn(6, 3, 4, requires_grad=True)
        checkpoint(segment, checkpoint(segment, x, use_reentrant=use_reentrant),
                   use_reentrant=use_reentrant).sum().backward()
        twice = [w for w in caught if "called more than once" in str(w.message)]
    assert len(twice) == 1
