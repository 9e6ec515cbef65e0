"""Running a search: the plan, Ray, the studies at once, the leaderboard at the end (``python -m raysd.search``'s
work, :mod:`raysd.search`).

A study is one (machine type, family), or one family over every machine type (:mod:`raysd.plan`). Each study is a
Ray Tune ``Tuner`` with a seeded Optuna searcher (TPE or random, persisted in SQLite under the experiment folder;
none for a grid) and an optional ``ASHAScheduler`` (:mod:`raysd.searchers`), driven by a Ray task
(:mod:`raysd.studies`). Studies run concurrently on the attached cluster, each with its share of the trials the
cluster runs at once. Without a cluster, the search joins raysd's local Ray instance (:mod:`raysd.local_ray`),
which searches started at the same time share.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pandas as pd

from raysd import artifacts, leaderboard, local_ray, searchers, storage, tracking
from raysd.cluster import (
    BOOTSTRAP_CONFIG,
    InfeasibleTrial,
    autoscaler_nodes,
    capacity,
    check_resources,
    cluster_total,
    present_nodes,
    total_resources,
)
from raysd.log import module_logger, setup_logging
from raysd.plan import (
    NoDataError,
    Plan,
    SearchError,
    make_plan,
    print_plan,
    print_plan_without_data,
    resources,
    warm_cache,
)
from raysd.presets import PresetError, load_preset
from raysd.studies import StudyRun, run_study
from raysd.trial import StudyJob

log = module_logger(__name__, __spec__)
ENDED = ("finished", "stopped early", "infeasible", "failed")


def check_storage(experiment: str, shared_fs: bool) -> None:
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and not storage.is_remote(experiment) and not shared_fs:
        raise SearchError(
            f"this Ray cluster has {len(nodes)} nodes, so results need shared storage (S3, GCS or NFS), but the "
            f"storage path {experiment} is a local folder: trials "
            "on other nodes would write their checkpoints and score tables where the leaderboard cannot read them. "
            "Pass --storage-path s3://bucket/path or gs://bucket/path (or an NFS folder mounted on every node, "
            "with --shared-fs).")


@contextlib.contextmanager
def attached_ray():
    """Ray for the search: the cluster already attached (a caller's ``ray.init``), the job's or ``RAY_ADDRESS``'s
    cluster, else raysd's local instance, shared with the other searches on this machine."""
    import ray

    if ray.is_initialized():
        yield
        return
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(address="auto", log_to_driver=True)  # inside `ray job submit` or an explicit cluster
        try:
            yield
        finally:
            ray.shutdown()
        return
    with local_ray.joined():
        ray.init(address="auto", log_to_driver=True, runtime_env={"env_vars": local_ray.worker_env()})
        try:
            yield
        finally:
            ray.shutdown()


def run(args: argparse.Namespace, argv: list[str]) -> int:
    """The search the parsed command line asks for; its exit status (0 ok, 1 trials lost or studies crashed, 2 bad
    input, 130 interrupted)."""
    setup_logging(stream="stdout")
    try:
        preset = load_preset(args.preset)
        for entry in preset.families:
            resources(preset, entry, args)
        epochs = {f: args.epochs or preset.families[f].epochs for f in preset.families}
        try:
            plan = make_plan(preset, args)
        except NoDataError as e:
            if not args.dry_run:
                raise
            print_plan_without_data(preset, args, epochs)
            print(f"note: {e}", file=sys.stderr)
            return 0
    except (PresetError, SearchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_plan(plan, epochs, args)
    if args.dry_run:
        return 0
    if not plan.studies:
        print("error: no study can train on this data (see the lines 'dropped:' above)", file=sys.stderr)
        return 2
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C raises here, whatever a library installed
    try:
        with attached_ray():
            return run_search(plan, args, epochs)
    except (SearchError, InfeasibleTrial, local_ray.LocalRayError, tracking.TrackingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the clean-up
        log.warning(f"interrupted: {finished_summary(plan)}; nothing finished is lost. Resume with: "
                    f"{resume_command(argv)}")
        return 130


def study_slots(plan: Plan, args: argparse.Namespace) -> tuple[dict[str, int], int]:
    """Each study's most trials at once, and the studies run at once. The cluster runs ``slots`` trials of the
    largest kind at once; the studies at once share them, rounded up (Tune queues what does not fit), and a study
    of trials k times smaller gets k times its share. A multi-worker study's share is rounded down: a
    ``TorchTrainer`` that waits for its workers would retry every minute."""
    import ray

    most = autoscaler_nodes()
    total = cluster_total(ray.cluster_resources(), total_resources(most) if most is not None else None)
    if most is not None:
        log.info(f"autoscaling cluster: up to {total['GPU']:g} GPUs and {total['CPU']:g} CPUs ({BOOTSTRAP_CONFIG})")
    fits = {job.study: capacity(job, total) for job in plan.studies}
    slots = min(fits.values())
    at_once = min(args.concurrency or slots, len(plan.studies))
    share = searchers.study_share(slots, at_once)
    out = {}
    for job in plan.studies:
        mine = share if job.workers == 1 else max(1, slots // at_once)
        out[job.study] = searchers.study_concurrency(plan.search(job).search, mine * max(1, fits[job.study] // slots))
    return out, at_once


def run_search(plan: Plan, args: argparse.Namespace, epochs: dict[str, int]) -> int:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    preset = plan.preset
    check_storage(plan.experiment, args.shared_fs)
    tracking.check(args.tracking, plan.experiment)
    if not args.no_resource_check:
        check_resources(plan.studies, present_nodes(), autoscaler_nodes())
    if not storage.is_remote(plan.experiment):
        Path(plan.experiment).mkdir(parents=True, exist_ok=True)
    storage.write_json(storage.join(plan.experiment, artifacts.EXPERIMENT_FILE), {
        "preset": preset.name, "preset_path": str(preset.path), "rule": preset.rule, "metric": preset.metric,
        "mode": preset.mode, "data_root": str(plan.data_root), "layout": plan.layout,
        "studies": [s.study for s in plan.studies], "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "epochs": {s.study: epochs[s.search_entry] for s in plan.studies},
        "study_types": {s.study: list(s.machine_types) for s in plan.studies if s.machine_types},
        "study_scopes": {s.study: s.scope for s in plan.studies if s.scope != "machine_type"}})
    warm_cache(plan)
    per_study, at_once = study_slots(plan, args)
    seed = args.seed if args.seed is not None else preset.seed
    # the studies' drivers stay on this node: a node lost takes its trials' retries, never a study
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    remote = ray.remote(num_cpus=0, max_retries=0)(run_study).options(scheduling_strategy=here)
    pending = list(plan.studies)
    running: dict[Any, StudyJob] = {}
    summaries, crashed, lost = [], [], []
    finished: list[StudyJob] = []  # studies done in this run: warm starts read their trial records
    t0 = time.time()
    while pending or running:
        while pending and len(running) < at_once:
            job = pending.pop(0)
            search = plan.search(job)
            spec = searchers.SearcherSpec(search.search, preset.metric, preset.mode, plan.trials(job),
                                          epochs[job.search_entry], seed)
            warm = searchers.warm_start(spec, search, plan.experiment, job.study,
                                        [j.study for j in finished if j.search_entry == job.search_entry])
            run = StudyRun(preset, search, plan.num_samples[job.study], epochs[job.search_entry], per_study[job.study],
                           seed, args.optuna_storage, args.resume, warm, tuple(args.tracking))
            running[remote.remote(job, run)] = job
        # a short timeout hands control back to Python every second, so Ctrl-C is acted on while studies run
        done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
        for ref in done:
            job = running.pop(ref)
            try:
                summary = ray.get(ref)
            except Exception as e:  # a study that crashed must not stop the others
                crashed.append(job.study)
                log.error(f"study {job.study} crashed: {e}")
                continue
            summaries.append(summary)
            finished.append(job)
            lost += [f"{job.study}/{t}" for t in summary["lost"]]
            best = summary["best"]
            log.info(f"study {job.study} done: {summary['trials']} trials, {summary['errors']} lost; best "
                     + (f"{preset.metric}={best[preset.metric]:.4f}" if best else "none"))
    log.info(f"{len(summaries)} studies finished in {time.time() - t0:.0f}s; experiment: {plan.experiment}")
    storage.write_json(storage.join(plan.experiment, artifacts.STUDIES_FILE), summaries)
    if not args.no_leaderboard:
        run_leaderboard(plan, args.results_dir or str(Path("results") / preset.name), args.tracking)
    if lost:
        log.error(f"{len(lost)} trial(s) lost after their retries (max_failures {preset.max_failures}): "
                  f"{', '.join(lost)}; their records say why")
    if crashed:
        log.error(f"{len(crashed)} stud(ies) crashed: {', '.join(crashed)}")
    return 1 if lost or crashed else 0


def finished_summary(plan: Plan) -> str:
    """Trials per study that have ended (their record written): what a resumed search will not run again."""
    counts = []
    for job in plan.studies:
        records = storage.list_files(storage.join(plan.experiment, artifacts.TRIALS_DIR, job.study), ".json")
        done = 0
        for f in records:
            with contextlib.suppress(OSError, ValueError):
                done += artifacts.read_trial_record(f).status in ENDED
        counts.append(f"{job.study} {done}/{plan.trials(job)}")
    return "trials done per study: " + ", ".join(counts)


def resume_command(argv: list[str]) -> str:
    return shlex.join(["python", "-m", "raysd.search", *argv, *([] if "--resume" in argv else ["--resume"])])


def run_leaderboard(plan: Plan, out: str, trackers: tuple[str, ...] | list[str] = ()) -> None:
    """Build the reports (and give the trackers their figures); a failure here is reported but never loses the
    finished search."""
    try:
        rc = leaderboard.main([plan.experiment, "--out", out])
        if rc == 0 and "mlflow" in trackers:
            runs = tracking.log_figures(plan.experiment, pd.read_csv(Path(out) / "leaderboard.csv",
                                                                     dtype={"trial_id": str}))
            log.info(f"MLflow: report-half and test figures logged to {runs} run(s) ({tracking.mlflow_uri(plan.experiment)})")
    except Exception as e:  # the trials and their score tables are safe in the experiment folder
        log.error(f"leaderboard failed ({type(e).__name__}: {e}); rerun it with: "
                  f"python -m raysd.leaderboard {plan.experiment} --out {out}")
        return
    if rc == 0:
        log.info(f"reports written to {out}")
