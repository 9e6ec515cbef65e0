"""The data of one study (one machine type): log-mel tensors, class labels and the catalog rows.

Class labels are the machine IDs / sections of the machine type's training clips, sorted; a test clip
of a section never seen in training (e.g. an evaluation ID) gets class -1. Clips that failed to decode
(listed in ``store.failed``) are left out with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from raysd.data.features import FeatureSpec
from raysd.data.store import FeatureStore
from raysd.data.views import View
from raysd.families.clips import ClipSet, DataInfo


@dataclass
class StudyData:
    machine_type: str
    spec: FeatureSpec
    info: DataInfo
    train_x: torch.Tensor  # (N, kept_mels, n_frames) float32
    train_y: torch.Tensor  # (N,) long class index
    train_table: pd.DataFrame  # catalog rows, same order
    test_x: torch.Tensor
    test_y: torch.Tensor  # class index, -1 for a section not seen in training
    test_table: pd.DataFrame
    heldout_x: torch.Tensor | None = None  # clips held out from training (split 'heldout'), for held-out loss
    heldout_y: torch.Tensor | None = None
    heldout_table: pd.DataFrame | None = None

    @property
    def has_heldout(self) -> bool:
        return self.heldout_table is not None and len(self.heldout_table) > 0

    def heldout_set(self, view: View) -> ClipSet:
        if self.heldout_x is None or self.heldout_y is None:
            raise ValueError(f"study {self.machine_type!r} has no held-out clips")
        return ClipSet(self.heldout_x, self.heldout_y, view)

    def train_set(self, view: View) -> ClipSet:
        return ClipSet(self.train_x, self.train_y, view)

    def test_set(self, view: View) -> ClipSet:
        return ClipSet(self.test_x, self.test_y, view)


def _present(store: FeatureStore, table: pd.DataFrame, what: str) -> pd.DataFrame:
    rows = store.row_of(table, missing="mark")
    if (rows < 0).any():
        bad = table[rows < 0]
        warnings.warn(f"{what}: {len(bad)} clip(s) have no features (failed to decode) and are left out, "
                      f"e.g. {bad['file'].iloc[0]}", RuntimeWarning, stacklevel=3)
    return table[rows >= 0].reset_index(drop=True)


def load_study(catalog, store: FeatureStore, machine_type: str) -> StudyData:
    """Training and test data of ``machine_type`` from a catalog and its feature store."""
    t = catalog.table
    types = sorted(t["machine_type"].unique().tolist())
    if machine_type not in types:
        raise ValueError(f"machine type {machine_type!r} is not in the catalog of {catalog.root}; "
                         f"it has: {', '.join(types)}")
    mine = t[t["machine_type"] == machine_type]
    where = f"machine type {machine_type!r}"
    train = _present(store, mine[mine["split"] == "train"], f"{where} train")
    test = _present(store, mine[mine["split"] == "test"], f"{where} test")
    if train.empty:
        raise ValueError(f"{where} has no training clips with features in {catalog.root}")
    classes = tuple(sorted(train["section"].astype(str).unique().tolist()))
    code = {c: i for i, c in enumerate(classes)}
    spec = store.spec

    def labels(tab: pd.DataFrame) -> torch.Tensor:
        return torch.from_numpy(np.array([code.get(s, -1) for s in tab["section"].astype(str)], dtype=np.int64))

    info = DataInfo(n_mels=spec.kept_mels, n_frames=spec.n_frames, n_classes=len(classes), class_names=classes,
                    sample_rate=spec.sample_rate, f_max=float(spec.f_max or spec.sample_rate / 2))
    held = _present(store, mine[mine["split"] == "heldout"], f"{where} held-out")
    return StudyData(machine_type, spec, info, store.get(train), labels(train), train,
                     store.get(test), labels(test), test,
                     store.get(held) if len(held) else None, labels(held) if len(held) else None, held)
