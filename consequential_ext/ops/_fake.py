"""Fake (meta) implementations of the compiled ops, so shapes propagate under
torch.compile / FakeTensor without running a kernel."""
from __future__ import annotations

import torch

_registered = False


def _patch_dim(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def register_fakes():
    global _registered
    if _registered:
        return
    try:
        import consequential_ext._C  # noqa: F401
    except ImportError:
        return
    _registered = True

    @torch.library.register_fake("consequential_ext::im2col_gram")
    def _gram(x, kernel_size, stride, padding, dilation, groups, bias):
        d = x.shape[1] // groups * kernel_size[0] * kernel_size[1] + int(bias)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.new_empty((groups, d, d), dtype=acc)

    @torch.library.register_fake("consequential_ext::_im2col_gram_algorithm")
    def _(x, kernel_size, stride, padding, dilation, groups, bias, algorithm):
        return _gram(x, kernel_size, stride, padding, dilation, groups, bias)

    @torch.library.register_fake("consequential_ext::_conv_gram_grad")
    def _(x, grad_output, kernel_size, stride, padding, dilation, groups, bias):
        gram = _gram(x, kernel_size, stride, padding, dilation, groups, bias)
        out = grad_output.shape[1]
        return gram, gram.new_empty((groups, out // groups, gram.shape[-1]))

    @torch.library.register_fake("consequential_ext::_conv_weight_grad")
    def _(x, grad_output, kernel_size, stride, padding, dilation, groups, bias):
        gram = _gram(x, kernel_size, stride, padding, dilation, groups, bias)
        return gram.new_empty((groups, grad_output.shape[1] // groups, gram.shape[-1]))

    @torch.library.register_fake("consequential_ext::ridge_solve")
    def _(gram, grad, ridge, out_dtype=None):
        return grad.new_empty(grad.shape, dtype=out_dtype or grad.dtype)
