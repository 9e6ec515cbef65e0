"""Triplet-loss embeddings per machine ID (Van and Tran, DCASE 2021).

A small CNN (three blocks of 3x3 convolution, ReLU, BatchNorm, 2x2 max-pool and dropout, then a dense
layer) embeds log-mel patches in a 16-d space, trained with a triplet margin loss: anchor and positive
from the same machine ID/section, negative from another, mined inside each batch (by default the
hardest ones, "batch-hard": with random triplets the loss reaches zero within an epoch when the IDs are
easy to tell apart, and learning stops).

When training ends, K reference clips per ID are drawn at random from that ID's training clips and
their embeddings (a clip's embedding is the mean of its patch embeddings) are stored in the model's
buffers, so a checkpoint carries them. Anomaly score of a clip: the mean Euclidean distance from its
embedding to the K references of its ID. A test clip whose section was not seen in training (label -1),
or whose ID has no references (absent from this worker's training shard), is scored against the ID whose
references are nearest on average. With ``score='knn'`` a clip is scored instead by the cosine distance of
its embedding to the nearest training clips of its section, per domain (:mod:`raysd.families.knn`); with
``scope='dataset'`` one network embeds every machine type, its classes chosen by ``labels``
(:class:`raysd.families.hparams.AuxTaskConfig`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raysd.families.augment import recalibrate_batchnorm
from raysd.families.base import Family, register
from raysd.families.clips import Batch, ClipSet, DataInfo
from raysd.families.hparams import FORBID, AuxTaskConfig, Bool, Float, Int
from raysd.families.knn import KnnScorer, clip_embeddings, clip_keys, fit_scorer


class TripletNet(nn.Module):
    refs: torch.Tensor
    ref_mask: torch.Tensor

    """CNN embedding with the per-ID reference set in buffers ``refs`` (C, K, D) and ``ref_mask`` (C, K)."""

    def __init__(self, info: DataInfo, frames: int, channels: tuple[int, ...], emb_dim: int, dropout: float,
                 n_refs: int, normalize: bool, knn: KnnScorer | None = None):
        super().__init__()
        self.knn = knn
        blocks: list[nn.Module] = []
        c_in, m, t = 1, info.n_mels, frames
        for c in channels:
            if m < 2 or t < 2:
                raise ValueError(f"triplet: {len(channels)} pooling blocks do not fit {info.n_mels} x {frames} inputs")
            blocks += [nn.Conv2d(c_in, c, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(c), nn.MaxPool2d(2), nn.Dropout(dropout)]
            c_in, m, t = c, m // 2, t // 2
        self.input_norm = nn.BatchNorm2d(1)
        self.cnn = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in * m * t, emb_dim)
        # small initial embeddings: every triplet starts inside the margin, so every one gives a gradient
        nn.init.normal_(self.fc.weight, std=0.02 / math.sqrt(self.fc.in_features))
        nn.init.zeros_(self.fc.bias)
        self.normalize = normalize
        self.register_buffer("refs", torch.zeros(info.n_classes, n_refs, emb_dim))
        self.register_buffer("ref_mask", torch.zeros(info.n_classes, n_refs, dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.fc(self.cnn(self.input_norm(x)).flatten(1))
        return F.normalize(e, dim=1) if self.normalize else e


def mine_triplets(y: torch.Tensor, clip: torch.Tensor | None = None,
                  dist: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchor, positive, negative) indices inside a batch.

    Every window whose batch holds another ID is an anchor. Positive: same ID, a different window,
    preferably of a different clip; negative: another ID. With ``dist`` (B, B) the hardest are taken
    (farthest positive, nearest negative), otherwise random ones. A window whose ID has no other window
    in the batch is its own positive (distance 0: its term only pushes the negative beyond the margin).
    The result is empty when the batch holds a single ID.
    """
    b = y.shape[0]
    same = y.unsqueeze(0) == y.unsqueeze(1)
    eye = torch.eye(b, dtype=torch.bool, device=y.device)
    pos_ok = same & ~eye
    neg_ok = ~same
    if dist is None:
        pos_rank = torch.rand(b, b, device=y.device)
        neg_rank = torch.rand(b, b, device=y.device)
    else:
        pos_rank, neg_rank = dist.detach(), -dist.detach()
    if clip is not None:
        pos_rank = pos_rank + (clip.unsqueeze(0) != clip.unsqueeze(1)).float() * (pos_rank.abs().max() + 1)
    lowest = torch.finfo(pos_rank.dtype).min
    pos = torch.where(pos_ok, pos_rank, torch.full_like(pos_rank, lowest)).argmax(dim=1)
    neg = torch.where(neg_ok, neg_rank, torch.full_like(neg_rank, lowest)).argmax(dim=1)
    pos = torch.where(pos_ok.any(dim=1), pos, torch.arange(b, device=y.device))
    anchor = torch.nonzero(neg_ok.any(dim=1)).squeeze(1)
    return anchor, pos[anchor], neg[anchor]


@dataclass
class TripletConfig(AuxTaskConfig):
    __pydantic_config__ = FORBID

    emb_dim: Annotated[Int, Field(description="embedding dimension")] = 16
    channels: Annotated[tuple[Int, ...], Field(description="channels of the CNN's stages")] = (32, 64, 128)
    dropout: Annotated[Float, Field(description="dropout before the embedding layer")] = 0.2
    margin: Annotated[Float, Field(description="triplet loss margin")] = 1.0
    mining: Annotated[Literal["random", "hard"], Field(description="triplets: random, or batch-hard (farthest positive,"
                                                                   " nearest negative)")] = "hard"
    normalize: Annotated[Bool, Field(description="L2-normalise the embeddings")] = False
    n_refs: Annotated[Int, Field(description="reference clips per ID that a clip is compared with (score refs)")] = 5
    ref_seed: Annotated[Int, Field(description="seed of the choice of reference clips")] = 0
    patch_frames: Annotated[Int, Field(description="frames per input image")] = 64
    patch_hop: Annotated[Int, Field(description="frames between the starts of consecutive images")] = 32
    precise_bn: Annotated[Int, Field(description="training windows to recompute BatchNorm statistics with after "
                                                 "training (0: off)")] = 16384
    score: Annotated[Literal["refs", "knn"], Field(description="anomaly score: distance to the reference clips (refs) "
                                                               "or kNN in the embedding (knn)")] = "refs"

    def validate(self) -> None:
        super().validate()
        if self.emb_dim < 1 or self.n_refs < 1:
            raise ValueError(f"emb_dim and n_refs must be >= 1, got {self.emb_dim}, {self.n_refs}")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be a non-empty list of positive widths, got {list(self.channels)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.margin <= 0:
            raise ValueError(f"margin must be > 0, got {self.margin}")
        if self.patch_frames < 1 or self.patch_hop < 1:
            raise ValueError(f"patch_frames and patch_hop must be >= 1, got {self.patch_frames}, {self.patch_hop}")
        if self.precise_bn < 0:
            raise ValueError(f"precise_bn must be >= 0, got {self.precise_bn}")


@register
class TripletFamily(Family):
    name = "triplet"
    Config = TripletConfig
    description = "CNN patch embedding trained with a triplet margin loss; score = distance to K reference clips"
    layout = "image"
    window_fields = ("patch_frames", "patch_hop")

    def data_problem(self, info: DataInfo) -> str | None:
        if info.n_classes < 2:
            return (f"triplet needs at least 2 classes ({info.labelling}) in the training data (negatives come from "
                    f"another class), got {info.n_classes}; with one section per machine type use scope: dataset with "
                    "labels type_section or attribute")
        return None

    def build(self, info: DataInfo) -> nn.Module:
        hp = self.hp
        knn = KnnScorer(hp.knn_k, hp.knn_means, seed=hp.ref_seed) if hp.score == "knn" else None
        return TripletNet(info, hp.patch_frames, tuple(hp.channels), hp.emb_dim, hp.dropout, hp.n_refs, hp.normalize,
                          knn)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        e = model(batch.x).float()
        dist = torch.cdist(e, e) if self.hp.mining == "hard" else None
        a, p, n = mine_triplets(batch.y, batch.clip, dist)
        if a.numel() == 0:
            return e.sum() * 0.0  # keeps every parameter in the graph (DDP) while contributing nothing
        return F.triplet_margin_loss(e[a], e[p], e[n], margin=self.hp.margin)

    def embed(self, model: nn.Module, x: torch.Tensor, extra: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        return model(x)

    def clip_embeddings(self, model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
        """(B, P, *shape) windows -> (B, D) mean patch embedding per clip."""
        return clip_embeddings(model, windows)

    def after_training(self, model: nn.Module, data: ClipSet) -> None:
        """Recompute BatchNorm statistics, then fix the reference set: K random training clips per ID
        (fewer if an ID has fewer clips), or fit the kNN scorer."""
        net = cast(TripletNet, model)
        recalibrate_batchnorm(net, data, self.hp.precise_bn)
        if net.knn is not None:
            fit_scorer(net.knn, lambda w, _: clip_embeddings(net, w), data)
            return
        emb = torch.cat([self.clip_embeddings(net, w) for _, w, _ in data.clip_batches(64)]) if len(data) else \
            torch.zeros(0, net.refs.shape[-1])
        refs = torch.zeros_like(net.refs)
        mask = torch.zeros_like(net.ref_mask)
        gen = torch.Generator().manual_seed(self.hp.ref_seed)
        labels = data.labels.cpu()
        k = refs.shape[1]
        for c in range(refs.shape[0]):
            idx = torch.nonzero(labels == c).squeeze(1)
            if idx.numel() == 0:
                continue
            pick = idx[torch.randperm(idx.numel(), generator=gen)[:k]].to(emb.device)
            refs[c, :pick.numel()] = emb[pick].to(refs.dtype)
            mask[c, :pick.numel()] = True
        if not mask.any():
            raise ValueError("triplet: no training clips to draw the reference set from")
        net.refs.copy_(refs)
        net.ref_mask.copy_(mask)

    def score(self, model: nn.Module, windows: torch.Tensor, labels: torch.Tensor,
              sections: torch.Tensor | None = None, extra: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        net = cast(TripletNet, model)
        if net.knn is not None:
            return net.knn(self.clip_embeddings(net, windows), labels if sections is None else sections,
                           clip_keys(windows))
        mask = net.ref_mask
        if not bool(mask.any()):
            raise RuntimeError("triplet: the reference set is empty; after_training() fixes it when training ends")
        e = self.clip_embeddings(net, windows)  # (B, D)
        refs = net.refs.float()
        d = torch.linalg.vector_norm(e[:, None, None, :] - refs[None], dim=-1)  # (B, C, K)
        w = mask.float()[None]
        per_id = (d * w).sum(-1) / w.sum(-1).clamp(min=1)
        per_id = torch.where(mask.any(-1)[None], per_id, torch.full_like(per_id, float("inf")))
        if labels.numel() and int(labels.max()) >= refs.shape[0]:
            raise ValueError(f"class index {int(labels.max())} out of range for {refs.shape[0]} machine IDs")
        own = per_id.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1)
        return torch.where((labels >= 0) & torch.isfinite(own), own, per_id.min(dim=1).values)
