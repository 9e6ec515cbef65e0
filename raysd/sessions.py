"""Where a trial body reports: the launcher it runs under (:mod:`raysd.trial`).

A :class:`Session` is a single worker outside Ray (tests, benchmarks); :class:`TuneSession` a single-worker trial
inside its Ray Tune function trainable; :class:`TrainSession` one worker of a multi-worker trial's ``TorchTrainer``
(DDP). Each says the worker's rank among the trial's workers, its device, where reports and checkpoints go and how
to gather values across workers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from raysd.families.clips import ClipSet
from raysd.train import Trainer


class Session:
    """The launcher a trial body runs under: its rank among the trial's workers, its device, where its reports and
    checkpoints go. The base class is a single worker outside Ray (tests, benchmarks)."""

    rank, world = 0, 1

    def __init__(self, use_gpu: bool = False):
        self.use_gpu = use_gpu

    def device(self) -> torch.device:
        """The trial's GPU (Ray makes the one it assigned ``cuda:0``) when it holds one, else the CPU."""
        return torch.device("cuda", 0) if self.use_gpu and torch.cuda.is_available() else torch.device("cpu")

    def wrap(self) -> Callable[[torch.nn.Module], torch.nn.Module] | None:
        return None

    def node(self) -> str:
        return "local"

    def gather(self, value: Any) -> list[Any]:
        return [value]

    def checkpoint(self) -> Any:
        """The checkpoint a restarted trial resumes from (an object with ``as_directory()``), or None."""
        return None

    def report(self, metrics: dict[str, Any], folder: str | None) -> None:
        """Report one epoch's metrics; ``folder`` (rank 0 only): a checkpoint directory to persist with them."""


class TuneSession(Session):
    """A single-worker trial inside its Ray Tune function trainable."""

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def checkpoint(self) -> Any:
        from ray import tune

        return tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], folder: str | None) -> None:
        from ray import tune

        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder) if folder else None)


class TrainSession(Session):
    """One worker of a multi-worker trial's ``TorchTrainer`` (DDP over the workers)."""

    def __init__(self, use_gpu: bool = False):
        import ray.train

        super().__init__(use_gpu)
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def wrap(self) -> Callable[[torch.nn.Module], torch.nn.Module] | None:
        import ray.train.torch

        return ray.train.torch.prepare_model

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def gather(self, value: Any) -> list[Any]:
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], folder: str | None) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder) if folder else None)


def distributed_scores(trainer: Trainer, data: ClipSet, session: Session) -> np.ndarray:
    """Each rank scores every ``world``-th clip; every rank gets the full score vector back."""
    n, rank, world = len(data), session.rank, session.world
    idx = torch.arange(rank, n, world)
    part = trainer.score(data if world == 1 else data.subset(idx)) if len(idx) else np.zeros(0)
    out = np.empty(n)
    for r, p in enumerate(session.gather(part)):
        out[r::world] = p
    return out
