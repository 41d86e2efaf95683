"""LARS and LSALR (paper 2, §4.1) against a hand-written float64 loop of their formulas."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from consequential_ext.optim import LARS, LSALR


def _lars_rate(lr, w, g, wd, trust):
    """You et al. 2017, Algorithm 1: γ · η‖w‖ / (‖∇L‖ + β‖w‖)."""
    wn, gn = float(w.norm()), float(g.norm())
    return lr * trust * wn / (gn + wd * wn) if wn > 0 and gn + wd * wn > 0 else lr


def _lsalr_rate(lr, w, g, wd, trust):
    dn = float((g + wd * w).norm())
    return lr * (1 + math.log(1 + 1 / dn)) if dn > 0 else lr


def _reference(params, grads_per_step, rate, lr, momentum, nesterov, weight_decay, trust):
    """v ← µ v + rate·δW; W ← W − v (Nesterov: W − (rate·δW + µ v)); δW = g + wd·W."""
    params = [p.clone() for p in params]
    bufs = [None] * len(params)
    for grads in grads_per_step:
        for i, (w, g) in enumerate(zip(params, grads)):
            d = g + weight_decay * w
            u = rate(lr, w, g, weight_decay, trust) * d
            if momentum:
                bufs[i] = u.clone() if bufs[i] is None else momentum * bufs[i] + u
                u = u + momentum * bufs[i] if nesterov else bufs[i]
            params[i] = w - u
    return params


@pytest.mark.parametrize("cls,rate,trust", [(LARS, _lars_rate, None), (LARS, _lars_rate, 0.37),
                                            (LSALR, _lsalr_rate, None)])
@pytest.mark.parametrize("momentum,nesterov,weight_decay", [(0.0, False, 0.0), (0.9, False, 5e-4),
                                                            (0.9, True, 1e-2)])
def test_steps_follow_the_formula(cls, rate, trust, momentum, nesterov, weight_decay):
    torch.manual_seed(0)
    start = [torch.randn(5, 3, dtype=torch.float64), torch.zeros(5, dtype=torch.float64),
             torch.randn(2, 3, 3, dtype=torch.float64) * 7]
    steps = [[torch.randn_like(p) * s for p, s in zip(start, (0.01, 1.0, 30.0))]
             for _ in range(3)]
    params = [p.clone().requires_grad_() for p in start]
    lr = 0.3
    extra = {} if trust is None else {"trust_coefficient": trust}
    opt = cls(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
              **extra)
    for grads in steps:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    expected = _reference(start, steps, rate, lr, momentum, nesterov, weight_decay,
                          0.001 if trust is None else trust)   # You et al.'s η by default
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


def test_lars_with_decay_steps_continuously_through_a_zero_gradient():
    """With weight decay a zero gradient still decays W, at the formula's limit γ·η/β: the
    step equals the one of a vanishing gradient (it jumped by β/η to γ·β·W)."""
    steps = []
    for g in (0.0, 1e-30):
        w = torch.ones(3, dtype=torch.float64, requires_grad=True)
        w.grad = torch.full_like(w, g)
        LARS([w], lr=2.0, weight_decay=0.01).step()
        steps.append(1 - w.detach())
    torch.testing.assert_close(steps[0], steps[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(steps[0], torch.full((3,), 2.0 * 0.001, dtype=torch.float64),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("kwargs,name", [(dict(lr=0.0), "lr"), (dict(lr=float("nan")), "lr"),
                                         (dict(lr=0.1, momentum=-0.5), "momentum"),
                                         (dict(lr=0.1, weight_decay=-1), "weight_decay"),
                                         (dict(lr=0.1, nesterov=True), "nesterov")])
def test_bad_arguments_are_named(kwargs, name):
    for cls in (LARS, LSALR):
        with pytest.raises(ValueError, match=name):
            cls([torch.zeros(2, requires_grad=True)], **kwargs)
        # the same setting in a parameter group (torch fills the group from the defaults)
        group = {"params": [torch.zeros(2, requires_grad=True)], **kwargs}
        with pytest.raises(ValueError, match=f"param group 1: {name}"):
            cls([{"params": [torch.zeros(2, requires_grad=True)]}, group], lr=0.1)
        opt = cls([torch.zeros(2, requires_grad=True)], lr=0.1)
        with pytest.raises(ValueError, match=f"param group 1: {name}"):
            opt.add_param_group(group)
        assert len(opt.param_groups) == 1                     # the bad group is not kept


@pytest.mark.parametrize("trust", [0.0, -1e-3, float("inf"), True])
def test_bad_trust_coefficient_is_named(trust):
    with pytest.raises(ValueError, match="trust_coefficient"):
        LARS([torch.zeros(2, requires_grad=True)], lr=0.1, trust_coefficient=trust)
    with pytest.raises(ValueError, match="param group 0: trust_coefficient"):
        LARS([{"params": [torch.zeros(2, requires_grad=True)], "trust_coefficient": trust}],
             lr=0.1)


def test_param_group_trust_coefficient_overrides_the_default():
    w = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    v = torch.tensor([3.0, 4.0], dtype=torch.float64, requires_grad=True)
    opt = LARS([{"params": [w]}, {"params": [v], "trust_coefficient": 0.1}], lr=2.0)
    w.grad, v.grad = torch.tensor([0.0, 10.0], dtype=torch.float64), torch.tensor(
        [0.0, 10.0], dtype=torch.float64)
    opt.step()
    # rate = 2 · η · 5 / 10: η = 0.001 → 0.001, η = 0.1 → 0.1
    torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0 - 0.01], dtype=torch.float64))
    torch.testing.assert_close(v.detach(), torch.tensor([3.0, 4.0 - 1.0], dtype=torch.float64))


def test_defaults_at_paper_2s_rate_train_a_bn_convnet_on_digits():
    """Paper 2's global rate 2 with You et al.'s trust coefficient: 300 steps of 64 digits
    bring a small BN convnet's training loss under 0.3 (without η it diverges)."""
    datasets = pytest.importorskip("sklearn.datasets")
    x, y = datasets.load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                          nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1, bias=False),
                          nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(32 * 4, 10))
    opt = LARS(model.parameters(), lr=2.0, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):
        idx = torch.randint(len(y), (64,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model(x), y).item()
    assert loss < 0.3


def test_lsalr_refuses_options_it_does_not_have():
    w = nn.Parameter(torch.ones(3))
    for option in ({"weight_decy": 0.5}, {"maximize": True}, {"trust_coefficient": 0.01}):
        with pytest.raises(TypeError):
            LSALR([w], lr=0.1, **option)


@pytest.mark.parametrize("cls, weight, grad", [
    (LSALR, 1.0, 5e-6),        # ‖δW‖ = 1e-5: 1/‖δW‖ overflows float16
    (LARS, 4e4, 0.3),          # ‖W‖ = 8e4 > float16's 65504
])
def test_float16_parameters_take_the_float32_step(cls, weight, grad):
    steps = {}
    for dtype in (torch.float16, torch.float32):
        w = nn.Parameter(torch.full((4,), weight, dtype=dtype))
        w.grad = torch.full((4,), grad, dtype=dtype)
        cls([w], lr=0.1).step()
        steps[dtype] = w.detach().double()
    assert torch.isfinite(steps[torch.float16]).all()
    torch.testing.assert_close(steps[torch.float16], steps[torch.float32], rtol=2e-3, atol=1e-3)
