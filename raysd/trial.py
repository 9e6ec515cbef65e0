"""One search trial: the body every trial runs, and its two launchers.

A trial trains one model (one per machine type in a first-shot study) epoch by epoch. After each epoch it scores
the selection half of the labelled test clips and reports ``train_loss`` plus the selection metrics with a
checkpoint (model, optimiser, epoch); the last checkpoint also holds the per-clip score tables
``scores_test.csv`` and ``scores_train.csv`` that the leaderboard consumes.

:func:`run_trial` is the study's Ray Tune function trainable. A single-worker trial (every shipped preset) runs
:func:`trial_body` right there, in the trainable's process, holding the trial's resources (a fraction of a GPU for
small families), so a study's next trial reuses the warm process (``reuse_actors``) and its cached data. A
multi-worker trial launches a Ray Train ``TorchTrainer`` (DDP) from the trainable, and each worker runs the same
:func:`trial_body`. The body reaches its launcher through a :class:`Session`.

Outcomes travel in the reports: a configuration that cannot train (a family's own checks, or data it cannot
use) ends the trial at once with ``infeasible``, a loss that turns NaN with ``failed``; Tune retries only what
raises (a dead worker, a lost node), from the last checkpoint. The study's driver writes each trial's record
(:class:`raysd.artifacts.TrialRecord`) from its last report.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from raysd import artifacts
from raysd.artifacts import CheckpointInfo
from raysd.data.catalog import Catalog
from raysd.data.features import FeatureSpec
from raysd.data.store import FeatureStore
from raysd.data.study import FIRST_SHOT, StudyData, load_study
from raysd.data.views import View
from raysd.families.base import create_family
from raysd.families.clips import ClipSet
from raysd.log import module_logger
from raysd.metrics import evaluate, split_half
from raysd.pseudo import pseudo_metrics, pseudo_set
from raysd.sessions import Session, TrainSession, TuneSession, distributed_scores
from raysd.train import EpochStats, Hook, NonFiniteLoss, Trainer, shard_indices

log = module_logger(__name__, __spec__)
SCORE_COLUMNS = ["file", "machine_type", "section", "domain", "split", "label", "half", "score"]
CLIP_COLUMNS = ["offset", "num_samples", "sample_rate"]  # recordings layout: where each clip lies in its file
METRIC_KEYS = ("sel_auc", "sel_pauc", "sel_official", "heldout_loss", "pseudo_official")


@dataclass
class StudyJob:
    """Everything a trial of one study needs, handed to the study's Tune trainable once (``tune.with_parameters``)."""

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

    @property
    def gpus(self) -> float:
        """The GPUs a trial holds (fractions allowed for a single worker)."""
        return self.workers * self.gpus_per_worker if self.use_gpu else 0.0


# ---------------------------------------------------------------------- per-clip tables and metrics
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


def ended_metrics(epoch: int, *, failed: str | None = None, infeasible: str | None = None) -> dict[str, Any]:
    """The last report of a trial that ends without a model: the metric keys are NaN (no value, which Tune accepts)
    and ``failed`` or ``infeasible`` says why."""
    nan = float("nan")
    reason = {"failed": failed} if failed else {"infeasible": infeasible}
    return {"epoch": epoch, "train_loss": nan, **reason, **{k: nan for k in METRIC_KEYS}}


# ---------------------------------------------------------------------- a worker's data
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
    pseudo: tuple[list[ClipSet], pd.DataFrame] | None = None  # held-out normals and their pseudo-anomalies


_CACHE: dict[tuple, WorkerData] = {}  # this process's last study data: a reused trial process starts warm


def worker_data(job: StudyJob, types: tuple[str, ...], hp_crop: str, view: View, device: torch.device, rank: int,
                world: int, labelling: str = "section") -> WorkerData:
    """Open the feature cache and lay out the clips of ``types`` (one model's data) for one worker. The result is
    kept for the next trial in this process that asks for the same data (one entry: the device memory it holds
    is bounded)."""
    key = (job.experiment, job.study, types, hp_crop, view, str(device), rank, world, labelling)
    if key in _CACHE:
        return _CACHE[key]
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
    heldout = study.heldout_set(view).to(device) if study.has_heldout else None
    pseudo = pseudo_set(heldout, study.heldout_table, spec) if heldout is not None and rank == 0 else None
    data = WorkerData(study, spec, train_full, shard_idx, shard, heldout, test, test_rows,
                      test.subset(sel_idx).to(device), test_rows.iloc[sel_idx.numpy()], pseudo)
    for k in [k for k in _CACHE if k[:2] + k[3:] != key[:2] + key[3:]]:  # keep one trial's data: one per type
        del _CACHE[k]
    _CACHE[key] = data
    return data


@dataclass
class Part:
    """One model of a trial with its data. A first-shot trial has one per machine type, trained in step with the
    same hyperparameters; any other trial has one."""

    name: str  # the machine type (or the study's machine_type)
    trainer: Trainer
    data: WorkerData


class AgreeAcrossRanks(Hook):
    def __init__(self, session: Session):
        self.session = session

    def agree(self, trainer: Trainer, failure: str | None) -> str | None:
        return next((f for f in self.session.gather(failure) if f), None)  # every rank stops together


class TrialReport:
    """A trial's epoch end on every worker: refit each model's post-training state on the clips no rank pruned,
    score the selection half of every model's clips, and report the metrics over all of them with a checkpoint
    (the last one with the per-clip score tables, written by rank 0 through :mod:`raysd.artifacts`)."""

    def __init__(self, job: StudyJob, params: dict, parts: list[Part], session: Session, nodes: list[str]):
        self.job, self.params, self.parts, self.session, self.nodes = job, params, parts, session, nodes
        self.t_start = time.perf_counter()

    def kept_full(self, part: Part) -> ClipSet:
        """Training clips of every rank that pruning has not dropped (identical on every rank)."""
        dropped = set()
        for ranks_part in self.session.gather([int(part.data.shard_idx[i]) for _, i, _ in part.trainer.pruned]):
            dropped.update(ranks_part)
        if not dropped:
            return part.data.train_full
        keep = torch.tensor([i for i in range(len(part.data.train_full)) if i not in dropped])
        return part.data.train_full.subset(keep)

    def tables(self, part: Part) -> dict[str, pd.DataFrame | None]:
        """The per-clip score tables of one model at the last epoch (rank 0; the other ranks get {})."""
        d, trainer, session = part.data, part.trainer, self.session
        pruned_all = [row for p in session.gather([(e, int(d.shard_idx[i]), v) for e, i, v in trainer.pruned])
                      for row in p]
        test_scores = distributed_scores(trainer, d.test.to(trainer.device), session)
        train_scores = distributed_scores(trainer, d.train_full, session)
        if session.rank != 0:
            return {}
        return {"test": score_table(d.test_rows, test_scores), "train": score_table(d.study.train_table, train_scores),
                "heldout": score_table(d.study.heldout_table, distributed_scores(trainer, d.heldout, Session()))
                if d.heldout is not None else None,
                "pruned": pruned_table(d.study.train_table, pruned_all) if pruned_all else None}

    def pseudo_metrics(self, parts: list[Part]) -> dict[str, float]:
        """The models' figures on their held-out normals against pseudo-anomalies made of them (:mod:`raysd.pseudo`)."""
        scores, tables = [], []
        for p in parts:
            if p.data.pseudo is None:
                continue
            sets, table = p.data.pseudo
            scores += [p.trainer.score(s) for s in sets]
            tables.append(table)
        if not tables:
            return {}
        return pseudo_metrics(np.concatenate(scores), pd.concat(tables, ignore_index=True), self.job.rule)

    def epoch_end(self, stats: list[EpochStats]) -> None:
        parts, session = self.parts, self.session
        first = parts[0].trainer
        last = first.epoch >= first.hp.epochs
        samples = sum(s.samples for s in stats)
        metrics: dict[str, Any] = {
            "epoch": first.epoch, "train_loss": sum(s.loss * s.samples for s in stats) / max(samples, 1),
            "nodes": ",".join(self.nodes),
            "samples_per_s": samples * session.world / max(sum(s.seconds for s in stats), 1e-9)}
        sel = []
        for p in parts:
            p.trainer.after_training(self.kept_full(p))
            sel.append(score_table(p.data.sel_rows, distributed_scores(p.trainer, p.data.sel_set, session)))
        metrics.update(selection_metrics(pd.concat(sel, ignore_index=True), self.job.rule))
        held = [p for p in parts if p.data.heldout is not None]
        if held and session.rank == 0:
            metrics["heldout_loss"] = float(np.mean([p.trainer.eval_loss(p.data.heldout) for p in held
                                                     if p.data.heldout is not None]))
            metrics.update(self.pseudo_metrics(held))
        pruned = sum(len(p.trainer.pruned) for p in parts)
        if pruned:
            metrics["pruned_clips"] = pruned * session.world
        tables: dict[str, pd.DataFrame | None] = {}
        if last:
            per_part = [self.tables(p) for p in parts]
            metrics["train_seconds"] = time.perf_counter() - self.t_start
            if session.rank == 0:
                tables = {k: pd.concat(found, ignore_index=True) if (found := [t[k] for t in per_part
                                                                               if t.get(k) is not None]) else None
                          for k in ("test", "train", "heldout", "pruned")}
        with tempfile.TemporaryDirectory() as tmp:
            folder = None
            if session.rank == 0:
                one = len(parts) == 1
                state = parts[0].trainer.state_dict() if one else {"parts": {p.name: p.trainer.state_dict() for p in parts}}
                info = CheckpointInfo(family=self.job.family, machine_type=self.job.machine_type,
                                      layout=self.job.layout, params=self.params, spec=parts[0].data.spec.to_dict(),
                                      info=parts[0].data.study.info.__dict__ if one else {},
                                      parts=None if one else {p.name: p.data.study.info.__dict__ for p in parts},
                                      epoch=first.epoch, final_metrics=metrics if last else None)
                artifacts.write_checkpoint(tmp, state, info, **tables)
                folder = tmp
            session.report(metrics, folder)


# ---------------------------------------------------------------------- the trial body and its launchers
def set_up(job: StudyJob, params: dict, session: Session) -> list[Part]:
    """The trial's models and their data (one per machine type in a first-shot trial). A ``ValueError`` here is a
    configuration that cannot train on this data (the family's checks, the data's)."""
    family, hp = create_family(job.family, params)
    device = session.device()
    groups = [(mt,) for mt in job.types] if job.scope == FIRST_SHOT else [job.types]
    parts = []
    for types in groups:
        data = worker_data(job, types, hp.crop, family.view(), device, session.rank, session.world, family.labelling())
        parts.append(Part(types[0] if len(types) == 1 else job.machine_type,
                          Trainer(family, hp, data.study.info, device, wrap=session.wrap()), data))
    return parts


def resume(parts: list[Part], session: Session) -> dict[str, Any] | None:
    """Load the checkpoint a restarted trial resumes from; returns its final metrics when that checkpoint already
    ended the trial (a driver stopped between the last report and Tune recording it), else None."""
    ckpt = session.checkpoint()
    if ckpt is None:
        for p in parts:
            p.trainer.before_training(p.data.train_full)
        return None
    with ckpt.as_directory() as d:
        state = artifacts.load_state(str(Path(d) / artifacts.STATE_FILE), parts[0].trainer.device, "trial")
        final = artifacts.read_checkpoint_info(d).get("final_metrics")
    for p in parts:
        p.trainer.load_state_dict(state["parts"][p.name] if len(parts) > 1 else state)
    return final


def trial_body(job: StudyJob, params: dict, session: Session) -> None:
    """Set up, resume and train one trial epoch by epoch under ``session``, reporting after each epoch."""
    try:
        parts = set_up(job, params, session)
    except ValueError as e:  # deterministic: retrying cannot help, and the searcher learns to avoid it
        log.warning(f"{job.study}: configuration cannot train here: {e}")
        session.report(ended_metrics(0, infeasible=str(e)), None)
        return
    final = resume(parts, session)
    if final is not None:  # report the ended trial again, naming its final checkpoint, instead of training anything
        session.report({**final, "checkpoint_path": session.checkpoint().path}, None)
        return
    nodes = sorted(set(session.gather(session.node())))
    report = TrialReport(job, params, parts, session, nodes)
    agree = AgreeAcrossRanks(session)
    try:
        for _ in range(max(0, parts[0].trainer.hp.epochs - parts[0].trainer.epoch)):
            report.epoch_end([p.trainer.fit(p.data.shard, epochs=1, hooks=[agree], after=False)[0] for p in parts])
    except NonFiniteLoss as e:
        session.report(ended_metrics(parts[0].trainer.epoch, failed=str(e)), None)


def train_worker(cfg: dict) -> None:
    """Ray Train per-worker function of a multi-worker trial."""
    job: StudyJob = cfg["job"]
    trial_body(job, cfg["params"], TrainSession(job.use_gpu))


def run_trial(params: dict, job: StudyJob) -> None:
    """Ray Tune function trainable: the trial body in this process for one worker, else a ``TorchTrainer`` run
    named by the trial id (Ray Train resumes a run of the same name from its last checkpoint when Tune retries
    the trial). Its reports reach Tune through Ray Train's ``TuneReportCallback``, as Ray's guide to Train with
    Tune does."""
    if job.workers == 1:
        trial_body(job, params, TuneSession(job.use_gpu))
        return
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    per_worker = {"CPU": job.cpus_per_worker, **({"GPU": job.gpus_per_worker} if job.use_gpu else {})}
    TorchTrainer(
        train_worker,
        train_loop_config={"job": job, "params": params},
        scaling_config=ray.train.ScalingConfig(num_workers=job.workers, use_gpu=job.use_gpu,
                                               resources_per_worker=per_worker),
        run_config=ray.train.RunConfig(
            # Ray 2.60 annotates RunConfig.callbacks with Tune's Callback; Train V2 takes its own callbacks here
            name=tune.get_context().get_trial_id(), storage_path=job.train_storage,
            callbacks=[TuneReportCallback()],  # type: ignore[list-item]
            failure_config=ray.train.FailureConfig(max_failures=job.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
    ).fit()
