"""The leaderboard's uncertainty: bootstrap replicates of every figure (:mod:`raysd.uncertainty`), shared by every
model of a machine type, so that intervals are comparable and differences paired.

``*_lo`` / ``*_hi`` columns give a 95% interval of the official score, AUC and pAUC on each half (``sel``,
``report``, ``test``) of a trial or an ensemble. A trial is *tied* with its machine type's leader when the paired
bootstrap interval of their difference in the search metric (on the selection half) includes 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from raysd import uncertainty
from raysd.report.experiment import Experiment

HALVES = {"selection": "sel", "report": "report", "test": "test"}
FIGURES = {"score": "official", "auc": "auc", "pauc": "pauc"}


@dataclass
class Bootstrap:
    """Replicates of an experiment's score tables, one resampler per machine type."""

    rule: str
    metric: str  # the search metric (sel_auc, sel_pauc or sel_official)
    mode: str
    resamplers: dict[str, uncertainty.Resampler]
    level: float = uncertainty.LEVEL
    selection: dict[str, np.ndarray] = field(default_factory=dict)  # trial key -> its search metric's replicates

    def replicates(self, table: pd.DataFrame, half: str) -> dict[str, np.ndarray]:
        """A score table's figures on one half, per replicate (over every machine type it covers)."""
        per_unit: dict[tuple, dict[str, np.ndarray]] = {}
        for mt, rows in table.groupby("machine_type", sort=True):
            rs = self.resamplers.get(str(mt))
            if rs is not None:
                per_unit.update(uncertainty.units(rs, rows, self.rule, half))
        return uncertainty.aggregate(per_unit, self.rule)

    def columns(self, table: pd.DataFrame) -> dict[str, float]:
        """``<half>_<figure>_lo`` / ``_hi`` of a score table."""
        out: dict[str, float] = {}
        for half, prefix in HALVES.items():
            reps = self.replicates(table, half)
            for key, name in FIGURES.items():
                if key in reps:
                    out[f"{prefix}_{name}_lo"], out[f"{prefix}_{name}_hi"] = uncertainty.interval(reps[key], self.level)
        return out

    def search_metric(self, table: pd.DataFrame) -> np.ndarray:
        """The search metric's replicates on the selection half (NaN where it is undefined)."""
        key = {"official": "score"}.get(self.metric.removeprefix("sel_"), self.metric.removeprefix("sel_"))
        reps = self.replicates(table, "selection")
        n = next(iter(self.resamplers.values())).n_boot
        return reps.get(key, np.full(n, math.nan))

    def tied(self, leader: str, other: str) -> bool:
        """Whether trial ``other`` cannot be told from ``leader`` (keys of :attr:`selection`)."""
        return uncertainty.tied(self.selection[leader], self.selection[other], self.mode, self.level)


def bootstrap(exp: Experiment, n_boot: int = uncertainty.N_BOOT, seed: int = 0) -> Bootstrap | None:
    """The experiment's bootstrap over the labelled test clips of its scored trials; None without test labels,
    for a search metric that needs none, or with ``n_boot`` 0."""
    if n_boot <= 0 or not exp.metric.startswith("sel_"):
        return None
    by_type: dict[str, list[pd.DataFrame]] = {}
    for t in exp.trials:
        if t.scored and t.test is not None:
            by_type.setdefault(t.machine_type, []).append(t.test)
    resamplers = {}
    for i, (mt, tables) in enumerate(sorted(by_type.items())):
        if any(uncertainty.labelled(t)["label"].nunique() > 1 for t in tables):
            resamplers[mt] = uncertainty.resampler(tables, n_boot, seed + i)
    return Bootstrap(exp.rule, exp.metric, exp.mode, resamplers) if resamplers else None
