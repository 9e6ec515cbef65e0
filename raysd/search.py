"""``python -m raysd.search PRESET``: every study of a preset, searched with Ray Tune + Optuna, each trial a
Ray Train ``TorchTrainer``.

A study is one (machine type, family), or one family over every machine type: when the family's scope is
``dataset`` (one model for all types), or in a ``first_shot`` preset (one model per type, one configuration
for all); :meth:`raysd.presets.Preset.study_units` cuts them from what each family declares, never from its name.

One study = one ``Tuner`` with a seeded ``OptunaSearch`` (TPE or random, persisted in SQLite under the experiment
folder; none for a grid) and an optional ``ASHAScheduler``, built by :mod:`raysd.searchers` from the preset's
search settings. Studies run concurrently as Ray tasks on the attached
cluster, each with its share of the trials in flight: the trials the cluster runs at once plus
``--queued-trials``, whose drivers start while a slot is busy and whose workers wait for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raysd import artifacts, leaderboard, searchers, storage
from raysd.cluster import (
    BOOTSTRAP_CONFIG,
    DRIVER_CPU,
    InfeasibleTrial,
    autoscaler_nodes,
    check_resources,
    cluster_capacity,
    present_nodes,
    total_resources,
)
from raysd.data import synth
from raysd.data.catalog import Catalog
from raysd.data.heldout import HeldoutConfig, assign
from raysd.data.store import FeatureStore
from raysd.families.hparams import make_config
from raysd.log import module_logger, setup_logging
from raysd.paths import default_cache_dir
from raysd.presets import Preset, PresetError, Resources, load_preset, tune_space
from raysd.trial import StudyJob, ended_run, run_trial

log = module_logger(__name__, __spec__)


class SearchError(RuntimeError):
    """A search that cannot start, with what to do about it."""


class NoDataError(SearchError):
    """A preset for real data was run without a data root."""


@dataclass
class Plan:
    preset: Preset
    experiment: str
    data_root: Path
    layout: str
    catalog: Any
    studies: list[StudyJob]
    num_samples: dict[str, int]

    def trials(self, job: StudyJob) -> int:
        """Trials of one study: Tune's ``num_samples`` times the entry's repeats."""
        return self.preset.families[job.search_entry].trials(self.num_samples[job.study])

    def trials_total(self) -> int:
        return sum(self.trials(s) for s in self.studies)


def resolve_data(preset: Preset, data_root: str | None, cache_dir: Path, quiet: bool = False) -> Path:
    root = preset.data_root(data_root)
    if root is not None:
        if not root.exists():
            raise SearchError(f"data root {root} does not exist")
        return root
    synthetic = preset.dataset.get("synthetic")
    if not synthetic:
        env = preset.dataset.get("root_env", "a data root")
        raise NoDataError(
            f"preset '{preset.name}' needs real data: pass --data-root DIR or set {env}.\n"
            f"  Download it with: python -m raysd.data.download {preset.dataset.get('download', preset.name)} --dest DIR "
            f"(it prints the --data-root to pass)\n"
            f"  Or try the whole loop on synthetic machine sounds first: python -m raysd.search demo")
    seed = int(preset.dataset.get("synthetic_seed", 0))
    layout = preset.dataset.get("synthetic_layout", "dcase2020")
    out = cache_dir / "synthetic" / f"{synthetic}-{layout}-seed{seed}"
    if not quiet:
        done = (out / "synth_config.json").exists()
        log.info(f"no data root given: {'using' if done else 'generating'} synthetic machine sounds "
                 f"(preset '{synthetic}') in {out}")
    return synth.generate(out, preset=synthetic, seed=seed, layout=layout)  # returns at once when complete


def make_plan(preset: Preset, args: argparse.Namespace) -> Plan:
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    root = resolve_data(preset, args.data_root, cache_dir)
    catalog = Catalog.scan(root, clip_seconds=preset.features.clip_seconds,
                           layout=preset.dataset.get("layout") if preset.dataset.get("layout") != "auto" else None)
    found = catalog.machine_types
    wanted = args.machine_types or preset.machine_types or found
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise SearchError(f"machine type(s) {missing} not found in {root}; found: {found}")
    families = args.families or list(preset.families)
    unknown = sorted(set(families) - set(preset.families))
    if unknown:
        raise SearchError(f"famil(ies) {unknown} are not in preset {preset.path}; it searches: {list(preset.families)}")
    study_table = None
    if preset.heldout:
        study_table = assign(catalog.table, make_config(HeldoutConfig, preset.heldout, f"{preset.path}: heldout"))
    experiment = experiment_path(preset, args)
    res = resources(preset, args)
    studies, num_samples = [], {}
    for fam, mt, types, scope in preset.study_units(families, wanted):
        name = f"{mt.replace('/', '-')}__{fam}"
        studies.append(StudyJob(
            study=name, family=preset.families[fam].family, entry=fam, machine_type=mt, catalog=catalog.table, data_root=str(root),
            layout=catalog.layout, spec=preset.features.to_dict(), rule=preset.rule, metric=preset.metric,
            cache_dir=str(cache_dir), experiment=experiment, workers=res.workers,
            use_gpu=res.use_gpu, cpus_per_worker=res.cpus_per_worker, gpus_per_worker=res.gpus_per_worker,
            max_failures=preset.max_failures, study_table=study_table, machine_types=types, scope=scope))
        num_samples[name] = args.num_samples or preset.families[fam].num_samples
    return Plan(preset, experiment, root, catalog.layout, catalog, studies, num_samples)


def experiment_path(preset: Preset, args: argparse.Namespace) -> str:
    """The experiment's folder or URI; a local path is made absolute (Ray Tune's storage needs one)."""
    base = args.storage_path or "experiments"
    if not storage.is_remote(base):
        base = str(Path(base).expanduser().resolve())
    return storage.join(base, args.name or preset.name)


def resources(preset: Preset, args: argparse.Namespace) -> Resources:
    """The preset's resources per trial with the command line's overrides."""
    res = dataclasses.replace(preset.resources, **{k: v for k, v in (
        ("workers", args.workers), ("cpus_per_worker", args.cpus_per_worker),
        ("gpus_per_worker", args.gpus_per_worker)) if v is not None})
    if res.workers < 1 or res.cpus_per_worker <= 0 or res.gpus_per_worker < 0:
        raise SearchError(f"invalid resources per trial: {res.workers} worker(s) x {res.cpus_per_worker:g} CPU "
                          f"+ {res.gpus_per_worker:g} GPU (--workers >= 1, --cpus-per-worker > 0, --gpus-per-worker >= 0)")
    if res.workers > 1 and 0 < res.gpus_per_worker < 1:
        raise SearchError("fractional --gpus-per-worker is only allowed for single-worker trials (DDP needs whole GPUs)")
    return res


def per_trial_text(res: Resources) -> str:
    return f"{res.workers} worker(s) x {res.cpus_per_worker:g} CPU" + (f" + {res.gpus_per_worker:g} GPU" if res.use_gpu else "")


def print_plan(plan: Plan, epochs: dict[str, int], res: Resources) -> None:
    print(f"preset {plan.preset.name} ({plan.preset.path}); data {plan.data_root} [{plan.layout}], "
          f"{len(plan.catalog.table)} clips; experiment {plan.experiment}")
    print(f"metric {plan.preset.metric} ({plan.preset.mode}), rule {plan.preset.rule}, scheduler {plan.preset.scheduler.type}")
    print(f"{'study':40s} {'scope':12s} {'trials':>6s} {'epochs':>6s} {'search':11s}  resources per trial")
    for s in plan.studies:
        search = plan.preset.families[s.search_entry].search.algorithm
        print(f"{s.study:40s} {s.scope:12s} {plan.trials(s):6d} {epochs[s.search_entry]:6d} {search:11s}  {per_trial_text(res)}"
              + (f"  (machine types: {', '.join(s.machine_types)})" if s.machine_types else ""))
    print(f"total: {len(plan.studies)} studies, {plan.trials_total()} trials")


def print_plan_without_data(preset: Preset, args: argparse.Namespace, epochs: dict[str, int], res: Resources) -> None:
    """The part of the plan a preset fixes; the machine types, and so the studies, come from the data."""
    families = args.families or list(preset.families)
    types = args.machine_types or preset.machine_types
    print(f"preset {preset.name} ({preset.path}); no data root: the machine types come from the data "
          + (f"(only {', '.join(types)})" if types else "(every type found there)")
          + "; one study per machine type and family, or per family for scope dataset")
    print(f"metric {preset.metric} ({preset.mode}), rule {preset.rule}, scheduler {preset.scheduler.type}; "
          f"experiment {experiment_path(preset, args)}")
    print(f"{'family':40s} {'scope':12s} {'trials':>6s} {'epochs':>6s} {'search':11s}  resources per trial")
    for fam in families:
        trials, search = preset.families[fam].trials(args.num_samples), preset.families[fam].search.algorithm
        print(f"{fam:40s} {preset.study_scope(fam):12s} {trials:6d} {epochs[fam]:6d} {search:11s}  {per_trial_text(res)}")


def feature_specs(plan: Plan) -> list:
    specs: list = []
    for fam in sorted({s.search_entry for s in plan.studies}):
        view = plan.preset.example_view(fam)
        for crop in plan.preset.crops(fam):
            spec = plan.preset.features.with_crop(crop)
            specs.extend(s for s in (spec, *view.extra_specs(spec)) if s not in specs)
    return specs


def warm_cache(plan: Plan) -> None:
    """Fill the feature cache once for every crop variant and extra feature the preset asks for, before trials start."""
    for spec in feature_specs(plan):
        t0 = time.perf_counter()
        store = FeatureStore.open(plan.catalog, spec, plan.studies[0].cache_dir)
        log.info(f"features {spec.key()} ({spec.describe()}): "
                 f"{len(plan.catalog.table)} clips ready in {time.perf_counter() - t0:.1f}s"
                 + (f", {len(store.failed)} unreadable clip(s) skipped" if getattr(store, "failed", None) else ""))


def study_trainable(job: StudyJob):
    """The study's Tune function trainable, under a name unique to (experiment, study).

    Tune registers trainables cluster-wide by name; studies running concurrently must not share one,
    or a trial could pick up another study's job."""
    import hashlib
    import re

    def trainable(params: dict) -> None:
        run_trial(params, job)

    tag = hashlib.sha1(job.experiment.encode()).hexdigest()[:8]
    trainable.__name__ = trainable.__qualname__ = f"raysd_{tag}_{re.sub(r'[^A-Za-z0-9_]', '_', job.study)}"
    return trainable


def trial_line_callback(study: str, metric: str):
    """A Tune callback printing one line per finished or failed trial with its metric."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def __init__(self, study: str, metric: str):
            self.study, self.metric = study, metric
            setup_logging(stream="stdout")  # runs in the study's Ray task; Ray forwards its stdout to the driver

        def on_trial_complete(self, iteration, trials, trial, **info):
            value = (trial.last_result or {}).get(self.metric)
            shown = f"{value:.4f}" if isinstance(value, (int, float)) else "n/a"
            log.info(f"{self.study} trial {trial.trial_id} finished: {self.metric}={shown}")

        def on_trial_error(self, iteration, trials, trial, **info):
            log.warning(f"{self.study} trial {trial.trial_id} failed (reason in trials/{self.study}/{trial.trial_id}.json)")

    return TrialLines(study, metric)


def build_tuner(job: StudyJob, preset: Preset, num_samples: int, epochs: int, max_concurrent: int,
                seed: int, optuna_url: str | None, resume: bool, warm_points: list[dict] | None = None):
    """The study's ``Tuner`` (restored when resuming); ``warm_points``: configurations of finished sibling studies
    to evaluate after the entry's ``points_to_evaluate`` (:func:`raysd.searchers.warm_start`)."""
    import optuna
    import ray.tune
    from ray import tune

    # The trial function only drives a TorchTrainer and sleeps while its workers train; Tune refuses an
    # empty request, so it holds a token CPU share (see init_ray for the local case).
    trainable = tune.with_resources(study_trainable(job), {"cpu": DRIVER_CPU})
    study_path = storage.join(job.experiment, artifacts.STUDIES_DIR, job.study)
    if resume and ray.tune.Tuner.can_restore(study_path):
        return ray.tune.Tuner.restore(study_path, trainable=trainable, resume_unfinished=True,
                                      resume_errored=False, restart_errored=False)
    search = preset.families[job.search_entry]
    space = tune_space(search)
    space["epochs"] = epochs
    searcher = None  # every value fixed (Tune repeats the configuration, e.g. a seed grid), or a grid search
    if search.searched and search.search.optuna:
        spec = searchers.SearcherSpec(search.search, preset.metric, preset.mode, num_samples, epochs, seed)
        storage_ = optuna.storages.RDBStorage(searchers.optuna_storage_url(job.experiment, job.study, optuna_url))
        searcher = searchers.make_searcher(spec, job.study, storage_, [*search.points_to_evaluate, *(warm_points or [])])
    # repeats: every seed trains to the end
    scheduler = searchers.make_scheduler(preset.scheduler, epochs) if search.repeats == 1 else None
    return ray.tune.Tuner(
        trainable, param_space=space,
        tune_config=ray.tune.TuneConfig(metric=preset.metric, mode=preset.mode, search_alg=searcher,
                                        scheduler=scheduler, num_samples=num_samples,
                                        max_concurrent_trials=searchers.study_concurrency(search.search, max_concurrent)),
        run_config=ray.tune.RunConfig(name=job.study, storage_path=storage.join(job.experiment, artifacts.STUDIES_DIR),
                                      failure_config=ray.tune.FailureConfig(max_failures=0),
                                      callbacks=[trial_line_callback(job.study, preset.metric)], verbose=1),
    )


def run_study(job: StudyJob, preset: Preset, num_samples: int, epochs: int, max_concurrent: int, seed: int,
              optuna_url: str | None, resume: bool, warm_points: list[dict] | None = None) -> dict:
    """Run (or resume) one study to completion; returns its best trial."""
    tuner = build_tuner(job, preset, num_samples, epochs, max_concurrent, seed, optuna_url, resume, warm_points)
    grid = tuner.fit()
    finished = [r for r in grid if r.error is None and r.metrics and preset.metric in r.metrics]
    best = None
    if finished:
        pick = (max if preset.mode == "max" else min)(finished, key=lambda r: r.metrics[preset.metric])
        best = {"trial_id": pick.metrics.get("trial_id"), preset.metric: pick.metrics[preset.metric],
                "config": pick.config}
    return {"study": job.study, "trials": len(grid), "errors": sum(r.error is not None for r in grid), "best": best}


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


def init_ray() -> bool:
    """Attach to the job's cluster, or start a local instance; True when this call started one."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_JOB_ID"):
        ray.init(address="auto", log_to_driver=True)  # inside `ray job submit` or an explicit cluster
        return False
    else:
        # One extra logical CPU holds the trial drivers' token shares, so trials whose workers take every
        # core can still start. The dashboard (on 127.0.0.1) serves the State API, through which Ray Train
        # frees the workers' placement group of a trial that Tune stops early (ASHA) or kills.
        ray.init(address="local", include_dashboard=True, log_to_driver=True, num_cpus=(os.cpu_count() or 1) + 1)
        return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m raysd.search", description=__doc__.split("\n\n")[0])
    p.add_argument("preset", help="preset name in search_spaces/ (demo, dcase20, dcase21, dcase23, birdaudio) or a YAML path")
    p.add_argument("--data-root", help="data set root (default: the preset's, or its environment variable)")
    p.add_argument("--machine-types", nargs="+", help="only these machine types")
    p.add_argument("--families", nargs="+", help="only these model families")
    p.add_argument("--num-samples", type=int, help="trials per study (overrides the preset)")
    p.add_argument("--epochs", type=int, help="epochs per trial (overrides the preset)")
    p.add_argument("--workers", type=int, help="DDP workers per trial (overrides the preset)")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per DDP worker (overrides the preset)")
    p.add_argument("--gpus-per-worker", type=float,
                   help="GPUs per DDP worker (overrides the preset; 0 trains on CPU, e.g. a laptop without a GPU)")
    p.add_argument("--no-resource-check", action="store_true",
                   help="start even if no node can hold a trial's workers (wait for nodes added by other means)")
    p.add_argument("--storage-path", help="where experiments go: a folder, s3://... or gs://... (default ./experiments)")
    p.add_argument("--name", help="experiment name (default: the preset name)")
    p.add_argument("--cache-dir", help="feature cache and synthetic data (default $RAYSD_CACHE or ~/.cache/raysd)")
    p.add_argument("--optuna-storage", help="Optuna storage URL (default: SQLite files in the experiment folder)")
    p.add_argument("--concurrency", type=int, help="max studies running at once (default: the trials in flight)")
    p.add_argument("--queued-trials", type=int, default=1, metavar="N",
                   help="trials started beyond what the cluster runs at once; their drivers and Train controllers "
                        "start while the running trials train, their workers when a slot frees (default 1; 0: none)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted experiment of the same name")
    p.add_argument("--dry-run", action="store_true", help="print the studies and trial counts, run nothing")
    p.add_argument("--seed", type=int, help="Optuna sampler seed (overrides the preset)")
    p.add_argument("--shared-fs", action="store_true", help="the local storage path is shared by every node (NFS)")
    p.add_argument("--results-dir", help="where the leaderboard's reports go (default results/<preset>)")
    p.add_argument("--no-leaderboard", action="store_true", help="do not build the leaderboard at the end")
    args = p.parse_args(argv)
    if args.queued_trials < 0:
        p.error(f"--queued-trials must be 0 or more, got {args.queued_trials}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    setup_logging(stream="stdout")
    try:
        preset = load_preset(args.preset)
        res = resources(preset, args)
        epochs = {f: args.epochs or preset.families[f].epochs for f in preset.families}
        try:
            plan = make_plan(preset, args)
        except NoDataError as e:
            if not args.dry_run:
                raise
            print_plan_without_data(preset, args, epochs, res)
            print(f"note: {e}", file=sys.stderr)
            return 0
    except (PresetError, SearchError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_plan(plan, epochs, res)
    if args.dry_run:
        return 0
    started_ray = False
    try:
        started_ray = init_ray()
        return run_search(plan, args, epochs)
    except (SearchError, InfeasibleTrial) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not break the clean-up
        log.warning(f"interrupted: {finished_summary(plan)}; nothing finished is lost. Resume with: "
                    f"{resume_command(argv)}")
        return 130
    finally:
        if started_ray:
            import ray

            ray.shutdown()


def run_search(plan: Plan, args: argparse.Namespace, epochs: dict[str, int]) -> int:
    import ray

    preset = plan.preset
    check_storage(plan.experiment, args.shared_fs)
    most = autoscaler_nodes()
    if not args.no_resource_check:
        check_resources(plan.studies, present_nodes(), most)
    if not storage.is_remote(plan.experiment):
        Path(plan.experiment).mkdir(parents=True, exist_ok=True)
    storage.write_json(storage.join(plan.experiment, artifacts.EXPERIMENT_FILE), {
        "preset": preset.name, "preset_path": str(preset.path), "rule": preset.rule, "metric": preset.metric,
        "mode": preset.mode, "data_root": str(plan.data_root), "layout": plan.layout,
        "studies": [s.study for s in plan.studies], "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "study_types": {s.study: list(s.machine_types) for s in plan.studies if s.machine_types},
        "study_scopes": {s.study: s.scope for s in plan.studies if s.scope != "machine_type"}})
    warm_cache(plan)

    most_total = total_resources(most) if most is not None else None
    capacity = cluster_capacity(plan.studies, ray.cluster_resources(), most_total)
    if most_total is not None:
        log.info(f"autoscaling cluster: up to {most_total['GPU']:g} GPUs and {most_total['CPU']:g} CPUs "
                 f"({BOOTSTRAP_CONFIG}); up to {capacity} trials at once")
    in_flight = capacity + args.queued_trials  # the queued ones start their drivers while slots are busy
    concurrency = args.concurrency or in_flight
    share = searchers.study_share(in_flight, min(concurrency, len(plan.studies)))
    seed = args.seed if args.seed is not None else preset.seed
    remote = ray.remote(num_cpus=0)(run_study)
    pending = list(plan.studies)
    running: dict[Any, StudyJob] = {}
    slots: dict[Any, int] = {}  # each running study's most trials at once
    summaries, failures = [], []
    finished: list[StudyJob] = []  # studies done in this run: warm starts read their trial records
    t0 = time.time()
    while pending or running:
        while pending and len(running) < concurrency and sum(slots.values()) < in_flight:
            job = pending.pop(0)
            search = preset.families[job.search_entry]
            per_study = searchers.study_concurrency(search.search, share)
            spec = searchers.SearcherSpec(search.search, preset.metric, preset.mode, plan.num_samples[job.study],
                                          epochs[job.search_entry], seed)
            warm = searchers.warm_start(spec, search, plan.experiment, job.study,
                                        [j.study for j in finished if j.search_entry == job.search_entry])
            ref = remote.remote(job, preset, plan.num_samples[job.study], epochs[job.search_entry], per_study, seed,
                                args.optuna_storage, args.resume, warm)
            running[ref], slots[ref] = job, per_study
        done, _ = ray.wait(list(running), num_returns=1)
        for ref in done:
            job = running.pop(ref)
            slots.pop(ref)
            try:
                summary = ray.get(ref)
                summaries.append(summary)
                finished.append(job)
                best = summary["best"]
                log.info(f"study {job.study} done: {summary['trials']} trials, {summary['errors']} failed; best "
                         + (f"{preset.metric}={best[preset.metric]:.4f}" if best else "none"))
            except Exception as e:  # a study that crashed must not stop the others
                failures.append((job.study, e))
                log.error(f"study {job.study} crashed: {e}")
    log.info(f"{len(summaries)} studies finished in {time.time() - t0:.0f}s; experiment: {plan.experiment}")
    storage.write_json(storage.join(plan.experiment, artifacts.STUDIES_FILE), summaries)
    if not args.no_leaderboard:
        run_leaderboard(plan, args.results_dir or str(Path("results") / preset.name))
    return 1 if failures else 0


def finished_summary(plan: Plan) -> str:
    """Trials per study whose Train run ended (a final or failure checkpoint in storage): what a resumed
    search will not run again. Trial records are not enough: Tune ends a trial that ASHA stops at its last
    epoch before the trial's driver writes one."""
    counts = []
    for job in plan.studies:
        mark = f"/{artifacts.CHECKPOINT_PREFIX}"
        runs = {f.rsplit(mark, 1)[0] for f in storage.list_files(job.train_storage) if mark in f}
        done = sum(ended_run(run) is not None for run in runs)
        counts.append(f"{job.study} {done}/{plan.trials(job)}")
    return "trials done per study: " + ", ".join(counts)


def resume_command(argv: list[str]) -> str:
    return shlex.join(["python", "-m", "raysd.search", *argv, *([] if "--resume" in argv else ["--resume"])])


def run_leaderboard(plan: Plan, out: str) -> None:
    """Build the reports; a failure here is reported but never loses the finished search."""
    try:
        rc = leaderboard.main([plan.experiment, "--out", out])
    except Exception as e:  # the trials and their score tables are safe in the experiment folder
        log.error(f"leaderboard failed ({type(e).__name__}: {e}); rerun it with: "
                  f"python -m raysd.leaderboard {plan.experiment} --out {out}")
        return
    if rc == 0:
        log.info(f"reports written to {out}")


if __name__ == "__main__":
    sys.exit(main())
