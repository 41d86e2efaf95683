"""Subclasses of nn.Linear / nn.Conv2d: matched through the F.linear / F.conv2d call their
forward makes with their own weight, on the input actually passed to it (routing.py); those
that transform the weight first stay plain, named in the warning (docs/design.md §5)."""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import consequential_ext as cx
from relative_error import rel_err
from conv_nd_reference import matched_conv
from matched_reference import matched_conv2d, matched_linear

RIDGE = 1e-3


def same_pads(size, kernel, stride, dilation):
    """TensorFlow 'SAME' padding (left, right) per spatial dim, last dim first (F.pad order)."""
    pads = []
    for i, k, s, d in reversed(list(zip(size, kernel, stride, dilation))):
        total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
        pads += [total // 2, total - total // 2]
    return pads


class Conv2dSame(nn.Conv2d):
    """timm's Conv2dSame pattern: pads 'SAME' itself (unevenly, by the input size), then calls
    F.conv2d with its own weight and no padding."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, padding=0, **kwargs)

    def forward(self, x):
        x = F.pad(x, same_pads(x.shape[-2:], self.kernel_size, self.stride, self.dilation))
        return F.conv2d(x, self.weight, self.bias, self.stride, (0, 0), self.dilation,
                        self.groups)


class Conv1dSame(nn.Conv1d):
    """Conv2dSame's pattern in one dim: pads itself, then calls F.conv1d with its own weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, padding=0, **kwargs)

    def forward(self, x):
        x = F.pad(x, same_pads(x.shape[-1:], self.kernel_size, self.stride, self.dilation))
        return F.conv1d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Conv3dSame(nn.Conv3d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, padding=0, **kwargs)

    def forward(self, x):
        x = F.pad(x, same_pads(x.shape[-3:], self.kernel_size, self.stride, self.dilation))
        return F.conv3d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class ScaledInputLinear(nn.Linear):
    def forward(self, x):
        return super().forward(0.5 * x)


class StdConv2d(nn.Conv2d):
    """Weight standardisation (timm's StdConv2d pattern): transforms its weight first."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class CountingLinear(nn.Linear):
    """State changed by forward: the probe must not touch it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def _convert_silently(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return cx.consequentialize(model, ridge=RIDGE, **kwargs)


@pytest.mark.parametrize("conf", [
    dict(in_channels=6, out_channels=4, kernel_size=3, stride=2, groups=2),
    dict(in_channels=5, out_channels=5, kernel_size=(3, 2), stride=2, groups=5, bias=False),
    dict(in_channels=3, out_channels=7, kernel_size=2, dilation=2, stride=(1, 2)),
])
def test_conv2d_same_is_matched_on_its_padded_input(conf):
    torch.manual_seed(1)
    layer = Conv2dSame(**conf, dtype=torch.float64)
    plain = Conv2dSame(**conf, dtype=torch.float64)
    plain.load_state_dict(layer.state_dict())
    _convert_silently(nn.Sequential(layer))
    assert type(layer).__name__ == "CConv2dSame" and isinstance(layer, Conv2dSame)
    x = torch.randn(2, conf["in_channels"], 9, 8, dtype=torch.float64)
    y = layer(x)
    assert torch.equal(y, plain(x))
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    padded = F.pad(x, same_pads(x.shape[-2:], layer.kernel_size, layer.stride, layer.dilation))
    gw, gb = matched_conv2d(padded, layer.weight, layer.bias, grad_out, layer.stride, 0,
                            layer.dilation, layer.groups, RIDGE)
    assert rel_err(layer.weight.grad, gw) < 1e-8
    if layer.bias is not None:
        assert rel_err(layer.bias.grad, gb) < 1e-8


@pytest.mark.parametrize("cls,conf,shape", [
    (Conv1dSame, dict(in_channels=6, out_channels=4, kernel_size=4, stride=3, groups=2), (3, 6, 11)),
    (Conv1dSame, dict(in_channels=3, out_channels=5, kernel_size=3, dilation=2, bias=False),
     (3, 10)),                                                          # unbatched
    (Conv3dSame, dict(in_channels=4, out_channels=6, kernel_size=(2, 3, 2), stride=(1, 2, 2),
                      groups=2), (2, 4, 5, 7, 6)),
], ids=["conv1d-grouped", "conv1d-unbatched", "conv3d"])
def test_conv1d_and_conv3d_same_are_matched_on_their_padded_input(cls, conf, shape):
    """A Conv1d / Conv3d subclass that pads itself and calls F.conv1d / F.conv3d with its own
    weight is matched on the input it passes (it stayed plain, and the warning's hint to
    register it with cx.CConv1d would have left its F.conv1d call plain too)."""
    torch.manual_seed(4)
    layer = cls(**conf, dtype=torch.float64)
    plain = cls(**conf, dtype=torch.float64)
    plain.load_state_dict(layer.state_dict())
    _convert_silently(nn.Sequential(layer))
    assert type(layer).__name__ == f"C{cls.__name__}" and cx.coverage(layer).share == 1.0
    x = torch.randn(shape, dtype=torch.float64)
    y = layer(x)
    assert torch.equal(y, plain(x))
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    dims = layer.weight.dim() - 2
    padded = F.pad(x, same_pads(x.shape[-dims:], layer.kernel_size, layer.stride,
                                layer.dilation))
    gw, gb = matched_conv(padded, layer.weight, layer.bias, grad_out, layer.stride, 0,
                          layer.dilation, layer.groups, RIDGE)
    assert rel_err(layer.weight.grad, gw) < 1e-8
    if layer.bias is not None:
        assert rel_err(layer.bias.grad, gb) < 1e-8


class ChannelsLastConv1d(nn.Conv1d):
    """Hugging Face's LASR / Parakeet CTC heads: (batch, time, channels) in and out."""
    def forward(self, hidden_states):
        return super().forward(hidden_states.transpose(1, 2)).transpose(1, 2)


def test_conv1d_taking_channels_last_is_matched_on_the_input_it_passes():
    """The probe tries channels last where the forward fails on channels first: such a head
    stayed plain ('Invalid channel dimensions')."""
    torch.manual_seed(6)
    layer = ChannelsLastConv1d(6, 4, 3, padding=1, dtype=torch.float64)
    plain = ChannelsLastConv1d(6, 4, 3, padding=1, dtype=torch.float64)
    plain.load_state_dict(layer.state_dict())
    _convert_silently(nn.Sequential(layer))
    assert type(layer).__name__ == "CChannelsLastConv1d" and cx.coverage(layer).share == 1.0
    x = torch.randn(2, 7, 6, dtype=torch.float64)
    y = layer(x)
    assert torch.equal(y, plain(x))
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    gw, gb = matched_conv(x.transpose(1, 2), layer.weight, layer.bias, grad_out.transpose(1, 2),
                          layer.stride, layer.padding, layer.dilation, layer.groups, RIDGE)
    assert rel_err(layer.weight.grad, gw) < 1e-8 and rel_err(layer.bias.grad, gb) < 1e-8


def test_linear_subclass_is_matched_on_the_input_it_passes():
    torch.manual_seed(2)
    layer = ScaledInputLinear(7, 3, dtype=torch.float64)
    _convert_silently(nn.Sequential(layer))
    x = torch.randn(4, 5, 7, dtype=torch.float64)
    grad_out = torch.randn(4, 5, 3, dtype=torch.float64)
    layer(x).backward(grad_out)
    gw, gb = matched_linear(0.5 * x, layer.weight, layer.bias, grad_out, RIDGE)
    assert rel_err(layer.weight.grad, gw) < 1e-8 and rel_err(layer.bias.grad, gb) < 1e-8


def test_efficientnet_like_stem_converts_without_warnings():
    """tf_efficientnet's pattern: a Conv2dSame stem and stride-2 depthwise Conv2dSame."""
    torch.manual_seed(3)
    model = nn.Sequential(Conv2dSame(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8),
                          nn.SiLU(), Conv2dSame(8, 8, 5, stride=2, groups=8, bias=False),
                          nn.Conv2d(8, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(6, 4))
    _convert_silently(model)
    report = cx.coverage(model)
    assert report.plain == () and len(report.matched) == 4
    assert report.matched_params == report.total_params - 16       # the batch norm's γ, β
    model(torch.randn(2, 3, 11, 10)).square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_weight_transforming_subclasses_stay_plain_and_are_named():
    torch.manual_seed(4)
    counting = CountingLinear(4, 4)
    model = nn.Sequential(StdConv2d(3, 4, 3), nn.Flatten(), counting,
                          nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)))
    with pytest.warns(UserWarning) as caught:
        cx.consequentialize(model)
    text = str(caught[0].message)
    assert "0 (a subclass of Conv2d: its forward does not pass its own weight to F.conv2d" in text
    assert "3.parametrizations.weight (the parametrization of a weight" in text
    assert type(model[0]) is StdConv2d and isinstance(counting, cx.registry.CFunctionalCall)
    assert counting.calls == 0                      # the probe ran on a meta copy


def test_failing_probe_leaves_the_layer_plain_with_the_error():
    class NeedsTwoInputs(nn.Linear):
        def forward(self, x, scale):
            return super().forward(x) * scale
    with pytest.warns(UserWarning, match="0 \\(a subclass of Linear: its forward failed on a "
                                         "probe input of shape \\(2, 3\\)"):
        cx.consequentialize(nn.Sequential(NeedsTwoInputs(3, 2)))


# Fresh Gram every step, no averaging, damping or step safeguard: the amortised solve is exact.
AMORTIZE_EXACTLY = dict(every=1, decay=0.0, damping=0.0, gram_oversample=None,
                        safeguard_columns=None, exact_when_cheaper=False)


def test_rule_sgd_and_amortize():
    torch.manual_seed(5)
    plain = Conv2dSame(4, 6, 3, stride=2)
    layer = Conv2dSame(4, 6, 3, stride=2)
    layer.load_state_dict(plain.state_dict())
    _convert_silently(nn.Sequential(layer), rule="sgd")
    x = torch.randn(3, 4, 7, 7)
    layer(x).square().sum().backward()
    plain(x).square().sum().backward()
    assert torch.equal(layer.weight.grad, plain.weight.grad)
    # An EMA without memory (decay 0, refactorised every step) is the exact solve.
    exact = Conv2dSame(4, 6, 3, stride=2)
    exact.load_state_dict(plain.state_dict())
    _convert_silently(nn.Sequential(exact))
    amortized = cx.amortize(_convert_silently(nn.Sequential(layer)), **AMORTIZE_EXACTLY)[0]
    for m in (exact, amortized):
        m.zero_grad()
        m(x).square().sum().backward()
    # float32 both: equal to the solve's rounding (norm-wise; see relative_error.py).
    assert rel_err(amortized.weight.grad, exact.weight.grad) < 1e-5


class Conv3DSimple(nn.Conv3d):          # as torchvision's video ResNets: a static method only
    @staticmethod
    def get_downsample_stride(stride):
        return stride, stride, stride


class Conv1dSub(nn.Conv1d):
    pass


class EmbeddingSub(nn.Embedding):
    pass


class TransposeSub(nn.ConvTranspose2d):
    pass


class NoisyConv3d(nn.Conv3d):
    def forward(self, x):
        return super().forward(x) + 1.0


class NoisyTranspose(nn.ConvTranspose2d):
    def forward(self, x, output_size=None):
        return super().forward(x, output_size) + 1.0


THIN = [(Conv3DSimple, nn.Conv3d, (3, 4, 3), lambda: torch.randn(2, 3, 4, 5, 5)),
        (Conv1dSub, nn.Conv1d, (3, 4, 3), lambda: torch.randn(3, 3, 9)),
        (EmbeddingSub, nn.Embedding, (10, 4), lambda: torch.randint(0, 10, (7,))),
        (TransposeSub, nn.ConvTranspose2d, (3, 2, 3), lambda: torch.randn(2, 3, 4, 4))]


@pytest.mark.parametrize("thin,base,args,make_input", THIN, ids=lambda v: getattr(v, "__name__", ""))
def test_thin_subclasses_convert_as_their_base_and_pickle(thin, base, args, make_input, tmp_path):
    # A subclass adding no forward of its own is its base: converted with the base's C-class
    # over it, the same gradients as the base's C-layer, and it saves and loads.
    torch.manual_seed(5)
    layer = thin(*args).double()
    twin = base(*args).double()
    twin.load_state_dict(layer.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cx.consequentialize(layer), cx.consequentialize(twin)
    assert isinstance(layer, thin) and type(layer) is not thin and cx.coverage(layer).share == 1.0
    x = make_input()
    x = x.double() if x.is_floating_point() else x
    for m in (layer, twin):
        m(x).square().mean().backward()
    for p, q in zip(layer.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert type(loaded) is type(layer) and isinstance(loaded, thin)


def test_conv3d_subclass_with_its_own_forward_is_matched_through_its_conv3d_call():
    torch.manual_seed(6)
    layer, twin = NoisyConv3d(2, 3, 3).double(), cx.CConv3d(2, 3, 3, ridge=RIDGE).double()
    twin.load_state_dict(layer.state_dict())
    _convert_silently(nn.Sequential(layer))
    assert cx.coverage(layer).share == 1.0
    x = torch.randn(2, 2, 4, 5, 5, dtype=torch.float64)
    y = layer(x)
    y.backward(gy := torch.randn_like(y))
    twin(x).backward(gy)
    for p, q in zip(layer.parameters(), twin.parameters(), strict=True):
        assert rel_err(p.grad, q.grad) < 1e-12


def test_conv_subclass_with_its_own_forward_stays_plain_and_registering_it_linear_like_is_refused():
    model = nn.Sequential(NoisyTranspose(2, 3, 3))
    with pytest.warns(UserWarning, match="make a class of it and cx.CConvTranspose2d, in that order"):
        cx.consequentialize(model)
    assert cx.coverage(model).share == 0.0
    with pytest.raises(TypeError, match="NoisyTranspose is a ConvTranspose2d, not linear-like: "
                                        "pass c_type"):
        cx.register_layer(NoisyTranspose)
    with pytest.raises(TypeError, match="NoisyConv3d is a Conv3d, not linear-like: pass c_type"):
        cx.register_layer(NoisyConv3d)


class BiasAfterLinear(nn.Linear):
    """Adds its bias after the routed F.linear: the bias never reaches the C-layer's call."""

    def forward(self, x):
        return F.linear(x, self.weight) + self.bias


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_subclass_using_its_bias_outside_the_routed_call_is_named(wrapped):
    """The first forward's graph check runs for a converted subclass (its forward is user
    code) even in a model of torch containers only, and names the layer whose bias keeps the
    ordinary gradient (the add outside its routed call); the weight is still matched, on its
    own (no 1-row)."""
    torch.manual_seed(4)
    layer = BiasAfterLinear(4, 3, dtype=torch.float64)
    model = nn.Sequential(layer) if not wrapped else nn.Sequential(nn.Sequential(layer))
    cx.consequentialize(model, ridge=RIDGE)
    x = torch.randn(6, 4, dtype=torch.float64)
    grad_out = torch.randn(6, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(x).backward(grad_out)
    said = [str(w.message) for w in caught if "also used outside" in str(w.message)]
    name = "0.0" if wrapped else "0"
    assert len(said) == 1 and f": {name} (AddBackward0)." in said[0], \
        [str(w.message) for w in caught]
    torch.testing.assert_close(layer.bias.grad, grad_out.sum(0))
    gw, _ = matched_linear(x, layer.weight, None, grad_out, RIDGE)
    assert rel_err(layer.weight.grad, gw) < 1e-8


def test_a_torch_only_model_installs_no_graph_check():
    """Only torch's and this library's modules: no forward hook (nn.TransformerEncoderLayer's
    inference fast path stays on)."""
    model = cx.consequentialize(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert not model._forward_hooks
