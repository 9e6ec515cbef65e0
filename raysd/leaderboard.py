"""``python -m raysd.leaderboard EXPERIMENT_DIR [--out results/PRESET]``: what a search found.

Reads an experiment folder written by ``raysd.search`` (``experiment.json``, ``trials/<study>/<id>.json`` and the
Ray Tune study folders ``studies/<study>/`` for trials that were stopped early) and the per-clip score tables in
each finished trial's last checkpoint, and writes to ``--out``:

- ``leaderboard.csv``: one row per trial (finished, stopped early, failed with the reason, unfinished): its
  hyperparameters, epochs, AUC / pAUC per machine ID or section and the data set's official aggregates on the
  selection half, the report half and the full test set, training time, GPU-hours and checkpoint;
- ``best_models.csv``: the best finished trial of each (machine type, family) by the search metric;
- ``ensembles.csv``: per machine type, standardised-score ensembles (Giri et al.) of (a) the best trial of each
  family and (b) greedy forward selection with replacement over the top trials, each combined by mean and by
  max, beside the best single model; rows ``(all)`` aggregate over machine types by the official rule;
- ``ensemble.json`` (the chosen model per machine type, for ``python -m raysd.score``), ``ensemble_scores.csv``
  (its per-clip scores and decisions), ``submission/`` (official DCASE files), ``summary.md`` and PNG plots.

The chosen ensemble of a machine type is the candidate with the best selection-half metric (the best single
model counts as a candidate of one member; ties go to fewer members). Report-half figures were not used for
any choice. Every file is written atomically.

Unlabelled data (a search metric such as ``heldout_loss`` that needs no test labels, e.g. the ``birdaudio``
field recordings) has no AUC, ensembles or submission files: trials are ranked by the metric (the header of
``summary.md`` says so), and the best trial of each machine type reports the strangest moments of its
recordings (``raysd.anomalies``): ``anomalies.csv`` with the ``--top`` clips (recording, start, end, score,
percentile) from the examined recording's clips if the preset names one, else from every clip the trial scored,
their spectrograms beside a typical clip, a score histogram and, for families with a bottleneck, an embedding
view (``--projection``). With several machine types each gets ``anomalies/<machine type>/``. ``ensemble.json``
then holds that best trial alone, so ``python -m raysd.score ensemble.json RECORDING.wav`` reports on new
recordings the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import shutil
import sys
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from raysd import storage
from raysd.atomic import atomic_path, atomic_write_text
from raysd.ensemble import (
    METRIC_KEYS, EnsembleError, align, combine_matrix, fit_stats, greedy_select, half_metrics, half_rows,
    selection_value, standardise,
)
from raysd.metrics import MetricError, normalize_rule, write_submission
from raysd.storage import STATE_FILE, TRIAL_FILE

HALVES = {"selection": "sel", "report": "report", "test": "test"}
SCORE_FILES = ("scores_test.csv", "scores_train.csv")
HELDOUT_FILE = "scores_heldout.csv"
EMBED_MAX_CLIPS = 20000  # clips embedded again for the embedding view of unlabelled data (top clips always)
DEFAULT_QUANTILE = 0.9
ENSEMBLE_VERSION = 1


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

    @property
    def name(self) -> str:
        return f"{self.family}/{self.trial_id}"

    @property
    def key(self) -> str:
        return f"{self.study}/{self.trial_id}"

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
        states = sorted(f for f in files if PurePosixPath(f).name.startswith("experiment_state-") and f.endswith(".json"))
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


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _stopped(last: dict, params: dict) -> str:
    reached = _num(last.get("training_iteration", last.get("epoch")))
    planned = _num(params.get("epochs"))
    if math.isnan(reached):
        return "stopped by the scheduler"
    return f"stopped by the scheduler after {reached:g}" + (f" of {planned:g}" if not math.isnan(planned) else "") + \
        " epochs"


def load_experiment(root: str | os.PathLike, load_scores: bool = True) -> Experiment:
    """Every trial of an experiment folder, with the score tables of finished trials."""
    root = str(root)
    meta_uri = storage.join(root, "experiment.json")
    if not storage.exists(meta_uri):
        raise LeaderboardError(f"{root} is not a raysd experiment folder (no experiment.json); "
                               "pass the folder that python -m raysd.search printed as 'experiment:'")
    try:
        meta = storage.read_json(meta_uri)
    except (OSError, json.JSONDecodeError) as e:
        raise LeaderboardError(f"{meta_uri}: cannot read ({e})") from None
    studies = list(meta.get("studies") or [])
    for f in storage.list_files(storage.join(root, "trials"), ".json"):
        s = PurePosixPath(f).parent.name
        if s not in studies:
            studies.append(s)
    trials: list[Trial] = []
    for study in studies:
        mt_guess, _, fam_guess = study.partition("__")
        records: dict[str, dict] = {}
        for f in storage.list_files(storage.join(root, "trials", study), ".json"):
            try:
                rec = storage.read_json(f)
            except (OSError, json.JSONDecodeError) as e:
                warnings.warn(f"raysd leaderboard: skipping unreadable trial record {f} ({e})")
                continue
            records[str(rec.get("trial_id") or PurePosixPath(f).stem)] = rec
        tuned = tune_trials(storage.join(root, "studies", study))
        study_gpus = next((r.get("gpus") for r in records.values() if r.get("gpus") is not None), None)
        study_workers = next((r.get("workers") for r in records.values() if r.get("workers") is not None), None)
        for tid in sorted(set(records) | set(tuned)):
            rec, tn = records.get(tid), tuned.get(tid, {})
            if rec is not None:
                t = Trial(study=rec.get("study", study), family=rec.get("family", fam_guess),
                          machine_type=rec.get("machine_type", mt_guess), trial_id=tid,
                          status=rec.get("status", "finished"),
                          params=rec.get("params") or tn.get("config") or {}, reason=rec.get("reason", "") or "",
                          metrics=rec.get("metrics") or tn.get("last_result") or {}, checkpoint=rec.get("checkpoint"),
                          wall_seconds=_num(rec.get("wall_seconds")), gpu_hours=_num(rec.get("gpu_hours")),
                          workers=rec.get("workers"), gpus=rec.get("gpus"))
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
                planned = _num(params.get("epochs"))
                reached = _num(last.get("training_iteration", last.get("epoch")))
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
                wall = _num(last.get("time_total_s"))
                gpus = study_gpus
                t = Trial(study=study, family=fam_guess, machine_type=mt_guess, trial_id=tid, status=status,
                          params=params, reason=reason, metrics=last, checkpoint=last.get("checkpoint_path"),
                          wall_seconds=wall, gpu_hours=(gpus or 0) * wall / 3600 if gpus is not None else math.nan,
                          workers=study_workers, gpus=gpus)
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
                t.test, t.train = (read_scores(storage.join(t.checkpoint, f)) for f in SCORE_FILES)
            except (LeaderboardError, OSError) as e:
                t.test = t.train = None
                t.reason = f"score tables unreadable: {e}"
                warnings.warn(f"raysd leaderboard: trial {t.study}/{t.trial_id}: {t.reason}")
    return exp


# ---------------------------------------------------------------------- figures of one score table
def figures(table: pd.DataFrame, rule: str) -> dict[str, float]:
    """Official aggregates and per-section values on each half, as flat leaderboard columns."""
    out: dict[str, float] = {}
    for half, prefix in HALVES.items():
        res = half_metrics(table, half, rule)
        if res is None:
            continue
        per, official = res
        for k in ("auc", "pauc", "auc_source", "auc_target"):
            if k in official:
                out[f"{prefix}_{k}"] = float(official[k])
        out[f"{prefix}_official"] = float(official["score"])
        for row in per.to_dict("records"):
            suffix = f"{row['section']}" + (f"_{row['domain']}" if row.get("domain") else "")
            for k in ("auc", "pauc", "auc_source", "auc_target"):
                if k in row and not (rule == "2022" and k == "auc"):
                    out[f"{prefix}_{k}_{suffix}"] = float(row[k])
    return out


def aggregate_columns(rule: str) -> list[str]:
    keys = ["auc", "pauc", "official"] + (["auc_source", "auc_target"] if rule == "2022" else [])
    return [f"{p}_{k}" for p in HALVES.values() for k in keys]


# ---------------------------------------------------------------------- ranking
def metric_value(exp: Experiment, t: Trial, figs: dict[str, float]) -> float:
    """The search metric of a trial: recomputed from its score table when it is a test-label metric, else the
    trial's last reported value (e.g. a held-out loss)."""
    if t.status == "finished" and exp.metric in figs:
        return figs[exp.metric]
    return _num(t.metrics.get(exp.metric))


def leaderboard_table(exp: Experiment) -> tuple[pd.DataFrame, dict[str, float]]:
    """One row per trial; also ``Trial.key`` -> search-metric value for finished, scored trials."""
    rule = exp.rule
    rows, values = [], {}
    for t in exp.trials:
        figs = figures(t.test, rule) if t.scored else {}
        if not figs and t.status == "stopped early":  # what the scheduler compared: the last selection figures
            figs = {k: _num(t.metrics.get(k)) for k in ("sel_auc", "sel_pauc", "sel_official") if k in t.metrics}
        value = metric_value(exp, t, figs)
        if t.scored and math.isfinite(value):
            values[t.key] = value
        row: dict[str, Any] = {
            "machine_type": t.machine_type, "family": t.family, "study": t.study, "trial_id": t.trial_id,
            "status": t.status, "epochs": t.epochs,
        }
        row.update(figs)
        row.setdefault(exp.metric, value)
        row.update({"train_seconds": t.train_seconds, "wall_seconds": t.wall_seconds, "gpu_hours": t.gpu_hours,
                    "workers": t.workers, "gpus": t.gpus})
        row.update({f"hp_{k}": (json.dumps(v) if isinstance(v, (list, dict)) else v)
                    for k, v in sorted(t.params.items())})
        row.update({"checkpoint": t.checkpoint or "", "reason": t.reason})
        rows.append(row)
    df = pd.DataFrame(rows)
    aggregates = [c for c in aggregate_columns(rule) if c in df.columns]
    fixed = ["machine_type", "family", "study", "trial_id", "status", "rank", "epochs"] + \
        ([exp.metric] if exp.metric not in aggregates else [])
    tail = ["train_seconds", "wall_seconds", "gpu_hours", "workers", "gpus"]
    prefixes = tuple(f"{p}_" for p in HALVES.values())
    sections = sorted(c for c in df.columns if c not in fixed + aggregates + tail and c.startswith(prefixes))
    hps = sorted(c for c in df.columns if c.startswith("hp_"))
    status_order = {"finished": 0, "stopped early": 1, "failed": 2, "unfinished": 3}
    df["_s"] = df["status"].map(status_order).fillna(4)
    df["_v"] = (df[exp.metric].astype(float) * (1 if exp.mode == "max" else -1)).fillna(-math.inf)
    df = df.sort_values(["machine_type", "_s", "_v", "family", "trial_id"], ascending=[True, True, False, True, True],
                        kind="stable")
    ok = [f"{s}/{i}" in values for s, i in zip(df["study"], df["trial_id"])]
    df["rank"] = pd.array([pd.NA] * len(df), dtype="Int64")
    for mt, g in df[ok].groupby("machine_type", sort=False):
        df.loc[g.index, "rank"] = np.arange(1, len(g) + 1)
    cols = fixed + aggregates + tail + sections + hps + ["checkpoint", "reason"]
    return df[[c for c in cols if c in df.columns]].reset_index(drop=True), values


def best_models(exp: Experiment, board: pd.DataFrame) -> pd.DataFrame:
    done = board[board["rank"].notna()]
    best = done.sort_values("rank").groupby(["machine_type", "family"], sort=True).head(1)
    cols = ["machine_type", "family", "trial_id", "study", "rank", exp.metric, "epochs"] + \
           [c for c in aggregate_columns(exp.rule) if c in board.columns] + \
           ["train_seconds", "gpu_hours"] + [c for c in board.columns if c.startswith("hp_")] + ["checkpoint"]
    best = best.sort_values(["machine_type", "rank"])
    keep = [c for c in dict.fromkeys(cols) if c in best.columns]
    return best[keep].dropna(axis=1, how="all").reset_index(drop=True)


# ---------------------------------------------------------------------- ensembles
@dataclass
class Candidate:
    """One model of a machine type: the best single trial or an ensemble of standardised members."""

    machine_type: str
    name: str
    kind: str  # 'single', 'family-best', 'greedy'
    combine: str
    weights: dict[str, int]  # member name -> weight
    test: pd.DataFrame  # combined standardised scores, test clips
    train: pd.DataFrame  # combined standardised scores, training clips
    selection: float = math.nan
    figures: dict[str, float] = field(default_factory=dict)

    @property
    def members(self) -> list[str]:
        return list(self.weights)


def _member_label(weights: dict[str, int]) -> str:
    return " + ".join(f"{n} x{w}" if w > 1 else n for n, w in weights.items())


def ensembles_for_type(exp: Experiment, mt: str, trials: list[Trial], values: dict[str, float],
                       top_k: int, steps: int) -> tuple[list[Candidate], dict[str, pd.DataFrame]]:
    """Candidates of one machine type (best single first) and each used member's standardisation statistics."""
    rule, metric, mode = exp.rule, exp.metric, exp.mode
    sign = 1 if mode == "max" else -1
    ranked = sorted((t for t in trials if t.key in values), key=lambda t: (-sign * values[t.key], t.name))
    if not ranked:
        return [], {}
    fam_best: dict[str, Trial] = {}
    for t in ranked:
        fam_best.setdefault(t.family, t)
    library = ranked[:max(1, top_k)]
    pool = list({t.key: t for t in library + list(fam_best.values())}.values())
    stats = {t.name: fit_stats(t.train, t.name) for t in pool}
    z_test = [standardise(t.test, stats[t.name], t.name) for t in pool]
    z_train = [standardise(t.train.loc[t.train["split"] == "train"], stats[t.name], t.name) for t in pool]
    names = [t.name for t in pool]
    meta_test, zt = align(z_test, names)
    meta_train, zr = align(z_train, names)
    col = {n: j for j, n in enumerate(names)}

    def build(name: str, kind: str, rule_: str, weights: dict[str, int]) -> Candidate:
        w = np.zeros(len(names))
        for n, k in weights.items():
            w[col[n]] = k
        test = meta_test.assign(score=combine_matrix(zt, w, rule_))
        train = meta_train.assign(score=combine_matrix(zr, w, rule_))
        return Candidate(mt, name, kind, rule_, dict(weights), test, train,
                         selection=selection_value(test, metric, rule), figures=figures(test, rule))

    out = [build("best single", "single", "mean", {ranked[0].name: 1})]
    if len(fam_best) > 1:
        for r in ("mean", "max"):
            out.append(build(f"family-best {r}", "family-best", r, {t.name: 1 for t in fam_best.values()}))
    if len(library) > 1:
        lib_idx = [col[t.name] for t in library]
        sel_mask = half_rows(meta_test, "selection").index.to_numpy()
        sel_meta = meta_test.loc[sel_mask]
        for r in ("mean", "max"):
            zs = zt[np.ix_(sel_mask, lib_idx)]
            pick = greedy_select(zs, [t.name for t in library],
                                 lambda s: selection_value(sel_meta.assign(score=s), metric, rule), rule=r,
                                 steps=steps, mode=mode)
            out.append(build(f"greedy {r}", "greedy", r, pick.weights))
    return out, {n: stats[n] for c in out for n in c.members}


def choose(cands: list[Candidate], mode: str) -> Candidate:
    sign = 1 if mode == "max" else -1
    valid = [c for c in cands if math.isfinite(c.selection)]
    if not valid:
        return cands[0]
    return max(valid, key=lambda c: (sign * c.selection, -len(c.members), -cands.index(c)))


def thresholds(train: pd.DataFrame, quantile: float) -> dict[tuple[str, str], float]:
    """Decision threshold per (machine_type, section): a quantile of the combined standardised training scores."""
    out = {}
    for (mt, sec), g in train.groupby(["machine_type", "section"], sort=True):
        out[(str(mt), str(sec))] = float(np.quantile(g["score"].astype(float).to_numpy(), quantile))
    return out


def ensembles_table(exp: Experiment, per_type: dict[str, list[Candidate]], chosen: dict[str, Candidate]) -> pd.DataFrame:
    rule = exp.rule
    key = METRIC_KEYS.get(exp.metric.removeprefix("sel_"), "auc")
    key = "official" if key == "score" else key
    rows = []

    def row(mt: str, name: str, kind: str, comb: str, members: str, n: float, figs: dict, single: dict, is_chosen: bool):
        r = {"machine_type": mt, "ensemble": name, "kind": kind, "combine": comb, "n_members": n, "members": members,
             "chosen": is_chosen}
        r.update({c: figs.get(c, math.nan) for c in aggregate_columns(rule)})
        for p in ("report", "test"):
            r[f"gain_{p}_{key}"] = figs.get(f"{p}_{key}", math.nan) - single.get(f"{p}_{key}", math.nan)
        rows.append(r)

    for mt, cands in per_type.items():
        single = cands[0].figures
        for c in cands:
            row(mt, c.name, c.kind, c.combine, _member_label(c.weights), len(c.members), c.figures, single,
                c is chosen[mt])
    # over all machine types: the same candidate kind in every type, and the chosen ones
    names = [c.name for c in next(iter(per_type.values()))] if per_type else []
    overall: dict[str, dict] = {}
    for name in names:
        parts = [next((c for c in cands if c.name == name), None) for cands in per_type.values()]
        if any(p is None for p in parts):
            continue
        overall[name] = figures(pd.concat([p.test for p in parts], ignore_index=True), rule)
    overall["chosen"] = figures(pd.concat([c.test for c in chosen.values()], ignore_index=True), rule)
    single = overall.get("best single", {})
    for name, figs in overall.items():
        kind = "chosen" if name == "chosen" else next(c.kind for c in next(iter(per_type.values())) if c.name == name)
        row("(all)", name, kind, "", "", math.nan, figs, single, False)
    df = pd.DataFrame(rows)
    df["n_members"] = df["n_members"].astype("Int64")
    return df.dropna(axis=1, how="all")


def member_entry(trial: Trial, weight: int, stats: pd.DataFrame) -> dict:
    """What ``raysd.score`` needs to rebuild and standardise one member."""
    info = {}
    try:
        info = storage.read_json(storage.join(trial.checkpoint, TRIAL_FILE))
    except (OSError, json.JSONDecodeError) as e:
        warnings.warn(f"raysd leaderboard: {trial.name}: cannot read {TRIAL_FILE} from its checkpoint ({e}); "
                      "ensemble.json lacks its feature spec")
    config = {}
    try:
        from raysd.presets import split_hp

        hp, cfg = split_hp(trial.family, trial.params)
        config = {"train": dataclasses.asdict(hp), "family": dataclasses.asdict(cfg)}
    except (KeyError, ValueError, TypeError) as e:
        warnings.warn(f"raysd leaderboard: {trial.name}: its parameters do not make a {trial.family} config ({e})")
    return {
        "name": trial.name, "study": trial.study, "trial_id": trial.trial_id, "family": trial.family,
        "weight": int(weight), "checkpoint": trial.checkpoint, "state": storage.join(trial.checkpoint, STATE_FILE),
        "params": trial.params, "config": config, "spec": info.get("spec"), "info": info.get("info"),
        "epoch": info.get("epoch"),
        "stats": {str(r.section): {"mean": float(r.mean), "std": float(r.std), "n": int(r.n)}
                  for r in stats.itertuples(index=False)},
    }


def ensemble_document(exp: Experiment, chosen: dict[str, Candidate], stats: dict[str, dict[str, pd.DataFrame]],
                      by_name: dict[str, Trial], quantile: float) -> dict:
    types = {}
    for mt, c in chosen.items():
        thr = thresholds(c.train, quantile)
        types[mt] = {
            "ensemble": c.name, "kind": c.kind, "combine": c.combine,
            "members": [member_entry(by_name[n], w, stats[mt][n].loc[stats[mt][n]["machine_type"] == mt])
                        for n, w in c.weights.items()],
            "sections": sorted({s for (_, s) in thr}),
            "threshold": {s: v for (_, s), v in thr.items()},
            "figures": {k: v for k, v in c.figures.items() if k in aggregate_columns(exp.rule)},
        }
    return document(exp, types, quantile)


def document(exp: Experiment, types: dict, quantile: float) -> dict:
    """The ``ensemble.json`` document around the per-machine-type entries."""
    return {"version": ENSEMBLE_VERSION, "experiment": exp.root, "preset": exp.preset, "rule": exp.rule,
            "metric": exp.metric, "layout": exp.meta.get("layout", ""), "quantile": quantile,
            "standardisation": "z = (score - mean) / std of the member's scores on the section's training clips "
                               "(population std)",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine_types": types}


# ---------------------------------------------------------------------- unlabelled data: anomaly reports
def report_clips(t: Trial) -> tuple[pd.DataFrame, str]:
    """The clips whose strangest moments are reported for a trial, and what they are: the examined recording's
    test clips if there are any, else every clip the trial scored (training, held-out, test)."""
    test = t.test.loc[t.test["split"] == "test"] if t.test is not None else None
    if test is not None and len(test):
        n = test["file"].nunique()
        return test, f"the examined recording{'s' if n > 1 else ''} ({', '.join(sorted(test['file'].unique())[:3])})"
    if t.heldout is None and t.checkpoint and storage.exists(storage.join(t.checkpoint, HELDOUT_FILE)):
        t.heldout = read_scores(storage.join(t.checkpoint, HELDOUT_FILE))
    parts = [p for p in (t.train, t.heldout, t.test) if p is not None and len(p)]
    clips = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    key = [c for c in ("file", "offset") if c in clips.columns]
    clips = clips.drop_duplicates(key) if key else clips
    return clips, "every clip the trial scored (training and held-out; no recording was examined: set " \
                  "heldout.examine in the preset to report on one recording)"


@dataclass
class Unlabelled:
    reports: dict[str, Any]  # machine type -> raysd.anomalies.AnomalyReport
    what: dict[str, str]  # machine type -> which clips, which trial
    doc: dict | None
    files: list[Path]


def unlabelled_reports(exp: Experiment, board: pd.DataFrame, values: dict[str, float], out: Path, top: int,
                       quantile: float, projection: str, plots: bool, notes: list[str],
                       device: str | None = None) -> Unlabelled:
    """For each machine type, the best trial by the search metric: its anomaly report and a one-member entry of
    ``ensemble.json``."""
    from raysd.anomalies import ReportError, embed_table, write_report
    from raysd.score import ScoreError, load_member

    by_key = {t.key: t for t in exp.trials}
    best = board[board["rank"] == 1]
    types_with = sorted(best["machine_type"].unique())
    reports, what, entries, files = {}, {}, {}, []
    data_root = exp.meta.get("data_root")
    for mt in types_with:
        row = best[best["machine_type"] == mt].iloc[0]
        t = by_key[f"{row['study']}/{row['trial_id']}"]
        try:
            stats = fit_stats(t.train, t.name)
            z_train = standardise(t.train.loc[t.train["split"] == "train"], stats, t.name)
        except EnsembleError as e:
            notes.append(f"{mt}: best trial {t.name} has unusable training scores ({e}); no report")
            continue
        entry = member_entry(t, 1, stats.loc[stats["machine_type"] == mt])
        thr = {s: v for (_, s), v in thresholds(z_train, quantile).items()}
        entries[mt] = {"ensemble": "best single", "kind": "single", "combine": "mean", "members": [entry],
                       "sections": sorted(thr), "threshold": thr, "figures": {exp.metric: values[t.key]}}
        clips, which = report_clips(t)
        missing = [c for c in ("offset", "num_samples", "sample_rate") if c not in clips.columns]
        if clips.empty or missing:
            notes.append(f"{mt}: no anomaly report: the score tables of {t.name} "
                         + ("are empty" if clips.empty else f"lack the clip columns {missing} (written by an older "
                                                            "raysd; score the recording with python -m raysd.score)"))
            continue
        clips = clips.assign(recording=clips["file"].astype(str), num_samples=clips["num_samples"].astype("int64"),
                             sample_rate=clips["sample_rate"].astype("int64")).reset_index(drop=True)
        has_audio = bool(data_root) and not storage.is_remote(str(data_root)) and \
            Path(data_root, str(clips["file"].iloc[0])).is_file()
        embeddings, label = None, ""
        if has_audio:
            clips["path"] = [str(Path(data_root, f)) for f in clips["file"].astype(str)]
        elif plots:
            notes.append(f"{mt}: the recordings are not under the experiment's data root {data_root}: no "
                         "spectrograms or embedding view")
        if has_audio and plots and projection != "none":
            rows = np.arange(len(clips))
            if len(clips) > EMBED_MAX_CLIPS:  # the top clips and a seeded sample of the others
                best_rows = np.argsort(-clips["score"].astype(float).to_numpy(), kind="stable")[:top]
                rest = np.setdiff1d(rows, best_rows)
                rows = np.union1d(best_rows, np.random.default_rng(0).choice(rest, EMBED_MAX_CLIPS - len(best_rows),
                                                                               replace=False))
                notes.append(f"{mt}: the embedding view shows the top {len(best_rows)} and a random sample of "
                             f"{len(rows) - len(best_rows)} of the other {len(clips) - len(best_rows)} clips")
            try:
                member = load_member(entry, _device(device), str(out / "ensemble.json"))
                sub, failed = embed_table(member.trainer, member.spec, clips.iloc[rows].reset_index(drop=True),
                                          _device(device))
            except (ScoreError, KeyError, TypeError, ValueError) as e:
                notes.append(f"{mt}: no embedding view ({type(e).__name__}: {e})")
            else:
                label = f"{t.name} bottleneck"
                if sub is None:
                    notes.append(f"{mt}: {t.family} has no bottleneck embedding: no embedding view")
                else:
                    embeddings = np.full((len(clips), sub.shape[1]), np.nan, np.float32)
                    embeddings[rows] = sub
                    if failed:
                        notes.append(f"{mt}: {len(failed)} clip(s) could not be decoded for the embedding view")
        dest = out if len(types_with) == 1 else out / "anomalies" / mt.replace("/", "-")
        try:
            rep = write_report(clips, dest, top=top, embeddings=embeddings, projection=projection,
                               title=f"{mt}: {t.name}", plots=plots, embedding_label=label)
        except ReportError as e:
            notes.append(f"{mt}: no anomaly report ({e})")
            continue
        reports[mt], what[mt] = rep, f"best trial {t.name} ({exp.metric} {values[t.key]:.4g}); clips: {which}"
        notes += [f"{mt}: {n}" for n in rep.notes]
        files += rep.files
    return Unlabelled(reports, what, document(exp, entries, quantile) if entries else None, files)


def _device(device: str | None):
    from raysd.data.features import resolve_device

    return resolve_device(device)


# ---------------------------------------------------------------------- writing
def write_csv(df: pd.DataFrame, path: Path) -> Path:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def replace_dir(path: Path, fill) -> Path:
    """Build a folder under a temporary name with ``fill(tmp_dir)``, then swap it in for ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    old = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.old"
    try:
        tmp.mkdir()
        fill(tmp)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


INT_COLUMNS = ("epochs", "rank", "n_members", "workers")


def _fmt(v: Any, column: str = "") -> str:
    if v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        if column in INT_COLUMNS or column.endswith("seconds"):
            return f"{v:.0f}"
        return f"{v:.4f}"
    return str(v).replace("|", "\\|")


def markdown_table(df: pd.DataFrame) -> str:
    if df.empty:
        return "(none)\n"
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(_fmt(v, c) for v, c in zip(r, df.columns)) + " |" for r in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_roc(mt: str, single: Candidate, ens: Candidate | None, path: Path, half: str = "report") -> Path | None:
    """ROC curves per section on one half of the test clips: best single model against the best ensemble."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    rows = half_rows(single.test, half)
    if rows.empty:
        return None
    sections = sorted(rows["section"].astype(str).unique())
    fig, axes = plt.subplots(1, len(sections), figsize=(3.4 * len(sections), 3.4), squeeze=False)
    for ax, sec in zip(axes[0], sections):
        for cand, style in ((single, "-"), (ens, "--")):
            if cand is None:
                continue
            r = half_rows(cand.test, half)
            r = r[r["section"].astype(str) == sec]
            y = r["label"].astype(int).to_numpy()
            if len(set(y)) < 2:
                continue
            fpr, tpr, _ = roc_curve(y, r["score"].astype(float))
            ax.plot(fpr, tpr, style, label=f"{cand.name} (AUC {roc_auc_score(y, r['score'].astype(float)):.3f})")
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
        ax.axvline(0.1, color="grey", lw=0.5)
        ax.set_title(f"{mt} section {sec}", fontsize=9)
        ax.set_xlabel("false positive rate")
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("true positive rate")
    fig.suptitle(f"{mt}: ROC per section on the {half} half (grey line: FPR 0.1, the pAUC limit)", fontsize=10)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_histogram(mt: str, cand: Candidate, path: Path, threshold: dict[str, float] | None = None) -> Path | None:
    """Standardised scores of normal and anomalous test clips, with each section's decision threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = half_rows(cand.test, "test")
    if rows.empty:
        return None
    s = rows["score"].astype(float).to_numpy()
    y = rows["label"].astype(int).to_numpy()
    bins = np.histogram_bin_edges(s, bins=30)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.hist(s[y == 0], bins=bins, alpha=0.6, label=f"normal ({int((y == 0).sum())})")
    ax.hist(s[y == 1], bins=bins, alpha=0.6, label=f"anomalous ({int((y == 1).sum())})")
    for i, v in enumerate(sorted((threshold or {}).values())):
        ax.axvline(v, color="black", ls="--", lw=0.8, label="decision threshold per section" if i == 0 else None)
    ax.set_xlabel("standardised anomaly score")
    ax.set_ylabel("test clips")
    ax.set_title(f"{mt}: {cand.name} ({_member_label(cand.weights)[:60]})", fontsize=8)
    ax.legend(fontsize=8)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def summary_markdown(exp: Experiment, board: pd.DataFrame, best: pd.DataFrame, ens: pd.DataFrame,
                     plots: dict[str, list[str]], notes: list[str], top: int, unlabelled: Unlabelled | None = None,
                     out: Path | None = None) -> str:
    from raysd.anomalies import markdown as anomaly_markdown

    rule = exp.rule
    key = exp.metric.removeprefix("sel_")
    counts = board["status"].value_counts()
    lines = [f"# raysd leaderboard: {exp.preset}", "",
             f"Experiment `{exp.root}`, rule {rule}, search metric `{exp.metric}` ({exp.mode}), "
             f"{len(board)} trials: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".", ""]
    if key in METRIC_KEYS:
        lines += ["`sel_*` figures are on the selection half of the test clips (used by the search and to pick models "
                  "and ensembles), `report_*` on the disjoint report half (used for nothing else), `test_*` on all "
                  "labelled test clips.", ""]
    else:
        better = "lower" if exp.mode == "min" else "higher"
        lines += [f"**Unlabelled data: trials are ranked by `{exp.metric}`** ({better} is better"
                  + (", the family's own training objective on held-out clips that no training clip touches"
                     if exp.metric == "heldout_loss" else "")
                  + "), not by AUC: the data set has no labels.", ""]
    if notes:
        lines += [f"- {n}" for n in notes] + [""]
    if not ens.empty:
        lines += ["## Ensembles against the best single model", ""]
        show = ["machine_type", "ensemble", "n_members", "members"] + \
               [c for c in (f"sel_{key}", f"report_{key}", f"test_{key}", f"report_auc", f"report_pauc",
                            f"gain_report_{key}") if c in ens.columns] + ["chosen"]
        show = list(dict.fromkeys(show))
        lines += [markdown_table(ens[show]), ""]
        allrow = ens[(ens["machine_type"] == "(all)")]
        if not allrow.empty and f"report_{key}" in ens.columns:
            s = allrow.loc[allrow["ensemble"] == "best single", f"report_{key}"]
            c = allrow.loc[allrow["ensemble"] == "chosen", f"report_{key}"]
            if len(s) and len(c):
                lines += [f"Over all machine types, the chosen models reach report-half {key} {c.iloc[0]:.4f} against "
                          f"{s.iloc[0]:.4f} for the best single model of each type ({c.iloc[0] - s.iloc[0]:+.4f}).", ""]
    if unlabelled is not None:
        for mt, rep in unlabelled.reports.items():
            lines += [f"## Strangest moments: {mt}", "", f"{unlabelled.what[mt]}.", "",
                      anomaly_markdown(rep, out if out is not None else rep.out), ""]
    lines += ["## Best model of each family", ""]
    show = [c for c in ["machine_type", "family", "trial_id", "epochs", exp.metric, f"sel_{key}", "report_auc",
                        "report_pauc", f"report_{key}", "test_auc", "test_pauc", "train_seconds", "gpu_hours"]
            if c in best.columns]
    lines += [markdown_table(best[list(dict.fromkeys(show))]), ""]
    lines += [f"## Leaderboard (top {top} finished trials per machine type)", ""]
    done = board[board["rank"].notna() & (board["rank"] <= top)]
    show = [c for c in ["machine_type", "rank", "family", "trial_id", "epochs", exp.metric, f"sel_{key}",
                        f"report_{key}", "test_auc", "test_pauc", "train_seconds"] if c in board.columns]
    lines += [markdown_table(done[list(dict.fromkeys(show))]), ""]
    other = board[board["status"] != "finished"]
    fin_bad = board[(board["status"] == "finished") & board["rank"].isna()]
    if len(other) or len(fin_bad):
        lines += ["## Trials without scores", ""]
        lines += [markdown_table(pd.concat([other, fin_bad])[["machine_type", "family", "trial_id", "status", "epochs",
                                                               "reason"]]), ""]
    for mt, files in plots.items():
        if files:
            lines += [f"## {mt}", ""] + [f"![{Path(f).stem}]({f})" for f in files] + [""]
    if key in METRIC_KEYS:
        lines += ["Full tables: `leaderboard.csv`, `best_models.csv`, `ensembles.csv`; chosen models: `ensemble.json` "
                  "(score new recordings with `python -m raysd.score ensemble.json PATH...`), per-clip scores "
                  "`ensemble_scores.csv`, DCASE submission files in `submission/`.", ""]
    else:
        lines += ["Full tables: `leaderboard.csv`, `best_models.csv`; the best trial of each machine type: "
                  "`ensemble.json` (`python -m raysd.score ensemble.json RECORDING.wav --report DIR` writes the same "
                  "report for a new recording).", ""]
    return "\n".join(lines)


@dataclass
class Report:
    out: Path
    board: pd.DataFrame
    best: pd.DataFrame
    ensembles: pd.DataFrame
    chosen: dict[str, Candidate]
    files: list[Path]
    anomalies: dict[str, Any] = field(default_factory=dict)  # machine type -> AnomalyReport (unlabelled data)


def build(experiment: str | os.PathLike, out: str | os.PathLike | None = None, quantile: float = DEFAULT_QUANTILE,
          top_k: int = 10, steps: int = 15, plots: bool = True, top: int | None = None, projection: str = "pca",
          device: str | None = None) -> Report:
    """Read an experiment and write every report into ``out`` (default ``results/<preset>``).

    ``top``: trials per machine type in summary.md (default 5); for unlabelled data, the clips listed in
    anomalies.csv (default ``raysd.anomalies.DEFAULT_TOP``)."""
    if not 0.0 < quantile < 1.0:
        raise LeaderboardError(f"--quantile must be between 0 and 1, got {quantile}")
    exp = load_experiment(experiment)
    out = Path(out) if out is not None else Path("results") / exp.preset
    if not exp.trials:
        raise LeaderboardError(f"{exp.root}: no trials found (no trials/<study>/*.json and no Ray Tune trial folders "
                               "under studies/)")
    board, values = leaderboard_table(exp)
    files = [write_csv(board, out / "leaderboard.csv")]
    if not any(t.status == "finished" for t in exp.trials):
        counts = board["status"].value_counts().to_dict()
        raise LeaderboardError(f"{exp.root}: no finished trial ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
                               f"nothing to rank or ensemble. The trials and their reasons are listed in "
                               f"{out / 'leaderboard.csv'}")
    best = best_models(exp, board)
    files.append(write_csv(best, out / "best_models.csv"))

    notes: list[str] = []
    per_type: dict[str, list[Candidate]] = {}
    chosen: dict[str, Candidate] = {}
    stats: dict[str, dict[str, pd.DataFrame]] = {}
    by_name = {t.name: t for t in exp.trials}
    label_metric = exp.metric.removeprefix("sel_") in METRIC_KEYS
    unlabelled = None
    if not values:
        notes.append("no finished trial has a usable score table and search metric: no ensembles")
    elif not label_metric:
        from raysd.anomalies import DEFAULT_TOP

        notes.append(f"search metric {exp.metric} needs no test labels: no AUC figures, ensembles or submission "
                     "files; the best trial of each machine type reports its strangest clips")
        unlabelled = unlabelled_reports(exp, board, values, out, top or DEFAULT_TOP, quantile, projection, plots,
                                        notes, device)
        files += unlabelled.files
        if unlabelled.doc is not None:
            files.append(atomic_write_text(out / "ensemble.json", json.dumps(unlabelled.doc, indent=2, default=str)))
    else:
        for mt in sorted({t.machine_type for t in exp.trials}):
            trials = [t for t in exp.trials if t.machine_type == mt]
            try:
                cands, st = ensembles_for_type(exp, mt, trials, values, top_k, steps)
            except (EnsembleError, MetricError) as e:
                notes.append(f"{mt}: no ensembles ({e})")
                continue
            if not cands:
                notes.append(f"{mt}: no finished trial with scores")
                continue
            per_type[mt], stats[mt] = cands, st
            chosen[mt] = choose(cands, exp.mode)
            if len({t.family for t in trials if t.key in values}) < 2:
                notes.append(f"{mt}: only one family finished, so no best-of-each-family ensemble")
    ens = ensembles_table(exp, per_type, chosen) if per_type else pd.DataFrame()
    files.append(write_csv(ens, out / "ensembles.csv"))

    plot_files: dict[str, list[str]] = {}
    if chosen:
        doc = ensemble_document(exp, chosen, stats, by_name, quantile)
        files.append(atomic_write_text(out / "ensemble.json", json.dumps(doc, indent=2, sort_keys=False, default=str)))
        per_clip = []
        for mt, c in chosen.items():
            thr = doc["machine_types"][mt]["threshold"]
            for part in (c.test, c.train):
                p = part.copy()
                p["decision"] = (p["score"].astype(float) > p["section"].astype(str).map(thr).astype(float)).astype(int)
                per_clip.append(p)
        files.append(write_csv(pd.concat(per_clip, ignore_index=True), out / "ensemble_scores.csv"))
        sub = pd.concat([pd.concat([c.test, c.train]) for c in chosen.values()], ignore_index=True)
        thr_all = {(mt, s): v for mt, c in chosen.items() for s, v in doc["machine_types"][mt]["threshold"].items()}
        try:
            replace_dir(out / "submission", lambda d: write_submission(
                sub, d, exp.rule, threshold=None if exp.rule == "2020" else thr_all))
            files.append(out / "submission")
        except MetricError as e:
            notes.append(f"no submission files: {e}")
        if plots:
            for mt, cands in per_type.items():
                multi = [c for c in cands if len(c.members) > 1 and math.isfinite(c.selection)]
                sign = 1 if exp.mode == "max" else -1
                best_ens = max(multi, key=lambda c: sign * c.selection) if multi else None
                made = [plot_roc(mt, cands[0], best_ens, out / f"roc_{mt}.png"),
                        plot_histogram(mt, chosen[mt], out / f"hist_{mt}.png", doc["machine_types"][mt]["threshold"])]
                plot_files[mt] = [p.name for p in made if p is not None]
                files += [p for p in made if p is not None]
    text = summary_markdown(exp, board, best, ens, plot_files, notes, top or 5, unlabelled, out)
    files.append(atomic_write_text(out / "summary.md", text))
    return Report(out, board, best, ens, chosen, files, unlabelled.reports if unlabelled else {})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m raysd.leaderboard", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="experiment folder (local, s3:// or gs://) written by python -m raysd.search")
    p.add_argument("--out", help="report folder (default results/<preset>)")
    p.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE,
                   help="decision threshold: this quantile of the ensemble's standardised training scores per section "
                        f"(default {DEFAULT_QUANTILE})")
    p.add_argument("--top-k", type=int, default=10, help="library size for greedy ensemble selection (default 10)")
    p.add_argument("--steps", type=int, default=15, help="greedy selection steps (default 15)")
    p.add_argument("--top", type=int, default=None,
                   help="trials per machine type shown in summary.md (default 5); for unlabelled data, the strangest "
                        "clips listed in anomalies.csv (default 20)")
    p.add_argument("--projection", choices=("pca", "tsne", "none"), default="pca",
                   help="unlabelled data: 2-D projection of the clips' embeddings (default pca)")
    p.add_argument("--device", default=None, help="unlabelled data: device for the embedding view (default: CUDA "
                                                  "when available)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = p.parse_args(argv)
    if args.top is not None and args.top < 1:
        p.error(f"--top must be >= 1, got {args.top}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = build(args.experiment, args.out, quantile=args.quantile, top_k=args.top_k, steps=args.steps,
                       plots=not args.no_plots, top=args.top, projection=args.projection, device=args.device)
    except (LeaderboardError, EnsembleError, MetricError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = report.board["status"].value_counts().to_dict()
    print(f"[raysd] leaderboard of {len(report.board)} trials ({', '.join(f'{v} {k}' for k, v in counts.items())}) "
          f"written to {report.out}")
    for mt, c in report.chosen.items():
        rep = {k: c.figures.get(f"report_{k}") for k in ("auc", "pauc")}
        print(f"[raysd]   {mt}: chosen {c.name} ({_member_label(c.weights)}); report half AUC "
              f"{_fmt(rep['auc'])} pAUC {_fmt(rep['pauc'])}")
    for mt, r in report.anomalies.items():
        print(f"[raysd]   {mt}: strangest {len(r.top)} clips in {r.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
