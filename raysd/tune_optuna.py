"""The Optuna searcher of a study, made safe to resume.

Optuna's study lives in its own storage (SQLite by default), written the moment a trial ends; Tune's
experiment state is a snapshot written every few seconds. A driver stopped between the two leaves a trial
finished in Optuna but still running in Tune's snapshot, so the resumed Tune reports it again, and plain
``OptunaSearch`` then raises ``UpdateFinishedTrialError`` and ends the whole study.

``points_to_evaluate`` have the same problem the other way round: ``OptunaSearch`` enqueues them in the Optuna
study whenever Tune hands it the search space, which ``Tuner.restore`` does again before it restores the
searcher's state, so plain ``OptunaSearch`` would evaluate every point a second time after a resume.
"""

from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that does not report again to a trial its Optuna storage has already finished
    (completing it again is already only a warning in ``OptunaSearch``), and that enqueues a point to
    evaluate only if the study holds no trial with the same parameters (Optuna's ``skip_if_exists``)."""

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
