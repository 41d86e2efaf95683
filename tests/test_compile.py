"""torch.compile: every custom op passes opcheck; consequentialized models compile with
fullgraph=True and give eager's gradients."""
import warnings

import pytest
import torch
import torch.nn as nn

import consequential_ext as cx
from relative_error import rel_err

NAMESPACE = "consequential_ext::"


def _spd(*batch_and_d, dtype=torch.float32):
    *batch, d = batch_and_d
    a = torch.randn(*batch, d, d + 2, dtype=dtype)
    return a @ a.transpose(-1, -2) / d


def _ridge_solve_samples():
    return [(_spd(9), torch.randn(4, 9), 0.1),
            (_spd(3, 7, dtype=torch.float64), torch.randn(3, 5, 7, dtype=torch.float64), 1e-3),
            (_spd(2, 5), torch.randn(2, 1, 5, dtype=torch.bfloat16), 0.5, torch.float32)]


def _im2col_gram_samples():
    return [(torch.randn(2, 3, 7, 6), [3, 3], [1, 1], [1, 1], [1, 1], 1, True),
            (torch.randn(1, 6, 9, 8, dtype=torch.float64), [3, 2], [2, 1], [1, 0], [1, 2], 3,
             False)]


def _im2col_gram_algorithm_samples():
    return [(torch.randn(3, 16, 8, 7), [3, 3], [1, 1], [1, 1], [1, 1], 1, True, "shift"),
            (torch.randn(2, 4, 7, 6), [3, 3], [2, 2], [1, 1], [1, 1], 2, False, "tiled")]


def _conv_gram_grad_samples():
    # the shift kernel's G (16 channels a side), and ATen's (3 channels, stride 2, float64)
    return [(torch.randn(4, 16, 6, 5), torch.randn(4, 16, 6, 5), [3, 3], [1, 1], [1, 1],
             [1, 1], 1, True),
            (torch.randn(2, 6, 7, 6, dtype=torch.float64),
             torch.randn(2, 4, 3, 3, dtype=torch.float64), [3, 2], [2, 2], [0, 0], [1, 1], 2,
             False)]


# Sample arguments per op with Tensor arguments. A new op fails test_every_op_has_samples
# until it gets an entry here, so opcheck covers it from the start.
SAMPLES = {
    "ridge_solve": _ridge_solve_samples,
    "ridge_solve_reporting": _ridge_solve_samples,
    "im2col_gram": _im2col_gram_samples,
    "_im2col_gram_algorithm": _im2col_gram_algorithm_samples,
    "_conv_gram_grad": _conv_gram_grad_samples,
    "_conv_weight_grad": _conv_gram_grad_samples,
}


def _tensor_ops():
    names = sorted(n[len(NAMESPACE):] for n in torch._C._dispatch_get_all_op_names()
                   if n.startswith(NAMESPACE))
    return [n for n in names
            if any(isinstance(a.type, torch.TensorType)
                   for a in getattr(torch.ops.consequential_ext, n).default._schema.arguments)]


def _runs_on_cpu(name):
    key = NAMESPACE + name
    return any(torch._C._dispatch_has_kernel_for_dispatch_key(key, k)
               for k in ("CPU", "CompositeExplicitAutograd", "CompositeImplicitAutograd"))


def test_every_op_has_samples():
    ops = _tensor_ops()
    assert "ridge_solve" in ops, ops  # the compiled extension is loaded
    assert not set(ops) - set(SAMPLES), f"add opcheck samples for {set(ops) - set(SAMPLES)}"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(name):
    if name not in _tensor_ops():
        pytest.skip(f"consequential_ext::{name} is not registered in this build")
    if not _runs_on_cpu(name):
        pytest.skip(f"consequential_ext::{name} has no CPU kernel in this build (reference only)")
    op = getattr(torch.ops.consequential_ext, name).default
    torch.manual_seed(0)
    for args in SAMPLES[name]():
        torch.library.opcheck(op, args)


def _model():
    torch.manual_seed(0)
    return cx.consequentialize(nn.Sequential(
        nn.Conv2d(4, 6, 3, padding="same", groups=2), nn.ReLU(),
        nn.Conv2d(6, 5, 3, stride=2, bias=False), nn.Flatten(),
        nn.Linear(5 * 3 * 3, 7), nn.Tanh(), nn.Linear(7, 3)), ridge=1e-2)


def _grads(model, x, t):
    model.zero_grad()
    (0.5 * (model(x) - t).square().sum(-1).mean()).backward()
    return [p.grad.clone() for p in model.parameters()]


# The small batch takes the column side for the Linear layers, the large one the row side;
# aot_eager for the second keeps CI time down (the custom ops are opaque to both backends).
@pytest.mark.parametrize("batch, backend", [(3, "inductor"), (16, "aot_eager")])
def test_compiled_model_matches_eager(batch, backend):
    torch._dynamo.reset()
    x, t = torch.randn(batch, 4, 7, 7), torch.randn(batch, 3)
    model = _model()
    eager = _grads(model, x, t)
    compiled = _grads(torch.compile(model, backend=backend, fullgraph=True), x, t)
    # float32 both, fused differently by inductor: equal to rounding, norm-wise.
    errors = [rel_err(c, e) for c, e in zip(compiled, eager, strict=True)]
    assert max(errors) < 1e-5, errors


def test_dynamic_shapes_compile_and_match_eager_on_both_sides():
    """dynamic=True traces the layers' float attributes (ridge) as symbolic floats: the
    argument checks must hold for them; the batch sizes take either solve side."""
    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    for batch in (3, 16, 5):
        x, t = torch.randn(batch, 4, 7, 7), torch.randn(batch, 3)
        errors = [rel_err(c, e) for c, e in zip(_grads(compiled, x, t), _grads(model, x, t),
                                                strict=True)]
        assert max(errors) < 1e-6, (batch, errors)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_layerwise_batch_norm_under_compile_is_a_clear_error(fullgraph):
    """Eq. 36 finds the C-layer feeding a norm in the eager autograd graph; compiled, it
    would silently take the no-producer form (0.66× eager's gradients, fullgraph=False) or
    fail inside dynamo: it is refused, naming the rule. A norm on the model's input (no
    producer) still compiles."""
    torch._dynamo.reset()
    torch.manual_seed(16)
    model = cx.consequentialize(nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(),
                                              nn.Linear(8, 2)), rule="backmatch-layerwise")
    with pytest.raises(RuntimeError, match="backmatch-layerwise' with batch norms cannot run "
                                           "under torch.compile"):
        torch.compile(model, backend="aot_eager", fullgraph=fullgraph)(torch.randn(16, 5))
    first = cx.consequentialize(nn.Sequential(nn.BatchNorm1d(5), nn.Linear(5, 2)),
                                rule="backmatch-layerwise")
    x, t = torch.randn(16, 5), torch.randn(16, 2)
    compiled = torch.compile(first, backend="aot_eager", fullgraph=fullgraph)
    errors = [rel_err(c, e) for c, e in zip(_grads(compiled, x, t), _grads(first, x, t))]
    assert max(errors) < 1e-6, errors


def test_compiled_escalation_warns_when_the_graph_runs():
    torch._dynamo.reset()
    layer = cx.CLinear(4, 2, bias=False, ridge=1e-9)
    forward = torch.compile(lambda x: layer(x).sum(), fullgraph=True)
    x = torch.randn(50, 1).expand(50, 4).contiguous()  # rank-1 inputs: a singular Gram
    cx.ops.reference._escalation_warned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        forward(x).backward()
    assert any("ridge escalated" in str(w.message) for w in caught)
    assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("form", ["int", "pair", "conv1d", "dynamic weight"])
def test_symbolic_conv_geometry_compiles_and_matches_eager(form):
    """Geometry from a dynamic shape is a SymInt in the traced graph, and so is the kernel
    size of a functional conv whose weight is a graph input: the ops' argument checks must
    trace for it (an int padding used to graph-break, then failed in the traced backward
    once forward normalised it; a pair or a dynamic weight always failed)."""
    import conv_nd_reference
    import matched_reference
    CF = cx.functional
    calls = {
        "int": lambda x, w, b: CF.cconv2d(x, w, b, padding=x.shape[-1] // 4, ridge=0.05),
        "pair": lambda x, w, b: CF.cconv2d(x, w, b, padding=(x.shape[-1] // 4, 1), ridge=0.05),
        "conv1d": lambda x, w, b: CF.cconv1d(x[:, :, 0], w[..., 0], b,
                                             padding=x.shape[-1] // 4, ridge=0.05),
        "dynamic weight": lambda x, w, b: CF.cconv2d(x, w, b, stride=2, padding=1,
                                                     ridge=0.05),
    }
    torch._dynamo.reset()
    compiled = torch.compile(calls[form], backend="eager", dynamic=True)
    for size in (8, 12):
        x = torch.randn(2, 4, size, size, dtype=torch.float64)
        w = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
        b = torch.randn(6, dtype=torch.float64, requires_grad=True)
        y = compiled(x, w, b)
        grad_out = torch.randn_like(y)
        y.backward(grad_out)
        padding = {"int": (size // 4,) * 2, "pair": (size // 4, 1)}.get(form, (1, 1))
        if form == "conv1d":
            want_w, want_b = conv_nd_reference.matched_conv(
                x[:, :, 0], w[..., 0], b, grad_out, (1,), (size // 4,), (1,), 1, 0.05)
            torch.testing.assert_close(w.grad[..., 0], want_w)
        else:
            stride = (2, 2) if form == "dynamic weight" else (1, 1)
            want_w, want_b = matched_reference.matched_conv2d(x, w, b, grad_out, stride,
                                                              padding, (1, 1), 1, 0.05)
            torch.testing.assert_close(w.grad, want_w)
        torch.testing.assert_close(b.grad, want_b)


def test_a_registered_linear_like_layer_compiles_with_fullgraph(monkeypatch):
    """README's Dense (its own forward run inside the matched Function): fullgraph=True traces
    it (a callable() check broke Dynamo there) and gives eager's gradients."""
    from consequential_ext import registry
    monkeypatch.setattr(registry, "_KINDS", dict(registry._KINDS))

    class Dense(nn.Module):
        def __init__(self, n_in, n_out):
            super().__init__()
            self.kernel = nn.Parameter(torch.randn(n_in, n_out) / n_in ** 0.5)
            self.offset = nn.Parameter(torch.zeros(n_out))

        def forward(self, x):
            return x @ self.kernel + self.offset

    cx.register_layer(Dense, transposed=True, weight="kernel", bias="offset")
    torch._dynamo.reset()
    torch.manual_seed(6)
    model = cx.consequentialize(nn.Sequential(Dense(5, 8), nn.Tanh(), Dense(8, 3)))
    x, t = torch.randn(9, 5), torch.randn(9, 3)
    eager = _grads(model, x, t)
    compiled = _grads(torch.compile(model, backend="aot_eager", fullgraph=True), x, t)
    errors = [rel_err(c, e) for c, e in zip(compiled, eager, strict=True)]
    assert max(errors) < 1e-6, errors
    # its input by keyword, too (the name is read when the C-class is made, not traced)
    by_name = torch.compile(lambda inp: model[2](x=model[1](model[0](x=inp))),
                            backend="aot_eager", fullgraph=True)
    assert torch.equal(by_name(x), model(x))
    # cx.functional.clinear_like handed ``super().forward``, as a user's subclass calls it:
    # Dynamo traces no callable() of that.
    class MatchedDense(Dense):
        def forward(self, x):
            return cx.functional.clinear_like(x, self.kernel, self.offset, super().forward,
                                              transposed=True, ridge=1e-3)

    layer = MatchedDense(5, 3)

    def step(inp):
        return layer(inp).square().sum()
    torch.compile(step, backend="aot_eager", fullgraph=True)(x).backward()
    compiled_grad = layer.kernel.grad.clone()
    layer.kernel.grad = None
    step(x).backward()
    assert rel_err(compiled_grad, layer.kernel.grad) < 1e-6


def test_an_amortised_model_compiles_without_fullgraph_quietly():
    """README: without fullgraph the amortiser runs eagerly — same gradients and schedule as
    an eager copy, and no Dynamo warning (reading the step count traced logged torch's long
    '.item()' graph-break warning once per compile)."""
    import copy
    import logging
    torch._dynamo.reset()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("torch._dynamo")
    logger.addHandler(handler)
    try:
        torch.manual_seed(1)
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(100, 3))
        cx.amortize(cx.consequentialize(model), every=2)
        eager = copy.deepcopy(model)
        compiled = torch.compile(model, backend="aot_eager")
        for _ in range(3):
            x = torch.randn(8, 2, 5, 5)
            compiled(x).square().mean().backward()
            eager(x).square().mean().backward()
    finally:
        logger.removeHandler(handler)
    for p, q in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0)
    assert int(model[0].amortizer.steps) == int(eager[0].amortizer.steps) == 3
    assert not [r.getMessage()[:200] for r in records if r.levelno >= logging.WARNING]
