"""Synthetic machine sounds: determinism, layouts and counts, and that IDs, attributes and anomalies are learnable."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from sklearn.metrics import roc_auc_score

from raysd.data import synth
from raysd.data.catalog import Catalog
from raysd.data.features import FeatureSpec
from raysd.data.store import FeatureStore

MINI = synth.Preset("mini", 3.0, {"fan": {"00": (2, 1, 2)}, "valve": {"02": (3, 1, 1)}}, target_train=1)


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.wav"))}


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, tiny_root: Path) -> None:
    a = digests(synth.generate(tmp_path / "a", MINI, seed=0))
    b = digests(synth.generate(tmp_path / "b", MINI, seed=0, workers=2))  # parallel generation: same bytes
    c = digests(synth.generate(tmp_path / "c", MINI, seed=1))
    assert len(a) == MINI.n_clips() == 10
    assert a == b
    assert a.keys() == c.keys() and all(a[k] != c[k] for k in a)
    # a file's content depends only on (seed, path): the same clip in the tiny preset is identical
    tiny = digests(tiny_root)
    assert all(tiny[k] == v for k, v in a.items())


def test_tiny_layout_counts_and_format(tiny_root: Path) -> None:
    meta = synth.read_meta(tiny_root)
    wavs = sorted(p.relative_to(tiny_root).as_posix() for p in tiny_root.rglob("*.wav"))
    assert sorted(meta["file"]) == wavs
    assert set(meta["machine_type"]) == set(synth.MACHINE_TYPES)
    per_id = meta.groupby(["machine_type", "section", "split", "label"]).size()
    for mtype in synth.MACHINE_TYPES:
        ids = sorted(meta.loc[meta.machine_type == mtype, "section"].unique())
        assert ids == list(synth.DEV_IDS[mtype][:2])
        for i in ids:
            assert (per_id[(mtype, i, "train", 0)], per_id[(mtype, i, "test", 0)], per_id[(mtype, i, "test", 1)]) == (24, 6, 6)
    pat = re.compile(r"^[A-Za-z]+/(train/normal|test/(normal|anomaly))_id_\d{2}_\d{8}\.wav$")
    assert all(pat.match(f) for f in wavs)
    anomalies = meta[meta.label == 1]
    assert set(anomalies.kind) == set(synth.KINDS) and set(anomalies.severity) == set(synth.SEVERITIES)
    assert set(meta[meta.label == 0].kind) == {"none"}
    info = sf.info(str(tiny_root / wavs[0]))
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 48000, "PCM_16")
    # the catalog reads the same labels and IDs from the names
    cat = Catalog.scan(tiny_root)
    assert cat.layout == "dcase2020" and len(cat) == len(meta) and not cat.skipped
    t = cat.table.merge(meta, on="file", suffixes=("", "_meta"))
    assert (t["label"].astype(int) == t["label_meta"]).all() and (t["section"] == t["section_meta"]).all()


def test_dcase2023_layout_sections_domains_attributes(tmp_path: Path) -> None:
    root = synth.generate(tmp_path / "d23", MINI, seed=0, layout="dcase2023")
    meta = synth.read_meta(root)
    pat = re.compile(r"^\w+/(train|test)/section_\d{2}_(source|target)_(train|test)_(normal|anomaly)_\d{4}"
                     r"_spd_(?P<spd>\d+)_load_(?P<load>[12])_mic_(?P<mic>[12])\.wav$")
    for f, attrs in zip(meta.file, meta.attributes):
        m = pat.match(f)
        assert m, f
        assert attrs == f"spd={m['spd']};load={m['load']};mic={m['mic']}"
    fan = meta[meta.machine_type == "fan"]
    assert set(fan.section) == {"00"}
    train = fan[fan.split == "train"]
    assert sorted(train.domain) == ["source", "target"]  # 2 training clips, 1 of them target
    combos = synth.attribute_combos(0, "fan", "00", n_target=1)
    assert len(combos["source"]) == 3 and len(combos["target"]) == 1
    assert len({(load, mic) for _, load, mic in combos["source"]}) == 3
    for domain, g in fan.groupby("domain"):
        first = combos[domain][0]
        assert set(g.attributes) == {f"spd={int(round(first[0] * 100))};load={first[1]};mic={first[2]}"}
    spd = {d: {int(a.split(";")[0].removeprefix("spd=")) for a in g.attributes} for d, g in fan.groupby("domain")}
    assert spd["source"] <= {96, 100, 104} and spd["target"].isdisjoint({96, 100, 104})
    attrs = (root / "fan" / "attributes_00.csv").read_text().splitlines()
    assert attrs[0] == "file_name,d1p,d1v,d2p,d2v,d3p,d3v" and len(attrs) == 1 + len(fan)
    row = fan.iloc[0]
    spd_v, load_v, mic_v = (kv.split("=")[1] for kv in row.attributes.split(";"))
    assert f"{row.file},spd,{spd_v},load,{load_v},mic,{mic_v}" in attrs
    cat = Catalog.scan(root)
    assert cat.layout == "dcase2022"
    assert sorted(cat.table["domain"].unique()) == ["source", "target"]
    t = cat.table.merge(meta, on="file", suffixes=("", "_meta"))
    assert len(t) == len(meta)
    assert (t["label"].astype(int) == t["label_meta"]).all()
    assert (t["attributes"] == t["attributes_meta"]).all()  # from the csvs: 'spd=S;load=L;mic=M'
    assert (synth.read_meta(synth.generate(tmp_path / "d20", MINI, seed=0)).attributes == "").all()


def test_dcase2023_attribute_combinations_are_learnable(tmp_path: Path, one_thread) -> None:
    """Logistic regression on clip log-mel statistics tells a section's three source combinations apart on
    held-out normal test clips, so the attributes change the sound (for valve, speed barely shows)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from raysd.data.features import LogMel

    preset = synth.Preset("attrs", 3.0, {"fan": {"00": (32, 30, 3)}, "valve": {"00": (32, 30, 3)}}, target_train=2)
    root = synth.generate(tmp_path / "attrs", preset, seed=0, layout="dcase2023")
    meta = synth.read_meta(root)
    mel = LogMel(FeatureSpec(n_mels=64))
    waves = torch.from_numpy(np.stack([sf.read(root / f, dtype="float32")[0] for f in meta.file]))
    with torch.no_grad():
        x = mel(waves).numpy()
    feats = np.concatenate([x.mean(axis=2), x.std(axis=2)], axis=1)
    for mtype, g in meta[meta.domain == "source"].groupby("machine_type"):
        tr, te = g[g.split == "train"], g[(g.split == "test") & (g.label == 0)]
        assert tr.attributes.nunique() == te.attributes.nunique() == 3 and len(te) == 15
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(feats[tr.index], tr.attributes)
        acc = float((clf.predict(feats[te.index]) == te.attributes.to_numpy()).mean())
        assert acc > 0.8, (mtype, acc)  # chance: 1/3; measured: fan 1.0, valve 0.93


def test_generate_is_idempotent_and_refuses_another_set(tmp_path: Path) -> None:
    root = synth.generate(tmp_path / "m", MINI, seed=0)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.wav")}
    assert synth.generate(root, MINI, seed=0) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.wav")} == before
    with pytest.raises(FileExistsError, match="different synthetic data set"):
        synth.generate(root, MINI, seed=1)
    other = synth.generate(root, MINI, seed=1, layout="dcase2023", overwrite=True)  # replaces the old set
    assert sorted(p.relative_to(root).as_posix() for p in other.rglob("*.wav")) == sorted(synth.read_meta(root).file)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        synth.generate(tmp_path / "other", MINI)
    with pytest.raises(ValueError, match="unknown synthetic preset 'huge'"):
        synth.generate(tmp_path / "x", "huge")
    with pytest.raises(ValueError, match="unknown layout"):
        synth.generate(tmp_path / "y", MINI, layout="dcase1999")


def test_cli(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(synth.PRESETS, "tiny", dataclasses.replace(MINI, name="tiny"))
    assert synth.main([str(tmp_path / "cli"), "--preset", "tiny", "--seed", "3", "--layout", "dcase2023"]) == 0
    assert f"{MINI.n_clips()} clips" in capsys.readouterr().out
    assert len(list((tmp_path / "cli").rglob("*.wav"))) == MINI.n_clips()
    assert (tmp_path / "cli" / "valve" / "attributes_00.csv").exists()
    assert synth.main([str(tmp_path / "cli"), "--preset", "tiny", "--seed", "4"]) == 2
    assert "different synthetic data set" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_features(tiny_root: Path, tmp_path_factory):
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    cat = Catalog.scan(tiny_root)
    store = FeatureStore.open(cat, FeatureSpec(clip_seconds=3.0).with_crop("none"), tmp_path_factory.mktemp("cache"))
    t = cat.table.merge(synth.read_meta(tiny_root)[["file", "kind", "severity"]], on="file")
    return t, store.get(t).numpy()


def test_machine_ids_are_distinguishable(tiny_features) -> None:
    """Nearest centroid of the clip-mean log-mel tells the IDs of a type apart on unseen test clips."""
    t, x = tiny_features
    clip = x.mean(axis=2)
    for mtype, g in t.groupby("machine_type"):
        tr, te = g[g.split == "train"], g[g.split == "test"]
        ids = sorted(tr.section.unique())
        cent = np.stack([clip[tr.index[tr.section == i]].mean(0) for i in ids])
        pred = np.array(ids)[((clip[te.index][:, None] - cent[None]) ** 2).sum(-1).argmin(1)]
        assert (pred == te.section.to_numpy()).mean() >= 0.9, mtype


def test_anomalies_detectable_and_graded_by_severity(tiny_features) -> None:
    """A plain per-ID z-score of clip log-mel statistics finds high-severity anomalies, low ones less well."""
    t, x = tiny_features
    stats = np.concatenate([x.mean(axis=2), x.std(axis=2)], axis=1)
    scores = np.zeros(len(t))
    for _, g in t.groupby(["machine_type", "section"]):
        tr = stats[g.index[g.split == "train"]]
        mu, sd = tr.mean(0), tr.std(0) + 1e-3
        te = g.index[g.split == "test"]
        scores[te] = (((stats[te] - mu) / sd) ** 2).mean(1)
    t = t.assign(score=scores)
    auc = {}
    for sev in synth.SEVERITIES:
        per_type = []
        for _, g in t[(t.split == "test") & ((t.label == 0) | (t.severity == sev))].groupby("machine_type"):
            per_type.append(roc_auc_score(g.label.astype(int), g.score))
        auc[sev] = float(np.mean(per_type))
    assert auc["high"] >= 0.8, auc
    assert auc["high"] > auc["low"] + 0.1, auc
    assert auc["low"] < 0.95, auc  # not trivially separable
