"""``bench_sleep``: a family whose epochs only sleep, for ``benchmarks/orchestration.py``. Never in the registry
of ``raysd.families``: the orchestration benchmark imports this module itself and names it in
``$RAYSD_FAMILY_MODULES``, so the Ray processes that look the family up (studies, trial workers) import it on
demand, and Ray's other processes do not.

Each training epoch sleeps ``epoch_seconds`` in all, spread over its batches in proportion to their windows,
and appends the time of every sleep to ``$RAYSD_SLEEP_EVENTS/<pid>.jsonl`` (one JSON line: trial, start, end),
so the benchmark can tell the time a slot spends training from the time a trial spends starting and ending.
Its scores are the output of an untrained linear map (it learns nothing). A held-out loss (``Trainer.eval_loss``)
calls the loss too, so it sleeps as well: the benchmark ranks by ``sel_auc``, which needs none.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from raysd.families.base import Family, register
from raysd.families.clips import Batch, ClipSet, DataInfo

EVENTS_ENV = "RAYSD_SLEEP_EVENTS"


@dataclass
class SleepConfig:
    frames: int = 32
    hop: int = 32
    epoch_seconds: float = 10.0
    knob: float = 0.5  # searched, without effect: something for the searcher to propose

    def validate(self) -> None:
        if self.frames < 1 or self.hop < 1:
            raise ValueError(f"frames and hop must be >= 1, got {self.frames}, {self.hop}")
        if self.epoch_seconds < 0:
            raise ValueError(f"epoch_seconds must be >= 0, got {self.epoch_seconds}")


class SleepNet(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.head = nn.Linear(dim, 1)
        self.register_buffer("seconds_per_window", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x).squeeze(1)


def trial_name() -> str:
    """The Tune trial id: the trial's own in a Tune trainable, the Train run's name (raysd names it so) in a Ray Train
    worker, '' outside Ray."""
    try:
        from ray import tune

        return str(tune.get_context().get_trial_id())
    except Exception:
        pass
    try:
        import ray.train

        return str(ray.train.get_context().get_experiment_name())
    except Exception:
        return ""


@register
class SleepFamily(Family):
    name = "bench_sleep"
    Config = SleepConfig
    description = "benchmark only: epochs that sleep epoch_seconds (benchmarks/orchestration.py)"

    def build(self, info: DataInfo) -> nn.Module:
        return SleepNet(self.hp.frames * info.n_mels)

    def before_training(self, model: nn.Module, data: ClipSet) -> None:
        model.get_buffer("seconds_per_window").fill_(self.hp.epoch_seconds / max(1, data.num_windows))

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        net = model.module if hasattr(model, "module") else model
        start = time.time()
        time.sleep(float(net.get_buffer("seconds_per_window")) * batch.x.shape[0])
        end = time.time()
        folder = os.environ.get(EVENTS_ENV)
        if folder:
            line = json.dumps({"trial": trial_name(), "pid": os.getpid(), "start": start, "end": end})
            with open(Path(folder) / f"{os.getpid()}.jsonl", "a") as f:
                f.write(line + "\n")
        return model(batch.x).pow(2).mean() * 0.0

    def window_scores(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x).float()
