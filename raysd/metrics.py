"""AUC, pAUC and the DCASE Task 2 aggregation rules, computed as the official evaluators compute them.

- ``auc`` = ``sklearn.metrics.roc_auc_score(y, s)``; ``pauc`` = ``roc_auc_score(y, s, max_fpr=0.1)``, which is
  scikit-learn's McClish-standardised partial AUC: 0.5 * (1 + (A - min) / (max - min)) with A the raw area
  up to ``max_fpr``, min = max_fpr**2 / 2 and max = max_fpr.
- rule ``2020``: AUC and pAUC per machine ID, arithmetic mean over the IDs of a machine type.
- rule ``2021``: AUC and pAUC within ``source`` and within ``target`` test clips of each section separately;
  the official score is the harmonic mean of all those AUC and pAUC values over types, sections and domains.
- rule ``2022`` (also used for 2023 and 2024): per section, AUC(source) over the source normals plus all
  anomalies of the section, AUC(target) likewise, pAUC over the whole section; the official score is the
  harmonic mean of all AUC(source), AUC(target) and pAUC values.

Harmonic means use ``scipy.stats.hmean`` on values floored at ``sys.float_info.epsilon``, as the evaluators do.
The 2020 challenge had no single official figure (teams were ranked by their average rank); raysd's
``official['score']`` for 2020 is the mean of the AUC and pAUC averages over machine types.

Submission files follow the official formats: 2020 ``anomaly_score_<type>_id_<id>.csv``; 2021
``anomaly_score_<type>_section_<xx>_<source|target>_test.csv`` and ``decision_result_...`` (the 2021 evaluator
reads one file per domain); 2022-2024 ``anomaly_score_<type>_section_<xx>_test.csv`` and
``decision_result_<type>_section_<xx>_test.csv``. Rows are ``file_name,value`` without a header.
"""

from __future__ import annotations

import csv
import io
import math
import os
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
import scipy.stats
from sklearn.metrics import roc_auc_score

from raysd.atomic import atomic_write_text

MAX_FPR = 0.1
RULES: tuple[str, ...] = ("2020", "2021", "2022")
SCORE_COLUMNS: tuple[str, ...] = ("file", "machine_type", "section", "domain", "split", "label", "score")
DOMAINS: tuple[str, ...] = ("source", "target")
DECISION_QUANTILE = 0.9  # the 2021+ baselines' threshold: 90th percentile of a gamma fit to training scores
_EPS = sys.float_info.epsilon

_SUBMISSION_NAMES = (
    ("2021", re.compile(r"(?P<kind>anomaly_score|decision_result)_(?P<machine_type>.+)_section_(?P<section>\d{2})"
                        r"_(?P<domain>source|target)_test\.csv")),
    ("2022", re.compile(r"(?P<kind>anomaly_score|decision_result)_(?P<machine_type>.+)_section_(?P<section>\d{2})"
                        r"_test\.csv")),
    ("2020", re.compile(r"(?P<kind>anomaly_score)_(?P<machine_type>.+)_id_(?P<section>\d{2})\.csv")),
)


class MetricError(ValueError):
    """Scores or labels that cannot be evaluated; the message names the machine type / section and why."""


def normalize_rule(rule: str | int) -> str:
    """'2020', 2021, 'dcase2023', ... -> one of ``RULES`` (2023 and 2024 use the 2022 rule)."""
    r = str(rule).lower().removeprefix("dcase")
    if r in ("2023", "2024"):
        r = "2022"
    if r not in RULES:
        raise MetricError(f"unknown evaluation rule {rule!r}; expected one of 2020, 2021, 2022, 2023, 2024")
    return r


def _checked(y_true, score, where: str = "") -> tuple[np.ndarray, np.ndarray]:
    prefix = f"{where}: " if where else ""
    y = pd.Series(y_true).reset_index(drop=True)
    s = pd.Series(score).reset_index(drop=True)
    if len(y) != len(s):
        raise MetricError(f"{prefix}{len(y)} labels but {len(s)} scores")
    if len(y) == 0:
        raise MetricError(f"{prefix}no clips to evaluate")
    if y.isna().any():
        raise MetricError(f"{prefix}{int(y.isna().sum())} clips have no label")
    y = y.astype(float).to_numpy()
    if not np.isin(y, (0.0, 1.0)).all():
        raise MetricError(f"{prefix}labels must be 0 (normal) or 1 (anomaly), got {sorted(set(y.tolist()))}")
    s = s.astype(float).to_numpy()
    if not np.isfinite(s).all():
        raise MetricError(f"{prefix}{int((~np.isfinite(s)).sum())} scores are NaN or infinite")
    n_anomaly = int(y.sum())
    if n_anomaly == 0 or n_anomaly == len(y):
        raise MetricError(f"{prefix}AUC needs both normal and anomalous clips, got {len(y) - n_anomaly} normal "
                          f"and {n_anomaly} anomalous")
    return y.astype(int), s


def auc(y_true, score) -> float:
    """Area under the ROC curve (``roc_auc_score``); ties count one half."""
    y, s = _checked(y_true, score)
    return float(roc_auc_score(y, s))


def pauc(y_true, score, max_fpr: float = MAX_FPR) -> float:
    """McClish-standardised partial AUC up to ``max_fpr`` (``roc_auc_score(..., max_fpr=max_fpr)``)."""
    y, s = _checked(y_true, score)
    return float(roc_auc_score(y, s, max_fpr=max_fpr))


def hmean(values: Sequence[float]) -> float:
    """Harmonic mean as the evaluators compute it: ``scipy.stats.hmean`` of values floored at machine epsilon."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan
    return float(scipy.stats.hmean(np.maximum(v, _EPS)))


def _amean(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else math.nan


def _scored_table(scores: pd.DataFrame, rule: str) -> pd.DataFrame:
    missing = [c for c in SCORE_COLUMNS if c not in scores.columns and not (c == "domain" and rule == "2020")]
    if missing:
        raise MetricError(f"score table lacks columns {missing}; expected {list(SCORE_COLUMNS)}")
    t = scores.loc[(scores["split"] == "test") & scores["label"].notna()].copy()
    if t.empty:
        raise MetricError("score table has no labelled test clips (split == 'test' with a label) to evaluate")
    if "domain" not in t.columns:
        t["domain"] = ""
    t["domain"] = t["domain"].fillna("").astype(str)
    t["section"] = t["section"].astype(str)
    t["machine_type"] = t["machine_type"].astype(str)
    bad = ~np.isfinite(t["score"].astype(float).to_numpy())
    if bad.any():
        raise MetricError(f"{int(bad.sum())} labelled test clips have NaN or infinite scores, e.g. "
                          f"{t.loc[bad, 'file'].iloc[0]}")
    dup = t.duplicated(["machine_type", "file"], keep=False)
    if dup.any():
        raise MetricError(f"{int(dup.sum())} score rows repeat a test file, e.g. {t.loc[dup, 'file'].iloc[0]}; "
                          "expect one score per DCASE clip")
    if rule != "2020":
        nodomain = ~t["domain"].isin(DOMAINS)
        if nodomain.any():
            raise MetricError(f"rule {rule} needs domain 'source' or 'target' for every labelled test clip; "
                              f"{int(nodomain.sum())} have {sorted(t.loc[nodomain, 'domain'].unique().tolist())}, "
                              f"e.g. {t.loc[nodomain, 'file'].iloc[0]}")
    return t


def evaluate(scores: pd.DataFrame, rule: str | int = "2020", *, max_fpr: float = MAX_FPR,
             strict: bool = False) -> tuple[pd.DataFrame, dict]:
    """Per-section figures and the year's official aggregate for a score table.

    ``scores`` has columns ``SCORE_COLUMNS``; only rows with split == 'test' and a label are used. Returns
    ``(per_section, official)``: ``per_section`` has one row per (machine_type, section) — per
    (machine_type, section, domain) for 2021 — with clip counts and auc / pauc (2022: auc over the whole
    section, auc_source, auc_target, pauc). ``official`` holds ``rule``, ``score`` (the single figure),
    ``auc``, ``pauc`` (2022: also ``auc_source``, ``auc_target``), ``per_type`` ({machine_type: same keys}) and
    ``omitted`` (values that could not be computed, e.g. a section without target normals, and why).
    With ``strict=True`` such a value raises ``MetricError`` instead.
    """
    rule = normalize_rule(rule)
    t = _scored_table(scores, rule)
    omitted: list[str] = []

    def measure(fn, y, s, where: str) -> float:
        try:
            y, s = _checked(y, s, where)
        except MetricError as e:
            if strict:
                raise
            omitted.append(str(e))
            return math.nan
        return float(fn(y, s))

    def auc_fn(y, s):
        return roc_auc_score(y, s)

    def pauc_fn(y, s):
        return roc_auc_score(y, s, max_fpr=max_fpr)

    rows = []
    if rule in ("2020", "2021"):
        keys = ["machine_type", "section"] + (["domain"] if rule == "2021" else [])
        for key, g in t.groupby(keys, sort=True):
            where = _where(dict(zip(keys, key)), rule)
            y, s = g["label"], g["score"]
            n_anomaly = int((g["label"] == 1).sum())
            a = measure(auc_fn, y, s, where)
            p = pauc_fn(*_checked(y, s)) if not math.isnan(a) else math.nan
            rows.append({**dict(zip(keys, key)), "n_normal": len(g) - n_anomaly, "n_anomaly": n_anomaly,
                         "auc": a, "pauc": p})
    else:
        for (mt, sec), g in t.groupby(["machine_type", "section"], sort=True):
            where = _where({"machine_type": mt, "section": sec}, rule)
            y, s, dom = g["label"].astype(int), g["score"], g["domain"]
            row = {"machine_type": mt, "section": sec,
                   "n_normal_source": int(((dom == "source") & (y == 0)).sum()),
                   "n_normal_target": int(((dom == "target") & (y == 0)).sum()),
                   "n_anomaly": int((y == 1).sum())}
            row["auc"] = measure(auc_fn, y, s, where)
            whole_ok = not math.isnan(row["auc"])
            for d in DOMAINS:
                if not whole_ok:
                    row[f"auc_{d}"] = math.nan
                    continue
                keep = (dom == d) | (y == 1)
                if row[f"n_normal_{d}"] == 0:
                    msg = f"{where}: no {d} normal clips, AUC({d}) left out"
                    if strict:
                        raise MetricError(msg)
                    omitted.append(msg)
                    row[f"auc_{d}"] = math.nan
                else:
                    row[f"auc_{d}"] = measure(auc_fn, y[keep], s[keep], f"{where} {d}")
            row["pauc"] = float(pauc_fn(*_checked(y, s))) if whole_ok else math.nan
            rows.append(row)
    per_section = pd.DataFrame(rows)

    value_cols = ["auc", "pauc"] if rule != "2022" else ["auc_source", "auc_target", "pauc"]
    if per_section[value_cols].isna().all().all():
        raise MetricError("no AUC or pAUC could be computed:\n" + "\n".join(f"  {m}" for m in omitted))
    if omitted:
        warnings.warn("raysd metrics: some values were left out of the aggregate:\n"
                      + "\n".join(f"  {m}" for m in omitted), stacklevel=2)

    def aggregate(df: pd.DataFrame) -> dict:
        if rule == "2020":
            a, p = _amean(df["auc"]), _amean(df["pauc"])
            return {"auc": a, "pauc": p, "score": _amean([a, p])}
        if rule == "2021":
            return {"auc": hmean(df["auc"]), "pauc": hmean(df["pauc"]),
                    "score": hmean(list(df["auc"]) + list(df["pauc"]))}
        src, tgt, pauc = list(df["auc_source"]), list(df["auc_target"]), list(df["pauc"])
        return {"auc_source": hmean(src), "auc_target": hmean(tgt), "auc": hmean(src + tgt), "pauc": hmean(pauc),
                "score": hmean(src + tgt + pauc)}

    per_type = {mt: aggregate(g) for mt, g in per_section.groupby("machine_type", sort=True)}
    if rule == "2020":  # 2020 overall figures average the per-type averages
        overall = {k: _amean([v[k] for v in per_type.values()]) for k in ("auc", "pauc")}
        overall["score"] = _amean([overall["auc"], overall["pauc"]])
    else:
        overall = aggregate(per_section)
    official = {"rule": rule, **overall, "per_type": per_type, "omitted": omitted}
    return per_section, official


def _where(key: Mapping[str, str], rule: str) -> str:
    unit = "id" if rule == "2020" else "section"
    text = f"{key['machine_type']} {unit} {key['section']}"
    return f"{text} {key['domain']}" if "domain" in key else text


# ---------------------------------------------------------------------- submission files
def _fmt(x: float) -> str:
    return repr(float(x))


def _gamma_threshold(train_scores: np.ndarray, where: str) -> float:
    """The 2021+ baselines' decision threshold: 90th percentile of a gamma distribution fitted to training scores."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            shape, loc, scale = scipy.stats.gamma.fit(train_scores)
            thr = float(scipy.stats.gamma.ppf(DECISION_QUANTILE, shape, loc=loc, scale=scale))
        except (ValueError, RuntimeError, FloatingPointError):
            thr = math.nan
    if not math.isfinite(thr):
        thr = float(np.quantile(train_scores, DECISION_QUANTILE))
        warnings.warn(f"{where}: gamma fit to training scores failed; decision threshold is their empirical "
                      f"{DECISION_QUANTILE:.0%} quantile {thr:.6g}", stacklevel=3)
    return thr


def decision_thresholds(scores: pd.DataFrame,
                        threshold: float | Mapping[tuple[str, str], float] | None = None) -> dict[tuple[str, str], float]:
    """Threshold per (machine_type, section) of the test clips in ``scores``.

    ``threshold``: a number (used everywhere), a dict {(machine_type, section): value}, or None for the
    baselines' rule fitted per machine type and section to the training clips' scores (split == 'train').
    """
    test = scores.loc[scores["split"] == "test"]
    keys = sorted({(str(m), str(s)) for m, s in zip(test["machine_type"], test["section"])})
    if threshold is None:
        out = {}
        for mt, sec in keys:
            train = scores.loc[(scores["split"] == "train") & (scores["machine_type"].astype(str) == mt)
                               & (scores["section"].astype(str) == sec), "score"].astype(float).to_numpy()
            train = train[np.isfinite(train)]
            if train.size == 0:
                raise MetricError(f"{mt} section {sec}: no training scores to fit a decision threshold; "
                                  "pass threshold= (a number or a {(machine_type, section): value} dict)")
            out[(mt, sec)] = _gamma_threshold(train, f"{mt} section {sec}")
        return out
    if isinstance(threshold, Mapping):
        norm = {(str(k[0]), str(k[1])): float(v) for k, v in threshold.items()}
        lacking = [k for k in keys if k not in norm]
        if lacking:
            raise MetricError(f"threshold dict has no value for (machine_type, section) {lacking[:5]}")
        return {k: norm[k] for k in keys}
    return {k: float(threshold) for k in keys}


def write_submission(scores: pd.DataFrame, out_dir: str | os.PathLike, rule: str | int,
                     threshold: float | Mapping[tuple[str, str], float] | None = None) -> list[Path]:
    """Write the official submission files for the test clips (labelled or not) of ``scores``; returns the paths.

    2021+ also writes decision files (1 where score > threshold, see ``decision_thresholds``); 2020 has none,
    so ``threshold`` must stay None there. Each file is written atomically.
    """
    rule = normalize_rule(rule)
    for c in ("file", "machine_type", "section", "split", "score") + (("domain",) if rule == "2021" else ()):
        if c not in scores.columns:
            raise MetricError(f"score table lacks column {c!r}; expected {list(SCORE_COLUMNS)}")
    if rule == "2020" and threshold is not None:
        raise MetricError("DCASE 2020 submissions have no decision files; threshold is not used for rule 2020")
    test = scores.loc[scores["split"] == "test"].copy()
    if test.empty:
        raise MetricError("score table has no test clips (split == 'test') to write")
    s = test["score"].astype(float).to_numpy()
    if not np.isfinite(s).all():
        raise MetricError(f"{int((~np.isfinite(s)).sum())} test clips have NaN or infinite scores, e.g. "
                          f"{test.loc[~np.isfinite(s), 'file'].iloc[0]}")
    test["file_name"] = [PurePosixPath(str(f).replace("\\", "/")).name for f in test["file"]]
    test["machine_type"] = test["machine_type"].astype(str)
    test["section"] = test["section"].astype(str)
    thresholds = decision_thresholds(scores, threshold) if rule != "2020" else {}
    keys = ["machine_type", "section"] + (["domain"] if rule == "2021" else [])
    if rule == "2021":
        bad = ~test["domain"].isin(DOMAINS)
        if bad.any():
            raise MetricError(f"rule 2021 writes one file per domain; {int(bad.sum())} test clips have no "
                              f"source/target domain, e.g. {test.loc[bad, 'file'].iloc[0]}")
    out_dir = Path(out_dir)
    written: list[Path] = []
    for key, g in test.groupby(keys, sort=True):
        k = dict(zip(keys, key))
        dup = g["file_name"].duplicated()
        if dup.any():
            raise MetricError(f"{_where(k, rule)}: file name {g.loc[dup, 'file_name'].iloc[0]} occurs twice")
        g = g.sort_values("file_name")
        if rule == "2020":
            stem = f"{k['machine_type']}_id_{k['section']}"
        elif rule == "2021":
            stem = f"{k['machine_type']}_section_{k['section']}_{k['domain']}_test"
        else:
            stem = f"{k['machine_type']}_section_{k['section']}_test"
        written.append(atomic_write_text(out_dir / f"anomaly_score_{stem}.csv",
                                         _rows(g["file_name"], (_fmt(v) for v in g["score"]))))
        if rule != "2020":
            thr = thresholds[(k["machine_type"], k["section"])]
            decisions = (str(int(v > thr)) for v in g["score"].astype(float))
            written.append(atomic_write_text(out_dir / f"decision_result_{stem}.csv", _rows(g["file_name"], decisions)))
    return written


def _rows(names, values) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for n, v in zip(names, values):
        w.writerow([n, v])
    return buf.getvalue()


def read_submission(path: str | os.PathLike, kind: str = "anomaly_score") -> pd.DataFrame:
    """Read one submission file, or every ``<kind>_*.csv`` in a folder, back into a table.

    Columns: machine_type, section, domain ('' unless the file name says), file_name, and ``score``
    (kind 'anomaly_score') or ``decision`` (kind 'decision_result').
    """
    if kind not in ("anomaly_score", "decision_result"):
        raise MetricError(f"kind must be 'anomaly_score' or 'decision_result', got {kind!r}")
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob(f"{kind}_*.csv"))
        if not files:
            raise MetricError(f"no {kind}_*.csv files in {path}")
    elif path.is_file():
        files = [path]
    else:
        raise MetricError(f"submission path {path} does not exist")
    value = "score" if kind == "anomaly_score" else "decision"
    frames = []
    for f in files:
        for _, pattern in _SUBMISSION_NAMES:
            m = pattern.fullmatch(f.name)
            if m and m["kind"] == kind:
                break
        else:
            raise MetricError(f"{f}: not a submission file name (expected {kind}_<type>_id_<id>.csv, "
                              f"{kind}_<type>_section_<xx>_<source|target>_test.csv or {kind}_<type>_section_<xx>_test.csv)")
        names, values = [], []
        with open(f, newline="", encoding="utf-8") as fh:
            for i, row in enumerate(csv.reader(fh), start=1):
                if not row:
                    continue
                if len(row) != 2:
                    raise MetricError(f"{f}, line {i}: expected 'file_name,{value}', got {row}")
                try:
                    v = float(row[1])
                except ValueError:
                    raise MetricError(f"{f}, line {i}: {value} {row[1]!r} is not a number") from None
                if kind == "decision_result" and v not in (0.0, 1.0):
                    raise MetricError(f"{f}, line {i}: decision must be 0 or 1, got {row[1]!r}")
                names.append(row[0])
                values.append(int(v) if kind == "decision_result" else v)
        frames.append(pd.DataFrame({
            "machine_type": m["machine_type"], "section": m["section"],
            "domain": m.groupdict().get("domain") or "", "file_name": names, value: values,
        }))
    return pd.concat(frames, ignore_index=True)


def split_half(file: str) -> str:
    """'selection' or 'report': a deterministic half of the test clips, from a hash of the file's base name.

    The selection half drives the search; the report half is what the leaderboard reports, so the
    reported figures are not the ones that were optimised."""
    import hashlib

    name = str(file).replace("\\", "/").rsplit("/", 1)[-1]
    return "selection" if hashlib.sha1(name.encode()).digest()[0] % 2 == 0 else "report"
