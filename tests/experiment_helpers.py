"""Fabricate raysd experiment folders as ``raysd.search`` / ``raysd.trial`` write them (shared by the leaderboard
and score tests): ``experiment.json``, trial records, Ray Tune study folders and real checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from raysd import artifacts

TUNE_STATE = "experiment_state-2026-01-01_00-00-00.json"


def write_experiment(root: Path, studies: list[str], rule: str = "2020", metric: str = "sel_auc",
                     mode: str = "max", preset: str = "unit", layout: str = "dcase2020", **extra) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / artifacts.EXPERIMENT_FILE).write_text(json.dumps({
        "preset": preset, "preset_path": f"search_spaces/{preset}.yaml", "rule": rule, "metric": metric, "mode": mode,
        "data_root": "/nowhere", "layout": layout, "studies": studies, "started": "2026-01-01T00:00:00", **extra}))
    return root


def write_checkpoint(root: Path, study: str, trial_id: str, state: dict, trial_json: dict,
                     test: pd.DataFrame | None = None, train: pd.DataFrame | None = None) -> Path:
    """A last checkpoint as ``raysd.trial.train_worker`` leaves it."""
    run = Path(artifacts.train_storage(str(root), study)) / trial_id
    ck = run / f"{artifacts.CHECKPOINT_PREFIX}2026-01-01_00-00-03.000000"
    ck.mkdir(parents=True)
    return artifacts.write_checkpoint(ck, state, trial_json, test=test, train=train)


def write_record(root: Path, study: str, trial_id: str, family: str, machine_type: str, params: dict, status: str,
                 metrics: dict | None = None, checkpoint: Path | None = None, reason: str | None = None,
                 wall_seconds: float = 10.0, gpus: float = 0, machine_types: list[str] | None = None,
                 scope: str | None = None) -> Path:
    rec = artifacts.TrialRecord(study=study, family=family, machine_type=machine_type, trial_id=trial_id,
                                params=params, workers=1, gpus=gpus, status=status, wall_seconds=wall_seconds,
                                machine_types=machine_types, scope=scope)
    if status == "failed":
        rec.reason = reason
    else:
        rec.metrics, rec.gpu_hours = metrics or {}, gpus * wall_seconds / 3600
        rec.checkpoint = str(checkpoint) if checkpoint else None
    rec.write(str(root))
    return Path(artifacts.trial_record_path(str(root), study, trial_id))


def write_tune_trial(root: Path, study: str, trial_id: str, params: dict, results: list[dict],
                     status: str = "TERMINATED", error: str | None = None) -> Path:
    """A Ray Tune trial folder (params.json, result.json lines, error.txt) and its entry in the study's state file."""
    sdir = root / artifacts.STUDIES_DIR / study
    n = len(list(sdir.glob("run_trial_*"))) + 1 if sdir.exists() else 1
    logdir = f"run_trial_{trial_id}_{n}_lr={params.get('lr', 0):.4f}_2026-01-01_00-00-00"
    tdir = sdir / logdir
    tdir.mkdir(parents=True)
    (tdir / "params.json").write_text(json.dumps(params))
    lines = []
    for i, r in enumerate(results, start=1):
        lines.append(json.dumps({**r, "training_iteration": i, "trial_id": trial_id, "done": False,
                                 "time_total_s": 5.0 * i, "config": params}))
    (tdir / "result.json").write_text("\n".join(lines) + ("\n" if lines else ""))
    if error:
        (tdir / "error.txt").write_text(f"Failure # 1 (occurred at 2026-01-01)\nTraceback...\n{error}\n")
    state_path = sdir / TUNE_STATE
    data = json.loads(state_path.read_text()) if state_path.exists() else {"trial_data": [], "runner_data": {}}
    state = {"trial_id": trial_id, "status": status, "relative_logdir": logdir, "config": params}
    run = {"error_filename": "error.txt" if error else None,
           "last_result": json.loads(lines[-1]) if lines else {}}
    data["trial_data"].append([json.dumps(state), json.dumps(run)])
    state_path.write_text(json.dumps(data))
    return tdir
