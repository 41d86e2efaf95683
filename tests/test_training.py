"""Convergence on real data: ordinary optimizers fed matched gradients train on digits."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits

import consequential_ext as cx


def _digits():
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    return x, y


def _train(optimizer_fn, steps=150, seed=0):
    torch.manual_seed(seed)
    x, y = _digits()
    model = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 64, 32), nn.ReLU(), nn.Linear(32, 10))
    cx.consequentialize(model)
    opt = optimizer_fn(model.parameters())
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        full = F.cross_entropy(model(x), y).item()
        acc = (model(x).argmax(1) == y).float().mean().item()
    return losses, full, acc


@pytest.mark.parametrize("name,optimizer_fn", [
    ("C-SGD", lambda p: torch.optim.SGD(p, lr=0.05)),
    ("C-Nesterov", lambda p: torch.optim.SGD(p, lr=0.02, momentum=0.9, nesterov=True)),
    ("C-Adam", lambda p: torch.optim.Adam(p, lr=3e-3)),
])
def test_matched_gradients_train_on_digits(name, optimizer_fn):
    losses, full, acc = _train(optimizer_fn)
    first = sum(losses[:10]) / 10
    last = sum(losses[-10:]) / 10
    assert all(torch.isfinite(torch.tensor(losses)))
    assert last < 0.5 * first, f"{name}: loss {first:.3f} -> {last:.3f}"
    assert acc > 0.8, f"{name}: training accuracy {acc:.3f}"
