"""Saving model + optimizer mid-training (with the amortizer's EMA state) and resuming in a
fresh process-like setting continues bit-identically."""
import io

import pytest
import torch
import torch.nn as nn

import consequential_ext as cx

STEPS, SAVE_AT = 6, 3


def _model(seed, amortized):
    torch.manual_seed(seed)
    model = cx.consequentialize(nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 3)),
        ridge=1e-2)
    return cx.amortize(model, every=2, decay=0.8) if amortized else model


def _batches():
    gen = torch.Generator().manual_seed(7)
    return [(torch.randn(6, 2, 5, 5, generator=gen), torch.randn(6, 3, generator=gen))
            for _ in range(STEPS)]


def _train(model, opt, batches):
    for x, t in batches:
        opt.zero_grad()
        (0.5 * (model(x) - t).square().sum(-1).mean()).backward()
        opt.step()


@pytest.mark.parametrize("amortized", [False, True])
def test_resume_is_bit_identical(amortized):
    batches = _batches()
    straight = _model(0, amortized)
    straight_opt = torch.optim.Adam(straight.parameters(), lr=1e-2)
    _train(straight, straight_opt, batches)

    first = _model(0, amortized)
    first_opt = torch.optim.Adam(first.parameters(), lr=1e-2)
    _train(first, first_opt, batches[:SAVE_AT])
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": first_opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    resumed = _model(1, amortized)  # different initialisation: everything must come from disk
    resumed_opt = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    _train(resumed, resumed_opt, batches[SAVE_AT:])

    expected, actual = straight.state_dict(), resumed.state_dict()
    assert expected.keys() == actual.keys()
    assert any("amortizer" in k for k in expected) == amortized
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    for p, q in zip(straight.parameters(), resumed.parameters()):
        for name, value in straight_opt.state[p].items():
            assert torch.equal(resumed_opt.state[q][name], value), name
