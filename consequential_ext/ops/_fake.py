"""Fake (meta) implementations of the compiled ops, so shapes propagate under
torch.compile / FakeTensor without running a kernel."""
from __future__ import annotations

import torch

_registered = False


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

    # One input on the meta device sends the call here, whatever the other's device: the
    # kernels would have checked that they agree.
    def _same_device(name, x, grad_output):
        if grad_output.device != x.device:
            raise RuntimeError(f"{name}: grad_output must be on x's device ({x.device}); got "
                               f"{grad_output.device}")

    @torch.library.register_fake("consequential_ext::_conv_gram_grad")
    def _(x, grad_output, kernel_size, stride, padding, dilation, groups, bias):
        _same_device("conv_gram_grad", x, grad_output)
        gram = _gram(x, kernel_size, stride, padding, dilation, groups, bias)
        out = grad_output.shape[1]
        return gram, gram.new_empty((groups, out // groups, gram.shape[-1]))

    @torch.library.register_fake("consequential_ext::_conv_weight_grad")
    def _(x, grad_output, kernel_size, stride, padding, dilation, groups, bias):
        _same_device("conv_weight_grad", x, grad_output)
        gram = _gram(x, kernel_size, stride, padding, dilation, groups, bias)
        return gram.new_empty((groups, grad_output.shape[1] // groups, gram.shape[-1]))

    @torch.library.register_fake("consequential_ext::ridge_solve")
    def _(gram, grad, ridge, out_dtype=None):
        if gram.device != grad.device:
            raise RuntimeError(f"ridge_solve: grad must be on gram's device ({gram.device}); got "
                               f"{grad.device}")
        return grad.new_empty(grad.shape, dtype=out_dtype or grad.dtype)
