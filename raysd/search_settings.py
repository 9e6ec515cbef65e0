"""How a study searches: a preset's ``search:`` section, read and checked before Ray starts.

::

    search: {algorithm: tpe, n_startup_trials: auto, multivariate: true, constant_liar: true,
             stopped_trials: pruned, max_concurrent_per_study: 0, warm_start: 0}

``search: grid`` is short for ``search: {algorithm: grid}``. A family entry may carry a ``search:`` of its own,
which replaces the preset's for that entry. The algorithms:

- ``tpe`` (the default): Optuna's ``TPESampler`` with the options below made explicit, so the search does not
  change with the installed Optuna (its own defaults moved between 4.x and 5.x);
- ``tpe_default``: ``TPESampler(seed=seed)`` and nothing else, the sampler raysd shipped before the options
  existed, with Ray's handling of trials the scheduler stops (told to Optuna as complete);
- ``random``: Optuna's ``RandomSampler(seed=seed)``, persisted and resumable like TPE;
- ``grid``: every combination of the space's choices (every searched key must be a ``choice``), as Ray Tune's
  ``grid_search``, without a searcher; a study trains ``grid size x num_samples`` trials (``num_samples``
  defaults to 1).

``raysd.searchers`` turns these settings into the sampler, searcher and scheduler of a study; the search
benchmark (``benchmarks/search_efficiency.py``) replays the same objects on recorded learning curves. On the
committed tables the defaults reach the grid's best in the same median share of the grid's trial-epochs as
``tpe_default``, ``random`` and the grid in random order (0.64 at 8 trials at once; about 0.49 with ASHA), and a
study allowed 32 trials at once does no better than random; the README has the figures and why no setting does
much better there.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

ALGORITHMS = ("tpe", "tpe_default", "random", "grid")
STOPPED_TRIALS = ("pruned", "complete")
TPE_KEYS = ("n_startup_trials", "multivariate", "constant_liar", "stopped_trials")  # options of algorithm tpe only
AUTO = "auto"


class SettingError(ValueError):
    """A ``search:`` value that cannot be used; ``key`` is the offending key inside the section."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class SearchSettings:
    """A study's search; the defaults are what a preset without ``search:`` gets."""

    algorithm: str = "tpe"
    n_startup_trials: int | str = AUTO  # random trials before TPE models the results; 'auto': startup_trials()
    multivariate: bool = True  # one joint Parzen model over every key, not one per key
    constant_liar: bool = True  # running trials count as bad results, so concurrent suggestions spread out
    stopped_trials: str = "pruned"  # how Optuna is told of a trial the scheduler stopped: 'pruned' or 'complete'
    max_concurrent_per_study: int = 0  # a cap on one study's running trials (0: what the cluster share allows)
    warm_start: int = 0  # enqueue up to N best configurations of finished sibling studies (0: off)

    @property
    def optuna(self) -> bool:
        """Whether an Optuna searcher proposes the trials (all but grid)."""
        return self.algorithm != "grid"

    def startup_trials(self, num_samples: int) -> int:
        """TPE's random start-up trials for a study of ``num_samples`` trials: the number given, or for 'auto' a
        quarter of the trials, at least 2 and at most Optuna's default of 10 (which alone would leave a
        12-16-trial study only 2-6 trials that TPE proposes)."""
        if self.n_startup_trials != AUTO:
            return int(self.n_startup_trials)
        return min(10, max(2, num_samples // 4))

    def label(self) -> str:
        """The algorithm and every option that differs from the defaults, e.g. ``tpe:constant_liar=false``."""
        base = read_settings(self.algorithm)
        diff = [f"{f.name}={_text(getattr(self, f.name))}" for f in dataclasses.fields(self)
                if f.name != "algorithm" and getattr(self, f.name) != getattr(base, f.name)]
        return self.algorithm + (":" + ",".join(diff) if diff else "")


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _int(key: str, value: Any, low: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise SettingError(key, f"must be an integer >= {low}, got {value!r}")
    return value


def read_settings(raw: Any) -> SearchSettings:
    """A ``search:`` section (a mapping, or an algorithm's name) as checked settings; ``None`` gives the defaults."""
    if raw is None:
        return SearchSettings()
    if isinstance(raw, str):
        raw = {"algorithm": raw}
    if not isinstance(raw, dict):
        raise SettingError("", f"must be an algorithm ({', '.join(ALGORITHMS)}) or a mapping of options, got {raw!r}")
    names = [f.name for f in dataclasses.fields(SearchSettings)]
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise SettingError(unknown[0], f"unknown option; allowed: {names}")
    algorithm = raw.get("algorithm", SearchSettings.algorithm)
    if algorithm not in ALGORITHMS:
        raise SettingError("algorithm", f"must be one of {list(ALGORITHMS)}, got {algorithm!r}")
    if algorithm != "tpe":
        given = [k for k in TPE_KEYS if k in raw]
        if given:
            what = ("Optuna's TPESampler(seed) as shipped before, with its own defaults" if algorithm == "tpe_default"
                    else f"the {algorithm} search")
            raise SettingError(given[0], f"an option of algorithm tpe; {algorithm} is {what}: drop it, or use tpe")
    if algorithm == "grid" and raw.get("warm_start"):
        raise SettingError("warm_start", "a grid trains every configuration anyway: drop warm_start or use tpe")
    startup = raw.get("n_startup_trials", AUTO)
    if startup != AUTO:
        startup = _int("n_startup_trials", startup, 0)
    for key in ("multivariate", "constant_liar"):
        if not isinstance(raw.get(key, True), bool):
            raise SettingError(key, f"must be true or false, got {raw[key]!r}")
    stopped = raw.get("stopped_trials", SearchSettings.stopped_trials)
    if stopped not in STOPPED_TRIALS:
        raise SettingError("stopped_trials", f"must be one of {list(STOPPED_TRIALS)}, got {stopped!r}")
    values = {"algorithm": algorithm, "n_startup_trials": startup, "stopped_trials": stopped,
              **{k: raw[k] for k in ("multivariate", "constant_liar") if k in raw},
              **{k: _int(k, raw[k], 0) for k in ("max_concurrent_per_study", "warm_start") if k in raw}}
    if algorithm != "tpe":
        values["stopped_trials"] = "complete"  # Ray's own handling: what tpe_default shipped with
    return SearchSettings(**values)
