"""Reading an experiment folder written by ``raysd.search`` into typed :class:`Trial` / :class:`Experiment` objects.

Each trial's record (``trials/<study>/<id>.json``, written by its study's driver when the trial ended) says how it
ended; a trial without one (the search was stopped while it ran) is read from Ray Tune's own state through
``ray.tune.ExperimentAnalysis``; the last checkpoint of each finished trial gives its per-clip score tables.
Nothing here starts Ray.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import pandas as pd

from raysd import artifacts, storage
from raysd.metrics import normalize_rule


class LeaderboardError(RuntimeError):
    """An experiment folder the leaderboard cannot report on, with what is wrong."""


# ---------------------------------------------------------------------- reading an experiment
@dataclass
class Trial:
    study: str
    family: str
    machine_type: str
    trial_id: str
    status: str  # one of raysd.artifacts.STATUSES
    params: dict = field(default_factory=dict)
    reason: str = ""
    metrics: dict = field(default_factory=dict)  # last reported
    checkpoint: str | None = None
    wall_seconds: float = math.nan
    gpu_hours: float = math.nan
    workers: int | None = None
    gpus: float | None = None
    test: pd.DataFrame | None = None  # scores_test.csv of the last checkpoint
    train: pd.DataFrame | None = None
    heldout: pd.DataFrame | None = None  # scores_heldout.csv (unlabelled data; read when reporting anomalies)
    scope: str = "machine_type"  # 'dataset': one model for several machine types; this Trial is its part for one
    covers: tuple[str, ...] = ()  # every machine type the trial's study covers, when several

    @property
    def name(self) -> str:
        return f"{self.family}/{self.trial_id}"

    @property
    def key(self) -> str:
        """Unique per (trial, machine type): a trial over several machine types appears once per type."""
        return f"{self.study}/{self.trial_id}" + (f"@{self.machine_type}" if self.covers else "")

    @property
    def scored(self) -> bool:
        return self.test is not None and self.train is not None

    @property
    def epochs(self) -> float:
        for k in ("epoch", "training_iteration"):
            v = self.metrics.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return v
        return math.nan

    @property
    def train_seconds(self) -> float:
        for k in ("train_seconds", "time_total_s"):
            v = self.metrics.get(k)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
        return math.nan


@dataclass
class Experiment:
    root: str
    meta: dict
    trials: list[Trial]

    @property
    def rule(self) -> str:
        return normalize_rule(self.meta.get("rule", "2020"))

    @property
    def metric(self) -> str:
        return self.meta.get("metric", "sel_auc")

    @property
    def mode(self) -> str:
        return self.meta.get("mode", "max")

    @property
    def preset(self) -> str:
        return str(self.meta.get("preset", PurePosixPath(str(self.root).rstrip("/")).name))


def read_scores(uri: str) -> pd.DataFrame:
    """A per-clip score table (``scores_test.csv`` / ``scores_train.csv``) with typed columns."""
    try:
        t = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str, keep_default_na=False, na_filter=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise LeaderboardError(f"{uri}: cannot read score table ({type(e).__name__}: {e})") from None
    need = ("file", "machine_type", "section", "split", "label", "score")
    missing = [c for c in need if c not in t.columns]
    if missing:
        raise LeaderboardError(f"{uri}: score table lacks columns {missing}")
    for c in ("domain", "half"):
        if c not in t.columns:
            t[c] = ""
    labels = {"": None, "0": 0, "1": 1, "0.0": 0, "1.0": 1}
    bad = ~t["label"].isin(list(labels))
    if bad.any():
        raise LeaderboardError(f"{uri}: label must be 0, 1 or empty; got {t.loc[bad, 'label'].iloc[0]!r}")
    t["label"] = pd.array([labels[v] for v in t["label"]], dtype="Int8")
    try:
        t["score"] = t["score"].astype(float)
    except ValueError as e:
        raise LeaderboardError(f"{uri}: score column holds a non-number ({e})") from None
    if "offset" in t.columns:
        t["offset"] = t["offset"].astype("int64")
    return t


def num(v: Any) -> float:
    """A reported number as float; NaN for anything else (None, text, booleans)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def unrecorded_trials(study_dir: str, recorded: set[str], epochs: int | None) -> list[artifacts.TrialRecord]:
    """The trials of a study's Tune experiment that have no raysd record (a search interrupted while they ran, or
    before their end reached the record), read through Ray Tune's public ``ExperimentAnalysis``. Their outcome comes
    from their last report as Tune saved it; a trial Tune had not ended is 'unfinished'."""
    if not storage.exists(study_dir):
        return []
    try:
        from ray.tune import ExperimentAnalysis

        analysis = ExperimentAnalysis(study_dir)
    except Exception as e:  # no state saved yet, or one this Ray cannot read
        warnings.warn(f"raysd leaderboard: cannot read Ray Tune's state in {study_dir} ({type(e).__name__}: {e}); "
                      "trials without a record are left out")
        return []
    out = []
    for trial in analysis.trials:
        if trial.trial_id in recorded:
            continue
        last, config = dict(trial.last_result or {}), dict(trial.config or {})
        planned = epochs if epochs is not None else config.get("epochs")
        record = artifacts.TrialRecord(trial_id=trial.trial_id, params=config)
        if trial.status in ("TERMINATED", "ERROR"):
            error = "Ray Tune ended it with an error" if trial.status == "ERROR" else None
            ckpt = last.get("checkpoint_path") or (trial.checkpoint.path if trial.checkpoint is not None else None)
            out.append(record.ended(last, planned, storage.within(study_dir, ckpt), error))
        else:
            out.append(dataclasses.replace(record.ended(last, planned, None), status="unfinished",
                                           reason=f"Ray Tune status {trial.status}: the search stopped before it ended"))
    return out


def _trial(rec: artifacts.TrialRecord, study: str, meta: dict) -> Trial:
    mt_guess, _, fam_guess = study.partition("__")
    return Trial(study=rec.study or study, family=rec.family or fam_guess, machine_type=rec.machine_type or mt_guess,
                 trial_id=rec.trial_id, status=rec.status, params={k: v for k, v in rec.params.items()},
                 reason=rec.reason or "", metrics=rec.metrics or {}, checkpoint=rec.checkpoint,
                 wall_seconds=num(rec.wall_seconds), gpu_hours=num(rec.gpu_hours), workers=rec.workers, gpus=rec.gpus,
                 scope=rec.scope or meta.get("study_scopes", {}).get(study, "machine_type"))


def load_experiment(root: str | os.PathLike, load_scores: bool = True) -> Experiment:
    """Every trial of an experiment folder, with the score tables of finished trials: one raysd record per trial
    (written by the study's driver when the trial ended), and Ray Tune's own state for trials without one."""
    root = str(root)
    meta_uri = storage.join(root, artifacts.EXPERIMENT_FILE)
    if not storage.exists(meta_uri):
        raise LeaderboardError(f"{root} is not a raysd experiment folder (no {artifacts.EXPERIMENT_FILE}); "
                               "pass the folder that python -m raysd.search printed as 'experiment:'")
    try:
        meta = storage.read_json(meta_uri)
    except (OSError, json.JSONDecodeError) as e:
        raise LeaderboardError(f"{meta_uri}: cannot read ({e})") from None
    studies = list(meta.get("studies") or [])
    for f in storage.list_files(storage.join(root, artifacts.TRIALS_DIR), ".json"):
        s = PurePosixPath(f).parent.name
        if s not in studies:
            studies.append(s)
    study_types: dict[str, list[str]] = dict(meta.get("study_types") or {})
    trials: list[Trial] = []
    for study in studies:
        records: dict[str, artifacts.TrialRecord] = {}
        for f in storage.list_files(storage.join(root, artifacts.TRIALS_DIR, study), ".json"):
            try:
                loaded = artifacts.read_trial_record(f)
            except (OSError, json.JSONDecodeError) as e:
                warnings.warn(f"raysd leaderboard: skipping unreadable trial record {f} ({e})")
                continue
            records[str(loaded.trial_id or PurePosixPath(f).stem)] = loaded
        epochs = (meta.get("epochs") or {}).get(study)
        for rec in unrecorded_trials(storage.join(root, artifacts.STUDIES_DIR, study), set(records), epochs):
            records[rec.trial_id] = rec
        for tid in sorted(records):
            rec = records[tid]
            if rec.machine_types:
                study_types.setdefault(study, list(rec.machine_types))
            t = _trial(dataclasses.replace(rec, trial_id=tid), study, meta)
            t.params = {k: v for k, v in t.params.items() if k != "job"}
            trials.append(t)
    exp = Experiment(root, meta, trials)
    if load_scores:
        for t in exp.trials:
            if t.status != "finished":
                continue
            if not t.checkpoint:
                t.reason = "finished but no checkpoint was recorded"
                continue
            try:
                t.test, t.train = (read_scores(storage.join(t.checkpoint, f))
                                   for f in (artifacts.SCORES_TEST, artifacts.SCORES_TRAIN))
            except (LeaderboardError, OSError) as e:
                t.test = t.train = None
                t.reason = f"score tables unreadable: {e}"
                warnings.warn(f"raysd leaderboard: trial {t.study}/{t.trial_id}: {t.reason}")
    exp.trials = [part for t in exp.trials for part in per_type_parts(t, study_types.get(t.study))]
    return exp


def per_type_parts(t: Trial, types: list[str] | None) -> list[Trial]:
    """A trial of a study over several machine types as one Trial per type, each with that type's rows of the
    score tables, so that it ranks and joins ensembles beside the per-type trials; other trials unchanged."""
    if not types or (len(types) < 2 and t.machine_type in types):
        return [t]
    covers = tuple(types)
    parts = []
    for mt in covers:
        def rows(table: pd.DataFrame | None, mt: str = mt) -> pd.DataFrame | None:
            return None if table is None else table[table["machine_type"] == mt].reset_index(drop=True)

        test, train = rows(t.test), rows(t.train)
        if t.scored and (test is None or test.empty):
            continue  # the type had no test clips with features
        parts.append(dataclasses.replace(t, machine_type=mt, covers=covers, test=test, train=train,
                                         heldout=rows(t.heldout)))
    return parts
