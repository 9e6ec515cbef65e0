"""k-nearest-neighbour anomaly scores in an embedding space, per section and domain.

The systems that have held the DCASE Task 2 records since 2021 score a test clip by the cosine distance
of its embedding to the nearest training embeddings of its own section, once against the source-domain
clips and once against the target-domain clips, and keep the smaller of the two (Wilkinghoff, "Design
choices for learning embeddings from auxiliary tasks for domain generalization in anomalous sound
detection", ICASSP 2023). Since the target domain has only a handful of training clips, the source
clips of each section are first reduced to a few k-means centres, so that the two domains' nearest
neighbours lie at comparable distances and a target-domain normal clip does not score as an anomaly
merely because its domain is sparse.

:class:`KnnScorer` keeps the (reduced) training embeddings, their sections and domains as buffers: a
``state_dict`` restores the scorer, including through ``torch.load(..., weights_only=True)``, and
scoring runs in batches on the module's device, in float32 even under autocast (bf16 would round cosine
distances below 0.5 to steps of about 0.004, coarser than the gaps between normal clips' neighbours).

A training clip must not be its own nearest neighbour: its score would be about 0, and the training scores set
the standardisation of ensembles and the decision thresholds. Each bank entry that is one clip (not a k-means
centre) keeps a fingerprint of that clip's input (:func:`clip_keys`), and a query with the same fingerprint
does not see that entry: training clips are scored leave-one-out, and a test clip that is a copy of a training
clip is scored against the others.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import nn

from raysd.families.clips import ClipSet

SOURCE, TARGET = 0, 1
_BANK = ("bank", "bank_section", "bank_domain", "bank_key")
KEY_RTOL = 1e-9


class KnnScorer(nn.Module):
    """Mean cosine distance to the ``k`` nearest training embeddings of the clip's section, minimum over
    the source and target domains.

    Args:
        k: neighbours averaged per domain (fewer where a section and domain has fewer entries).
        source_means: k-means centres replacing each section's source-domain embeddings when it has more
            than that many (0: keep them all).
        chunk: query embeddings scored per matrix product (bounds memory at ``chunk`` x bank size).
    """

    bank: torch.Tensor
    bank_section: torch.Tensor
    bank_domain: torch.Tensor
    bank_key: torch.Tensor

    def __init__(self, k: int = 1, source_means: int = 0, chunk: int = 1024, seed: int = 0):
        super().__init__()
        if k < 1 or source_means < 0:
            raise ValueError(f"KnnScorer needs k >= 1 and source_means >= 0, got k={k}, source_means={source_means}")
        self.k, self.source_means, self.chunk, self.seed = k, source_means, chunk, seed
        self.register_buffer("bank", torch.zeros(0, 0))
        self.register_buffer("bank_section", torch.zeros(0, dtype=torch.long))
        self.register_buffer("bank_domain", torch.zeros(0, dtype=torch.long))
        self.register_buffer("bank_key", torch.zeros(0, 2, dtype=torch.float64))

    @property
    def fitted(self) -> bool:
        return self.bank.shape[0] > 0

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor, sections: torch.Tensor, domains: torch.Tensor,
            keys: torch.Tensor | None = None) -> KnnScorer:
        """Keep the training clips' embeddings (N, D) with their section (N,) and domain (N,) indices
        (``SOURCE`` or ``TARGET``) and input fingerprints (N, 2) (:func:`clip_keys`; None: none), reducing each
        section's source clips to ``source_means`` centres."""
        if embeddings.ndim != 2 or sections.shape != (len(embeddings),) or domains.shape != (len(embeddings),):
            raise ValueError(f"fit expects embeddings (N, D) with sections and domains (N,), got "
                             f"{tuple(embeddings.shape)}, {tuple(sections.shape)}, {tuple(domains.shape)}")
        if len(embeddings) == 0:
            raise ValueError("fit needs at least one training embedding")
        device = self.bank.device
        unit = nn.functional.normalize(embeddings.detach().float(), dim=1).cpu()
        sections, domains = sections.long().cpu(), domains.long().cpu()
        keys = (torch.full((len(unit), 2), math.nan, dtype=torch.float64) if keys is None
                else keys.detach().double().cpu())
        parts: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []
        for section in sections.unique().tolist():
            for domain in (SOURCE, TARGET):
                mask = (sections == section) & (domains == domain)
                rows, row_keys = unit[mask], keys[mask]
                if len(rows) == 0:
                    continue
                if domain == SOURCE and 0 < self.source_means < len(rows):
                    rows = self._means(rows)
                    row_keys = torch.full((len(rows), 2), math.nan, dtype=torch.float64)
                parts.append((rows, row_keys, section, domain))
        self.bank = torch.cat([p[0] for p in parts]).to(device)
        self.bank_key = torch.cat([p[1] for p in parts]).to(device)
        self.bank_section = torch.cat([torch.full((len(p[0]),), p[2]) for p in parts]).to(device)
        self.bank_domain = torch.cat([torch.full((len(p[0]),), p[3]) for p in parts]).to(device)
        return self

    def _means(self, rows: torch.Tensor) -> torch.Tensor:
        """k-means centres of unit vectors, back on the unit sphere (spherical k-means' last step)."""
        km = KMeans(n_clusters=self.source_means, n_init=3, random_state=self.seed).fit(rows.double().numpy())
        return nn.functional.normalize(torch.from_numpy(np.asarray(km.cluster_centers_)).float(), dim=1)

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor, sections: torch.Tensor, keys: torch.Tensor | None = None
                ) -> torch.Tensor:
        """Anomaly scores (B,) for query embeddings (B, D) of the given sections (B,); higher = more anomalous.
        A section without training embeddings is scored against every section's; a bank entry whose fingerprint
        equals the query's ``keys`` row (B, 2) is left out."""
        if not self.fitted:
            raise RuntimeError("KnnScorer.forward before fit (or before loading a fitted state)")
        device = self.bank.device
        with torch.autocast(device.type, enabled=False):
            unit = nn.functional.normalize(embeddings.detach().float().to(device), dim=1)
            sections = sections.long().to(device)
            known = (sections[:, None] == self.bank_section[None, :]).any(1)
            keys = None if keys is None else keys.detach().double().to(device)
            out = []
            for lo in range(0, len(unit), self.chunk):
                q, s, kn = unit[lo:lo + self.chunk], sections[lo:lo + self.chunk], known[lo:lo + self.chunk]
                dist = 1.0 - q @ self.bank.T  # (b, M) cosine distances
                allowed = (s[:, None] == self.bank_section[None, :]) | ~kn[:, None]
                if keys is not None:
                    allowed &= ~self._same_clip(keys[lo:lo + self.chunk])
                per_domain = [self._k_nearest(dist, allowed & (self.bank_domain == d)[None, :]) for d in (SOURCE, TARGET)]
                out.append(torch.minimum(*per_domain))
            return torch.cat(out)

    def _same_clip(self, keys: torch.Tensor) -> torch.Tensor:
        """(b, M): whether bank entry m is the clip with fingerprint ``keys[i]`` (centres never are)."""
        close = torch.isclose(keys[:, None, :], self.bank_key[None, :, :], rtol=KEY_RTOL, atol=0.0)
        return close.all(dim=-1)

    def _k_nearest(self, dist: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Mean of the ``k`` smallest allowed distances per row; +inf where none is allowed."""
        masked = dist.masked_fill(~allowed, float("inf"))
        k = min(self.k, masked.shape[1])
        near = masked.topk(k, dim=1, largest=False).values
        finite = torch.isfinite(near)
        total = near.masked_fill(~finite, 0.0).sum(1)
        count = finite.sum(1)
        return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("inf")))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # the bank's size is the fitted data's, not the constructor's: take the stored shapes
        if prefix + "bank" in state_dict and prefix + "bank_key" not in state_dict:  # saved before fingerprints
            state_dict[prefix + "bank_key"] = torch.full((len(state_dict[prefix + "bank"]), 2), math.nan,
                                                         dtype=torch.float64)
        for name in _BANK:
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.bank.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def clip_keys(windows: torch.Tensor) -> torch.Tensor:
    """A fingerprint of each clip's input, (B, P, *shape) windows -> (B, 2) float64: the sum and the sum of squares
    of its values, equal for the same clip however it is batched (up to ``KEY_RTOL``)."""
    w = windows.detach().flatten(1).double()
    return torch.stack([w.sum(1), w.square().sum(1)], dim=1)


def clip_embeddings(embed: Callable[[torch.Tensor], torch.Tensor], windows: torch.Tensor) -> torch.Tensor:
    """(B, P, *shape) windows -> (B, D): the mean of each clip's window embeddings."""
    b, p = windows.shape[:2]
    return embed(windows.reshape(b * p, *windows.shape[2:])).float().reshape(b, p, -1).mean(dim=1)


@torch.no_grad()
def fit_scorer(scorer: KnnScorer, embed_clips: Callable[[torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor],
               data: ClipSet, clips_per_batch: int = 64) -> KnnScorer:
    """Fit ``scorer`` on the clip embeddings of ``data`` with its sections and domains; ``embed_clips`` maps
    a batch of clips' windows (B, P, *shape) and their extra features to embeddings (B, D)."""
    if len(data) == 0:
        raise ValueError("kNN scoring needs training clips to fit on")
    emb, keys = [], []
    for idx, w, _ in data.clip_batches(clips_per_batch):
        emb.append(embed_clips(w, data.extra_of(idx)))
        keys.append(clip_keys(w))
    return scorer.fit(torch.cat(emb), data.sections, data.domains, torch.cat(keys))
