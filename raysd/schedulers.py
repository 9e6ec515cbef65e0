"""Asynchronous successive halving with promotions: a Tune trial scheduler that never discards a trial for good
while it may still rank among the best.

Li et al., "A System for Massively Parallel Hyperparameter Tuning" (MLSys 2020), define ASHA by promotion: rungs
at ``grace_period x reduction_factor^k`` epochs; a trial that reaches a rung waits there, and whenever a slot is
free, the waiting trial at the highest rung that ranks in the top ``1/reduction_factor`` of every trial that has
reached that rung moves on; if none may, a new trial starts. Tune's ``ASHAScheduler`` is the stopping variant: a
trial below the rung's cutoff *at the moment it arrives* stops for good, so the eventual best is lost whenever it
starts slower than the few trials that happened to reach the rung first (on learning curves it often does). Here
such a trial pauses instead (Tune checkpoints it and frees its resources), and resumes once enough trials have
reached the rung that it ranks in the top fraction. A trial that ranks there the moment it arrives goes straight
on, without a pause. The searcher hears of each pause and resume (``on_pause``, ``on_unpause``, the calls Ray's
``HyperBandForBOHB`` makes), so :class:`raysd.tune_optuna.OptunaSearcher` counts only running trials against the
study's concurrency.

When nothing runs or waits to start (the searcher has given its last trial), the best waiting trial at the
highest rung goes on, one at a time, until none of the waiting trials is the best of its rung; the rest stop.
"""

from __future__ import annotations

import math
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler


class PromotionASHA(FIFOScheduler):
    """ASHA by promotion (module docstring), on ``time_attr`` up to ``max_t``.

    Args:
        time_attr: the result's progress key (``training_iteration``: one per epoch).
        max_t: a trial's last epoch.
        grace_period: the first rung.
        reduction_factor: one in this many trials of a rung moves on.
    """

    def __init__(self, time_attr: str = "training_iteration", max_t: int = 100, grace_period: int = 1,
                 reduction_factor: int = 3):
        super().__init__()
        if grace_period < 1 or reduction_factor < 2 or max_t < 1:
            raise ValueError(f"PromotionASHA: grace_period {grace_period} must be >= 1, reduction_factor "
                             f"{reduction_factor} >= 2 and max_t {max_t} >= 1")
        self.time_attr, self.max_t, self.eta = time_attr, max_t, reduction_factor
        self.rungs: list[int] = []
        t = grace_period
        while t < max_t:
            self.rungs.append(t)
            t *= reduction_factor
        self.metric_name: str | None = None
        self.sign = 1.0
        self.recorded: list[dict[str, float]] = [{} for _ in self.rungs]  # rung -> trial id -> value there
        self.waiting: dict[Any, int] = {}  # paused trial -> the rung it waits at
        self.promoted: list[set[str]] = [set() for _ in self.rungs]  # trial ids moved on from each rung

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        if self.metric_name and metric:
            return False
        if metric:
            self.metric_name = metric
        if mode:
            self.sign = 1.0 if mode == "max" else -1.0
        return True

    def _rank(self, rung: int, trial_id: str) -> int:
        """A trial's place among everything that reached ``rung`` (0: the best; ties go to the older trial id)."""
        values = self.recorded[rung]
        own = values[trial_id]
        return sum(1 for tid, v in values.items() if v > own or (v == own and tid < trial_id))

    def _promotable(self, rung: int, trial_id: str) -> bool:
        """Whether a trial ranks in the top ``1/eta`` of everything that reached ``rung``."""
        return self._rank(rung, trial_id) < len(self.recorded[rung]) // self.eta

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        t = result.get(self.time_attr, 0)
        if self.metric_name not in result or t >= self.max_t or t not in self.rungs:
            return TrialScheduler.CONTINUE
        rung = self.rungs.index(t)
        value = float(result[self.metric_name])
        self.recorded[rung][trial.trial_id] = self.sign * value if math.isfinite(value) else -math.inf
        if self._promotable(rung, trial.trial_id):
            self.promoted[rung].add(trial.trial_id)
            return TrialScheduler.CONTINUE
        self.waiting[trial] = rung
        _tell(tune_controller, "on_pause", trial.trial_id)
        return TrialScheduler.PAUSE

    def choose_trial_to_run(self, tune_controller: Any) -> Any:
        for rung in reversed(range(len(self.rungs))):  # the highest rung first
            ready = [t for t, r in self.waiting.items() if r == rung and t.status == Trial.PAUSED
                     and self._promotable(rung, t.trial_id)]
            if ready:
                return self._promote(tune_controller, max(ready, key=lambda t: self.recorded[rung][t.trial_id]), rung)
        trials = tune_controller.get_trials()
        for trial in trials:
            if trial.status == Trial.PENDING:
                return trial
        if any(t.status == Trial.RUNNING for t in trials) or not self.waiting:
            return None
        return self._drain(tune_controller)

    def _promote(self, tune_controller: Any, trial: Any, rung: int) -> Any:
        del self.waiting[trial]
        self.promoted[rung].add(trial.trial_id)
        _tell(tune_controller, "on_unpause", trial.trial_id)
        return trial

    def _drain(self, tune_controller: Any) -> Any:
        """Nothing runs or waits to start: the best waiting trial of the highest rung goes on if it leads its rung;
        otherwise every waiting trial stops."""
        rung = max(self.waiting.values())
        at_rung = [t for t, r in self.waiting.items() if r == rung and t.status == Trial.PAUSED]
        leader = [t for t in at_rung if self._rank(rung, t.trial_id) == 0]
        if leader:
            return self._promote(tune_controller, leader[0], rung)
        for trial in list(self.waiting):
            del self.waiting[trial]
            if trial.status == Trial.PAUSED:
                tune_controller.stop_trial(trial)
        return None

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self.waiting.pop(trial, None)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self.waiting.pop(trial, None)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self.waiting.pop(trial, None)

    def debug_string(self) -> str:
        counts = ", ".join(f"{r}: {len(v)} reached, {len(self.promoted[i])} on" for i, (r, v) in
                           enumerate(zip(self.rungs, self.recorded)))
        return f"PromotionASHA (rungs {counts}; {len(self.waiting)} waiting)"


def _tell(tune_controller: Any, event: str, trial_id: str) -> None:
    """Tell the study's searcher that a trial paused or resumed, if it listens (Tune's controller exposes it as
    ``search_alg.searcher``; Tune's ``ConcurrencyLimiter`` passes both calls on)."""
    searcher = getattr(getattr(tune_controller, "search_alg", None), "searcher", None)
    handler = getattr(searcher, event, None)
    if callable(handler):
        handler(trial_id)
