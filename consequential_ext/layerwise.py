"""Rule ``"backmatch-layerwise"``: paper 2, Algorithm 1 (eqs. 32–37), no solve.

Algorithm 1 walks the layers from the top with a backward factor ``m`` (1 at the loss):
a layer with weights uses ``δW / m_b / s``; then ``m ← m · δa/δ'a`` with

* Linear (eq. 34):   δa/δ'a = ‖Wᵀ‖²_{2,µ}
* Conv2d (eq. 35):   δa/δ'a = ‖W_col‖²_{2,µ} / c,   c = (input locations) / s
* BatchNorm (eq. 36): δa/δ'a = 1 / ‖W‖²_{2,µ}, W the weight of the layer that feeds it
* ReLU, pooling, reshapes (eq. 31): 1 (average pooling too, where eq. 11 would give k²:
  docs/backmatch.md, "Where the paper … differ")

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

import contextlib
import re

import torch

from .matching import autocast_on
from .ops.reference import accumulate_dtype

__all__ = ["row_mean_sq", "column_mean_sq", "sharing_factor", "conv2d_input_factor",
           "batchnorm_factor", "producer_weight", "divide_signal", "linear_weight_grads",
           "conv2d_weight_grads"]


def row_mean_sq(weight):
    """‖W‖²_{2,µ}: mean over the output rows of W (Linear out×in, Conv W_row) of ‖row‖²
    (for the kinds eq. 36 does not cover, ΣW² / weight.shape[0] all the same:
    docs/backmatch.md, "Where the paper … differ")."""
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
    return (reached / max(batch * channels, 1)).clamp_min(1.0)   # an empty batch: s = 1


def conv2d_input_factor(weight, groups, input_hw, sharing):
    """δa/δ'a of a conv, eq. 35: ‖W_col‖²_{2,µ} / c with c = H_in·W_in / s, the supplement's
    196/25 for LeNet's second conv (14×14 inputs, 5×5 locations reached)."""
    return column_mean_sq(weight, groups) * sharing / (input_hw[0] * input_hw[1])


def divide_signal(grad_input, factor):
    """BP's signal over a layer's δa/δ'a, in its dtype; 0 where the factor is 0 (all-zero
    weights: BP's signal is 0 too, and 0 is the minimum-norm matched one)."""
    quotient = grad_input / torch.where(factor != 0, factor, torch.ones_like(factor))
    # In place on the fresh quotient: a ``where`` with a zeros_like would hold two more
    # signal-sized tensors at the backward's peak.
    return quotient.masked_fill_(factor == 0, 0).to(grad_input.dtype)


def batchnorm_factor(producer_sq, batch_var, gamma):
    """δ'a/δa of a batch norm, eq. 36: Var[a] ≈ ‖W‖²_{2,µ} (``producer_sq``) of the layer
    feeding it.

    With no C-layer found below (raw data, an nn layer, a branch: ``producer_sq`` None),
    falls back to eq. 36's first form, the batch variance averaged over channels. An affine
    γ scales BP by γ and the matched signal by 1/γ, hence the division by the mean γ² (a
    float64 scalar). All-zero γ (a zero-initialised residual branch) sends BP's signal 0: the
    factor is 0 there, not ∞ (whose product with 0 is NaN), as the exact rule's minimum-norm 0.
    """
    var = (producer_sq if producer_sq is not None else batch_var.mean()).double()
    if gamma is not None:
        # In float64: a tiny float32 γ (1e-20) has a mean square float32 holds but a
        # quotient it does not (the signal applies the factor as two square roots).
        gamma_sq = gamma.detach().double().square().mean()
        var = torch.where(gamma_sq > 0, var / gamma_sq, torch.zeros_like(var))
    return var


def producer_weight(tensor):
    """The weight of the C-layer whose output ``tensor`` is, through single-input ops
    (pooling, activations, reshapes); None if there is none, the path branches or it meets
    an nn layer — a matmul or conv, whose weight a frozen layer hides from the graph.

    A C-layer's autograd.Function says where it saved its weight (``cx_saved_weight_index``),
    so any layer kind is found without this module knowing the Functions.
    """
    if not tensor.requires_grad:
        return None                      # no graph behind it (the model's input)
    if torch.compiler.is_compiling():
        raise RuntimeError(_COMPILED)
    node = tensor.grad_fn
    while node is not None:
        name = type(node).__name__
        if name == "CompiledFunctionBackward":   # a graph break upstream
            raise RuntimeError(_COMPILED)
        if name == "AccumulateGrad":             # reached a leaf
            break
        index = getattr(getattr(node, "_forward_cls", None), "cx_saved_weight_index", None)
        if index is not None:   # saved, or held by reference (functional._save_common)
            held = getattr(node, "cx_weight", None)
            return held if held is not None else node.saved_tensors[index]
        if _WEIGHTED_OP.match(name):
            return None
        inputs = [n for n, _ in node.next_functions if n is not None]
        if len(inputs) != 1:
            return None                          # a branch, or a constant
        node = inputs[0]
    if type(torch._C._current_autograd_node()).__name__ == "CheckpointFunctionBackward":
        # A leaf reached in a reentrant checkpoint's recomputation (run by that node's
        # backward): its segment starts below the layer feeding the norm. A non-reentrant
        # recomputation only refills saved tensors: the first forward's factor stands.
        raise RuntimeError(_RECOMPUTED)
    return None


# ATen's backward nodes of ops that multiply by a weight (conv, mm/addmm/bmm, mv, dot,
# linear, embedding, the fused recurrent ops: oneDNN's float32 LSTM, cuDNN's / MIOpen's RNNs,
# CUDA's fused cells): an nn layer, frozen or not, ends the walk — a frozen LSTM's fused node
# has its input as its one graph input, like an activation's. Anchored at the name's start:
# LgammaBackward, CummaxBackward or UpsampleLinear1DBackward are no such op.
_WEIGHTED_OP = re.compile(r"(Addmm|Mm|Bmm|Baddbmm|Addbmm|Mv|Addmv|Dot|Vdot|Linear|MkldnnLinear|"
                          r"Embedding\w*|\w*Convolution\w*|SlowConv\w*|ConvDepthwise\w*|ConvTbc|"
                          r"\w*Rnn\w*|ThnnFused\w*)Backward")

# Eq. 36 needs the producing layer's weight at forward time, and only the eager autograd graph
# holds it: a compiled region hides it (falling back to the no-producer form would be another
# rule, silently).
_COMPILED = ("rule 'backmatch-layerwise' with batch norms cannot run under torch.compile: a "
             "norm's factor (paper 2, eq. 36) needs the weight of the C-layer feeding it, "
             "found in the eager autograd graph, which a compiled region hides; run this model "
             "eagerly, or compile it with another rule")
_RECOMPUTED = ("rule 'backmatch-layerwise': a batch norm recomputed by a reentrant activation "
               "checkpoint whose segment starts at its input cannot find the C-layer feeding "
               "it (paper 2, eq. 36); use torch.utils.checkpoint with use_reentrant=False, or "
               "start the segment at that layer")


def linear_weight_grads(input, grad_output, dtype, need_weight, need_bias):
    """δW / m_b (s = 1): the ordinary gradient of the incoming, already 1/m-scaled, signal.
    Accumulated in float32 or better (autocast hands in mixed dtypes); returned in ``dtype``."""
    work = accumulate_dtype(grad_output.dtype)
    gy = grad_output.reshape(-1, grad_output.shape[-1]).to(work)
    grad_weight = None
    if need_weight:
        # backward may run inside an autocast region, whose bf16 matmul would undo the cast
        # (entered only where autocast is on: ~20 µs a call, matching._autocast_off)
        device = gy.device.type
        with torch.autocast(device, enabled=False) if autocast_on(device) \
                else contextlib.nullcontext():
            rows = input.reshape(gy.shape[0], input.shape[-1])   # also with 0 in-features
            grad_weight = (gy.T @ rows.to(work)).to(dtype)
    grad_bias = gy.sum(0).to(dtype) if need_bias else None
    return grad_weight, grad_bias


def conv2d_weight_grads(x, grad_output, weight, stride, padding, dilation, groups, sharing,
                        need_weight, need_bias):
    """δW / m_b / s of a conv (eq. 33), from the incoming, already 1/m-scaled, signal.

    x: the input padded so that ``padding`` is symmetric, as the conv backward sees it.
    """
    work = accumulate_dtype(grad_output.dtype)
    _, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
        grad_output.to(work), x.to(work), weight.to(work), [weight.shape[0]], list(stride),
        list(padding), list(dilation), False, [0, 0], groups, [False, need_weight, need_bias])
    grad_weight = (grad_weight / sharing).to(weight.dtype) if need_weight else None
    grad_bias = (grad_bias / sharing).to(weight.dtype) if need_bias else None
    return grad_weight, grad_bias
