"""The Conv1d path (and the transposed 1-D and 3-D kinds beside it) under DDP,
torch.compile(fullgraph=True) and AMP, as tests/test_distributed.py, test_compile.py and
test_amp.py check the Conv2d / Linear ones."""
import pytest
import torch
import torch.nn as nn

import consequential_ext as cx
from relative_error import rel_err
from ddp_harness import spawn_ranks
import conv_nd_reference as ref

WORLD, PER_RANK, RIDGE, LR = 2, 3, 1e-2, 0.5


def _conv1d_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding="same", padding_mode="reflect"), nn.ReLU(),
                          nn.Conv1d(4, 4, 3, stride=2, groups=2, bias=False), nn.Tanh(),
                          nn.ConvTranspose1d(4, 2, 3, stride=2, output_padding=1), nn.Flatten(),
                          nn.Linear(2 * 10, 3))
    return cx.consequentialize(model, ridge=RIDGE)


def _conv3d_model():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv3d(2, 3, (3, 2, 2), stride=(2, 1, 1), padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 3 * 5 * 5, 3))
    return cx.consequentialize(model, ridge=RIDGE)


def _batches():
    gen = torch.Generator().manual_seed(2)
    n = WORLD * PER_RANK
    return {"conv1d": (torch.randn(n, 3, 9, generator=gen), torch.randn(n, 3, generator=gen)),
            "conv3d": (torch.randn(n, 2, 5, 4, 4, generator=gen),
                       torch.randn(n, 3, generator=gen))}


MODELS = {"conv1d": _conv1d_model, "conv3d": _conv3d_model}


def _step(model, x, t):
    """Gradients after one backward, and the parameters after one SGD step."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt.zero_grad()
    (0.5 * (model(x) - t).square().sum(-1).mean()).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    opt.step()
    return grads, [p.detach().clone() for p in model.parameters()]


# In float64: DDP solves the D × D system (Grams summed), one process may take the P × P one
# (push-through); in float32 the two sides differ by the Gram's condition number times
# rounding (1e3 here, up to 1.7e-4 apart), which says nothing about the summing.
def _worker(rank):
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return {name: _step(nn.parallel.DistributedDataParallel(MODELS[name]().double()),
                        x[mine].double(), t[mine].double())
            for name, (x, t) in _batches().items()}


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    return spawn_ranks(_worker, WORLD, tmp_path_factory)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ddp_equals_one_process_on_concatenated_batch(two_rank_results, name):
    """The Gram and N are summed across ranks (Conv3d: of the depth-folded problem)."""
    x, t = _batches()[name]
    expected = _step(MODELS[name]().double(), x.double(), t.double())
    for got, want in zip(two_rank_results[name], expected, strict=True):
        for i, (a, e) in enumerate(zip(got, want, strict=True)):
            assert rel_err(a, e) < 1e-10, f"{name} tensor {i}: {rel_err(a, e):.2e}"


def _grads(model, x, t):
    model.zero_grad()
    (0.5 * (model(x) - t).square().sum(-1).mean()).backward()
    return [p.grad.clone() for p in model.parameters()]


# The small batch takes the column side of the solves, the large one the row side.
@pytest.mark.parametrize("name, batch, backend, rule", [
    ("conv1d", 2, "inductor", "consequential"), ("conv1d", 16, "aot_eager", "consequential"),
    ("conv1d", 4, "aot_eager", "backmatch-layerwise"), ("conv3d", 4, "aot_eager", "backmatch")])
def test_compiled_model_matches_eager(name, batch, backend, rule):
    torch._dynamo.reset()
    x, t = (torch.randn((batch,) + v.shape[1:]) for v in _batches()[name])
    model = cx.consequentialize(MODELS[name](), rule=rule, ridge=RIDGE, batchnorm=False)
    eager = _grads(model, x, t)
    compiled = _grads(torch.compile(model, backend=backend, fullgraph=True), x, t)
    for i, (c, e) in enumerate(zip(compiled, eager, strict=True)):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-6, msg=lambda m: f"param {i}: {m}")


AMP_RIDGE = 0.05
FP32_BOUND = 1e-4        # float32 accumulation of bf16 operands (see test_amp.py)
BF16_BOUND = 2.0 ** -8   # one final rounding to bf16


def _amp_layers():
    torch.manual_seed(3)
    return [(cx.CConv1d(3, 4, 3, padding=1, ridge=AMP_RIDGE), nn.Conv1d,
             lambda: torch.randn(5, 3, 8)),
            (cx.CConvTranspose1d(3, 4, 3, stride=2, ridge=AMP_RIDGE), nn.ConvTranspose1d,
             lambda: torch.randn(5, 3, 6))]


def _reference(layer, x, gy):
    if isinstance(layer, nn.ConvTranspose1d):
        return ref.matched_conv_transpose(x, layer.weight, layer.bias, gy, layer.stride,
                                          layer.padding, layer.output_padding, layer.groups,
                                          layer.dilation, AMP_RIDGE)
    return ref.matched_conv(x, layer.weight, layer.bias, gy, layer.stride, layer.padding,
                            layer.dilation, layer.groups, AMP_RIDGE)


@pytest.mark.parametrize("case", range(2))
def test_autocast_bf16_gives_fp32_matched_gradients(case):
    layer, nn_type, make_input = _amp_layers()[case]
    x = make_input()
    captured = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        with torch.no_grad():
            plain = nn_type.forward(layer, x)
        assert y.dtype == torch.bfloat16 and torch.equal(y, plain)
        y.register_hook(lambda g: captured.setdefault("gy", g))
        y.float().square().mean().backward()
    assert captured["gy"].dtype == torch.bfloat16
    assert layer.weight.grad.dtype == layer.bias.grad.dtype == torch.float32
    gw, gb = _reference(layer, x, captured["gy"])
    assert rel_err(layer.weight.grad, gw) < FP32_BOUND
    assert rel_err(layer.bias.grad, gb) < FP32_BOUND


@pytest.mark.parametrize("case", range(2))
def test_bf16_parameters_get_bf16_gradients_from_fp32_solves(case):
    layer, _, make_input = _amp_layers()[case]
    layer.to(torch.bfloat16)
    x = make_input().to(torch.bfloat16)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    assert layer.weight.grad.dtype == layer.bias.grad.dtype == torch.bfloat16
    gw, gb = _reference(layer, x, gy)
    assert rel_err(layer.weight.grad, gw) < BF16_BOUND
    assert rel_err(layer.bias.grad, gb) < BF16_BOUND
