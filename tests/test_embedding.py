"""nn.Embedding as a C-layer: the lookup is a Linear on one-hot rows, so the matched gradient
is G (A + λI)⁻¹ with A = XᵀX/N over one-hot X (docs/design.md §2). The reference builds X and
solves the full V × V system in float64 — it does not use that A is diagonal."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import consequential_ext as cx
from relative_error import rel_err
from matched_reference import matched_linear, solve_right

RIDGE = 1e-3
V, E = 11, 5


def reference(indices, weight, grad_out, ridge, **embedding_kwargs):
    """Matched gradient of ``weight`` (V, E): ordinary G by autograd of F.embedding, then
    Gᵀ-as-Linear-weight times (XᵀX/N + λI)⁻¹, X the one-hot rows of the N indices."""
    w = weight.detach().double().requires_grad_()
    F.embedding(indices, w, **embedding_kwargs).backward(grad_out.double())
    onehot = F.one_hot(indices.reshape(-1), weight.shape[0]).double()       # (N, V)
    a = onehot.T @ onehot / onehot.shape[0]
    return solve_right(w.grad.T, a, ridge).T


def _indices(*shape, generator):
    idx = torch.randint(0, V - 3, shape, generator=generator)            # 3 rows never seen
    idx[0, :3] = 2                                                        # a frequent row
    return idx


@pytest.mark.parametrize("padding_idx", [None, 2, -1])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_embedding_matches_the_one_hot_reference(padding_idx, scale_grad_by_freq):
    gen = torch.Generator().manual_seed(3)
    plain = nn.Embedding(V, E, padding_idx=padding_idx, scale_grad_by_freq=scale_grad_by_freq,
                         dtype=torch.float64)
    layer = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cx.consequentialize(nn.Sequential(layer), ridge=RIDGE)
    assert type(layer) is cx.CEmbedding
    idx = _indices(3, 7, generator=gen)
    if padding_idx == -1:
        idx[1, 1] = V - 1
    out = layer(idx)
    assert torch.equal(out, plain(idx))
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(grad_out)
    expected = reference(idx, plain.weight, grad_out, RIDGE, padding_idx=plain.padding_idx,
                         scale_grad_by_freq=scale_grad_by_freq)
    assert rel_err(layer.weight.grad, expected) < 1e-10
    unseen = torch.ones(V, dtype=torch.bool)
    unseen[idx.unique()] = False
    assert torch.equal(layer.weight.grad[unseen], torch.zeros_like(layer.weight.grad[unseen]))
    if padding_idx is not None:
        assert not layer.weight.grad[plain.padding_idx].any()


def test_max_norm_renormalises_as_nn_and_matches_on_the_renormalised_rows():
    gen = torch.Generator().manual_seed(4)
    plain = nn.Embedding(V, E, max_norm=0.5, dtype=torch.float64)
    layer = cx.CEmbedding(V, E, max_norm=0.5, dtype=torch.float64, ridge=RIDGE)
    layer.load_state_dict(plain.state_dict())
    idx = _indices(4, 5, generator=gen)
    out = layer(idx)
    assert torch.equal(out, plain(idx)) and torch.equal(layer.weight, plain.weight)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(grad_out)
    expected = reference(idx, plain.weight, grad_out, RIDGE)
    assert rel_err(layer.weight.grad, expected) < 1e-10


def test_a_max_norm_table_looked_up_twice_trains_as_nn_does():
    """One max_norm table looked up twice in a forward (source and target tokens): the second
    lookup renormalises rows in place, and the saved weight failed the first call's backward
    ("modified by an inplace operation"; nn's backward reads only the table's size). Each
    call's matched gradient, summed; so too after an edit of the table under no_grad."""
    gen = torch.Generator().manual_seed(5)
    plain = nn.Embedding(V, E, max_norm=0.5, dtype=torch.float64)
    with torch.no_grad():
        plain.weight.mul_(3)                       # rows past max_norm: both lookups renorm
    layer = cx.CEmbedding(V, E, max_norm=0.5, dtype=torch.float64, ridge=RIDGE)
    layer.load_state_dict(plain.state_dict())
    a, b = _indices(3, 4, generator=gen), _indices(2, 5, generator=gen)
    b[0, 0] = V - 1                               # a row only the second lookup renormalises
    ya, yb = layer(a), layer(b)
    assert torch.equal(ya, plain(a)) and torch.equal(yb, plain(b))
    ga = torch.randn(ya.shape, generator=gen, dtype=torch.float64)
    gb = torch.randn(yb.shape, generator=gen, dtype=torch.float64)
    torch.autograd.backward([ya, yb], [ga, gb])
    expected = reference(a, plain.weight, ga, RIDGE) + reference(b, plain.weight, gb, RIDGE)
    assert rel_err(layer.weight.grad, expected) < 1e-10
    layer.weight.grad = None
    out = layer(a)
    with torch.no_grad():
        layer.weight[0].zero_()
    out.backward(ga)
    assert rel_err(layer.weight.grad, reference(a, layer.weight, ga, RIDGE)) < 1e-10


@pytest.mark.parametrize("padding_idx", [0, None])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparse_gradient_equals_the_dense_one_and_leaves_grad_output_alone(dtype, padding_idx):
    """Without padding_idx the sparse gradient's values are grad_output's own memory: the
    rescale must not write into it (nor fail on the expanded gradient ``.sum()`` sends)."""
    gen = torch.Generator().manual_seed(5)
    dense = cx.CEmbedding(V, E, padding_idx=padding_idx, ridge=RIDGE, dtype=dtype)
    sparse = cx.CEmbedding(V, E, padding_idx=padding_idx, sparse=True, ridge=RIDGE, dtype=dtype)
    sparse.load_state_dict(dense.state_dict())
    idx = _indices(2, 9, generator=gen)
    grad_out = torch.randn(2, 9, E, generator=gen, dtype=dtype)
    kept = grad_out.clone()
    dense(idx).backward(grad_out)
    sparse(idx).backward(grad_out)
    assert torch.equal(grad_out, kept)
    assert sparse.weight.grad.is_sparse
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert rel_err(sparse.weight.grad.to_dense(), dense.weight.grad) < tol
    assert rel_err(dense.weight.grad, reference(idx, dense.weight, grad_out, RIDGE,
                                                padding_idx=padding_idx)) < tol * 10
    torch.optim.SparseAdam(sparse.parameters()).step()     # what sparse=True is for
    sparse.zero_grad(set_to_none=True)
    dense.zero_grad(set_to_none=True)
    sparse(idx).sum().backward()                           # an expanded grad_output
    dense(idx).sum().backward()
    assert rel_err(sparse.weight.grad.to_dense(), dense.weight.grad) < tol


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("shape", [(0,), (4, 0)])
def test_no_indices_give_a_zero_gradient_as_nn(shape, sparse):
    """N = 0: the one-hot Gram is a sum over nothing (A = 0, not 0/0), G = 0, so the
    matched gradient is nn's zero, not NaN."""
    layer = cx.CEmbedding(V, E, sparse=sparse, ridge=RIDGE)
    plain = nn.Embedding(V, E, sparse=sparse)
    plain.load_state_dict(layer.state_dict())
    idx = torch.zeros(shape, dtype=torch.long)
    layer(idx).sum().backward()
    plain(idx).sum().backward()
    got, want = layer.weight.grad, plain.weight.grad
    assert got.is_sparse == sparse
    assert torch.equal(got.to_dense(), want.to_dense()) and not got.to_dense().any()


def test_tied_embedding_and_head_get_both_matched_gradients():
    """A weight shared by a CEmbedding and a CLinear gets the sum of both matched gradients."""
    gen = torch.Generator().manual_seed(6)
    emb = cx.CEmbedding(V, E, ridge=RIDGE, dtype=torch.float64)
    head = cx.CLinear(E, V, bias=False, ridge=RIDGE, dtype=torch.float64)
    head.weight = emb.weight
    idx = _indices(3, 4, generator=gen)
    hidden = emb(idx)
    hidden.retain_grad()
    logits = head(torch.tanh(hidden))
    grad_out = torch.randn(logits.shape, generator=gen, dtype=torch.float64)
    logits.backward(grad_out)
    from_head, _ = matched_linear(torch.tanh(hidden), emb.weight, None, grad_out, RIDGE)
    from_lookup = reference(idx, emb.weight, hidden.grad, RIDGE)
    assert rel_err(emb.weight.grad, from_head + from_lookup) < 1e-10


class _TiedLM(nn.Module):
    """An embedding and a head sharing one weight, as Hugging Face's tied language models."""
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, E, dtype=torch.float64)
        self.head = nn.Linear(E, V, bias=False, dtype=torch.float64)
        self.head.weight = self.emb.weight

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)))


def test_tied_weight_with_a_plain_embedding_gets_matched_plus_ordinary_without_a_warning():
    """The embedding left plain (the user's exclude, or a subclass it cannot convert) and the
    head matched: the weight gets the head's matched gradient plus the lookup's ordinary one
    (docs/design.md §2), which coverage reports — the first forward's check does not warn of
    the lookup as a use outside the head."""
    gen = torch.Generator().manual_seed(8)
    model = _TiedLM()
    cx.consequentialize(model, exclude=nn.Embedding, ridge=RIDGE)
    assert "shares a parameter with matched head" in cx.coverage(model).plain[0].reason
    idx = _indices(3, 4, generator=gen)
    assert model._forward_hooks                      # the first forward's check is armed
    grad_out = torch.randn(3, 4, V, generator=gen, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(idx).backward(grad_out)
    assert not model._forward_hooks                  # it ran
    w = model.emb.weight.detach()
    h = torch.tanh(F.embedding(idx, w))
    from_head, _ = matched_linear(h, w, None, grad_out, RIDGE)
    gh = (grad_out @ w) * (1 - h.square())               # ordinary signal into the lookup
    from_lookup = torch.zeros_like(w).index_add_(0, idx.reshape(-1), gh.reshape(-1, E))
    assert rel_err(model.emb.weight.grad, from_head + from_lookup) < 1e-10


class _ScaledEmbedding(nn.Embedding):
    """nn.Embedding with extra steps (Hugging Face's Gemma / BART scaled word embeddings)."""
    def forward(self, input):
        return super().forward(input) * 3.0


@pytest.fixture
def clean_registry(monkeypatch):
    """The registration made here does not leak into other tests."""
    monkeypatch.setattr(cx.registry, "_KINDS", dict(cx.registry._KINDS))


def _check_scaled_lookup_matched(model, plain):
    gen = torch.Generator().manual_seed(9)
    idx = _indices(3, 4, generator=gen)
    grad_out = torch.randn(3, 4, E, generator=gen, dtype=torch.float64)
    assert torch.equal(model(idx), plain(idx))
    model(idx).backward(grad_out)
    want = reference(idx, model[0].weight, 3.0 * grad_out, RIDGE, padding_idx=1)
    assert rel_err(model[0].weight.grad, want) < 1e-10


def test_an_embedding_with_extra_steps_is_matched_through_its_lookup():
    """Hugging Face's scaled word embeddings (BART, Gemma: super().forward(ids) · scale) are
    matched on the lookup their forward makes, the extra steps kept — they stayed plain."""
    model = nn.Sequential(_ScaledEmbedding(V, E, padding_idx=1, dtype=torch.float64))
    plain = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cx.consequentialize(model, ridge=RIDGE)
    assert cx.coverage(model).share == 1.0
    with pytest.raises(ValueError, match="no C-layer with a Gram to amortize"):
        cx.amortize(model)                  # exact at O(V), as CEmbedding's
    _check_scaled_lookup_matched(model, plain)


class _LearnedPositions(nn.Embedding):
    """Hugging Face's BART pattern: token ids (B, T) in, the rows of positions offset..T+offset
    out (the probe's input must be 2-D for its shape unpacking)."""
    def forward(self, input_ids):
        batch, length = input_ids.shape[:2]
        positions = torch.arange(length, device=self.weight.device).expand(batch, -1)
        return super().forward(positions + 2)


def test_learned_positions_are_matched_on_the_positions_looked_up():
    layer = _LearnedPositions(V, E, dtype=torch.float64)
    plain = copy.deepcopy(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cx.consequentialize(nn.Sequential(layer), ridge=RIDGE)
    ids = torch.zeros(3, 5, dtype=torch.long)
    grad_out = torch.randn(3, 5, E, dtype=torch.float64)
    assert torch.equal(layer(ids), plain(ids))
    layer(ids).backward(grad_out)
    positions = torch.arange(5).expand(3, -1) + 2
    assert rel_err(layer.weight.grad, reference(positions, layer.weight, grad_out, RIDGE)) < 1e-10


class _PositionsOfAShape(nn.Embedding):
    """Hugging Face's LED / Blenderbot / BlenderbotSmall learned positions: forward takes
    ``input_ids.shape`` (a torch.Size), not the ids."""
    def forward(self, input_ids_shape, cache_length=0):
        batch, length = input_ids_shape[:2]
        positions = torch.arange(cache_length, cache_length + length, dtype=torch.long,
                                 device=self.weight.device)
        return super().forward(positions)


def test_learned_positions_taking_a_shape_are_matched_on_the_positions_looked_up():
    """The probe tries the ids' shape where the forward fails on ids: such positions stayed
    plain, named with a many-line overload error of torch.arange."""
    layer = _PositionsOfAShape(V, E, dtype=torch.float64)
    plain = copy.deepcopy(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cx.consequentialize(nn.Sequential(layer), ridge=RIDGE)
    assert cx.coverage(layer).share == 1.0
    shape = torch.Size((3, 5))
    grad_out = torch.randn(5, E, dtype=torch.float64)
    assert torch.equal(layer(shape, 2), plain(shape, 2))
    layer(shape, 2).backward(grad_out)
    positions = torch.arange(2, 7)
    assert rel_err(layer.weight.grad, reference(positions, layer.weight, grad_out, RIDGE)) < 1e-10


def test_an_embedding_the_probe_cannot_run_is_named_with_the_first_line_of_the_error():
    class NeedsDevice(nn.Embedding):           # ProphetNet: forward(inputs_shape, device)
        def forward(self, inputs_shape, device):
            return super().forward(torch.ones(inputs_shape, dtype=torch.long, device=device))

    class Overload(nn.Embedding):              # torch.arange to a tensor: a many-line TypeError
        def forward(self, ids):
            return super().forward(torch.arange(0, ids, device=self.weight.device))

    model = nn.Sequential(NeedsDevice(V, E), Overload(V, E))
    with pytest.warns(UserWarning) as caught:
        cx.consequentialize(model)
    text = str(caught[0].message)
    assert ("0 (a subclass of Embedding: its forward failed on a probe input of shape (2, 2) "
            "(and on torch.Size([2, 2])): ") in text
    assert "NeedsDevice.forward() missing 1 required positional argument: 'device')" in text
    assert "1 (a subclass of Embedding: its forward failed on a probe input of shape (2, 2)" \
        in text and "\n" not in text
    assert type(model[0]) is NeedsDevice and type(model[1]) is Overload


def test_a_c_class_for_an_embedding_with_extra_steps_must_run_its_forward(clean_registry):
    """A C-class registered for such a subclass: the subclass first in the bases keeps its
    forward (bit-identical) and matches the lookup inside it; cx.CEmbedding first would run
    nn's forward without the extra steps — refused."""
    class Wrong(cx.CEmbedding, _ScaledEmbedding):
        pass

    with pytest.raises(TypeError, match=r"c_type Wrong runs CEmbedding\.forward instead of "
                                        r"_ScaledEmbedding's own: put _ScaledEmbedding first"):
        cx.register_layer(_ScaledEmbedding, Wrong)
    model = nn.Sequential(_ScaledEmbedding(V, E, padding_idx=1, dtype=torch.float64))
    cx.register_layer(_ScaledEmbedding, type("Right", (_ScaledEmbedding, cx.CEmbedding), {}))
    plain = copy.deepcopy(model)
    cx.consequentialize(model, ridge=RIDGE)
    assert type(model[0]).__name__ == "Right"
    _check_scaled_lookup_matched(model, plain)


def test_rules():
    gen = torch.Generator().manual_seed(7)
    idx = _indices(3, 4, generator=gen)
    grads = {}
    for rule in cx.RULES:
        torch.manual_seed(0)
        layer = cx.CEmbedding(V, E, padding_idx=1, rule=rule)
        layer(idx).square().sum().backward()
        grads[rule] = layer.weight.grad
    torch.manual_seed(0)
    plain = nn.Embedding(V, E, padding_idx=1)
    plain(idx).square().sum().backward()
    assert torch.equal(grads["sgd"], plain.weight.grad)
    assert torch.equal(grads["backmatch-layerwise"], plain.weight.grad)   # s = 1, no solve
    assert torch.equal(grads["backmatch"], grads["consequential"])          # same weight rule


def test_bad_arguments_and_embedding_bag():
    with pytest.raises(ValueError, match="padding_idx"):
        cx.functional.cembedding(torch.tensor([0]), torch.randn(3, 2), padding_idx=3)
    with pytest.raises(ValueError, match="ridge"):
        cx.functional.cembedding(torch.tensor([0]), torch.randn(3, 2), ridge=0.0)
    model = nn.Sequential(nn.EmbeddingBag(V, E), nn.Linear(E, 2))
    with pytest.warns(UserWarning, match=r"0 \(nn\.EmbeddingBag is not supported: a bag"):
        cx.consequentialize(model)
    assert type(model[0]) is nn.EmbeddingBag


@pytest.mark.parametrize("padding_idx", [0, -2])
def test_jit_trace_of_an_embedding_with_a_padding_row_trains_as_eager(padding_idx):
    """torch.jit.trace through a CEmbedding with padding_idx: the index taken modulo the
    table's size was a traced value the tracer could not hand Function.apply
    ('unordered_map::at'); nn.Embedding stores it non-negative, so no arithmetic is traced."""
    gen = torch.Generator().manual_seed(6)
    layer = cx.CEmbedding(V, E, padding_idx=padding_idx, dtype=torch.float64, ridge=RIDGE)
    idx = _indices(3, 4, generator=gen)
    idx[0, 1] = layer.padding_idx
    grad_out = torch.randn(3, 4, E, generator=gen, dtype=torch.float64)
    traced = torch.jit.trace(layer, idx, check_trace=False)
    traced(idx).backward(grad_out)
    by_trace, layer.weight.grad = layer.weight.grad, None
    layer(idx).backward(grad_out)
    torch.testing.assert_close(by_trace, layer.weight.grad, rtol=0, atol=0)
    expected = reference(idx, layer.weight, grad_out, RIDGE, padding_idx=layer.padding_idx)
    assert rel_err(by_trace, expected) < 1e-10
