"""The one epoch loop. It knows the Family interface, never a family's name.

:class:`Trainer` runs the same code in a plain process (tests, benchmarks, a GPU box without Ray) and
inside a Ray Train worker, where the model is wrapped by ``ray.train.torch.prepare_model`` (DDP) and
each worker holds its own shard of the clips on its device. :meth:`Trainer.fit` owns the loop; what
happens around it is a :class:`Hook`: anomaly pruning (:class:`Pruning`, always on, idle unless the
hyperparameters ask for it), and in a trial the cross-worker agreement on failures, scoring, checkpoints
and reports (``raysd.trial``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from raysd.families.base import Family
from raysd.families.clips import ClipSet, DataInfo
from raysd.families.hparams import TrainHP


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; the trial is failed with this reason."""


def amp_dtype(hp: TrainHP, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA devices that support it when ``amp='auto'``; on any device when 'bf16'."""
    if hp.amp == "off":
        return None
    if hp.amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def make_optimizer(params, hp: TrainHP) -> torch.optim.Optimizer:
    if hp.optimizer == "adam":
        return torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
    if hp.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    return torch.optim.SGD(params, lr=hp.lr, momentum=0.9, weight_decay=hp.weight_decay)


def shard_indices(n: int, rank: int, world: int) -> torch.Tensor:
    """Equal-sized shards (wrapping round like DistributedSampler), so DDP ranks take equal steps."""
    per = math.ceil(n / world)
    return torch.arange(rank * per, (rank + 1) * per) % n


@dataclass
class EpochStats:
    loss: float
    samples: int
    seconds: float


class Hook:
    """Something :meth:`Trainer.fit` calls around its epochs; every method does nothing by default."""

    def agree(self, trainer: Trainer, failure: str | None) -> str | None:
        """After each epoch's training: the failure every worker acts on (e.g. gathered across ranks)."""
        return failure

    def epoch_end(self, trainer: Trainer, stats: EpochStats, data: ClipSet) -> None:
        """After each successful epoch; ``data`` is every clip ``fit`` was given (pruned ones included)."""


class EpochCallback(Hook):
    """Calls ``fn(epoch, stats)`` at each epoch end."""

    def __init__(self, fn: Callable[[int, EpochStats], None]):
        self.fn = fn

    def epoch_end(self, trainer: Trainer, stats: EpochStats, data: ClipSet) -> None:
        self.fn(trainer.epoch, stats)


class Pruning(Hook):
    """Anomaly pruning: every ``prune_every`` epochs (not after the last) drop ``round(prune_fraction *
    remaining)`` training clips with the highest current anomaly score (for reconstruction families, their
    reconstruction error) from the next epochs.

    ``active`` holds the indices of the clips still trained on (None: all), ``pruned`` the (epoch, clip index,
    score) of each dropped clip; both travel in the trainer's ``state_dict``.
    """

    def __init__(self, every: int, fraction: float, epochs: int):
        self.every = every
        self.fraction = fraction
        self.epochs = epochs
        self.active: torch.Tensor | None = None
        self.pruned: list[tuple[int, int, float]] = []

    def due(self, epoch: int) -> bool:
        return self.every > 0 and self.fraction > 0 and epoch % self.every == 0 and epoch < self.epochs

    def epoch_end(self, trainer: Trainer, stats: EpochStats, data: ClipSet) -> None:
        if self.due(trainer.epoch):
            self.prune(trainer, data)

    def prune(self, trainer: Trainer, data: ClipSet) -> torch.Tensor:
        """Drop the worst-scoring clips of ``data``; returns their indices (also recorded in ``pruned``)."""
        active = self.active if self.active is not None else torch.arange(len(data))
        trainer.after_training(data.subset(active))
        scores = trainer.score(data.subset(active))
        k = int(round(self.fraction * len(active)))
        order = np.argsort(-scores, kind="stable")
        dropped, kept = active[torch.from_numpy(order[:k])], active[torch.from_numpy(np.sort(order[k:]))]
        self.active = kept
        self.pruned.extend((trainer.epoch, int(i), float(scores[j])) for i, j in zip(dropped, order[:k]))
        return dropped

    def kept(self, data: ClipSet) -> ClipSet:
        """The clips still trained on (all of them unless some were pruned)."""
        return data if self.active is None else data.subset(self.active)

    def state_dict(self) -> dict[str, Any]:
        return {"active": self.active, "pruned": torch.tensor(self.pruned, dtype=torch.float64).reshape(-1, 3)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active = state.get("active")
        self.pruned = [(int(e), int(i), float(v)) for e, i, v in state.get("pruned", torch.zeros(0, 3)).tolist()]


class Trainer:
    """Builds, trains and scores one model of one family on one study's data."""

    def __init__(
        self, family: Family, hp: TrainHP, info: DataInfo, device: torch.device | str = "cpu",
        wrap: Callable[[nn.Module], nn.Module] | None = None,
    ):
        self.family = family
        self.hp = hp
        self.info = info
        self.device = torch.device(device)
        torch.manual_seed(hp.seed)
        self.model = family.checked_build(info).to(self.device)
        self.net = wrap(self.model) if wrap is not None else self.model
        self.optimizer = make_optimizer(self.net.parameters(), hp)
        self.dtype = amp_dtype(hp, self.device)
        self.generator = torch.Generator().manual_seed(hp.seed)
        self.epoch = 0
        self.prepared = False  # the family's before_training hook has run (or a state was loaded)
        self.pruning = Pruning(hp.prune_every, hp.prune_fraction, hp.epochs)

    @property
    def active(self) -> torch.Tensor | None:
        """Indices of the training clips still trained on (None: all)."""
        return self.pruning.active

    @property
    def pruned(self) -> list[tuple[int, int, float]]:
        """(epoch, clip index, score) of each clip that pruning dropped."""
        return self.pruning.pruned

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def train_epoch(self, data: ClipSet) -> EpochStats:
        self.net.train()
        t0 = time.perf_counter()
        total = torch.zeros((), device=self.device)
        count = 0
        for step, batch in enumerate(data.batches(self.hp.batch_size, shuffle=True, generator=self.generator)):
            with self.autocast():
                loss = self.family.loss(self.net, batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.hp.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.net.parameters(), self.hp.grad_clip)
            self.optimizer.step()
            n = batch.x.shape[0]
            total += loss.detach().float() * n
            count += n
        self.epoch += 1
        mean = (total / max(count, 1)).item()
        if not math.isfinite(mean):
            raise NonFiniteLoss(f"training loss became {mean} in epoch {self.epoch}")
        return EpochStats(mean, count, time.perf_counter() - t0)

    @torch.no_grad()
    def eval_loss(self, data: ClipSet, batch_size: int | None = None) -> float:
        """Mean training objective over every window of ``data`` (held-out loss), in eval mode."""
        self.model.eval()
        total, count = 0.0, 0
        for batch in data.batches(batch_size or self.hp.batch_size, shuffle=False):
            with self.autocast():
                loss = self.family.loss(self.model, batch)
            total += float(loss) * batch.x.shape[0]
            count += batch.x.shape[0]
        return total / max(count, 1)

    def before_training(self, data: ClipSet) -> None:
        self.model.eval()
        with torch.no_grad():
            self.family.before_training(self.model, data)
        self.prepared = True

    def after_training(self, data: ClipSet) -> None:
        self.model.eval()
        with torch.no_grad():
            self.family.after_training(self.model, data)

    @torch.no_grad()
    def score(self, data: ClipSet, clips_per_batch: int = 16) -> np.ndarray:
        """One anomaly score per clip of ``data`` (float64 numpy), batched over clips."""
        self.model.eval()
        out = []
        for idx, windows, labels in data.clip_batches(clips_per_batch):
            with self.autocast():
                s = self.family.score(self.model, windows, labels, data.sections[idx], data.extra_of(idx))
            out.append(s.float().cpu())
        return torch.cat(out).double().numpy() if out else np.zeros(0)

    def training_data(self, data: ClipSet) -> ClipSet:
        """The clips still trained on (all of them unless some were pruned)."""
        return self.pruning.kept(data)

    def fit(self, data: ClipSet, epochs: int | None = None, on_epoch: Callable[[int, EpochStats], None] | None = None,
            hooks: Iterable[Hook] = (), after: bool = True) -> list[EpochStats]:
        """Train ``epochs`` epochs (default ``hp.epochs``) on ``data``.

        Runs the family's ``before_training`` hook first unless it has run (or a state was loaded). After each
        epoch: ``on_epoch(epoch, stats)``, pruning, then ``hooks`` in order. With ``after``, the family's
        ``after_training`` hook runs on the clips still trained on at the end. A non-finite loss raises
        :class:`NonFiniteLoss` once the hooks have agreed on it.
        """
        if not self.prepared:
            self.before_training(data)
        order: Sequence[Hook] = [*([EpochCallback(on_epoch)] if on_epoch is not None else []), self.pruning, *hooks]
        stats = []
        for _ in range(epochs if epochs is not None else self.hp.epochs):
            failure = None
            try:
                s = self.train_epoch(self.training_data(data))
            except NonFiniteLoss as e:
                failure = str(e)
            for h in order:
                failure = h.agree(self, failure)
            if failure:
                raise NonFiniteLoss(failure)
            stats.append(s)
            for h in order:
                h.epoch_end(self, s, data)
        if after:
            self.after_training(self.training_data(data))
        return stats

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                "generator": self.generator.get_state(), **self.pruning.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.generator.set_state(state["generator"])
        self.pruning.load_state_dict(state)
        self.prepared = True
