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
scoring runs in batches on the module's device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from torch import nn

from raysd.families.clips import ClipSet

SOURCE, TARGET = 0, 1
_BANK = ("bank", "bank_section", "bank_domain")


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

    def __init__(self, k: int = 1, source_means: int = 0, chunk: int = 1024, seed: int = 0):
        super().__init__()
        if k < 1 or source_means < 0:
            raise ValueError(f"KnnScorer needs k >= 1 and source_means >= 0, got k={k}, source_means={source_means}")
        self.k, self.source_means, self.chunk, self.seed = k, source_means, chunk, seed
        self.register_buffer("bank", torch.zeros(0, 0))
        self.register_buffer("bank_section", torch.zeros(0, dtype=torch.long))
        self.register_buffer("bank_domain", torch.zeros(0, dtype=torch.long))

    @property
    def fitted(self) -> bool:
        return self.bank.shape[0] > 0

    @torch.no_grad()
    def fit(self, embeddings: torch.Tensor, sections: torch.Tensor, domains: torch.Tensor) -> KnnScorer:
        """Keep the training clips' embeddings (N, D) with their section (N,) and domain (N,) indices
        (``SOURCE`` or ``TARGET``), reducing each section's source clips to ``source_means`` centres."""
        if embeddings.ndim != 2 or sections.shape != (len(embeddings),) or domains.shape != (len(embeddings),):
            raise ValueError(f"fit expects embeddings (N, D) with sections and domains (N,), got "
                             f"{tuple(embeddings.shape)}, {tuple(sections.shape)}, {tuple(domains.shape)}")
        if len(embeddings) == 0:
            raise ValueError("fit needs at least one training embedding")
        device = self.bank.device
        unit = nn.functional.normalize(embeddings.detach().float(), dim=1).cpu()
        sections, domains = sections.long().cpu(), domains.long().cpu()
        parts: list[tuple[torch.Tensor, int, int]] = []
        for section in sections.unique().tolist():
            for domain in (SOURCE, TARGET):
                rows = unit[(sections == section) & (domains == domain)]
                if len(rows) == 0:
                    continue
                if domain == SOURCE and 0 < self.source_means < len(rows):
                    rows = self._means(rows)
                parts.append((rows, section, domain))
        self.bank = torch.cat([p[0] for p in parts]).to(device)
        self.bank_section = torch.cat([torch.full((len(p[0]),), p[1]) for p in parts]).to(device)
        self.bank_domain = torch.cat([torch.full((len(p[0]),), p[2]) for p in parts]).to(device)
        return self

    def _means(self, rows: torch.Tensor) -> torch.Tensor:
        """k-means centres of unit vectors, back on the unit sphere (spherical k-means' last step)."""
        km = KMeans(n_clusters=self.source_means, n_init=3, random_state=self.seed).fit(rows.double().numpy())
        return nn.functional.normalize(torch.from_numpy(np.asarray(km.cluster_centers_)).float(), dim=1)

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor, sections: torch.Tensor) -> torch.Tensor:
        """Anomaly scores (B,) for query embeddings (B, D) of the given sections (B,); higher = more anomalous.
        A section without training embeddings is scored against every section's."""
        if not self.fitted:
            raise RuntimeError("KnnScorer.forward before fit (or before loading a fitted state)")
        unit = nn.functional.normalize(embeddings.detach().float().to(self.bank.device), dim=1)
        sections = sections.long().to(self.bank.device)
        known = (sections[:, None] == self.bank_section[None, :]).any(1)
        out = []
        for lo in range(0, len(unit), self.chunk):
            q, s, kn = unit[lo:lo + self.chunk], sections[lo:lo + self.chunk], known[lo:lo + self.chunk]
            dist = 1.0 - q @ self.bank.T  # (b, M) cosine distances
            same = (s[:, None] == self.bank_section[None, :]) | ~kn[:, None]
            per_domain = [self._k_nearest(dist, same & (self.bank_domain == d)[None, :]) for d in (SOURCE, TARGET)]
            out.append(torch.minimum(*per_domain))
        return torch.cat(out)

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
        for name in _BANK:
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.bank.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


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
    emb = torch.cat([embed_clips(w, data.extra_of(idx)) for idx, w, _ in data.clip_batches(clips_per_batch)])
    return scorer.fit(emb, data.sections, data.domains)
