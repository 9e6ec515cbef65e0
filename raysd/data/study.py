"""The data of one study (one machine type, or every machine type of a data set): log-mel tensors, class
labels, sections and domains, and the catalog rows.

A clip's class depends on the labelling (:data:`LABELLINGS`):

- ``section``: its machine ID / section, e.g. ``00`` (one machine type per study: the seeds' way);
- ``type_section``: machine type x section, e.g. ``fan/00``;
- ``attribute``: machine type x section x attribute string from its name or ``attributes_XX.csv``, e.g.
  ``fan/00/spd=106;load=2;mic=1``; a clip without attributes (DCASE 2020, 2021) gets its ``type_section`` class.

Classes are those of the training clips, sorted; a test clip whose class was never seen in training (e.g. an
evaluation section, or an attribute combination only the test set has) gets class -1, and likewise section
-1. Clips that failed to decode (listed in ``store.failed``) are left out with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from raysd.data.features import FeatureSpec
from raysd.data.store import FeatureStore
from raysd.data.views import View
from raysd.families.clips import ClipSet, DataInfo

LABELLINGS = ("section", "type_section", "attribute")
ALL_TYPES = "all"  # the machine_type of a study that covers several
FIRST_SHOT = "first_shot"  # the scope of a study that trains one model per machine type with one configuration


def section_keys(table: pd.DataFrame) -> list[str]:
    types = table["machine_type"].astype(str) if "machine_type" in table.columns else [""] * len(table)
    return [f"{m}/{s}" for m, s in zip(types, table["section"].astype(str))]


def class_keys(table: pd.DataFrame, labelling: str) -> list[str]:
    """Each row's class under ``labelling`` (see the module docstring)."""
    if labelling not in LABELLINGS:
        raise ValueError(f"unknown labelling {labelling!r}; choose from {', '.join(LABELLINGS)}")
    if labelling == "section":
        return table["section"].astype(str).tolist()
    keys = section_keys(table)
    if labelling == "type_section":
        return keys
    attrs = table["attributes"].fillna("").astype(str) if "attributes" in table.columns else [""] * len(table)
    return [f"{k}/{a}" if a else k for k, a in zip(keys, attrs)]


def encode(table: pd.DataFrame, info: DataInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class, section, domain) index tensors of catalog-like rows, under the study's ``info``."""
    code = {c: i for i, c in enumerate(info.class_names)}
    labels = torch.tensor([code.get(k, -1) for k in class_keys(table, info.labelling)], dtype=torch.long)
    if info.section_names:
        where = {s: i for i, s in enumerate(info.section_names)}
        sections = torch.tensor([where.get(k, -1) for k in section_keys(table)], dtype=torch.long)
    else:  # a model saved before sections were recorded: its classes were the sections
        sections = labels.clone()
    dom = table["domain"].astype(str).to_numpy() if "domain" in table.columns else np.full(len(table), "")
    return labels, sections, torch.from_numpy((dom == "target").astype(np.int64))


@dataclass
class StudyData:
    machine_type: str  # the one machine type, or ALL_TYPES
    spec: FeatureSpec
    info: DataInfo
    train_x: torch.Tensor  # (N, kept_mels, n_frames) float32
    train_table: pd.DataFrame  # catalog rows, same order
    test_x: torch.Tensor
    test_table: pd.DataFrame
    heldout_x: torch.Tensor | None = None  # clips held out from training (split 'heldout'), for held-out loss
    heldout_table: pd.DataFrame | None = None
    machine_types: tuple[str, ...] = ()
    extra_stores: tuple[FeatureStore, ...] = ()  # the view's per-clip extra features (read per split on demand)

    @property
    def has_heldout(self) -> bool:
        return self.heldout_table is not None and len(self.heldout_table) > 0

    def _set(self, x: torch.Tensor, table: pd.DataFrame, view: View) -> ClipSet:
        labels, sections, domains = encode(table, self.info)
        return ClipSet(x, labels, view, sections, domains, [store.get(table) for store in self.extra_stores])

    @property
    def train_y(self) -> torch.Tensor:
        return encode(self.train_table, self.info)[0]

    @property
    def test_y(self) -> torch.Tensor:
        return encode(self.test_table, self.info)[0]

    def heldout_set(self, view: View) -> ClipSet:
        if self.heldout_x is None or self.heldout_table is None:
            raise ValueError(f"study {self.machine_type!r} has no held-out clips")
        return self._set(self.heldout_x, self.heldout_table, view)

    def train_set(self, view: View) -> ClipSet:
        return self._set(self.train_x, self.train_table, view)

    def test_set(self, view: View) -> ClipSet:
        return self._set(self.test_x, self.test_table, view)

    def class_summary(self) -> str:
        """The number of classes and of training clips per class, for a study's first log lines."""
        counts = pd.Series(class_keys(self.train_table, self.info.labelling)).value_counts()
        return (f"{len(counts)} classes ({self.info.labelling}) over {len(self.machine_types)} machine type(s); "
                f"training clips per class: min {counts.min()}, median {counts.median():g}, max {counts.max()}")


def _present(stores: Sequence[FeatureStore], table: pd.DataFrame, what: str) -> pd.DataFrame:
    ok = np.ones(len(table), bool)
    for store in stores:
        ok &= store.row_of(table, missing="mark") >= 0
    if not ok.all():
        bad = table[~ok]
        warnings.warn(f"{what}: {len(bad)} clip(s) have no features (failed to decode) and are left out, "
                      f"e.g. {bad['file'].iloc[0]}", RuntimeWarning, stacklevel=3)
    return table[ok].reset_index(drop=True)


def load_study(catalog, store: FeatureStore, machine_types: str | Sequence[str], labelling: str = "section",
               extra_stores: Sequence[FeatureStore] = ()) -> StudyData:
    """Training and test data of one machine type, or of several (one model for all), from a catalog and its
    feature store, with class labels under ``labelling``; ``extra_stores`` hold the view's per-clip extra
    features (of the same catalog)."""
    t = catalog.table
    found = sorted(t["machine_type"].unique().tolist())
    wanted = [machine_types] if isinstance(machine_types, str) else list(machine_types)
    missing = [m for m in wanted if m not in found]
    if missing or not wanted:
        what = f"machine type {missing[0]!r} is" if len(missing) == 1 else f"machine types {missing or wanted} are"
        raise ValueError(f"{what} not in the catalog of {catalog.root}; it has: {', '.join(found)}")
    if len(wanted) > 1 and labelling == "section":
        raise ValueError(f"a study of {len(wanted)} machine types needs labels 'type_section' or 'attribute': "
                         "the sections of different machine types share numbers")
    name = wanted[0] if len(wanted) == 1 else ALL_TYPES
    mine = t[t["machine_type"].isin(wanted)]
    where = f"machine type {name!r}" if len(wanted) == 1 else f"machine types {', '.join(wanted)}"
    stores = [store, *extra_stores]
    train = _present(stores, mine[mine["split"] == "train"], f"{where} train")
    test = _present(stores, mine[mine["split"] == "test"], f"{where} test")
    if train.empty:
        raise ValueError(f"{where} has no training clips with features in {catalog.root}")
    spec = store.spec
    if not isinstance(spec, FeatureSpec):
        raise TypeError(f"load_study needs the log-mel store, got one of {spec.describe()}")
    classes = tuple(sorted(set(class_keys(train, labelling))))
    info = DataInfo(n_mels=spec.kept_mels, n_frames=spec.n_frames, n_classes=len(classes), class_names=classes,
                    sample_rate=spec.sample_rate, f_max=float(spec.f_max or spec.sample_rate / 2), labelling=labelling,
                    section_names=tuple(sorted(set(section_keys(train)))),
                    extra_shapes=tuple(s.spec.item_shape for s in extra_stores))
    held = _present(stores, mine[mine["split"] == "heldout"], f"{where} held-out")
    return StudyData(name, spec, info, store.get(train), train, store.get(test), test,
                     store.get(held) if len(held) else None, held if len(held) else None, tuple(wanted),
                     tuple(extra_stores))
