"""``test_crash``: ``dense_ae`` whose trial process dies (``os._exit``) at the end of one epoch, in as many of a
trial's attempts as its config says, for ``tests/test_reliability.py``. Never in raysd's registry: the test names
this module in ``$RAYSD_FAMILY_MODULES``, so the trial processes import it when they look the family up.

Every epoch a trial trains is appended to ``$RAYSD_CRASH_DIR/<trial id>.epochs`` (one line each, the crashed epoch
included), and each crash leaves ``<trial id>.crash<N>`` there: the test reads what was trained and how often."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from raysd.families.base import register
from raysd.families.clips import ClipSet, DataInfo
from raysd.families.dense_ae import DenseAEConfig, DenseAEFamily

CRASH_DIR_ENV = "RAYSD_CRASH_DIR"


@dataclass
class CrashConfig(DenseAEConfig):
    crash_at_epoch: int = 2  # the process dies when this epoch's training ends, before its report
    crashes: int = 1  # in this many attempts of a trial (then it trains on)


def trial_id() -> str:
    from ray import tune

    return str(tune.get_context().get_trial_id())


@register
class CrashFamily(DenseAEFamily):
    name = "test_crash"
    Config = CrashConfig

    def build(self, info: DataInfo) -> nn.Module:
        model = super().build(info)
        model.register_buffer("epochs_trained", torch.zeros((), dtype=torch.long))  # restored with a checkpoint
        return model

    def after_training(self, model: nn.Module, data: ClipSet) -> None:
        super().after_training(model, data)
        counter = model.get_buffer("epochs_trained")
        counter += 1
        folder, tid, epoch = Path(os.environ[CRASH_DIR_ENV]), trial_id(), int(counter)
        with open(folder / f"{tid}.epochs", "a") as f:
            f.write(f"{epoch}\n")
        done = len(list(folder.glob(f"{tid}.crash*")))
        if epoch == self.hp.crash_at_epoch and done < self.hp.crashes:
            (folder / f"{tid}.crash{done + 1}").touch()
            os._exit(1)
