"""The layer-kind registry, Hugging Face's Conv1D, and the coverage report (docs/design.md §5)."""
import io
import pickle
import warnings

import pytest
import torch
import torch.nn as nn

import consequential_ext as cx
from consequential_ext._validate import CLayerMixin
from consequential_ext.modules import CLinearLike
from consequential_ext import registry
from matched_reference import matched_linear

RIDGE = 1e-3


@pytest.fixture
def clean_registry(monkeypatch):
    """Registrations made by a test do not leak into the others."""
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))


def _record_io(model, types):
    """Each module of ``types``: its input and the gradient reaching its output."""
    seen = {}

    def hook(module, args, output):
        entry = seen.setdefault(module, {})
        entry["x"] = args[0].detach()
        output.register_hook(lambda g: entry.__setitem__("gy", g.detach()))
    for m in model.modules():
        if isinstance(m, types):
            m.register_forward_hook(hook)
    return seen


class TransposedToy(nn.Module):
    """A linear-like layer as a user might write one: weight stored (in, out) under another
    name, an optional offset, applied with matmul over any leading dims."""

    def __init__(self, n_in, n_out, offset=True):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
        self.offset = nn.Parameter(torch.randn(n_out)) if offset else None

    def forward(self, x):
        y = x @ self.kernel
        return y if self.offset is None else y + self.offset


@pytest.mark.parametrize("offset", [True, False])
def test_a_registered_toy_layer_is_matched_exactly(clean_registry, offset):
    kind = cx.register_layer(TransposedToy, transposed=True, weight="kernel", bias="offset")
    assert kind.transposed and kind.weight == "kernel"
    torch.manual_seed(3)
    model = nn.Sequential(TransposedToy(7, 9, offset), nn.Tanh(), TransposedToy(9, 4, offset))
    model.double()
    x = torch.randn(2, 5, 7, dtype=torch.float64)          # leading dims: N = 10 rows
    reference_out = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                      # nothing is left plain
        cx.consequentialize(model, ridge=RIDGE)
    assert type(model[0]).__name__ == "CTransposedToy" and isinstance(model[0], TransposedToy)
    seen = _record_io(model, TransposedToy)
    out = model(x)
    assert torch.equal(out, reference_out)                  # forward: the layer's own
    out.pow(3).sum().backward()
    for layer in (model[0], model[2]):
        io = seen[layer]
        bias = layer.offset.detach() if offset else None
        ref_w, ref_b = matched_linear(io["x"], layer.kernel.detach().T, bias, io["gy"], RIDGE)
        torch.testing.assert_close(layer.kernel.grad, ref_w.T, rtol=1e-9, atol=1e-12)
        if offset:
            torch.testing.assert_close(layer.offset.grad, ref_b, rtol=1e-9, atol=1e-12)
    assert cx.coverage(model).share == 1.0


class PlainSubclassLinear(nn.Linear):
    """A Linear subclass matched through its F.linear call (a made C-class)."""

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


def _grads_after_a_step(model, x):
    model.zero_grad(set_to_none=True)
    model(x).pow(2).sum().backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_made_c_classes_pickle_and_are_remade_on_load(clean_registry, monkeypatch, how):
    """The C-classes made at run time (registered linear-like kinds, matched subclasses) are
    attributes of no module: their instances pickle by the plain type and are remade on load,
    in a process that has not made them yet (the caches emptied) — and still match."""
    cx.register_layer(TransposedToy, transposed=True, weight="kernel", bias="offset")
    torch.manual_seed(4)
    model = cx.consequentialize(nn.Sequential(TransposedToy(5, 6), nn.Tanh(),
                                              PlainSubclassLinear(6, 3)).double(), ridge=RIDGE)
    made = type(model[0]), type(model[2])
    if how == "pickle":
        blob = pickle.dumps(model)
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
    monkeypatch.setattr(registry, "_SUBCLASS_TYPES", {})
    cx.register_layer(TransposedToy, transposed=True, weight="kernel", bias="offset")
    if how == "pickle":
        loaded = pickle.loads(blob)
    else:
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    for layer, old_type in zip((loaded[0], loaded[2]), made):
        assert type(layer) is not old_type and type(layer).__name__ == old_type.__name__
        assert isinstance(layer, old_type.__mro__[2]) and layer.ridge == RIDGE
    x = torch.randn(7, 5, dtype=torch.float64)
    for got, want in zip(_grads_after_a_step(loaded, x), _grads_after_a_step(model, x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    monkeypatch.setattr(registry, "_KINDS", {})            # TransposedToy unknown here
    with pytest.raises(pickle.UnpicklingError, match="register_layer"):
        pickle.loads(pickle.dumps(model))


def test_a_registered_layer_with_its_own_weight_name_amortizes(clean_registry):
    """amortize reads the registered weight (README's Dense: "kernel"), not ``.weight``:
    refreshed every step, undamped and without memory, it is the exact matched gradient."""
    cx.register_layer(TransposedToy, transposed=True, weight="kernel", bias="offset")
    torch.manual_seed(17)
    make = lambda: cx.consequentialize(nn.Sequential(TransposedToy(6, 4)).double(), ridge=RIDGE)
    exact, amortized = make(), make()
    amortized.load_state_dict(exact.state_dict())
    cx.amortize(amortized, every=1, decay=0.0, damping=0.0, safeguard_columns=None,
                exact_when_cheaper=False)
    assert amortized[0].amortizer.gram.dtype == torch.float64
    x = torch.randn(20, 6, dtype=torch.float64)
    for model in (exact, amortized):
        model(x).square().sum().backward()
    for got, want in zip(amortized.parameters(), exact.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-12)


def test_register_layer_validates_its_arguments(clean_registry):
    with pytest.raises(TypeError, match="module_type"):
        cx.register_layer(42)
    with pytest.raises(TypeError, match="module_type"):
        cx.register_layer("Conv1D")
    with pytest.raises(ValueError, match="weight and bias"):
        cx.register_layer(TransposedToy, weight="")
    with pytest.raises(TypeError, match="c_type"):
        cx.register_layer(TransposedToy, cx.CLinear)


class DoubledWeightLinear(nn.Linear):
    """Transforms its weight before use: left plain (tests/test_subclasses.py)."""

    def forward(self, x):
        return nn.functional.linear(x, 2 * self.weight, self.bias)


@pytest.mark.filterwarnings("ignore:.*torch.nn.utils.weight_norm.*is deprecated:FutureWarning")
def test_hook_normalised_weights_stay_plain_and_are_named():
    """nn.utils.weight_norm / spectral_norm (the hook-based ones) keep the layer's type but
    recompute ``weight`` from other parameters before each forward: the layer stays plain,
    named with its reason, and trains with nn's gradients."""
    def net():   # no deepcopy: the hooks' derived weights are no graph leaves
        torch.manual_seed(14)
        return nn.Sequential(nn.utils.spectral_norm(nn.Conv2d(2, 3, 3)), nn.Flatten(),
                             nn.utils.weight_norm(nn.Linear(3 * 9, 4)), nn.Tanh(),
                             nn.Linear(4, 2))
    plain, model = net(), net()
    with pytest.warns(UserWarning, match=r"left these layers as they are: 0 \(its weight is no "
                                         r"parameter.*; 2 \(its weight is no parameter"):
        cx.consequentialize(model)
    assert type(model[0]) is nn.Conv2d and type(model[2]) is nn.Linear
    assert type(model[4]) is cx.CLinear
    report = cx.coverage(model)
    assert report.matched == ("4",) and {p.name for p in report.plain} == {"0", "2"}
    x = torch.randn(5, 2, 5, 5)
    model(x).square().sum().backward()
    plain(x).square().sum().backward()
    for (name, got), want in zip(model.named_parameters(), plain.parameters()):
        if not name.startswith("4."):
            torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=0)


def test_coverage_names_every_plain_weight_with_its_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), DoubledWeightLinear(6, 6), nn.Bilinear(6, 6, 6),
                          nn.LayerNorm(6), nn.Linear(6, 3))
    with pytest.warns(UserWarning) as caught:
        cx.consequentialize(model, exclude=["4"])
    text = str(caught[0].message)
    assert "1 (a subclass of Linear: its forward does not pass its own weight to F.linear" \
        in text
    assert "2 (unknown layer type" in text
    assert "4 (" not in text                            # the user's exclusion is not warned about
    report = cx.coverage(model)
    assert report.matched == ("0",)
    reasons = {p.name: p.reason for p in report.plain}
    assert set(reasons) == {"1", "2", "4"}             # LayerNorm has no weight matrix
    assert reasons["4"] == "excluded by the user"
    total = sum(p.numel() for p in model.parameters())
    assert report.matched_params == 4 * 6 + 6 and report.total_params == total
    assert f"{report.share:.1%}" in str(report)


def test_rule_sgd_layers_count_as_plain_by_choice():
    model = cx.consequentialize(nn.Sequential(nn.Linear(3, 3)), rule="sgd")
    report = cx.coverage(model)
    assert report.matched == () and report.plain[0].chosen_by_user
    assert "rule 'sgd'" in report.plain[0].reason


def _gpt2(dtype=torch.float64):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=24, n_head=2, vocab_size=37,
                                     n_positions=16, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    torch.manual_seed(1)
    return transformers.GPT2LMHeadModel(config).to(dtype)


def test_gpt2_conv1d_projections_are_matched_exactly():
    model = _gpt2()
    from transformers.pytorch_utils import Conv1D
    ids = torch.randint(0, 37, (3, 11))
    plain_logits = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # everything is converted
        cx.consequentialize(model, ridge=RIDGE)
    convs = [m for m in model.modules() if isinstance(m, Conv1D)]
    assert len(convs) == 8 and all(isinstance(m, cx.registry.CLinearLike) for m in convs)
    seen = _record_io(model, Conv1D)
    out = model(ids)
    assert torch.equal(out.logits, plain_logits)                # forward bit-identical
    out.logits.square().mean().backward()
    for layer in convs:
        io = seen[layer]
        ref_w, ref_b = matched_linear(io["x"], layer.weight.detach().T, layer.bias.detach(),
                                      io["gy"], RIDGE)
        assert (layer.weight.grad - ref_w.T).norm() <= 1e-8 * ref_w.norm()
        assert (layer.bias.grad - ref_b).norm() <= 1e-8 * ref_b.norm()


def test_coverage_of_gpt2_and_bert():
    transformers = pytest.importorskip("transformers")
    model = _gpt2(torch.float32)
    cx.consequentialize(model, exclude=nn.Embedding)             # the user's choice: no warning
    report = cx.coverage(model)
    assert len(report.matched) == 9                              # 8 Conv1D + lm_head
    reasons = {p.name: p.reason for p in report.plain}
    assert set(reasons) == {"transformer.wte", "transformer.wpe"}
    assert "shares a parameter with matched lm_head" in reasons["transformer.wte"]
    bert = transformers.BertModel(transformers.BertConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=20,
        vocab_size=30, max_position_embeddings=12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cx.consequentialize(bert)
    report = cx.coverage(bert)
    assert len(report.matched) == 10 and report.plain == ()     # 7 Linear, 3 Embedding
    assert 0 < report.share < 1


class ThinToy(TransposedToy):
    """A subclass that adds no forward: converted as its registered linear-like base."""


def test_a_thin_subclass_of_a_registered_linear_like_layer(clean_registry, monkeypatch):
    # Registered and never looked up before (its C-class is made on first use): the thin
    # subclass converts anyway, matches as its base, pickles, and may itself be registered
    # linear-like (it is one).
    cx.register_layer(TransposedToy, transposed=True, weight="kernel", bias="offset")
    torch.manual_seed(7)
    layer = ThinToy(5, 4).double()
    twin = TransposedToy(5, 4).double()
    twin.load_state_dict(layer.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cx.consequentialize(layer, ridge=RIDGE), cx.consequentialize(twin, ridge=RIDGE)
    assert isinstance(layer, ThinToy) and cx.coverage(layer).share == 1.0
    x = torch.randn(3, 5, dtype=torch.float64)
    for got, want in zip(_grads_after_a_step(layer, x), _grads_after_a_step(twin, x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    blob = pickle.dumps(layer)
    monkeypatch.setattr(registry, "_THIN_TYPES", {})
    assert isinstance(pickle.loads(blob), ThinToy)
    monkeypatch.setattr(registry, "_KINDS", {})
    with pytest.raises(pickle.UnpicklingError, match="register_layer of .*ThinToy or of the"):
        pickle.loads(blob)
    cx.register_layer(ThinToy, transposed=True, weight="kernel", bias="offset")


@pytest.mark.parametrize("module_type", [nn.Conv2d, nn.Embedding, nn.ConvTranspose3d,
                                         nn.EmbeddingBag, nn.LSTM, nn.LSTMCell])
def test_a_conv_or_embedding_is_never_registered_as_linear_like(clean_registry, module_type):
    """Its weight is not a matrix (a recurrent layer's is applied once per step and it returns
    a state too): as linear-like, CLinear's backward would fail on it deep in backward;
    torch's own convs, embeddings and recurrent layers are refused by name."""
    with pytest.raises(TypeError, match=f"{module_type.__name__} .*not linear-like"):
        cx.register_layer(module_type)
    assert type(cx.consequentialize(nn.Sequential(nn.Conv2d(2, 3, 3)))[0]) is cx.CConv2d


def test_a_linear_like_weight_must_be_a_matrix():
    x, w = torch.randn(4, 3), torch.randn(2, 3, 1, requires_grad=True)
    with pytest.raises(ValueError, match=r"2-D.*\(2, 3, 1\)"):
        cx.functional.clinear_like(x, w, None, lambda t: t @ w[..., 0].T)


def test_a_projected_lstm_is_named_as_having_no_c_layer():
    lstm = nn.LSTM(3, 4, proj_size=2)
    with pytest.warns(UserWarning, match="proj_size > 0 projects"):
        cx.consequentialize(nn.Sequential(lstm))
    assert type(lstm) is nn.LSTM


class _GRU(nn.GRU):
    """A recurrent layer given a C-class of its own (what register_layer's refusal asks)."""


class _CGRU(CLayerMixin, _GRU):
    """A user's C-class (its backward would be the user's own)."""


def test_a_refused_kind_registered_with_a_c_class_is_reported_as_convertible(clean_registry):
    cx.register_layer(_GRU, _CGRU)
    reason = cx.coverage(nn.Sequential(_GRU(3, 4))).plain[0].reason
    assert reason == "a _GRU not converted (yet): consequentialize converts this kind"
    model = cx.consequentialize(nn.Sequential(_GRU(3, 4)))
    assert type(model[0]) is _CGRU


def test_a_c_class_without_the_mixin_is_refused_by_name(clean_registry):
    """A c_type that is no C-layer: a TypeError naming it at registration (consequentialize
    failed deep inside on it: AttributeError 'cx_unsupported')."""
    class _NotC(_GRU):
        pass

    with pytest.raises(TypeError, match="c_type must mix in .*CLayerMixin.*got _NotC"):
        cx.register_layer(_GRU, _NotC)
    model = cx.consequentialize(nn.Sequential(_GRU(3, 4)))   # the refusal left no entry:
    assert isinstance(model[0], cx.CGRU)                      # converted as its base


class _ConstantBias(nn.Module):
    """Registered linear-like, its bias a plain tensor that takes no gradient: a constant."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.bias = torch.randn(3, dtype=torch.float64)

    def forward(self, x):
        return x @ self.weight.t() + self.bias


class _AliasedBias(nn.Module):
    """Registered linear-like, its bias a property giving a parameter stored as ``b``."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(3, dtype=torch.float64))

    @property
    def bias(self):
        return self.b

    def forward(self, x):
        return x @ self.weight.t() + self.bias


@pytest.mark.parametrize("layer_type", [_ConstantBias, _AliasedBias])
def test_a_constant_or_aliased_bias_is_no_recomputed_one(clean_registry, layer_type):
    """Only a bias recomputed from trained tensors (pruned, parametrized) leaves the layer
    plain: a constant tensor is matched as a frozen bias is (no bias row), and a property
    giving a parameter is that parameter, which gets the matched gradient itself."""
    cx.register_layer(layer_type)
    model = nn.Sequential(layer_type())
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # nothing left plain
        cx.consequentialize(model, ridge=RIDGE)
        cx.consequentialize(model, ridge=RIDGE)  # not taken for one reparametrized since
    assert cx.coverage(model).matched == ("0",)
    x = torch.randn(10, 4, dtype=torch.float64)
    gy = torch.randn(10, 3, dtype=torch.float64)
    model(x).backward(gy)
    layer = model[0]
    trained = layer.bias if isinstance(layer.bias, nn.Parameter) else None
    gw, gb = matched_linear(x, layer.weight, trained, gy, RIDGE)
    torch.testing.assert_close(layer.weight.grad, gw, rtol=1e-8, atol=1e-10)
    if trained is not None:
        torch.testing.assert_close(layer.b.grad, gb, rtol=1e-8, atol=1e-10)


def test_a_bias_pruned_before_an_eval_forward_is_still_recomputed():
    """nn.utils.prune's bias is recomputed by its hook: one computed last without grad mode
    (an eval forward) takes no gradient now, but the next training forward recomputes it."""
    from torch.nn.utils import prune
    layer = nn.Linear(4, 3)
    prune.l1_unstructured(layer, "bias", amount=1)
    with torch.no_grad():
        layer(torch.randn(2, 4))
    assert not layer.bias.requires_grad
    assert registry.derived_tensor(layer, registry.kind_of(nn.Linear)) == "bias"


class _ScaledToy(TransposedToy):
    """TransposedToy with a trainable output scale its forward also uses."""

    def __init__(self, n_in, n_out):
        super().__init__(n_in, n_out)
        self.scale = nn.Parameter(torch.ones(n_out))

    def forward(self, x):
        return super().forward(x) * self.scale


def test_a_registered_layer_training_other_parameters_stays_plain_and_named(clean_registry):
    """Its own forward runs inside the matched Function (no autograd there): ``scale`` would
    get no gradient — it stays plain, named; so does a registration whose weight name the
    layer lacks (it failed at the first forward)."""
    cx.register_layer(_ScaledToy, transposed=True, weight="kernel", bias="offset")
    model = nn.Sequential(_ScaledToy(3, 4))
    with pytest.warns(UserWarning, match=r"0 \(trains parameters besides its registered weight "
                                         r"and bias \(scale\)"):
        cx.consequentialize(model, ridge=RIDGE)
    assert type(model[0]) is _ScaledToy
    assert cx.coverage(model).share == 0.0
    model(torch.randn(2, 3)).sum().backward()
    assert model[0].scale.grad is not None
    model[0].scale.requires_grad_(False)               # frozen: nothing is lost
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cx.consequentialize(model, ridge=RIDGE)
    assert type(model[0]).__name__ == "C_ScaledToy"
    model[0].scale.requires_grad_(True)                # unfrozen since: converting again
    with pytest.warns(UserWarning, match=r"\(scale\)"):  # makes it plain, named
        cx.consequentialize(model, ridge=RIDGE)
    assert type(model[0]) is _ScaledToy
    cx.register_layer(TransposedToy, transposed=True, weight="w", bias="offset")
    with pytest.warns(UserWarning, match="registered weight 'w' is no tensor attribute"):
        cx.consequentialize(nn.Sequential(TransposedToy(3, 4)))


def test_a_converted_registered_layer_takes_its_input_by_keyword(clean_registry):
    """Its own signature: ``layer(x=h)`` as before conversion, the same output, matched."""
    cx.register_layer(TransposedToy, transposed=True, weight="kernel", bias="offset")
    torch.manual_seed(4)
    layer = TransposedToy(5, 3).double()
    x = torch.randn(6, 5, dtype=torch.float64)
    before = layer(x=x)
    cx.consequentialize(nn.Sequential(layer), ridge=RIDGE)
    out = layer(x=x)
    assert torch.equal(out, before)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref_w, ref_b = matched_linear(x, layer.kernel.detach().T, layer.offset.detach(), grad_out,
                                  RIDGE)
    torch.testing.assert_close(layer.kernel.grad, ref_w.T, rtol=1e-9, atol=1e-12)
    # Anything besides the input would run inside the matched Function: refused, named.
    for call in (lambda: layer(y=x), lambda: layer(x, x), lambda: layer(x=x, gain=2.0)):
        with pytest.raises(TypeError, match="takes its input alone, positionally or as x="):
            call()


def test_registering_again_reaches_layers_converted_before(clean_registry):
    """``register_layer`` replaces the entry: converting again remakes the layers converted
    under the old one (here a wrong ``transposed``, which failed at the forward), and
    excluding one after that gives back the plain class."""
    cx.register_layer(TransposedToy, weight="kernel", bias="offset")        # transposed wrong
    torch.manual_seed(5)
    model = nn.Sequential(TransposedToy(4, 3)).double()
    cx.consequentialize(model, ridge=RIDGE)
    with pytest.raises(ValueError, match="transposed=True"):
        model(torch.randn(2, 4, dtype=torch.float64))
    cx.register_layer(TransposedToy, transposed=True, weight="kernel", bias="offset")
    cx.consequentialize(model, ridge=RIDGE)
    assert model[0]._cx_kind.transposed
    x = torch.randn(7, 4, dtype=torch.float64)
    grad_out = torch.randn(7, 3, dtype=torch.float64)
    model(x).backward(grad_out)
    layer = model[0]
    ref_w, _ = matched_linear(x, layer.kernel.detach().T, layer.offset.detach(), grad_out, RIDGE)
    torch.testing.assert_close(layer.kernel.grad, ref_w.T, rtol=1e-9, atol=1e-12)
    cx.consequentialize(model, exclude=["0"])
    assert type(model[0]) is TransposedToy
    # registered again with a C-class of the user's: converting again reaches it too
    cx.consequentialize(model, ridge=RIDGE)

    class OwnCToy(TransposedToy, CLinearLike):
        _cx_kind = registry.LayerKind("own", None, True, "kernel", "offset")

    cx.register_layer(TransposedToy, OwnCToy, transposed=True, weight="kernel", bias="offset")
    cx.consequentialize(model, ridge=RIDGE)
    assert type(model[0]) is OwnCToy


def test_jit_trace_of_a_registered_layer_is_named_while_training_and_works_without_grad(
        clean_registry):
    """The tracer cannot record a Function taking the layer's own forward (it raised
    'unordered_map::at'): training, a NotImplementedError saying so; under no_grad the trace
    is the layer's forward, equal to eager."""
    cx.register_layer(TransposedToy, transposed=True, weight="kernel", bias="offset")
    model = cx.consequentialize(nn.Sequential(TransposedToy(3, 4), nn.Tanh()))
    x = torch.randn(5, 3)
    with pytest.raises(NotImplementedError, match="registered linear-like C-layer while it "
                                                   "trains"):
        torch.jit.trace(model, x)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        assert torch.equal(traced(x), model(x))
