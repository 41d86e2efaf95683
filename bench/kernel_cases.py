"""One setup per kernel case, shared by the speed benchmark and the memory probe.

Cases use the ResNet-20 3×3, pad-1 layer shapes: a case is (op, batch, channels, side).
``matched_grad`` is the whole weight-gradient chain of one CConv2d backward (gram, the
ordinary gradient G, the solve and the rescale to weight.grad), forced onto one backend.
"""
from __future__ import annotations

import torch

import consequential_ext as cx
from consequential_ext import matching

from .timing import conv_out, gram_flops, solve_flops

RESNET20_LAYERS = ((16, 32), (32, 16), (64, 8))     # (channels, side), 3×3 kernels, pad 1
OPS = ("im2col_gram", "ridge_solve", "matched_grad")
RIDGE = 1e-3


def backends(op: str, device) -> list[str]:
    """Backends able to run ``op``; the composite needs one that runs both of its ops."""
    if op == "matched_grad":
        solve = cx.ops.available_backends("ridge_solve", device)
        return [b for b in cx.ops.available_backends("im2col_gram", device) if b in solve]
    return cx.ops.available_backends(op, device)


def setup(op: str, batch: int, channels: int, side: int, device="cpu", seed=0):
    """(call(backend) → tensor, analytic flop count, D) for one case; inputs made once."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, side, side, generator=gen).to(device)
    d = channels * 9
    if op == "im2col_gram":
        def call(backend):
            with cx.ops.use_backend(backend):
                return cx.ops.im2col_gram(x, 3, 1, 1)
        return call, gram_flops(batch, channels, side, side, 3, 1, 1), d
    if op == "ridge_solve":
        with cx.ops.use_backend("reference"):
            gram = cx.ops.im2col_gram(x, 3, 1, 1) / batch
        grad = torch.randn(channels, d, generator=gen).to(device)

        def call(backend):
            with cx.ops.use_backend(backend):
                return cx.ops.ridge_solve(gram, grad, RIDGE)
        return call, solve_flops(d, channels), d
    if op == "matched_grad":
        gy = torch.randn(batch, channels, side, side, generator=gen).to(device)
        shape = (channels, channels, 3, 3)

        def call(backend):
            with cx.ops.use_backend(backend):
                gw, _ = matching.matched_conv2d(x, gy, shape, (1, 1), (1, 1), (1, 1), 1, False,
                                                RIDGE, side="row")
                return gw
        p = batch * conv_out(side, 3, 1, 1) ** 2
        flops = gram_flops(batch, channels, side, side, 3, 1, 1) + 2 * p * d * channels \
            + solve_flops(d, channels)
        return call, flops, d
    raise ValueError(f"unknown kernel op {op!r}; choose from {OPS}")
