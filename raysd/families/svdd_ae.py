"""``svdd_ae``: a convolutional autoencoder trained with a Deep SVDD objective (Juros et al.).

Encoder: 3x3 stride-2 convolutions with 32, 64, 128, 256 filters and ReLU (dropout 0.2, 0.3, 0.3 after
the last three), then a 3x3 convolution to a 40-channel latent map. Following Deep SVDD (Ruff et al.,
2018) the encoder has no bias terms and no normalisation layers (either would let the network map
everything onto the centre) and its output is linear. With ``recon_weight > 0`` a mirrored decoder of
transposed convolutions (biases allowed: it only serves the reconstruction term; ``skips`` adds U-Net-like
skip connections from the encoder) is built and its reconstruction MSE is added to the loss; without a
reconstruction term there is no decoder (it would get no gradient, which DDP rejects).

The centre ``c`` is the mean latent of the training windows under the initial network, computed once in
``before_training`` (coordinates closer to 0 than ``centre_eps`` are pushed to +-``centre_eps``) and kept
in a buffer; training never changes it. ``centres='per_class'`` keeps one centre per machine ID /
section (a window of an unseen section is measured to the nearest one). Loss = mean squared distance of
the latent to its centre (summed over latent elements) + ``weight_penalty`` * sum of squared
convolution weights (0.002 in the reference) + ``recon_weight`` * reconstruction MSE. Score = squared
distance of the latent to its centre, averaged over the clip's windows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, cast

import torch
from pydantic import Field
from torch import nn

from raysd.families.base import Family, register
from raysd.families.blocks import Standardize, StandardizedInput
from raysd.families.clips import Batch, ClipSet, DataInfo
from raysd.families.hparams import FORBID, Bool, Float, Int

CHANNELS = (32, 64, 128, 256)
DROPOUT = (0.0, 0.2, 0.3, 0.3)


@dataclass
class SVDDAEConfig:
    __pydantic_config__ = FORBID

    frames: Annotated[Int, Field(description="frames per input image")] = 64
    hop: Annotated[Int, Field(description="frames between the starts of consecutive images")] = 32
    latent_channels: Annotated[Int, Field(description="channels of the encoder's output (the SVDD space)")] = 40
    weight_penalty: Annotated[Float, Field(description="weight decay of the SVDD objective")] = 0.002
    recon_weight: Annotated[Float, Field(description="weight of a mirrored decoder's reconstruction error (0: no "
                                                     "decoder)")] = 0.0
    skips: Annotated[Bool, Field(description="skip connections from encoder to decoder (with recon_weight > 0)")] = False
    centre_eps: Annotated[Float, Field(description="smallest absolute value of a centre coordinate (Deep SVDD's trick "
                                                   "against a trivial centre)")] = 0.1
    centres: Annotated[Literal["global", "per_class"], Field(description="one centre for every clip (global) or one per"
                                                                         " machine ID / section (per_class)")] = "global"

    def validate(self) -> None:
        for k in ("frames", "hop", "latent_channels"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("weight_penalty", "recon_weight", "centre_eps"):
            if getattr(self, k) < 0:
                raise ValueError(f"{k} must be >= 0, got {getattr(self, k)}")


class SVDDAE(nn.Module):
    centre: torch.Tensor
    centre_set: torch.Tensor

    def __init__(self, n_mels: int, frames: int, n_centres: int, hp: SVDDAEConfig):
        super().__init__()
        self.norm = Standardize()
        self.skips = hp.skips
        chans = (1, *CHANNELS)
        self.enc = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1, bias=False) for a, b in zip(chans[:-1], chans[1:]))
        self.drop = nn.ModuleList(nn.Dropout(p) if p > 0 else nn.Identity() for p in DROPOUT)
        self.to_latent = nn.Conv2d(CHANNELS[-1], hp.latent_channels, 3, padding=1, bias=False)
        self.decoder: nn.ModuleDict | None = None
        if hp.recon_weight > 0:
            k = 2 if hp.skips else 1
            self.decoder = nn.ModuleDict({
                "from_latent": nn.ConvTranspose2d(hp.latent_channels, CHANNELS[-1], 3, padding=1),
                "convs": nn.ModuleList(nn.ConvTranspose2d(k * b, a, 3, stride=2, padding=1)
                                       for a, b in reversed(list(zip(chans[:-1], chans[1:])))),
            })
        h, w = n_mels, frames
        for _ in CHANNELS:
            h, w = (h + 1) // 2, (w + 1) // 2
        self.register_buffer("centre", torch.zeros(n_centres, hp.latent_channels, h, w))
        self.register_buffer("centre_set", torch.zeros((), dtype=torch.bool))

    def encode(self, t: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        feats = []
        for conv, drop in zip(self.enc, self.drop):
            t = drop(torch.relu(conv(t)))
            feats.append(t)
        return self.to_latent(t), feats

    def decode(self, z: torch.Tensor, feats: list[torch.Tensor], size: torch.Size) -> torch.Tensor:
        assert self.decoder is not None
        h = torch.relu(self.decoder["from_latent"](z))
        sizes = [size] + [f.shape[-2:] for f in feats[:-1]]
        convs = cast(nn.ModuleList, self.decoder["convs"])
        for i, deconv in enumerate(convs):
            if self.skips:
                h = torch.cat([h, feats[-1 - i].to(h.dtype)], dim=1)
            h = deconv(h, output_size=sizes[-1 - i])
            if i < len(convs) - 1:
                h = torch.relu(h)
        return h

    def distance(self, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Squared distance of each latent to its class's centre (the nearest centre for class -1 or
        when there is one global centre)."""
        d = (z.float().unsqueeze(1) - self.centre).pow(2).flatten(2).sum(2)  # (B, n_centres)
        if d.shape[1] == 1:
            return d[:, 0]
        own = d.gather(1, y.clamp(min=0).unsqueeze(1))[:, 0]
        return torch.where(y >= 0, own, d.min(1).values)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Latent ``z``, squared distance ``dist`` to the centre of class ``y``, weight ``penalty`` and,
        when the model has a decoder, the reconstruction ``recon`` of the standardised input ``target``."""
        t = self.norm(x)
        z, feats = self.encode(t)
        out = {"z": z, "dist": self.distance(z, y), "target": t}
        if self.decoder is not None:
            out["recon"] = self.decode(z, feats, t.shape[-2:])
        out["penalty"] = sum(m.weight.float().pow(2).sum() for m in self.modules()
                             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
        return out


@register
class SVDDAEFamily(StandardizedInput, Family):
    name = "svdd_ae"
    Config = SVDDAEConfig
    description = "Juros et al. conv autoencoder with a Deep SVDD centre loss; score = distance to the centre"
    layout = "image"

    def build(self, info: DataInfo) -> nn.Module:
        n_centres = max(info.n_classes, 1) if self.hp.centres == "per_class" else 1
        return SVDDAE(info.n_mels, self.view().window_length(info.n_frames), n_centres, self.hp)

    @torch.no_grad()
    def before_training(self, model: nn.Module, data: ClipSet) -> None:
        """Fit the input standardisation, then fix the centre(s) from one pass of the initial encoder."""
        net = cast(SVDDAE, model)
        super().before_training(net, data)
        k = net.centre.shape[0]
        total = torch.zeros_like(net.centre, dtype=torch.float64)
        n = torch.zeros(k, dtype=torch.float64, device=total.device)
        for b in data.batches(512, shuffle=False):
            z = net.encode(net.norm(b.x))[0].double()
            cls = b.y if k > 1 else torch.zeros_like(b.y)
            total.index_add_(0, cls, z)
            n.index_add_(0, cls, torch.ones_like(cls, dtype=torch.float64))
        if n.sum() == 0:
            raise ValueError("svdd_ae: no training windows to place the centre")
        shape = (-1, *[1] * (total.ndim - 1))
        overall = total.sum(0, keepdim=True) / n.sum()
        # a class absent from this (DDP) shard falls back to the overall mean; rank 0's centres win anyway
        c = torch.where(n.view(shape) > 0, total / n.clamp(min=1).view(shape), overall).float()
        eps = self.hp.centre_eps
        c = torch.where(c.abs() < eps, torch.where(c < 0, -eps, eps), c)
        net.centre.copy_(c)
        net.centre_set.fill_(True)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        out = model(batch.x, batch.y)
        loss = out["dist"].mean() + self.hp.weight_penalty * out["penalty"]
        if self.hp.recon_weight > 0:
            loss = loss + self.hp.recon_weight * nn.functional.mse_loss(out["recon"].float(), out["target"].float())
        return loss

    def window_scores(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        net = cast(SVDDAE, model)
        if not bool(net.centre_set):
            raise RuntimeError("svdd_ae: the centre is not set; run before_training (Trainer.fit) first")
        return net(x, y)["dist"]

    def embed(self, model: nn.Module, x: torch.Tensor, extra: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        net = cast(SVDDAE, model)
        return net.encode(net.norm(x))[0].flatten(1)
