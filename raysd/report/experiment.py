"""Reading an experiment folder written by ``raysd.search`` into typed :class:`Trial` / :class:`Experiment` objects.

Trial records (``trials/<study>/<id>.json``) say how each trial ended; Ray Tune's study folders
(``studies/<study>/``: its newest ``experiment_state-*.json`` and every trial folder's ``result.json``) fill in
trials that were stopped early or never wrote a record; the last checkpoint of each finished trial gives its
per-clip score tables. Nothing here starts Ray.
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
    status: str  # 'finished', 'stopped early', 'failed', 'unfinished'
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


def _last_json_line(uri: str) -> dict:
    """Last complete JSON line of a Tune ``result.json`` ({} if none)."""
    try:
        lines = storage.read_bytes(uri).decode("utf-8", "replace").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        line = line.strip()
        if not line:
            continue
        try:
            return json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    return {}


def _error_text(uri: str) -> str:
    try:
        text = storage.read_bytes(uri).decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    lines = [x.strip() for x in text if x.strip()]
    return lines[-1][:500] if lines else ""


def tune_trials(study_dir: str) -> dict[str, dict]:
    """Trials of one Ray Tune study folder, read from its files without starting Ray.

    Returns trial id -> {status (Tune's: TERMINATED, ERROR, RUNNING, ...; '' if unknown), config, last_result,
    error}. Tune's newest ``experiment_state-*.json`` gives statuses; every trial folder's ``params.json`` and
    ``result.json`` give configurations and last results (also for trials the state file does not list yet).
    """
    files = storage.list_files(study_dir)
    out: dict[str, dict] = {}
    states = sorted(f for f in files if PurePosixPath(f).name.startswith("experiment_state-") and f.endswith(".json")
                    and PurePosixPath(f).parent == PurePosixPath(study_dir))
    if not states:
        states = sorted(f for f in files
                        if PurePosixPath(f).name.startswith("experiment_state-") and f.endswith(".json"))
    logdirs: dict[str, str] = {}
    if states:
        try:
            data = storage.read_json(states[-1])
        except (OSError, json.JSONDecodeError) as e:
            warnings.warn(f"raysd leaderboard: cannot read Tune state {states[-1]} ({e}); using trial folders only")
            data = {}
        for entry in data.get("trial_data", []):
            try:
                state = json.loads(entry[0])
                run = json.loads(entry[1]) if len(entry) > 1 else {}
            except (TypeError, json.JSONDecodeError, IndexError):
                continue
            tid = str(state.get("trial_id", ""))
            if not tid:
                continue
            logdir = state.get("relative_logdir") or ""
            item = {"status": state.get("status", ""), "config": state.get("config") or {},
                    "last_result": run.get("last_result") or {}, "error": ""}
            if logdir:
                logdirs[tid] = storage.join(study_dir, logdir)
                if run.get("error_filename"):
                    item["error"] = _error_text(storage.join(study_dir, logdir, run["error_filename"]))
            out[tid] = item
    for f in files:
        p = PurePosixPath(f)
        if p.name != "result.json":
            continue
        last = _last_json_line(f)
        tid = str(last.get("trial_id", ""))
        folder = str(p.parent)
        if not tid:
            continue
        item = out.setdefault(tid, {"status": "", "config": {}, "last_result": {}, "error": ""})
        if last.get("training_iteration", 0) >= item["last_result"].get("training_iteration", 0):
            item["last_result"] = last
        if not item["config"]:
            item["config"] = last.get("config") or {}
        if not item["error"] and storage.exists(storage.join(folder, "error.txt")):
            item["error"] = _error_text(storage.join(folder, "error.txt"))
    return out


def num(v: Any) -> float:
    """A reported number as float; NaN for anything else (None, text, booleans)."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _stopped(last: dict, params: dict) -> str:
    reached = num(last.get("training_iteration", last.get("epoch")))
    planned = num(params.get("epochs"))
    if math.isnan(reached):
        return "stopped by the scheduler"
    return f"stopped by the scheduler after {reached:g}" + (f" of {planned:g}" if not math.isnan(planned) else "") + \
        " epochs"


def load_experiment(root: str | os.PathLike, load_scores: bool = True) -> Experiment:
    """Every trial of an experiment folder, with the score tables of finished trials."""
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
        mt_guess, _, fam_guess = study.partition("__")
        records: dict[str, artifacts.TrialRecord] = {}
        for f in storage.list_files(storage.join(root, artifacts.TRIALS_DIR, study), ".json"):
            try:
                loaded = artifacts.read_trial_record(f)
            except (OSError, json.JSONDecodeError) as e:
                warnings.warn(f"raysd leaderboard: skipping unreadable trial record {f} ({e})")
                continue
            records[str(loaded.trial_id or PurePosixPath(f).stem)] = loaded
        tuned = tune_trials(storage.join(root, artifacts.STUDIES_DIR, study))
        study_gpus = next((r.gpus for r in records.values() if r.gpus is not None), None)
        study_workers = next((r.workers for r in records.values() if r.workers is not None), None)
        for tid in sorted(set(records) | set(tuned)):
            tn = tuned.get(tid, {})
            if (rec := records.get(tid)) is not None:
                t = Trial(study=rec.study or study, family=rec.family or fam_guess,
                          machine_type=rec.machine_type or mt_guess, trial_id=tid, status=rec.status,
                          params=rec.params or tn.get("config") or {}, reason=rec.reason or "",
                          metrics=rec.metrics or tn.get("last_result") or {}, checkpoint=rec.checkpoint,
                          wall_seconds=num(rec.wall_seconds), gpu_hours=num(rec.gpu_hours),
                          workers=rec.workers, gpus=rec.gpus)
                if t.status == "failed" and tn.get("status") == "TERMINATED":
                    # Tune ended it without an error: the scheduler stopped it, whatever the driver wrote on its way out
                    last = tn.get("last_result") or {}
                    t.status = "stopped early"
                    t.reason = _stopped(last, t.params) + (f" (the trial recorded: {t.reason})" if t.reason else "")
                    t.metrics = {**last, **t.metrics}
                if t.status == "failed" and not t.reason:
                    t.reason = tn.get("error", "") or "failed (no reason recorded)"
            else:
                last = tn.get("last_result") or {}
                params = tn.get("config") or last.get("config") or {}
                tune_status = str(tn.get("status", ""))
                planned = num(params.get("epochs"))
                reached = num(last.get("training_iteration", last.get("epoch")))
                reason = ""
                if tune_status == "ERROR" or tn.get("error"):
                    status, reason = "failed", tn.get("error") or "Ray Tune reported an error"
                elif tune_status in ("TERMINATED", "") and last:
                    status = "finished" if not math.isnan(planned) and reached >= planned else "stopped early"
                    if status == "stopped early":
                        reason = _stopped(last, params)
                else:
                    status = "unfinished"
                    reason = f"Ray Tune status {tune_status or 'unknown'}" + ("" if last else ", no result reported")
                wall = num(last.get("time_total_s"))
                gpus = study_gpus
                t = Trial(study=study, family=fam_guess, machine_type=mt_guess, trial_id=tid, status=status,
                          params=params, reason=reason, metrics=last, checkpoint=last.get("checkpoint_path"),
                          wall_seconds=wall, gpu_hours=(gpus or 0) * wall / 3600 if gpus is not None else math.nan,
                          workers=study_workers, gpus=gpus)
            t.params = {k: v for k, v in t.params.items() if k != "job"}
            if rec is not None and rec.machine_types:
                study_types.setdefault(study, list(rec.machine_types))
            t.scope = (rec.scope if rec is not None and rec.scope else None) or meta.get("study_scopes", {}).get(
                study, "machine_type")
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
