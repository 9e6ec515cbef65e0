"""Held-out clips and the examined recording for unlabelled data (long field recordings), and held-out training
clips of a DCASE layout.

With no labels, a search is steered by the loss on held-out clips (or by ``pseudo_official``, :mod:`raysd.pseudo`).
Held-out clips are whole recordings (``mode='recordings'``) or blocks of consecutive clips inside each recording
(``mode='time'``); in the latter case the ``gap`` clips on both sides of every held-out block are used for neither,
so no training clip is adjacent to a held-out one. ``mode='clips'`` (a DCASE layout, whose clips are recordings of
their own) holds out a ``fraction`` of the training clips of each machine type, section and domain, at least one
where there are two or more, and leaves the test clips as they are.

``examine`` names the recording whose strangest moments the user wants: its clips become the ``test``
split. ``training='others'`` trains on every other recording (the field study's "15-file" setting);
``training='self'`` trains on the examined recording alone (its "single-file" setting), which then
appears both as training and as test clips.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from raysd.typed import FORBID, Float, Int


@dataclass
class HeldoutConfig:
    """A preset's ``heldout:`` section."""

    __pydantic_config__ = FORBID

    mode: Annotated[Literal["recordings", "time", "clips"], Field(
        description="hold out whole recordings, blocks of consecutive clips inside each recording (time), or a "
                    "fraction of each section's training clips of a DCASE layout (clips)")] = "time"
    fraction: Annotated[Float, Field(description="the share held out")] = 0.2
    block_clips: Annotated[Int, Field(description="clips per held-out block (mode time)")] = 30
    gap_clips: Annotated[Int, Field(description="clips left out on both sides of a held-out block (mode time)")] = 2
    seed: Annotated[Int, Field(description="seed of the choice of held-out clips")] = 0
    examine: Annotated[str | None, Field(description="the recording (its catalog name or file name) whose "
                                                     "strangest moments are reported: its clips become the test "
                                                     "clips")] = None
    training: Annotated[Literal["others", "self"], Field(
        description="with examine: train on every other recording (others) or on the examined one (self)")] = "others"

    def validate(self) -> None:
        if self.mode not in ("recordings", "time", "clips"):
            raise ValueError(f"heldout.mode must be 'recordings', 'time' or 'clips', got {self.mode!r}")
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"heldout.fraction must be in [0, 1), got {self.fraction}")
        if self.block_clips < 1 or self.gap_clips < 0:
            raise ValueError("heldout.block_clips must be >= 1 and heldout.gap_clips >= 0")
        if self.training not in ("others", "self"):
            raise ValueError(f"heldout.training must be 'others' or 'self', got {self.training!r}")


def _match_recording(table: pd.DataFrame, name: str) -> str:
    recs = sorted(table["recording"].unique())
    hits = [r for r in recs if r == name or r.rsplit("/", 1)[-1] == name or r.rsplit("/", 1)[-1].rsplit(".", 1)[0] == name]
    if len(hits) != 1:
        raise ValueError(f"heldout.examine {name!r} matches {len(hits)} recordings; recordings: {', '.join(recs[:20])}")
    return hits[0]


def assign(table: pd.DataFrame, cfg: HeldoutConfig) -> pd.DataFrame:
    """A copy of a catalog table with ``split`` set to 'train', 'heldout', 'test' or 'unused'."""
    cfg.validate()
    if cfg.mode == "clips":
        return hold_out_clips(table, cfg.fraction, cfg.seed)
    t = table.copy()
    t["split"] = "train"
    examined = _match_recording(t, cfg.examine) if cfg.examine else None
    test_rows = t[t["recording"] == examined].assign(split="test") if examined else t.iloc[0:0]
    if examined and cfg.training == "self":
        t = t[t["recording"] == examined].copy()
    elif examined:
        t = t[t["recording"] != examined].copy()
    rng = np.random.default_rng(cfg.seed)
    if cfg.fraction > 0:
        if cfg.mode == "recordings":
            recs = np.array(sorted(t["recording"].unique()))
            n = int(round(cfg.fraction * len(recs)))
            if n == 0 or n == len(recs):
                raise ValueError(f"held-out recordings: {len(recs)} training recording(s) cannot give a held-out "
                                 f"fraction of {cfg.fraction}; use heldout.mode 'time'")
            held = set(rng.choice(recs, size=n, replace=False))
            t.loc[t["recording"].isin(held), "split"] = "heldout"
        else:
            for _, g in t.groupby("recording", sort=True):
                order = g.sort_values("offset").index.to_numpy()
                blocks = [order[i:i + cfg.block_clips] for i in range(0, len(order), cfg.block_clips)]
                n = int(round(cfg.fraction * len(blocks)))
                if n == 0:
                    continue
                chosen = set(rng.choice(len(blocks), size=min(n, len(blocks) - 1), replace=False).tolist())
                pos = {idx: k for k, idx in enumerate(order)}
                for b in sorted(chosen):
                    t.loc[blocks[b], "split"] = "heldout"
                    first, last = pos[blocks[b][0]], pos[blocks[b][-1]]
                    for k in list(range(max(0, first - cfg.gap_clips), first)) + \
                            list(range(last + 1, min(len(order), last + 1 + cfg.gap_clips))):
                        if t.at[order[k], "split"] == "train":
                            t.at[order[k], "split"] = "unused"
    return pd.concat([t, test_rows]).reset_index(drop=True)


def hold_out_clips(table: pd.DataFrame, fraction: float, seed: int = 0) -> pd.DataFrame:
    """A copy of a catalog table whose training clips are held out at ``fraction`` per (machine type, section,
    domain): at least one where a group has two or more, never all of a group."""
    t = table.copy()
    rng = np.random.default_rng(seed)
    train = t[t["split"] == "train"]
    cols = [c for c in ("machine_type", "section", "domain") if c in t.columns]
    for _, g in train.groupby(cols, sort=True, dropna=False):
        if len(g) < 2 or fraction <= 0:
            continue
        n = min(len(g) - 1, max(1, int(round(fraction * len(g)))))
        t.loc[rng.choice(g.index.to_numpy(), size=n, replace=False), "split"] = "heldout"
    return t
