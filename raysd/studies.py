"""A study's driver: one Ray Tune ``Tuner`` over the study's trials, run as a Ray task beside the other studies.

The study's trainable is :func:`raysd.trial.run_trial` with the study's :class:`~raysd.trial.StudyJob` bound by
``tune.with_parameters``, registered under a name of its own (Tune keeps trainables cluster-wide by name, and
studies run at once). It holds a trial's resources: a single worker's CPUs and GPU share, so the trial trains in
that process and the next trial of the study reuses it (``reuse_actors``); or a token CPU share for the driver of a
multi-worker trial, whose ``TorchTrainer`` asks for its workers itself. Tune retries a trial that raised (a dead
worker, a lost node) up to the preset's ``max_failures``, from its last checkpoint, on any node.

When a trial ends, :class:`TrialRecorder` writes its record (:class:`raysd.artifacts.TrialRecord`) from its last
report: the one raysd record of a trial, whatever ended it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from raysd import artifacts, searchers, storage, tracking
from raysd.cluster import trainable_resources
from raysd.log import module_logger, setup_logging
from raysd.presets import FamilySearch, Preset
from raysd.trial import StudyJob, run_trial

log = module_logger(__name__, __spec__)


def trainable_name(job: StudyJob) -> str:
    """The study's trainable's name, unique within a search (one Ray job)."""
    return f"raysd:{job.study}"


def register(job: StudyJob) -> str:
    """Register the study's trainable with Tune; returns its name."""
    from ray import tune

    res = trainable_resources(job)
    trainable = tune.with_resources(tune.with_parameters(run_trial, job=job),
                                    {"cpu": res["CPU"], **({"gpu": res["GPU"]} if res["GPU"] else {})})
    tune.register_trainable(trainable_name(job), trainable)
    return trainable_name(job)


def trial_record(job: StudyJob, trial: Any, epochs: int, error: str | None = None) -> artifacts.TrialRecord:
    """A trial's record from what Tune hands a callback: its config, last report and checkpoint."""
    last = dict(trial.last_result or {})
    ckpt = last.get("checkpoint_path") or (trial.checkpoint.path if trial.checkpoint is not None else None)
    record = artifacts.TrialRecord(
        study=job.study, family=job.family, machine_type=job.machine_type, trial_id=trial.trial_id,
        params={k: v for k, v in (trial.config or {}).items()}, machine_types=list(job.machine_types) or None,
        scope=job.scope if job.scope != "machine_type" else None, workers=job.workers, gpus=job.gpus)
    return record.ended(last, epochs, storage.within(job.experiment, ckpt), error)


def trial_callbacks(job: StudyJob, metric: str, epochs: int) -> list:
    """Tune callbacks of a study: one log line per ended trial, and its record."""
    from ray.tune import Callback

    class TrialRecorder(Callback):
        def __init__(self) -> None:
            # runs in the study's Ray task, whose stdout Ray forwards to the driver; Ray's own handler on the root
            # logger would print each line a second time
            setup_logging(stream="stdout").propagate = False

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            record = trial_record(job, trial, epochs)
            record.write(job.experiment)
            value = (record.metrics or {}).get(metric)
            shown = f"{metric}={value:.4f}" if isinstance(value, float) and value == value else record.reason or ""
            log.info(f"{job.study} trial {trial.trial_id} {record.status}" + (f": {shown}" if shown else ""))

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            error = trial.get_error() or "Ray Tune ended it with an error"
            text = str(error).strip().splitlines()
            reason = f"lost after {job.max_failures} retr{'y' if job.max_failures == 1 else 'ies'}: " + (
                text[-1][:500] if text else "")
            trial_record(job, trial, epochs, reason).write(job.experiment)
            log.warning(f"{job.study} trial {trial.trial_id} failed: {reason}")

    return [TrialRecorder()]


@dataclasses.dataclass
class StudyRun:
    """How a study searches, besides its job: the preset, its (narrowed) search and the driver's settings."""

    preset: Preset
    search: FamilySearch
    num_samples: int | None  # trials of the study when the command line says (else the entry's budget)
    epochs: int
    max_concurrent: int  # the study's most trials at once
    seed: int
    optuna_url: str | None = None  # an Optuna storage URL (default: SQLite under the experiment)
    resume: bool = False
    warm_points: list[dict] | None = None  # finished sibling studies' best configurations (searchers.warm_start)
    trackers: tuple[str, ...] = ()  # --tracking (raysd.tracking)


def tune_config(job: StudyJob, run: StudyRun):
    """The study's ``param_space`` and ``TuneConfig``: its searcher (none for a grid or a fixed space), the
    preset's scheduler (not for repeats: every seed trains to the end), its trials and its share of the cluster."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator

    search, preset = run.search, run.preset
    trials = search.trials(run.num_samples)
    searcher: Any = None
    space = searchers.param_space(search, run.epochs)
    tune_samples = run.num_samples or search.num_samples  # Tune repeats a grid this many times
    if search.searched and search.search.optuna:
        spec = searchers.SearcherSpec(search.search, preset.metric, preset.mode, trials, run.epochs, run.seed)
        url = searchers.optuna_storage_url(job.experiment, job.study, run.optuna_url)
        searcher = searchers.make_searcher(spec, job.study, search.space, url,
                                           [*search.points_to_evaluate, *(run.warm_points or [])])
    elif run.num_samples and search.grid_points():  # trials per study: that many points of the grid, in a seeded order
        points = searchers.some_points(search.grid_points(), run.num_samples, run.seed)
        space = {k: v for k, v in space.items() if not (isinstance(v, dict) and "grid_search" in v)}
        searcher = BasicVariantGenerator(points_to_evaluate=points)
        tune_samples = len(points)
    scheduler = searchers.make_scheduler(preset.scheduler, run.epochs) if search.repeats == 1 else None
    return space, tune.TuneConfig(
        metric=preset.metric, mode=preset.mode, search_alg=searcher, scheduler=scheduler, num_samples=tune_samples,
        reuse_actors=job.workers == 1, max_concurrent_trials=searchers.study_concurrency(search.search, run.max_concurrent))


def build_tuner(job: StudyJob, run: StudyRun):
    """The study's ``Tuner``, restored from the experiment when resuming one that has its state."""
    from ray import tune

    name = register(job)
    study_path = storage.join(job.experiment, artifacts.STUDIES_DIR, job.study)
    if run.resume and tune.Tuner.can_restore(study_path):
        return tune.Tuner.restore(study_path, trainable=name, resume_unfinished=True, resume_errored=False,
                                  restart_errored=False)
    space, config = tune_config(job, run)
    return tune.Tuner(
        name, param_space=space, tune_config=config,
        run_config=tune.RunConfig(name=job.study, storage_path=storage.join(job.experiment, artifacts.STUDIES_DIR),
                                  failure_config=tune.FailureConfig(max_failures=job.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                                  callbacks=[*trial_callbacks(job, run.preset.metric, run.epochs),
                                             *tracking.callbacks(list(run.trackers), job.experiment, job.study)],
                                  verbose=0),
    )


def run_study(job: StudyJob, run: StudyRun) -> dict:
    """Run (or resume) one study to completion; returns its best trial and the trials it lost."""
    grid = build_tuner(job, run).fit()
    metric, mode = run.preset.metric, run.preset.mode
    finished = [r for r in grid if r.error is None and r.metrics and isinstance(r.metrics.get(metric), float)
                and r.metrics[metric] == r.metrics[metric]]
    best = None
    if finished:
        pick = (max if mode == "max" else min)(finished, key=lambda r: r.metrics[metric])
        best = {"trial_id": pick.metrics.get("trial_id"), metric: pick.metrics[metric], "config": pick.config}
    lost = [str((r.metrics or {}).get("trial_id") or r.path) for r in grid if r.error is not None]
    return {"study": job.study, "trials": len(grid), "errors": len(lost), "lost": lost, "best": best}
