"""``raysd.score`` on a saved ensemble reproduces the leaderboard's per-clip scores for the same WAV files (real
tiny synthetic clips, real models trained for one epoch, two feature specs), combines members as the leaderboard
does, reports files of unknown machine types / sections / unreadable audio by name, and loads weights only."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from experiment_helpers import write_checkpoint, write_experiment, write_record

from raysd import artifacts, leaderboard, score
from raysd.ensemble import combine, fit_stats, standardise
from raysd.report.ensembles import trial_member
from raysd.report.experiment import load_experiment

DENSE = {"lr": 1e-3, "batch_size": 256, "epochs": 1, "hidden": 32, "depth": 2, "bottleneck": 4}
CONV = {"lr": 1e-3, "batch_size": 16, "epochs": 1, "crop": "none", "hop": 44, "bottleneck": 4}


@pytest.fixture(scope="module")
def experiment(tiny_root: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A two-study experiment on the tiny fan clips, trained and scored as ``raysd.trial`` does, and its reports."""
    from raysd.data.catalog import Catalog
    from raysd.data.features import FeatureSpec
    from raysd.data.store import FeatureStore
    from raysd.data.study import load_study
    from raysd.families.base import create_family
    from raysd.train import Trainer
    from raysd.trial import score_table

    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("score")
    full = Catalog.scan(tiny_root)
    fan = Catalog(full.table[full.table["machine_type"] == "fan"], full.root, full.layout)
    base = FeatureSpec(n_mels=32, clip_seconds=3.0)
    root = write_experiment(tmp / "exp", ["fan__dense_ae", "fan__conv_ae"])
    for family, tid, params in (("dense_ae", "d1", DENSE), ("conv_ae", "c1", CONV)):
        study_name = f"fan__{family}"
        fam, hp = create_family(family, params)
        spec = base.with_crop(hp.crop)
        study = load_study(fan, FeatureStore.open(fan, spec, tmp / "cache", device="cpu"), "fan")
        trainer = Trainer(fam, hp, study.info)
        trainer.fit(study.train_set(fam.view()))
        test = score_table(study.test_table, trainer.score(study.test_set(fam.view())))
        train = score_table(study.train_table, trainer.score(study.train_set(fam.view())))
        trial_json = {"family": family, "machine_type": "fan", "params": params, "spec": spec.to_dict(),
                      "info": study.info.__dict__, "epoch": trainer.epoch}
        ck = write_checkpoint(root, study_name, tid, trainer.state_dict(), trial_json, test, train)
        write_record(root, study_name, tid, family, "fan", params, "finished", checkpoint=ck,
                     metrics={"epoch": 1, "train_seconds": 1.0})
    out = tmp / "results"
    assert leaderboard.main([str(root), "--out", str(out), "--no-plots", "--steps", "3"]) == 0
    return root, out


def by_name(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(name=df["file"].astype(str).str.rsplit("/", n=1).str[-1]).set_index("name").sort_index()


def test_score_reproduces_the_leaderboards_scores(experiment, tiny_root: Path, tmp_path: Path, capsys):
    _, out = experiment
    csv = tmp_path / "scores.csv"
    assert score.main([str(out / "ensemble.json"), str(tiny_root / "fan" / "test"), "--out", str(csv),
                       "--device", "cpu"]) == 0
    got = by_name(pd.read_csv(csv, dtype={"section": str}))
    assert list(pd.read_csv(csv).columns) == ["file", "machine_type", "section", "score", "decision"]
    ref = pd.read_csv(out / "ensemble_scores.csv", dtype={"section": str})
    ref = by_name(ref[ref["split"] == "test"])
    assert list(got.index) == list(ref.index) and len(got) == 24
    assert (got["machine_type"] == "fan").all() and (got["section"] == ref["section"]).all()
    np.testing.assert_allclose(got["score"], ref["score"], rtol=1e-6, atol=1e-6)
    thr = json.loads((out / "ensemble.json").read_text())["machine_types"]["fan"]["threshold"]
    clear = (got["score"] - got["section"].map(thr)).abs() > 1e-5
    assert (got.loc[clear, "decision"] == ref.loc[clear, "decision"]).all()
    # printed to stdout without --out
    assert score.main([str(out / "ensemble.json"), str(tiny_root / "fan" / "test"), "--device", "cpu"]) == 0
    printed = pd.read_csv(io.StringIO(capsys.readouterr().out), dtype={"section": str})
    np.testing.assert_allclose(by_name(printed)["score"], got["score"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rule", ["mean", "max"])
def test_two_member_ensemble_matches_the_standardised_combination(experiment, tiny_root: Path, tmp_path: Path,
                                                                  rule: str):
    root, _ = experiment
    exp = load_experiment(root)
    trials = {t.name: t for t in exp.trials}
    members, zt, zr = [], [], []
    for name, w in (("dense_ae/d1", 2), ("conv_ae/c1", 1)):
        t = trials[name]
        stats = fit_stats(t.train)
        members.append(trial_member(t, w, stats))
        zt.append(standardise(t.test, stats))
        zr.append(standardise(t.train, stats))
    weights = [2, 1] if rule == "mean" else None
    want_test, want_train = combine(zt, rule, weights), combine(zr, rule, weights)
    thr = artifacts.thresholds(want_train, 0.5)
    doc = {"version": 1, "layout": "dcase2020", "machine_types": {"fan": {
        "combine": rule, "members": members, "threshold": {s: v for (_, s), v in thr.items()}}}}
    path = tmp_path / "ensemble.json"
    path.write_text(json.dumps(doc))
    table, problems = score.score_paths(path, [str(tiny_root / "fan" / "test")], device="cpu")
    assert problems == []
    got, want = by_name(table), by_name(want_test)
    np.testing.assert_allclose(got["score"], want["score"], rtol=1e-6, atol=1e-6)
    assert 0 < got["decision"].sum() < len(got)  # a median threshold of training scores flags some clips


def test_unknown_machine_type_section_and_bad_audio_are_reported_by_name(experiment, tiny_root: Path,
                                                                          tmp_path: Path, capsys):
    _, out = experiment
    src = sorted((tiny_root / "fan" / "test").glob("anomaly_id_*.wav"))[0]
    (tmp_path / "fan" / "test").mkdir(parents=True)
    (tmp_path / "pump" / "test").mkdir(parents=True)
    (tmp_path / "loose").mkdir()
    shutil.copy(src, tmp_path / "fan" / "test" / src.name)  # known: scored
    shutil.copy(src, tmp_path / "fan" / "test" / "normal_id_09_00000000.wav")  # ID 09 unknown
    shutil.copy(src, tmp_path / "pump" / "test" / src.name)  # a machine type the ensemble lacks
    shutil.copy(src, tmp_path / "loose" / "recording.wav")  # neither a type folder nor a DCASE name
    (tmp_path / "fan" / "test" / "normal_id_00_99999999.wav").write_bytes(b"RIFF\x00\x00not audio")
    csv = tmp_path / "s.csv"
    rc = score.main([str(out / "ensemble.json"), str(tmp_path), "--out", str(csv), "--device", "cpu"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "4 file(s) not scored" in err
    assert "normal_id_09_00000000.wav: fan section 09 is not in the ensemble" in err
    assert f"pump/test/{src.name}: machine type 'pump' is not in the ensemble (it knows fan)" in err
    assert "recording.wav: machine type unknown" in err
    assert "normal_id_00_99999999.wav" in err
    got = pd.read_csv(csv, dtype={"section": str})
    assert got["file"].tolist() == [str(tmp_path / "fan" / "test" / src.name)]
    # naming the machine type and section scores the loose recording too
    rc = score.main([str(out / "ensemble.json"), str(tmp_path / "loose"), "--machine-type", "fan", "--section", "0",
                     "--out", str(csv), "--device", "cpu"])
    assert rc == 0 and pd.read_csv(csv, dtype={"section": str})["section"].tolist() == ["00"]
    assert score.main([str(out / "ensemble.json"), str(tmp_path / "missing")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


class Payload:
    """Not a tensor: unpickling it would run arbitrary code paths."""


def test_members_are_loaded_weights_only(experiment, tmp_path: Path):
    _, out = experiment
    doc = json.loads((out / "ensemble.json").read_text())
    entry = dict(doc["machine_types"]["fan"]["members"][0])
    state = torch.load(out / entry["state"], weights_only=True)  # relative to the ensemble file's folder
    state["extra"] = Payload()
    torch.save(state, tmp_path / "state.pt")
    entry["state"] = str(tmp_path / "state.pt")
    with pytest.raises(artifacts.ArtifactError, match="not a weights-only checkpoint"):
        artifacts.load_member(entry, torch.device("cpu"), str(tmp_path / "ensemble.json"))
    entry["params"] = {**entry["params"], "bottleneck": 3}  # dense_ae and conv_ae both have one
    entry["state"] = doc["machine_types"]["fan"]["members"][0]["state"]
    with pytest.raises(artifacts.ArtifactError, match="does not fit"):
        artifacts.load_member(entry, torch.device("cpu"), str(out / "ensemble.json"))


def test_a_results_folder_moved_with_its_experiment_finds_its_checkpoints(experiment, tmp_path: Path):
    root, out = experiment
    assert root.parent == out.parent
    moved = tmp_path / "moved"
    shutil.copytree(root, moved / root.name)
    shutil.copytree(out, moved / out.name)
    doc = json.loads((moved / out.name / "ensemble.json").read_text())
    entry = doc["machine_types"]["fan"]["members"][0]
    assert not Path(entry["state"]).is_absolute() and not Path(doc["experiment"]).is_absolute()
    member = artifacts.load_member(entry, torch.device("cpu"), str(moved / out.name / "ensemble.json"))
    assert member.name == entry["name"]
    state = moved / out.name / entry["state"]
    torch.save({"model": {"nothing": torch.zeros(1)}}, state)  # the moved copy, not the original, is read
    with pytest.raises(artifacts.ArtifactError, match="does not fit") as e:
        artifacts.load_member(entry, torch.device("cpu"), str(moved / out.name / "ensemble.json"))
    assert str(moved) in str(e.value)
    assert artifacts.report_path("s3://bucket/exp/ckpt", out) == "s3://bucket/exp/ckpt" and artifacts.report_path("", out) == ""
