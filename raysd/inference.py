"""Inference on clips read straight from their audio files: anomaly scores and bottleneck embeddings of any
length of recording, batch by batch, so memory stays flat. ``raysd.score`` (new recordings) and the
leaderboard's unlabelled reports (``raysd.report.unlabelled``) both use it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch

from raysd.data.features import AnySpec, FeatureSpec, extract_all
from raysd.data.study import encode
from raysd.families.clips import ClipSet
from raysd.train import Trainer


@torch.no_grad()
def clip_embeddings(trainer: Trainer, clips: ClipSet, clips_per_batch: int = 16) -> np.ndarray | None:
    """Mean bottleneck embedding of each clip's windows (float32 (N, d)); None for families without one."""
    model, family = trainer.model, trainer.family
    model.eval()
    out = []
    for idx, windows, _ in clips.clip_batches(clips_per_batch):
        b, p = windows.shape[:2]
        extra = tuple(e.repeat_interleave(p, dim=0) for e in clips.extra_of(idx))
        with trainer.autocast():
            z = family.embed(model, windows.reshape(b * p, *windows.shape[2:]), extra)
        if z is None:
            return None
        out.append(z.float().reshape(b, p, -1).mean(dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def stream(trainer: Trainer, spec: FeatureSpec, table: pd.DataFrame, device: torch.device | str = "cpu",
           batch_size: int = 64,
           score: bool = True, embed: bool = False, failed: list | None = None, workers: int | None = None
           ) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
    """(positions in ``table``, anomaly scores, embeddings) batch by batch.

    ``table`` holds catalog-like rows (path, file, offset, num_samples, sample_rate, section); each batch of
    clips is read from its file, featurised with ``spec`` (and the view's extra features) as at training time and dropped after use (at most
    ``workers + 1`` batches are in flight, see ``extract``). Clips that cannot be decoded are appended to
    ``failed`` and skipped. Embeddings are None for a family without a bottleneck."""
    device = torch.device(device)
    view = trainer.family.view()
    if "section" in table.columns:
        labels, sections, domains = encode(table.reset_index(drop=True), trainer.info)
    else:
        labels = sections = domains = torch.zeros(len(table), dtype=torch.long)
    specs: list[AnySpec] = [spec, *view.extra_specs(spec)]
    for rows, feats in extract_all(table, specs, device=device, batch_size=batch_size, workers=workers,
                                   failed=failed):
        if not rows:
            continue
        ok = torch.from_numpy(np.asarray(rows))
        mel, *extras = (torch.from_numpy(np.ascontiguousarray(f)).to(device) for f in feats)
        clips = ClipSet(mel, labels[ok], view, sections[ok], domains[ok], extras)
        yield ok.numpy(), (trainer.score(clips) if score else None), (clip_embeddings(trainer, clips) if embed else None)


def embed_table(trainer: Trainer, spec: FeatureSpec, table: pd.DataFrame, device: torch.device | str = "cpu",
                batch_size: int = 64) -> tuple[np.ndarray | None, list]:
    """Embeddings of every row of ``table`` (NaN rows for clips that failed to decode), and the failures."""
    failed: list = []
    out: np.ndarray | None = None
    for ok, _, z in stream(trainer, spec, table, device, batch_size, score=False, embed=True, failed=failed):
        if z is None:
            return None, failed
        if out is None:
            out = np.full((len(table), z.shape[1]), np.nan, np.float32)
        out[ok] = z
    return out, failed
