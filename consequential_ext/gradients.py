"""Per layer kind, the backward primitives a rule composes (``rules.py``).

One object per backward call, built from what the layer's autograd.Function saved. Each
primitive is the kind's own math; which ones run is the rule's business. ``needs_weight`` /
``needs_bias`` come from autograd's ``needs_input_grad``.
"""
from __future__ import annotations

import functools

import torch

from . import backmatch, layerwise, matching


class LinearGradients:
    """Backward of ``y = x Wᵀ + b``: X is every input row (docs/design.md §2)."""

    def __init__(self, input, weight, grad_output, *, has_bias, needs_weight, needs_bias, ridge,
                 amortizer):
        self.input, self.weight, self.grad_output = input, weight, grad_output
        self.has_bias, self.ridge, self.amortizer = has_bias, ridge, amortizer
        self.needs_weight, self.needs_bias = needs_weight, needs_bias

    def input_grad(self):
        return (self.grad_output @ self.weight.to(self.grad_output.dtype)).to(self.input.dtype)

    def matched_input_signal(self):
        return backmatch.match_linear_input(self.input_grad(), self.weight)

    def layerwise_input_signal(self):
        return layerwise.divide_signal(self.input_grad(), layerwise.column_mean_sq(self.weight))

    def matched_weight_grads(self):
        if not (self.needs_weight or self.needs_bias):
            return None, None
        gw, gb = matching.matched_linear(self.input.reshape(-1, self.input.shape[-1]),
                                         self.grad_output.reshape(-1, self.grad_output.shape[-1]),
                                         self.has_bias, self.ridge, amortizer=self.amortizer)
        return gw.to(self.weight.dtype), None if gb is None else gb.to(self.weight.dtype)

    def plain_weight_grads(self):
        return layerwise.linear_weight_grads(self.input, self.grad_output, self.weight.dtype,
                                             self.needs_weight, self.needs_bias)

    def layerwise_weight_grads(self):
        return self.plain_weight_grads()  # s = 1 for a Linear (eq. 33)


def explicit_padding(padding, kernel_size, dilation):
    """(top, bottom, left, right) for int / pair / 'same' / 'valid' padding."""
    if padding == "valid":
        return (0,) * 2 * len(kernel_size)
    if padding == "same":
        pads = []
        for k, d in zip(kernel_size, dilation):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    pads = []
    for p in padding:
        pads += [p, p]
    return tuple(pads)


class Conv2dGradients:
    """Backward of ``F.conv2d``: X is every im2col patch of every sample, per group.

    'same' with an even receptive field pads unevenly: the excess is padded explicitly so
    that the kernels only ever see symmetric zero padding, and cropped off the input signal.
    """

    def __init__(self, input, weight, grad_output, stride, padding, dilation, groups, *,
                 has_bias, needs_weight, needs_bias, ridge, amortizer):
        top, bottom, left, right = explicit_padding(padding, weight.shape[2:], dilation)
        ph, pw = min(top, bottom), min(left, right)
        self.extra = (left - pw, right - pw, top - ph, bottom - ph)     # F.pad order
        self.x = torch.nn.functional.pad(input, self.extra) if any(self.extra) else input
        self.input, self.weight, self.grad_output = input, weight, grad_output
        self.stride, self.padding, self.dilation, self.groups = stride, (ph, pw), dilation, groups
        self.has_bias, self.ridge, self.amortizer = has_bias, ridge, amortizer
        self.needs_weight, self.needs_bias = needs_weight, needs_bias

    def _crop(self, grad_x):
        left, right, top, bottom = self.extra
        if any(self.extra):
            grad_x = grad_x[..., top: grad_x.shape[-2] - bottom, left: grad_x.shape[-1] - right]
        return grad_x.to(self.input.dtype)

    def _padded_input_grad(self):
        # Under autocast the saved input stays float32 while the signal is bf16/fp16; some
        # conv backends reject the mix, and only the input's shape matters here.
        dtype = self.grad_output.dtype
        grad_x, _, _ = torch.ops.aten.convolution_backward(
            self.grad_output, self.x.to(dtype), self.weight.to(dtype), None,
            list(self.stride), list(self.padding), list(self.dilation), False, [0, 0],
            self.groups, [True, False, False])
        return grad_x

    def input_grad(self):
        return self._crop(self._padded_input_grad())

    def matched_input_signal(self):
        return self._crop(backmatch.match_conv2d_input(
            self._padded_input_grad(), self.weight, self.stride, self.padding, self.dilation,
            self.groups, self.grad_output.shape[2:]))

    @functools.cached_property
    def sharing(self):
        return layerwise.sharing_factor(self.grad_output)

    def layerwise_input_signal(self):
        factor = layerwise.conv2d_input_factor(self.weight, self.groups, self.input.shape[2:],
                                               self.sharing)
        return self._crop(layerwise.divide_signal(self._padded_input_grad(), factor))

    def matched_weight_grads(self):
        if not (self.needs_weight or self.needs_bias):
            return None, None
        gw, gb = matching.matched_conv2d(self.x, self.grad_output, self.weight.shape,
                                         self.stride, self.padding, self.dilation, self.groups,
                                         self.has_bias, self.ridge, amortizer=self.amortizer)
        return gw.to(self.weight.dtype), None if gb is None else gb.to(self.weight.dtype)

    def _weight_grads_over(self, sharing):
        return layerwise.conv2d_weight_grads(
            self.x, self.grad_output, self.weight, self.stride, self.padding, self.dilation,
            self.groups, sharing, self.needs_weight, self.needs_bias)

    def plain_weight_grads(self):
        return self._weight_grads_over(1.0)

    def layerwise_weight_grads(self):
        return self._weight_grads_over(self.sharing)


class BatchNormGradients:
    """Backward of a batch norm (``norm.py``): the input side of a rule, and γ/β's ordinary
    gradients (a batch norm has no matched weight).

    batch_stats: the forward normalised with the batch's statistics (else ``running``);
    producer_sq: ‖W‖²_{2,µ} of the C-layer feeding the norm, for eq. 36 (or None).
    """

    def __init__(self, input, weight, grad_output, *, batch_stats, running, eps, producer_sq):
        self.work = torch.float64 if input.dtype == torch.float64 else torch.float32
        x, self.gy = input.to(self.work), grad_output.to(self.work)
        self.dims = [0] + list(range(2, x.dim()))
        self.shape = (1, -1) + (1,) * (x.dim() - 2)
        if batch_stats:
            mean, self.var = x.mean(self.dims), x.var(self.dims, unbiased=False)
        else:
            mean, self.var = (r.to(self.work) for r in running)
        self.std = (self.var + eps).sqrt()
        self.x_hat = (x - mean.reshape(self.shape)) / self.std.reshape(self.shape)
        self.input, self.weight = input, weight
        self.batch_stats, self.producer_sq = batch_stats, producer_sq

    def _bp(self):
        """BP's signal to the input, in the working dtype."""
        gamma = 1.0 if self.weight is None else self.weight.to(self.work).reshape(self.shape)
        centred = self.gy
        if self.batch_stats:  # BP through the batch mean and variance as well
            centred = self.gy - self.gy.mean(self.dims, keepdim=True) \
                - self.x_hat * (self.gy * self.x_hat).mean(self.dims, keepdim=True)
        return gamma * centred / self.std.reshape(self.shape)

    def input_grad(self):
        return self._bp().to(self.input.dtype)

    def matched_input_signal(self):
        return backmatch.match_batchnorm_input(self.gy, self.std, self.weight) \
            .to(self.input.dtype)

    def layerwise_input_signal(self):
        factor = layerwise.batchnorm_factor(self.producer_sq, self.var, self.weight)
        return (self._bp() * factor).to(self.input.dtype)

    def affine_grads(self, needs_weight, needs_bias):
        """Ordinary (grad_weight, grad_bias) of γ and β."""
        grad_weight = (self.gy * self.x_hat).sum(self.dims).to(self.weight.dtype) \
            if needs_weight else None
        grad_bias = self.gy.sum(self.dims).to(self.weight.dtype) if needs_bias else None
        return grad_weight, grad_bias
