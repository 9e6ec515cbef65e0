"""How a study searches: a preset's ``search:`` section, read and checked before Ray starts.

::

    search: {algorithm: gp, max_concurrent_per_study: 0, warm_start: 0}
    search: {algorithm: tpe, n_startup_trials: auto, multivariate: true, constant_liar: true,
             stopped_trials: pruned, max_concurrent_per_study: 0, warm_start: 0}

``search: grid`` is short for ``search: {algorithm: grid}``. A family entry may carry a ``search:`` of its own,
which replaces the preset's for that entry. The algorithms:

- ``gp`` (the default): Optuna's ``GPSampler`` (Gaussian-process Bayesian optimisation) after a random start-up
  of a quarter of the study's trials (2 to 10), the search tournament's winner on LCBench
  (``benchmarks/search_efficiency.py``);
- ``tpe``: Optuna's ``TPESampler`` with the options below made explicit, so the search does not change with the
  installed Optuna (its own defaults moved between 4.x and 5.x);
- ``tpe_default``: ``TPESampler(seed=seed)`` and nothing else, the sampler raysd shipped before the options
  existed, with Ray's handling of trials the scheduler stops (told to Optuna as complete);
- ``random``: Optuna's ``RandomSampler(seed=seed)``, persisted and resumable like TPE;
- ``cmaes``: Optuna's ``CmaEsSampler`` (categorical keys sampled independently), after the same random start-up;
- ``grid``: every combination of the space's choices (every searched key must be a ``choice``), as Ray Tune's
  ``grid_search``, without a searcher; a study trains ``grid size x num_samples`` trials (``num_samples``
  defaults to 1).

``raysd.searchers`` turns these settings into the sampler, searcher and scheduler of a study; the search
benchmark (``benchmarks/search_efficiency.py``) replays the same objects on recorded learning curves and on LCBench,
and chose the defaults (its figures and commands: docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, ValidationError

from raysd.typed import FORBID, Bool, NonNegative, adapter, config_fields

Algorithm = Literal["tpe", "tpe_default", "random", "grid", "gp", "cmaes"]
ALGORITHMS: tuple[str, ...] = get_args(Algorithm)
STOPPED_TRIALS = ("pruned", "complete")
TPE_KEYS = ("n_startup_trials", "multivariate", "constant_liar", "stopped_trials")  # options of algorithm tpe only
AUTO: Literal["auto"] = "auto"


class SettingError(ValueError):
    """A ``search:`` value that cannot be used; ``key`` is the offending key inside the section."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class SearchSettings:
    """A study's search; the defaults are what a preset without ``search:`` gets."""

    __pydantic_config__ = FORBID

    algorithm: Annotated[Algorithm, Field(description="gp (Optuna's GPSampler), tpe (Optuna's TPE with the options "
                                                      "below), tpe_default (TPESampler(seed) alone), random, grid "
                                                      "(every combination of the space's choices) or cmaes (Optuna's "
                                                      "CmaEsSampler)")] = "gp"
    n_startup_trials: Annotated[NonNegative | Literal["auto"], Field(
        description="tpe: random trials before TPE models the results (gp, cmaes: auto); auto: a quarter of the "
                    "study's trials, 2 to 10"
    )] = AUTO
    multivariate: Annotated[Bool, Field(description="tpe: one joint Parzen model over every key, not one per key")] = True
    constant_liar: Annotated[Bool, Field(description="tpe: running trials count as bad results, so concurrent "
                                                     "suggestions spread out")] = True
    stopped_trials: Annotated[Literal["pruned", "complete"], Field(
        description="tpe: how Optuna is told of a trial the scheduler stopped")] = "pruned"
    max_concurrent_per_study: Annotated[NonNegative, Field(description="a cap on one study's running trials (0: what "
                                                                       "the cluster share allows)")] = 0
    warm_start: Annotated[NonNegative, Field(description="enqueue up to N best configurations of finished sibling "
                                                         "studies (0: off)")] = 0

    def __post_init__(self) -> None:
        if self.algorithm != "tpe":  # Ray's own handling of stopped trials: what tpe_default shipped with
            object.__setattr__(self, "stopped_trials", "complete")

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


def prepared_settings(raw: Any) -> Any:
    """A ``search:`` section before its typed check: an algorithm's name stands for ``{algorithm: NAME}``, and the
    options of algorithm tpe are refused beside another algorithm (a ``ValueError`` naming the option)."""
    if raw is None or isinstance(raw, SearchSettings):
        return raw
    if isinstance(raw, str):
        return {"algorithm": raw}
    if not isinstance(raw, dict):
        raise ValueError(f"must be an algorithm ({', '.join(ALGORITHMS)}) or a mapping of options")
    algorithm = raw.get("algorithm", SearchSettings.algorithm)
    given = [k for k in TPE_KEYS if k in raw]
    if algorithm in ALGORITHMS and algorithm != "tpe" and given:
        what = ("Optuna's TPESampler(seed) as shipped before, with its own defaults" if algorithm == "tpe_default"
                else f"the {algorithm} search")
        raise ValueError(f"{given[0]} is an option of algorithm tpe; {algorithm} is {what}: drop it, or use tpe")
    if algorithm == "grid" and raw.get("warm_start"):
        raise ValueError("warm_start: a grid trains every configuration anyway: drop warm_start or use tpe")
    return raw


def read_settings(raw: Any) -> SearchSettings:
    """A ``search:`` section (a mapping, or an algorithm's name) as checked settings; ``None`` gives the defaults."""
    try:
        prepared = prepared_settings(raw)
        return SearchSettings() if prepared is None else adapter(SearchSettings).validate_python(prepared)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        key = str(err["loc"][0]) if err["loc"] else ""
        if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            raise SettingError(key, f"unknown option; allowed: {sorted(config_fields(SearchSettings))}") from None
        raise SettingError(key, f"{err['msg']}, got {err.get('input')!r}") from None
    except ValueError as e:
        head = str(e).split(" ", 1)[0].rstrip(":")
        raise SettingError(head if head in config_fields(SearchSettings) else "", str(e)) from None
