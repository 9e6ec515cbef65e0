"""A study's searcher: Optuna's ask-and-tell interface behind Ray Tune's ``Searcher`` interface.

Tune asks :meth:`OptunaSearcher.suggest` for each new trial's searched values (the fixed ones stay in Tune's
``param_space``); the searcher asks Optuna's sampler, reports each epoch's metric to the Optuna trial as an
intermediate value, and tells Optuna how the trial ended:

- finished: COMPLETE with its last value;
- stopped early by the scheduler (ASHA): PRUNED, its last value an intermediate one, as Optuna's own pruners
  leave a trial (``stopped_as_pruned``; else COMPLETE with the last value). TPE then ranks every finished trial
  above every stopped one, and stopped ones by how far they got, then by their last value, the order ASHA
  itself decided by;
- infeasible (the configuration cannot train on this data) or failed (its loss became NaN): PRUNED at the last
  epoch it reached, so TPE counts the configuration among the bad ones and learns to avoid it;
- lost (Tune ended it with an error after its retries): FAIL, which samplers ignore: it says nothing of the
  configuration.

The Optuna study lives in its own storage (SQLite by default), written the moment a trial ends, while Tune
snapshots the searcher every few seconds. Every ``tell`` therefore skips a trial Optuna already finished, points
to evaluate are enqueued only if the study holds no trial with the same values, and a restored searcher fails
the Optuna trials it asked for but Tune never started (so ``constant_liar`` does not count them as running
forever).
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Sequence
from typing import Any, Literal

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState
from ray.tune.search import Searcher

PRIMITIVE = (type(None), bool, int, float, str)  # what Optuna stores as a categorical value


def distributions(space: dict[str, Any]) -> tuple[dict[str, BaseDistribution], set[str]]:
    """The Optuna distributions of a preset space's searched keys (``{loguniform: [lo, hi]}`` and the like; a
    ``randint``'s upper bound is excluded, as in the preset), and the keys whose choices travel as JSON text
    (lists or mappings, which Optuna cannot store)."""
    out: dict[str, BaseDistribution] = {}
    encoded = set()
    for key, entry in space.items():
        if not isinstance(entry, dict):
            continue
        (dist, args), = entry.items()
        if dist == "choice":
            if not all(isinstance(c, PRIMITIVE) for c in args):
                encoded.add(key)
                args = [json.dumps(c) for c in args]
            out[key] = CategoricalDistribution(list(args))
        elif dist == "randint":
            out[key] = IntDistribution(int(args[0]), int(args[1]) - 1)
        else:
            out[key] = FloatDistribution(float(args[0]), float(args[1]), log=dist == "loguniform")
    return out, encoded


class OptunaSearcher(Searcher):
    """Tune searcher on an Optuna study (module docstring).

    Args:
        space: a preset's space (:mod:`raysd.presets`); its searched keys are the searcher's (:func:`distributions`).
        metric, mode: what Tune reports and whether to maximise or minimise it.
        study_name: the Optuna study's name in ``storage_url``.
        storage_url: an Optuna storage URL (``None``: in memory, not resumable).
        sampler: the Optuna sampler.
        points: complete configurations of ``space`` to evaluate first, in order.
        epochs: a trial's planned epochs; a result whose ``epoch`` (else ``training_iteration``) is lower ends a
            trial that was stopped early.
        stopped_as_pruned: tell such trials PRUNED rather than COMPLETE.
    """

    def __init__(self, space: dict[str, Any], metric: str, mode: str, study_name: str,
                 storage_url: str | None, sampler: optuna.samplers.BaseSampler, points: Sequence[dict] = (),
                 epochs: int | None = None, stopped_as_pruned: bool = True):
        super().__init__(metric=metric, mode=mode)
        self.space, self.encoded = distributions(space)
        self.study_name, self.storage_url, self.sampler = study_name, storage_url, sampler
        self.points = [self._encode(p) for p in points]
        self.epochs, self.stopped_as_pruned = epochs, stopped_as_pruned
        self.running: dict[str, int] = {}  # Tune trial id -> Optuna trial number
        self.paused: set[str] = set()  # running trials a scheduler paused (they hold no resources)
        self.max_concurrent = 0  # Tune's max_concurrent_trials (0: no limit)
        self._study: optuna.Study | None = None
        self._trials: dict[str, optuna.trial.Trial] = {}  # asked in this process: they take intermediate values

    # ------------------------------------------------------------------ Optuna study
    @property
    def study(self) -> optuna.Study:
        if self._study is None:
            direction: Literal["maximize", "minimize"] = "maximize" if self.mode == "max" else "minimize"
            self._study = optuna.create_study(study_name=self.study_name, storage=self.storage_url,
                                              sampler=self.sampler, direction=direction, load_if_exists=True)
            for point in self.points:
                self._study.enqueue_trial(point, skip_if_exists=True)
        return self._study

    def _encode(self, params: dict[str, Any]) -> dict[str, Any]:
        return {k: json.dumps(v) if k in self.encoded else v for k, v in params.items()}

    def _decode(self, params: dict[str, Any]) -> dict[str, Any]:
        return {k: json.loads(v) if k in self.encoded else v for k, v in params.items()}

    # ------------------------------------------------------------------ Tune's Searcher interface
    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        """Accepted as they are: the searcher was made with the study's metric, mode and space."""
        return True

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        """Tune's ``max_concurrent_trials``, kept here rather than by Tune's ``ConcurrencyLimiter``: a trial that a
        scheduler paused (:meth:`on_pause`) does not count, so a scheduler that pauses trials at rungs never starves
        the study of new ones."""
        self.max_concurrent = int(max_concurrent)
        return True

    def on_pause(self, trial_id: str) -> None:
        if trial_id in self.running:
            self.paused.add(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        self.paused.discard(trial_id)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.max_concurrent and len(self.running) - len(self.paused) >= self.max_concurrent:
            return None
        trial = self.study.ask(self.space)
        self.running[trial_id], self._trials[trial_id] = trial.number, trial
        return self._decode(trial.params)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        trial, value = self._trials.get(trial_id), result.get(self.metric)
        if trial is not None and isinstance(value, (int, float)) and math.isfinite(value):
            trial.report(float(value), self._step(result))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        number = self.running.pop(trial_id, None)
        trial = self._trials.pop(trial_id, None)
        self.paused.discard(trial_id)
        if number is None:
            return
        result = result or {}
        raw = result.get(self.metric)
        value = float(raw) if isinstance(raw, (int, float)) else math.nan
        finite = math.isfinite(value)
        if error:
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        elif result.get("infeasible") or result.get("failed"):
            if trial is not None:
                trial.set_user_attr("raysd_ended", str(result.get("infeasible") or result.get("failed")))
            self.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
        elif finite and self.stopped_early(result) and self.stopped_as_pruned:
            if trial is not None:  # Tune passed the stopping result to no on_trial_result
                trial.report(value, self._step(result))
            self.study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
        elif finite:
            self.study.tell(number, value, skip_if_finished=True)
        else:
            self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)

    @staticmethod
    def _step(result: dict) -> int:
        return int(result.get("epoch", result.get("training_iteration", 0)) or 0)

    def stopped_early(self, result: dict) -> bool:
        """Whether a trial's last result ends it before its planned epochs."""
        reached = result.get("epoch", result.get("training_iteration"))
        return bool(self.epochs) and isinstance(reached, (int, float)) and reached < (self.epochs or 0)

    # ------------------------------------------------------------------ persistence
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_study", "_trials")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update({"paused": set(), "max_concurrent": 0, **state})
        self._study, self._trials = None, {}

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__getstate__(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__setstate__(pickle.load(f))
        known = set(self.running.values())
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in known:  # asked after Tune's last snapshot: no Tune trial will ever report it
                self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
