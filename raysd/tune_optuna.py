"""The Optuna searcher of a study, made safe to resume.

Optuna's study lives in its own storage (SQLite by default), written the moment a trial ends; Tune's
experiment state is a snapshot written every few seconds. A driver stopped between the two leaves a trial
finished in Optuna but still running in Tune's snapshot, so the resumed Tune reports it again, and plain
``OptunaSearch`` then raises ``UpdateFinishedTrialError`` and ends the whole study.
"""

from __future__ import annotations

import optuna
from ray.tune.search.optuna import OptunaSearch


class ResumableOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that does not report again to a trial its Optuna storage has already finished
    (completing it again is already only a warning in ``OptunaSearch``)."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass
