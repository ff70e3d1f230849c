"""Building blocks of BiT's ResNetV2: Weight-Standardized convolutions and GroupNorm.

Kolesnikov et al., "Big Transfer (BiT)", ECCV 2020, sec. 2.1 / 4.3: BatchNorm is replaced by
GroupNorm (Wu & He, 2018) plus Weight Standardization (Qiao et al., 2019), so that nothing in
the network depends on the batch. Layer *types* are injected into the model (timm style) so the
normalization experiment can swap them without copying the architecture.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

# The reference implementation (bit_pytorch/models.py) uses 1e-10; timm uses 1e-8.
WS_EPS = 1e-10
GN_EPS = 1e-5
GN_GROUPS = 32

NormFactory = Callable[[int], nn.Module]
ConvFactory = Callable[..., nn.Conv2d]


def standardize_weight(weight: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """Zero mean, unit (biased) variance per output channel over (in, kH, kW)."""
    var, mean = torch.var_mean(weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
    return (weight - mean) / torch.sqrt(var + eps)


class StdConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised on every forward pass (training form)."""

    def __init__(self, *args: object, eps: float = WS_EPS, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = standardize_weight(self.weight, self.eps)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def group_norm(num_channels: int, groups: int = GN_GROUPS) -> nn.GroupNorm:
    """BiT's norm: GroupNorm with 32 groups (fewer only where the channels are fewer)."""
    return nn.GroupNorm(min(groups, num_channels), num_channels, eps=GN_EPS)


def conv3x3(conv: ConvFactory, cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return conv(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(conv: ConvFactory, cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return conv(cin, cout, kernel_size=1, stride=stride, padding=0, bias=False)


@torch.no_grad()
def fold_weight_standardization(module: nn.Module) -> nn.Module:
    """Replace every StdConv2d by a plain Conv2d holding the already-standardised kernel.

    Weight Standardization is a pure function of the weights, so for inference it can be done
    once at load instead of on every forward pass. The result is numerically the same network
    (up to float rounding) and much cheaper at small batch sizes. Works in place; returns module.
    """
    for name, child in list(module.named_children()):
        if isinstance(child, StdConv2d):
            plain = nn.Conv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,  # type: ignore[arg-type]
                stride=child.stride,  # type: ignore[arg-type]
                padding=child.padding,  # type: ignore[arg-type]
                dilation=child.dilation,  # type: ignore[arg-type]
                groups=child.groups,
                bias=child.bias is not None,
                device=child.weight.device,
                dtype=child.weight.dtype,
            )
            plain.weight.copy_(standardize_weight(child.weight, child.eps))
            if child.bias is not None:
                plain.bias.copy_(child.bias)  # type: ignore[union-attr]
            setattr(module, name, plain)
        else:
            fold_weight_standardization(child)
    return module
