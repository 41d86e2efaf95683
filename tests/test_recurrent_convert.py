"""Recurrent layers in a model: consequentialize converts nn.RNN / LSTM / GRU, leaves plain
(and names) what has no C-form, and the converted layers work with the rest of the library
(coverage, the first-forward graph check, torch.compile, reparametrization; amortize:
tests/test_recurrent_amortize.py).
The matched gradients themselves are checked against float64 references in
tests/test_recurrent.py."""

import copy
import warnings

import pytest
import torch
import torch.nn as nn

import consequential_ext as cx
from recurrent_reference import match
from relative_error import rel_err


class _Tagger(nn.Module):
    """Embedding → two-layer bidirectional LSTM → GRU → tanh RNN → head: a module of the
    user's own, so the first forward's graph check runs."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 5)
        self.lstm = nn.LSTM(5, 4, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(8, 3, batch_first=True)
        self.rnn = nn.RNN(3, 3, nonlinearity="relu", batch_first=True, bias=False)
        self.head = nn.Linear(3, 2)

    def forward(self, ids):
        h = self.lstm(self.embed(ids))[0]
        h = self.gru(h)[0]
        return self.head(self.rnn(h)[0])


def _tagger():
    torch.manual_seed(0)
    return _Tagger().double()


_C_TYPES = {"lstm": cx.CLSTM, "gru": cx.CGRU, "rnn": cx.CRNN}


def test_consequentialize_converts_recurrent_layers_keeping_parameters_and_forward():
    model = _tagger()
    params = {n: p for n, p in model.named_parameters()}
    ids = torch.randint(0, 11, (3, 7))
    before = model(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # nothing is left plain, the graph check is quiet
        cx.consequentialize(model)
        after = model(ids)
    for name, c_type in _C_TYPES.items():
        assert type(getattr(model, name)) is c_type
    assert {n: p for n, p in model.named_parameters()} == params    # identity, same keys
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    report = cx.coverage(model)
    assert report.plain == () and report.share == 1.0


def test_converted_model_gets_matched_recurrent_gradients_not_the_ordinary_ones():
    plain, model = _tagger(), cx.consequentialize(_tagger())
    ids = torch.randint(0, 11, (3, 7))
    for m in (plain, model):
        m(ids).square().sum().backward()
    for name in ("weight_ih_l0", "weight_hh_l1_reverse", "bias_hh_l1"):
        ordinary, matched = getattr(plain.lstm, name).grad, getattr(model.lstm, name).grad
        assert rel_err(matched, ordinary) > 1e-2, name
    # The embedding and head are matched as before; the input gradient to the LSTM is BP's.
    assert rel_err(model.rnn.weight_hh_l0.grad, plain.rnn.weight_hh_l0.grad) > 1e-2


@pytest.mark.parametrize("rule", ["backmatch", "backmatch-layerwise"])
def test_back_matching_rules_leave_recurrent_layers_plain_and_named(rule):
    model = cx.consequentialize(_tagger())                # converted first
    with pytest.warns(UserWarning, match=rf"lstm \(rule '{rule}' has no form for a LSTM"):
        cx.consequentialize(model, rule=rule)
    assert type(model.lstm) is nn.LSTM and type(model.gru) is nn.GRU
    assert type(model.head) is cx.CLinear and model.head.rule == rule
    reasons = {p.name: p.reason for p in cx.coverage(model).plain}
    assert set(reasons) == {"lstm", "gru", "rnn"} and "through time" in reasons["gru"]
    cx.consequentialize(model)                            # the default rule: converted again
    assert type(model.lstm) is cx.CLSTM and cx.coverage(model).plain == ()


def test_recurrent_layer_refuses_a_back_matching_rule_by_name():
    layer = cx.CGRU(3, 4)
    with pytest.raises(ValueError, match="rule must be one of 'consequential', 'sgd' for a "
                                         "recurrent layer; got 'backmatch'"):
        layer.rule = "backmatch"
    with pytest.raises(ValueError, match="proj_size must be 0, got 2"):
        cx.CLSTM(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="ridge"):
        cx.CRNN(3, 4, ridge=-1.0)


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*is deprecated:FutureWarning")
def test_a_reparametrized_recurrent_weight_stays_plain_and_is_named():
    model = _tagger()
    nn.utils.parametrizations.weight_norm(model.gru, "weight_hh_l0")
    with pytest.warns(UserWarning, match=r"gru \(its weight_hh_l0 is no parameter"):
        cx.consequentialize(model)
    assert not isinstance(model.gru, cx.CGRU) and type(model.lstm) is cx.CLSTM
    converted = cx.consequentialize(_tagger())
    nn.utils.parametrizations.weight_norm(converted.rnn, "weight_ih_l0")
    assert "rnn" in {p.name for p in cx.coverage(converted).plain}


def test_compiled_recurrent_model_matches_eager():
    """Dynamo does not trace recurrent layers (nn's graph-break too): the C-layers run eagerly
    between the compiled pieces, with their matched gradients."""
    model = cx.consequentialize(_tagger())
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model)
    for step in range(2):   # a second call reuses the compiled graph
        ids = torch.randint(0, 11, (3, 7))
        model.zero_grad()
        compiled_model.zero_grad()
        model(ids).square().sum().backward()
        compiled(ids).square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
            assert rel_err(q.grad, p.grad) < 1e-10, (step, name)


def test_state_dict_round_trips_between_plain_and_converted():
    plain, model = _tagger(), cx.consequentialize(_tagger())
    assert list(plain.state_dict()) == list(model.state_dict())
    fresh = cx.consequentialize(_Tagger().double())
    fresh.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 11, (2, 4))
    torch.testing.assert_close(fresh(ids), plain(ids), rtol=0, atol=0)


_CELLS = [(nn.RNNCell, cx.CRNNCell, {"nonlinearity": "relu"}), (nn.LSTMCell, cx.CLSTMCell, {}),
          (nn.GRUCell, cx.CGRUCell, {})]


@pytest.mark.parametrize("plain_type, c_type, kwargs", _CELLS)
@pytest.mark.parametrize("bias", [True, False])
def test_a_cell_in_a_loop_matches_each_step_on_its_own_rows(plain_type, c_type, kwargs, bias):
    """A cell called once per step: each call's weights matched on that call's input rows
    and state rows (zeros at the first step, hx not given), the steps' matched gradients
    summed. The reference unrolls nn's cell with a fresh copy of the weights per step, so
    autograd gives each step's ordinary gradient apart."""
    torch.manual_seed(5)
    cell = c_type(3, 7, bias=bias, ridge=0.05, **kwargs).double()   # 7 > N = 4: N < D
    plain = plain_type(3, 7, bias=bias, **kwargs).double()
    plain.load_state_dict(cell.state_dict())
    xs = torch.randn(3, 4, 3, dtype=torch.float64)
    lstm = plain_type is nn.LSTMCell
    state, total = None, 0
    for x in xs:
        state = cell(x, state)
        total = total + (state[0] if lstm else state).sin().sum()
    total.backward()
    zeros = torch.zeros(4, 7, dtype=torch.float64)
    steps, state, total = [], (zeros, zeros) if lstm else zeros, 0
    for x in xs:
        copies = {n: p.detach().clone().requires_grad_(True) for n, p in plain.named_parameters()}
        steps.append((copies, x, (state[0] if lstm else state).detach()))
        state = torch.func.functional_call(plain, copies, (x, state))
        total = total + (state[0] if lstm else state).sin().sum()
    total.backward()
    expected = {}
    for copies, x, h in steps:
        for kind, rows in (("ih", x), ("hh", h)):
            gb = copies[f"bias_{kind}"].grad if bias else None
            matched = match(copies[f"weight_{kind}"].grad, gb, rows, 0.05)
            for name, m in zip((f"weight_{kind}", f"bias_{kind}"), matched):
                if m is not None:
                    expected[name] = expected.get(name, 0) + m
    assert set(expected) == {n for n, _ in cell.named_parameters()}
    for name, p in cell.named_parameters():
        assert rel_err(p.grad, expected[name]) < 1e-10, name
