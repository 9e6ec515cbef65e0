"""``vae``: a dense variational autoencoder on frame vectors.

640-400-400 -> 20-d latent (mean, log-variance), mirrored decoder 20-400-400-640, BatchNorm and ReLU
between the linear layers. The decoder is a unit-variance Gaussian on standardised log-mels, so the
per-window loss is ``(0.5 * squared error + beta * KL) / dim``, the negative ELBO per dimension up to a
constant when ``beta = 1``. Score (``score``): ``recon``, the mean squared reconstruction error from the
posterior mean, or ``elbo``, the loss above evaluated at the posterior mean (deterministic).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, cast

import torch
from pydantic import Field
from torch import nn

from raysd.families.base import Family, register
from raysd.families.blocks import Standardize, StandardizedInput, dense_stack
from raysd.families.clips import Batch, DataInfo
from raysd.families.hparams import FORBID, Float, Int


@dataclass
class VAEConfig:
    __pydantic_config__ = FORBID

    frames: Annotated[Int, Field(description="log-mel frames concatenated into one input vector")] = 5
    hop: Annotated[Int, Field(description="frames between the starts of consecutive vectors")] = 1
    hidden: Annotated[Int, Field(description="width of the encoder's and decoder's hidden layer")] = 400
    latent: Annotated[Int, Field(description="dimension of the latent Gaussian")] = 20
    beta: Annotated[Float, Field(description="weight of the KL term in the training loss (beta-VAE)")] = 1.0
    score: Annotated[Literal["recon", "elbo"], Field(description="anomaly score: reconstruction error (recon) or the "
                                                                 "negative ELBO (elbo)")] = "recon"

    def validate(self) -> None:
        for k in ("frames", "hop", "hidden", "latent"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")


class VAE(nn.Module):
    def __init__(self, dim: int, hp: VAEConfig):
        super().__init__()
        self.norm = Standardize()
        self.encoder = dense_stack([dim, hp.hidden, hp.hidden])
        self.mu = nn.Linear(hp.hidden, hp.latent)
        self.logvar = nn.Linear(hp.hidden, hp.latent)
        self.decoder = nn.Sequential(dense_stack([hp.latent, hp.hidden, hp.hidden]), nn.Linear(hp.hidden, dim))

    def encode(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(t)
        return self.mu(h), self.logvar(h).clamp(-12.0, 8.0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (reconstruction, standardised input, mu, logvar); samples z only in training mode."""
        t = self.norm(x)
        mu, logvar = self.encode(t)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decoder(z), t, mu, logvar


def per_window_loss(recon: torch.Tensor, target: torch.Tensor, mu: torch.Tensor,
                    logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared error summed over dims, KL to N(0, I)) per window, in float32."""
    se = (recon.float() - target.float()).pow(2).sum(1)
    mu, logvar = mu.float(), logvar.float()
    kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
    return se, kl


@register
class VAEFamily(StandardizedInput, Family):
    name = "vae"
    Config = VAEConfig
    description = "dense VAE on frame vectors; score = reconstruction error or negative ELBO"

    def build(self, info: DataInfo) -> nn.Module:
        return VAE(self.hp.frames * info.n_mels, self.hp)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        recon, target, mu, logvar = model(batch.x)
        se, kl = per_window_loss(recon, target, mu, logvar)
        return ((0.5 * se + self.hp.beta * kl) / target.shape[1]).mean()

    def window_scores(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        recon, target, mu, logvar = model(x)
        se, kl = per_window_loss(recon, target, mu, logvar)
        if self.hp.score == "elbo":
            return (0.5 * se + self.hp.beta * kl) / target.shape[1]
        return se / target.shape[1]

    def embed(self, model: nn.Module, x: torch.Tensor, extra: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        net = cast(VAE, model)
        return net.encode(net.norm(x))[0]
