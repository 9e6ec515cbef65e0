"""A study's sampler, searcher, scheduler and warm start, built from its search settings.

:func:`raysd.search.build_tuner` and the search benchmark (``benchmarks/search_efficiency.py``, which replays
searches on recorded learning curves) build these objects through the same functions, so the benchmark
measures the search the presets run. The settings and their defaults are documented in
:mod:`raysd.search_settings`.

Warm start: a study of a family entry may begin with the best configurations that finished studies of the same
entry found on other machine types (Optuna enqueues them before its sampler takes over). Studies run
concurrently, so a sibling has usually not finished when a study starts: then there is nothing to start from,
and the study says so in the log.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysd import artifacts, storage
from raysd.log import module_logger
from raysd.paths import default_cache_dir
from raysd.presets import FamilySearch, Scheduler, in_distribution
from raysd.search_settings import SearchSettings
from raysd.tune_optuna import OptunaSearcher

log = module_logger(__name__, __spec__)


@dataclass(frozen=True)
class SearcherSpec:
    """What a study's searcher is built from."""

    settings: SearchSettings
    metric: str
    mode: str  # 'max' or 'min'
    num_samples: int  # the study's trials: sizes TPE's start-up
    epochs: int  # a trial's epochs: a trial that ends before them was stopped early
    seed: int = 0


def make_sampler(settings: SearchSettings, num_samples: int, seed: int):
    """The Optuna sampler of a study of ``num_samples`` trials (``None`` for a grid, which has no searcher)."""
    import optuna

    if settings.algorithm == "grid":
        return None
    if settings.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.algorithm == "tpe_default":
        return optuna.samplers.TPESampler(seed=seed)
    if settings.algorithm == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=settings.startup_trials(num_samples))
    if settings.algorithm == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=settings.startup_trials(num_samples),
                                            warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.startup_trials(num_samples),
                                      multivariate=settings.multivariate, constant_liar=settings.constant_liar)


def some_points(points: list[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` of ``points`` in a seeded random order (each once while there are enough, then round again)."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(len(points))
    return [points[int(order[i % len(points)])] for i in range(n)]


def param_space(search: FamilySearch, epochs: int) -> dict[str, Any]:
    """The Ray Tune ``param_space`` of a study: its fixed values and ``epochs``; a grid's choices (and the seeds of
    repeats) as ``grid_search``. The searched keys of an Optuna search are the searcher's to fill in."""
    from ray import tune

    out: dict[str, Any] = {k: v for k, v in search.space.items() if not isinstance(v, dict)}
    if search.search.algorithm == "grid":
        out.update({k: tune.grid_search(list(v["choice"])) for k, v in search.space.items() if isinstance(v, dict)})
    if search.repeats > 1:
        out["seed"] = tune.grid_search(search.seeds())
    out["epochs"] = epochs
    return out


def make_searcher(spec: SearcherSpec, study_name: str, space: dict[str, Any], storage_url: str | None = None,
                  points: Sequence[dict[str, Any]] = ()) -> OptunaSearcher | None:
    """The study's Optuna searcher over the searched keys of a preset ``space`` (``None`` for a grid).
    ``storage_url``: an Optuna storage URL (``None``: in memory); ``points``: complete configurations to evaluate
    first, in order."""
    sampler = make_sampler(spec.settings, spec.num_samples, spec.seed)
    if sampler is None:
        return None
    return OptunaSearcher(space, spec.metric, spec.mode, study_name, storage_url, sampler, points,
                          epochs=spec.epochs, stopped_as_pruned=spec.settings.stopped_trials == "pruned")


def optuna_storage_url(experiment: str, study: str, override: str | None) -> str:
    """Where a study's Optuna trials persist: ``override``, else SQLite under the experiment folder (under the
    local cache for an experiment in object storage)."""
    if override:
        return override
    if storage.is_remote(experiment):
        local = default_cache_dir() / artifacts.OPTUNA_DIR / experiment.split("://", 1)[1].replace("/", "_")
    else:
        local = Path(experiment) / artifacts.OPTUNA_DIR
    local.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{local / (study + '.db')}"


def make_scheduler(scheduler: Scheduler, epochs: int):
    """The study's trial scheduler on ``training_iteration`` (one per epoch) up to ``epochs``: ASHA by promotion
    (:class:`raysd.schedulers.PromotionASHA`), Tune's stopping ASHA, HyperBand, or ``None``. Tune hands it the
    metric and mode through ``set_search_properties``."""
    from ray.tune.schedulers import ASHAScheduler, HyperBandScheduler

    if scheduler.type == "promote":
        from raysd.schedulers import PromotionASHA

        return PromotionASHA(time_attr="training_iteration", max_t=epochs,
                             grace_period=min(scheduler.grace_period, epochs),
                             reduction_factor=scheduler.reduction_factor)
    if scheduler.type == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=epochs,
                                  reduction_factor=scheduler.reduction_factor)
    if scheduler.type != "asha":
        return None
    return ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=min(scheduler.grace_period, epochs),
                         reduction_factor=scheduler.reduction_factor)


def study_share(capacity: int, studies_at_once: int) -> int:
    """A study's share of a cluster that runs ``capacity`` trials at once, shared by ``studies_at_once``: rounded
    up, so the studies ask for at least the whole cluster (Ray queues the excess trials) rather than leave slots
    idle (8 slots and 6 studies: 2 each, not 1)."""
    return max(1, math.ceil(capacity / max(1, studies_at_once)))


def study_concurrency(settings: SearchSettings, share: int) -> int:
    """A study's running trials at most: its share of the cluster, under the settings' cap (0: no cap)."""
    cap = settings.max_concurrent_per_study
    return min(share, cap) if cap else share


def warm_start_points(results: Iterable[tuple[dict[str, Any], float]], space: dict[str, Any], n: int,
                      mode: str) -> list[dict[str, Any]]:
    """The ``n`` best distinct configurations among ``(params, value)`` results, best first, as points of
    ``space`` (its searched keys only). A result missing a searched key, with a value the space cannot draw
    (e.g. from an older version of the preset), or without a finite value is skipped; ties keep the given order."""
    searched = {k: v for k, v in space.items() if isinstance(v, dict)}
    sign = -1.0 if mode == "max" else 1.0
    ranked = []
    for i, (params, value) in enumerate(results):
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not searched.keys() <= params.keys():
            continue
        fits = [in_distribution(entry, params[k]) for k, entry in searched.items()]
        if all(ok for ok, _ in fits):
            ranked.append((sign * value, i, {k: v for k, (_, v) in zip(searched, fits)}))
    points: list[dict[str, Any]] = []
    for _, _, point in sorted(ranked, key=lambda r: r[:2]):
        if point not in points:
            points.append(point)
    return points[:n]


def finished_results(experiment: str, studies: Iterable[str], metric: str) -> list[tuple[dict[str, Any], float]]:
    """``(params, metric)`` of every trial of ``studies`` that ran to its last epoch, from the trial records (the
    trials a leaderboard ranks: one stopped early writes none)."""
    out = []
    for study in studies:
        for f in storage.list_files(storage.join(experiment, artifacts.TRIALS_DIR, study), ".json"):
            rec = artifacts.read_trial_record(f)
            if rec.status == "finished" and metric in (rec.metrics or {}):
                out.append((rec.params, (rec.metrics or {})[metric]))
    return out


def warm_start(spec: SearcherSpec, search: FamilySearch, experiment: str, study: str,
               siblings: Sequence[str]) -> list[dict[str, Any]]:
    """The configurations a study of ``search`` starts from: the best of its finished ``siblings`` (studies of the
    same entry on other machine types), as many as ``warm_start`` allows and the trials left after the entry's
    ``points_to_evaluate`` leave room for."""
    room = min(spec.settings.warm_start, spec.num_samples - len(search.points_to_evaluate))
    if room <= 0 or not search.searched or not spec.settings.optuna:
        return []
    if not siblings:
        log.info(f"{study}: no finished sibling study of '{search.entry}' yet: no warm start")
        return []
    found = warm_start_points(finished_results(experiment, siblings, spec.metric), search.space,
                              room + len(search.points_to_evaluate), spec.mode)
    points = [p for p in found if p not in search.points_to_evaluate][:room]
    log.info(f"{study}: warm start with {len(points)} configuration(s) from {', '.join(siblings)}")
    return points
