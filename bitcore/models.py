"""ResNetV2 with GroupNorm + Weight Standardization, and the registry of BiT models.

Architecture as in the BiT reference code (google-research/big_transfer, bit_pytorch/models.py):
pre-activation bottleneck units with the stride on the 3x3 conv, a 7x7 root followed by a zero
ConstantPad2d(1) and a 3x3/2 max-pool, and a GN -> ReLU -> pool -> 1x1 conv head. Submodule
names mirror the official checkpoint's (root / block{1..4} / unit{01..} / head) so that loading
an official .npz is a rename, not a search.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import cache, partial

import torch
from torch import nn

from bitcore.layers import ConvFactory, NormFactory, StdConv2d, conv1x1, conv3x3, group_norm

IMAGENET21K_CLASSES = 21843
IMAGENET1K_CLASSES = 1000


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck (He et al., 2016 "Identity mappings"), stride on the 3x3."""

    def __init__(
        self,
        cin: int,
        cout: int,
        cmid: int,
        stride: int,
        conv: ConvFactory,
        norm: NormFactory,
    ) -> None:
        super().__init__()
        self.gn1 = norm(cin)
        self.conv1 = conv1x1(conv, cin, cmid)
        self.gn2 = norm(cmid)
        self.conv2 = conv3x3(conv, cmid, cmid, stride)
        self.gn3 = norm(cmid)
        self.conv3 = conv1x1(conv, cmid, cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = conv1x1(conv, cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.gn1(x))
        # The projection sees the pre-activated input, as in the reference code.
        shortcut = self.downsample(out) if self.downsample is not None else x
        out = self.conv1(out)
        out = self.conv2(self.relu(self.gn2(out)))
        out = self.conv3(self.relu(self.gn3(out)))
        return out + shortcut


class ResNetV2(nn.Module):
    """BiT's ResNetV2. `conv` and `norm` are injected so other normalizations can be compared."""

    def __init__(
        self,
        depths: tuple[int, ...],
        width_factor: float,
        num_classes: int,
        *,
        zero_head: bool = False,
        conv: ConvFactory = StdConv2d,
        norm: NormFactory = group_norm,
    ) -> None:
        super().__init__()
        wf = width_factor
        root_ch = int(64 * wf)
        self.num_features = int(2048 * wf)
        self.root = nn.Sequential(
            OrderedDict(
                conv=conv(3, root_ch, kernel_size=7, stride=2, padding=3, bias=False),
                # Zero padding then an unpadded max-pool: NOT the same as MaxPool(padding=1),
                # which pads with -inf (docs/bit.md, "Root").
                pad=nn.ConstantPad2d(1, 0.0),
                pool=nn.MaxPool2d(kernel_size=3, stride=2, padding=0),
            )
        )
        blocks: OrderedDict[str, nn.Module] = OrderedDict()
        cin = root_ch
        for index, depth in enumerate(depths):
            cout = int(256 * wf) * 2**index
            stride = 1 if index == 0 else 2
            units: OrderedDict[str, nn.Module] = OrderedDict()
            for unit in range(depth):
                units[f"unit{unit + 1:02d}"] = PreActBottleneck(
                    cin if unit == 0 else cout,
                    cout,
                    cout // 4,
                    stride if unit == 0 else 1,
                    conv,
                    norm,
                )
            blocks[f"block{index + 1}"] = nn.Sequential(units)
            cin = cout
        self.body = nn.Sequential(blocks)
        self.head = nn.Sequential(
            OrderedDict(
                gn=norm(self.num_features),
                relu=nn.ReLU(inplace=True),
                avg=nn.AdaptiveAvgPool2d(output_size=1),
                conv=nn.Conv2d(self.num_features, num_classes, kernel_size=1, bias=True),
            )
        )
        self.num_classes = num_classes
        if zero_head:
            self.zero_head()

    @torch.no_grad()
    def zero_head(self) -> None:
        """BiT transfer initialises the new head to zero (weights and bias)."""
        head: nn.Conv2d = self.head.conv  # type: ignore[assignment]
        head.weight.zero_()
        head.bias.zero_()  # type: ignore[union-attr]

    def reset_head(self, num_classes: int, *, zero: bool = True) -> None:
        """Replace the head with a fresh one of `num_classes` outputs."""
        old: nn.Conv2d = self.head.conv  # type: ignore[assignment]
        self.head.conv = nn.Conv2d(
            self.num_features,
            num_classes,
            kernel_size=1,
            bias=True,
            device=old.weight.device,
            dtype=old.weight.dtype,
        )
        self.num_classes = num_classes
        if zero:
            self.zero_head()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.root(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.forward_features(x))
        return logits.flatten(1)


@dataclass(frozen=True)
class ModelSpec:
    """One entry of the registry. `published` ones have official BiT checkpoints."""

    name: str
    depths: tuple[int, ...]
    width_factor: float
    published: bool
    upstream: str | None  # "ImageNet-21k", "ImageNet-1k" or None (no pre-trained weights)
    upstream_classes: int | None
    gn_groups: int = 32
    description: str = ""

    @property
    def architecture(self) -> str:
        return self.name.split("-", 2)[-1]


DEPTHS = {"R50": (3, 4, 6, 3), "R101": (3, 4, 23, 3), "R152": (3, 8, 36, 3)}
PUBLISHED_SIZES = ("R50x1", "R50x3", "R101x1", "R101x3", "R152x2", "R152x4")


def _published_specs() -> dict[str, ModelSpec]:
    specs = {}
    for family, upstream, classes in (
        ("BiT-S", "ImageNet-1k", IMAGENET1K_CLASSES),
        ("BiT-M", "ImageNet-21k", IMAGENET21K_CLASSES),
    ):
        for size in PUBLISHED_SIZES:
            depth_name, width = size.split("x")
            name = f"{family}-{size}"
            specs[name] = ModelSpec(
                name=name,
                depths=DEPTHS[depth_name],
                width_factor=float(width),
                published=True,
                upstream=upstream,
                upstream_classes=classes,
                description=f"BiT ResNetV2-{size[1:]} pre-trained on {upstream}",
            )
    return specs


# Small, NOT published variants: same code, fewer units and channels, for CPU tests and demos.
# They have no pre-trained checkpoint, so they train from scratch only when asked to.
_SMALL_SPECS = {
    "tiny-R10x0.25": ModelSpec(
        name="tiny-R10x0.25",
        depths=(1, 1, 1, 1),
        width_factor=0.25,
        published=False,
        upstream=None,
        upstream_classes=None,
        gn_groups=8,
        description="Not published: 1 unit per stage, 1/4 width, GN 8 groups (tests)",
    ),
    "small-R26x0.5": ModelSpec(
        name="small-R26x0.5",
        depths=(2, 2, 2, 2),
        width_factor=0.5,
        published=False,
        upstream=None,
        upstream_classes=None,
        gn_groups=32,
        description="Not published: 2 units per stage, 1/2 width (CPU demos)",
    ),
}

MODEL_SPECS: dict[str, ModelSpec] = {**_published_specs(), **_SMALL_SPECS}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODEL_SPECS[name]
    except KeyError:
        known = ", ".join(MODEL_SPECS)
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None


def create_model(
    name: str,
    num_classes: int,
    zero_head: bool = False,
    *,
    conv: ConvFactory = StdConv2d,
    norm: NormFactory | None = None,
) -> ResNetV2:
    """Build a registry model with a `num_classes` head. Input: RGB in [-1, 1]."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    spec = get_spec(name)
    return ResNetV2(
        spec.depths,
        spec.width_factor,
        num_classes,
        zero_head=zero_head,
        conv=conv,
        norm=norm if norm is not None else partial(group_norm, groups=spec.gn_groups),
    )


@cache
def count_parameters(name: str, num_classes: int = IMAGENET1K_CLASSES) -> int:
    """Parameter count, built on the meta device (no memory, even for R152x4). Cached: the
    registry is fixed, and building R152x4 even on the meta device takes a moment."""
    with torch.device("meta"):
        model = create_model(name, num_classes)
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class ModelInfo:
    name: str
    published: bool
    upstream: str | None
    parameters: int  # with a 1000-class head, as the published figures are quoted
    description: str


def list_models(*, published_only: bool = False) -> list[ModelInfo]:
    return [
        ModelInfo(s.name, s.published, s.upstream, count_parameters(s.name), s.description)
        for s in MODEL_SPECS.values()
        if s.published or not published_only
    ]
