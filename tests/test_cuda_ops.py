"""The CUDA backend (csrc/cuda) on a real GPU, against the float64 reference.

Skipped where torch sees no CUDA device (decided at collection; nothing touches a GPU at
import). bench/gpu_suite.py runs these with ``pytest -m cuda tests/test_cuda_ops.py``.
"""
import warnings

import pytest
import torch

import consequential_ext as cx
from consequential_ext.ops import reference

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GRAM_CASES = [
    # (B, C, H, W), kernel, stride, padding, dilation, groups, bias, layout
    ((2, 3, 7, 6), 3, 1, 1, 1, 1, True, "channels_last"),
    ((3, 4, 9, 8), (3, 2), (2, 1), (1, 0), 1, 2, False, "contiguous"),
    ((1, 6, 8, 9), 3, 1, 2, 2, 3, True, "contiguous"),
    ((2, 9, 6, 7), 3, 1, 1, 1, 1, False, "transposed_hw"),
    ((2, 5, 11, 10), (2, 3), 1, (0, 2), (2, 1), 1, True, "sliced_channels"),
    ((5, 70, 3, 4), 1, 1, 0, 1, 1, True, "channels_last"),
    ((7, 33, 13, 11), 3, 1, 1, 1, 1, True, "channels_last"),     # D = 298: several tiles
    ((4, 24, 15, 15), 5, 2, 2, 1, 4, True, "contiguous"),        # 5×5: tiled only
]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "transposed_hw":
        return x.transpose(2, 3).contiguous().transpose(2, 3)
    if layout == "sliced_channels":
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype, device=x.device)
        wide[:, ::2] = x
        return wide[:, ::2]
    return x


def test_cuda_backend_is_built():
    for op in ("im2col_gram", "ridge_solve"):
        assert "cuda" in cx.ops.available_backends(op, "cuda"), f"{op}: no CUDA kernel registered"


@pytest.mark.parametrize("case", GRAM_CASES)
@pytest.mark.parametrize("algorithm", ["auto", "tiled", "shift"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_gram_matches_reference(case, algorithm, dtype, monkeypatch):
    monkeypatch.setenv("CX_CUDA_GRAM_ALGORITHM", algorithm)   # "shift" falls back when strided
    shape, k, s, p, d, g, bias, layout = case
    x = _layout(torch.randn(*shape, device="cuda").to(dtype), layout)
    with cx.ops.use_backend("cuda"):
        got = cx.ops.im2col_gram(x, k, s, p, d, groups=g, bias=bias)
    want = reference.im2col_gram(x.double(), _pair(k), _pair(s), _pair(p), _pair(d), g, bias)
    want = want[0] if g == 1 else want
    assert got.dtype == reference.accumulate_dtype(dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err < tol, f"relative error {err:.3g}"
    assert torch.equal(got, got.transpose(-1, -2))


def test_gram_empty_batch_is_zero():
    x = torch.randn(0, 3, 5, 5, device="cuda")
    with cx.ops.use_backend("cuda"):
        got = cx.ops.im2col_gram(x, 3, bias=True)
    assert got.shape == (28, 28) and not got.any()


def _spd(batch, d, dtype=torch.float64):
    a = torch.randn(*batch, d, d + 3, dtype=torch.float64, device="cuda")
    return (a @ a.transpose(-1, -2) / d).to(dtype)


OUT_TOL = {torch.float64: 1e-10, torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("batch,m,d", [
    ((3,), 4, 9),          # factor in shared memory
    ((2, 2), 7, 45),       # two leading dims
    ((40,), 5, 300),       # medium D, many systems: the factor in the global workspace
    ((2,), 5, 300),        # medium D, few systems: cuSOLVER factors, our kernel solves
    ((3,), 3, 1100),       # large D, several systems: the same
    ((1,), 2, 2900),       # one system (or a factor too big to stream from L2): cuSOLVER + cuBLAS
])
@pytest.mark.parametrize("work,out_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                            (torch.float32, torch.bfloat16), (torch.float32, torch.float16)])
def test_ridge_solve_matches_reference(batch, m, d, work, out_dtype):
    gram = _spd(batch, d, work)
    grad = torch.randn(*batch, m, d, device="cuda", dtype=work)
    with cx.ops.use_backend("cuda"):
        got = cx.ops.ridge_solve(gram, grad, 0.05, out_dtype=out_dtype)
    want = reference.ridge_solve(gram.double(), grad.double(), 0.05)
    assert got.shape == grad.shape and got.dtype == out_dtype
    tol = max(OUT_TOL[work], OUT_TOL[out_dtype]) * (10 if d > 100 else 1)   # κ grows with D
    err = (got.double() - want).abs().max() / want.abs().max()
    assert err < tol, f"relative error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("d", [6, 1100])
def test_ridge_solve_escalates_once_with_warning(d, monkeypatch):
    monkeypatch.setattr(reference, "_escalation_warned", False)
    v = torch.randn(d, 2, device="cuda", dtype=torch.float64)
    gram = v @ v.T - 3e-3 * torch.eye(d, device="cuda", dtype=torch.float64)
    grad = torch.randn(3, d, device="cuda", dtype=torch.float64)
    with cx.ops.use_backend("cuda"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = cx.ops.ridge_solve(gram, grad, 1e-8)
    assert any("escalated" in str(w.message) for w in caught)
    torch.testing.assert_close(got, reference.ridge_solve(gram, grad, 1e-8), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("d", [6, 1100])
def test_ridge_solve_non_finite_gives_nan(d):
    gram = _spd((2,), d, torch.float32)
    gram[1, 2, 3] = float("inf")
    with cx.ops.use_backend("cuda"):
        got = cx.ops.ridge_solve(gram, torch.randn(2, 3, d, device="cuda"), 0.1)
    assert torch.isnan(got).all()


def test_bad_input_gives_clear_errors():
    gram = _spd((), 4, torch.float32)
    with pytest.raises(RuntimeError, match="same CUDA device"):
        torch.ops.consequential_ext.ridge_solve(gram, torch.randn(2, 4), 0.1, None)
    with pytest.raises(RuntimeError, match="x must be"):
        torch.ops.consequential_ext.im2col_gram(torch.ones(1, 2, 5, 5, device="cuda", dtype=torch.int32),
                                                [3, 3], [1, 1], [0, 0], [1, 1], 1, False)
    with pytest.raises(RuntimeError, match="groups"):
        torch.ops.consequential_ext.im2col_gram(torch.randn(1, 3, 5, 5, device="cuda"),
                                                [3, 3], [1, 1], [0, 0], [1, 1], 2, False)


def test_opcheck():
    x = torch.randn(2, 4, 7, 6, device="cuda").contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.consequential_ext.im2col_gram.default,
                          (x, [3, 3], [1, 1], [1, 1], [1, 1], 2, True))
    gram, grad = _spd((3,), 10, torch.float32), torch.randn(3, 5, 10, device="cuda")
    torch.library.opcheck(torch.ops.consequential_ext.ridge_solve.default, (gram, grad, 0.1, None))


def test_compiles_fullgraph():
    @torch.compile(fullgraph=True)
    def gram_of(x):
        return torch.ops.consequential_ext.im2col_gram(x * 2, [3, 3], [1, 1], [1, 1], [1, 1], 1, True)

    x = torch.randn(2, 3, 8, 8, device="cuda")
    want = reference.im2col_gram((x * 2).double(), (3, 3), (1, 1), (1, 1), (1, 1), 1, True)
    assert ((gram_of(x).double() - want).abs().max() / want.abs().max()) < 1e-5


@pytest.mark.parametrize("layers, bidirectional", [(1, False), (3, True)])
def test_recurrent_layer_on_cudnn_matches_the_cpu_float64_layer(layers, bidirectional):
    """A CLSTM on cuDNN, one op call per layer (a layer above the first with its weights
    outside a one-layer flat buffer: cuDNN copies them, its warning silenced): nn's output,
    and the matched gradients of the CPU layer in float64 (which tests/test_recurrent.py
    checks against an independent reference)."""
    torch.manual_seed(0)
    cpu = cx.CLSTM(5, 7, num_layers=layers, bidirectional=bidirectional).double()
    gpu = cx.CLSTM(5, 7, num_layers=layers, bidirectional=bidirectional).cuda()
    gpu.load_state_dict(cpu.state_dict())
    plain = torch.nn.LSTM(5, 7, num_layers=layers, bidirectional=bidirectional).cuda()
    plain.load_state_dict(cpu.state_dict())
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    gy = torch.randn(6, 4, 7 * (2 if bidirectional else 1), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = gpu(x.float().cuda())[0]
    torch.testing.assert_close(out, plain(x.float().cuda())[0], rtol=1e-5, atol=1e-6)
    out.backward(gy.float().cuda())
    cpu(x)[0].backward(gy)
    for (name, want), got in zip(cpu.named_parameters(), gpu.parameters()):
        err = (got.grad.double().cpu() - want.grad).norm() / want.grad.norm()
        assert err < 1e-4, (name, float(err))
