"""The attention path at scale: two DDP ranks equal one process on the concatenated batch,
torch.compile(fullgraph=True) gives eager's gradients, and autocast keeps float32 matching."""
import copy

import pytest
import torch
import torch.nn as nn

import consequential_ext as cx
from relative_error import rel_err
from ddp_harness import spawn_ranks

E, H, L = 8, 2, 5
WORLD, PER_RANK = 2, 3
RIDGE = 1e-2


class _Tiny(nn.Module):
    """Embedding → self-attention → cross-attention on a fixed memory → head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(13, E)
        self.self_attn = nn.MultiheadAttention(E, H, batch_first=True)
        self.cross = nn.MultiheadAttention(E, H, kdim=3, vdim=3, batch_first=True)
        self.head = nn.Linear(E, 2)

    def forward(self, ids, memory):
        x = self.embed(ids)
        x = x + self.self_attn(x, x, x, need_weights=False)[0]
        x = x + self.cross(x, memory, memory)[0]
        return self.head(x).mean(1)


def _model():
    torch.manual_seed(0)
    return cx.consequentialize(_Tiny(), ridge=RIDGE)


def _batch():
    gen = torch.Generator().manual_seed(1)
    n = WORLD * PER_RANK
    return (torch.randint(0, 13, (n, L), generator=gen), torch.randn(n, 4, 3, generator=gen),
            torch.randn(n, 2, generator=gen))


def _grads(model, ids, memory, target):
    model.zero_grad()
    (0.5 * (model(ids, memory) - target).square().sum(-1).mean()).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def _worker(rank):
    ids, memory, target = _batch()
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return _grads(nn.parallel.DistributedDataParallel(_model()), ids[mine], memory[mine],
                  target[mine])


def test_ddp_attention_equals_one_process_on_concatenated_batch(tmp_path_factory):
    grads = spawn_ranks(_worker, WORLD, tmp_path_factory)
    expected = _grads(_model(), *_batch())
    for i, (g, e) in enumerate(zip(grads, expected, strict=True)):
        assert rel_err(g, e) < 1e-4, (i, rel_err(g, e))


def test_compiled_attention_matches_eager():
    torch._dynamo.reset()
    model = _model()
    eager = _grads(model, *_batch())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    for i, (c, e) in enumerate(zip(_grads(compiled, *_batch()), eager, strict=True)):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6, msg=lambda m: f"param {i}: {m}")


@pytest.mark.parametrize("backward_in_autocast", [False, True])
def test_autocast_bf16_attention(backward_in_autocast):
    """Forward is nn's under autocast; gradients come back float32, within bf16's rounding of
    the float32 matched gradient and far from the ordinary one."""
    model, batch = _model(), _batch()
    plain = copy.deepcopy(model)
    for layer in (plain.self_attn, plain.cross):
        layer.__class__ = nn.MultiheadAttention
    exact = _grads(model, *batch)
    ordinary = _grads(cx.consequentialize(copy.deepcopy(model), rule="sgd"), *batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*batch[:2])
        assert torch.equal(out, plain(*batch[:2]))
        loss = 0.5 * (out.float() - batch[2]).square().sum(-1).mean()
        model.zero_grad()
        if backward_in_autocast:
            loss.backward()
    if not backward_in_autocast:
        loss.backward()
    names = [n for n, _ in model.named_parameters()]
    for name, p, e, o in zip(names, model.parameters(), exact, ordinary, strict=True):
        assert p.grad.dtype == torch.float32, name
        if "proj" in name:
            assert rel_err(p.grad, e) < 0.05 < rel_err(o, e), (name, rel_err(p.grad, e),
                                                                 rel_err(o, e))
