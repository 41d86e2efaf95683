"""CPU ridge_solve on its lane path (at least 8 systems of D ≤ 96: depthwise and grouped
layers' hundreds of tiny systems, one per SIMD lane) against float64 torch.linalg.solve."""
import warnings

import pytest
import torch

import consequential_ext as cx
from consequential_ext.ops import reference

from test_cpu_kernels import _ref_solve, _spd_batch, solve_op

pytestmark = pytest.mark.skipif("cpu" not in cx.ops.available_backends("ridge_solve", "cpu"),
                                reason="consequential_ext._C was built without CPU kernels")


@pytest.mark.parametrize("batch,d,m", [((8,), 1, 1), ((40,), 50, 1), ((3, 7), 10, 3),
                                       ((17,), 96, 2), ((321,), 26, 1)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_lane_solve_matches_linalg_solve(batch, d, m, dtype, tol):
    torch.manual_seed(d * 31 + m)
    gram, grad = _spd_batch(batch, d, m, dtype)
    out = solve_op(gram, grad, 1e-2, None)
    assert out.dtype == dtype and out.shape == grad.shape
    ref = _ref_solve(gram, grad, 1e-2)
    rel = (out.double() - ref).norm(dim=(-2, -1)) / ref.norm(dim=(-2, -1))
    assert rel.max() <= tol, f"worst relative error {rel.max():.3g}"


def test_lane_solve_non_contiguous_and_out_dtype():
    torch.manual_seed(1)
    gram, grad = _spd_batch((20,), 9, 4, torch.float32)
    gram_t, grad_t = gram.transpose(-1, -2), grad[:, ::2]     # views; gram is symmetric
    assert not grad_t.is_contiguous()
    out = solve_op(gram_t, grad_t, 1e-3, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    ref = _ref_solve(gram, grad[:, ::2], 1e-3)
    assert ((out.double() - ref).abs() <= 2 ** -7 * ref.abs() + 1e-5).all()


def test_lane_solve_escalates_each_system_like_reference(monkeypatch):
    monkeypatch.setattr(reference, "_escalation_warned", False)
    torch.ops.consequential_ext.take_ridge_escalations()
    gram, grad = _spd_batch((24,), 12, 2)
    gram[19] -= 0.5 * torch.eye(12, dtype=torch.float64) * gram[19].diagonal().max()
    raw = solve_op(gram, grad, 1e-3, None)
    requested, escalated = torch.ops.consequential_ext.take_ridge_escalations()
    assert requested == 1e-3 and escalated > 1e-3
    with warnings.catch_warnings():   # the kernel: every lane at the escalated ridge
        warnings.simplefilter("ignore")
        assert torch.allclose(raw, reference.ridge_solve(gram, grad, escalated), rtol=1e-9,
                              atol=1e-12)
    # ops.ridge_solve: the escalation is system 19's alone, as in the reference
    with cx.ops.use_backend("cpu"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = cx.ops.ridge_solve(gram, grad, 1e-3)
        ref = reference.ridge_solve(gram, grad, 1e-3)
    assert torch.allclose(out, ref, rtol=1e-9, atol=1e-12)
    assert torch.allclose(out[:19], _ref_solve(gram[:19], grad[:19], 1e-3), rtol=1e-9,
                          atol=1e-12)


def test_lane_solve_non_finite_gives_nan():
    gram, grad = _spd_batch((16,), 5, 3, torch.float32)
    gram[3, 1, 1] = float("nan")
    assert solve_op(gram, grad, 1e-3, None).isnan().all()
