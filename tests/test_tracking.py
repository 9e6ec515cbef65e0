"""Experiment tracking: a tiny search with ``--tracking mlflow wandb``, read back through MLflow's client API
(one run per trial, its hyperparameters, a metric per epoch, the leaderboard's report-half figures) and W&B's
offline run folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raysd import tracking

ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline",
       "WANDB_SILENT": "true"}


def test_mlflow_store_defaults_to_sqlite_in_the_experiment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.mlflow_uri(str(tmp_path / "exp")) == f"sqlite:///{tmp_path / 'exp' / 'mlflow.db'}"
    with pytest.raises(tracking.TrackingError, match="MLFLOW_TRACKING_URI"):
        tracking.mlflow_uri("s3://bucket/exp")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://tracker:5000")
    assert tracking.mlflow_uri("s3://bucket/exp") == "http://tracker:5000"


def test_a_missing_tracker_package_names_the_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(tracking.TrackingError, match=r'raysd\[wandb\]'):
        tracking.check(["tensorboard", "wandb"], str(tmp_path))
    tracking.check(["tensorboard"], str(tmp_path))


@pytest.mark.slow
def test_a_search_tracked_with_mlflow_and_wandb(tiny_root: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({
        "name": "tracked", "dataset": {"layout": "auto"}, "rule": "2020", "machine_types": ["fan"],
        "features": {"sample_rate": 16000, "n_fft": 1024, "hop_length": 512, "n_mels": 64, "clip_seconds": 3.0},
        "metric": "sel_auc", "seed": 0, "scheduler": {"type": "none"}, "max_failures": 1,
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "families": {"dense_ae": {"num_samples": 2, "epochs": 2,
                                  "space": {"lr": {"loguniform": [1e-4, 1e-2]}, "batch_size": 512}}},
    }))
    exp = tmp_path / "exp"
    cmd = [sys.executable, "-m", "raysd.search", str(preset), "--data-root", str(tiny_root), "--cache-dir",
           str(tmp_path / "cache"), "--storage-path", str(exp), "--results-dir", str(tmp_path / "results"),
           "--tracking", "tensorboard", "mlflow", "wandb"]
    done = subprocess.run(cmd, cwd=tmp_path, env={k: v for k, v in ENV.items() if k != "MLFLOW_TRACKING_URI"},
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    client = MlflowClient(tracking_uri=tracking.mlflow_uri(str(exp / "tracked")))
    experiment = client.get_experiment_by_name("tracked")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2, [r.info.run_name for r in runs]
    for run in runs:
        assert float(run.data.params["lr"]) > 0 and run.data.params["batch_size"] == "512"
        history = client.get_metric_history(run.info.run_id, "sel_auc")
        assert len(history) == 2  # one value per epoch
        assert 0.0 <= run.data.metrics["report_official"] <= 1.0  # logged after the leaderboard
        assert run.data.tags["raysd_study"] == "fan__dense_ae"

    study = exp / "tracked" / "studies" / "fan__dense_ae"
    assert list(study.rglob("events.out.tfevents.*")), "Tune's TensorBoard files are missing"
    assert len(list(study.rglob("offline-run-*"))) + len(list(tmp_path.rglob("offline-run-*"))) >= 2
