"""``masked_unet``: the masked-spectrogram U-Net of Hauser et al. (DCASE 2023).

Windows of ``frames`` log-mel frames (64 x 64 in the reference: 64 mels x 64 frames) are cut into
``patch`` x ``patch`` pixel patches (8 x 8 patches of 8 x 8 pixels for a 64 x 64 window); a fraction
``mask_ratio`` of them (48 of 64 in the reference) is hidden (set to the standardised mean, 0), with the
exact same count in every sample and fresh masks every step, and the U-Net reconstructs the window. The
loss is the squared error on the masked pixels (``loss_on='whole'``: on every pixel).

Score: the error on the masked pixels averaged over ``k_masks`` masks per window (256 in the reference;
16 by default to keep CPU scoring affordable, raise it on a GPU), then over the clip's windows. The same
``k_masks`` masks (drawn from ``score_seed``) are used for every window, so scores are deterministic and
comparable between clips. Scoring is vectorised over (window, mask) pairs across all windows of all
clips in a batch and run in chunks of ``score_batch`` images on the model's device, never clip by clip
(auto: 256 images on CUDA; 16 on CPU, where small chunks stay in cache and ran 1.5x faster than 128).

Input size: the U-Net needs mels and frames divisible by 16 and by ``patch``. With 64-mel features
(crop 'none', 'crop', 'tight') the window is the reference 64 x 64; with 128-mel DCASE features the
window is 128 x 64 and the mask grid 16 x 8 (the ratio, not the count, is what carries over).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from pydantic import Field
from torch import nn

from raysd.families.base import Family, register
from raysd.families.blocks import Standardize, StandardizedInput, UNet
from raysd.families.clips import Batch, DataInfo
from raysd.families.hparams import FORBID, Float, Int


@dataclass
class MaskedUNetConfig:
    __pydantic_config__ = FORBID

    frames: Annotated[Int, Field(description="frames per input image (64 in the reference)")] = 64
    hop: Annotated[Int, Field(description="frames between the starts of consecutive images")] = 32
    width: Annotated[Int, Field(description="U-Net base channels (64 in the reference)")] = 64
    patch: Annotated[Int, Field(description="side of a square patch, in pixels (8 in the reference)")] = 8
    mask_ratio: Annotated[Float, Field(description="share of the patches masked (48 of 64 in the reference)")] = 0.75
    loss_on: Annotated[Literal["masked", "whole"], Field(description="reconstruction loss on the masked patches only, "
                                                                     "or on the whole image")] = "masked"
    k_masks: Annotated[Int, Field(description="random masks averaged per window when scoring (256 in the reference)")] = 16
    score_batch: Annotated[Int, Field(description="images per forward pass when scoring (0: 16 on CPU, 256 on CUDA)")] = 0
    score_seed: Annotated[Int, Field(description="seed of the scoring masks")] = 0

    def validate(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        for k in ("frames", "hop", "width", "patch", "k_masks"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.score_batch < 0:
            raise ValueError(f"score_batch must be >= 0 (0 = auto), got {self.score_batch}")
        step = math.lcm(16, self.patch)
        if self.frames % step:
            raise ValueError(f"frames must be a multiple of {step} (U-Net depth 16 and patch {self.patch}), got {self.frames}")


def patch_masks(n: int, grid: tuple[int, int], n_masked: int, device: torch.device | str | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` boolean patch masks of shape ``grid`` with exactly ``n_masked`` True entries each."""
    gh, gw = grid
    noise = torch.rand(n, gh * gw, generator=generator, device=generator.device if generator is not None else device)
    chosen = noise.argsort(dim=1)[:, :n_masked]
    mask = torch.zeros(n, gh * gw, dtype=torch.bool, device=noise.device)
    mask.scatter_(1, chosen, True)
    return mask.reshape(n, gh, gw).to(device) if device is not None else mask.reshape(n, gh, gw)


def pixel_masks(masks: torch.Tensor, patch: int) -> torch.Tensor:
    """Patch masks (N, gh, gw) -> pixel masks (N, 1, gh*patch, gw*patch)."""
    return masks.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2).unsqueeze(1)


class MaskedUNet(nn.Module):
    def __init__(self, n_mels: int, frames: int, hp: MaskedUNetConfig):
        super().__init__()
        step = math.lcm(16, hp.patch)
        if n_mels % step or frames % step:
            raise ValueError(
                f"masked_unet needs mels and frames divisible by {step}, got {n_mels} x {frames} "
                "(use 64- or 128-mel features, e.g. crop 'none')")
        self.norm = Standardize()
        self.unet = UNet(1, 1, hp.width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` (B, 1, M, T), pixel ``mask`` (B, 1, M, T) bool, True = hidden.
        Returns (reconstruction, standardised target)."""
        t = self.norm(x)
        return self.unet(t.masked_fill(mask, 0.0)), t


def masked_error(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the masked pixels of each sample -> (B,)."""
    m = mask.flatten(1).float()
    se = (recon.float() - target.float()).pow(2).flatten(1)
    return (se * m).sum(1) / m.sum(1)


@register
class MaskedUNetFamily(StandardizedInput, Family):
    name = "masked_unet"
    Config = MaskedUNetConfig
    description = "Hauser et al. (2023) masked-patch U-Net; score = masked error averaged over K masks"
    layout = "image"

    def build(self, info: DataInfo) -> nn.Module:
        return MaskedUNet(info.n_mels, self.view().window_length(info.n_frames), self.hp)

    def mask_layout(self, x: torch.Tensor) -> tuple[tuple[int, int], int]:
        """(patch grid, number of masked patches) for windows ``x`` (B, 1, M, T)."""
        grid = (x.shape[-2] // self.hp.patch, x.shape[-1] // self.hp.patch)
        n = grid[0] * grid[1]
        return grid, min(max(1, round(self.hp.mask_ratio * n)), n - 1)

    def train_masks(self, x: torch.Tensor) -> torch.Tensor:
        """Fresh pixel masks for a training batch, the same masked-patch count in every sample."""
        grid, n_masked = self.mask_layout(x)
        return pixel_masks(patch_masks(x.shape[0], grid, n_masked, device=x.device), self.hp.patch)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        mask = self.train_masks(batch.x)
        recon, target = model(batch.x, mask)
        if self.hp.loss_on == "whole":
            return nn.functional.mse_loss(recon.float(), target.float())
        return masked_error(recon, target, mask).mean()

    def scoring_masks(self, x: torch.Tensor) -> torch.Tensor:
        """The ``k_masks`` fixed pixel masks (from ``score_seed``) shared by every window."""
        grid, n_masked = self.mask_layout(x)
        g = torch.Generator().manual_seed(self.hp.score_seed)
        return pixel_masks(patch_masks(self.hp.k_masks, grid, n_masked, generator=g), self.hp.patch).to(x.device)

    def window_scores(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Masked error averaged over ``k_masks`` masks, for every window of ``x`` (N, 1, M, T); the
        N x K (window, mask) pairs run in chunks of ``score_batch`` images."""
        masks = self.scoring_masks(x)
        k = masks.shape[0]
        n = x.shape[0]
        chunk = self.hp.score_batch or (16 if x.device.type == "cpu" else 256)
        total = torch.zeros(n, device=x.device, dtype=torch.float32)
        for start in range(0, n * k, chunk):
            pair = torch.arange(start, min(start + chunk, n * k), device=x.device)
            w, m = pair // k, pair % k
            mask = masks[m]
            recon, target = model(x[w], mask)
            total.index_add_(0, w, masked_error(recon, target, mask))
        return total / k
