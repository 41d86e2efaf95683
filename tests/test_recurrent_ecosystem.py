"""Recurrent C-layers among the tools users wrap around them: AWD-LSTM's WeightDrop,
torch.export, torch.jit, torch.fx over a registered subclass, checkpointing and
functional_call. Gradients are checked against an independent reference: nn's layer in
float64, its rows written out, ``torch.linalg.solve``."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

import consequential_ext as cx
from consequential_ext import functional as CF
from recurrent_reference import match

RIDGE = 1e-3


def _reference(plain, x, loss):
    """Matched gradients of a 1-layer, unidirectional nn.LSTM / GRU on (T, B, in) ``x`` (zero
    initial state), ``loss`` of its output: name → float64 tensor."""
    m = copy.deepcopy(plain).double()
    out, _ = m(x.double())
    loss(out).backward()
    hidden = m.hidden_size
    rows_hh = torch.cat([torch.zeros(x.shape[1], hidden, dtype=torch.float64),
                         out[:-1].detach().reshape(-1, hidden)])
    ref = {}
    ref["weight_ih_l0"], ref["bias_ih_l0"] = match(m.weight_ih_l0.grad, m.bias_ih_l0.grad,
                                                   x.reshape(-1, x.shape[-1]), RIDGE)
    ref["weight_hh_l0"], ref["bias_hh_l0"] = match(m.weight_hh_l0.grad, m.bias_hh_l0.grad,
                                                   rows_hh, RIDGE)
    return ref


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def _square(out):
    return out.square().sum()


class WeightDrop(nn.Module):
    """salesforce/awd-lstm-lm's WeightDrop: ``weight_hh_l0`` deleted, a dropped copy of
    ``weight_hh_l0_raw`` set on the LSTM before each forward."""

    def __init__(self, module, dropout):
        super().__init__()
        self.module, self.dropout = module, dropout
        w = module.weight_hh_l0
        del module._parameters["weight_hh_l0"]
        module.register_parameter("weight_hh_l0_raw", nn.Parameter(w.data))

    def forward(self, x):
        raw = self.module.weight_hh_l0_raw
        setattr(self.module, "weight_hh_l0", F.dropout(raw, self.dropout, self.training))
        return self.module.forward(x)[0]


def test_awd_weight_drop_leaves_the_lstm_plain_and_named():
    """WeightDrop applied before conversion: the LSTM's weight_hh_l0 is set from
    weight_hh_l0_raw before each forward, so the layer stays plain, named, with nn's
    gradients; wrapped after conversion it is reported as reparametrized before any forward
    (it was converted silently and reported matched)."""
    torch.manual_seed(0)
    model = WeightDrop(nn.LSTM(3, 4), 0.5)
    twin = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"module \(its weight_hh_l0 is no parameter"):
        cx.consequentialize(model)
    assert type(model.module) is nn.LSTM
    assert [p.name for p in cx.coverage(model).plain] == ["module"]
    x = torch.randn(5, 2, 3)
    for m in (model, twin):
        torch.manual_seed(1)          # the same dropout mask
        _square(m(x)).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad), name

    converted = cx.consequentialize(nn.LSTM(3, 4))
    wrapped = WeightDrop(converted, 0.5)
    report = cx.coverage(wrapped)
    assert report.matched == () and "reparametrized" in report.plain[0].reason


class _Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(4, 5)

    def forward(self, x):
        return self.rnn(x)[0]


def test_export_of_a_recurrent_layer_warns_of_the_ordinary_backward(monkeypatch):
    """As for the other C-layers: the exported program is nn's forward, and non-strict
    export says its backward is the ordinary one (it was silent)."""
    monkeypatch.setattr(CF, "_export_warned", False)
    model = cx.consequentialize(_Tagger())
    x = torch.randn(6, 3, 4)
    with pytest.warns(UserWarning, match="torch.export traced a C-layer"):
        program = torch.export.export(model, (x,))
    assert torch.equal(program.module()(x), model(x))


def test_jit_trace_of_a_training_recurrent_layer_raises_naming_it():
    """Traced while its weights train, a CLSTM's rows would be the trace input's on every
    later call (silently wrong gradients with check_trace=False): a NotImplementedError
    naming it. Under torch.no_grad the trace is nn's forward, for inference."""
    torch.manual_seed(0)
    plain = nn.LSTM(4, 5)
    model = cx.consequentialize(nn.Sequential(copy.deepcopy(plain)))[0]
    x = torch.randn(6, 3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NotImplementedError, match="torch.jit.trace cannot trace CLSTM"):
            torch.jit.trace(model, x, check_trace=False)
        with torch.no_grad():
            traced = torch.jit.trace(model, x)
    x_new = torch.randn(6, 3, 4)
    assert torch.equal(traced(x_new)[0], plain(x_new)[0])
    with pytest.raises(NotImplementedError, match="torch.compile'd"):
        torch.jit.script(model)


class _OwnLSTM(nn.LSTM):
    """A subclass with its own forward: steps before and after nn's."""

    def forward(self, x, hx=None):
        out, state = super().forward(x * 2, hx)
        return out + 1, state


class _COwnLSTM(_OwnLSTM, cx.CLSTM):
    """register_layer's form for it (coverage's hint): the subclass first."""


class _OwnModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = _OwnLSTM(4, 5)

    def forward(self, x):
        return self.rnn(x)[0]


def test_fx_trace_of_a_registered_subclass_runs_its_steps_once(monkeypatch):
    """torch.fx keeps the registered subclass as one call_module leaf: its own steps are not
    traced into the graph as well (they ran twice: outputs and gradients wrong)."""
    monkeypatch.setattr(cx.registry, "_KINDS", dict(cx.registry._KINDS))   # no leak
    cx.register_layer(_OwnLSTM, _COwnLSTM)
    torch.manual_seed(0)
    model = cx.consequentialize(_OwnModel())
    assert type(model.rnn) is _COwnLSTM
    plain = nn.LSTM(4, 5)
    plain.load_state_dict(model.rnn.state_dict())
    traced = torch.fx.symbolic_trace(model)
    assert [n.op for n in traced.graph.nodes].count("call_function") == 1   # the getitem
    x = torch.randn(6, 3, 4)
    assert torch.equal(traced(x), model(x))
    _square(traced(x) - 1).backward()
    ref = _reference(plain, x * 2, _square)       # traced(x) - 1 is the LSTM of 2x
    for name, value in ref.items():
        assert _rel(getattr(model.rnn, name).grad, value) < 1e-5, name


@pytest.mark.parametrize("how", ["checkpoint_reentrant", "checkpoint", "functional_call",
                                 "accumulate"])
def test_training_tools_keep_the_matched_gradient(how):
    torch.manual_seed(0)
    plain = nn.LSTM(4, 5)
    model = cx.consequentialize(nn.Sequential(copy.deepcopy(plain)))[0]
    x = torch.randn(7, 3, 4)
    params = dict(model.named_parameters())
    if how.startswith("checkpoint"):
        x_in = x.clone().requires_grad_(how.endswith("reentrant"))
        out = checkpoint(lambda v: model(v)[0], x_in, use_reentrant=how.endswith("reentrant"))
        _square(out).backward()
        ref = _reference(plain, x, _square)
    elif how == "functional_call":   # other tensors than the module's own parameters
        params = {k: (v + 0.1).detach().requires_grad_() for k, v in params.items()}
        _square(functional_call(model, params, (x,))[0]).backward()
        plain.load_state_dict({k: v.detach() for k, v in params.items()})
        ref = _reference(plain, x, _square)
    else:                            # two micro-batches: the two matched gradients summed
        for part in (x[:, :2], x[:, 2:]):
            _square(model(part)[0]).backward()
        first, second = _reference(plain, x[:, :2], _square), _reference(plain, x[:, 2:], _square)
        ref = {k: first[k] + second[k] for k in first}
    for name, value in ref.items():
        assert _rel(params[name].grad, value) < 1e-5, name


def _phi_and_its_input_derivative(model, x, weight, out_fn):
    """phi(x) = ⟨matched ∂loss/∂weight, R⟩ for a fixed loss cotangent and R; returns (phi,
    ∂phi/∂x by autograd through create_graph=True, ∂phi/∂x by central differences)."""
    gen = torch.Generator().manual_seed(7)
    cotangent = torch.randn(out_fn(model(x)).shape, generator=gen, dtype=x.dtype)
    r = torch.randn(weight.shape, generator=gen, dtype=x.dtype)

    def phi(xx, create_graph):
        loss = (out_fn(model(xx)) * cotangent).sum()
        grad, = torch.autograd.grad(loss, [weight], create_graph=create_graph)
        return (grad * r).sum()

    leaf = x.clone().requires_grad_()
    by_autograd, = torch.autograd.grad(phi(leaf, True), [leaf])
    eps, by_differences = 1e-6, torch.empty_like(x)
    for i in range(x.numel()):
        step = torch.zeros(x.numel(), dtype=x.dtype)
        step[i] = eps
        step = step.view_as(x)
        by_differences.view(-1)[i] = (phi(x + step, False) - phi(x - step, False)) / (2 * eps)
    return by_autograd, by_differences


class _Loop(nn.Module):
    """A cell run over the steps of (T, B, in), from a zero state."""

    def __init__(self, cell):
        super().__init__()
        self.cell = cell

    def forward(self, x):
        h = torch.zeros(x.shape[1], self.cell.hidden_size, dtype=x.dtype)
        state, outs = (h, h) if isinstance(self.cell, nn.LSTMCell) else h, []
        for step in x:
            state = self.cell(step, state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        return torch.stack(outs)


@pytest.mark.parametrize("cell", [nn.RNNCell, nn.LSTMCell, nn.GRUCell])
@pytest.mark.parametrize("weight", ["weight_ih", "weight_hh"])
def test_double_backward_through_a_cell_differentiates_through_its_rows(cell, weight):
    """create_graph=True through a cell's matched gradient: its rows X (the call's input and
    state) keep their history, so the second derivative is the function's own (central
    differences, float64) — with X held constant it was 70–100 % off."""
    torch.manual_seed(0)
    model = cx.consequentialize(_Loop(cell(2, 3)), ridge=RIDGE).double()
    x = torch.randn(3, 4, 2, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, want = _phi_and_its_input_derivative(model, x, getattr(model.cell, weight),
                                                  lambda out: out)
    assert _rel(got, want) < 1e-6


def test_double_backward_through_a_fused_layer_says_its_rows_are_held_constant(monkeypatch):
    """A fused layer keeps its rows detached (a cycle through the graph otherwise): under
    create_graph=True its matched gradient is still the exact one, differentiable in G only,
    which one warning says; an ordinary backward says nothing."""
    from consequential_ext import recurrent
    monkeypatch.setattr(recurrent, "_rows_constant_warned", False)
    torch.manual_seed(0)
    gru = cx.CGRU(2, 3, ridge=RIDGE).double()
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gru(x)[0].square().sum().backward()
        assert not caught
        plain = gru.weight_hh_l0.grad.clone()
        first, = torch.autograd.grad(gru(x)[0].square().sum(), [gru.weight_hh_l0],
                                     create_graph=True)
        torch.autograd.grad(gru(x)[0].square().sum(), [gru.weight_hh_l0], create_graph=True)
    said = [w for w in caught if "held constant" in str(w.message)]
    assert len(said) == 1 and len(caught) == 1, [str(w.message) for w in caught]
    assert first.requires_grad
    torch.testing.assert_close(first.detach(), plain, rtol=1e-12, atol=0)
