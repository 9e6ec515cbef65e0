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
from raysd.data.study import StudyData, load_study
from raysd.data.views import View
from raysd.families.base import create_family
from raysd.families.clips import ClipSet
from raysd.metrics import evaluate, split_half
from raysd.train import EpochStats, Hook, NonFiniteLoss, Trainer, shard_indices

TRAIN_POLL_S = "0.5"
SCORE_COLUMNS = ["file", "machine_type", "section", "domain", "split", "label", "half", "score"]
CLIP_COLUMNS = ["offset", "num_samples", "sample_rate"]  # recordings layout: where each clip lies in its file


class TrialFailed(RuntimeError):
    """A trial that ended without a usable model (e.g. its loss became NaN)."""


@dataclass
class StudyJob:
    """Everything a trial of one study needs, captured by the study's Tune trainable."""

    study: str
    family: str
    machine_type: str
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
    part = trainer.score(data.subset(idx)) if len(idx) else np.zeros(0)
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


def worker_data(job: StudyJob, hp_crop: str, view: View, device: torch.device, rank: int, world: int) -> WorkerData:
    """Open the feature cache and lay out the study's clips for one worker."""
    spec = FeatureSpec.from_dict(job.spec).with_crop(hp_crop)
    catalog = Catalog(job.catalog, job.data_root, job.layout)
    store = FeatureStore.open(catalog, spec, job.cache_dir)
    if job.study_table is not None:
        catalog = Catalog(job.study_table, job.data_root, job.layout)
    study = load_study(catalog, store, job.machine_type)
    train_full = study.train_set(view).to(device)
    shard_idx = shard_indices(len(train_full), rank, world)
    test = study.test_set(view)
    test_rows = study.test_table.reset_index(drop=True)
    labelled = test_rows["label"].notna().to_numpy()
    halves = test_half(test_rows["file"])
    sel_idx = torch.from_numpy(np.flatnonzero(labelled & (halves == "selection")))
    return WorkerData(study, spec, train_full, shard_idx, train_full.subset(shard_idx),
                      study.heldout_set(view).to(device) if study.has_heldout else None, test, test_rows,
                      test.subset(sel_idx).to(device), test_rows.iloc[sel_idx.numpy()])


class TrialReport(Hook):
    """A trial's epoch end on every worker: agree on failures across ranks, refit the family's post-training
    state on the clips no rank pruned, score the selection half, and report the metrics with a checkpoint
    (the last one with the per-clip score tables, written by rank 0 through :mod:`raysd.artifacts`)."""

    def __init__(self, job: StudyJob, params: dict, data: WorkerData, rank: int, world: int, nodes: list[str]):
        self.job, self.params, self.data = job, params, data
        self.rank, self.world, self.nodes = rank, world, nodes
        self.t_start = time.perf_counter()

    def agree(self, trainer: Trainer, failure: str | None) -> str | None:
        return next((f for f in _gather(failure, self.world) if f), None)  # every rank stops together

    def kept_full(self, trainer: Trainer) -> ClipSet:
        """Training clips of every rank that pruning has not dropped (identical on every rank)."""
        dropped = set()
        for part in _gather([int(self.data.shard_idx[i]) for _, i, _ in trainer.pruned], self.world):
            dropped.update(part)
        if not dropped:
            return self.data.train_full
        keep = torch.tensor([i for i in range(len(self.data.train_full)) if i not in dropped])
        return self.data.train_full.subset(keep)

    def epoch_end(self, trainer: Trainer, stats: EpochStats, data: ClipSet) -> None:
        import ray.train

        d, rank, world = self.data, self.rank, self.world
        trainer.after_training(self.kept_full(trainer))
        last = trainer.epoch >= trainer.hp.epochs
        sel_scores = distributed_scores(trainer, d.sel_set, rank, world)
        metrics: dict[str, Any] = {"epoch": trainer.epoch, "train_loss": stats.loss, "nodes": ",".join(self.nodes),
                                   "samples_per_s": stats.samples * world / max(stats.seconds, 1e-9)}
        metrics.update(selection_metrics(score_table(d.sel_rows, sel_scores), self.job.rule))
        if d.heldout is not None and rank == 0:
            metrics["heldout_loss"] = trainer.eval_loss(d.heldout)
        if trainer.pruned:
            metrics["pruned_clips"] = len(trainer.pruned) * world
        tables: dict[str, pd.DataFrame | None] = {}
        if last:
            pruned_all = [row for part in _gather([(e, int(d.shard_idx[i]), v) for e, i, v in trainer.pruned], world)
                          for row in part]
            test_scores = distributed_scores(trainer, d.test.to(trainer.device), rank, world)
            train_scores = distributed_scores(trainer, d.train_full, rank, world)
            metrics["train_seconds"] = time.perf_counter() - self.t_start
            if rank == 0:
                tables = {"test": score_table(d.test_rows, test_scores),
                          "train": score_table(d.study.train_table, train_scores),
                          "heldout": score_table(d.study.heldout_table, distributed_scores(trainer, d.heldout, 0, 1))
                          if d.heldout is not None else None,
                          "pruned": pruned_table(d.study.train_table, pruned_all) if pruned_all else None}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                info = CheckpointInfo(family=self.job.family, machine_type=self.job.machine_type,
                                      layout=self.job.layout, params=self.params, spec=d.spec.to_dict(),
                                      info=d.study.info.__dict__, epoch=trainer.epoch,
                                      final_metrics=metrics if last else None)
                artifacts.write_checkpoint(tmp, trainer.state_dict(), info, **tables)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def train_worker(cfg: dict) -> None:
    """Ray Train per-worker function: set up, ``trainer.fit`` with the trial's report hook."""
    import ray
    import ray.train
    import ray.train.torch

    job: StudyJob = cfg["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    family, hp = create_family(job.family, cfg["params"])
    data = worker_data(job, hp.crop, family.view(), device, rank, world)
    trainer = Trainer(family, hp, data.study.info, device, wrap=ray.train.torch.prepare_model)
    nodes = sorted(set(_gather(ray.get_runtime_context().get_node_id(), world)))
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # never a run that had ended: run_trial reports those itself (ended_run)
        with ckpt.as_directory() as d:
            trainer.load_state_dict(artifacts.load_state(str(Path(d) / artifacts.STATE_FILE), device, "trial"))
    else:
        trainer.before_training(data.train_full)
    report = TrialReport(job, cfg["params"], data, rank, world, nodes)
    try:
        trainer.fit(data.shard, epochs=max(0, hp.epochs - trainer.epoch), hooks=[report], after=False)
    except NonFiniteLoss as e:
        report_failure(str(e), trainer.epoch + 1, rank)


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
                         params=params, workers=job.workers,
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
    """Write the trial's record; a trial whose run ended as failed raises ``TrialFailed``."""
    done = dataclasses.replace(record, metrics=metrics, wall_seconds=wall, gpu_hours=(record.gpus or 0) * wall / 3600,
                               checkpoint=checkpoint, status="finished")
    if metrics.get("failed"):
        dataclasses.replace(done, status="failed", reason=metrics["failed"]).write(job.experiment)
        raise TrialFailed(metrics["failed"])
    done.write(job.experiment)
