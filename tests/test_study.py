"""Study data: one machine type's tensors with class labels from its training sections."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from raysd.data.catalog import Catalog
from raysd.data.features import FeatureSpec
from raysd.data.store import FeatureStore
from raysd.data.study import load_study
from raysd.data.views import View

SPEC = FeatureSpec(clip_seconds=3.0).with_crop("none")


@pytest.fixture(scope="module")
def tiny(tiny_root: Path, tmp_path_factory):
    cat = Catalog.scan(tiny_root)
    return cat, FeatureStore.open(cat, SPEC, tmp_path_factory.mktemp("cache"))


def test_study_tensors_labels_and_rows(tiny) -> None:
    cat, store = tiny
    s = load_study(cat, store, "ToyCar")
    assert s.machine_type == "ToyCar" and s.spec == SPEC
    assert s.info.class_names == ("01", "02") and s.info.n_classes == 2
    assert (s.info.n_mels, s.info.n_frames, s.info.sample_rate, s.info.f_max) == (64, 94, 16000, 8000.0)
    assert s.train_x.shape == (48, 64, 94) and s.train_x.dtype == torch.float32
    assert s.test_x.shape == (24, 64, 94)
    assert (s.train_table["machine_type"] == "ToyCar").all() and (s.train_table["split"] == "train").all()
    assert (s.test_table["split"] == "test").all()
    expect = {"01": 0, "02": 1}
    assert s.train_y.tolist() == [expect[x] for x in s.train_table["section"]]
    assert s.test_y.tolist() == [expect[x] for x in s.test_table["section"]]
    assert s.train_y.dtype == torch.long
    # rows line up with the store
    for table, x in ((s.train_table, s.train_x), (s.test_table, s.test_x)):
        for i in (0, len(table) - 1):
            row = store.row_of(table.iloc[[i]])[0]
            np.testing.assert_array_equal(x[i].numpy(), store.features[row])
    assert set(s.test_table["label"].astype(int)) == {0, 1}


def test_sets_for_views(tiny) -> None:
    cat, store = tiny
    s = load_study(cat, store, "valve")
    train = s.train_set(View(frames=5))
    assert len(train) == 48 and train.num_windows == 48 * 90
    b = next(train.batches(16))
    assert b.x.shape == (16, 5 * 64)
    test = s.test_set(View(frames=64, hop=8, layout="image"))
    assert len(test) == 24 and test.labels.tolist() == s.test_y.tolist()


def test_unseen_test_section_gets_minus_one(tiny) -> None:
    cat, store = tiny
    t = cat.table.copy()
    fan = (t["machine_type"] == "fan") & (t["split"] == "test") & (t["section"] == "02")
    t.loc[fan, "section"] = "05"  # an evaluation ID with no training clips
    s = load_study(Catalog(t, cat.root, cat.layout), store, "fan")
    assert s.info.class_names == ("00", "02")
    assert ((s.test_y == -1) == torch.tensor((s.test_table["section"] == "05").to_list())).all()
    assert (s.test_y == -1).sum() == 12 and set(s.test_y.tolist()) == {-1, 0}


def test_unknown_machine_type_and_failed_clips(tiny_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    for f in sorted((tiny_root / "pump").rglob("*_id_00_0000000[0-2].wav")):
        dest = root / f.relative_to(tiny_root)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dest)
    cat = Catalog.scan(root)
    broken = cat.table[cat.table["split"] == "train"]["path"].iloc[0]
    Path(broken).write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="skipped 1 of"):
        store = FeatureStore.open(cat, SPEC, tmp_path / "cache")
    with pytest.raises(ValueError, match="machine type 'fan' is not in the catalog.*pump"):
        load_study(cat, store, "fan")
    with pytest.warns(RuntimeWarning, match="1 clip\\(s\\) have no features"):
        s = load_study(cat, store, "pump")
    assert len(s.train_table) == 2 and s.train_x.shape[0] == 2
    assert Path(broken).name not in set(s.train_table["file"].map(lambda f: Path(f).name))
