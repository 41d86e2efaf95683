"""Bad (or merely unusual) input at the public boundary: what nn / F accept works the same,
and what the matched backward cannot take is refused in forward with an error naming the
argument — never an exception inside backward, never a silently wrong gradient."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import consequential_ext as cx
import conv_nd_reference as ref
import matched_reference

CF = cx.functional
RIDGE = 1e-2


def _matched_grads(layer, x):
    x = x.detach().double().requires_grad_()
    y = layer(x)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    return layer.weight.grad, layer.bias.grad, grad_out


# (layer with NumPy / 1-element geometry, input shape, the geometry as plain int tuples)
GEOMETRY_CASES = [
    (lambda: cx.CConv2d(4, 6, 3, groups=np.int64(2)), (2, 4, 6, 6), dict(groups=2)),
    (lambda: cx.CConv2d(3, 4, 3, padding=np.int64(1)), (2, 3, 6, 6), dict(padding=(1, 1))),
    (lambda: cx.CConv2d(3, 4, 3, padding=(1,)), (2, 3, 6, 6), dict(padding=(1, 1))),
    (lambda: cx.CConv2d(3, 4, 3, stride=(2,), dilation=(2,)), (2, 3, 9, 9),
     dict(stride=(2, 2), dilation=(2, 2))),
    (lambda: cx.CConv2d(4, 4, 3, padding=np.int64(1), groups=np.int64(2),
                        padding_mode="reflect"), (2, 4, 6, 6), dict(padding=(1, 1), groups=2)),
    (lambda: cx.CConv1d(4, 6, 3, groups=np.int64(2)), (2, 4, 8), dict(groups=2)),
    (lambda: cx.CConv3d(3, 4, 3, padding=np.int64(1)), (2, 3, 4, 4, 4),
     dict(padding=(1, 1, 1))),
]


@pytest.mark.parametrize("case", range(len(GEOMETRY_CASES)))
def test_numpy_and_one_element_conv_geometry_trains_like_plain_ints(case):
    """nn.Conv*d takes NumPy integers and 1-element sequences (F.conv expands them); the
    C-layers' backward used to fail on them (the Gram op's argument checks, in backward)."""
    make, shape, plain = GEOMETRY_CASES[case]
    layer = make().double()
    x = torch.randn(shape, dtype=torch.float64)
    gw, gb, grad_out = _matched_grads(layer, x)
    geometry = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                    groups=layer.groups)
    geometry.update(plain)
    want_w, want_b = ref.matched_conv(x, layer.weight, layer.bias, grad_out,
                                      geometry["stride"], geometry["padding"],
                                      geometry["dilation"], geometry["groups"], layer.ridge,
                                      padding_mode=layer.padding_mode)
    ref.close(gw, want_w)
    ref.close(gb, want_b)


def test_numpy_groups_of_a_transposed_conv_trains_like_plain_ints():
    layer = cx.CConvTranspose2d(4, 6, 3, stride=np.int64(2), groups=np.int64(2)).double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    gw, gb, grad_out = _matched_grads(layer, x)
    want_w, want_b = ref.matched_conv_transpose(x, layer.weight, layer.bias, grad_out, (2, 2),
                                                (0, 0), (0, 0), 2, (1, 1), layer.ridge)
    ref.close(gw, want_w)
    ref.close(gb, want_b)


def test_functional_conv_takes_numpy_geometry():
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    w = torch.randn(6, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = CF.cconv2d(x, w, b, stride=np.int64(2), padding=(np.int64(1),), groups=np.int64(2),
                   ridge=RIDGE)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    want_w, want_b = matched_reference.matched_conv2d(x, w, b, grad_out, (2, 2), (1, 1),
                                                      (1, 1), 2, RIDGE)
    ref.close(w.grad, want_w)
    ref.close(b.grad, want_b)


@pytest.mark.parametrize("make, shape", [
    (lambda dtype: cx.CLinear(3, 2, dtype=dtype), (5, 3)),
    (lambda dtype: cx.CConv1d(3, 2, 3, dtype=dtype), (2, 3, 6)),
    (lambda dtype: cx.CConv2d(3, 2, 3, dtype=dtype), (2, 3, 6, 6)),
    (lambda dtype: cx.CConvTranspose2d(3, 2, 3, dtype=dtype), (2, 3, 4, 4)),
])
def test_complex_tensors_are_refused_in_forward(make, shape):
    """Matched gradients are defined for real tensors: a complex CLinear / CConv1d used to
    drop the gradient's imaginary part silently, CConv2d / CConvTranspose2d failed in
    backward. rule='sgd' (nn's gradients) still takes them."""
    x = torch.randn(shape, dtype=torch.complex64)
    with pytest.raises(TypeError, match="input is torch.complex64: matched gradients"):
        make(torch.complex64)(x)
    layer = make(torch.complex64)
    layer.rule = "sgd"
    layer(x).abs().square().sum().backward()
    assert layer.weight.grad.imag.abs().max() > 0


def test_a_complex_weight_is_named():
    with pytest.raises(TypeError, match="input is torch.complex64"):
        CF.clinear(torch.randn(4, 3, dtype=torch.complex64),
                   torch.randn(2, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="bias is torch.complex64"):
        CF.clinear(torch.randn(4, 3), torch.randn(2, 3),
                   torch.randn(2, dtype=torch.complex64))


@pytest.mark.parametrize("shape", [(1, 4), (), (1,), (5, 4), (3,)])
def test_clinear_bias_must_be_one_per_output(shape):
    """F.linear broadcasts any bias; the matched solve gives one entry per output (a (1, out)
    bias used to fail inside backward, () and (1,) got a sum of per-output gradients)."""
    x, w = torch.randn(5, 3), torch.randn(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match=r"bias must be of shape \(out_features,\) = \(4,\)"):
        CF.clinear(x, w, torch.randn(shape, requires_grad=True))


@pytest.mark.parametrize("shape", [(1, 4), (), (1,)])
def test_clinear_takes_a_frozen_broadcast_bias_as_a_constant(shape):
    """A frozen bias is a constant offset, no row of X (docs/design.md §2): whatever shape
    F.linear broadcasts, W gets the matched gradient of the input rows alone."""
    x = torch.randn(7, 3, dtype=torch.float64)
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    offset = torch.randn(shape, dtype=torch.float64)
    y = CF.clinear(x, w, offset, ridge=RIDGE)
    assert torch.equal(y, torch.nn.functional.linear(x, w, offset))
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    want_w, _ = matched_reference.matched_linear(x, w, None, grad_out, RIDGE)
    ref.close(w.grad, want_w)


@pytest.mark.parametrize("shape", [(1, 4), ()])
def test_clinear_takes_a_trained_broadcast_bias_without_grad_mode(shape):
    """An eval forward (no_grad, inference_mode) solves for nothing: whatever bias F.linear
    broadcasts runs, as in nn (the shape check is for the backward's solve)."""
    x, w = torch.randn(5, 3), torch.randn(4, 3, requires_grad=True)
    b = torch.randn(shape, requires_grad=True)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert torch.equal(CF.clinear(x, w, b), torch.nn.functional.linear(x, w, b))


class _Dense(nn.Module):
    """A linear-like layer with its weight stored (in, out), as Hugging Face's Conv1D."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(n_in, n_out, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(n_out, dtype=torch.float64))

    def forward(self, x):
        return x @ self.kernel + self.bias


def test_a_linear_like_layer_registered_without_transposed_is_named_in_forward():
    """x @ W runs whatever ``transposed`` says; backward used to fail inside autograd."""
    cx.register_layer(_Dense, weight="kernel")      # forgot transposed=True
    try:
        model = cx.consequentialize(nn.Sequential(_Dense(3, 4)))
        with pytest.raises(ValueError, match="needs transposed=True"):
            model(torch.randn(5, 3, dtype=torch.float64))
        cx.register_layer(_Dense, weight="kernel", transposed=True)
        model = cx.consequentialize(nn.Sequential(_Dense(3, 4)), ridge=RIDGE)
        x = torch.randn(5, 3, dtype=torch.float64)
        y = model(x)
        grad_out = torch.randn_like(y)
        y.backward(grad_out)
        layer = model[0]
        want_w, want_b = matched_reference.matched_linear(x, layer.kernel.T, layer.bias,
                                                          grad_out, RIDGE)
        ref.close(layer.kernel.grad, want_w.T)
        ref.close(layer.bias.grad, want_b)
    finally:
        from consequential_ext import registry
        registry._KINDS.pop(registry._qualified_name(_Dense), None)


@pytest.mark.parametrize("call, name", [
    (lambda: CF.clinear(torch.randn(2, 3), [[1.0] * 3]), "weight"),
    (lambda: CF.clinear(torch.randn(2, 3), None), "weight"),
    (lambda: CF.cconv2d([[1.0]], torch.randn(2, 3, 3, 3)), "input"),
    (lambda: CF.cconv2d(torch.randn(1, 3, 5, 5), [[1.0]]), "weight"),
    (lambda: CF.cconv_transpose2d(torch.randn(1, 3, 5, 5), [[1.0]]), "weight"),
    (lambda: CF.clinear_like(torch.randn(2, 3), torch.randn(4, 3), None, None), "module_forward"),
    (lambda: cx.ops.ridge_solve([[1.0]], torch.randn(2, 1), 0.1), "gram"),
    (lambda: cx.ops.ridge_solve(torch.eye(2), [[1.0, 2.0]], 0.1), "grad"),
    (lambda: cx.ops.im2col_gram(torch.randn(1, 2, 4, 4), 3, bias="no"), "bias"),
])
def test_non_tensor_arguments_are_named(call, name):
    with pytest.raises(TypeError, match=name):
        call()


def test_an_empty_conv_weight_gets_torchs_error_not_an_index_error():
    with pytest.raises(RuntimeError, match="expected weight to be at least 1"):
        CF.cconv2d(torch.randn(2, 3, 5, 5), torch.randn(0, 3, 3, 3))


def test_ops_take_numpy_integers_and_one_bias_meaning_on_every_backend():
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    gram = cx.ops.im2col_gram(x, np.int64(3), stride=(np.int64(1), 1), groups=np.int64(2),
                              bias=np.True_)
    cols = torch.nn.functional.unfold(x, 3)                           # (B, C·9, L)
    cols = cols.reshape(2, 2, 18, -1).permute(1, 2, 0, 3).reshape(2, 18, -1)
    cols = torch.cat([cols, torch.ones(2, 1, cols.shape[-1], dtype=cols.dtype)], 1)
    ref.close(gram, cols @ cols.transpose(1, 2))
    for xx in (x, x.clone().requires_grad_()):      # compiled op, then the reference
        with pytest.raises(TypeError, match="bias must be a bool"):
            cx.ops.im2col_gram(xx, 3, bias="no")


def test_cembedding_repr_shows_rule_and_ridge():
    layer = cx.CEmbedding(10, 3, padding_idx=0, rule="backmatch", ridge=0.05)
    assert repr(layer) == "CEmbedding(10, 3, padding_idx=0, rule='backmatch', ridge=0.05)"


def _named_model():
    model = nn.Sequential()
    model.add_module("body", nn.Linear(3, 4))
    model.add_module("classifier", nn.Linear(4, 2))
    return model


def test_include_exclude_names_that_select_nothing_are_warned_of():
    with pytest.warns(UserWarning, match=r"exclude='clasifier' matches no module"):
        model = cx.consequentialize(_named_model(), exclude=["clasifier", "body"])
    assert type(model.classifier) is cx.CLinear and type(model.body) is nn.Linear
    with pytest.warns(UserWarning, match=r"include='head\*' matches no module"):
        cx.consequentialize(_named_model(), include="head*")
    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # names and types that select: silent
        cx.consequentialize(_named_model(), exclude=["class*", nn.Conv2d], include=["*"])


def test_an_exact_name_with_glob_characters_selects_its_module():
    """A ModuleDict key may hold "[" / "]": the exact name selects the module (fnmatch alone
    read it as a character class: the exclude did nothing, and was warned of as misspelt)."""
    model = nn.Sequential(nn.ModuleDict({"proj[0]": nn.Linear(3, 3),
                                         "proj[1]": nn.Linear(3, 2)}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cx.consequentialize(model, exclude="0.proj[1]")
    assert type(model[0]["proj[1]"]) is nn.Linear and type(model[0]["proj[0]"]) is cx.CLinear


@pytest.mark.parametrize("kwargs", [
    dict(every=np.int64(10)), dict(every=10, gram_every=np.int64(5)),
    dict(decay=np.float32(0.5)), dict(damping=np.float32(0.25)),
    dict(gram_oversample=np.float32(8)), dict(safeguard_columns=np.int64(64)),
])
def test_amortize_takes_numpy_scalars_as_ridge_and_lr_do(kwargs):
    plain = {k: v.item() if isinstance(v, np.generic) else v for k, v in kwargs.items()}
    a = cx.amortize(nn.Sequential(cx.CLinear(3, 4)), **kwargs)[0].amortizer
    b = cx.amortize(nn.Sequential(cx.CLinear(3, 4)), **plain)[0].amortizer
    assert repr(a) == repr(b)
    assert type(a.every) is int and type(a.gram_every) is int


@pytest.mark.parametrize("value", ["False", "no", None, 2])
def test_optimizers_refuse_a_nesterov_that_is_not_a_bool(value):
    """bool("False") is True: a string from a config silently switched Nesterov on."""
    params = [nn.Parameter(torch.randn(3))]
    for cls in (cx.optim.LARS, cx.optim.LSALR):
        with pytest.raises(ValueError, match="nesterov must be True or False"):
            cls(params, lr=0.1, momentum=0.9, nesterov=value)
    opt = cx.optim.LARS(params, lr=0.1, momentum=0.9, nesterov=np.True_)
    assert opt.param_groups[0]["nesterov"] is True


@pytest.mark.parametrize("rule", ["consequential", "backmatch", "backmatch-layerwise"])
def test_a_meta_device_training_step_runs_for_its_shapes_and_flops(rule):
    """Shapes-only runs (a model built on the meta device, a step's FLOPs counted) used to
    fail in the C-layers' backward: meta has no autocast to ask about."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                              nn.Linear(64, 2), nn.ReLU(), nn.Linear(2, 2))
    cx.consequentialize(model, rule=rule)
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(2, 3, 6, 6, device="meta")).sum().backward()
    for p in model.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.is_meta
    assert counter.get_total_flops() > 0


def test_register_layer_refuses_a_transposed_that_is_not_a_bool():
    with pytest.raises(TypeError, match="transposed must be True or False; got 'False'"):
        cx.register_layer(_Dense, weight="kernel", transposed="False")


@pytest.mark.parametrize("padding_idx", ["2", 2.5])
def test_cembedding_names_a_padding_idx_that_is_not_an_int(padding_idx):
    with pytest.raises(TypeError, match="padding_idx must be an int or None"):
        CF.cembedding(torch.tensor([1, 2]), torch.randn(10, 3), padding_idx=padding_idx)


def test_a_complex_embedding_is_refused_in_forward():
    """As CLinear's: CEmbedding's backward works in a real dtype, so a complex table used to
    get a gradient without its imaginary part, silently (nn refuses to differentiate it).
    rule='sgd' is nn's embedding, which a no-grad forward may still use."""
    ids = torch.tensor([1, 1, 2])
    with pytest.raises(TypeError, match="weight is torch.complex64: matched gradients"):
        cx.CEmbedding(5, 3, dtype=torch.complex64)(ids)
    with pytest.raises(TypeError, match="weight is torch.complex64: matched gradients"):
        CF.cembedding(ids, torch.randn(5, 3, dtype=torch.complex64, requires_grad=True))
    with torch.no_grad():
        table = torch.randn(5, 3, dtype=torch.complex64)
        assert torch.equal(CF.cembedding(ids, table, rule="sgd"), table[ids])


def test_cembedding_names_a_weight_that_is_no_tensor():
    """padding_idx used to read the table's shape first: an AttributeError."""
    with pytest.raises(TypeError, match="weight must be a Tensor; got list"):
        CF.cembedding(torch.tensor([1]), [[1.0, 2.0]], padding_idx=0)


def test_the_gram_ops_refuse_float8_on_every_backend():
    """The compiled kernels refused float8 x from C++, the reference took it: one TypeError
    naming x now, whichever backend runs."""
    x = torch.randn(1, 2, 5, 5).to(torch.float8_e4m3fn)
    for backend in cx.ops.available_backends("im2col_gram", "cpu"):    # cpu, reference
        with cx.ops.use_backend(backend):
            with pytest.raises(TypeError, match="im2col_gram: x must be float16, bfloat16, "
                                                "float32 or float64, got torch.float8_e4m3fn"):
                cx.ops.im2col_gram(x, 3)
            with pytest.raises(TypeError, match="x must be float16"):
                cx.ops.conv_weight_grad(x, torch.randn(1, 3, 3, 3).to(x.dtype), 3)


@pytest.mark.parametrize("shape, kwargs, match", [
    # F.conv2d refuses an empty map; the compiled Gram took it, the reference and the
    # compiled G failed inside unfold / ATen
    ((2, 3, 0, 0), {"padding": 1}, "non-empty spatial dims"),
    # the kernels' int64 sums wrapped: "does not fit" for a 1×1 kernel
    ((1, 2, 3, 3), {"padding": 2 ** 62}, "padding and dilation"),
    ((1, 2, 3, 3), {"padding": 2 ** 40}, "more output positions than int64 counts"),
])
def test_conv_gram_ops_name_an_empty_map_or_an_overflowing_geometry(shape, kwargs, match):
    x = torch.randn(shape)
    for backend in cx.ops.available_backends("im2col_gram", "cpu"):    # cpu, reference
        with cx.ops.use_backend(backend):
            with pytest.raises(ValueError, match=match):
                cx.ops.im2col_gram(x, 1, bias=True, **kwargs)
            with pytest.raises(ValueError, match=match):
                cx.ops.conv_gram_grad(x, torch.randn(shape[0], 4, 2, 2), 1, bias=True, **kwargs)
    # the geometry far out but its output small still works
    gram = cx.ops.im2col_gram(torch.randn(1, 2, 3, 3), 1, stride=2 ** 62, padding=2 ** 40)
    assert gram.shape == (2, 2) and gram.abs().sum() == 0    # the one patch lies in padding
