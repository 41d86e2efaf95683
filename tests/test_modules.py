"""Drop-in behaviour of CLinear / CConv2d: forward identity, state_dict, validation."""
import pytest
import torch
import torch.nn as nn

import consequential_ext as cx


@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, (2, 1), "same", "valid"])
def test_cconv2d_forward_bit_identical(mode, padding):
    torch.manual_seed(1)
    n = nn.Conv2d(4, 6, 3, 1, padding, 1, 2, True, mode)
    c = cx.CConv2d(4, 6, 3, 1, padding, 1, 2, True, mode)
    c.load_state_dict(n.state_dict())
    x = torch.randn(2, 4, 9, 8).to(memory_format=torch.channels_last)
    assert torch.equal(c(x), n(x))
    assert isinstance(c, nn.Conv2d)


def test_clinear_forward_bit_identical_and_state_dict_both_ways():
    n = nn.Linear(7, 5)
    c = cx.CLinear(7, 5)
    c.load_state_dict(n.state_dict())
    x = torch.randn(3, 2, 7)
    assert torch.equal(c(x), n(x))
    n2 = nn.Linear(7, 5)
    n2.load_state_dict(c.state_dict())
    assert torch.equal(n2.weight, n.weight) and torch.equal(n2.bias, n.bias)
    assert set(c.state_dict()) == set(n.state_dict())
    assert isinstance(c, nn.Linear)


# 1e-50 and float32's largest subnormal: 0 or subnormal in a float32 solve, no λ·I at all
# (a zero Gram's step came back NaN).
@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "1e-3", True, None, 1e-50,
                                 1.1754942e-38, 3.5e38])
def test_bad_ridge_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="ridge"):
        cx.CLinear(3, 2, ridge=bad)
    layer = cx.CConv2d(2, 2, 3)
    with pytest.raises(ValueError, match="ridge"):
        layer.ridge = bad
    with pytest.raises(ValueError, match="ridge"):
        cx.functional.clinear(torch.randn(2, 3), torch.randn(2, 3), ridge=bad)
    with pytest.raises(ValueError, match="ridge_solve: ridge"):
        cx.ops.ridge_solve(torch.eye(2), torch.ones(1, 2), bad)


def test_float32s_normal_range_is_the_ridges_range():
    """Its ends are taken: with the smallest normal float32 a zero Gram still solves, G / λ
    (finite), where 1e-50 gave NaN; the largest gives the all-but-zero step."""
    tiny, big = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    small = cx.ops.ridge_solve(torch.zeros(3, 3), torch.ones(2, 3), tiny)
    torch.testing.assert_close(small, torch.full((2, 3), 1 / tiny), rtol=1e-6, atol=0)
    assert cx.CLinear(3, 2, ridge=big).ridge == float(big)
    assert not cx.ops.ridge_solve(torch.eye(2), torch.ones(1, 2), big).abs().gt(1e-30).any()


def test_numpy_float_ridges_are_floats():
    np = pytest.importorskip("numpy")
    for value in (np.float32(0.25), np.float64(0.25), np.int64(2)):
        layer = cx.CLinear(3, 2, ridge=value)
        assert type(layer.ridge) is float and layer.ridge == float(value)
        torch.testing.assert_close(cx.ops.ridge_solve(torch.eye(2), torch.ones(1, 2), value),
                                   torch.full((1, 2), 1 / (1 + float(value))))
    with pytest.raises(ValueError, match="ridge"):
        cx.CLinear(3, 2, ridge=np.float32("nan"))


@pytest.mark.parametrize("bad", ["Consequential", "adam", None, 3])
def test_bad_rule_is_a_clear_error(bad):
    with pytest.raises(ValueError, match="rule"):
        cx.CConv2d(2, 2, 3, rule=bad)
    with pytest.raises(ValueError, match="rule"):
        cx.consequentialize(nn.Linear(2, 2), rule=bad)


def test_bad_padding_string_is_a_clear_error():
    with pytest.raises(ValueError, match="padding"):
        cx.functional.cconv2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), padding="full")


def test_repr_shows_rule_and_ridge():
    assert "rule='consequential'" in repr(cx.CLinear(2, 3, ridge=0.5))
