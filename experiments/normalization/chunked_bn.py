"""BatchNorm as data-parallel devices compute it: per-device statistics, unsynchronised.

With data parallelism a global batch of G images is split over G / b devices, b images each.
Plain BatchNorm (no SyncBN) on each device normalises with the mean and variance of *its own*
b images only. ``ChunkedBatchNorm2d(C, device_batch=b)`` reproduces that on one process: in
training, the batch is cut into consecutive chunks of b images and every chunk is normalised with
its own statistics, exactly as separate ``nn.BatchNorm2d`` replicas would (the unit tests check
this against real separate BatchNorms). Gradients then flow as in DDP: the loss is the mean over
the whole global batch, which is what averaging the per-device gradients computes.

Running statistics (the choice the experiment documents): PyTorch DDP without SyncBN, with its
default ``broadcast_buffers=True``, copies rank 0's buffers to every rank before each forward,
so the running mean / variance that survive (and that a checkpoint saves) are the ones rank 0
updated from its own chunk. This module does the same: only chunk 0 updates the running
statistics. Evaluation uses the running statistics, as ``nn.BatchNorm2d.eval()`` does.

Degenerate case: a chunk of one image at 1x1 spatial size has one value per channel, so its
variance is 0 and every output equals ``bias``: the layer erases its input and passes no gradient.
``nn.BatchNorm2d`` refuses this case ("Expected more than 1 value per channel when training");
this module runs it so the experiment can report what happens, and, having no unbiased variance
of a single value, updates the running variance with the biased one (0), as TensorFlow does.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from bitcore.layers import NormFactory

BN_EPS = 1e-5
BN_MOMENTUM = 0.1


class ChunkedBatchNorm2d(nn.Module):
    """BatchNorm2d whose training statistics are per chunk of ``device_batch`` images."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(
        self,
        num_features: int,
        device_batch: int,
        *,
        eps: float = BN_EPS,
        momentum: float | None = BN_MOMENTUM,
    ) -> None:
        super().__init__()
        if device_batch < 1:
            raise ValueError(f"device_batch must be >= 1, got {device_batch}")
        self.num_features = num_features
        self.device_batch = device_batch
        self.eps = eps
        # None means a cumulative average (as nn.BatchNorm2d), used to re-estimate statistics.
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()

    def extra_repr(self) -> str:
        return f"{self.num_features}, device_batch={self.device_batch}, eps={self.eps}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"expected input (N, {self.num_features}, H, W), got {tuple(x.shape)}")
        if not self.training:
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        n, c, h, w = x.shape
        b = self.device_batch
        if n % b != 0:
            raise ValueError(
                f"a training batch of {n} images cannot be split into devices of {b} images; "
                "use a global batch that is a multiple of device_batch"
            )
        chunks = x.reshape(n // b, b, c, h, w)
        # Biased variance for normalising, as BatchNorm does (Ioffe & Szegedy, 2015, Alg. 1).
        var, mean = torch.var_mean(chunks, dim=(1, 3, 4), keepdim=True, unbiased=False)
        normalised = ((chunks - mean) * torch.rsqrt(var + self.eps)).reshape(n, c, h, w)
        self._update_running_stats(mean[0].flatten(), var[0].flatten(), count=b * h * w)
        return normalised * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """Rank 0's update (see module doc): unbiased variance, as nn.BatchNorm2d stores."""
        self.num_batches_tracked += 1
        if self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked.item())
        else:
            factor = self.momentum
        unbiased = var * (count / (count - 1)) if count > 1 else var
        self.running_mean.lerp_(mean.detach(), factor)
        self.running_var.lerp_(unbiased.detach(), factor)


def chunked_batch_norm(device_batch: int) -> NormFactory:
    """A ``norm=`` factory for bitcore.models.ResNetV2: ``factory(num_channels) -> module``."""

    def factory(num_channels: int) -> nn.Module:
        return ChunkedBatchNorm2d(num_channels, device_batch)

    return factory
