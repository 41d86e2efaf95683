"""LARS and LSALR (paper 2, §4.1) against a hand-written float64 loop of their formulas."""
import math

import pytest
import torch

from consequential_ext.optim import LARS, LSALR


def _lars_rate(lr, w, d):
    wn, dn = float(w.norm()), float(d.norm())
    return lr * wn / dn if wn > 0 and dn > 0 else lr


def _lsalr_rate(lr, w, d):
    dn = float(d.norm())
    return lr * (1 + math.log(1 + 1 / dn)) if dn > 0 else lr


def _reference(params, grads_per_step, rate, lr, momentum, nesterov, weight_decay):
    """v ← µ v + rate·δW; W ← W − v (Nesterov: W − (rate·δW + µ v)); δW = g + wd·W."""
    params = [p.clone() for p in params]
    bufs = [None] * len(params)
    for grads in grads_per_step:
        for i, (w, g) in enumerate(zip(params, grads)):
            d = g + weight_decay * w
            u = rate(lr, w, d) * d
            if momentum:
                bufs[i] = u.clone() if bufs[i] is None else momentum * bufs[i] + u
                u = u + momentum * bufs[i] if nesterov else bufs[i]
            params[i] = w - u
    return params


@pytest.mark.parametrize("cls,rate", [(LARS, _lars_rate), (LSALR, _lsalr_rate)])
@pytest.mark.parametrize("momentum,nesterov,weight_decay", [(0.0, False, 0.0), (0.9, False, 5e-4),
                                                            (0.9, True, 1e-2)])
def test_steps_follow_the_formula(cls, rate, momentum, nesterov, weight_decay):
    torch.manual_seed(0)
    start = [torch.randn(5, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.float64),
             torch.randn(2, 3, 3, dtype=torch.float64) * 7]
    steps = [[torch.randn_like(p) * s for p, s in zip(start, (0.01, 1.0, 30.0))]
             for _ in range(3)]
    params = [p.clone().requires_grad_() for p in start]
    lr = 0.3
    opt = cls(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    expected = _reference(start, steps, rate, lr, momentum, nesterov, weight_decay)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)


def test_zero_gradient_and_missing_gradient_leave_parameters():
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, dtype=torch.float64, requires_grad=True)
    for cls in (LARS, LSALR):
        before = (w.detach().clone(), v.detach().clone())
        w.grad = torch.zeros_like(w)
        cls([w, v], lr=1.0).step()
        assert torch.equal(w.detach(), before[0]) and torch.equal(v.detach(), before[1])


@pytest.mark.parametrize("kwargs,name", [(dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"),
                                         (dict(lr=0.1, momentum=-0.5), "momentum"),
                                         (dict(lr=0.1, weight_decay=-1), "weight_decay"),
                                         (dict(lr=0.1, nesterov=True), "nesterov")])
def test_bad_arguments_are_named(kwargs, name):
    for cls in (LARS, LSALR):
        with pytest.raises(ValueError, match=name):
            cls([torch.zeros(2, requires_grad=True)], **kwargs)
