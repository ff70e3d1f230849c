"""bitcore.layers: Weight Standardization, GroupNorm factory, folding WS for inference."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from bitcore.layers import (
    GN_EPS,
    WS_EPS,
    StdConv2d,
    fold_weight_standardization,
    group_norm,
    standardize_weight,
)
from bitcore.models import create_model


def _by_hand(weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Per output channel, over (in, kH, kW), biased variance, with plain Python sums."""
    out = torch.empty_like(weight, dtype=torch.float64)
    for o in range(weight.shape[0]):
        values = [float(v) for v in weight[o].flatten()]
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / len(values)
        out[o] = (weight[o].double() - mean) / (var + eps) ** 0.5
    return out


def test_ws_eps_is_the_reference_value():
    assert WS_EPS == 1e-10  # bit_pytorch/models.py StdConv2d
    assert GN_EPS == 1e-5
    assert StdConv2d(3, 4, 3).eps == 1e-10


def test_standardize_weight_per_output_channel():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, generator=gen, dtype=torch.float64) * 3 + 2
    weight[1] += 10.0  # channels with different statistics must not share them
    got = standardize_weight(weight)
    torch.testing.assert_close(got, _by_hand(weight, 1e-10), atol=1e-12, rtol=0)
    per_channel = got.flatten(1)
    torch.testing.assert_close(
        per_channel.mean(1), torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        per_channel.var(1, unbiased=False), torch.ones(6, dtype=torch.float64), atol=1e-9, rtol=0
    )


def test_eps_matters_for_constant_kernels():
    # A constant channel has zero variance: eps keeps it finite, and it is 1e-10, not 1e-5.
    weight = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    weight[0, 0, 0, 0] = 1e-5
    var = 0.25e-10  # values 1e-5 and 0: mean 5e-6, biased variance 2.5e-11
    expected = 5e-6 / (var + 1e-10) ** 0.5
    assert abs(standardize_weight(weight)[0, 0, 0, 0].item() - expected) < 1e-12
    assert torch.isfinite(standardize_weight(torch.ones(2, 3, 3, 3))).all()


def test_std_conv_uses_standardised_kernel():
    gen = torch.Generator().manual_seed(1)
    conv = StdConv2d(4, 5, kernel_size=3, stride=2, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(5, 4, 3, 3, generator=gen) * 0.3 + 0.1)
    x = torch.randn(2, 4, 9, 9, generator=gen)
    expected = F.conv2d(x.double(), _by_hand(conv.weight.detach(), 1e-10), stride=2, padding=1)
    torch.testing.assert_close(conv(x).double(), expected, atol=1e-5, rtol=0)
    # Scaling and shifting a channel's kernel does not change the output (that is the point).
    with torch.no_grad():
        before = conv(x)
        conv.weight[2] = conv.weight[2] * 7.0 - 3.0
        torch.testing.assert_close(conv(x), before, atol=1e-5, rtol=0)


def test_std_conv_trains_the_raw_weight():
    conv = StdConv2d(3, 4, kernel_size=1, bias=False)
    conv(torch.randn(2, 3, 4, 4)).square().sum().backward()
    assert conv.weight.grad is not None and torch.count_nonzero(conv.weight.grad) > 0


def test_group_norm_factory():
    norm = group_norm(256)
    assert isinstance(norm, nn.GroupNorm)
    assert (norm.num_groups, norm.num_channels, norm.eps) == (32, 256, 1e-5)
    assert group_norm(16).num_groups == 16  # fewer channels than groups: one per group
    assert group_norm(64, groups=8).num_groups == 8


def test_fold_gives_identical_outputs_and_no_stdconv():
    torch.manual_seed(0)
    model: Any = create_model("tiny-R10x0.25", 5).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):  # non-trivial affine parameters
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        before = model(x)
        n_std = sum(isinstance(m, StdConv2d) for m in model.modules())
        folded: Any = fold_weight_standardization(model)
        after = folded(x)
    assert folded is model
    assert n_std == 1 + 4 * 4  # root + (3 convs + projection) per unit
    assert not any(isinstance(m, StdConv2d) for m in folded.modules())
    assert sum(type(m) is nn.Conv2d for m in folded.modules()) == n_std + 1  # + head
    assert before.abs().max() > 0.01
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    # The folded kernels are the standardised ones, stored.
    root = folded.root.conv
    torch.testing.assert_close(
        root.weight.flatten(1).mean(1), torch.zeros(root.out_channels), atol=1e-6, rtol=0
    )
    assert (root.stride, root.padding, root.bias) == ((2, 2), (3, 3), None)


def test_fold_keeps_bias():
    conv: Any = StdConv2d(3, 4, kernel_size=3, padding=1, bias=True)
    wrapper: Any = nn.Sequential(conv)
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        before = wrapper(x)
        fold_weight_standardization(wrapper)
        torch.testing.assert_close(wrapper(x), before, atol=1e-6, rtol=0)
    assert torch.equal(wrapper[0].bias, conv.bias)
    assert type(wrapper[0]) is nn.Conv2d
