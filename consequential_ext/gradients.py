"""Per layer kind, the backward primitives a rule composes (``rules.py``).

One object per backward call, built from what the layer's autograd.Function saved. Each
primitive is the kind's own math; which ones run is the rule's business. ``needs_weight`` /
``needs_bias`` come from autograd's ``needs_input_grad``.
"""
from __future__ import annotations

import functools
import math

import torch

from . import backmatch, distributed, layerwise, matching
from .ops.reference import accumulate_dtype


def _rows(t):
    """(rows, last dim) of ``t``, also with a last dim of 0 (nn.Linear(0, n)), where
    ``reshape(-1, 0)`` cannot tell the rows."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def _matched_bias_alone(grad_output, channel_dim, dtype, ridge):
    """The matched gradient of a bias on its own constant-1 input — one that trains while its
    weight is frozen, or a ConvTranspose bias (added after the overlap): A = Σ 1·1 / N is the
    number of output locations per sample (1 for a Linear), so the bias gets
    g_b / (locations + λ)."""
    channel_dim %= grad_output.dim()
    locations = math.prod(grad_output.shape[channel_dim + 1:])
    dims = [d for d in range(grad_output.dim()) if d != channel_dim]
    sums = grad_output.to(accumulate_dtype(grad_output.dtype)).sum(dims)
    return (sums / (locations + ridge)).to(dtype)


class LinearGradients:
    """Backward of ``y = x Wᵀ + b``: X is every input row (docs/design.md §2)."""

    def __init__(self, input, weight, grad_output, *, has_bias, needs_weight, needs_bias, ridge,
                 amortizer, trains_weight=True):
        self.input, self.weight, self.grad_output = input, weight, grad_output
        self.has_bias, self.ridge, self.amortizer = has_bias, ridge, amortizer
        self.needs_weight, self.needs_bias = needs_weight, needs_bias
        self.trains_weight = trains_weight

    def input_grad(self):
        return (self.grad_output @ self.weight.to(self.grad_output.dtype)).to(self.input.dtype)

    def matched_input_signal(self):
        return backmatch.match_linear_input(self.input_grad(), self.weight)

    def layerwise_input_signal(self):
        return layerwise.divide_signal(self.input_grad(), layerwise.column_mean_sq(self.weight))

    def matched_weight_grads(self):
        if not (self.needs_weight or self.needs_bias):
            return None, None
        if not self.trains_weight:
            return None, _matched_bias_alone(self.grad_output, -1, self.weight.dtype, self.ridge)
        gw, gb = matching.matched_linear(_rows(self.input), _rows(self.grad_output),
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


def _split_padding(padding, kernel_size, dilation):
    """(symmetric padding per spatial dim, the excess in F.pad's order): an uneven 'same' is
    padded explicitly, so that kernels only ever see symmetric zero padding."""
    if torch.compiler.is_compiling():     # traced once per graph; Dynamo warns on a cache
        return _split_padding_of(padding, kernel_size, dilation)
    return _split_padding_cached(padding, kernel_size, dilation)


def _split_padding_of(padding, kernel_size, dilation):
    pads = explicit_padding(padding, kernel_size, dilation)
    symmetric = tuple(map(min, pads[0::2], pads[1::2]))
    extra = []
    for before, after, sym in reversed(list(zip(pads[0::2], pads[1::2], symmetric))):
        extra += [before - sym, after - sym]
    return symmetric, tuple(extra)


_split_padding_cached = functools.lru_cache(maxsize=256)(_split_padding_of)  # ~5 µs a backward


def _hits_onednn_heap_bug(x, weight, stride):
    """Whether torch 2.13's oneDNN weight gradient could corrupt the heap here: a 1×1 conv with
    a stride over 2–7 input channels, computed channels_last (the input's or the weight's
    layout; plain nn.Conv2d's backward aborts the process the same way). NCHW it does not,
    and such a layer is small: its input and weight go NCHW (csrc/cpu/gram_cpu.cpp's
    aten_weight_grad guards the same case)."""
    return x.dim() == 4 and tuple(weight.shape[2:]) == (1, 1) and tuple(stride) != (1, 1) \
        and 2 <= x.shape[1] < 8 and not (_is_nchw(x) and _is_nchw(weight))


def _is_nchw(t):
    # is_contiguous() also holds for channels_last strides where dims are 1 (a 1×1 weight),
    # and oneDNN then takes the channels_last path
    return t.stride() == torch.empty(t.shape, device="meta").stride()


class Conv2dGradients:
    """Backward of ``F.conv2d``: X is every im2col patch of every sample, per group.

    'same' with an even receptive field pads unevenly: the excess is padded explicitly so
    that the kernels only ever see symmetric zero padding, and cropped off the input signal.
    """

    def __init__(self, input, weight, grad_output, stride, padding, dilation, groups, *,
                 has_bias, needs_weight, needs_bias, ridge, amortizer, map_size=None,
                 trains_weight=True):
        self.trains_weight = trains_weight
        self.padding, self.extra = _split_padding(padding, weight.shape[2:], dilation)
        # The input map eq. 35's c counts: the unpadded one when a non-zero padding_mode
        # padded ``input`` before the conv (functional.cconv_padded).
        self.map_size = tuple(input.shape[2:]) if map_size is None else tuple(map_size)
        self.x = torch.nn.functional.pad(input, self.extra) if any(self.extra) else input
        if _hits_onednn_heap_bug(self.x, weight, stride):
            self.x, weight = (t.clone(memory_format=torch.contiguous_format)
                              for t in (self.x, weight))
        self.input, self.weight, self.grad_output = input, weight, grad_output
        self.stride, self.dilation, self.groups = stride, dilation, groups
        self.has_bias, self.ridge, self.amortizer = has_bias, ridge, amortizer
        self.needs_weight, self.needs_bias = needs_weight, needs_bias
        self._g = None  # G, when the input gradient's conv backward computed it too
        self._gram = None  # the Gram, when the Gram kernel computed G (and it) before that

    def _crop(self, grad_x):
        if any(self.extra):
            dims = len(self.padding)
            keep = [slice(self.extra[2 * (dims - 1 - i)],
                          grad_x.shape[2 + i] - self.extra[2 * (dims - 1 - i) + 1])
                    for i in range(dims)]
            grad_x = grad_x[(slice(None), slice(None), *keep)]
        return grad_x.to(self.input.dtype)

    def _padded_input_grad(self, with_matched_g=False):
        # Under autocast the saved input stays float32 while the signal is bf16/fp16; some
        # conv backends reject the mix, and only the input's shape matters here.
        dtype = self.grad_output.dtype
        fuse = with_matched_g and self._fusable()
        if fuse:  # the row side: the shift kernel may give G (exact: and the Gram) cheaper
            both = matching.conv_gram_and_grad(
                self.x, self.grad_output, self.weight.shape, self.stride, self.padding,
                self.dilation, self.groups, self.has_bias, with_gram=self.amortizer is None)
            if both is not None:
                self._gram, self._g = both
                fuse = False
        bias = fuse and self.has_bias
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            self.grad_output, self.x.to(dtype), self.weight.to(dtype),
            [self.weight.shape[0]] if bias else None, list(self.stride), list(self.padding),
            list(self.dilation), False, [0] * len(self.stride), self.groups, [True, fuse, bias])
        if fuse:  # G for matched_weight_grads, from the same pass over the signal
            self._g = matching.conv_grad(grad_w, grad_b, self.groups)
        return grad_x

    def _fusable(self):
        """Whether the input gradient's conv backward can also give the matched solve's G:
        the row side will use it (not so for a bias matched alone under a frozen weight), and
        no autocast makes the signal's dtype differ from the float32-or-better one G is
        computed in."""
        work = accumulate_dtype(self.x.dtype)
        return self.trains_weight and (self.needs_weight or self.needs_bias) \
            and self.grad_output.dtype == work \
            and self.x.dtype == work and matching.conv_side(
                self.x, self.grad_output, self.weight.shape, self.has_bias,
                self.amortizer) == "row"

    def input_grad(self):
        return self._crop(self._padded_input_grad(with_matched_g=True))

    def matched_input_signal(self):
        return self._crop(backmatch.match_conv2d_input(
            self._padded_input_grad(with_matched_g=True), self.weight, self.stride,
            self.padding, self.dilation, self.groups, self.grad_output.shape[2:]))

    @property
    def sharing(self):
        # Not a functools.cached_property: Dynamo (torch.compile) cannot trace its lock.
        return layerwise.sharing_factor(self.grad_output)

    def layerwise_input_signal(self):
        factor = layerwise.conv2d_input_factor(self.weight, self.groups, self.map_size,
                                               self.sharing)
        return self._crop(layerwise.divide_signal(self._padded_input_grad(), factor))

    def matched_weight_grads(self):
        if not (self.needs_weight or self.needs_bias):
            return None, None
        if not self.trains_weight:
            return None, _matched_bias_alone(self.grad_output, 1, self.weight.dtype, self.ridge)
        gw, gb = matching.matched_conv2d(self.x, self.grad_output, self.weight.shape,
                                         self.stride, self.padding, self.dilation, self.groups,
                                         self.has_bias, self.ridge, amortizer=self.amortizer,
                                         grad=self._g, gram=self._gram)
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
        bp = self._bp()                      # a fresh tensor: scaled in place
        root = factor.sqrt().to(bp.dtype)    # √f·√f: f itself may exceed bp's dtype's range
        return bp.mul_(root).mul_(root).to(self.input.dtype)

    def affine_grads(self, needs_weight, needs_bias):
        """Ordinary (grad_weight, grad_bias) of γ and β."""
        grad_weight = (self.gy * self.x_hat).sum(self.dims).to(self.weight.dtype) \
            if needs_weight else None
        grad_bias = self.gy.sum(self.dims).to(self.weight.dtype) if needs_bias else None
        return grad_weight, grad_bias


class EmbeddingGradients:
    """Backward of ``F.embedding``: the lookup is a Linear on one-hot rows, so X is one-hot,
    A = diag(count_v / N) with N the number of indices, and the matched gradient divides row
    v of the ordinary one by (count_v / N + λ) — rows not looked up stay zero, and so does
    ``padding_idx``'s (nn gives it no gradient). Indices get no signal.
    """

    def __init__(self, indices, weight, grad_output, *, padding_idx, scale_grad_by_freq,
                 sparse, needs_weight, ridge):
        self.indices, self.weight, self.grad_output = indices, weight, grad_output
        self.padding_idx, self.scale_grad_by_freq, self.sparse = (padding_idx, scale_grad_by_freq,
                                                                  sparse)
        self.needs_weight, self.ridge = needs_weight, ridge

    def input_grad(self):
        return None

    matched_input_signal = layerwise_input_signal = input_grad

    def _ordinary(self, work):
        return torch.ops.aten.embedding_backward(
            self.grad_output.to(work), self.indices, self.weight.shape[0],
            -1 if self.padding_idx is None else self.padding_idx, self.scale_grad_by_freq,
            self.sparse)

    def matched_weight_grads(self):
        if not self.needs_weight:
            return None, None
        work = torch.float64 if self.weight.dtype == torch.float64 else torch.float32
        counts = torch.bincount(self.indices.reshape(-1), minlength=self.weight.shape[0])
        # diag(A), summed over ranks under DDP like every Gram (distributed.py)
        pending = distributed.PendingGram(counts.to(work), self.indices.numel(),
                                          distributed.gram_group())
        grad = self._ordinary(work)
        scale = pending.wait() + self.ridge
        if self.sparse:  # each value row by its row's scale; the values may be grad_output's own
            rows = grad._indices()
            grad = torch.sparse_coo_tensor(rows, grad._values() / scale[rows[0]][:, None],
                                           grad.shape, is_coalesced=grad.is_coalesced(),
                                           check_invariants=False)  # ATen's own indices
        else:  # in place: embedding_backward's dense gradient is a fresh V × E tensor
            grad = grad.div_(scale[:, None])
        return grad.to(self.weight.dtype), None

    def plain_weight_grads(self):
        if not self.needs_weight:
            return None, None
        return self._ordinary(self.grad_output.dtype).to(self.weight.dtype), None

    def layerwise_weight_grads(self):
        return self.plain_weight_grads()  # s = 1, as for a Linear (eq. 33)


def _squeeze_height(grads):
    grad_weight, grad_bias = grads
    return None if grad_weight is None else grad_weight.squeeze(2), grad_bias


class _UnitHeight:
    """A 1-D conv kind's primitives as its 2-D kind's on inputs of unit height: the same X
    (every patch is a 1 × k patch), the same G and the same N, so the reduction is exact.

    plane: the 2-D kind's primitives on (B, C, 1, L) input, (·, ·, 1, k) weight.
    """

    def __init__(self, plane):
        self.plane = plane

    def input_grad(self):
        return self.plane.input_grad().squeeze(2)

    def matched_input_signal(self):
        return self.plane.matched_input_signal().squeeze(2)

    def layerwise_input_signal(self):
        return self.plane.layerwise_input_signal().squeeze(2)

    def matched_weight_grads(self):
        return _squeeze_height(self.plane.matched_weight_grads())

    def layerwise_weight_grads(self):
        return _squeeze_height(self.plane.layerwise_weight_grads())

    def plain_weight_grads(self):
        return _squeeze_height(self.plane.plain_weight_grads())


class Conv1dGradients(_UnitHeight):
    """Backward of ``F.conv1d`` as Conv2d's with a unit height (``stride`` etc. 1-tuples;
    ``padding`` a 1-tuple, 'same' or 'valid')."""

    def __init__(self, input, weight, grad_output, stride, padding, dilation, groups,
                 map_size=None, **needs):
        padding = padding if isinstance(padding, str) else (0, padding[0])
        super().__init__(Conv2dGradients(
            input.unsqueeze(2), weight.unsqueeze(2), grad_output.unsqueeze(2), (1, stride[0]),
            padding, (1, dilation[0]), groups,
            map_size=None if map_size is None else (1, *map_size), **needs))


class Conv3dGradients(Conv2dGradients):
    """Backward of ``F.conv3d``: X is every 3-D patch of every sample, per group; N = B.

    Input side: the native 3-D conv backward. Weight side: the Conv2d kind's, on the input
    *folded* so that each (sample, output depth) is one 2-D sample whose channels are the
    k_d depth taps of every input channel (c·k_d + i, the order of the weight's flatten).
    Its 2-D patches are exactly the 3-D patches (same X, same G; the Gram comes from the
    ``im2col_gram`` kernels), but the fold has B·D_out samples where N = B, so it is solved
    with ridge λ/D_out — ``G (A/D_out + λ/D_out·I)⁻¹ = D_out · G (A + λI)⁻¹`` — and the
    result divided by D_out. An amortizer sees the layer's own ``A`` and λ (``_DepthFold``),
    so inputs of different depths share its running Gram.
    """

    def _fusable(self):
        return False  # the weight side runs on the folded 2-D input (below), not this conv

    def layerwise_input_signal(self):
        # Eq. 35 in three dims: ‖W_col‖²_{2,µ} / c with c = D_in·H_in·W_in / s.
        factor = layerwise.column_mean_sq(self.weight, self.groups) \
            * layerwise.sharing_factor(self.grad_output) / math.prod(self.map_size)
        return self._crop(layerwise.divide_signal(self._padded_input_grad(), factor))

    def _folded(self):
        """(input, grad_output, weight) of the 2-D conv the weight side runs on."""
        out, cg, kd, kh, kw = self.weight.shape
        depth, (sd, dd) = self.grad_output.shape[2], (self.stride[0], self.dilation[0])
        front = self.padding[0]
        x = torch.nn.functional.pad(self.x, (0, 0, 0, 0, front, front)) if front else self.x
        taps = [x[:, :, i * dd: i * dd + sd * (depth - 1) + 1: sd] for i in range(kd)]
        x2 = torch.stack(taps, 2).permute(0, 3, 1, 2, 4, 5)       # (B, D_out, C, k_d, H, W)
        x2 = x2.reshape((-1, x.shape[1] * kd) + x.shape[3:])
        gy2 = self.grad_output.transpose(1, 2).reshape((-1, out) + self.grad_output.shape[3:])
        return x2, gy2, self.weight.reshape(out, cg * kd, kh, kw)

    def matched_weight_grads(self):
        if not (self.needs_weight or self.needs_bias):
            return None, None
        if not self.trains_weight:
            return None, _matched_bias_alone(self.grad_output, 1, self.weight.dtype, self.ridge)
        x2, gy2, weight2 = self._folded()
        depth = self.grad_output.shape[2]
        gw, gb = matching.matched_conv2d(x2, gy2, weight2.shape, self.stride[1:],
                                         self.padding[1:], self.dilation[1:], self.groups,
                                         self.has_bias, self.ridge / depth,
                                         amortizer=_DepthFold.of(self.amortizer, depth))
        gw = (gw / depth).reshape(self.weight.shape).to(self.weight.dtype)
        return gw, None if gb is None else (gb / depth).to(self.weight.dtype)

    def _weight_grads_over(self, sharing):
        x2, gy2, weight2 = self._folded()
        gw, gb = layerwise.conv2d_weight_grads(
            x2, gy2, weight2, self.stride[1:], self.padding[1:], self.dilation[1:], self.groups,
            sharing, self.needs_weight, self.needs_bias)
        return None if gw is None else gw.reshape(self.weight.shape), gb

    def plain_weight_grads(self):
        return self._weight_grads_over(1.0)

    def layerwise_weight_grads(self):
        return self._weight_grads_over(layerwise.sharing_factor(self.grad_output))


class _DepthFold:
    """A Conv3d's amortizer as its fold sees it. The fold hands in ``A/D_out``, ridge
    ``λ/D_out`` and energies per folded sample (``|ΔX|²/(B·D_out)``), and divides the step by
    D_out; the running Gram must average the layer's own ``A`` — an average of ``A/D_out``
    over inputs of different depths mixes scales, and an inverse kept from one depth gives
    another's steps D_out-fold too long or short. So each is scaled back by D_out here."""

    def __init__(self, amortizer, depth):
        self._amortizer, self._depth = amortizer, depth

    @classmethod
    def of(cls, amortizer, depth):
        return None if amortizer is None else cls(amortizer, depth)

    def __getattr__(self, name):   # wants_gram, gram_columns, exact_when_cheaper
        return getattr(self._amortizer, name)

    def precondition(self, gram, grad, ridge, energy):
        d = self._depth
        step = self._amortizer.precondition(
            None if gram is None else gram * d, grad, ridge * d,
            lambda direction, columns: energy(direction, columns) * d)
        return step * d     # the fold divides by D_out


class ConvTransposeGradients:
    """Backward of ``F.conv_transpose1d/2d/3d``, matched on the pre-overlap blocks
    (docs/design.md §2).

    The layer is a 1×1 conv — each input location p's block ``Z_p = Mᵀ x_p``, M the weight
    as (C_in/g, C_out/g·k…) per group — followed by the overlap-add (col2im), which has no
    weights. The weight side is the Conv2d kind's on that 1×1 conv, run on the input viewed
    as a 2-D map (its leading spatial dims merged: a 1×1 conv sees only channel vectors):
    X = the input's channel vectors, N = B, and the blocks' signal ``dZ`` = the im2col of
    the output signal (col2im's adjoint, same kernel, stride, padding and dilation) cut to
    the input's size; weight.grad is ``(G (A + λI)⁻¹)ᵀ`` back in the weight's layout. The
    bias is added after the overlap, once per output location: it is matched on its own
    constant-1 input, ``A`` = the output locations, so it gets ``g_b / (locations + λ)``.
    Rule "backmatch-layerwise": the weight is shared once per input location (s counted on
    dZ), the bias once per output location (on dy).
    """

    def __init__(self, input, weight, grad_output, stride, padding, output_padding, dilation,
                 groups, *, has_bias, needs_weight, needs_bias, ridge, amortizer):
        # has_bias unused: the bias, matched apart, needs only needs_bias
        self.input, self.weight, self.grad_output = input, weight, grad_output
        self.stride, self.padding, self.output_padding = stride, padding, output_padding
        self.dilation, self.groups = dilation, groups
        self.ridge, self.amortizer = ridge, amortizer
        self.needs_weight, self.needs_bias = needs_weight, needs_bias
        # The 1×1 conv's input: a view for contiguous and channels-last layouts alike.
        size = input.shape[2:]
        self.pixels = input.reshape(input.shape[:2] + (math.prod(size[:-1]), size[-1]))

    def _pointwise_weight(self, weight=None):
        """The weight (or a tensor in its layout: its gradient) as the 1×1 conv's: Mᵀ per
        group, rows in im2col's channel order (channel, then kernel offset)."""
        weight = self.weight if weight is None else weight
        cin, rows = weight.shape[0], weight[0].numel() * self.groups
        return weight.reshape(self.groups, cin // self.groups, rows // self.groups) \
            .transpose(1, 2).reshape(rows, cin // self.groups, 1, 1)

    def _from_pointwise(self, grad):
        cin = self.weight.shape[0]
        return grad.reshape(self.groups, self.weight[0].numel(), cin // self.groups) \
            .transpose(1, 2).reshape(self.weight.shape)

    def _cut(self, t):
        """``t``'s leading windows over the output, one per input location: output padding
        ≥ stride (allowed when < dilation) leaves windows no input location writes."""
        return t[(..., *map(slice, self.input.shape[2:]))]

    def _block_signal(self):
        """dZ: the signal of every pre-overlap block, (B, C_out·k…, *input size) — the im2col
        matrix of the output signal, k…/stride… times its size: only the column side needs
        it. Patches by ``Tensor.unfold`` per dim (F.unfold is 2-D only)."""
        gy, kernel, dims = self.grad_output, self.weight.shape[2:], self.input.dim() - 2
        blocks = torch.nn.functional.pad(gy, [q for p in reversed(self.padding) for q in (p, p)])
        for i, (k, s, d) in enumerate(zip(kernel, self.stride, self.dilation)):
            blocks = blocks.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]   # its taps last
        blocks = self._cut(blocks.movedim(list(range(2, 2 + dims)), list(range(-dims, 0))))
        return blocks.reshape(gy.shape[:1] + (gy.shape[1] * math.prod(kernel),)
                              + tuple(self.input.shape[2:]))   # explicit: B may be 0

    def _block_sharing(self):
        """``layerwise.sharing_factor`` of dZ without unfolding the signal: dZ holds each
        entry of the signal once per (input location, kernel offset) that writes it, so its
        non-zero count is the signal's per location weighted by that number: the transposed
        conv of ones with an all-ones kernel (col2im of ones, which has no 3-D F.fold)."""
        gy, kernel = self.grad_output, self.weight.shape[2:]
        ones = torch.ones((1, 1) + tuple(self.input.shape[2:]), dtype=torch.float64,
                          device=gy.device)
        writes = torch.convolution(
            ones, ones.new_ones((1, 1) + tuple(kernel)), None, self.stride, self.padding,
            self.dilation, True, self.output_padding, 1)[0, 0]
        count = ((gy != 0).sum((0, 1)).to(torch.float64) * writes).sum()  # exact integers
        blocks = gy.shape[0] * gy.shape[1] * math.prod(kernel)
        return (count.to(accumulate_dtype(gy.dtype)) / max(blocks, 1)).clamp_min(1.0)

    def _native(self, grad_output, weight, mask):
        return torch.ops.aten.convolution_backward(
            grad_output, self.input.to(grad_output.dtype), weight.to(grad_output.dtype),
            [self.weight.shape[1] * self.groups], list(self.stride), list(self.padding),
            list(self.dilation), True, list(self.output_padding), self.groups, mask)

    def input_grad(self):
        return self._native(self.grad_output, self.weight, [True, False, False])[0] \
            .to(self.input.dtype)

    def matched_input_signal(self):
        # Eq. 22: over Σ W² of the outputs each input location writes, borders counted:
        # the conv (the transposed conv's adjoint) of ones with the squared weights.
        work = accumulate_dtype(self.grad_output.dtype)
        ones = torch.ones((1,) + self.grad_output.shape[1:], dtype=work,
                          device=self.input.device)
        touch_sq = self._cut(torch.convolution(
            ones, self.weight.to(work).square(), None, self.stride, self.padding, self.dilation,
            False, [0] * len(self.stride), self.groups))
        return layerwise.divide_signal(self.input_grad().to(work), touch_sq) \
            .to(self.input.dtype)

    def layerwise_input_signal(self):
        factor = layerwise.conv2d_input_factor(
            self._pointwise_weight(), self.groups, self.pixels.shape[2:], self._block_sharing())
        return layerwise.divide_signal(self.input_grad(), factor)

    def matched_weight_grads(self):
        grad_weight = grad_bias = None
        if self.needs_weight:
            pointwise = self._pointwise_weight()
            blocks = (self.grad_output.shape[0], pointwise.shape[0]) + self.pixels.shape[2:]
            # dZ's shape: a zero-stride stand-in (the row side reads dZ only through G).
            dz_stand_in = self.grad_output.new_empty(()).expand(blocks)
            if matching.conv_side(self.pixels, dz_stand_in, pointwise.shape, False,
                                  self.amortizer) == "row":
                # G = dZ Xᵀ is the transposed conv's own weight gradient (in its layout): no
                # im2col of the output signal and no copy of it.
                work = accumulate_dtype(self.grad_output.dtype)
                native = self._native(self.grad_output.to(work), self.weight,
                                      [False, True, False])[1]
                matched, _ = matching.matched_conv2d(
                    self.pixels, dz_stand_in, pointwise.shape, (1, 1), (0, 0), (1, 1),
                    self.groups, False, self.ridge, amortizer=self.amortizer,
                    grad=matching.conv_grad(self._pointwise_weight(native), None, self.groups))
            else:
                matched, _ = Conv2dGradients(
                    self.pixels, pointwise, self._block_signal().reshape(blocks), (1, 1),
                    (0, 0), (1, 1), self.groups, has_bias=False, needs_weight=True,
                    needs_bias=False, ridge=self.ridge,
                    amortizer=self.amortizer).matched_weight_grads()
            grad_weight = self._from_pointwise(matched.to(self.weight.dtype))
        if self.needs_bias:
            grad_bias = _matched_bias_alone(self.grad_output, 1, self.weight.dtype, self.ridge)
        return grad_weight, grad_bias

    def _weight_grads_over(self, weight_sharing, bias_sharing):
        work = accumulate_dtype(self.grad_output.dtype)
        _, grad_weight, grad_bias = self._native(
            self.grad_output.to(work), self.weight, [False, self.needs_weight, self.needs_bias])
        return (None if grad_weight is None
                else (grad_weight / weight_sharing).to(self.weight.dtype),
                None if grad_bias is None else (grad_bias / bias_sharing).to(self.weight.dtype))

    def plain_weight_grads(self):
        return self._weight_grads_over(1.0, 1.0)

    def layerwise_weight_grads(self):
        return self._weight_grads_over(self._block_sharing(),
                                       layerwise.sharing_factor(self.grad_output))
