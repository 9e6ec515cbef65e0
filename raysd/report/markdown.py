"""Markdown: tables, the anomaly-report section and the leaderboard's ``summary.md``."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from raysd.ensemble import METRIC_KEYS
from raysd.report.experiment import Experiment
from raysd.report.unlabelled import AnomalyReport, Unlabelled

INT_COLUMNS = ("epochs", "rank", "n_members", "workers")


def fmt(v: Any, column: str = "") -> str:
    if v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return ""
    if isinstance(v, (float, np.floating)):
        if column in INT_COLUMNS or column.endswith("seconds"):
            return f"{v:.0f}"
        return f"{v:.4f}"
    return str(v).replace("|", "\\|")


def markdown_table(df: pd.DataFrame) -> str:
    """A table as GitHub Markdown (pandas' ``to_markdown``, through tabulate), each value formatted by :func:`fmt`."""
    if df.empty:
        return "(none)\n"
    shown = pd.DataFrame({str(c): [fmt(v, str(c)) for v in df[c]] for c in df.columns})
    return shown.to_markdown(index=False, tablefmt="github", disable_numparse=True) + "\n"


def shown_path(path: Path) -> str:
    """``path`` as a report shows it: relative to the working folder when under it (a report read on another machine
    names no home folder), else the folder's name."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path.name


def summary_markdown(exp: Experiment, board: pd.DataFrame, best: pd.DataFrame, ens: pd.DataFrame,
                     plots: dict[str, list[str]], notes: list[str], top: int, unlabelled: Unlabelled | None = None,
                     out: Path | None = None, seeds: pd.DataFrame | None = None, why: dict[str, str] | None = None,
                     first_shot: pd.DataFrame | None = None) -> str:
    rule = exp.rule
    key = exp.metric.removeprefix("sel_")
    trials = board.drop_duplicates(["study", "trial_id"])  # a trial over several machine types has a row in each
    counts = trials["status"].value_counts()
    lines = [f"# raysd leaderboard: {exp.preset}", "",
             f"Experiment `{shown_path(Path(exp.root))}`, rule {rule}, search metric `{exp.metric}` ({exp.mode}), "
             f"{len(trials)} trials: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + ".", ""]
    if "scope" in board.columns and (board["scope"] != "machine_type").any():
        lines += ["Trials of scope `dataset` (one model for every machine type) and `first_shot` (one model per "
                  "type, one configuration for all) appear once per machine type they cover, with that type's "
                  "figures.", ""]
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
    if "tie" in board.columns:
        lines += ties_markdown(board, exp.metric)
    if why:
        lines += ["## What each machine type keeps, and why", ""] + [f"- {mt}: {w}" for mt, w in why.items()] + [""]
    if first_shot is not None and not first_shot.empty:
        lines += ["## A configuration for a machine type it has not seen", "",
                  "For each study over several machine types: the report-half figure on each type of the configuration "
                  "chosen on every type (in sample), and of the one chosen on the *other* types' selection halves "
                  "(leave one type out): the figure that predicts a new machine type.", "",
                  markdown_table(first_shot), ""]
    if not ens.empty:
        lines += ["## Ensembles against the best single model", ""]
        show = ["machine_type", "ensemble", "n_members", "members"] + \
               [c for c in (f"sel_{key}", f"report_{key}", f"report_{key}_lo", f"report_{key}_hi", f"test_{key}",
                            "report_auc", "report_pauc", f"gain_report_{key}") if c in ens.columns] + ["chosen"]
        show = list(dict.fromkeys(show))
        lines += [markdown_table(ens[show]), ""]
        allrow = ens[(ens["machine_type"] == "(all)")]
        if not allrow.empty and f"report_{key}" in ens.columns:
            s = allrow.loc[allrow["ensemble"] == "best single", f"report_{key}"]
            c = allrow.loc[allrow["ensemble"] == "chosen", f"report_{key}"]
            if len(s) and len(c):
                lines += [f"Over all machine types, the chosen models reach report-half {key} {c.iloc[0]:.4f} against "
                          f"{s.iloc[0]:.4f} for the best single model of each type ({c.iloc[0] - s.iloc[0]:+.4f}).", ""]
    if seeds is not None and not seeds.empty:
        lines += ["## Seed ensembles against their members", "",
                  "One configuration trained with several seeds (e.g. a preset entry's `repeats`): the mean of the "
                  "members' standardised scores, then each member alone.", ""]
        show = ["machine_type", "ensemble", "member", "seed"] + \
               [c for c in (f"sel_{key}", f"report_{key}", f"test_{key}", "report_auc", "report_pauc")
                if c in seeds.columns]
        lines += [markdown_table(seeds[list(dict.fromkeys(show))]), ""]
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
    show = [c for c in ["machine_type", "rank", "tie", "family", "trial_id", "epochs", exp.metric, f"{exp.metric}_lo",
                        f"{exp.metric}_hi", f"sel_{key}", f"report_{key}", f"report_{key}_lo", f"report_{key}_hi",
                        "test_auc", "test_pauc", "train_seconds"] if c in board.columns]
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
        lines += ["Full tables: `leaderboard.csv`, `best_models.csv`, `ensembles.csv`, `seed_ensembles.csv`; chosen "
                  "models: `ensemble.json` "
                  "(score new recordings with `python -m raysd.score ensemble.json PATH...`), per-clip scores "
                  "`ensemble_scores.csv`, DCASE submission files in `submission/`.", ""]
    else:
        lines += ["Full tables: `leaderboard.csv`, `best_models.csv`; the best trial of each machine type: "
                  "`ensemble.json` (`python -m raysd.score ensemble.json RECORDING.wav --report DIR` writes the same "
                  "report for a new recording).", ""]
    return "\n".join(lines)


def interval_text(row: pd.Series, column: str) -> str:
    """``0.7812 [0.70, 0.86]`` of a figure and its interval columns."""
    lo, hi = row.get(f"{column}_lo"), row.get(f"{column}_hi")
    text = fmt(row.get(column))
    return text + (f" [{lo:.2f}, {hi:.2f}]" if isinstance(lo, float) and math.isfinite(lo) else "")


def ties_markdown(board: pd.DataFrame, metric: str) -> list[str]:
    """Which trials each machine type's leader cannot be told from (paired bootstrap on the selection half)."""
    lines = ["## The leader of each machine type, and the trials tied with it", "",
             f"`{metric}` with its 95% bootstrap interval. A trial is tied with the leader when the paired bootstrap "
             "interval of their difference includes 0: the selection half cannot tell them apart.", ""]
    for mt, g in board[board["tie"].isin(["leader", "tied"])].groupby("machine_type", sort=True):
        lead = g[g["tie"] == "leader"].iloc[0]
        tied = g[g["tie"] == "tied"]
        names = ", ".join(f"{r.family}/{r.trial_id} ({fmt(getattr(r, metric))})" for r in tied.itertuples())
        lines.append(f"- {mt}: leader {lead['family']}/{lead['trial_id']}, {interval_text(lead, metric)}; "
                     + (f"tied with it: {names}" if len(tied) else "no trial is tied with it"))
    return lines + [""]


def anomaly_markdown(report: AnomalyReport, base: Path) -> str:
    """The report's top clips and pictures as a markdown section (links relative to ``base``)."""
    def rel(p: Path) -> str:
        return os.path.relpath(p, base)

    lines = ["| rank | recording | start | end | score | percentile | spectrogram |", "|---|---|---|---|---|---|---|"]
    for r in report.top.itertuples(index=False):
        pic = f"[png]({rel(report.out / r.spectrogram)})" if r.spectrogram else ""
        lines.append(f"| {r.rank} | {r.recording} | {r.start} | {r.end} | {r.score:.4g} | {r.percentile:.2f} | {pic} |")
    lines.append("")
    lines += [f"![{p.stem}]({rel(p)})" for p in report.files if p.suffix == ".png"]
    lines += [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"
