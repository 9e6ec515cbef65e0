"""``conv_ae``: the convolutional autoencoder of the field-recording study (Rajani, 2022).

Input 1 x 64 mels x 44 frames (1 s at 22,050 Hz, hop 512). Four stages of 3x3 convolution (padding 2)
+ ReLU + 2x2 max-pool with 16, 32, 64, 128 channels; flatten (2,560 for 64 x 44); FC to a 10-d
bottleneck; FC back; four stages of max-unpool (with the pooling indices and the exact pre-pool sizes)
+ 3x3 transposed convolution (padding 2) back to the input size. The flattened size follows the input,
so the model adapts to any crop variant (64 mels for 'none' / 'crop' / 'tight', 128 for DCASE) and any
window length.

Scores: ``recon`` (mean squared reconstruction error) or ``mahalanobis`` (squared Mahalanobis distance
of the bottleneck embedding to the training embeddings, whose mean and precision are fitted in
``after_training`` and kept in buffers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, cast

import torch
from pydantic import Field
from torch import nn

from raysd.families.base import Family, register
from raysd.families.blocks import GaussianStats, Standardize, StandardizedInput
from raysd.families.clips import Batch, ClipSet, DataInfo
from raysd.families.hparams import FORBID, Int

CHANNELS = (16, 32, 64, 128)


@dataclass
class ConvAEConfig:
    __pydantic_config__ = FORBID

    frames: Annotated[Int, Field(description="frames per input image (patch width)")] = 44
    hop: Annotated[Int, Field(description="frames between the starts of consecutive images")] = 22
    bottleneck: Annotated[Int, Field(description="width of the dense code layer")] = 10
    score: Annotated[Literal["recon", "mahalanobis"], Field(description="anomaly score: reconstruction error (recon) or"
                                                                        " the Mahalanobis distance of the code "
                                                                        "(mahalanobis)")] = "recon"

    def validate(self) -> None:
        if self.frames < 1 or self.hop < 1 or self.bottleneck < 1:
            raise ValueError(f"frames, hop and bottleneck must be >= 1, got {self.frames}, {self.hop}, {self.bottleneck}")


class ConvAE(nn.Module):
    def __init__(self, n_mels: int, frames: int, bottleneck: int):
        super().__init__()
        self.norm = Standardize()
        chans = (1, *CHANNELS)
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, padding=2) for a, b in zip(chans[:-1], chans[1:]))
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(b, a, 3, padding=2) for a, b in reversed(list(zip(chans[:-1], chans[1:]))))
        h, w = n_mels, frames
        for _ in CHANNELS:
            h, w = (h + 2) // 2, (w + 2) // 2
        if h < 1 or w < 1:
            raise ValueError(f"conv_ae input {n_mels} x {frames} is too small for four conv + pool stages")
        self.code_shape = (CHANNELS[-1], h, w)
        flat = CHANNELS[-1] * h * w
        self.fc_in = nn.Linear(flat, bottleneck)
        self.fc_out = nn.Linear(bottleneck, flat)
        self.stats = GaussianStats(bottleneck)

    def encode(self, t: torch.Tensor) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Size]]]:
        trace = []
        for conv in self.convs:
            t = torch.relu(conv(t))
            size = t.shape
            t, idx = self.pool(t)
            trace.append((idx, size))
        return self.fc_in(t.flatten(1)), trace

    def decode(self, z: torch.Tensor, trace: list[tuple[torch.Tensor, torch.Size]]) -> torch.Tensor:
        t = self.fc_out(z).reshape(z.shape[0], *self.code_shape)
        for i, (deconv, (idx, size)) in enumerate(zip(self.deconvs, reversed(trace))):
            t = self.unpool(t, idx, output_size=size[-2:])
            t = deconv(t)
            if i < len(self.deconvs) - 1:
                t = torch.relu(t)
        return t

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (reconstruction, standardised input, bottleneck embedding)."""
        t = self.norm(x)
        z, trace = self.encode(t)
        return self.decode(z, trace), t, z


@register
class ConvAEFamily(StandardizedInput, Family):
    name = "conv_ae"
    Config = ConvAEConfig
    description = "Rajani (2022) conv autoencoder with max-unpooling; score = reconstruction or Mahalanobis"
    layout = "image"

    def build(self, info: DataInfo) -> nn.Module:
        return ConvAE(info.n_mels, self.view().window_length(info.n_frames), self.hp.bottleneck)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        recon, target, _ = model(batch.x)
        return nn.functional.mse_loss(recon.float(), target.float())

    @torch.no_grad()
    def after_training(self, model: nn.Module, data: ClipSet) -> None:
        net = cast(ConvAE, model)
        zs = [self.embed(net, b.x).float() for b in data.batches(1024, shuffle=False)]
        net.stats.fit(torch.cat(zs))

    def window_scores(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        net = cast(ConvAE, model)
        recon, target, z = net(x)
        if self.hp.score == "mahalanobis":
            return net.stats.distance(z)
        return (recon.float() - target.float()).pow(2).flatten(1).mean(dim=1)

    def embed(self, model: nn.Module, x: torch.Tensor, extra: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        net = cast(ConvAE, model)
        return net.encode(net.norm(x))[0]
