"""Fabricate raysd experiment folders as ``raysd.search`` / ``raysd.trial`` write them (shared by the leaderboard
and score tests): ``experiment.json``, trial records and real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from raysd import artifacts


def write_experiment(root: Path, studies: list[str], rule: str = "2020", metric: str = "sel_auc",
                     mode: str = "max", preset: str = "unit", layout: str = "dcase2020", **extra) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / artifacts.EXPERIMENT_FILE).write_text(json.dumps({
        "preset": preset, "preset_path": f"search_spaces/{preset}.yaml", "rule": rule, "metric": metric, "mode": mode,
        "data_root": "/nowhere", "layout": layout, "studies": studies, "started": "2026-01-01T00:00:00", **extra}))
    return root


def write_checkpoint(root: Path, study: str, trial_id: str, state: dict, trial_json: dict,
                     test: pd.DataFrame | None = None, train: pd.DataFrame | None = None) -> Path:
    """A last checkpoint as a trial leaves it."""
    run = Path(artifacts.train_storage(str(root), study)) / trial_id
    ck = run / f"{artifacts.CHECKPOINT_PREFIX}2026-01-01_00-00-03.000000"
    ck.mkdir(parents=True)
    return artifacts.write_checkpoint(ck, state, trial_json, test=test, train=train)


def write_record(root: Path, study: str, trial_id: str, family: str, machine_type: str, params: dict, status: str,
                 metrics: dict | None = None, checkpoint: Path | None = None, reason: str | None = None,
                 wall_seconds: float = 10.0, gpus: float = 0, machine_types: list[str] | None = None,
                 scope: str | None = None) -> Path:
    """A trial's record as its study's driver writes it when the trial ends."""
    rec = artifacts.TrialRecord(study=study, family=family, machine_type=machine_type, trial_id=trial_id,
                                params=params, workers=1, gpus=gpus, status=status, wall_seconds=wall_seconds,
                                machine_types=machine_types, scope=scope, reason=reason, metrics=metrics or {},
                                gpu_hours=gpus * wall_seconds / 3600)
    if status in ("finished", "stopped early"):
        rec.checkpoint = str(checkpoint) if checkpoint else None
    rec.write(str(root))
    return Path(artifacts.trial_record_path(str(root), study, trial_id))
