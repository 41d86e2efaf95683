"""consequentialize: in place, identity-preserving, filterable, and honest about what it skips."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune  # noqa: F401  (nn.utils.prune)

import consequential_ext as cx


def _net(dtype=torch.float32):
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Sequential(nn.Linear(4 * 5 * 5, 8), nn.ReLU()), nn.Linear(8, 3),
    ).to(dtype)


def test_converts_in_place_keeping_parameters_dtype_and_optimizer():
    model = _net(torch.float64)
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = cx.consequentialize(model, ridge=0.01)
    assert out is model
    assert isinstance(model[0], cx.CConv2d) and isinstance(model[3][0], cx.CLinear)
    assert all(a is b for a, b in zip(params, model.parameters()))
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model[4].ridge == 0.01
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    model(x).sum().backward()
    before = model[4].weight.detach().clone()
    opt.step()   # the optimizer built before the call sees the matched gradients
    assert not torch.equal(before, model[4].weight)


def test_include_exclude_by_name_and_type():
    model = cx.consequentialize(_net(), exclude=["4"])
    assert type(model[4]) is nn.Linear and isinstance(model[3][0], cx.CLinear)
    model = cx.consequentialize(_net(), include=[nn.Conv2d])
    assert isinstance(model[0], cx.CConv2d) and type(model[3][0]) is nn.Linear
    model = cx.consequentialize(_net(), include="3")        # a name selects its subtree
    assert isinstance(model[3][0], cx.CLinear) and type(model[0]) is nn.Conv2d
    with pytest.raises(TypeError, match="include"):
        cx.consequentialize(_net(), include=[3.5])


def test_reconversion_updates_rule_and_ridge():
    model = cx.consequentialize(_net(), ridge=0.1)
    cx.consequentialize(model, rule="sgd", ridge=0.2)
    assert model[0].rule == "sgd" and model[0].ridge == 0.2


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2)
        self.ff = nn.Linear(8, 8)

    def forward(self, x):
        return self.ff(self.attn(x, x, x)[0])


def test_converts_attention_which_matches_its_out_proj_itself():
    model = _Block()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cx.consequentialize(model)
    assert isinstance(model.ff, cx.CLinear) and isinstance(model.attn, cx.CMultiheadAttention)
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    model(torch.randn(3, 2, 8)).sum().backward()   # tests/test_attention.py: exactly
    assert cx.coverage(model).share == 1.0


def test_rejects_non_module():
    with pytest.raises(TypeError, match="model"):
        cx.consequentialize("resnet")


def test_uninitialised_lazy_layers_are_named_and_nothing_is_converted():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.LazyLinear(2),
                          nn.Sequential(nn.LazyConv2d(2, 3)))
    for fn in (cx.consequentialize, cx.coverage):
        with pytest.raises(ValueError, match=r"2 \(LazyLinear\), 3\.0 \(LazyConv2d\).*forward"):
            fn(model)
    assert type(model[0]) is nn.Linear                   # left whole, not half-converted
    model[3] = nn.Identity()
    model(torch.randn(5, 3))                             # shapes known: LazyLinear → Linear
    plain = [p.detach().clone() for p in model.double().parameters()]
    cx.consequentialize(model, ridge=1e-2)
    assert type(model[0]) is cx.CLinear and type(model[2]) is cx.CLinear
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain))
    assert cx.coverage(model).share == 1.0


class _SwinLikeAttention(nn.Module):
    """Hands its children's weights to F.linear itself (torchvision's Swin, timm's BEiT/EVA):
    the children's forwards never run."""
    def __init__(self):
        super().__init__()
        self.qkv, self.inner = nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 6))
        self.shape_only, self.called = nn.Linear(6, 6), nn.Linear(6, 6)
        self.viewed = nn.Linear(6, 6)

    def forward(self, x):
        # metadata, not a use: self.called.weight stays the called layer's
        assert self.shape_only.weight.shape[1] == x.shape[-1]
        assert isinstance(self.called.weight, torch.Tensor) and self.called.weight is not None
        x = x.to(self.shape_only.weight).type_as(self.called.weight)
        h = torch.nn.functional.linear(x, weight=self.qkv.weight, bias=self.qkv.bias)
        h = torch.nn.functional.linear(h, self.inner[0].weight[:, :6] * 1.0)
        h = h @ self.viewed.weight.T + self.viewed.bias
        return self.called(self.shape_only(h))


def test_children_whose_weight_the_parent_uses_stay_plain_and_are_named():
    model = nn.Sequential(_SwinLikeAttention(), nn.Linear(6, 2))
    plain = nn.Sequential(_SwinLikeAttention(), nn.Linear(6, 2))
    plain.load_state_dict(model.state_dict())
    with pytest.warns(UserWarning) as caught:
        cx.consequentialize(model)
    message = str(caught[0].message)
    for name in ("0.qkv", "0.inner.0", "0.viewed"):
        assert f"{name} (its weight is used directly by its parent _SwinLikeAttention" in message
    report = cx.coverage(model)
    assert set(report.matched) == {"0.shape_only", "0.called", "1"}
    assert {p.name for p in report.plain} == {"0.qkv", "0.inner.0", "0.viewed"}
    # Plain layers get exactly nn's gradient; the others are matched (differ from nn's).
    x = torch.randn(9, 6)
    for m in (model, plain):
        m(x).square().mean().backward()
    grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        if grads[name].grad is None:                          # inner.0's unused bias
            assert p.grad is None
            continue
        same = torch.equal(p.grad, grads[name].grad)
        assert same == name.startswith(("0.qkv", "0.inner.0", "0.viewed")), name


class _EncoderLayer(nn.TransformerEncoderLayer):
    """A subclass inheriting torch's forward, whose inference fast path reads linear1.weight."""


def test_an_nn_transformer_layer_subclass_converts_fully():
    layer = _EncoderLayer(8, 2, 16, dropout=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cx.consequentialize(layer)
    assert {"linear1", "linear2", "self_attn"} <= set(cx.coverage(layer).matched)


class _Helper(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(4, 12)

    def _project(self, x):
        return torch.nn.functional.linear(x, self.qkv.weight, self.qkv.bias)

    def forward(self, x):
        return self._project(x)


class _Reads(nn.Module):
    """Uses through an alias, getattr, a negative index and a dict key; metadata only else."""
    def __init__(self):
        super().__init__()
        self.fc, self.other = nn.Linear(4, 4), nn.Linear(4, 4)
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})

    def forward(self, x):
        fc = self.fc
        x = torch.nn.functional.linear(x, fc.weight) + self.other(x.to(self.other.weight))
        x = torch.nn.functional.linear(self.layers[0](x), self.layers[-1].weight)
        x = torch.nn.functional.linear(x, getattr(self.heads["a"], "weight"))
        return self.heads["b"](x) if self.heads["b"].weight.dtype is not None else x


class _TiedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.body = nn.Embedding(10, 4), nn.Linear(4, 4)

    def forward(self, idx):
        return torch.nn.functional.linear(self.body(self.emb(idx)), self.emb.weight)


@pytest.mark.parametrize("model,used", [(_Helper, {"qkv"}),
                                        (_Reads, {"fc", "layers.1", "heads.a"}),
                                        (_TiedHead, {"emb"})], ids=lambda v: str(v))
def test_weights_a_parent_uses_directly_are_found_in_its_source(model, used):
    m = model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cx.consequentialize(m)
    report = cx.coverage(m)
    assert {p.name for p in report.plain} == used
    assert all(name not in used for name in report.matched)


def test_coverage_of_frozen_and_not_yet_converted_layers():
    # A frozen C-layer gets no gradient to match: plain, the user's choice (not warned); an
    # nn.Linear that consequentialize has not seen (yet) is said to be that.
    model = cx.consequentialize(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)))
    model[0].requires_grad_(False)
    model.append(nn.Linear(2, 2))
    report = cx.coverage(model)
    assert report.matched == ("1",)
    reasons = {p.name: (p.reason, p.chosen_by_user) for p in report.plain}
    assert reasons["0"] == ("frozen: none of its parameters requires a gradient", True)
    assert reasons["2"][0].startswith("a Linear not converted (yet)") and not reasons["2"][1]
    assert report.matched_params == 4 * 2 + 2


class _BranchUser(nn.Module):
    """Calls its child, and uses the child's weight itself in a branch (BLOOM's attention and
    MLP with ``pretraining_tp > 1 and slow_but_exact``)."""
    def __init__(self, sliced=False):
        super().__init__()
        self.dense, self.sliced = nn.Linear(4, 4), sliced

    def forward(self, x):
        if self.sliced:
            return torch.nn.functional.linear(x, self.dense.weight[:, :4], self.dense.bias)
        return self.dense(x)


def test_a_child_its_parent_uses_is_named_with_that_reason_whatever_include_says():
    # include selecting the child (not the parent) leaves it plain for its parent's use, not
    # by the user's choice: warned, with that reason — not "its parent is plain: not selected
    # by include", silently.
    model = nn.Sequential(_BranchUser(), nn.Linear(4, 2))
    with pytest.warns(UserWarning, match=r"0\.dense \(its weight is used directly by its "
                                         r"parent _BranchUser"):
        cx.consequentialize(model, include=["0.dense"])
    (dense,) = [p for p in cx.coverage(model).plain if p.name == "0.dense"]
    assert dense.reason.startswith("its weight is used directly") and not dense.chosen_by_user
    # A C-layer the user converted on its own under such a parent: the parent's reason, not
    # "rule 'consequential' (the ordinary gradient)".
    model = nn.Sequential(_BranchUser(), nn.Linear(4, 2))
    cx.consequentialize(model[0].dense)
    (dense,) = [p for p in cx.coverage(model).plain if p.name == "0.dense"]
    assert dense.reason.startswith("its weight is used directly by its parent _BranchUser")
    assert not dense.chosen_by_user


class _LoopUser(nn.Module):
    """Uses its ModuleList's weights in a loop: beyond the source analysis, in the graph."""
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        for layer in self.layers:
            x = torch.nn.functional.linear(x, layer.weight, layer.bias)
        return self.head(x)


class _Clean(nn.Module):
    """Every kind called as itself, one Linear twice, attention self and cross: no warning."""
    def __init__(self):
        super().__init__()
        self.emb, self.fc = nn.Embedding(10, 8), nn.Linear(8, 8)
        self.self_attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.cross = nn.MultiheadAttention(8, 2, batch_first=True)
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.up = nn.ConvTranspose2d(2, 1, 2, stride=2)

    def forward(self, idx):
        h = self.fc(self.fc(self.emb(idx)))
        h = self.self_attn(h, h, h)[0] + self.cross(h, h + 1, h + 1)[0]
        return self.up(self.conv(h[:, None])).mean()


def test_the_first_forward_names_weights_used_outside_their_layer():
    model = cx.consequentialize(_LoopUser())
    with torch.no_grad():
        model(torch.randn(3, 4))                    # no graph: the check waits
    with pytest.warns(UserWarning, match=r"layers\.\d \(AddmmBackward0\); layers\.\d") as caught:
        model(torch.randn(3, 4)).sum().backward()
    assert caught[0].filename == __file__               # points at the user's call
    assert not model._forward_hooks                 # once
    clean = cx.consequentialize(_Clean())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean(torch.randint(0, 10, (2, 5))).backward()
    assert not clean._forward_hooks
    torch_only = cx.consequentialize(nn.TransformerEncoderLayer(8, 2, 16))
    assert not torch_only._forward_hooks            # nothing user-written to check


def test_excluding_a_layer_converted_before_makes_it_plain_again():
    """``exclude`` keeps a layer plain whatever an earlier call did: its class back to the nn
    one (a back-matching norm to nn's), its amortizer gone, its gradient the ordinary one;
    ``include`` leaves the layers it does not select as they are."""
    torch.manual_seed(21)
    plain = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3)).double()
    model = cx.amortize(cx.consequentialize(copy.deepcopy(plain), rule="backmatch"), every=2)
    cx.consequentialize(model, rule="backmatch", exclude=["2", nn.BatchNorm1d])
    assert type(model[2]) is nn.Linear and type(model[1]) is nn.BatchNorm1d
    assert not hasattr(model[2], "amortizer") and isinstance(model[0], cx.CLinear)
    x, go = torch.randn(9, 5, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    model(x).backward(go)
    plain(x).backward(go)
    assert torch.equal(model[2].weight.grad, plain[2].weight.grad)
    assert torch.equal(model[1].weight.grad, plain[1].weight.grad)
    assert [p.name for p in cx.coverage(model).plain] == ["2"]
    cx.consequentialize(model, include=["2"])      # 0 keeps its rule: not selected
    assert isinstance(model[2], cx.CLinear) and model[0].rule == "backmatch"


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*is deprecated:FutureWarning")
@pytest.mark.parametrize("reparametrize", [
    lambda m: nn.utils.parametrizations.weight_norm(m),
    lambda m: nn.utils.parametrizations.orthogonal(m),
    lambda m: nn.utils.weight_norm(m),
    lambda m: nn.utils.prune.l1_unstructured(m, "weight", amount=0.3),
], ids=["weight_norm", "orthogonal", "weight_norm_hook", "prune"])
def test_a_layer_reparametrized_after_conversion_is_reported_and_made_plain(reparametrize):
    """Its C Function would see the transformed weight and pull its match back through the
    transformation (neither gradient): coverage says so, and converting again leaves it plain,
    as converting after reparametrizing does."""
    torch.manual_seed(22)
    base = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 3))
    first = copy.deepcopy(base)
    reparametrize(first[0])
    with pytest.warns(UserWarning, match="left these layers as they are"):
        cx.consequentialize(first)                   # reparametrized, then converted
    later = cx.consequentialize(copy.deepcopy(base))
    torch.manual_seed(23)
    reparametrize(later[0])                          # converted, then reparametrized
    report = cx.coverage(later)
    # named where its parameters are: the layer, or a parametrization's list below it
    assert [p.name.split(".")[0] for p in report.plain if "after conversion" in p.reason] \
        == ["0"]
    assert report.matched == ("1",)
    with pytest.warns(UserWarning, match="left these layers as they are: 0"):
        cx.consequentialize(later)                   # the same warning as the other order
    assert not isinstance(later[0], cx.CLinear) and isinstance(later[1], cx.CLinear)
    for name, p in first.named_parameters():        # same transformation, same values
        p.data.copy_(dict(later.named_parameters())[name])
    x, go = torch.randn(6, 4), torch.randn(6, 3)
    first(x).backward(go)
    later(x).backward(go)
    for (name, p), q in zip(later.named_parameters(), first.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


class _Scaled(cx.CLinear):
    def forward(self, x):
        return 2 * super().forward(x)


def test_excluding_a_users_c_layer_class_keeps_its_class_and_gives_the_ordinary_gradient():
    torch.manual_seed(24)
    model = nn.Sequential(_Scaled(3, 2))
    twin = nn.Sequential(_Scaled(3, 2, rule="sgd"))
    twin.load_state_dict(model.state_dict())
    cx.consequentialize(model, exclude=["0"])
    assert type(model[0]) is _Scaled and model[0].rule == "sgd"
    x = torch.randn(4, 3)
    model(x).square().sum().backward()
    twin(x).square().sum().backward()
    assert torch.equal(model[0].weight.grad, twin[0].weight.grad)


class _Half(nn.Module):
    def forward(self, t):
        return t * 0.5


def test_excluding_a_layer_parametrized_before_conversion_gives_back_torchs_class():
    model = nn.Sequential(nn.Linear(3, 2))
    model[0].scale = nn.Parameter(torch.ones(2))   # a parameter its forward does not use
    nn.utils.parametrize.register_parametrization(model[0], "scale", _Half())
    parametrized = type(model[0])
    cx.consequentialize(model)     # its weight and bias are its own: matched on its F.linear
    assert type(model[0]) is not parametrized and cx.coverage(model).matched == ("0",)
    cx.consequentialize(model, exclude=["0"])
    assert type(model[0]) is parametrized
    nn.utils.parametrize.remove_parametrizations(model[0], "scale")
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Linear(7, 5), (6, 7)),
    (lambda: nn.Conv2d(3, 4, 3, groups=1), (2, 3, 5, 6)),
    (lambda: nn.MultiheadAttention(6, 2), (5, 2, 6)),
], ids=["linear", "conv", "attention"])
@pytest.mark.parametrize("reparametrize", [
    lambda m: nn.utils.parametrize.register_parametrization(m, _bias_name(m), _Half()),
    lambda m: nn.utils.prune.l1_unstructured(m, _bias_name(m), amount=2),
], ids=["parametrization", "prune"])
@pytest.mark.parametrize("before", [True, False])
def test_a_layer_whose_bias_is_reparametrized_is_plain_whichever_the_order(make, shape,
                                                                           reparametrize, before):
    """The bias is a weight on a constant-1 row of X, matched jointly with the weight: a bias
    recomputed from others (a parametrization, nn.utils.prune) would be matched on that row
    and pulled back through the transformation — neither gradient, as for a reparametrized
    weight. So the layer stays plain, is reported, and gets the ordinary gradient."""
    torch.manual_seed(25)
    twin = nn.Sequential(make()).double()
    model = copy.deepcopy(twin)
    if not before:
        cx.consequentialize(model)
    reparametrize(model[0])
    if not before:
        assert cx.coverage(model).matched == ()
    with pytest.warns(UserWarning, match="left these layers as they are: 0 "):
        cx.consequentialize(model)
    report = cx.coverage(model)
    assert report.matched == () and report.plain[0].name == "0"
    assert not isinstance(model[0], cx.CLinear) and "bias" in report.plain[0].reason
    reparametrize(twin[0])
    for name, p in twin.named_parameters():          # same transformation, same values
        p.data.copy_(dict(model.named_parameters())[name])
    x = torch.randn(shape, dtype=torch.float64)

    def loss(net):
        out = net[0](x, x, x)[0] if isinstance(net[0], nn.MultiheadAttention) else net(x)
        return out.square().sum()
    loss(model).backward()
    loss(twin).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


def _bias_name(module):
    return "in_proj_bias" if isinstance(module, nn.MultiheadAttention) else "bias"


@pytest.mark.parametrize("where", ["in_proj_weight", "out_proj"])
def test_a_reparametrized_attention_is_plain_whichever_the_order(where):
    """Its in-projection or its out_proj reparametrized before or after conversion: the
    attention stays plain on every later call, named with the reason."""
    def reparametrize(attn):
        if where == "out_proj":
            nn.utils.parametrizations.weight_norm(attn.out_proj)
        else:
            nn.utils.parametrize.register_parametrization(attn, "in_proj_weight", _Half())

    for before in (True, False):
        model = nn.Sequential(nn.MultiheadAttention(4, 2))
        if before:
            reparametrize(model[0])
        else:
            cx.consequentialize(model)
            reparametrize(model[0])
            assert cx.coverage(model).matched == ()
        for _ in range(3):
            with pytest.warns(UserWarning, match="left these layers as they are"):
                cx.consequentialize(model)
            assert not isinstance(model[0], cx.CMultiheadAttention), (before, _)
