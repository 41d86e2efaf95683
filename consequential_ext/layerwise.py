"""Rule ``"backmatch-layerwise"``: paper 2, Algorithm 1 (eqs. 32–37), no solve.

Algorithm 1 walks the layers from the top with a backward factor ``m`` (1 at the loss):
a layer with weights uses ``δW / m_b / s``; then ``m ← m · δa/δ'a`` with

* Linear (eq. 34):   δa/δ'a = ‖Wᵀ‖²_{2,µ}
* Conv2d (eq. 35):   δa/δ'a = ‖W_col‖²_{2,µ} / c,   c = (input locations) / s
* BatchNorm (eq. 36): δa/δ'a = 1 / ‖W‖²_{2,µ}, W the weight of the layer that feeds it
* ReLU, pooling, reshapes (eq. 31): 1

where ‖M‖²_{2,µ} is the mean over the rows of M of their squared norms.

How ``m`` travels: BP is linear in the signal, so instead of tracking ``m`` beside the
signal each layer sends ``δa / (δa/δ'a)`` — the ordinary signal already divided by the
factor. The signal that reaches a layer is then δb / m_b, the ordinary weight gradient
computed from it is δW / m_b, and only ``/ s`` is left to apply. The factor rides inside
the gradient itself: no order of layers to declare, any number of backward passes, layers
called twice, branches and several models all work as autograd does.

The sharing factor ``s`` of a conv is the number of its output locations (per sample and
channel) that the loss reaches — H_out·W_out, or H_out·W_out/4 under a 2×2 max pooling,
which routes each window's signal to one location. It is measured in backward as the
count of non-zero entries of the output signal, which gives the supplement's LeNet values
(196 and 25) and needs no knowledge of the layers above.
"""
from __future__ import annotations

import torch

from .ops.reference import accumulate_dtype

__all__ = ["row_mean_sq", "column_mean_sq", "sharing_factor", "conv2d_input_factor",
           "batchnorm_factor", "producer_weight"]


def row_mean_sq(weight):
    """‖W‖²_{2,µ}: mean over the output rows of W (Linear out×in, Conv W_row) of ‖row‖²."""
    work = accumulate_dtype(weight.dtype)
    return weight.detach().to(work).square().sum() / weight.shape[0]


def column_mean_sq(weight, groups=1):
    """‖Wᵀ‖²_{2,µ} (Linear) / ‖W_col‖²_{2,µ} (Conv2d): mean over the input units
    (features, or input channels) of the squared norm of the weights leaving each one."""
    work = accumulate_dtype(weight.dtype)
    return weight.detach().to(work).square().sum() / (weight.shape[1] * groups)


def sharing_factor(grad_output):
    """s of a conv: output locations per (sample, channel) that the signal reaches (≥ 1)."""
    batch, channels = grad_output.shape[:2]
    reached = torch.count_nonzero(grad_output).to(accumulate_dtype(grad_output.dtype))
    return (reached / (batch * channels)).clamp_min(1.0)


def conv2d_input_factor(weight, groups, input_hw, sharing):
    """δa/δ'a of a conv, eq. 35: ‖W_col‖²_{2,µ} / c with c = H_in·W_in / s, the supplement's
    196/25 for LeNet's second conv (14×14 inputs, 5×5 locations reached)."""
    return column_mean_sq(weight, groups) * sharing / (input_hw[0] * input_hw[1])


def batchnorm_factor(producer_sq, batch_var, gamma):
    """δ'a/δa of a batch norm, eq. 36: Var[a] ≈ ‖W‖²_{2,µ} (``producer_sq``) of the layer
    feeding it.

    With no C-layer found below (raw data, an nn layer, a branch: ``producer_sq`` None),
    falls back to eq. 36's first form, the batch variance averaged over channels. An affine
    γ scales BP by γ and the matched signal by 1/γ, hence the division by the mean γ².
    """
    var = producer_sq if producer_sq is not None else batch_var.mean()
    if gamma is not None:
        var = var / gamma.detach().to(var.dtype).square().mean()
    return var


def producer_weight(tensor):
    """The weight of the C-layer whose output ``tensor`` is, through single-input ops
    (pooling, activations, reshapes); None if there is none or the path branches."""
    from .functional import CConv2dFunction, CLinearFunction  # functional imports this module
    c_nodes = (CLinearFunction._backward_cls, CConv2dFunction._backward_cls)
    node = tensor.grad_fn
    while node is not None:
        if isinstance(node, c_nodes):
            return node.saved_tensors[1]  # both Functions save (input, weight)
        inputs = [n for n, _ in node.next_functions if n is not None]
        node = inputs[0] if len(inputs) == 1 else None
    return None
