import pytest
import torch
from torch import nn

from mmkernels.nn import ScaleBiasLinear


def _base(bias, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(24, 40, bias=bias)


@pytest.mark.parametrize("form", ["output", "input"])
@pytest.mark.parametrize("bias", [False, True])
def test_starts_as_the_base_layer_and_matches_the_formula(form, bias):
    base = _base(bias)
    x = torch.randn(3, 5, 24)
    expected_base = base(x)
    layer = ScaleBiasLinear(base, form)
    torch.testing.assert_close(layer(x), expected_base)
    with torch.no_grad():
        layer.scale.uniform_(0.5, 1.5)
        layer.bias.normal_()
    w, b0 = base.weight.double(), (base.bias.double() if bias else torch.zeros(40, dtype=torch.float64))
    s, b, xd = layer.scale.double(), layer.bias.double(), x.double()
    if form == "output":
        expected = s * (xd @ w.T + b0 + b)
    else:
        expected = (xd * s) @ w.T + b0 + b
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", ["output", "input"])
@pytest.mark.parametrize("bias", [False, True])
def test_merge_is_exact_in_float64(form, bias):
    layer = ScaleBiasLinear(_base(bias).double(), form)
    layer.scale.data, layer.bias.data = layer.scale.data.double(), layer.bias.data.double()
    with torch.no_grad():
        layer.scale.uniform_(0.5, 1.5)
        layer.bias.normal_()
    x = torch.randn(7, 24, dtype=torch.float64)
    merged = layer.merge()
    torch.testing.assert_close(merged(x), layer(x), rtol=1e-12, atol=1e-12)


def test_only_scale_and_bias_train():
    layer = ScaleBiasLinear(_base(True), "output")
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"scale", "bias"}
    x = torch.randn(4, 24)
    layer(x).square().sum().backward()
    assert layer.weight.grad is None and layer.scale.grad is not None and layer.bias.grad is not None


def test_bad_input():
    with pytest.raises(ValueError, match="form: expected one of"):
        ScaleBiasLinear(_base(False), "both")
    with pytest.raises(TypeError, match="base: expected an nn.Linear"):
        ScaleBiasLinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match=r"x: expected last dim 24"):
        ScaleBiasLinear(_base(False))(torch.randn(2, 23))
