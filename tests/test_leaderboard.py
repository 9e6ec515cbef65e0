"""Leaderboard and ensembles: standardisation, mean / max combination and greedy selection on hand-made score
tables; the deterministic, disjoint selection / report split; a leaderboard over a fabricated experiment with
finished, stopped-early and failed trials (real tiny checkpoints); 2020 submission files re-scored by
``raysd.metrics`` equal the leaderboard's figures."""

from __future__ import annotations

import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from experiment_helpers import write_checkpoint, write_experiment, write_record
from sklearn.metrics import roc_auc_score

from raysd import leaderboard
from raysd.ensemble import (
    EnsembleError,
    align,
    combine,
    combine_matrix,
    fit_stats,
    greedy_select,
    selection_value,
    standardise,
)
from raysd.metrics import evaluate, read_submission, split_half
from raysd.report.experiment import read_scores

COLS = ["file", "machine_type", "section", "domain", "split", "label", "half", "score"]


def table(rows: list[tuple]) -> pd.DataFrame:
    """(file, section, split, label, score) -> a score table of machine type 'fan'."""
    t = pd.DataFrame(rows, columns=["file", "section", "split", "label", "score"])
    t["machine_type"], t["domain"] = "fan", ""
    t["label"] = pd.array(t["label"], dtype="Int8")
    t["half"] = [("train" if s == "train" else split_half(f)) for f, s in zip(t["file"], t["split"])]
    return t[COLS]


# ---------------------------------------------------------------------- standardisation and combination
def test_standardisation_uses_each_sections_training_scores():
    t = table([
        ("a0", "00", "train", 0, 1.0), ("a1", "00", "train", 0, 3.0),  # mean 2, population std 1
        ("b0", "02", "train", 0, 10.0), ("b1", "02", "train", 0, 10.0), ("b2", "02", "train", 0, 16.0),  # 12, sqrt(8)
        ("t0", "00", "test", 1, 5.0), ("t1", "02", "test", 0, 14.0),
    ])
    stats = fit_stats(t).set_index("section")
    assert stats.loc["00", "mean"] == 2.0 and stats.loc["00", "std"] == 1.0 and stats.loc["00", "n"] == 2
    assert stats.loc["02", "mean"] == 12.0 and stats.loc["02", "std"] == pytest.approx(math.sqrt(8))
    z = standardise(t, stats.reset_index())
    assert z["score"].tolist() == pytest.approx([-1, 1, -2 / math.sqrt(8), -2 / math.sqrt(8), 4 / math.sqrt(8),
                                                 3.0, 2 / math.sqrt(8)])
    assert t["score"].iloc[-1] == 14.0  # the input is not modified
    lone = table([("x", "04", "test", 0, 1.0)])
    with pytest.raises(EnsembleError, match="fan section 04"):
        standardise(lone, stats.reset_index(), "dense_ae/t1")


def test_mean_and_max_combination_with_weights():
    a = table([("c0", "00", "test", 0, 1.0), ("c1", "00", "test", 1, -2.0), ("c2", "00", "test", 1, 0.5)])
    b = table([("c2", "00", "test", 1, 3.0), ("c0", "00", "test", 0, -1.0), ("c1", "00", "test", 1, 4.0)])
    m = combine([a, b], "mean")
    assert m["file"].tolist() == ["c0", "c1", "c2"]  # first member's order, others aligned by file
    assert m["score"].tolist() == pytest.approx([0.0, 1.0, 1.75])
    assert combine([a, b], "mean", weights=[3, 1])["score"].tolist() == pytest.approx([0.5, -0.5, 1.125])
    assert combine([a, b], "max")["score"].tolist() == [1.0, 4.0, 3.0]
    assert combine_matrix(np.array([[1.0, 9.0], [2.0, -9.0]]), [2, 0], "max").tolist() == [1.0, 2.0]
    with pytest.raises(EnsembleError, match="rule"):
        combine([a, b], "median")
    short = b.iloc[:2]
    with pytest.raises(EnsembleError, match="member 1 has no score for clip"):
        align([a, short])


def test_greedy_selection_with_replacement_and_best_prefix():
    # Columns A = [1, 0], B = [0, 1]; the objective is minus the squared distance of the weighted mean to
    # (2/3, 1/3). Step 1: A (error 2/9) beats B (8/9). Step 2: A+B (1/18) beats A+A (2/9). Step 3: 2A+B hits the
    # target exactly (0). Later steps can only move away, so the best prefix is A, B, A: weights A 2, B 1.
    z = np.array([[1.0, 0.0], [0.0, 1.0]])
    target = np.array([2 / 3, 1 / 3])

    def objective(s):
        return -float(((s - target) ** 2).sum())

    sel = greedy_select(z, ["A", "B"], objective, rule="mean", steps=6)
    assert sel.picks == ["A", "B", "A"]
    assert sel.weights == {"A": 2, "B": 1}
    assert sel.history[:3] == pytest.approx([-2 / 9, -1 / 18, 0.0])
    assert sel.value == pytest.approx(0.0) and len(sel.history) == 6
    # minimising the distance instead gives the same picks
    assert greedy_select(z, ["A", "B"], lambda s: -objective(s), steps=6, mode="min").picks == ["A", "B", "A"]
    # a tie goes to the earlier column; max ignores repeats, so the best prefix stays at one model
    assert greedy_select(np.ones((2, 2)), ["first", "second"], lambda s: 0.0, steps=3).picks == ["first"]


def test_greedy_selection_on_auc_of_the_selection_half():
    # Three models of 200 clips: A sees anomaly kind 1, B kind 2, C is noise. The mean of A and B separates all,
    # each alone only about half of the anomalies (AUC near 0.75).
    n = 100
    files = [f"normal_id_00_{i:08d}.wav" for i in range(n)] + [f"anomaly_id_00_{i:08d}.wav" for i in range(n)]
    label = np.r_[np.zeros(n), np.ones(n)].astype(int)
    kind = np.r_[np.zeros(n), np.tile([1, 2], n // 2)]
    rng = np.random.default_rng(0)
    za = np.where(kind == 1, 3.0, 0.0) + rng.normal(0, 0.3, 2 * n)
    zb = np.where(kind == 2, 3.0, 0.0) + rng.normal(0, 0.3, 2 * n)
    zc = rng.normal(0, 1, 2 * n)
    meta = table([(f, "00", "test", int(y), 0.0) for f, y in zip(files, label)]).drop(columns="score")

    def sel_auc(s):
        return selection_value(meta.assign(score=s), "sel_auc", "2020")

    sel = greedy_select(np.c_[za, zb, zc], ["A", "B", "C"], sel_auc, steps=5)
    assert set(sel.weights) == {"A", "B"} and sel.value == 1.0
    assert sel_auc(za) < 0.85 and sel_auc(zb) < 0.85 and sel.history[0] < 0.85


GOLDEN = {"normal_id_00_00000000.wav": "report", "anomaly_id_00_00000000.wav": "report",
          "normal_id_02_00000001.wav": "selection", "anomaly_id_06_00000099.wav": "selection",
          "section_00_source_test_normal_0001_a.wav": "report", "section_01_target_test_anomaly_0003.wav": "report",
          "id_01_00000005.wav": "report", "section_00_test_0007.wav": "report"}


def test_selection_and_report_halves_are_deterministic_and_disjoint():
    names = [f"{lab}_id_{i % 4 * 2:02d}_{i:08d}.wav" for i, lab in enumerate(["normal", "anomaly"] * 500)]
    halves = [split_half(n) for n in names]
    assert set(halves) == {"selection", "report"}
    assert 0.4 < halves.count("selection") / len(names) < 0.6
    assert [split_half(f"dev_data/fan/test/{n}") for n in names] == halves  # only the base name counts
    # a SHA-1 of the name, not Python's salted hash(): the same in every process and version, so experiments stay
    # comparable (these values were recorded once; a change here silently moves clips between the halves)
    assert {n: split_half(n) for n in GOLDEN} == GOLDEN
    t = table([(n, "00", "test", 0, 0.0) for n in names])
    sel, rep = set(t.loc[t["half"] == "selection", "file"]), set(t.loc[t["half"] == "report", "file"])
    assert not sel & rep and sel | rep == set(names)


# ---------------------------------------------------------------------- a fabricated experiment
DEV, EVAL = ("00", "02"), "01"


def clip_rows(mt: str) -> pd.DataFrame:
    rows = []
    for sec in (*DEV, EVAL):
        rows += [(f"{mt}/train/normal_id_{sec}_{i:08d}.wav", sec, "train", 0) for i in range(30)]
    for sec in DEV:
        rows += [(f"{mt}/test/normal_id_{sec}_{i:08d}.wav", sec, "test", 0) for i in range(24)]
        rows += [(f"{mt}/test/anomaly_id_{sec}_{i:08d}.wav", sec, "test", 1) for i in range(24)]
    rows += [(f"{mt}/test/id_{EVAL}_{i:08d}.wav", EVAL, "test", None) for i in range(10)]
    t = pd.DataFrame(rows, columns=["file", "section", "split", "label"])
    t["machine_type"], t["domain"] = mt, ""
    t["label"] = pd.array(t["label"], dtype="Int8")
    t["half"] = [("train" if s == "train" else split_half(f)) for f, s in zip(t["file"], t["split"])]
    return t


def fake_scores(mt: str, quality: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Scores with a section-specific offset and scale (so standardisation matters) and a trial's own noise."""
    t = clip_rows(mt)
    rng = np.random.default_rng(seed)
    offset = {s: 10.0 * (i + 1) * (seed % 3 + 1) for i, s in enumerate((*DEV, EVAL))}
    scale = {s: 1.0 + i + seed % 2 for i, s in enumerate((*DEV, EVAL))}
    y = t["label"].fillna(0).astype(float).to_numpy()
    sec = t["section"].to_numpy()
    t["score"] = [offset[s] for s in sec] + np.array([scale[s] for s in sec]) * (quality * y + rng.normal(size=len(t)))
    t = t[COLS]
    return t[t["split"] == "test"].reset_index(drop=True), t[t["split"] == "train"].reset_index(drop=True)


def tiny_model(family: str, params: dict) -> tuple[dict, dict]:
    """(state, trial.json) of a real model trained for one epoch on random 8-mel clips."""
    from raysd.data.features import FeatureSpec
    from raysd.families.base import create_family
    from raysd.families.clips import ClipSet, DataInfo
    from raysd.train import Trainer

    spec = FeatureSpec(n_mels=8, clip_seconds=0.16)
    info = DataInfo(n_mels=8, n_frames=spec.n_frames, n_classes=3, class_names=("00", "01", "02"))
    fam, hp = create_family(family, params)
    g = torch.Generator().manual_seed(zlib.crc32(family.encode()))
    data = ClipSet(torch.randn(12, 8, spec.n_frames, generator=g), torch.arange(12) % 3, fam.view())
    trainer = Trainer(fam, hp, info)
    trainer.fit(data, epochs=1)
    return trainer.state_dict(), {"family": family, "machine_type": "", "params": params, "spec": spec.to_dict(),
                                  "info": info.__dict__, "epoch": 1}


DENSE = {"lr": 1e-3, "batch_size": 16, "epochs": 3, "hidden": 8, "depth": 1, "bottleneck": 2, "frames": 2}
MADE = {"lr": 1e-3, "batch_size": 16, "epochs": 3, "hidden": [16], "frames": 2}
QUALITY = {"fd1": 1.2, "fd2": 0.3, "fg1": 1.0, "vd1": 0.8, "vd2": 1.5}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("exp") / "unit"
    studies = ["fan__dense_ae", "fan__group_made", "valve__dense_ae"]
    write_experiment(root, studies)
    models = {"dense_ae": tiny_model("dense_ae", DENSE), "group_made": tiny_model("group_made", MADE)}
    finished = [("fan__dense_ae", "fd1", "dense_ae", "fan"), ("fan__dense_ae", "fd2", "dense_ae", "fan"),
                ("fan__group_made", "fg1", "group_made", "fan"), ("valve__dense_ae", "vd1", "dense_ae", "valve"),
                ("valve__dense_ae", "vd2", "dense_ae", "valve")]
    for seed, (study, tid, fam, mt) in enumerate(finished):
        params = DENSE if fam == "dense_ae" else MADE
        test, train = fake_scores(mt, QUALITY[tid], seed)
        state, tj = models[fam]
        ck = write_checkpoint(root, study, tid, state, {**tj, "machine_type": mt}, test, train)
        write_record(root, study, tid, fam, mt, params, "finished", checkpoint=ck, wall_seconds=100.0 + seed, gpus=1,
                     metrics={"epoch": 3, "train_loss": 0.5, "train_seconds": 90.0 + seed, "training_iteration": 3})
    # stopped early by ASHA after 1 of 3 epochs
    write_record(root, "fan__dense_ae", "fd3", "dense_ae", "fan", {**DENSE, "lr": 0.02}, "stopped early",
                 metrics={"epoch": 1, "sel_auc": 0.61, "train_loss": 2.0},
                 checkpoint=root / "train" / "fan__dense_ae" / "fd3" / "checkpoint_x",
                 reason="stopped by the scheduler after 1 of 3 epochs")
    # failed: its loss became NaN; and lost after its retries
    write_record(root, "fan__group_made", "fg2", "group_made", "fan", {**MADE, "lr": 10.0}, "failed",
                 metrics={"epoch": 1, "failed": "training loss became nan in epoch 1"},
                 reason="training loss became nan in epoch 1")
    write_record(root, "fan__dense_ae", "fd4", "dense_ae", "fan", {**DENSE, "lr": 0.03}, "stopped early",
                 metrics={"epoch": 2, "sel_auc": 0.58}, reason="stopped by the scheduler after 2 of 3 epochs")
    write_record(root, "fan__group_made", "fg3", "group_made", "fan", MADE, "failed",
                 reason="lost after 2 retries: ray.exceptions.RayTaskError: worker died: out of memory")
    return root


@pytest.fixture(scope="module")
def report(experiment: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "unit"
    assert leaderboard.main([str(experiment), "--out", str(out), "--top-k", "3", "--steps", "4"]) == 0
    return out


def test_leaderboard_lists_every_trial_with_its_status(experiment: Path, report: Path):
    board = pd.read_csv(report / "leaderboard.csv", dtype={"trial_id": str})
    status = dict(zip(board["trial_id"], board["status"]))
    assert status == {"fd1": "finished", "fd2": "finished", "fg1": "finished", "vd1": "finished", "vd2": "finished",
                      "fd3": "stopped early", "fd4": "stopped early", "fg2": "failed", "fg3": "failed"}
    row = board.set_index("trial_id")
    assert row.loc["fg2", "reason"] == "training loss became nan in epoch 1"
    assert "out of memory" in row.loc["fg3", "reason"]
    assert row.loc["fd3", "epochs"] == 1 and row.loc["fd3", "sel_auc"] == 0.61 and pd.isna(row.loc["fd3", "report_auc"])
    assert "1 of 3 epochs" in row.loc["fd3", "reason"]
    assert row.loc["fd4", "reason"] == "stopped by the scheduler after 2 of 3 epochs"
    assert row.loc["fd4", "sel_auc"] == 0.58 and row.loc["fd4", "epochs"] == 2
    assert row.loc["fd1", "epochs"] == 3 and row.loc["fd1", "train_seconds"] == 90.0
    assert row.loc["fd1", "gpu_hours"] == pytest.approx(100.0 / 3600)
    assert row.loc["fd1", "hp_lr"] == 1e-3 and row.loc["fg1", "hp_hidden"] == "[16]"
    assert row.loc["fd1", "checkpoint"].endswith("checkpoint_2026-01-01_00-00-03.000000")
    assert (report / row.loc["fd1", "checkpoint"]).is_dir()  # named relative to the report folder
    reports = [p for p in report.iterdir() if p.suffix in (".csv", ".json", ".md")]
    named = {str(experiment), str(experiment.resolve())}
    assert reports and not any(n in p.read_text() for p in reports for n in named)  # no absolute paths
    # ranks per machine type follow the selection-half AUC; unscored trials have none
    for mt, g in board[board["rank"].notna()].groupby("machine_type"):
        assert g.sort_values("rank")["sel_auc"].is_monotonic_decreasing
        assert g["rank"].tolist() == list(range(1, len(g) + 1))
    assert board.loc[board["status"] != "finished", "rank"].isna().all()


def test_leaderboard_figures_are_the_metrics_of_each_half(experiment: Path, report: Path):
    board = pd.read_csv(report / "leaderboard.csv", dtype={"trial_id": str}).set_index("trial_id")
    test = pd.read_csv(experiment / "train/fan__dense_ae/fd1/checkpoint_2026-01-01_00-00-03.000000/scores_test.csv",
                       dtype={"section": str}, keep_default_na=False, na_values={"label": [""]})
    lab = test[test["label"].notna()]
    for half, prefix in (("selection", "sel"), ("report", "report")):
        h = lab[lab["half"] == half]
        aucs = [roc_auc_score(g["label"], g["score"]) for _, g in h.groupby("section")]
        paucs = [roc_auc_score(g["label"], g["score"], max_fpr=0.1) for _, g in h.groupby("section")]
        assert board.loc["fd1", f"{prefix}_auc"] == pytest.approx(np.mean(aucs), abs=1e-12)
        assert board.loc["fd1", f"{prefix}_pauc"] == pytest.approx(np.mean(paucs), abs=1e-12)
        assert board.loc["fd1", f"{prefix}_auc_02"] == pytest.approx(aucs[1], abs=1e-12)
    g00 = lab[lab["section"] == "00"]
    assert board.loc["fd1", "test_auc_00"] == pytest.approx(roc_auc_score(g00["label"], g00["score"]), abs=1e-12)
    assert "test_auc_01" not in board.columns  # the unlabelled evaluation ID has no figures


def test_best_models_is_the_best_trial_of_each_family(report: Path):
    best = pd.read_csv(report / "best_models.csv", dtype={"trial_id": str})
    board = pd.read_csv(report / "leaderboard.csv", dtype={"trial_id": str})
    assert sorted(zip(best["machine_type"], best["family"])) == [("fan", "dense_ae"), ("fan", "group_made"),
                                                                 ("valve", "dense_ae")]
    fin = board[board["status"] == "finished"]
    for r in best.itertuples():
        mine = fin[(fin["machine_type"] == r.machine_type) & (fin["family"] == r.family)]
        assert r.trial_id == mine.loc[mine["sel_auc"].idxmax(), "trial_id"]


def _z(experiment: Path, study: str, tid: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    ck = experiment / "train" / study / tid / "checkpoint_2026-01-01_00-00-03.000000"
    test, train = (read_scores(str(ck / f)) for f in ("scores_test.csv", "scores_train.csv"))
    stats = fit_stats(train)
    return standardise(test, stats), standardise(train, stats)


def test_ensembles_are_standardised_combinations_beside_the_best_single(experiment: Path, report: Path):
    ens = pd.read_csv(report / "ensembles.csv")
    fan = ens[ens["machine_type"] == "fan"].set_index("ensemble")
    assert list(fan.index) == ["best single", "family-best mean", "family-best max", "greedy mean", "greedy max"]
    # family-best mean recomputed by hand: fd1 (best dense_ae) and fg1, each standardised by its training scores
    best_dense = fan.loc["best single", "members"] if fan.loc["best single", "members"].startswith("dense_ae") else None
    (za, _), (zb, _) = _z(experiment, "fan__dense_ae", "fd1"), _z(experiment, "fan__group_made", "fg1")
    for rule in ("mean", "max"):
        both = combine([za, zb], rule)
        for half, prefix in (("selection", "sel"), ("report", "report")):
            _, official = evaluate(both[both["half"] == half], rule="2020")
            assert fan.loc[f"family-best {rule}", f"{prefix}_auc"] == pytest.approx(official["auc"], abs=1e-12)
        _, official = evaluate(both, rule="2020")
        assert fan.loc[f"family-best {rule}", "test_pauc"] == pytest.approx(official["pauc"], abs=1e-12)
    assert fan.loc["family-best mean", "members"] in ("dense_ae/fd1 + group_made/fg1", "group_made/fg1 + dense_ae/fd1")
    assert best_dense is None or best_dense == "dense_ae/fd1"
    # gains are against the best single model; exactly one chosen row per machine type: the best on selection
    # (--ensemble-gain any, the default), and summary.md says why
    summary = (report / "summary.md").read_text()
    for mt in ("fan", "valve"):
        g = ens[ens["machine_type"] == mt].set_index("ensemble")
        assert (g["gain_report_auc"] - (g["report_auc"] - g.loc["best single", "report_auc"])).abs().max() < 1e-12
        assert g["chosen"].sum() == 1
        (why,) = [line for line in summary.splitlines() if line.startswith(f"- {mt}: ") and "single" in line]
        if g.loc[g["chosen"]].index[0] == "best single":
            assert "kept the best single model" in why or "no ensemble has a better" in why
        else:
            assert g.loc[g["chosen"], "sel_auc"].iloc[0] == g["sel_auc"].max() and "the best selection figure" in why
        assert (g["sel_auc_lo"] <= g["sel_auc"]).all() and (g["sel_auc"] <= g["sel_auc_hi"]).all()
    assert "family-best mean" not in ens.loc[ens["machine_type"] == "valve", "ensemble"].tolist()  # one family only
    assert {"best single", "chosen"} <= set(ens.loc[ens["machine_type"] == "(all)", "ensemble"])


def test_ensemble_json_holds_members_stats_and_thresholds(experiment: Path, report: Path):
    from raysd.artifacts import load_member

    doc = json.loads((report / "ensemble.json").read_text())
    assert doc["rule"] == "2020" and doc["quantile"] == 0.9 and set(doc["machine_types"]) == {"fan", "valve"}
    scores = pd.read_csv(report / "ensemble_scores.csv", dtype={"section": str})
    for mt, e in doc["machine_types"].items():
        assert e["combine"] in ("mean", "max") and e["sections"] == ["00", "01", "02"]
        for m in e["members"]:
            study, tid = m["study"], m["trial_id"]
            _, train = _z(experiment, study, tid)
            assert not Path(m["checkpoint"]).is_absolute()  # reports name no machine's folders
            raw = read_scores(str(report / m["checkpoint"] / "scores_train.csv"))
            for sec, st in m["stats"].items():
                s = raw.loc[raw["section"] == sec, "score"]
                assert st["mean"] == pytest.approx(s.mean()) and st["std"] == pytest.approx(s.std(ddof=0))
            assert m["config"]["train"]["lr"] == 1e-3 and m["config"]["family"]["frames"] == 2  # defaults filled in
            member = load_member(m, torch.device("cpu"), str(report / "ensemble.json"))  # weights-only load works
            assert member.weight >= 1 and member.spec.n_mels == 8
        train = scores[(scores["machine_type"] == mt) & (scores["split"] == "train")]
        for sec, thr in e["threshold"].items():
            assert thr == pytest.approx(np.quantile(train.loc[train["section"] == sec, "score"], 0.9))
        test = scores[(scores["machine_type"] == mt) & (scores["split"] == "test")]
        assert (test["decision"] == (test["score"] > test["section"].map(e["threshold"])).astype(int)).all()


def test_submission_files_rescored_give_the_leaderboards_figures(report: Path):
    sub = read_submission(report / "submission")
    names = sorted(p.name for p in (report / "submission").iterdir())
    assert names == [f"anomaly_score_{mt}_id_{s}.csv" for mt in ("fan", "valve") for s in ("00", "01", "02")]
    scores = pd.read_csv(report / "ensemble_scores.csv", dtype={"section": str}, keep_default_na=False,
                         na_values={"label": [""]})
    truth = scores[scores["split"] == "test"].assign(file_name=lambda d: d["file"].str.rsplit("/", n=1).str[-1])
    assert len(sub) == len(truth)  # the unlabelled evaluation clips are in the files too
    merged = sub.merge(truth[["machine_type", "file_name", "label", "half"]], on=["machine_type", "file_name"])
    merged = merged.assign(file=merged["file_name"], split="test")
    ens = pd.read_csv(report / "ensembles.csv")
    chosen = ens[ens["chosen"]].set_index("machine_type")
    for mt in ("fan", "valve"):
        m = merged[merged["machine_type"] == mt]
        per, official = evaluate(m, rule="2020")
        assert official["auc"] == chosen.loc[mt, "test_auc"] and official["pauc"] == chosen.loc[mt, "test_pauc"]
        _, sel = evaluate(m[m["half"] == "selection"], rule="2020")
        assert sel["auc"] == chosen.loc[mt, "sel_auc"]


def test_summary_and_plots_are_written_atomically(report: Path):
    text = (report / "summary.md").read_text()
    assert "stopped early" in text and "training loss became nan" in text and "## Ensembles against the best single model" in text
    for mt in ("fan", "valve"):
        for kind in ("roc", "hist"):
            png = report / f"{kind}_{mt}.png"
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            assert f"]({png.name})" in text
    assert not [p for p in report.rglob("*") if p.name.startswith(".")]  # no temporary files left behind


def test_rerun_replaces_reports(experiment: Path, report: Path):
    (report / "submission" / "anomaly_score_stale_id_09.csv").write_text("x.wav,1.0\n")
    assert leaderboard.main([str(experiment), "--out", str(report), "--top-k", "3", "--steps", "4", "--no-plots"]) == 0
    assert not (report / "submission" / "anomaly_score_stale_id_09.csv").exists()


def test_no_finished_trial_is_a_clear_error(tmp_path: Path, capsys):
    root = write_experiment(tmp_path / "exp", ["fan__dense_ae"])
    write_record(root, "fan__dense_ae", "x1", "dense_ae", "fan", DENSE, "failed", reason="NonFiniteLoss: nan")
    write_record(root, "fan__dense_ae", "x2", "dense_ae", "fan", DENSE, "stopped early", metrics={"epoch": 1,
                                                                                              "sel_auc": 0.5})
    assert leaderboard.main([str(root), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no finished trial" in err and "1 failed" in err and "1 stopped early" in err
    assert (tmp_path / "out" / "leaderboard.csv").exists()
    assert leaderboard.main([str(tmp_path), "--out", str(tmp_path / "out2")]) == 2
    assert "not a raysd experiment folder" in capsys.readouterr().err


def clip_rows_2022(mt: str) -> pd.DataFrame:
    rows = []
    for sec in ("00", "01"):
        for dom, n_train in (("source", 24), ("target", 4)):
            rows += [(f"{mt}/train/section_{sec}_{dom}_train_normal_{i:04d}_a.wav", sec, dom, "train", 0)
                     for i in range(n_train)]
            rows += [(f"{mt}/test/section_{sec}_{dom}_test_{kind}_{i:04d}_a.wav", sec, dom, "test", y)
                     for kind, y in (("normal", 0), ("anomaly", 1)) for i in range(20)]
    t = pd.DataFrame(rows, columns=["file", "section", "domain", "split", "label"])
    t["machine_type"] = mt
    t["label"] = pd.array(t["label"], dtype="Int8")
    t["half"] = [("train" if s == "train" else split_half(f)) for f, s in zip(t["file"], t["split"])]
    return t


@pytest.mark.parametrize("rule", ["2021", "2022"])
def test_2021_and_2022_figures_and_decision_files_from_the_ensemble_thresholds(tmp_path: Path, rule: str):
    root = write_experiment(tmp_path / "exp", ["gearbox__dense_ae"], rule=rule, layout=f"dcase{rule}")
    state, tj = tiny_model("dense_ae", DENSE)
    for seed, quality in enumerate((1.0, 0.7, 1.3)):
        t = clip_rows_2022("gearbox")
        rng = np.random.default_rng(seed)
        t["score"] = 5.0 * seed + t["label"].astype(float).to_numpy() * quality + rng.normal(size=len(t))
        t = t[COLS]
        ck = write_checkpoint(root, "gearbox__dense_ae", f"g{seed}", state, tj, t[t["split"] == "test"],
                              t[t["split"] == "train"])
        write_record(root, "gearbox__dense_ae", f"g{seed}", "dense_ae", "gearbox", DENSE, "finished", checkpoint=ck,
                     metrics={"epoch": 3})
    out = tmp_path / "out"
    assert leaderboard.main([str(root), "--out", str(out), "--no-plots", "--quantile", "0.8", "--steps", "3"]) == 0
    board = pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str}).set_index("trial_id")
    test = read_scores(str(root / "train/gearbox__dense_ae/g2/checkpoint_2026-01-01_00-00-03.000000"
                                       / "scores_test.csv"))
    _, official = evaluate(test[test["half"] == "report"], rule=rule)
    for k in ("auc_source", "auc_target", "pauc") if rule == "2022" else ("auc", "pauc"):
        assert board.loc["g2", f"report_{k}"] == pytest.approx(official[k], abs=1e-12)
    assert board.loc["g2", "report_official"] == pytest.approx(official["score"], abs=1e-12)
    if rule == "2022":
        assert {"test_auc_source_00", "test_auc_target_01", "test_pauc_01"} <= set(board.columns)
    else:  # 2021 evaluates each domain on its own
        assert {"test_auc_00_source", "test_auc_01_target", "test_pauc_01_source"} <= set(board.columns)

    thr = json.loads((out / "ensemble.json").read_text())["machine_types"]["gearbox"]["threshold"]
    per_clip = pd.read_csv(out / "ensemble_scores.csv", dtype={"section": str})
    train = per_clip[per_clip["split"] == "train"]
    for sec, v in thr.items():
        assert v == pytest.approx(np.quantile(train.loc[train["section"] == sec, "score"], 0.8))
    sub = read_submission(out / "submission").merge(read_submission(out / "submission", "decision_result"),
                                                    on=["machine_type", "section", "domain", "file_name"])
    domains = ("_source", "_target") if rule == "2021" else ("",)
    assert sorted(p.name for p in (out / "submission").iterdir()) == [
        f"{k}_gearbox_section_{s}{d}_test.csv" for k in ("anomaly_score", "decision_result") for s in ("00", "01")
        for d in domains]
    assert len(sub) == 160 and 0 < sub["decision"].sum() < 160
    assert (sub["decision"] == (sub["score"] > sub["section"].map(thr)).astype(int)).all()


TRIPLET = {"lr": 1e-3, "batch_size": 8, "epochs": 1, "channels": [4], "emb_dim": 2, "patch_frames": 4, "patch_hop": 2,
           "precise_bn": 0, "scope": "dataset", "labels": "type_section", "score": "knn"}


def test_a_dataset_scope_trial_ranks_and_ensembles_in_every_machine_type(tmp_path: Path):
    """One trial over fan and valve: its rows appear in both types' leaderboards, best models and ensemble candidates."""
    studies = ["fan__dense_ae", "valve__dense_ae", "all__triplet"]
    root = write_experiment(tmp_path / "exp", studies, study_types={"all__triplet": ["fan", "valve"]},
                            study_scopes={"all__triplet": "dataset"})
    dense, triplet = tiny_model("dense_ae", DENSE), tiny_model("triplet", TRIPLET)
    for seed, (study, tid, mt) in enumerate((("fan__dense_ae", "f1", "fan"), ("valve__dense_ae", "v1", "valve"))):
        test, train = fake_scores(mt, 0.5, seed)
        ck = write_checkpoint(root, study, tid, dense[0], {**dense[1], "machine_type": mt}, test, train)
        write_record(root, study, tid, "dense_ae", mt, DENSE, "finished", checkpoint=ck, metrics={"epoch": 3})
    parts = [fake_scores(mt, 2.0, 7 + i) for i, mt in enumerate(("fan", "valve"))]
    ck = write_checkpoint(root, "all__triplet", "d1", triplet[0], {**triplet[1], "machine_type": "all"},
                          pd.concat([p[0] for p in parts], ignore_index=True),
                          pd.concat([p[1] for p in parts], ignore_index=True))
    write_record(root, "all__triplet", "d1", "triplet", "all", TRIPLET, "finished", checkpoint=ck,
                 metrics={"epoch": 1}, machine_types=["fan", "valve"], scope="dataset")
    # stopped by ASHA
    write_record(root, "all__triplet", "d2", "triplet", "all", TRIPLET, "stopped early",
                 metrics={"epoch": 1, "sel_auc": 0.6}, machine_types=["fan", "valve"], scope="dataset")
    out = tmp_path / "out"
    assert leaderboard.main([str(root), "--out", str(out), "--no-plots", "--steps", "3"]) == 0
    board = pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str})
    mine = board[board["trial_id"] == "d1"].set_index("machine_type")
    assert sorted(mine.index) == ["fan", "valve"] and set(mine["scope"]) == {"dataset"}
    assert (mine["rank"] == 1).all()  # it separates best in each type
    for mt in ("fan", "valve"):
        own = fake_scores(mt, 2.0, 7 + ("fan", "valve").index(mt))[0]
        _, official = evaluate(own, rule="2020")
        assert mine.loc[mt, "test_auc"] == pytest.approx(official["auc"], abs=1e-12)  # each type's own clips
    assert sorted(board.loc[board["trial_id"] == "d2", "machine_type"]) == ["fan", "valve"]
    best = pd.read_csv(out / "best_models.csv", dtype={"trial_id": str})
    assert set(best.loc[best["family"] == "triplet", "machine_type"]) == {"fan", "valve"}
    ens = pd.read_csv(out / "ensembles.csv")
    for mt in ("fan", "valve"):
        fam_best = ens[(ens["machine_type"] == mt) & (ens["kind"] == "family-best")]
        assert fam_best["members"].str.contains("triplet/d1").all() and len(fam_best) == 2
    doc = json.loads((out / "ensemble.json").read_text())["machine_types"]
    for mt in ("fan", "valve"):
        members = {m["name"]: m for m in doc[mt]["members"]}
        assert "triplet/d1" in members and set(members["triplet/d1"]["stats"]) == {"00", "01", "02"}


def test_a_configuration_trained_with_several_seeds_is_a_seed_ensemble(tmp_path: Path):
    """Three trials of one study differing in ``seed`` alone (a preset's ``repeats: 3``) and a fourth configuration:
    the three form one seed ensemble, the mean of their standardised scores, reported beside each member."""
    root = write_experiment(tmp_path / "exp", ["fan__dense_ae"])
    state, tj = tiny_model("dense_ae", DENSE)
    trials = [("r0", {**DENSE, "seed": 0}, 0.6), ("r1", {**DENSE, "seed": 1}, 0.7), ("r2", {**DENSE, "seed": 2}, 0.5),
              ("other", {**DENSE, "lr": 3e-3, "seed": 0}, 0.8)]
    for i, (tid, params, quality) in enumerate(trials):
        test, train = fake_scores("fan", quality, i)
        ck = write_checkpoint(root, "fan__dense_ae", tid, state, {**tj, "machine_type": "fan"}, test, train)
        write_record(root, "fan__dense_ae", tid, "dense_ae", "fan", params, "finished", checkpoint=ck,
                     metrics={"epoch": 3})
    out = tmp_path / "out"
    assert leaderboard.main([str(root), "--out", str(out), "--no-plots", "--steps", "3"]) == 0
    ens = pd.read_csv(out / "ensembles.csv")
    ens = ens[ens["machine_type"] == "fan"].set_index("ensemble")
    row = ens.loc["seeds:fan__dense_ae"]
    assert row["kind"] == "seeds" and row["combine"] == "mean" and row["n_members"] == 3
    assert set(row["members"].split(" + ")) == {"dense_ae/r0", "dense_ae/r1", "dense_ae/r2"}
    assert (ens["kind"] == "seeds").sum() == 1  # 'other' has no twin: no group of its own
    # the same standardisation and combination as every ensemble: each member by its own training scores, then mean
    zs = [_z(root, "fan__dense_ae", tid)[0] for tid in ("r0", "r1", "r2")]
    both = combine(zs, "mean")
    for half, prefix in (("selection", "sel"), ("report", "report")):
        _, official = evaluate(both[both["half"] == half], rule="2020")
        assert row[f"{prefix}_auc"] == pytest.approx(official["auc"], abs=1e-12)
    # beside its members: their mean and best, from the leaderboard's own figures of each
    board = pd.read_csv(out / "leaderboard.csv", dtype={"trial_id": str}).set_index("trial_id")
    mine = board.loc[["r0", "r1", "r2"], "report_auc"]
    assert row["members_mean_report_auc"] == pytest.approx(mine.mean(), abs=1e-12)
    assert row["members_best_report_auc"] == pytest.approx(mine.max(), abs=1e-12)
    # it takes part in the choice like every candidate: the chosen one is the best on the selection half
    assert ens["chosen"].sum() == 1 and ens.loc[ens["chosen"], "sel_auc"].iloc[0] == ens["sel_auc"].max()
    seeds = pd.read_csv(out / "seed_ensembles.csv", dtype={"seed": str})
    assert seeds["member"].tolist()[0] == "(mean of 3)" and sorted(seeds["seed"].dropna()) == ["0", "1", "2"]
    assert seeds.set_index("member").loc["dense_ae/r1", "report_auc"] == pytest.approx(board.loc["r1", "report_auc"])
    summary = (out / "summary.md").read_text()
    assert "## Seed ensembles against their members" in summary and "seeds:fan__dense_ae" in summary
    assert re.search(r"\| dense_ae/r2 +\| 2 +\|", summary)  # the member's row and its seed
