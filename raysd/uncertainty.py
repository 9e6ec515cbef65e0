"""How sure a figure is: a stratified bootstrap over test clips, vectorised over every model scored on them.

A bootstrap replicate draws the labelled test clips of one machine type with replacement within each stratum
(half x section x domain x label), so it keeps every section's count of normal and anomalous clips of each domain
and each half. Every model of that machine type is measured on the same replicates, so the difference of two
models' replicates is a paired bootstrap of their difference. A replicate's AUC and pAUC per evaluation unit come in
closed form from the clip weights (how often each clip was drawn); the year's official aggregate is then formed as
:func:`raysd.metrics.evaluate` forms it. Intervals are percentile intervals (Efron and Tibshirani, *An Introduction
to the Bootstrap*, 1993, ch. 13).

The point figures stay those of :func:`raysd.metrics.evaluate` (scikit-learn, as the official evaluators); the
closed forms here agree with them on the original sample wherever no positive and negative score tie inside the
partial range of a pAUC, where they count a tie as one half.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raysd.metrics import DOMAINS, MAX_FPR, normalize_rule

N_BOOT = 1000
LEVEL = 0.95
STRATA = ("machine_type", "half", "section", "domain", "label")
_EPS = sys.float_info.epsilon


@dataclass
class Resampler:
    """The bootstrap weights of one set of labelled test clips: ``weights[b, i]`` is how often replicate ``b`` drew
    clip ``i`` (its key ``keys[i]``)."""

    keys: pd.Index
    weights: np.ndarray  # (n_boot, n_clips)

    @property
    def n_boot(self) -> int:
        return int(self.weights.shape[0])

    def positions(self, table: pd.DataFrame) -> np.ndarray:
        """Each row's clip in the resampler (a row it lacks is an error naming the clip)."""
        pos = self.keys.get_indexer(clip_keys(table))
        if (pos < 0).any():
            raise ValueError(f"clip {table['file'].iloc[int(np.flatnonzero(pos < 0)[0])]} is not in the bootstrap's "
                             "clip set")
        return pos


def clip_keys(table: pd.DataFrame) -> pd.Index:
    cols = ["machine_type", "file"] + (["offset"] if "offset" in table.columns else [])
    return pd.MultiIndex.from_frame(table[cols].astype(str))


def labelled(table: pd.DataFrame) -> pd.DataFrame:
    return table.loc[(table["split"] == "test") & table["label"].notna()]


def resampler(tables: list[pd.DataFrame], n_boot: int = N_BOOT, seed: int = 0) -> Resampler:
    """Bootstrap weights for the labelled test clips of ``tables`` (their union; usually every model of one machine
    type), drawn within each stratum (module docstring)."""
    rows = pd.concat([labelled(t) for t in tables], ignore_index=True)
    keys = clip_keys(rows)
    rows = rows.loc[~keys.duplicated()].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    weights = np.zeros((n_boot, len(rows)), dtype=np.float32)
    strata = rows.reindex(columns=list(STRATA)).fillna("").astype(str)
    for _, idx in strata.groupby(list(STRATA), sort=True).indices.items():
        draws = rng.integers(0, len(idx), size=(n_boot, len(idx)))
        counts = np.zeros((n_boot, len(idx)), dtype=np.float32)
        np.add.at(counts, (np.arange(n_boot)[:, None], draws), 1.0)
        weights[:, idx] = counts
    return Resampler(clip_keys(rows), weights)


def auc_pauc(score: np.ndarray, label: np.ndarray, w: np.ndarray,
             max_fpr: float = MAX_FPR) -> tuple[np.ndarray, np.ndarray]:
    """AUC and McClish-standardised pAUC (up to ``max_fpr``) of one unit under each row of clip weights ``w``
    (n_boot, n): a positive above a negative counts 1, a tie one half."""
    pos, neg = label == 1, label == 0
    if not pos.any() or not neg.any():
        nan = np.full(w.shape[0], math.nan)
        return nan, nan
    sn_order = np.argsort(-score[neg], kind="stable")
    sp, sn = score[pos], score[neg][sn_order]
    above = (sp[:, None] > sn[None, :]).astype(np.float32) + 0.5 * (sp[:, None] == sn[None, :])
    wp, wn = w[:, pos], w[:, neg][:, sn_order]
    total_p, total_n = wp.sum(axis=1), wn.sum(axis=1)
    over = wp @ above  # (n_boot, n_neg): weight of the positives above each negative
    auc = (over * wn).sum(axis=1) / (total_p * total_n)
    tpr = over / total_p[:, None]
    step = wn / total_n[:, None]
    before = np.cumsum(step, axis=1) - step
    width = np.clip(np.minimum(before + step, max_fpr) - before, 0.0, None)
    area = (width * tpr).sum(axis=1)
    low = 0.5 * max_fpr ** 2
    return auc, 0.5 * (1 + (area - low) / (max_fpr - low))


def _hmean(cols: list[np.ndarray]) -> np.ndarray:
    v = np.stack(cols, axis=1) if cols else np.zeros((0, 0))
    keep = ~np.isnan(v).all(axis=0) if v.size else np.zeros(0, bool)
    if not keep.any():
        return np.full(v.shape[0], math.nan)
    v = np.maximum(v[:, keep], _EPS)
    return v.shape[1] / (1.0 / v).sum(axis=1)


def _amean(cols: list[np.ndarray]) -> np.ndarray:
    v = np.stack(cols, axis=1)
    keep = ~np.isnan(v).all(axis=0)
    return v[:, keep].mean(axis=1) if keep.any() else np.full(v.shape[0], math.nan)


def units(rs: Resampler, table: pd.DataFrame, rule: str, half: str) -> dict[tuple, dict[str, np.ndarray]]:
    """Each evaluation unit's figures per replicate on one half ('selection', 'report' or 'test'): per (machine
    type, section) for 2020 and 2022, per (machine type, section, domain) for 2021, as :func:`raysd.metrics.evaluate`
    forms them."""
    rule = normalize_rule(rule)
    rows = labelled(table)
    if half != "test":
        rows = rows.loc[rows["half"] == half]
    if rows.empty:
        return {}
    w = rs.weights[:, rs.positions(rows)].astype(np.float64)
    score = rows["score"].astype(float).to_numpy()
    label = rows["label"].astype(int).to_numpy()
    mt, sec = rows["machine_type"].astype(str).to_numpy(), rows["section"].astype(str).to_numpy()
    dom = rows["domain"].fillna("").astype(str).to_numpy() if "domain" in rows.columns else np.full(len(rows), "")
    out: dict[tuple, dict[str, np.ndarray]] = {}
    groups = pd.DataFrame({"m": mt, "s": sec, "d": dom if rule == "2021" else ""}).groupby(["m", "s", "d"], sort=True)
    for key, idx in groups.indices.items():
        a, p = auc_pauc(score[idx], label[idx], w[:, idx])
        unit = {"auc": a, "pauc": p}
        if rule == "2022":
            for d in DOMAINS:
                keep = idx[(dom[idx] == d) | (label[idx] == 1)]
                has_normal = ((dom[idx] == d) & (label[idx] == 0)).any()
                unit[f"auc_{d}"] = auc_pauc(score[keep], label[keep], w[:, keep])[0] if has_normal else \
                    np.full(w.shape[0], math.nan)
        out[key if rule == "2021" else key[:2]] = unit
    return out


def aggregate(per_unit: dict[tuple, dict[str, np.ndarray]], rule: str) -> dict[str, np.ndarray]:
    """The official aggregate of units' replicates (``score``, ``auc``, ``pauc``; 2022 also ``auc_source``,
    ``auc_target``), as :func:`raysd.metrics.evaluate` aggregates the point figures."""
    rule = normalize_rule(rule)
    if not per_unit:
        return {}
    vals = list(per_unit.values())

    def of(key: str) -> list[np.ndarray]:
        return [u[key] for u in vals]

    if rule == "2020":
        types = sorted({k[0] for k in per_unit})
        a = _amean([_amean([u["auc"] for k, u in per_unit.items() if k[0] == t]) for t in types])
        p = _amean([_amean([u["pauc"] for k, u in per_unit.items() if k[0] == t]) for t in types])
        return {"auc": a, "pauc": p, "score": (a + p) / 2}
    if rule == "2021":
        return {"auc": _hmean(of("auc")), "pauc": _hmean(of("pauc")), "score": _hmean(of("auc") + of("pauc"))}
    src, tgt = of("auc_source"), of("auc_target")
    return {"auc_source": _hmean(src), "auc_target": _hmean(tgt), "auc": _hmean(src + tgt), "pauc": _hmean(of("pauc")),
            "score": _hmean(src + tgt + of("pauc"))}


def replicates(rs: Resampler, table: pd.DataFrame, rule: str, half: str) -> dict[str, np.ndarray]:
    """A score table's official figures on one half, per replicate."""
    return aggregate(units(rs, table, rule, half), rule)


def interval(reps: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of replicates (NaN, NaN when undefined)."""
    reps = np.asarray(reps, dtype=float)
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return math.nan, math.nan
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def tied(leader: np.ndarray, other: np.ndarray, mode: str = "max", level: float = LEVEL) -> bool:
    """Whether a paired bootstrap cannot tell ``other`` from ``leader``: the ``level`` interval of their difference
    includes 0."""
    sign = 1.0 if mode == "max" else -1.0
    lo, hi = interval(sign * (np.asarray(leader) - np.asarray(other)), level)
    return not (lo > 0 or hi < 0) if math.isfinite(lo) else False


def gain(better: np.ndarray, base: np.ndarray, mode: str = "max", level: float = LEVEL) -> tuple[float, float]:
    """The one-sided lower bound at ``level`` of ``better``'s gain over ``base`` (paired replicates), and the
    replicates' median gain. A gain whose bound is above 0 is above its bootstrap noise."""
    sign = 1.0 if mode == "max" else -1.0
    d = sign * (np.asarray(better, dtype=float) - np.asarray(base, dtype=float))
    d = d[np.isfinite(d)]
    if d.size == 0:
        return math.nan, math.nan
    return float(np.quantile(d, 1 - level)), float(np.median(d))
