"""Standardised-score ensembles (Giri et al., 2020) as pure functions on per-clip score tables.

A score table has one row per clip with columns ``file, machine_type, section, domain, split, label, half,
score`` (``raysd.trial.SCORE_COLUMNS``). Each member's scores are standardised per (machine type, section)
with the mean and standard deviation of its own scores on that section's training clips; the members'
standardised scores are then combined per clip by a weighted mean or by the maximum. Greedy forward
selection with replacement (Caruana et al., 2004) picks members from a library of models so as to
maximise a metric of the combined scores on the selection half of the test clips.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from raysd.metrics import MetricError, evaluate

COMBINE_RULES = ("mean", "max")
STAT_COLUMNS = ("machine_type", "section", "mean", "std", "n")
MIN_STD = 1e-12  # a member whose training scores are all equal in a section is scaled as if std were this
META_COLUMNS = ("file", "machine_type", "section", "domain", "split", "label", "half")


class EnsembleError(ValueError):
    """Score tables that cannot be standardised or combined; the message names the member / section."""


def clip_key(table: pd.DataFrame) -> list[str]:
    """Columns that identify a clip: machine type and file, plus the clip offset where tables have one."""
    return ["machine_type", "file"] + (["offset"] if "offset" in table.columns else [])


def fit_stats(train: pd.DataFrame, where: str = "") -> pd.DataFrame:
    """Mean and (population) standard deviation of the training-clip scores per (machine_type, section).

    Rows of ``train`` with split other than 'train' are ignored. Returns columns ``STAT_COLUMNS``.
    """
    t = train.loc[train["split"] == "train"] if "split" in train.columns else train
    s = t["score"].astype(float)
    bad = ~np.isfinite(s.to_numpy())
    if bad.any():
        raise EnsembleError(f"{where + ': ' if where else ''}{int(bad.sum())} training scores are NaN or infinite, "
                            f"e.g. {t.loc[bad, 'file'].iloc[0]}")
    if t.empty:
        raise EnsembleError(f"{where + ': ' if where else ''}no training-clip scores to standardise with")
    g = pd.DataFrame({"machine_type": t["machine_type"].astype(str), "section": t["section"].astype(str),
                      "score": s}).groupby(["machine_type", "section"], sort=True)["score"]
    out = pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=0), "n": g.size()}).reset_index()
    return out[list(STAT_COLUMNS)]


def standardise(scores: pd.DataFrame, stats: pd.DataFrame, where: str = "") -> pd.DataFrame:
    """``scores`` with ``score`` replaced by (score - mean) / std of its (machine_type, section) in ``stats``.

    A clip whose section has no statistics is an error naming the section.
    """
    t = scores.copy()
    mt, sec = t["machine_type"].astype(str), t["section"].astype(str)
    cols = ["machine_type", "section", "mean", "std"]
    lookup = {(m, s): (mu, sd) for m, s, mu, sd in stats[cols].itertuples(index=False)}
    keys = list(zip(mt, sec))
    missing = sorted(set(keys) - set(lookup))
    if missing:
        which = ", ".join(f"{m} section {s}" for m, s in missing)
        raise EnsembleError(f"{where + ': ' if where else ''}no training scores for {which}; cannot standardise "
                            "its test scores")
    mu = np.array([lookup[k][0] for k in keys], dtype=float)
    sd = np.array([lookup[k][1] for k in keys], dtype=float)
    t["score"] = (t["score"].astype(float).to_numpy() - mu) / np.maximum(sd, MIN_STD)
    return t


def align(tables: Sequence[pd.DataFrame], names: Sequence[str] | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Put several members' score tables side by side: (clip metadata of the first, scores (n_clips, n_members)).

    Every table must score the same clips (same :func:`clip_key` values); the first table's row order is kept.
    """
    if not tables:
        raise EnsembleError("an ensemble needs at least one member")
    names = list(names) if names is not None else [f"member {i}" for i in range(len(tables))]
    first = tables[0].reset_index(drop=True)
    key = clip_key(first)
    index = pd.MultiIndex.from_frame(first[key].astype(str))
    if index.has_duplicates:
        raise EnsembleError(f"{names[0]}: clip {tuple(index[index.duplicated()][0])} is scored twice")
    z = np.empty((len(first), len(tables)))
    for j, t in enumerate(tables):
        idx = pd.MultiIndex.from_frame(t[key].astype(str))
        if idx.has_duplicates:
            raise EnsembleError(f"{names[j]}: clip {tuple(idx[idx.duplicated()][0])} is scored twice")
        pos = idx.get_indexer(index)
        if (pos < 0).any():
            raise EnsembleError(f"{names[j]} has no score for clip {tuple(index[pos < 0][0])} that {names[0]} scores")
        if len(idx) != len(index):
            extra = idx[~idx.isin(index)]
            raise EnsembleError(f"{names[j]} scores clip {tuple(extra[0])} that {names[0]} does not")
        z[:, j] = t["score"].astype(float).to_numpy()[pos]
    meta = first[[c for c in first.columns if c != "score"]].copy()
    return meta, z


def combine_matrix(z: np.ndarray, weights: Sequence[float] | np.ndarray | None = None, rule: str = "mean"
                   ) -> np.ndarray:
    """Per-clip combination of member scores ``z`` (n_clips, n_members): weighted mean or maximum.

    For ``max`` the weights only select members (weight > 0); their size does not matter.
    """
    if rule not in COMBINE_RULES:
        raise EnsembleError(f"combination rule must be one of {COMBINE_RULES}, got {rule!r}")
    z = np.asarray(z, dtype=float)
    w = np.ones(z.shape[1]) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != (z.shape[1],) or (w < 0).any() or w.sum() <= 0:
        raise EnsembleError(f"need one non-negative weight per member ({z.shape[1]}), not all zero; got {list(w)}")
    if rule == "mean":
        return z @ w / w.sum()
    return z[:, w > 0].max(axis=1)


def combine(tables: Sequence[pd.DataFrame], rule: str = "mean", weights: Sequence[float] | None = None,
            names: Sequence[str] | None = None) -> pd.DataFrame:
    """The combined score table of members' (already standardised) score tables."""
    meta, z = align(tables, names)
    meta["score"] = combine_matrix(z, weights, rule)
    return meta


# ---------------------------------------------------------------------- metrics of a half
METRIC_KEYS = {"auc": "auc", "pauc": "pauc", "official": "score"}


def half_rows(table: pd.DataFrame, half: str) -> pd.DataFrame:
    """Labelled test rows of one half: 'selection', 'report', or 'test' (the full test set)."""
    t = table.loc[(table["split"] == "test") & table["label"].notna()]
    return t if half == "test" else t.loc[t["half"] == half]


def half_metrics(table: pd.DataFrame, half: str, rule: str, quiet: bool = True) -> tuple[pd.DataFrame, dict] | None:
    """``metrics.evaluate`` on one half; None where that half has no labelled clips of both kinds."""
    rows = half_rows(table, half)
    if rows.empty or rows["label"].nunique() < 2:
        return None
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore")
        try:
            return evaluate(rows, rule=rule)
        except MetricError:
            return None


def selection_value(table: pd.DataFrame, metric: str, rule: str) -> float:
    """The search metric (``sel_auc``, ``sel_pauc`` or ``sel_official``) of a score table; NaN if undefined."""
    name = metric.removeprefix("sel_")
    if name not in METRIC_KEYS:
        raise EnsembleError(f"metric {metric!r} is not computed from test labels; "
                            "expected sel_auc, sel_pauc or sel_official")
    res = half_metrics(table, "selection", rule)
    return math.nan if res is None else float(res[1][METRIC_KEYS[name]])


# ---------------------------------------------------------------------- greedy selection
@dataclass
class Selection:
    """Result of greedy selection: chosen member names (with repetition) and the objective after each step."""

    picks: list[str]
    history: list[float] = field(default_factory=list)

    @property
    def weights(self) -> dict[str, int]:
        """Member -> how often it was picked, in order of first pick."""
        return dict(Counter(self.picks))

    @property
    def value(self) -> float:
        return self.history[len(self.picks) - 1]


def greedy_select(z: np.ndarray, names: Sequence[str], objective: Callable[[np.ndarray], float],
                  rule: str = "mean", steps: int = 20, mode: str = "max") -> Selection:
    """Caruana-style forward selection with replacement over the columns of ``z`` (standardised scores).

    Starts from the best single column, then repeatedly adds the column (a repeat allowed) whose addition gives
    the best ``objective`` of the combined scores, for ``steps`` additions or until no column is valid. Returns
    the shortest prefix of picks that reaches the best objective value. Ties go to the earlier column, so order
    ``names`` best first.
    """
    names = list(names)
    if z.shape[1] != len(names) or not names:
        raise EnsembleError(f"greedy selection needs one name per score column, got {len(names)} for {z.shape[1]}")
    if mode not in ("max", "min"):
        raise EnsembleError(f"mode must be 'max' or 'min', got {mode!r}")
    sign = 1.0 if mode == "max" else -1.0
    counts = np.zeros(len(names))
    picks: list[str] = []
    history: list[float] = []
    for _ in range(max(1, steps)):
        best_j, best_v = -1, -math.inf
        for j in range(len(names)):
            trial = counts.copy()
            trial[j] += 1
            v = sign * objective(combine_matrix(z, trial, rule))
            if math.isfinite(v) and v > best_v:
                best_j, best_v = j, v
        if best_j < 0:
            break
        counts[best_j] += 1
        picks.append(names[best_j])
        history.append(sign * best_v)
    if not picks:
        raise EnsembleError("greedy selection: the objective is undefined (NaN) for every member")
    best = int(np.argmax([sign * h for h in history]))
    return Selection(picks[:best + 1], history)
