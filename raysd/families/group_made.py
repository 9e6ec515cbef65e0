"""``group_made``: Group-MADE density estimation (Giri et al., DCASE 2020).

A masked autoencoder (MADE, Germain et al., 2015) over frame vectors whose masks make it autoregressive
over groups of dimensions: with one group per frame, the Gaussian (mean, log-variance) predicted for
every mel bin of frame g depends only on frames 0..g-1 (frame 0 gets an unconditional Gaussian). The
density of a vector is the product of these conditionals; loss and window score are its negative
log-likelihood per dimension (standardised log-mels), and a clip's score is the mean over its windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, cast

import torch
from pydantic import Field
from torch import nn

from raysd.families.base import Family, register
from raysd.families.blocks import Standardize, StandardizedInput, no_autocast
from raysd.families.clips import Batch, DataInfo
from raysd.families.hparams import FORBID, Float, Int


@dataclass
class GroupMADEConfig:
    __pydantic_config__ = FORBID

    frames: Annotated[Int, Field(description="frames per input vector: one autoregressive group per frame (at least 2)")] = 5
    hop: Annotated[Int, Field(description="frames between the starts of consecutive vectors")] = 1
    hidden: Annotated[tuple[Int, ...], Field(description="widths of the masked hidden layers")] = (512, 512)
    min_logvar: Annotated[Float, Field(description="floor of each group's predicted log-variance")] = -7.0

    def validate(self) -> None:
        if self.frames < 2:
            raise ValueError(f"frames must be >= 2 (one group per frame; one group has nothing to condition on), got {self.frames}")
        if self.hop < 1:
            raise ValueError(f"hop must be >= 1, got {self.hop}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden must be a non-empty list of positive layer widths, got {self.hidden}")


class MaskedLinear(nn.Linear):
    mask: torch.Tensor

    def __init__(self, n_in: int, n_out: int, mask: torch.Tensor):
        super().__init__(n_in, n_out)
        self.register_buffer("mask", mask.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.mask.to(self.weight.dtype), self.bias)


def made_degrees(dim: int, group_size: int, hidden: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Degrees (1-based group index) of the inputs, and of each hidden layer's units (cycling over
    1..G-1 so every group boundary gets units)."""
    groups = dim // group_size
    d_in = torch.arange(dim) // group_size + 1
    d_hidden = [torch.arange(h) % max(groups - 1, 1) + 1 for h in hidden]
    return d_in, d_hidden


class GroupMADE(nn.Module):
    def __init__(self, dim: int, group_size: int, hp: GroupMADEConfig):
        super().__init__()
        self.norm = Standardize()
        self.min_logvar = hp.min_logvar
        d_in, d_hidden = made_degrees(dim, group_size, hp.hidden)
        layers: list[nn.Module] = []
        prev, n_prev = d_in, dim
        for d, h in zip(d_hidden, hp.hidden):
            layers += [MaskedLinear(n_prev, h, d[:, None] >= prev[None, :]), nn.ReLU(inplace=True)]
            prev, n_prev = d, h
        self.body = nn.Sequential(*layers)
        d_out = torch.cat([d_in, d_in])
        self.head = MaskedLinear(n_prev, 2 * dim, d_out[:, None] > prev[None, :])
        self.dim = dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (mean, log-variance, standardised input), each (B, dim)."""
        t = self.norm(x)
        mean, logvar = self.head(self.body(t)).split(self.dim, dim=1)
        return mean, logvar, t

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood per dimension of each row of ``x``."""
        mean, logvar, t = self(x)
        return gaussian_nll(mean, logvar, t, self.min_logvar)


def gaussian_nll(mean: torch.Tensor, logvar: torch.Tensor, t: torch.Tensor, min_logvar: float) -> torch.Tensor:
    with no_autocast(t):
        logvar = logvar.float().clamp(min=min_logvar)
        z2 = (t.float() - mean.float()).pow(2) * torch.exp(-logvar)
        return 0.5 * (math.log(2 * math.pi) + logvar + z2).mean(dim=1)


@register
class GroupMADEFamily(StandardizedInput, Family):
    name = "group_made"
    Config = GroupMADEConfig
    description = "Giri et al. (2020) Group-MADE over frame vectors (one group per frame); score = NLL"

    def build(self, info: DataInfo) -> nn.Module:
        return GroupMADE(self.hp.frames * info.n_mels, info.n_mels, self.hp)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        mean, logvar, t = model(batch.x)
        return gaussian_nll(mean, logvar, t, self.hp.min_logvar).mean()

    def window_scores(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        net = cast(GroupMADE, model)
        return net.nll(x)
