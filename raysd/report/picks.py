"""Which trial a machine type keeps among those its selection half cannot tell apart, and what a choice made on some
machine types is worth on another.

Pick rules (``--pick``), each among the trials tied with the leader (:mod:`raysd.report.intervals`):

- ``top``: the leader, the best selection figure;
- ``neighbours``: the trial whose configuration did well with its neighbours: its selection figure averaged with
  those of its ``NEIGHBOURS`` nearest trials of the same study in hyperparameter space (seed repeats of a
  configuration are at distance 0), evidence from several trainings rather than one lucky one;
- ``defaults``: the trial nearest to its family's published defaults.

The leave-one-type-out estimate (:func:`first_shot_estimates`): for a study over several machine types (scope
``first_shot`` or ``dataset``), the report-half figure on each type of the configuration chosen on the *other*
types' selection halves: what a configuration chosen this way is worth on a machine type it has not seen, beside
the in-sample figure of the one chosen on every type.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pandas as pd

from raysd.ensemble import selection_value
from raysd.families.base import get_family
from raysd.families.hparams import TrainHP, config_fields
from raysd.report.board import figures
from raysd.report.experiment import Experiment, Trial
from raysd.report.intervals import Bootstrap

PICK_RULES = ("top", "neighbours", "defaults")
NEIGHBOURS = 2
IGNORED = {"seed", "epochs"}


def _axis(values: list[Any]) -> tuple[str, float, float]:
    """How a hyperparameter's values are compared: 'log' or 'linear' over their range, else 'category'."""
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(nums) < len(values) or not nums:
        return "category", 0.0, 1.0
    lo, hi = min(nums), max(nums)
    if lo > 0 and hi / lo >= 10:
        return "log", math.log(lo), math.log(hi) - math.log(lo)
    return "linear", lo, (hi - lo) or 1.0


def distances(trials: list[Trial]) -> np.ndarray:
    """Pairwise distance of the trials' configurations: the mean over the hyperparameters that differ among them of
    each one's difference, scaled to its range (log scale where it spans a decade or more; 0 or 1 for a category)."""
    keys = sorted({k for t in trials for k in t.params} - IGNORED)
    keys = [k for k in keys if len({repr(t.params.get(k)) for t in trials}) > 1]
    d = np.zeros((len(trials), len(trials)))
    for k in keys:
        vals = [t.params.get(k) for t in trials]
        kind, lo, span = _axis(vals)
        if kind == "category":
            x = np.array([repr(v) for v in vals])
            d += (x[:, None] != x[None, :]).astype(float)
        else:
            v = np.asarray([float(x) for x in vals if x is not None], dtype=np.float64)  # numbers (see _axis)
            v = np.log(v) if kind == "log" else v
            d += np.abs(np.subtract.outer(v, v)) / span
    return d / max(1, len(keys))


def neighbour_values(trials: list[Trial], values: dict[str, float], k: int = NEIGHBOURS) -> dict[str, float]:
    """Each scored trial's selection figure averaged with its ``k`` nearest trials of the same study."""
    out: dict[str, float] = {}
    for _, group in pd.Series(trials, dtype=object).groupby([t.study for t in trials]):
        mine = [t for t in group if t.key in values]
        if not mine:
            continue
        d = distances(mine)
        for i, t in enumerate(mine):
            near = [j for j in np.argsort(d[i], kind="stable") if j != i][:k]
            out[t.key] = float(np.mean([values[t.key]] + [values[mine[j].key] for j in near]))
    return out


def default_distance(t: Trial) -> float:
    """How far a trial's configuration lies from its family's defaults: the mean over its hyperparameters of |log10
    ratio| (capped at 1) for positive numbers, else 0 or 1."""
    try:
        fields = {**config_fields(TrainHP), **config_fields(get_family(t.family).Config)}
    except KeyError:
        return math.inf
    parts = []
    for key, value in t.params.items():
        f = fields.get(key)
        if key in IGNORED or f is None or f.default is dataclasses.MISSING:
            continue
        base = f.default
        if isinstance(value, (int, float)) and isinstance(base, (int, float)) and not isinstance(value, bool) \
                and value > 0 and base > 0:
            parts.append(min(1.0, abs(math.log10(value / base))))
        else:
            parts.append(float(repr(value) != repr(base)))
    return float(np.mean(parts)) if parts else 0.0


def pick(ranked: list[Trial], values: dict[str, float], boot: Bootstrap | None, rule: str,
         all_trials: list[Trial] | None = None) -> Trial:
    """The trial a machine type keeps under ``rule`` among ``ranked`` (best selection figure first)."""
    if rule not in PICK_RULES:
        raise ValueError(f"pick rule must be one of {PICK_RULES}, got {rule!r}")
    leader = ranked[0]
    if rule == "top" or boot is None or leader.key not in boot.selection:
        return leader
    tied = [leader] + [t for t in ranked[1:] if t.key in boot.selection and boot.tied(leader.key, t.key)]
    if rule == "defaults":
        return min(tied, key=default_distance)
    sign = 1 if boot.mode == "max" else -1
    smooth = neighbour_values(all_trials or ranked, values)
    return max(tied, key=lambda t: sign * smooth.get(t.key, values[t.key]))


def first_shot_estimates(exp: Experiment, values: dict[str, float]) -> pd.DataFrame:
    """Per machine type of each study over several types: the configuration chosen on every type's selection half
    and its report-half figure there (in sample), and the one chosen on the other types' (leave one type out)."""
    key = exp.metric.removeprefix("sel_")
    report = f"report_{key}"
    sign = 1 if exp.mode == "max" else -1
    rows = []
    for study in sorted({t.study for t in exp.trials if t.covers and t.scope != "machine_type"}):
        parts: dict[str, dict[str, Trial]] = {}
        for t in exp.trials:
            if t.study == study and t.key in values and t.test is not None:
                parts.setdefault(t.trial_id, {})[t.machine_type] = t
        types = sorted({mt for p in parts.values() for mt in p})
        complete = {tid: p for tid, p in parts.items() if set(p) == set(types)}
        if len(types) < 2 or not complete:
            continue

        def chosen(on: list[str]) -> str:
            scored = {tid: selection_value(pd.concat([p[mt].test for mt in on], ignore_index=True), exp.metric,
                                           exp.rule) for tid, p in complete.items()}
            return max(sorted(scored), key=lambda tid: sign * scored[tid] if math.isfinite(scored[tid]) else -math.inf)

        in_sample = chosen(types)
        for mt in types:
            loto = chosen([m for m in types if m != mt])
            rows.append({"machine_type": mt, "study": study, "scope": complete[in_sample][mt].scope,
                         "in_sample_trial": in_sample,
                         f"in_sample_{report}": figures(complete[in_sample][mt].test, exp.rule).get(report, math.nan),
                         "loto_trial": loto,
                         f"loto_{report}": figures(complete[loto][mt].test, exp.rule).get(report, math.nan)})
    return pd.DataFrame(rows)
