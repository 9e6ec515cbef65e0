"""The per-worker training loop. It knows the Family interface, never a family's name.

:class:`Trainer` runs the same code in a plain process (tests, benchmarks, a GPU box without Ray) and
inside a Ray Train worker, where the model is wrapped by ``ray.train.torch.prepare_model`` (DDP) and
each worker holds its own shard of the clips on its device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from raysd.families.base import ClipSet, DataInfo, Family, TrainHP


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
        self.model = family.build(info).to(self.device)
        self.net = wrap(self.model) if wrap is not None else self.model
        self.optimizer = make_optimizer(self.net.parameters(), hp)
        self.dtype = amp_dtype(hp, self.device)
        self.generator = torch.Generator().manual_seed(hp.seed)
        self.epoch = 0
        self.active: torch.Tensor | None = None  # indices of the training clips still trained on
        self.pruned: list[tuple[int, int, float]] = []  # (epoch, clip index, score) of dropped clips

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def train_epoch(self, data: ClipSet) -> EpochStats:
        import time

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

    def after_training(self, data: ClipSet) -> None:
        self.model.eval()
        with torch.no_grad():
            self.family.after_training(self.model, data)

    @torch.no_grad()
    def score(self, data: ClipSet, clips_per_batch: int = 16) -> np.ndarray:
        """One anomaly score per clip of ``data`` (float64 numpy), batched over clips."""
        self.model.eval()
        out = []
        for _, windows, labels in data.clip_batches(clips_per_batch):
            with self.autocast():
                s = self.family.score(self.model, windows, labels)
            out.append(s.float().cpu())
        return torch.cat(out).double().numpy() if out else np.zeros(0)

    def pruning_due(self) -> bool:
        hp = self.hp
        return hp.prune_every > 0 and hp.prune_fraction > 0 and self.epoch % hp.prune_every == 0 \
            and self.epoch < hp.epochs

    def prune(self, data: ClipSet) -> torch.Tensor:
        """Drop ``round(prune_fraction * remaining)`` training clips with the highest current anomaly
        score (for reconstruction families, their reconstruction error) from the next epochs.

        Returns the dropped indices (into ``data``); they are also recorded in ``self.pruned``."""
        active = self.active if self.active is not None else torch.arange(len(data))
        self.after_training(data.subset(active))
        scores = self.score(data.subset(active))
        k = int(round(self.hp.prune_fraction * len(active)))
        order = np.argsort(-scores, kind="stable")
        dropped, kept = active[torch.from_numpy(order[:k])], active[torch.from_numpy(np.sort(order[k:]))]
        self.active = kept
        self.pruned.extend((self.epoch, int(i), float(scores[j])) for i, j in zip(dropped, order[:k]))
        return dropped

    def training_data(self, data: ClipSet) -> ClipSet:
        """The clips still trained on (all of them unless some were pruned)."""
        return data if self.active is None else data.subset(self.active)

    def fit(self, data: ClipSet, epochs: int | None = None,
            on_epoch: Callable[[int, EpochStats], None] | None = None) -> list[EpochStats]:
        """Plain training: hooks, ``epochs`` epochs (default ``hp.epochs``) with optional pruning, hooks."""
        if self.epoch == 0:
            self.before_training(data)
        stats = []
        current = self.training_data(data)
        for _ in range(epochs if epochs is not None else self.hp.epochs):
            s = self.train_epoch(current)
            stats.append(s)
            if on_epoch is not None:
                on_epoch(self.epoch, s)
            if self.pruning_due():
                self.prune(data)
                current = self.training_data(data)
        self.after_training(current)
        return stats

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "epoch": self.epoch,
                "generator": self.generator.get_state(), "active": self.active,
                "pruned": torch.tensor(self.pruned, dtype=torch.float64).reshape(-1, 3)}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.generator.set_state(state["generator"])
        self.active = state.get("active")
        self.pruned = [(int(e), int(i), float(v)) for e, i, v in state.get("pruned", torch.zeros(0, 3)).tolist()]
