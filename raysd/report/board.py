"""Ranking: the leaderboard table (one row per trial, with its figures on each half of the test clips) and the
best finished trial of each (machine type, family)."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from raysd.artifacts import STATUSES
from raysd.ensemble import half_metrics
from raysd.report.experiment import Experiment, Trial, num
from raysd.report.intervals import Bootstrap

HALVES = {"selection": "sel", "report": "report", "test": "test"}


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


def metric_value(exp: Experiment, t: Trial, figs: dict[str, float]) -> float:
    """The search metric of a trial: recomputed from its score table when it is a test-label metric, else the
    trial's last reported value (e.g. a held-out loss)."""
    if t.status == "finished" and exp.metric in figs:
        return figs[exp.metric]
    return num(t.metrics.get(exp.metric))


def leaderboard_table(exp: Experiment, boot: Bootstrap | None = None) -> tuple[pd.DataFrame, dict[str, float]]:
    """One row per trial; also ``Trial.key`` -> search-metric value for finished, scored trials. With ``boot``,
    each scored trial's figures get their intervals (``*_lo``, ``*_hi``) and the ``tie`` column says which trials
    cannot be told from their machine type's leader (:mod:`raysd.report.intervals`)."""
    rule = exp.rule
    rows, values = [], {}
    for t in exp.trials:
        figs = figures(t.test, rule) if t.scored else {}
        if boot is not None and t.scored and t.test is not None:
            figs.update(boot.columns(t.test))
            boot.selection[t.key] = boot.search_metric(t.test)
        if not figs and t.status == "stopped early":  # what the scheduler compared: the last selection figures
            figs = {k: num(t.metrics.get(k)) for k in ("sel_auc", "sel_pauc", "sel_official") if k in t.metrics}
        value = metric_value(exp, t, figs)
        if t.scored and math.isfinite(value):
            values[t.key] = value
        row: dict[str, Any] = {
            "machine_type": t.machine_type, "family": t.family, "scope": t.scope, "study": t.study,
            "trial_id": t.trial_id, "_key": t.key,
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
    aggregates = [c for a in aggregate_columns(rule) for c in (a, f"{a}_lo", f"{a}_hi") if c in df.columns]
    fixed = ["machine_type", "family", "scope", "study", "trial_id", "status", "rank", "tie", "epochs"] + \
        ([exp.metric] if exp.metric not in aggregates else [])
    tail = ["train_seconds", "wall_seconds", "gpu_hours", "workers", "gpus"]
    prefixes = tuple(f"{p}_" for p in HALVES.values())
    sections = sorted(c for c in df.columns if c not in fixed + aggregates + tail and c.startswith(prefixes))
    hps = sorted(c for c in df.columns if c.startswith("hp_"))
    status_order = {s: i for i, s in enumerate(STATUSES)}
    df["_s"] = df["status"].map(status_order).fillna(len(STATUSES))
    df["_v"] = (df[exp.metric].astype(float) * (1 if exp.mode == "max" else -1)).fillna(-math.inf)
    df = df.sort_values(["machine_type", "_s", "_v", "family", "trial_id"], ascending=[True, True, False, True, True],
                        kind="stable")
    ok = [k in values for k in df["_key"]]
    df["rank"] = pd.array([pd.NA] * len(df), dtype="Int64")
    for mt, g in df[ok].groupby("machine_type", sort=False):
        df.loc[g.index, "rank"] = np.arange(1, len(g) + 1)
    if boot is not None and boot.selection:
        df["tie"] = ""
        for mt, g in df[ok].groupby("machine_type", sort=False):
            leader = g["_key"].iloc[0]
            df.loc[g.index[0], "tie"] = "leader"
            for i, key in zip(g.index[1:], g["_key"].iloc[1:]):
                df.loc[i, "tie"] = "tied" if boot.tied(leader, key) else ""
    cols = fixed + aggregates + tail + sections + hps + ["checkpoint", "reason"]
    return df[[c for c in cols if c in df.columns]].reset_index(drop=True), values


def best_models(exp: Experiment, board: pd.DataFrame) -> pd.DataFrame:
    done = board[board["rank"].notna()]
    best = done.sort_values("rank").groupby(["machine_type", "family"], sort=True).head(1)
    cols = ["machine_type", "family", "scope", "trial_id", "study", "rank", exp.metric, "epochs"] + \
           [c for c in aggregate_columns(exp.rule) if c in board.columns] + \
           ["train_seconds", "gpu_hours"] + [c for c in board.columns if c.startswith("hp_")] + ["checkpoint"]
    best = best.sort_values(["machine_type", "rank"])
    keep = [c for c in dict.fromkeys(cols) if c in best.columns]
    return best[keep].dropna(axis=1, how="all").reset_index(drop=True)
