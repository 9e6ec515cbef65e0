"""Classification heads shared by the embedding families: plain softmax, ArcFace, sub-cluster AdaCos and AdaProj.

Every head maps features (B, D) to logits (B, C) whose softmax is the class distribution, so that
``soft_cross_entropy(logits, target)`` trains any of them. In training, ``target`` (class indices (B,) or a
target distribution (B, C), e.g. from mixup) places a margin (ArcFace) or adapts the scale (AdaCos,
AdaProj); without it (scoring) a head only computes logits. Angular heads compute in float32 even under
autocast.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

HeadKind = Literal["softmax", "arcface", "adacos", "adaproj"]


class LinearHead(nn.Module):
    """Plain softmax classifier head; ``target`` is accepted for a common signature and ignored."""

    def __init__(self, in_features: int, n_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, n_classes)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc(x)


class ArcFace(nn.Module):
    """Additive angular margin head (Deng et al., 2019): ``scale * cos(theta_c + margin * t_c)``.

    ``theta_c`` is the angle between the normalised feature and class ``c``'s normalised weight. In
    training, ``target`` puts the margin on the target classes, in proportion to their target weight;
    without a target the logits are ``scale * cos(theta_c)``. Angles are capped at pi, so every logit lies in
    ``[-scale, scale]``.
    """

    def __init__(self, in_features: int, n_classes: int, margin: float = 0.5, scale: float = 30.0):
        super().__init__()
        if scale <= 0 or margin < 0:
            raise ValueError(f"ArcFace needs scale > 0 and margin >= 0, got scale={scale} margin={margin}")
        self.margin = float(margin)
        self.scale = float(scale)
        self.weight = nn.Parameter(torch.empty(n_classes, in_features))
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            cos = F.linear(F.normalize(x.float(), dim=1), F.normalize(self.weight.float(), dim=1))
            if target is None or self.margin == 0.0:
                return self.scale * cos
            if target.ndim == 1:
                target = F.one_hot(target, cos.shape[1])
            theta = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
            shifted = torch.cos(torch.clamp(theta + self.margin * target.float(), max=math.pi))
            return self.scale * torch.where(target > 0, shifted, cos)


class _AdaptiveScale(nn.Module):
    """The scale of AdaCos (Zhang et al., "AdaCos: adaptively scaling cosine logits for effectively learning
    deep face representations", CVPR 2019), kept in a buffer: it starts at ``sqrt(2) * log(M - 1)`` for ``M``
    centres and is set on every training batch to ``log(B_avg) / cos(min(pi/4, theta_med))``, where ``B_avg``
    is the batch mean of ``sum_j exp(s * cos theta_j)`` over each sample's non-target centres and ``theta_med``
    the median angle between a sample and its class."""

    scale: torch.Tensor

    def __init__(self, n_centres: int):
        super().__init__()
        self.register_buffer("scale", torch.tensor(math.sqrt(2.0) * math.log(max(n_centres - 1, 2))))

    @torch.no_grad()
    def adapt(self, cos: torch.Tensor, non_target: torch.Tensor, theta_class: torch.Tensor) -> None:
        """``cos`` (B, M) cosines to every centre, ``non_target`` (B, M) mask, ``theta_class`` (B,) angles."""
        b_avg = torch.where(non_target, torch.exp(self.scale * cos), torch.zeros_like(cos)).sum(1).mean()
        theta_med = theta_class.median().clamp(max=math.pi / 4)
        new = torch.log(b_avg.clamp_min(1e-12)) / torch.cos(theta_med)
        if torch.isfinite(new) and new > 0:
            self.scale.copy_(new)


def _targets(target: torch.Tensor, n_classes: int) -> torch.Tensor:
    return (F.one_hot(target, n_classes) if target.ndim == 1 else target).float()


class SubClusterAdaCos(nn.Module):
    """Sub-cluster AdaCos (Wilkinghoff, "Sub-cluster AdaCos: learning representations for anomalous sound
    detection", IJCNN 2021).

    Each class has ``sub_clusters`` centres on the unit sphere (fixed random directions unless
    ``trainable``); the softmax runs over every centre with the adaptive scale, and a class's probability is
    the sum over its centres, so its logit is the log-sum-exp of its centres' scaled cosines. The scale
    adapts on every training batch (:class:`_AdaptiveScale`); ``theta_class`` is a sample's mean angle to its
    target classes' centres, weighted by its target distribution, and every centre of a class whose target
    weight is below 1 (all of them under mixup) counts as non-target.
    """

    def __init__(self, in_features: int, n_classes: int, sub_clusters: int = 16, trainable: bool = False):
        super().__init__()
        if sub_clusters < 1:
            raise ValueError(f"sub_clusters must be >= 1, got {sub_clusters}")
        self.n_classes, self.sub_clusters = n_classes, sub_clusters
        self.weight = nn.Parameter(torch.empty(n_classes * sub_clusters, in_features), requires_grad=trainable)
        nn.init.xavier_uniform_(self.weight)
        self.adaptive = _AdaptiveScale(n_classes * sub_clusters)

    @property
    def scale(self) -> float:
        return float(self.adaptive.scale)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            cos = F.linear(F.normalize(x.float(), dim=1), F.normalize(self.weight.float(), dim=1))  # (B, C*K)
            if target is not None and self.training:
                t = _targets(target, self.n_classes).repeat_interleave(self.sub_clusters, dim=1)
                theta = torch.acos(cos.detach().clamp(-1 + 1e-6, 1 - 1e-6))
                self.adaptive.adapt(cos.detach(), t < 1, (t * theta).sum(1) / self.sub_clusters)
            scaled = self.adaptive.scale * cos
            return torch.logsumexp(scaled.reshape(-1, self.n_classes, self.sub_clusters), dim=2)


class AdaProj(nn.Module):
    """AdaProj (Wilkinghoff, "AdaProj: adaptively scaled angular margin subspace projections for anomalous
    sound detection with auxiliary classification tasks", DCASE Workshop 2024).

    Each class owns the subspace spanned by ``sub_clusters`` directions (fixed random ones unless
    ``trainable``); a sample's cosine to a class is that between its embedding and the embedding's
    orthogonal projection onto the class's subspace, i.e. the norm of the projection of the unit embedding.
    Logits are those cosines times the AdaCos scale, adapted on every training batch over the non-target
    classes (:class:`_AdaptiveScale`).
    """

    def __init__(self, in_features: int, n_classes: int, sub_clusters: int = 16, trainable: bool = False):
        super().__init__()
        if not 1 <= sub_clusters <= in_features:
            raise ValueError(f"sub_clusters must be in [1, {in_features}] (the embedding size), got {sub_clusters}")
        self.n_classes, self.sub_clusters = n_classes, sub_clusters
        self.weight = nn.Parameter(torch.empty(n_classes, in_features, sub_clusters), requires_grad=trainable)
        nn.init.xavier_uniform_(self.weight)
        self.adaptive = _AdaptiveScale(n_classes)

    @property
    def scale(self) -> float:
        return float(self.adaptive.scale)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            basis = torch.linalg.qr(self.weight.float()).Q  # (C, D, K), orthonormal columns
            coords = torch.einsum("bd,cdk->bck", F.normalize(x.float(), dim=1), basis)
            cos = torch.linalg.vector_norm(coords, dim=2).clamp(max=1.0)  # (B, C)
            if target is not None and self.training:
                t = _targets(target, self.n_classes)
                theta = torch.acos(cos.detach().clamp(-1 + 1e-6, 1 - 1e-6))
                self.adaptive.adapt(cos.detach(), t < 1, (t * theta).sum(1))
            return self.adaptive.scale * cos


def make_head(kind: HeadKind, in_features: int, n_classes: int, margin: float = 0.5, scale: float = 30.0,
              sub_clusters: int = 16, trainable_centres: bool = False) -> nn.Module:
    if kind == "arcface":
        return ArcFace(in_features, n_classes, margin, scale)
    if kind == "softmax":
        return LinearHead(in_features, n_classes)
    if kind == "adacos":
        return SubClusterAdaCos(in_features, n_classes, sub_clusters, trainable_centres)
    if kind == "adaproj":
        return AdaProj(in_features, n_classes, sub_clusters, trainable_centres)
    raise ValueError(f"head must be 'softmax', 'arcface', 'adacos' or 'adaproj', got {kind!r}")
