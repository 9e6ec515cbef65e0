"""Building blocks shared by several model families: input standardisation, dense stacks, U-Net blocks,
ResNet-like residual stages, and numerically safe helpers (float32 islands inside autocast, Gaussian statistics)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from raysd.families.clips import ClipSet


class Standardize(nn.Module):
    """Global (scalar) mean / std of the training log-mels, fitted once before training.

    Log-mels arrive in dB (roughly -100..+40); every network here trains on standardised input. The
    statistics are buffers, so they travel with the ``state_dict`` and DDP broadcasts them from rank 0.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))

    @torch.no_grad()
    def fit(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        self.mean.copy_(x.mean())
        self.std.copy_(x.std().clamp_min(1e-3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def dense_stack(dims: Sequence[int], norm: bool = True, last_act: bool = True) -> nn.Sequential:
    """Linear layers ``dims[0] -> dims[1] -> ...``, each followed by BatchNorm1d and ReLU
    (the last one only if ``last_act``)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b))
        if last_act or i < len(dims) - 2:
            if norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class ResidualBlock2d(nn.Module):
    """Pre-activation residual block (He et al., "Identity mappings in deep residual networks", ECCV 2016):
    BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 added to a shortcut; where the shape changes, the shortcut is a
    max-pool and a 1x1 convolution, as in Wilkinghoff's embedding networks (ICASSP 2023). No biases: every
    convolution is followed by a BatchNorm or the sum."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(c_in), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False))
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            pool = nn.MaxPool2d(stride, stride, ceil_mode=True) if stride != 1 else nn.Identity()
            self.shortcut = nn.Sequential(pool, nn.Conv2d(c_in, c_out, 1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.body(self.pre(x))


def resnet_stages(c_in: int, channels: Sequence[int], blocks: int = 2) -> nn.Sequential:
    """Stages of ``blocks`` residual blocks each; every stage but the first halves both axes (stride 2)."""
    layers: list[nn.Module] = []
    for i, c in enumerate(channels):
        for j in range(blocks):
            layers.append(ResidualBlock2d(c_in, c, 2 if i > 0 and j == 0 else 1))
            c_in = c
    return nn.Sequential(*layers)


class DoubleConv(nn.Sequential):
    """Two (3x3 conv, BatchNorm, ReLU) layers: the U-Net unit."""

    def __init__(self, c_in: int, c_out: int, c_mid: int | None = None):
        c_mid = c_mid or c_out
        super().__init__(
            nn.Conv2d(c_in, c_mid, 3, padding=1, bias=False), nn.BatchNorm2d(c_mid), nn.ReLU(inplace=True),
            nn.Conv2d(c_mid, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """U-Net down block: 2x2 max-pool, then :class:`DoubleConv`."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.MaxPool2d(2), DoubleConv(c_in, c_out))


class Up(nn.Module):
    """U-Net up block: x2 bilinear upsampling, concatenation with the skip, :class:`DoubleConv`."""

    def __init__(self, c_in: int, c_skip: int, c_out: int):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv = DoubleConv(c_in + c_skip, c_out)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if x.shape[-2:] != skip.shape[-2:]:
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([skip, x.to(skip.dtype)], dim=1))


class UNet(nn.Module):
    """The U-Net of Hauser et al. (DCASE 2023) with base width ``width`` (64 in the reference):
    input block (width), four down blocks to 8*width channels at 1/16 resolution, four up blocks with
    skips, and an output of two 3x3 convolutions (LeakyReLU between them, linear output so standardised
    log-mels can be negative). Works for any input height and width divisible by 16."""

    def __init__(self, c_in: int = 1, c_out: int = 1, width: int = 64):
        super().__init__()
        w = width
        self.inc = DoubleConv(c_in, w)
        self.downs = nn.ModuleList([Down(w, 2 * w), Down(2 * w, 4 * w), Down(4 * w, 8 * w), Down(8 * w, 8 * w)])
        self.ups = nn.ModuleList([Up(8 * w, 8 * w, 4 * w), Up(4 * w, 4 * w, 2 * w), Up(2 * w, 2 * w, w), Up(w, w, w)])
        self.out = nn.Sequential(
            nn.Conv2d(w, w, 3, padding=1), nn.LeakyReLU(0.01, inplace=True), nn.Conv2d(w, c_out, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for d in self.downs:
            skips.append(d(skips[-1]))
        h = skips.pop()
        for u in self.ups:
            h = u(h, skips.pop())
        return self.out(h)


@contextlib.contextmanager
def no_autocast(x: torch.Tensor) -> Iterator[None]:
    """Leave autocast for a numerically delicate region (covariances, distances, log-likelihoods)."""
    with torch.autocast(x.device.type, enabled=False):
        yield


class GaussianStats(nn.Module):
    """Mean and (shrunk) precision matrix of a set of embeddings; Mahalanobis distance to them.

    ``fitted`` is a buffer flag so a model restored from a ``state_dict`` knows it can score."""

    mean: torch.Tensor
    precision: torch.Tensor
    fitted: torch.Tensor

    def __init__(self, dim: int, shrinkage: float = 1e-3):
        super().__init__()
        self.shrinkage = shrinkage
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("precision", torch.eye(dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, z: torch.Tensor) -> None:
        with no_autocast(z):
            z = z.detach().double()
            mu = z.mean(0)
            zc = z - mu
            cov = zc.T @ zc / max(z.shape[0] - 1, 1)
            d = cov.shape[0]
            scale = cov.diagonal().mean().clamp_min(1e-12)
            cov = cov + self.shrinkage * scale * torch.eye(d, dtype=cov.dtype, device=cov.device)
            self.mean.copy_(mu.float())
            self.precision.copy_(torch.linalg.inv(cov).float())
            self.fitted.fill_(True)

    def distance(self, z: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each row of ``z``."""
        if not bool(self.fitted):
            raise RuntimeError("embedding statistics are not fitted yet: run training (after_training) first")
        with no_autocast(z):
            zc = z.float() - self.mean
            return ((zc @ self.precision) * zc).sum(dim=1)


class StandardizedInput:
    """Family mixin for models whose input passes through ``model.norm`` (a ``Standardize``): fits it on
    the worker's training clips before the first epoch."""

    def before_training(self, model: nn.Module, data: ClipSet) -> None:
        norm = model.get_submodule("norm")
        assert isinstance(norm, Standardize), f"{type(model).__name__}.norm must be a Standardize"
        norm.fit(data.clips)
