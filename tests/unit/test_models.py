"""bitcore.models: the published BiT sizes, and the architecture details that matter for weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from bitcore.layers import StdConv2d
from bitcore.models import (
    MODEL_SPECS,
    PreActBottleneck,
    ResNetV2,
    count_parameters,
    create_model,
    get_spec,
    list_models,
)

# docs/bit.md: parameter counts with a 1000-class head, in millions (as printed by the paper / timm).
PUBLISHED_MILLIONS = {
    "R50x1": 25.55,
    "R50x3": 217.32,
    "R101x1": 44.54,
    "R101x3": 387.93,
    "R152x2": 236.34,
    "R152x4": 936.53,
}


@pytest.mark.parametrize("family", ["BiT-S", "BiT-M"])
@pytest.mark.parametrize("size", list(PUBLISHED_MILLIONS))
def test_parameter_counts_match_published(family: str, size: str):
    assert round(count_parameters(f"{family}-{size}") / 1e6, 2) == PUBLISHED_MILLIONS[size]


def by_hand(depths: tuple[int, ...], wf: float, classes: int) -> int:
    """Parameters of BiT's ResNetV2 counted from docs/bit.md's description, layer by layer."""
    root = int(64 * wf)
    total = 7 * 7 * 3 * root
    cin = root
    for index, depth in enumerate(depths):
        cout = int(256 * wf) * 2**index
        cmid = cout // 4
        for unit in range(depth):
            unit_in = cin if unit == 0 else cout
            total += 2 * unit_in + unit_in * cmid  # gn1 (gamma, beta) + conv1 1x1
            total += 2 * cmid + 9 * cmid * cmid  # gn2 + conv2 3x3
            total += 2 * cmid + cmid * cout  # gn3 + conv3 1x1
            if unit == 0:
                total += unit_in * cout  # projection (every first unit needs one)
        cin = cout
    return total + 2 * cin + cin * classes + classes  # head gn + 1x1 conv with bias


@pytest.mark.parametrize("name", ["BiT-S-R50x1", "BiT-M-R101x3", "BiT-S-R152x4", "tiny-R10x0.25"])
def test_parameter_count_by_hand(name: str):
    spec = get_spec(name)
    assert count_parameters(name, 17) == by_hand(spec.depths, spec.width_factor, 17)


def test_exact_parameter_count_r50x1():
    # Exact: head 2048*1000 + 1000; the rest is the body (timm resnetv2_50x1_bit: 25,549,352).
    assert count_parameters("BiT-M-R50x1") == 25_549_352
    assert count_parameters("BiT-M-R50x1", 10) == 25_549_352 - 2048 * 990 - 990


@pytest.mark.parametrize(
    ("name", "classes", "features"),
    [("BiT-M-R50x1", 21843, 2048), ("BiT-S-R101x3", 1000, 6144), ("BiT-M-R152x4", 21843, 8192)],
)
def test_upstream_head_shapes(name: str, classes: int, features: int):
    spec = get_spec(name)
    assert spec.upstream_classes == classes
    assert spec.published
    with torch.device("meta"):
        model: Any = create_model(name, spec.upstream_classes)
    assert tuple(model.head.conv.weight.shape) == (classes, features, 1, 1)
    assert tuple(model.head.conv.bias.shape) == (classes,)
    assert model.num_features == features


def test_depths_and_widths():
    with torch.device("meta"):
        model: Any = create_model("BiT-S-R152x2", 1000)
    units = [len(block) for block in model.body]
    assert units == [3, 8, 36, 3]
    assert model.root.conv.out_channels == 128
    cout = [block[0].conv3.out_channels for block in model.body]
    assert cout == [512, 1024, 2048, 4096]
    assert all(b[0].conv1.out_channels * 4 == b[0].conv3.out_channels for b in model.body)
    with torch.device("meta"):
        r101: Any = create_model("BiT-S-R101x1", 2)
    assert [len(block) for block in r101.body] == [3, 4, 23, 3]


def test_root_is_zero_pad_then_unpadded_maxpool():
    model: Any = create_model("tiny-R10x0.25", 3)
    conv, pad, pool = model.root.conv, model.root.pad, model.root.pool
    assert isinstance(conv, StdConv2d) and conv.bias is None
    assert (conv.kernel_size, conv.stride, conv.padding) == ((7, 7), (2, 2), (3, 3))
    assert isinstance(pad, nn.ConstantPad2d) and pad.padding == (1, 1, 1, 1) and pad.value == 0.0
    assert isinstance(pool, nn.MaxPool2d)
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 0)
    assert [type(m) for m in model.root] == [StdConv2d, nn.ConstantPad2d, nn.MaxPool2d]
    # Zero padding differs from MaxPool(padding=1) (-inf) where all inputs are negative.
    x = -torch.ones(1, 1, 4, 4)
    assert pool(pad(x))[0, 0, 0, 0].item() == 0.0
    assert nn.MaxPool2d(3, 2, padding=1)(x)[0, 0, 0, 0].item() == -1.0


def test_stride_on_3x3_of_first_unit_of_blocks_2_to_4():
    with torch.device("meta"):
        model: Any = create_model("BiT-S-R50x1", 1000)
    for index, block in enumerate(model.body, start=1):
        for position, unit in enumerate(block):
            expected = 2 if index > 1 and position == 0 else 1
            assert unit.conv2.stride == (expected, expected), (index, position)
            assert unit.conv1.stride == (1, 1) and unit.conv3.stride == (1, 1)
            assert unit.conv2.kernel_size == (3, 3) and unit.conv2.padding == (1, 1)
    x = torch.zeros(1, 3, 64, 64)
    shapes = []
    real: Any = create_model("tiny-R10x0.25", 2)
    h = real.root(x)
    shapes.append(tuple(h.shape[2:]))
    for block in real.body:
        h = block(h)
        shapes.append(tuple(h.shape[2:]))
    assert shapes == [(16, 16), (16, 16), (8, 8), (4, 4), (2, 2)]


def test_projection_only_where_needed():
    with torch.device("meta"):
        model: Any = create_model("BiT-S-R50x1", 1000)
    for index, block in enumerate(model.body, start=1):
        for position, unit in enumerate(block):
            assert isinstance(unit, PreActBottleneck)
            if position == 0:  # block1 changes 64 -> 256 channels, the others also downsample
                assert unit.downsample is not None
                assert unit.downsample.stride == ((1, 1) if index == 1 else (2, 2))
                assert unit.downsample.kernel_size == (1, 1)
            else:
                assert unit.downsample is None
    # A unit whose input already has cout channels at stride 1 has no projection.
    assert (
        PreActBottleneck(64, 64, 16, 1, StdConv2d, lambda c: nn.GroupNorm(4, c)).downsample is None
    )


def test_norms_are_groupnorm_32_eps_1e5():
    with torch.device("meta"):
        model: Any = create_model("BiT-S-R50x1", 1000)
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 * 16 + 1
    assert all(m.num_groups == 32 and m.eps == 1e-5 for m in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(isinstance(m, StdConv2d) for m in convs if m is not model.head.conv)
    assert type(model.head.conv) is nn.Conv2d and model.head.conv.bias is not None


def test_zero_head():
    model: Any = create_model("tiny-R10x0.25", 4, zero_head=True)
    assert torch.count_nonzero(model.head.conv.weight) == 0
    assert torch.count_nonzero(model.head.conv.bias) == 0
    body_before = model.root.conv.weight.clone()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), torch.zeros(2, 4))
    model.reset_head(7)
    assert tuple(model(x).shape) == (2, 7)
    assert torch.equal(model.root.conv.weight, body_before)
    default: Any = create_model("tiny-R10x0.25", 4)
    assert torch.count_nonzero(default.head.conv.weight) > 0


def test_forward_shape_and_finite():
    model: Any = create_model("tiny-R10x0.25", 3).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert tuple(out.shape) == (2, 3)
    assert torch.isfinite(out).all()


def test_unknown_model_and_bad_classes():
    with pytest.raises(ValueError, match=r"unknown model 'BiT-L-R50x1'; known models: BiT-S-R50x1"):
        create_model("BiT-L-R50x1", 10)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        create_model("tiny-R10x0.25", 0)


def test_list_models():
    infos = list_models()
    names = [m.name for m in infos]
    assert names == list(MODEL_SPECS)
    assert "tiny-R10x0.25" in names and "small-R26x0.5" in names
    published = list_models(published_only=True)
    assert len(published) == 12 and all(m.published for m in published)
    by_name = {m.name: m for m in infos}
    assert round(by_name["BiT-M-R152x4"].parameters / 1e6, 2) == 936.53
    assert by_name["BiT-M-R50x1"].upstream == "ImageNet-21k"
    assert by_name["BiT-S-R50x1"].upstream == "ImageNet-1k"
    assert by_name["tiny-R10x0.25"].upstream is None
    assert by_name["tiny-R10x0.25"].parameters == by_hand((1, 1, 1, 1), 0.25, 1000)


def test_custom_layers_are_injected():
    model = ResNetV2((1, 1, 1, 1), 0.25, 2, conv=nn.Conv2d, norm=lambda c: nn.BatchNorm2d(c))
    assert not any(isinstance(m, StdConv2d) for m in model.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 3 * 4 + 1
