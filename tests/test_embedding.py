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
