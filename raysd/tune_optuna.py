"""The Optuna searcher of a study, made safe to resume, and honest about trials the scheduler stops early.

Optuna's study lives in its own storage (SQLite by default), written the moment a trial ends; Tune's
experiment state is a snapshot written every few seconds. A driver stopped between the two leaves a trial
finished in Optuna but still running in Tune's snapshot, so the resumed Tune reports it again, and plain
``OptunaSearch`` then raises ``UpdateFinishedTrialError`` and ends the whole study.

``points_to_evaluate`` have the same problem the other way round: ``OptunaSearch`` enqueues them in the Optuna
study whenever Tune hands it the search space, which ``Tuner.restore`` does again before it restores the
searcher's state, so plain ``OptunaSearch`` would evaluate every point a second time after a resume.

Trials stopped early: when ASHA stops a trial, Tune does not pass that last result to the searcher's
``on_trial_result`` but calls ``on_trial_complete(trial_id, result=last_result)``, and ``OptunaSearch`` then
tells Optuna the trial is COMPLETE with its last intermediate value, as if it were a final one (Ray 2.60,
``ray/tune/search/optuna/optuna_search.py``). TPE then ranks a configuration stopped after one epoch against
finished ones by an early value it never reached the end with: a low early value makes it look worse than it
is, and a curve that peaks early (selection AUC often falls as an autoencoder overfits) makes it look better.
With ``stopped_as_pruned`` the searcher reports that last value as an intermediate value and tells the trial
PRUNED instead, as Optuna's own pruners do: TPE then ranks every finished trial above every stopped one, and
stopped ones by how far they got, then by their last value, which is the order ASHA itself decided by.
"""

from __future__ import annotations

import math

import optuna
from ray.tune.search.optuna import OptunaSearch


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that does not report again to a trial its Optuna storage has already finished
    (completing it again is already only a warning in ``OptunaSearch``), that enqueues a point to
    evaluate only if the study holds no trial with the same parameters (Optuna's ``skip_if_exists``), and,
    with ``stopped_as_pruned``, tells a trial that ended before ``epochs`` as PRUNED (module docstring).

    Args:
        epochs: a trial's planned epochs; a result whose ``epoch`` (else ``training_iteration``) is lower ends
            a trial that was stopped early.
        stopped_as_pruned: tell such trials PRUNED rather than COMPLETE.
        **kwargs: ``OptunaSearch``'s.
    """

    def __init__(self, *, epochs: int | None = None, stopped_as_pruned: bool = False, **kwargs):
        self._epochs = epochs
        self._stopped_as_pruned = stopped_as_pruned
        super().__init__(**kwargs)

    def _setup_study(self, mode):
        if self._evaluated_rewards:  # points told with their results: Optuna adds them as finished trials
            return super()._setup_study(mode)
        points, self._points_to_evaluate = self._points_to_evaluate, []
        try:
            super()._setup_study(mode)
        finally:
            self._points_to_evaluate = points
        study = self._ot_study
        assert study is not None  # super() created it
        for point in points:  # complete points (raysd.presets fills every searched key)
            study.enqueue_trial(point, skip_if_exists=True)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass

    def stopped_early(self, result: dict | None) -> bool:
        """Whether a trial's last result ends it before its planned epochs."""
        epochs = getattr(self, "_epochs", None)  # None in a searcher pickled before the option existed
        if not result or not epochs:
            return False
        reached = result.get("epoch", result.get("training_iteration"))
        return isinstance(reached, (int, float)) and reached < epochs

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        value = (result or {}).get(self.metric) if isinstance(self.metric, str) else None
        pruned = (getattr(self, "_stopped_as_pruned", False) and not error and self.stopped_early(result)
                  and isinstance(value, (int, float)) and math.isfinite(value))
        if not pruned or trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)
        assert result is not None and self._ot_study is not None
        ot_trial = self._ot_trials[trial_id]
        try:  # Tune passed the stopping result to no on_trial_result: it is the trial's last intermediate value
            ot_trial.report(value, result.get("training_iteration", result.get("epoch")))
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
        self._completed_trials.add(trial_id)
