"""The public ops: reference semantics, argument checks, and backend agreement."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import consequential_ext as cx
from consequential_ext.ops import reference


def _spd(batch, d, dtype=torch.float64):
    a = torch.randn(*batch, d, d + 3, dtype=dtype)
    return a @ a.transpose(-1, -2) / d


@pytest.mark.parametrize("case", [
    ((2, 3, 7, 6), 3, 1, 1, 1, 1, True),
    ((3, 4, 9, 8), (3, 2), (2, 1), (1, 0), 1, 2, False),
    ((1, 6, 8, 9), 3, 1, 2, 2, 3, True),
])
def test_im2col_gram_matches_explicit_unfold(case):
    shape, k, s, p, d, g, bias = case
    x = torch.randn(*shape, dtype=torch.float64).to(memory_format=torch.channels_last)
    gram = cx.ops.im2col_gram(x, k, s, p, d, groups=g, bias=bias)
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)            # (B, C·kh·kw, L)
    cg = shape[1] // g
    per = cols.shape[1] // g
    expected = []
    for gi in range(g):
        xg = cols[:, gi * per:(gi + 1) * per].permute(1, 0, 2).reshape(per, -1)
        if bias:
            xg = torch.cat([xg, torch.ones(1, xg.shape[1], dtype=xg.dtype)])
        expected.append(xg @ xg.T)
    expected = torch.stack(expected)
    torch.testing.assert_close(gram, expected[0] if g == 1 else expected)
    assert cg * (per // cg) == per


def test_im2col_gram_argument_errors():
    x = torch.randn(1, 4, 5, 5)
    with pytest.raises(ValueError, match="x must be a 4-D"):
        cx.ops.im2col_gram(x[0], 3)
    with pytest.raises(ValueError, match="groups"):
        cx.ops.im2col_gram(x, 3, groups=3)
    with pytest.raises(ValueError, match="does not fit"):
        cx.ops.im2col_gram(x, 7)
    with pytest.raises(TypeError, match="kernel_size"):
        cx.ops.im2col_gram(x, (3, 3, 3))


@pytest.mark.parametrize("backend", cx.ops.available_backends("ridge_solve", "cpu"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_ridge_solve_matches_linalg_solve(backend, dtype):
    gram = _spd((3,), 9)
    grad = torch.randn(3, 4, 9, dtype=torch.float64)
    expected = torch.linalg.solve(gram + 0.1 * torch.eye(9, dtype=gram.dtype),
                                  grad.transpose(1, 2)).transpose(1, 2)
    with cx.ops.use_backend(backend):
        out = cx.ops.ridge_solve(gram.to(dtype), grad.to(dtype), 0.1, out_dtype=torch.float64)
    # The only error is the input's rounding to `dtype`, amplified by the condition number.
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 1e-1}[dtype]
    assert ((out - expected).norm() / expected.norm()) < tol


# Fewer right-hand sides than D, as many and more (where the CPU solve once took an explicit
# inverse, from M = 2·D on; from M = D it now solves by 64-wide blocks, lapack_solve.cpp), one
# system (LAPACK's threads) and a batch (a system per thread), D odd and past a vector width,
# the blocks' last one full, partial or a single row.
@pytest.mark.parametrize("backend", cx.ops.available_backends("ridge_solve", "cpu"))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("batch,d,m", [((), 37, 73), ((), 37, 74), ((), 37, 113), ((3,), 21, 64),
                                       ((2,), 21, 40), ((), 131, 300), ((), 193, 576),
                                       ((), 128, 128), ((4,), 100, 130), ((), 65, 64),
                                       ((), 129, 70)])
def test_ridge_solve_many_right_hand_sides(backend, dtype, tol, batch, d, m):
    gram = _spd(batch, d)
    grad = torch.randn(*batch, m, d, dtype=torch.float64)
    expected = torch.linalg.solve(gram + 0.1 * torch.eye(d, dtype=gram.dtype),
                                  grad.transpose(-1, -2)).transpose(-1, -2)
    with cx.ops.use_backend(backend):
        out = cx.ops.ridge_solve(gram.to(dtype), grad.to(dtype), 0.1, out_dtype=torch.float64)
    assert out.shape == expected.shape
    assert ((out - expected).norm() / expected.norm()) < tol


# G = dZ Xᵀ lies along the large directions of A = X Xᵀ/N; with a near-null direction (inputs
# ×100 summing to ~0, the bias row) a float32 solve errs in weights but not in x·X, on every
# path: one system, a batch (a system per thread; SIMD lanes), few and many right-hand sides
# (an explicit inverse, which the CPU solve once took from M = 2·D on: ΔW·X 3e-2 to 9e-2 here).
@pytest.mark.parametrize("backend", cx.ops.available_backends("ridge_solve", "cpu"))
@pytest.mark.parametrize("batch,d,m", [((), 64, 32), ((), 64, 256), ((), 160, 400),
                                       ((3,), 64, 256), ((9,), 48, 200), ((2,), 129, 300)])
def test_ridge_solve_float32_error_stays_out_of_the_inputs_span(backend, batch, d, m):
    torch.manual_seed(3)
    n = 4 * d
    x = torch.randn(*batch, n, d - 1, dtype=torch.float64) * 3 + 1
    x = 100 * (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True)
    rows = torch.cat([x, torch.ones(*batch, n, 1, dtype=torch.float64)], -1)   # (…, N, D)
    gram = rows.mT @ rows / n
    grad = torch.randn(*batch, m, n, dtype=torch.float64) @ rows
    exact = torch.linalg.solve(gram + 1e-3 * torch.eye(d, dtype=torch.float64), grad.mT).mT
    with cx.ops.use_backend(backend):
        out = cx.ops.ridge_solve(gram.float(), grad.float(), 1e-3).double()
    error = ((out - exact) @ rows.mT).norm() / (exact @ rows.mT).norm()
    assert error < 1e-4


# One system past batch·D³ = 3·10⁷ (every thread, csrc/cpu/ridge_solve_cpu.cpp) with no, one,
# a few and many right-hand sides; and from D = 128 on, where the CPU solve goes by 32-wide
# blocks in 128-row panels (csrc/cpu/blocked_cholesky.cpp): D at the threshold (one panel), a
# last panel of one row (257), of a block and a row (161), a last block of one row, of 30, four
# panels (449), right-hand sides none, one and more than a 256-wide work item, batches, whose
# systems each go by blocks on one thread — on 1, 2 and 3 threads (the work split into shares
# of equal weight).
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("batch,d,m", [((), 331, 0), ((), 331, 1), ((), 331, 700),
                                       ((), 449, 17), ((), 449, 530), ((), 128, 5),
                                       ((), 161, 0), ((), 161, 300), ((), 190, 1),
                                       ((3,), 150, 40), ((2,), 257, 96)])
def test_ridge_solve_by_blocks(threads, dtype, tol, batch, d, m):
    gram = _spd(batch, d)
    grad = torch.randn(*batch, m, d, dtype=torch.float64)
    # one system at a time: torch's batched float64 solve (MKL's getrf inside ATen's parallel
    # loop) can hang once torch.set_num_threads has changed the count in this process
    eye = 0.1 * torch.eye(d, dtype=gram.dtype)
    systems = gram.reshape(-1, d, d)
    expected = torch.stack([torch.linalg.solve(a + eye, g.mT).mT
                            for a, g in zip(systems, grad.reshape(len(systems), m, d))])
    expected = expected.reshape(grad.shape)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cx.ops.ridge_solve(gram.to(dtype), grad.to(dtype), 0.1, out_dtype=torch.float64)
    finally:
        torch.set_num_threads(saved)
    assert out.shape == expected.shape
    if m:
        assert ((out - expected).norm() / expected.norm()) < tol


# Not positive definite only far down the diagonal (the factorisation fails late, on
# several threads): the ridge escalates as the reference's does.
@pytest.mark.parametrize("threads", [2, 3])
def test_ridge_solve_one_large_system_escalates_like_the_reference(threads, monkeypatch):
    d = 331
    gram = torch.eye(d, dtype=torch.float64)
    gram[300, 300] = -0.5
    grad = torch.randn(5, d, dtype=torch.float64)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        monkeypatch.setattr(reference, "_escalation_warned", False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = cx.ops.ridge_solve(gram, grad, 1e-3)
    finally:
        torch.set_num_threads(saved)
    with cx.ops.use_backend("reference"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = cx.ops.ridge_solve(gram, grad, 1e-3)
    assert any("escalated" in str(w.message) for w in caught)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", cx.ops.available_backends("ridge_solve", "cpu"))
@pytest.mark.parametrize("m", [3, 13])
def test_ridge_solve_escalates_once_with_warning_on_singular_input(backend, m, monkeypatch):
    monkeypatch.setattr(reference, "_escalation_warned", False)
    v = torch.randn(6, 2)
    gram = v @ v.T - 1e-3 * torch.eye(6)            # indefinite: Cholesky fails at tiny ridge
    grad = torch.randn(m, 6)
    with cx.ops.use_backend(backend), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = cx.ops.ridge_solve(gram, grad, 1e-8)
    assert torch.isfinite(out).all()
    assert any("escalated" in str(w.message) for w in caught)


@pytest.mark.parametrize("backend", cx.ops.available_backends("ridge_solve", "cpu"))
@pytest.mark.parametrize("batch,d,m", [((), 10, 3), ((9,), 10, 3), ((), 130, 4), ((2,), 12, 40)])
def test_ridge_solve_reads_the_lower_triangle_on_every_path(backend, batch, d, m):
    # One system, a batch of small ones (SIMD lanes), a large one, many right-hand sides: a
    # Gram whose upper triangle is not its mirror gets the answer of its lower triangle
    # everywhere, as torch.linalg.cholesky reads it.
    lower = _spd(batch, d)
    asymmetric = lower.tril() + (lower + torch.rand_like(lower)).triu(1)
    symmetric = lower.tril() + lower.tril(-1).mT
    grad = torch.randn(*batch, m, d, dtype=torch.float64)
    expected = torch.linalg.solve(symmetric + 0.01 * torch.eye(d, dtype=torch.float64),
                                  grad.mT).mT
    with cx.ops.use_backend(backend):
        out = cx.ops.ridge_solve(asymmetric, grad, 0.01)
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("backend", cx.ops.available_backends("ridge_solve", "cpu"))
def test_a_nan_solve_warns_after_an_earlier_rescued_one(backend, monkeypatch):
    # An escalation warning earlier in the run must not silence a later NaN gradient.
    monkeypatch.setattr(reference, "_escalation_warned", True)
    gram = -1e12 * torch.eye(5, dtype=torch.float64)    # beyond 12 escalations of 1e-3
    for _ in range(2):
        with cx.ops.use_backend(backend), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = cx.ops.ridge_solve(gram, torch.randn(3, 5, dtype=torch.float64), 1e-3)
        assert torch.isnan(out).all()
        assert [w.category for w in caught if "gradient is NaN" in str(w.message)] == \
            [RuntimeWarning]


@pytest.mark.parametrize("backend", cx.ops.available_backends("ridge_solve", "cpu"))
def test_ridge_solve_non_finite_gives_nan(backend):
    gram = _spd((), 4, torch.float32)
    gram[1, 2] = float("inf")
    with cx.ops.use_backend(backend):
        out = cx.ops.ridge_solve(gram, torch.randn(2, 4), 0.1)
    assert out.shape == (2, 4) and torch.isnan(out).all()


def test_ridge_solve_argument_errors():
    gram = _spd((), 4)
    for bad in (0.0, -1.0, float("nan"), "x", 1e39):      # 1e39: inf in a float32 solve
        with pytest.raises(ValueError, match="ridge"):
            cx.ops.ridge_solve(gram, torch.randn(2, 4, dtype=torch.float64), bad)
    with pytest.raises(ValueError, match="grad"):
        cx.ops.ridge_solve(gram, torch.randn(2, 5, dtype=torch.float64), 0.1)
    with pytest.raises(ValueError, match="gram"):
        cx.ops.ridge_solve(torch.randn(3, 4), torch.randn(2, 4), 0.1)
    with pytest.raises(ValueError, match="gram on cpu but grad on meta"):
        cx.ops.ridge_solve(gram, torch.randn(2, 4, dtype=torch.float64, device="meta"), 0.1)
    with pytest.raises(RuntimeError, match="ridge_solve: grad must be on gram's device"):
        torch.ops.consequential_ext.ridge_solve(gram, torch.randn(2, 4, device="meta"), 0.1)
    for name, args in (("out_dtype", (gram, torch.randn(2, 4), 0.1, torch.int32)),
                       ("gram", (gram.long(), torch.randn(2, 4), 0.1, None)),
                       ("grad", (gram, torch.ones(2, 4, dtype=torch.int64), 0.1, None)),
                       ("gram", (gram.to(torch.float8_e4m3fn), torch.randn(2, 4), 0.1, None)),
                       ("grad", (gram, torch.randn(2, 4).to(torch.float8_e5m2), 0.1, None))):
        with pytest.raises(ValueError, match=f"ridge_solve: {name} must be a floating dtype"):
            cx.ops.ridge_solve(*args[:3], out_dtype=args[3])
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        cx.ops.im2col_gram(torch.randn(1, 2, 5, 5), 3, stride=2 ** 64)
    with pytest.raises(TypeError, match="padding must be an int or a pair of ints"):
        cx.ops.conv_gram_grad(torch.randn(1, 2, 5, 5), torch.randn(1, 3, 3, 3), 3,
                              padding=(0, -2 ** 63 - 1))
    meta = cx.ops.ridge_solve(gram.to("meta"), torch.randn(3, 2, 4).to("meta")[0], 0.1,
                              out_dtype=torch.bfloat16)
    assert meta.device.type == "meta" and meta.shape == (2, 4) and meta.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="backend"):
        with cx.ops.use_backend("gpu"):
            pass


def test_extension_built_for_running_torch():
    assert torch.ops.consequential_ext.built_with_torch() == torch.__version__


@pytest.mark.parametrize("backend", cx.ops.available_backends("ridge_solve", "cpu"))
def test_ridge_solve_gives_nan_not_exception_when_no_ridge_helps(backend, monkeypatch):
    # A finite but absurd system (a diverging run): even ridge·10¹¹ cannot make it definite.
    monkeypatch.setattr(reference, "_escalation_warned", False)
    gram = -1e30 * torch.eye(5)
    with cx.ops.use_backend(backend), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = cx.ops.ridge_solve(gram, torch.randn(2, 5), 1e-3)
    assert out.shape == (2, 5) and torch.isnan(out).all()
    assert any("gradient is NaN" in str(w.message) for w in caught)


def test_diverged_layer_backward_gives_nan_grads_without_exception():
    layer = cx.CLinear(4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer(torch.full((3, 4), 3e18)).sum().backward()   # Gram entries overflow float32
    assert not torch.isfinite(layer.weight.grad).all()


def test_use_backend_reaches_other_threads_and_is_restored(monkeypatch):
    """CUDA backward runs on autograd's device threads: a backend chosen around
    ``loss.backward()`` must hold there too, and end with its block."""
    import threading
    used, real = [], reference.ridge_solve
    monkeypatch.setattr(reference, "ridge_solve", lambda *a: used.append(1) or real(*a))
    gram, grad = 2 * torch.eye(5, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    results = []

    def solve_in_a_thread():
        thread = threading.Thread(target=lambda: results.append(cx.ops.ridge_solve(gram, grad, 0.5)))
        thread.start()
        thread.join()
    with cx.ops.use_backend("reference"):
        solve_in_a_thread()
    assert used == [1]
    solve_in_a_thread()
    assert used == [1] and len(results) == 2     # the compiled CPU kernel after the block
    for out in results:
        torch.testing.assert_close(out, grad / 2.5, rtol=1e-12, atol=0)


def test_compiled_ops_messages_keep_their_numbers():
    """One libstdc++ in the process (setup.py): with a second, static copy inside _C, a
    check's message was cut at its first number (and crashed the GPU machine's process). In
    a subprocess, so that a crash fails this test instead of ending the run."""
    import subprocess
    import sys
    from pathlib import Path
    code = ("import torch, consequential_ext\n"
            "try:\n"
            "    torch.ops.consequential_ext.im2col_gram(torch.randn(1, 3, 5, 5), [3, 3], [1, 1],"
            " [0, 0], [1, 1], 2, False)\n"
            "except RuntimeError as exc:\n"
            "    print(str(exc).splitlines()[0])\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "groups must be a positive divisor of C=3, got 2" in run.stdout, run.stdout


@pytest.mark.parametrize("forced", [None, "cpu"])
def test_ops_are_differentiable_where_autograd_records(forced):
    """The compiled kernels have no derivative: where an input requires grad under grad mode
    the ops run the reference, so gradcheck (float64, finite differences) holds on every
    backend choice — never a silently cut or wrong gradient."""
    if forced == "cpu" and "cpu" not in cx.ops.available_backends("ridge_solve", "cpu"):
        pytest.skip("no compiled CPU kernels in this build")
    torch.manual_seed(10)
    a = torch.randn(5, 9, dtype=torch.float64)
    gram = (a @ a.T).requires_grad_()
    grad = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    conv = ((3, 3), (1, 2), (0, 1), (1, 1))
    with cx.ops.use_backend(forced):
        # Symmetrised: a Cholesky reads one triangle, autograd's derivative is symmetric.
        assert torch.autograd.gradcheck(
            lambda g, r: cx.ops.ridge_solve((g + g.T).expand(2, 5, 5) / 2, r, 0.3), (gram, grad))
        assert torch.autograd.gradcheck(
            lambda t: cx.ops.im2col_gram(t, *conv, bias=True), (x,))
        assert torch.autograd.gradcheck(
            lambda t, d: cx.ops.conv_gram_grad(t, d, *conv, groups=1, bias=True), (x, gy))
        with torch.no_grad():                           # nothing recorded: the kernels run
            out = cx.ops.ridge_solve(gram, grad[0], 0.3)
    torch.testing.assert_close(out, reference.ridge_solve(gram.detach(), grad[0].detach(), 0.3))


def _indefinite(groups, d, negative, gen):
    """Systems (groups, d, d) with eigenvalues in [1, 2) but the first, ``negative[i]``: the
    ridge 1e-3 escalates to the first power of ten above -negative[i] (NaN from -1e30)."""
    q, _ = torch.linalg.qr(torch.randn(groups, d, d, dtype=torch.float64, generator=gen))
    eig = torch.rand(groups, d, dtype=torch.float64, generator=gen) + 1
    eig[:, 0] = torch.as_tensor(negative, dtype=torch.float64)
    return (q * eig[:, None]) @ q.transpose(1, 2)


def test_an_escalated_batch_is_solved_again_at_once_not_one_call_per_system(monkeypatch):
    # A depthwise conv's hundreds of groups escalating: the batch's compiled solve escalates
    # them all at once, and each system's own ridge came from one compiled call per system
    # (35 ms for 2048 groups of D = 10, against 0.8 ms for the batch): now from the
    # reference's batched per-system escalation, the float64 per-system solve all the same.
    if "cpu" not in cx.ops.available_backends("ridge_solve", "cpu"):
        pytest.skip("no compiled CPU solve")
    gen = torch.Generator().manual_seed(3)
    groups, d = 256, 6
    negative = torch.where(torch.arange(groups) % 3 == 0, -0.5, -0.05)  # λ = 1 and λ = 0.1
    gram = _indefinite(groups, d, negative, gen)
    grad = torch.randn(groups, 2, d, dtype=torch.float64, generator=gen)
    calls = []
    real = torch.ops.consequential_ext.ridge_solve
    monkeypatch.setattr(torch.ops.consequential_ext, "ridge_solve",
                        lambda *args: calls.append(1) or real(*args))
    monkeypatch.setattr(reference, "_escalation_warned", False)
    with cx.ops.use_backend("cpu"), pytest.warns(RuntimeWarning, match="escalated from 0.001 to 1"):
        out = cx.ops.ridge_solve(gram, grad, 1e-3)
    assert len(calls) == 1
    lam = torch.where(negative == -0.5, 1.0, 0.1).to(torch.float64)
    lam[lam != 1.0] = 0.1                                        # not float32's 0.1
    expected = torch.linalg.solve(gram + lam[:, None, None] * torch.eye(d, dtype=torch.float64),
                                  grad.mT).mT
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", cx.ops.available_backends("ridge_solve", "cpu"))
def test_a_system_no_ridge_rescues_is_nan_alone_on_every_backend(backend, monkeypatch):
    # The compiled and Triton solves NaN only that system (a group of a conv, apart from the
    # others); the reference NaN-ed the whole batch. The rescued and healthy ones are solved
    # at their own ridge, as the float64 solve of each alone, and the rescued one's ridge is
    # named beside the NaN (it went unsaid where another system stayed NaN).
    gen = torch.Generator().manual_seed(4)
    gram = _indefinite(4, 5, [1.0, -1e30, -0.5, 1.5], gen)
    grad = torch.randn(4, 3, 5, dtype=torch.float64, generator=gen)
    monkeypatch.setattr(reference, "_escalation_warned", False)
    with cx.ops.use_backend(backend), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = cx.ops.ridge_solve(gram, grad, 1e-3)
    assert any("gradient is NaN" in str(w.message) for w in caught)
    assert any("escalated from 0.001 to 1." in str(w.message) for w in caught)
    assert out[1].isnan().all() and not out[[0, 2, 3]].isnan().any()
    lam = torch.tensor([1e-3, 0.0, 1.0, 1e-3], dtype=torch.float64)
    expected = torch.linalg.solve(gram + lam[:, None, None] * torch.eye(5, dtype=torch.float64),
                                  grad.mT).mT
    torch.testing.assert_close(out[[0, 2, 3]], expected[[0, 2, 3]], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", cx.ops.available_backends("ridge_solve", "cpu"))
def test_an_escalated_batch_without_right_hand_sides_is_empty(backend):
    # grad (..., 0, D): the per-system re-solve reshaped it with -1 (ambiguous: an exception).
    with cx.ops.use_backend(backend), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = cx.ops.ridge_solve(-torch.eye(3).repeat(2, 1, 1), torch.randn(2, 0, 3), 1e-3)
    assert out.shape == (2, 0, 3)


def test_an_escalated_solve_is_differentiable_where_autograd_records():
    # Where an input requires grad the reference runs so that autograd differentiates it; its
    # per-system escalation wrote the re-factored systems into cholesky_ex's saved factor and
    # NaN-ed cholesky_solve's saved result in place: backward raised. The gradient is that of
    # each system's solve at its own escalated ridge (float64 linalg.solve per system).
    gen = torch.Generator().manual_seed(12)
    base = _indefinite(3, 4, [1.0, -0.5, 2.0], gen)
    gram = base.clone().requires_grad_()
    grad = torch.randn(3, 2, 4, dtype=torch.float64, generator=gen, requires_grad=True)
    weights = torch.randn(3, 2, 4, dtype=torch.float64, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (cx.ops.ridge_solve(gram, grad, 1e-3) * weights).sum().backward()
    lam = torch.tensor([1e-3, 1.0, 1e-3], dtype=torch.float64)
    gram_ref, grad_ref = base.clone().requires_grad_(), grad.detach().clone().requires_grad_()
    solved = torch.linalg.solve(gram_ref + lam[:, None, None] * torch.eye(4, dtype=torch.float64),
                                grad_ref.mT).mT
    (solved * weights).sum().backward()
    torch.testing.assert_close(grad.grad, grad_ref.grad, rtol=1e-10, atol=1e-12)
    sym = lambda t: (t + t.mT) / 2   # a Cholesky reads one triangle
    torch.testing.assert_close(sym(gram.grad), sym(gram_ref.grad), rtol=1e-8, atol=1e-10)
    # one system no ridge rescues: NaN alone, and backward still runs for the others
    gram = torch.diag_embed(torch.tensor([[1.0, 2.0], [-1e30, 1.0]],
                                         dtype=torch.float64)).requires_grad_()
    grad = torch.randn(2, 1, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = cx.ops.ridge_solve(gram, grad, 1e-3)
    assert out[1].isnan().all() and not out[0].isnan().any()
    out[0].sum().backward()
    torch.testing.assert_close(grad.grad[0], 1 / torch.tensor([[1.001, 2.001]],
                                                              dtype=torch.float64))
