"""The replay's engine and its contenders: a Tune-like controller that drives Ray's own searchers and schedulers
over a table of learning curves, and every searcher and scheduler the tournament puts through it.

:func:`simulate` is a discrete-event model of one Tune study: ``slots`` trials run at once; each running trial
trains one epoch per time step and reports its recorded value; the scheduler answers CONTINUE, PAUSE or STOP
(``on_trial_result``) and, as Tune's controller does, picks which pending or paused trial runs next
(``choose_trial_to_run``) and may stop paused trials (``stop_trial``); a new trial is asked of the searcher only
when the scheduler has none to run. The objects are Ray's and Optuna's, driven through their public methods, so
HyperBand's pausing and BOHB's ``on_pause``/``on_unpause`` run as in a real study.

Contenders are named ``<searcher>[+<scheduler>]``:

- searchers: raysd's (:mod:`raysd.search_settings`: ``tpe``, ``tpe_default``, ``random``, ``grid``, ``gp``,
  ``cmaes`` and ``tpe:<option>=<value>`` variants) and ``bohb`` (Ray's ``TuneBOHB``, always with
  ``HyperBandForBOHB``; the ``tournament`` extra). Ray's HEBO and Ax wrappers are not contenders: the released
  HEBO (0.3) calls ``DataFrame.append``, gone since pandas 2, and Ray's ``AxSearch`` reads ``Objective.metric``,
  gone from ax-platform 1.x; OptunaHub's AutoSampler is fetched from GitHub at run time, which this benchmark's
  offline machines cannot do;
- schedulers: ``none``, ``asha`` (Tune's, stopping), ``hyperband``, ``promote`` (ASHA by promotion,
  :class:`raysd.schedulers.PromotionASHA`);
- ``topk``: the "train every configuration one epoch, then the best ones to the end" baseline (:func:`top_k`).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SCHEDULERS = ("none", "asha", "hyperband", "promote")
RAY_SEARCHERS = {"bohb": "hpbandster"}  # searcher -> the package it needs


@dataclass(eq=False)  # hashed by identity, as Tune's trials are
class SimTrial:
    """What Ray's schedulers read of a Tune ``Trial``."""

    trial_id: str
    config: int  # the table's configuration it trains
    status: str = "PENDING"
    is_saving: bool = False
    done: int = 0  # epochs trained
    last_result: dict = field(default_factory=dict)


@dataclass
class Run:
    """What one replay did: its budget, use, trials and every trial that ran to its last epoch."""

    budget: int
    used: int = 0  # trial-epochs trained
    steps: int = 0  # time steps (one epoch of every running trial)
    trials: int = 0
    configs: set[int] = field(default_factory=set)
    finished: list[tuple[int, int, int, float]] = field(default_factory=list)  # (used, steps, config, last value)
    stopped: set[int] = field(default_factory=set)  # configurations a scheduler stopped before their last epoch


class Sim:
    """The part of Tune's controller Ray's schedulers call (``get_trials``, ``stop_trial``, ``search_alg``)."""

    def __init__(self, searcher: Any, scheduler: Any, run: Run, epochs: int):
        self.searcher, self.scheduler, self.run, self.epochs = searcher, scheduler, run, epochs
        self.trials: list[SimTrial] = []
        self.search_alg = self  # HyperBandForBOHB calls tune_controller.search_alg.searcher

    def get_trials(self) -> list[SimTrial]:
        return self.trials

    def get_live_trials(self) -> list[SimTrial]:
        return [t for t in self.trials if t.status not in ("TERMINATED", "ERROR")]

    def stop_trial(self, trial: SimTrial) -> None:
        if trial.status in ("TERMINATED", "ERROR"):
            return
        was_running = trial.status == "RUNNING"
        trial.status = "TERMINATED"
        if trial.done < self.epochs:
            self.run.stopped.add(trial.config)
        if was_running:
            self.scheduler.on_trial_complete(self, trial, trial.last_result)
        else:
            self.scheduler.on_trial_remove(self, trial)
        self.searcher.on_trial_complete(trial.trial_id, trial.last_result or None)


def simulate(curves: np.ndarray, metric: str, sign: float, config_of: Callable[[dict], int], searcher: Any,
             scheduler: Any, slots: int, budget: int, done_when: Callable[[Run], bool]) -> Run:
    """One study replayed on ``curves`` (configurations x epochs) until ``budget`` trial-epochs are used, the
    searcher and scheduler have nothing left to run, or ``done_when(run)`` (module docstring)."""
    run = Run(budget=budget)
    epochs = curves.shape[1]
    sim = Sim(searcher, scheduler, run, epochs)
    running: list[SimTrial] = []
    best_so_far = -math.inf
    exhausted = False
    while run.used < budget and not done_when(run):
        while len(running) < slots:
            if not exhausted and not any(t.status == "PENDING" for t in sim.trials):
                params = searcher.suggest(f"t{run.trials}")  # Tune keeps a trial pending while the searcher gives one
                if params is None or params == "FINISHED":
                    exhausted = params == "FINISHED"
                else:
                    trial = SimTrial(f"t{run.trials}", config_of(params))
                    run.trials += 1
                    run.configs.add(trial.config)
                    sim.trials.append(trial)
                    scheduler.on_trial_add(sim, trial)
            chosen = scheduler.choose_trial_to_run(sim)
            if chosen is None:
                break
            chosen.status = "RUNNING"
            running.append(chosen)
        if not running:
            break
        run.steps += 1
        for trial in list(running):
            if run.used >= budget or trial.status != "RUNNING":
                if trial.status != "RUNNING":
                    running.remove(trial)
                continue
            trial.done += 1
            run.used += 1
            value = float(curves[trial.config, trial.done - 1])
            result = {metric: value, "training_iteration": trial.done, "epoch": trial.done, "trial_id": trial.trial_id}
            trial.last_result = result
            decision = scheduler.on_trial_result(sim, trial, result)
            if trial.status != "RUNNING":  # the scheduler stopped it through the controller
                running.remove(trial)
                continue
            if decision != "STOP":
                searcher.on_trial_result(trial.trial_id, result)
            if decision == "PAUSE" and trial.done < epochs:
                trial.status = "PAUSED"
                running.remove(trial)
            elif decision == "STOP" or trial.done >= epochs:
                trial.status = "TERMINATED"
                running.remove(trial)
                scheduler.on_trial_complete(sim, trial, result)
                searcher.on_trial_complete(trial.trial_id, result)
                if trial.done >= epochs:
                    run.finished.append((run.used, run.steps, trial.config, value))
                    best_so_far = max(best_so_far, sign * value)
                else:
                    run.stopped.add(trial.config)
    return run


def top_k(curves: np.ndarray, sign: float, slots: int, budget: int, seed: int,
          done_when: Callable[[Run], bool]) -> Run:
    """"Train 1 epoch, keep the top K": every configuration trains one epoch (in a seeded random order), then
    they train to the end in the order of their first-epoch value, ``slots`` at a time, until the budget is used
    (K is as many as the budget pays for). The baseline of Egele et al., "Is One Epoch All You Need For
    Multi-Fidelity Hyperparameter Optimization?" (ESANN 2023)."""
    run = Run(budget=budget)
    n, epochs = curves.shape
    order = np.random.default_rng(seed).permutation(n)
    for c in order:  # phase 1: one epoch each, `slots` per time step
        if run.used >= budget:
            return run
        run.used += 1
        run.trials += 1
        run.configs.add(int(c))
        if run.used % slots == 0:
            run.steps += 1
    run.steps += 1 if n % slots else 0
    ranked = sorted(order, key=lambda c: (-sign * curves[c, 0], int(np.where(order == c)[0][0])))
    for start in range(0, n, slots):  # phase 2: resume the best from epoch 2, a batch of `slots` at a time
        batch = ranked[start:start + slots]
        for e in range(1, epochs):
            run.steps += 1
            for c in batch:
                run.used += 1
                if run.used > budget:
                    return run
                if e == epochs - 1:
                    run.finished.append((run.used, run.steps, int(c), float(curves[c, -1])))
        if done_when(run):
            break
    return run


def available(searcher: str) -> bool:
    """Whether a Ray-wrapped searcher's package imports here (the tournament extra)."""
    package = RAY_SEARCHERS.get(searcher.split(":")[0])
    if package is None:
        return True
    return importlib.util.find_spec(package) is not None and importlib.util.find_spec("ConfigSpace") is not None


def ray_space(space: dict[str, Any]) -> dict[str, Any]:
    """A preset space (``{loguniform: [lo, hi]}``, ``{choice: [...]}``) as Ray Tune's search space."""
    from ray import tune

    out = {}
    for key, entry in space.items():
        (dist, args), = entry.items()
        out[key] = tune.loguniform(*args) if dist == "loguniform" else tune.choice(list(args))
    return out


def ray_searcher(name: str, space: dict[str, Any], metric: str, mode: str, seed: int) -> Any:
    """Ray's wrapper of BOHB (Falkner et al., ICML 2018) over ``space``, seeded."""
    if name != "bohb":
        raise ValueError(f"unknown Ray searcher {name!r}")
    import logging

    from ray.tune.search.bohb import TuneBOHB

    logging.getLogger("hpbandster").setLevel(logging.WARNING)  # its KDE dumps, once per suggestion
    searcher = TuneBOHB(seed=seed)
    searcher.set_search_properties(metric, mode, ray_space(space))
    return searcher


def ray_scheduler(name: str, epochs: int, grace: int, reduction: int) -> Any:
    """The study's scheduler for a tournament key (``none`` is Tune's FIFO)."""
    from ray.tune.schedulers import FIFOScheduler, HyperBandForBOHB, HyperBandScheduler

    from raysd import searchers
    from raysd.presets import Scheduler

    if name == "none":
        return FIFOScheduler()
    if name == "hyperband":
        return HyperBandScheduler(time_attr="training_iteration", max_t=epochs, reduction_factor=reduction)
    if name == "hyperband_bohb":
        return HyperBandForBOHB(time_attr="training_iteration", max_t=epochs, reduction_factor=reduction)
    return searchers.make_scheduler(Scheduler(type=name, grace_period=grace, reduction_factor=reduction), epochs)
