"""torch.fx, torch.export and torch.jit.script on converted models: each either keeps the
matched gradient or says plainly what the traced program does instead."""
import copy

import pytest
import torch
import torch.fx
import torch.nn as nn

import consequential_ext as cx
from consequential_ext import functional as CF


class _Mixed(nn.Module):
    """One of every C-layer kind a traced model can hold, and a back-matching norm."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.conv = nn.Conv1d(6, 5, 3, padding=1, padding_mode="reflect")
        self.up = nn.ConvTranspose1d(5, 4, 2, stride=2)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4 * 14, 3)

    def forward(self, tokens):
        h = self.emb(tokens)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = self.norm(self.up(torch.relu(self.conv(h.transpose(1, 2)))))
        return self.head(h.flatten(1))


def _grads(model, tokens, target):
    model.zero_grad(set_to_none=True)
    (model(tokens) - target).square().sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("rule", ["consequential", "backmatch"])
def test_symbolic_trace_keeps_c_layers_as_leaves_and_their_gradients(rule):
    torch.manual_seed(30)
    model = cx.consequentialize(_Mixed(), rule=rule, ridge=1e-2)
    traced = torch.fx.symbolic_trace(model)
    leaves = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert {"emb", "attn", "conv", "up", "norm", "head"} <= leaves
    tokens, target = torch.randint(0, 11, (5, 7)), torch.randn(5, 3)
    eager = _grads(model, tokens, target)
    twin = copy.deepcopy(model)
    traced_grads = _grads(torch.fx.GraphModule(twin, traced.graph), tokens, target)
    assert eager.keys() == traced_grads.keys()
    for name, g in eager.items():                    # the same layers ran: the same numbers
        assert torch.equal(traced_grads[name], g), name
    plain = _Mixed()
    plain.load_state_dict(model.state_dict())
    ordinary = _grads(plain, tokens, target)        # and they are not the ordinary ones
    assert not torch.allclose(ordinary["head.weight"], eager["head.weight"])


def test_tracing_a_c_layer_itself_or_the_functional_form_is_a_clear_error():
    with pytest.raises(TypeError, match="cannot trace CLinear itself"):
        torch.fx.symbolic_trace(cx.CLinear(3, 2))
    weight = nn.Parameter(torch.randn(2, 3))
    with pytest.raises(TypeError, match="functional cannot be traced by torch.fx"):
        torch.fx.symbolic_trace(lambda x: CF.clinear(x, weight, None))


@pytest.mark.parametrize("strict", [False, True])
def test_export_gives_the_ordinary_gradient_and_says_so(monkeypatch, strict):
    """An exported program has no autograd.Function backward: the layer is exported as its
    plain forward (strict export would otherwise cut the gradient), with a warning."""
    monkeypatch.setattr(CF, "_export_warned", False)
    torch.manual_seed(31)
    plain = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Conv1d(1, 2, 3), nn.LayerNorm(2))
    model = cx.consequentialize(copy.deepcopy(plain))
    x = torch.randn(6, 1, 5)
    if strict:      # Dynamo drops warnings raised in the code it traces
        exported = torch.export.export(model, (x,), strict=True).module()
    else:
        with pytest.warns(UserWarning, match="ordinary gradient, not the matched one"):
            exported = torch.export.export(model, (x,)).module()
    assert torch.equal(exported(x), model(x))
    exported(x).square().sum().backward()
    plain(x).square().sum().backward()
    grads = dict(exported.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.allclose(grads[name].grad, p.grad, rtol=1e-5, atol=1e-6), name


@pytest.mark.filterwarnings("ignore:.*torch.jit.script.* is deprecated:DeprecationWarning")
def test_jit_script_says_why_it_cannot_compile_a_c_layer():
    model = cx.consequentialize(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(NotImplementedError, match="torch.jit.script cannot compile CLinear.*"
                                                  "torch.jit.trace"):
        torch.jit.script(model)


class _Scaled(cx.CLinear):
    """A user's class of a C-layer with steps of its own around the layer's forward."""

    def forward(self, x):
        return 2 * super().forward(x) + 1


def test_a_c_layer_subclass_forward_and_hooks_run_once_in_the_traced_model():
    """The outermost forward (a user subclass's) is the leaf, and the hooks Module.__call__
    ran on the proxies while tracing (so they are in the graph) are not run again by it."""
    torch.manual_seed(32)
    for with_hooks in (False, True):
        model = nn.Sequential(_Scaled(3, 4), nn.Tanh(), cx.CLinear(4, 2))
        if with_hooks:
            model[0].register_forward_pre_hook(lambda m, args: (args[0] * 3,))
            model[2].register_forward_hook(lambda m, args, out: out - 1)
        traced = torch.fx.symbolic_trace(model)
        x = torch.randn(5, 3)
        assert torch.equal(traced(x), model(x)), with_hooks
        eager = _grads(model, x, torch.zeros(5, 2))
        for name, g in _grads(traced, x, torch.zeros(5, 2)).items():
            assert torch.equal(g, eager[name]), (with_hooks, name)


def test_strict_export_of_back_matching_norms_keeps_the_ordinary_gradient():
    torch.manual_seed(33)
    plain = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 2))
    model = cx.consequentialize(copy.deepcopy(plain), rule="backmatch")
    assert isinstance(model[1], cx.BackMatchBatchNorm1d)
    x = torch.randn(6, 4)
    exported = torch.export.export(model, (x,), strict=True).module()
    exported(x).square().sum().backward()
    plain(x).square().sum().backward()
    grads = dict(exported.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.allclose(grads[name].grad, p.grad, rtol=1e-5, atol=1e-6), name
