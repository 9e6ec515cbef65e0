"""The ``birdaudio`` preset end to end on generated field recordings: ``python -m raysd.search`` with a copy of the
preset (no GPU, tiny settings, one recording examined) trains conv_ae on Ray, ranks trials by held-out loss,
and the leaderboard writes the anomaly report of the examined recording."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raysd.data import synth_field
from raysd.data.synth_field import FieldEvent
from raysd.presets import SEARCH_SPACES, load_preset
from raysd.report import unlabelled

ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
       "PYTHONUNBUFFERED": "1"}
EVENT = FieldEvent("motorcycle", 17.4, 5.0, 16.0)


def small_preset(tmp_path: Path) -> Path:
    """The birdaudio preset with CPU-only resources, short held-out blocks, one crop variant and fixed values."""
    body = yaml.safe_load((SEARCH_SPACES / "birdaudio.yaml").read_text())
    body["resources"] = {"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}
    body["scheduler"] = {"type": "none"}
    body["heldout"].update(block_clips=8, gap_clips=1, examine="field.wav")
    body["families"] = {"conv_ae": {"num_samples": 1, "epochs": 2, "space": {
        "lr": 1.0e-3, "batch_size": 16, "crop": "none", "frames": 44, "prune_every": 1, "prune_fraction": 0.05}}}
    path = tmp_path / "birdaudio.yaml"
    path.write_text(yaml.safe_dump(body))
    assert load_preset(path).metric == "heldout_loss"
    return path


@pytest.mark.slow
def test_birdaudio_search_ranks_by_heldout_loss_and_reports_anomalies(tmp_path: Path) -> None:
    data = tmp_path / "forest"
    (data / "site").mkdir(parents=True)
    synth_field.generate(data / "site" / "field.wav", 0.75, [EVENT], seed=21)
    for i in (1, 2):
        synth_field.generate(data / "site" / f"day{i}.wav", 0.75, 0, seed=21 + i)
    results = tmp_path / "results"
    cmd = [sys.executable, "-m", "raysd.search", str(small_preset(tmp_path)), "--data-root", str(data),
           "--num-samples", "1", "--epochs", "2", "--families", "conv_ae", "--workers", "1",
           "--cache-dir", str(tmp_path / "cache"), "--storage-path", str(tmp_path / "experiments"),
           "--results-dir", str(results)]
    done = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=1500)
    log = done.stdout[-6000:] + done.stderr[-6000:]
    assert done.returncode == 0, log
    assert (results / "anomalies.csv").exists(), log

    board = pd.read_csv(results / "leaderboard.csv")
    assert len(board) == 1 and board.loc[0, "status"] == "finished" and board.loc[0, "rank"] == 1
    assert board.loc[0, "heldout_loss"] > 0
    summary = (results / "summary.md").read_text()
    assert "Unlabelled data: trials are ranked by `heldout_loss`" in summary and "Strangest moments" in summary

    report = unlabelled.read_report(results / "anomalies.csv")
    assert len(report) == unlabelled.DEFAULT_TOP and set(report["recording"]) == {"site/field.wav"}
    assert EVENT.overlaps(report.loc[0, "start_s"], report.loc[0, "end_s"]), report.head()
    assert (results / "anomaly_scores.png").exists() and (results / "embedding_pca.png").exists()
    assert all((results / p).exists() for p in report["spectrogram"])

    (member,) = json.loads((results / "ensemble.json").read_text())["machine_types"]["site"]["members"]
    ckpt = results / member["checkpoint"]  # relative to the report folder
    held = pd.read_csv(ckpt / "scores_heldout.csv")
    pruned = pd.read_csv(ckpt / "pruned.csv")
    train = pd.read_csv(ckpt / "scores_train.csv")
    assert len(held) and len(pruned) and {"offset", "num_samples", "sample_rate"} <= set(train.columns)
    assert set(zip(pruned["file"], pruned["offset"])) <= set(zip(train["file"], train["offset"]))
    assert not set(zip(pruned["file"], pruned["offset"])) & set(zip(held["file"], held["offset"]))
