"""ASHA by promotion (:class:`raysd.schedulers.PromotionASHA`): a slow starter pauses at a rung and resumes once it
ranks in the rung's top fraction, where Tune's stopping ASHA loses it; and a study drains when the searcher is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from raysd.schedulers import PromotionASHA


@dataclass(eq=False)
class FakeTrial:
    trial_id: str
    status: str = Trial.PENDING
    done: int = 0


@dataclass
class Controller:
    """What a scheduler calls on Tune's controller."""

    trials: list[FakeTrial] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)

    def get_trials(self) -> list[FakeTrial]:
        return self.trials

    def stop_trial(self, trial: FakeTrial) -> None:
        trial.status = Trial.TERMINATED
        self.stopped.append(trial.trial_id)


CURVES = {  # value after each of 9 epochs; "slow" is the eventual best, second after 1 epoch
    "a": [0.60, 0.62, 0.63, 0.64, 0.64, 0.64, 0.64, 0.64, 0.64],
    "b": [0.55, 0.58, 0.60, 0.61, 0.61, 0.62, 0.62, 0.62, 0.62],
    "slow": [0.58, 0.59, 0.70, 0.80, 0.85, 0.88, 0.90, 0.91, 0.92],
    "c": [0.50, 0.52, 0.53, 0.53, 0.53, 0.53, 0.53, 0.53, 0.53],
    "d": [0.45, 0.46, 0.47, 0.47, 0.47, 0.47, 0.47, 0.47, 0.47],
    "e": [0.40, 0.41, 0.42, 0.42, 0.42, 0.42, 0.42, 0.42, 0.42],
}


def run(scheduler: TrialScheduler, order: list[str], slots: int = 1) -> tuple[list[str], Controller]:
    """Trials in ``order`` through ``scheduler`` on the curves, ``slots`` at a time; returns the finished ones."""
    scheduler.set_search_properties("acc", "max")
    ctl, queue, running, finished = Controller(), list(order), [], []
    while True:
        while len(running) < slots:
            if queue and not any(t.status == Trial.PENDING for t in ctl.trials):  # Tune keeps one pending
                ctl.trials.append(FakeTrial(queue.pop(0)))
                scheduler.on_trial_add(ctl, ctl.trials[-1])
            trial = scheduler.choose_trial_to_run(ctl)
            if trial is None:
                break
            trial.status = Trial.RUNNING
            running.append(trial)
        if not running:
            return finished, ctl
        for trial in list(running):
            trial.done += 1
            result = {"acc": CURVES[trial.trial_id][trial.done - 1], "training_iteration": trial.done}
            decision = scheduler.on_trial_result(ctl, trial, result)
            if decision == TrialScheduler.PAUSE:
                trial.status = Trial.PAUSED
                running.remove(trial)
            elif decision == TrialScheduler.STOP or trial.done == 9:
                trial.status = Trial.TERMINATED
                running.remove(trial)
                scheduler.on_trial_complete(ctl, trial, result)
                if trial.done == 9:
                    finished.append(trial.trial_id)


def test_stopping_asha_loses_the_slow_starter_and_promotion_keeps_it() -> None:
    order = ["a", "b", "slow", "c", "d", "e"]
    # stopping ASHA decides on arrival: "slow" reaches the first rung third, below the cutoff of the three so far
    lost, _ = run(ASHAScheduler(time_attr="training_iteration", max_t=9, grace_period=1, reduction_factor=3), order)
    assert "slow" not in lost
    kept, ctl = run(PromotionASHA(max_t=9, grace_period=1, reduction_factor=3), order)
    assert "slow" in kept  # it waited at the first rung until it ranked in its top third, then led the second
    assert "c" in ctl.stopped and "e" in ctl.stopped  # the rest stop when nothing is left to run


def test_a_trial_in_the_top_fraction_goes_straight_on() -> None:
    s = PromotionASHA(max_t=9, grace_period=1, reduction_factor=2)
    s.set_search_properties("acc", "max")
    ctl = Controller()
    trials = [FakeTrial(t) for t in ("e", "a")]
    for t in trials:
        ctl.trials.append(t)
        s.on_trial_add(ctl, t)
    assert s.on_trial_result(ctl, trials[0], {"acc": 0.40, "training_iteration": 1}) == TrialScheduler.PAUSE
    assert s.on_trial_result(ctl, trials[1], {"acc": 0.60, "training_iteration": 1}) == TrialScheduler.CONTINUE
    assert s.rungs == [1, 2, 4, 8]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="reduction_factor"):
        PromotionASHA(max_t=9, grace_period=1, reduction_factor=1)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_search_pauses_and_resumes_trials_from_their_checkpoints(tiny_root, tmp_path) -> None:
    """``scheduler: {type: promote}`` through ``python -m raysd.search``: trials pause at a rung (Tune checkpoints
    and frees them) and the promoted ones resume where they stopped, with no epoch trained twice."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({
        "name": "promoted", "dataset": {"layout": "auto"}, "rule": "2020", "machine_types": ["fan"],
        "features": {"sample_rate": 16000, "n_fft": 1024, "hop_length": 512, "n_mels": 64, "clip_seconds": 3.0},
        "metric": "sel_auc", "seed": 0, "max_failures": 1, "resources": {"workers": 1, "cpus_per_worker": 1},
        "scheduler": {"type": "promote", "grace_period": 1, "reduction_factor": 2},
        "families": {"dense_ae": {"num_samples": 5, "epochs": 3,
                                  "space": {"lr": {"loguniform": [1e-5, 1e-2]}, "batch_size": 512}}},
    }))
    exp = tmp_path / "exp"
    done = subprocess.run([sys.executable, "-m", "raysd.search", str(preset), "--data-root", str(tiny_root),
                           "--cache-dir", str(tmp_path / "cache"), "--storage-path", str(exp), "--no-leaderboard"],
                          cwd=tmp_path, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, capture_output=True,
                          text=True, timeout=850)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    records = [json.loads(f.read_text()) for f in (exp / "promoted" / "trials" / "fan__dense_ae").glob("*.json")]
    assert len(records) == 5 and {r["status"] for r in records} <= {"finished", "stopped early"}
    assert any(r["status"] == "finished" for r in records) and any(r["status"] == "stopped early" for r in records)
    for result in (exp / "promoted" / "studies" / "fan__dense_ae").glob("*/result.json"):
        epochs = [json.loads(line)["epoch"] for line in result.read_text().splitlines() if line.strip()]
        # no epoch trained twice (Tune's result.json may lack the line of an epoch around a pause)
        assert epochs == sorted(set(epochs)) and epochs[-1] <= 3, f"{result.parent.name} trained {epochs}"
