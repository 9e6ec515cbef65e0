"""Held-out clips of unlabelled recordings, and anomaly pruning in the training loop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from raysd.data.heldout import HeldoutConfig, assign
from raysd.data.views import View
from raysd.families.base import get_family
from raysd.families.clips import ClipSet, DataInfo
from raysd.families.hparams import TrainHP
from raysd.train import Trainer


def _recordings(n_rec: int = 3, clips: int = 200) -> pd.DataFrame:
    rows = []
    for r in range(n_rec):
        for c in range(clips):
            rows.append({"file": f"site/rec{r}.wav", "recording": f"site/rec{r}.wav", "offset": c * 22050,
                         "num_samples": 22050, "machine_type": "site", "section": "00", "split": "train"})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("gap", [0, 2, 5])
def test_time_blocks_never_touch_training_clips(gap: int) -> None:
    t = assign(_recordings(), HeldoutConfig(mode="time", fraction=0.25, block_clips=20, gap_clips=gap, seed=3))
    assert set(t["split"]) <= {"train", "heldout", "unused"}
    for _, g in t.groupby("recording"):
        g = g.sort_values("offset")
        pos = np.arange(len(g))
        held = pos[(g["split"] == "heldout").to_numpy()]
        train = pos[(g["split"] == "train").to_numpy()]
        assert len(held) and len(train)
        assert not set(held) & set(train)
        # no training clip within `gap` clips of a held-out one (gap 0: they may touch, never overlap)
        dist = np.abs(train[:, None] - held[None, :]).min()
        assert dist >= gap + 1
    frac = (t["split"] == "heldout").mean()
    assert 0.2 <= frac <= 0.3


def test_held_out_whole_recordings() -> None:
    t = assign(_recordings(n_rec=5), HeldoutConfig(mode="recordings", fraction=0.4, seed=1))
    by_rec = t.groupby("recording")["split"].agg(set)
    assert sorted(len(s) for s in by_rec) == [1] * 5
    assert sum(s == {"heldout"} for s in by_rec) == 2


def test_examined_recording_others_and_self() -> None:
    tab = _recordings(n_rec=4, clips=120)
    others = assign(tab, HeldoutConfig(mode="time", fraction=0.2, block_clips=20, examine="rec2"))
    assert set(others.loc[others["recording"] == "site/rec2.wav", "split"]) == {"test"}
    assert (others["split"] == "test").sum() == 120
    single = assign(tab, HeldoutConfig(mode="time", fraction=0.2, block_clips=20, examine="rec2.wav", training="self"))
    assert set(single["recording"]) == {"site/rec2.wav"}
    assert (single["split"] == "test").sum() == 120 and (single["split"] == "train").sum() > 0
    with pytest.raises(ValueError, match="matches 0 recordings"):
        assign(tab, HeldoutConfig(examine="nope"))


def test_pruning_removes_exactly_the_requested_fraction() -> None:
    torch.manual_seed(0)
    n = 40
    clips = torch.randn(n, 16, 12)
    clips[:4] += 8.0  # four loud outliers
    data = ClipSet(clips, torch.zeros(n, dtype=torch.long), View(frames=4, hop=2, layout="vector"))
    family = get_family("dense_ae")(get_family("dense_ae").Config(frames=4, hop=2))
    hp = TrainHP(lr=1e-3, batch_size=64, epochs=4, prune_every=1, prune_fraction=0.1)
    trainer = Trainer(family, hp, DataInfo(n_mels=16, n_frames=12, n_classes=1))
    trainer.fit(data)
    # pruned after epochs 1, 2 and 3 (never after the last): 4 of 40, then 4 of 36, then 3 of 32
    per_epoch = pd.Series([e for e, _, _ in trainer.pruned]).value_counts().sort_index()
    assert per_epoch.to_dict() == {1: 4, 2: 4, 3: 3}
    dropped = {i for _, i, _ in trainer.pruned}
    assert len(dropped) == 11 and len(trainer.active) == n - 11
    assert not dropped & set(trainer.active.tolist())
    assert {0, 1, 2, 3} <= dropped  # the loud outliers go first


def test_pruning_state_survives_a_checkpoint() -> None:
    data = ClipSet(torch.randn(20, 16, 12), torch.zeros(20, dtype=torch.long), View(frames=4, hop=4))
    fam = get_family("dense_ae")(get_family("dense_ae").Config(frames=4, hop=4))
    hp = TrainHP(batch_size=32, epochs=3, prune_every=1, prune_fraction=0.2)
    info = DataInfo(n_mels=16, n_frames=12, n_classes=1)
    a = Trainer(fam, hp, info)
    a.fit(data, epochs=2)
    b = Trainer(fam, hp, info)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.active, b.active) and a.pruned == b.pruned
