"""Which backend runs: the compiled CPU kernels for every memory format and stride pattern
of the input, never a silent fall-back to the pure-PyTorch reference (docs/design.md §4,
step 6). A fall-back gives the right numbers, so only a test that asks which op ran sees it.
"""
import pytest
import torch

import consequential_ext as cx
from consequential_ext.ops import reference
from rule_reference import close, pair, unfold_gram

pytestmark = pytest.mark.skipif("cpu" not in cx.ops.available_backends("im2col_gram", "cpu"),
                                reason="compiled CPU kernels not built")


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced_channels":
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    if layout == "strided_spatial":
        wide = torch.zeros(*x.shape[:2], 2 * x.shape[2], x.shape[3] + 3, dtype=x.dtype)
        wide[:, :, ::2, 1:x.shape[3] + 1] = x
        return wide[:, :, ::2, 1:x.shape[3] + 1]
    if layout == "transposed_hw":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    return x


LAYOUTS = ["contiguous", "channels_last", "sliced_channels", "strided_spatial", "transposed_hw"]


@pytest.fixture
def reference_calls(monkeypatch):
    """Names of the reference ops called while the test runs."""
    calls = []
    for name in ("im2col_gram", "conv_gram_grad", "ridge_solve"):
        original = getattr(reference, name)

        def record(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)
        monkeypatch.setattr(reference, name, record)
    return calls


def _compiled_ops_run(fn):
    with torch.profiler.profile() as prof:
        result = fn()
    names = {e.name for e in prof.events()}
    return result, {n.split("::")[1] for n in names if n.startswith("consequential_ext::")}


@pytest.mark.parametrize("stride", [1, (2, 1)])            # shift form / tiled form
@pytest.mark.parametrize("layout", LAYOUTS)
def test_im2col_gram_runs_the_cpu_kernel_for_every_layout(layout, stride, reference_calls):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 6)
    xl = _layout(x, layout)
    assert torch.equal(xl, x)
    gram, ran = _compiled_ops_run(lambda: cx.ops.im2col_gram(xl, (3, 2), stride, (1, 0),
                                                             bias=True))
    assert "im2col_gram" in ran and reference_calls == []
    close(gram, unfold_gram(x, (3, 2), pair(stride), (1, 0), (1, 1), 1, True)[0], 1e-5, layout)


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_ridge_solve_runs_the_cpu_kernel_for_every_layout(layout, reference_calls):
    torch.manual_seed(1)
    a = torch.randn(3, 9, 6)
    gram = a @ a.transpose(1, 2)
    grad = torch.randn(3, 4, 9)
    if layout == "transposed":
        grad = grad.transpose(1, 2).contiguous().transpose(1, 2)
        gram = gram.transpose(1, 2)
    elif layout == "sliced":
        grad = torch.randn(3, 8, 9)[:, ::2]
    out, ran = _compiled_ops_run(lambda: cx.ops.ridge_solve(gram, grad, 0.1))
    assert "ridge_solve" in ran and reference_calls == []
    eye = torch.eye(9, dtype=torch.float64)
    expected = torch.linalg.solve(gram.double() + 0.1 * eye, grad.double().transpose(1, 2))
    close(out, expected.transpose(1, 2), 1e-4, layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cconv2d_backward_runs_the_cpu_kernels_for_every_layout(layout, reference_calls):
    """P = 2·7·6 patches ≫ D = 28: the row side, i.e. the Gram (with G: no input gradient
    here) then ridge_solve."""
    torch.manual_seed(2)
    conv = cx.CConv2d(3, 4, 3, padding=1, ridge=0.05)
    x = _layout(torch.randn(2, 3, 7, 6), layout)
    go = torch.randn(2, 4, 7, 6)
    _, ran = _compiled_ops_run(lambda: conv(x).backward(go))
    assert {"_conv_gram_grad", "ridge_solve"} <= ran and reference_calls == []
    by_kernel = conv.weight.grad.clone()
    conv.weight.grad = None
    with cx.ops.use_backend("reference"):
        conv(x.contiguous()).backward(go)
    close(by_kernel, conv.weight.grad.double(), 1e-5, layout)


@pytest.mark.parametrize("dtype,tf32,forced,want", [
    (torch.bfloat16, False, None, "triton"), (torch.float16, False, None, "triton"),
    (torch.float32, False, None, "cuda"), (torch.float32, True, None, "triton"),
    (torch.float64, True, None, "cuda"), (torch.bfloat16, False, "cuda", "cuda")])
def test_gpu_gram_goes_to_triton_where_its_tensor_cores_keep_the_precision(
        monkeypatch, dtype, tf32, forced, want):
    """What an H200 measured (ops/_backends.py): a stand-in CUDA tensor, since CI has no GPU."""
    from types import SimpleNamespace
    from consequential_ext.ops import _backends
    monkeypatch.setattr(_backends, "available_backends",
                        lambda op, device: ["cuda", "triton", "reference"])
    x = SimpleNamespace(device=torch.device("cuda"), dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32   # a module property: no monkeypatch
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        assert _backends.gram_backend_for(x, forced) == want
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    monkeypatch.setattr(_backends, "available_backends", lambda op, device: ["cuda", "reference"])
    assert _backends.gram_backend_for(x, forced) == "cuda"      # no Triton installed
    cpu = SimpleNamespace(device=torch.device("cpu"), dtype=dtype)
    monkeypatch.setattr(_backends, "available_backends", lambda op, device: ["cpu", "reference"])
    assert _backends.gram_backend_for(cpu, None) == "cpu"
