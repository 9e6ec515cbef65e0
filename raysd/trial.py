"""One search trial: a Ray Tune function trainable that launches a Ray Train ``TorchTrainer`` (the
Ray 2.60 Train V2 pattern), and the per-worker loop it runs.

Each epoch the workers train on their shards, score the selection half of the labelled test clips,
and report ``train_loss`` plus the selection metrics with a checkpoint (model, optimiser, epoch).
The last checkpoint also holds the per-clip score tables ``scores_test.csv`` and ``scores_train.csv``
that the leaderboard consumes. ``<experiment>/trials/<study>/<trial_id>.json`` records every trial's
outcome, failed ones included, with the reason.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from raysd import artifacts, storage
from raysd.artifacts import CheckpointInfo, TrialRecord
from raysd.data.catalog import Catalog
from raysd.data.features import FeatureSpec
from raysd.data.store import FeatureStore
from raysd.data.study import FIRST_SHOT, StudyData, load_study
from raysd.data.views import View
from raysd.families.base import create_family
from raysd.families.clips import ClipSet
from raysd.log import module_logger
from raysd.metrics import evaluate, split_half
from raysd.train import EpochStats, Hook, NonFiniteLoss, Trainer, shard_indices

log = module_logger(__name__, __spec__)
TRAIN_POLL_S = "0.5"
SLOT_WAIT_S = "3600"  # how long a trial's workers wait for a slot (a queued trial: a whole trial) before Ray Train asks again
SCORE_COLUMNS = ["file", "machine_type", "section", "domain", "split", "label", "half", "score"]
CLIP_COLUMNS = ["offset", "num_samples", "sample_rate"]  # recordings layout: where each clip lies in its file


class TrialFailed(RuntimeError):
    """A trial that ended without a usable model (e.g. its loss became NaN)."""


@dataclass
class StudyJob:
    """Everything a trial of one study needs, captured by the study's Tune trainable."""

    study: str
    family: str
    machine_type: str  # the one machine type, or 'all' (raysd.data.study.ALL_TYPES) for a study over several
    catalog: pd.DataFrame
    data_root: str
    layout: str
    spec: dict
    rule: str
    metric: str
    cache_dir: str
    experiment: str  # experiment root (local path or s3://, gs://)
    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_failures: int = 2
    study_table: pd.DataFrame | None = None  # catalog rows with held-out / test splits assigned (unlabelled data)
    machine_types: tuple[str, ...] = ()  # the types of a study over several (empty: just machine_type)
    scope: str = "machine_type"  # the family's scope
    entry: str = ""  # the preset's entry under 'families:' that the study searches (default: the family's name)

    @property
    def search_entry(self) -> str:
        return self.entry or self.family

    @property
    def types(self) -> tuple[str, ...]:
        return self.machine_types or (self.machine_type,)

    @property
    def train_storage(self) -> str:
        return artifacts.train_storage(self.experiment, self.study)


def test_half(files: pd.Series) -> np.ndarray:
    return np.array([split_half(f) for f in files], dtype=object)


def selection_metrics(table: pd.DataFrame, rule: str) -> dict[str, float]:
    """sel_auc / sel_pauc (mean over sections) and sel_official (the year's official aggregate)."""
    sel = table[(table["half"] == "selection") & table["label"].notna()]
    if sel.empty or sel["label"].nunique() < 2:
        return {}
    _, official = evaluate(sel, rule=rule)
    return {"sel_auc": float(official["auc"]), "sel_pauc": float(official["pauc"]),
            "sel_official": float(official["score"])}


def _gather(values: Any, world: int) -> list[Any]:
    if world == 1:
        return [values]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, values)
    return out


def distributed_scores(trainer: Trainer, data: ClipSet, rank: int, world: int) -> np.ndarray:
    """Each rank scores every ``world``-th clip; every rank gets the full score vector back."""
    n = len(data)
    idx = torch.arange(rank, n, world)
    part = trainer.score(data if world == 1 else data.subset(idx)) if len(idx) else np.zeros(0)
    parts = _gather(part, world)
    out = np.empty(n)
    for r, p in enumerate(parts):
        out[r::world] = p
    return out


def score_table(rows: pd.DataFrame, scores: np.ndarray) -> pd.DataFrame:
    """Per-clip scores; clips of long recordings also keep where they are (offset, num_samples, sample_rate)."""
    t = rows[["file", "machine_type", "section", "domain", "split", "label"]].reset_index(drop=True).copy()
    t["half"] = test_half(t["file"]) if len(t) else []
    t.loc[t["split"] == "train", "half"] = "train"
    t["score"] = scores
    long = "layout" in rows.columns and bool((rows["layout"] == "recordings").any())
    where = [c for c in CLIP_COLUMNS if c in rows.columns] if long else []
    for c in where:
        t[c] = rows[c].to_numpy()
    return t[SCORE_COLUMNS + where]


def pruned_table(train_rows: pd.DataFrame, pruned: list[tuple[int, int, float]]) -> pd.DataFrame:
    """The training clips that anomaly pruning dropped: file, offset, epoch dropped, score then."""
    rows = train_rows.reset_index(drop=True)
    out = pd.DataFrame(pruned, columns=["epoch", "clip", "score"]).drop_duplicates("clip")
    out.insert(0, "file", rows.loc[out["clip"], "file"].to_numpy())
    out.insert(1, "offset", rows.loc[out["clip"], "offset"].to_numpy())
    return out.drop(columns="clip").sort_values(["epoch", "score"], ascending=[True, False])


def failure_metrics(reason: str, epoch: int) -> dict[str, Any]:
    """A failed trial's last report: the metric keys are NaN (no value) so that Tune accepts it."""
    nan = float("nan")
    return {"epoch": epoch, "failed": reason, "train_loss": nan,
            **{k: nan for k in ("sel_auc", "sel_pauc", "sel_official", "heldout_loss")}}


def ended_run(run_dir: str) -> tuple[dict[str, Any], str] | None:
    """The last report and checkpoint of a Train run that has already ended (finished or failed), read from
    its newest checkpoint in storage; None when there is none or it is not a complete final one."""
    found = artifacts.newest_checkpoint(run_dir)
    if found is None:
        return None
    newest, present = found
    if artifacts.FAILED_FILE in present:
        info = artifacts.read_failure(newest)
        return failure_metrics(info["reason"], info["epoch"]), newest
    if not artifacts.FINAL_FILES <= present:
        return None
    metrics = artifacts.read_checkpoint_info(newest).get("final_metrics")
    return (metrics, newest) if metrics else None


def report_failure(reason: str, epoch: int, rank: int) -> None:
    """End a trial as failed: the reason travels in a checkpoint, the one channel Train V2 hands back to the
    trial driver."""
    import ray.train

    metrics = failure_metrics(reason, epoch)
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            artifacts.write_failure(d, reason, epoch)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


@dataclass
class WorkerData:
    """One worker's view of a study: every training clip, its shard, held-out and test clips on the device."""

    study: StudyData
    spec: FeatureSpec
    train_full: ClipSet
    shard_idx: torch.Tensor
    shard: ClipSet
    heldout: ClipSet | None
    test: ClipSet
    test_rows: pd.DataFrame
    sel_set: ClipSet  # the labelled selection half of the test clips
    sel_rows: pd.DataFrame


def worker_data(job: StudyJob, types: tuple[str, ...], hp_crop: str, view: View, device: torch.device, rank: int,
                world: int, labelling: str = "section") -> WorkerData:
    """Open the feature cache and lay out the clips of ``types`` (one model's data) for one worker."""
    spec = FeatureSpec.from_dict(job.spec).with_crop(hp_crop)
    catalog = Catalog(job.catalog, job.data_root, job.layout)
    store = FeatureStore.open(catalog, spec, job.cache_dir)
    extras = [FeatureStore.open(catalog, s, job.cache_dir) for s in view.extra_specs(spec)]
    if job.study_table is not None:
        catalog = Catalog(job.study_table, job.data_root, job.layout)
    study = load_study(catalog, store, types, labelling, extras)
    if rank == 0:
        part = f" ({types[0]})" if len(types) == 1 and job.scope == FIRST_SHOT else ""
        print(f"{job.study}{part}: {study.class_summary()}", flush=True)  # worker stdout reaches the driver's
    train_full = study.train_set(view).to(device)
    shard_idx = shard_indices(len(train_full), rank, world)
    test = study.test_set(view)
    test_rows = study.test_table.reset_index(drop=True)
    labelled = test_rows["label"].notna().to_numpy()
    halves = test_half(test_rows["file"])
    sel_idx = torch.from_numpy(np.flatnonzero(labelled & (halves == "selection")))
    shard = train_full if world == 1 else train_full.subset(shard_idx)  # one worker: no second copy on the device
    return WorkerData(study, spec, train_full, shard_idx, shard,
                      study.heldout_set(view).to(device) if study.has_heldout else None, test, test_rows,
                      test.subset(sel_idx).to(device), test_rows.iloc[sel_idx.numpy()])


@dataclass
class Part:
    """One model of a trial with its data. A first-shot trial has one per machine type, trained in step with the
    same hyperparameters; any other trial has one."""

    name: str  # the machine type (or the study's machine_type)
    trainer: Trainer
    data: WorkerData


class AgreeAcrossRanks(Hook):
    def __init__(self, world: int):
        self.world = world

    def agree(self, trainer: Trainer, failure: str | None) -> str | None:
        return next((f for f in _gather(failure, self.world) if f), None)  # every rank stops together


class TrialReport:
    """A trial's epoch end on every worker: refit each model's post-training state on the clips no rank pruned,
    score the selection half of every model's clips, and report the metrics over all of them with a checkpoint
    (the last one with the per-clip score tables, written by rank 0 through :mod:`raysd.artifacts`)."""

    def __init__(self, job: StudyJob, params: dict, parts: list[Part], rank: int, world: int, nodes: list[str]):
        self.job, self.params, self.parts = job, params, parts
        self.rank, self.world, self.nodes = rank, world, nodes
        self.t_start = time.perf_counter()
        self.slot_wait = slot_wait_seconds()

    def kept_full(self, part: Part) -> ClipSet:
        """Training clips of every rank that pruning has not dropped (identical on every rank)."""
        dropped = set()
        for ranks_part in _gather([int(part.data.shard_idx[i]) for _, i, _ in part.trainer.pruned], self.world):
            dropped.update(ranks_part)
        if not dropped:
            return part.data.train_full
        keep = torch.tensor([i for i in range(len(part.data.train_full)) if i not in dropped])
        return part.data.train_full.subset(keep)

    def tables(self, part: Part) -> dict[str, pd.DataFrame | None]:
        """The per-clip score tables of one model at the last epoch (rank 0; the other ranks get {})."""
        d, trainer, rank, world = part.data, part.trainer, self.rank, self.world
        pruned_all = [row for p in _gather([(e, int(d.shard_idx[i]), v) for e, i, v in trainer.pruned], world)
                      for row in p]
        test_scores = distributed_scores(trainer, d.test.to(trainer.device), rank, world)
        train_scores = distributed_scores(trainer, d.train_full, rank, world)
        if rank != 0:
            return {}
        return {"test": score_table(d.test_rows, test_scores), "train": score_table(d.study.train_table, train_scores),
                "heldout": score_table(d.study.heldout_table, distributed_scores(trainer, d.heldout, 0, 1))
                if d.heldout is not None else None,
                "pruned": pruned_table(d.study.train_table, pruned_all) if pruned_all else None}

    def epoch_end(self, stats: list[EpochStats]) -> None:
        import ray.train

        rank, world, parts = self.rank, self.world, self.parts
        first = parts[0].trainer
        last = first.epoch >= first.hp.epochs
        samples = sum(s.samples for s in stats)
        metrics: dict[str, Any] = {
            "epoch": first.epoch, "train_loss": sum(s.loss * s.samples for s in stats) / max(samples, 1),
            "nodes": ",".join(self.nodes), "samples_per_s": samples * world / max(sum(s.seconds for s in stats), 1e-9)}
        sel = []
        for p in parts:
            p.trainer.after_training(self.kept_full(p))
            sel.append(score_table(p.data.sel_rows, distributed_scores(p.trainer, p.data.sel_set, rank, world)))
        metrics.update(selection_metrics(pd.concat(sel, ignore_index=True), self.job.rule))
        held = [p for p in parts if p.data.heldout is not None]
        if held and rank == 0:
            metrics["heldout_loss"] = float(np.mean([p.trainer.eval_loss(p.data.heldout) for p in held
                                                     if p.data.heldout is not None]))
        pruned = sum(len(p.trainer.pruned) for p in parts)
        if pruned:
            metrics["pruned_clips"] = pruned * world
        tables: dict[str, pd.DataFrame | None] = {}
        if last:
            per_part = [self.tables(p) for p in parts]
            metrics["train_seconds"] = time.perf_counter() - self.t_start
            metrics["slot_wait_seconds"] = self.slot_wait
            if rank == 0:
                tables = {k: pd.concat(found, ignore_index=True) if (found := [t[k] for t in per_part
                                                                               if t.get(k) is not None]) else None
                          for k in ("test", "train", "heldout", "pruned")}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                one = len(parts) == 1
                state = parts[0].trainer.state_dict() if one else {"parts": {p.name: p.trainer.state_dict() for p in parts}}
                info = CheckpointInfo(family=self.job.family, machine_type=self.job.machine_type,
                                      layout=self.job.layout, params=self.params, spec=parts[0].data.spec.to_dict(),
                                      info=parts[0].data.study.info.__dict__ if one else {},
                                      parts=None if one else {p.name: p.data.study.info.__dict__ for p in parts},
                                      epoch=first.epoch, final_metrics=metrics if last else None)
                artifacts.write_checkpoint(tmp, state, info, **tables)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def train_worker(cfg: dict) -> None:
    """Ray Train per-worker function: set up one model (one per machine type in a first-shot trial), then train
    them epoch by epoch, reporting after each."""
    import ray
    import ray.train
    import ray.train.torch

    job: StudyJob = cfg["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    family, hp = create_family(job.family, cfg["params"])
    groups = [(mt,) for mt in job.types] if job.scope == FIRST_SHOT else [job.types]
    parts = []
    for types in groups:
        data = worker_data(job, types, hp.crop, family.view(), device, rank, world, family.labelling())
        parts.append(Part(types[0] if len(types) == 1 else job.machine_type,
                          Trainer(family, hp, data.study.info, device, wrap=ray.train.torch.prepare_model), data))
    nodes = sorted(set(_gather(ray.get_runtime_context().get_node_id(), world)))
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # never a run that had ended: run_trial reports those itself (ended_run)
        with ckpt.as_directory() as d:
            state = artifacts.load_state(str(Path(d) / artifacts.STATE_FILE), device, "trial")
        for p in parts:
            p.trainer.load_state_dict(state["parts"][p.name] if len(parts) > 1 else state)
    else:
        for p in parts:
            p.trainer.before_training(p.data.train_full)
    report = TrialReport(job, cfg["params"], parts, rank, world, nodes)
    agree = AgreeAcrossRanks(world)
    try:
        for _ in range(max(0, hp.epochs - parts[0].trainer.epoch)):
            report.epoch_end([p.trainer.fit(p.data.shard, epochs=1, hooks=[agree], after=False)[0] for p in parts])
    except NonFiniteLoss as e:
        report_failure(str(e), parts[0].trainer.epoch, rank)


def slot_wait_seconds() -> float:
    """How long this worker's placement group waited for its resources, from Ray's placement group statistics
    (0 outside one, or where Ray does not say)."""
    from ray.util import get_current_placement_group, placement_group_table

    try:
        pg = get_current_placement_group()
        if pg is None:
            return 0.0
        stats = placement_group_table(pg).get("stats") or {}
        return float(stats.get("end_to_end_creation_latency_ms") or 0.0) / 1000
    except Exception as e:  # an accounting figure: never fail a trial for it
        log.warning(f"cannot read the placement group's wait ({type(e).__name__}: {e}); GPU hours include it")
        return 0.0


def checkpoint_uri(experiment: str, checkpoint: Any) -> str | None:
    """A checkpoint's location as a path or URI that ``raysd.storage`` and ``pyarrow.fs`` can open."""
    if checkpoint is None:
        return None
    if storage.is_remote(experiment) and "://" not in checkpoint.path:
        return f"{experiment.split('://', 1)[0]}://{checkpoint.path}"
    return checkpoint.path


def run_trial(params: dict, job: StudyJob) -> None:
    """Ray Tune function trainable: one ``TorchTrainer`` run per trial, named by the trial id so that a
    restarted trial resumes from its last checkpoint."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    record = TrialRecord(study=job.study, family=job.family, machine_type=job.machine_type, trial_id=trial_id,
                         params=params, machine_types=list(job.machine_types) or None,
                         scope=job.scope if job.scope != "machine_type" else None, workers=job.workers,
                         gpus=job.workers * job.gpus_per_worker if job.use_gpu else 0)
    ended = ended_run(storage.join(job.train_storage, trial_id))
    if ended is not None:
        # An earlier driver stopped after this trial's last checkpoint reached storage but before Tune recorded
        # the trial as done: report that result again rather than start workers that have nothing to train.
        metrics, checkpoint = ended
        tune.report(metrics)
        _finish(job, record, metrics, checkpoint, metrics.get("train_seconds") or 0.0)
        return
    # Ray Train's controller acts on its workers once per health-check interval (2 s by default), which
    # adds several seconds to the start and the end of every trial; polling faster costs one small call
    # per worker. A value set by the user wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", TRAIN_POLL_S)
    # Ray Train gives up on a placement group after 60 s by default, logs that as an error and asks again; a
    # queued trial, or one of a study whose rounded-up share exceeds the free slots, waits longer than that.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", SLOT_WAIT_S)
    per_worker = {"CPU": job.cpus_per_worker}
    if job.use_gpu:
        per_worker["GPU"] = job.gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"job": job, "params": params},
        scaling_config=ray.train.ScalingConfig(num_workers=job.workers, use_gpu=job.use_gpu,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            # Ray 2.60 annotates RunConfig.callbacks with Tune's Callback; Train V2 takes its own callbacks here
            name=trial_id, storage_path=job.train_storage, callbacks=[TuneReportCallback()],  # type: ignore[list-item]
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
        ),
    )
    t0 = time.time()
    try:
        result = trainer.fit()
    except Exception as e:
        dataclasses.replace(record, status="failed", reason=f"{type(e).__name__}: {e}",
                            wall_seconds=time.time() - t0).write(job.experiment)
        raise
    _finish(job, record, dict(result.metrics or {}), checkpoint_uri(job.experiment, result.checkpoint),
            time.time() - t0)


def _finish(job: StudyJob, record: TrialRecord, metrics: dict, checkpoint: str | None, wall: float) -> None:
    """Write the trial's record; a trial whose run ended as failed raises ``TrialFailed``. Its GPU hours leave
    out the time its workers' placement group waited for a slot (``slot_wait_seconds``: a queued trial)."""
    held = max(0.0, wall - (metrics.get("slot_wait_seconds") or 0.0))
    done = dataclasses.replace(record, metrics=metrics, wall_seconds=wall, gpu_hours=(record.gpus or 0) * held / 3600,
                               checkpoint=checkpoint, status="finished")
    if metrics.get("failed"):
        dataclasses.replace(done, status="failed", reason=metrics["failed"]).write(job.experiment)
        raise TrialFailed(metrics["failed"])
    done.write(job.experiment)
