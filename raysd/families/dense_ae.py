"""``dense_ae``: the DCASE 2020 Task 2 baseline autoencoder.

Frame vectors of 5 consecutive log-mel frames (5 x 128 = 640 for 128 mels), Dense 128-128-128-128-8-
128-128-128-128 with BatchNorm and ReLU, linear output, MSE loss. A clip's score is the mean
reconstruction error over all of its vectors (hop 1, as the baseline uses every frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, cast

import torch
from pydantic import Field
from torch import nn

from raysd.families.base import Family, register
from raysd.families.blocks import Standardize, StandardizedInput, dense_stack
from raysd.families.clips import Batch, DataInfo
from raysd.families.hparams import FORBID, Bool, Int


@dataclass
class DenseAEConfig:
    __pydantic_config__ = FORBID

    frames: Annotated[Int, Field(description="log-mel frames concatenated into one input vector (5 in the DCASE "
                                             "baseline)")] = 5
    hop: Annotated[Int, Field(description="frames between the starts of consecutive vectors")] = 1
    hidden: Annotated[Int, Field(description="width of each hidden layer")] = 128
    depth: Annotated[Int, Field(description="hidden layers on each side of the bottleneck")] = 4
    bottleneck: Annotated[Int, Field(description="width of the code layer")] = 8
    standardize: Annotated[Bool, Field(description="standardise the input with the training clips' statistics (the "
                                                   "baseline trains on raw dB)")] = True

    def validate(self) -> None:
        for k in ("frames", "hop", "hidden", "depth", "bottleneck"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")


class DenseAE(nn.Module):
    def __init__(self, dim: int, hp: DenseAEConfig):
        super().__init__()
        self.norm = Standardize()
        self.use_norm = hp.standardize
        h = [hp.hidden] * hp.depth
        self.encoder = dense_stack([dim, *h, hp.bottleneck])
        self.decoder = nn.Sequential(dense_stack([hp.bottleneck, *h]), nn.Linear(hp.hidden, dim))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) if self.use_norm else x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (reconstruction, target), both in the model's input scale."""
        t = self.prepare(x)
        return self.decoder(self.encoder(t)), t


@register
class DenseAEFamily(StandardizedInput, Family):
    name = "dense_ae"
    Config = DenseAEConfig
    description = "DCASE 2020 baseline dense autoencoder on 5-frame vectors; score = mean reconstruction MSE"

    def build(self, info: DataInfo) -> nn.Module:
        return DenseAE(self.hp.frames * info.n_mels, self.hp)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        recon, target = model(batch.x)
        return nn.functional.mse_loss(recon.float(), target.float())

    def window_scores(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        recon, target = model(x)
        return (recon.float() - target.float()).pow(2).mean(dim=1)

    def embed(self, model: nn.Module, x: torch.Tensor, extra: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        net = cast(DenseAE, model)
        return net.encoder(net.prepare(x))
