"""Experiment tracking through Ray Tune's own callbacks: ``--tracking tensorboard mlflow wandb``.

- TensorBoard: Ray Tune writes event files for every trial (its default loggers), in each trial's folder under
  ``<experiment>/studies/<study>/``: ``tensorboard --logdir <experiment>/studies``. Always on.
- MLflow (``pip install "raysd[mlflow]"``, the light ``mlflow-skinny``): Ray's ``MLflowLoggerCallback``, one MLflow
  experiment per raysd experiment and one run per trial with its hyperparameters and every epoch's report; after
  the leaderboard, each finished trial's run gets its report-half and full-test figures (:func:`log_figures`). The
  store is ``$MLFLOW_TRACKING_URI`` when set, else an SQLite file in the experiment folder (``mlflow.db``; MLflow 3
  refuses its old file store): ``mlflow ui --backend-store-uri sqlite:///<experiment>/mlflow.db`` (with the full
  ``mlflow`` package).
- Weights & Biases (``pip install "raysd[wandb]"``): Ray's ``WandbLoggerCallback``, project = the experiment's name,
  group = the study; ``WANDB_MODE=offline`` keeps the runs in each trial's folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from raysd import storage

if TYPE_CHECKING:  # pandas stays out of `python -m raysd.search --help`
    import pandas as pd

TRACKERS = ("tensorboard", "mlflow", "wandb")
MLFLOW_DB = "mlflow.db"
REPORTED = ("report_official", "report_auc", "report_pauc", "test_official", "test_auc", "test_pauc")


class TrackingError(RuntimeError):
    """A tracker that cannot be used here, with the install that fixes it."""


def experiment_name(experiment: str) -> str:
    return experiment.rstrip("/").rsplit("/", 1)[-1]


def mlflow_uri(experiment: str) -> str:
    """Where the MLflow runs of an experiment go: ``$MLFLOW_TRACKING_URI``, else SQLite in a local experiment
    folder (an experiment in object storage needs the variable)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if storage.is_remote(experiment):
        raise TrackingError(f"--tracking mlflow: the experiment {experiment} is in object storage; set "
                            "MLFLOW_TRACKING_URI to a tracking server or database every node reaches")
    return f"sqlite:///{Path(experiment) / MLFLOW_DB}"


def check(trackers: list[str], experiment: str) -> None:
    """Fail before the search starts when a tracker's package is missing (with the install that fixes it)."""
    import importlib.util

    for name, module, extra in (("mlflow", "mlflow", "mlflow"), ("wandb", "wandb", "wandb")):
        if name in trackers and importlib.util.find_spec(module) is None:
            raise TrackingError(f"--tracking {name} needs the {module} package: pip install \"raysd[{extra}]\"")
    if "mlflow" in trackers:
        mlflow_uri(experiment)


def callbacks(trackers: list[str], experiment: str, study: str) -> list[Any]:
    """The Tune callbacks of a study for ``trackers`` (TensorBoard needs none: Tune writes it anyway)."""
    out: list[Any] = []
    if "mlflow" in trackers:
        from ray.air.integrations.mlflow import MLflowLoggerCallback

        out.append(MLflowLoggerCallback(tracking_uri=mlflow_uri(experiment), experiment_name=experiment_name(experiment),
                                        tags={"raysd_study": study}))
    if "wandb" in trackers:
        from ray.air.integrations.wandb import WandbLoggerCallback

        out.append(WandbLoggerCallback(project=experiment_name(experiment), group=study))
    return out


def log_figures(experiment: str, board: pd.DataFrame) -> int:
    """Log each finished trial's report-half and full-test figures (``leaderboard.csv``'s, for its machine type) to
    its MLflow run; returns the runs updated."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri(experiment))
    found = client.get_experiment_by_name(experiment_name(experiment))
    if found is None:
        return 0
    updated = 0
    for row in board[board["status"] == "finished"].itertuples(index=False):
        runs = client.search_runs([found.experiment_id], filter_string=f"tags.trial_name LIKE '%_{row.trial_id}'")
        if not runs:
            continue
        suffix = "" if row.scope == "machine_type" else f"_{row.machine_type}"
        for key in REPORTED:
            value = getattr(row, key, math.nan)
            if isinstance(value, float) and math.isfinite(value):
                client.log_metric(runs[0].info.run_id, key + suffix, value)
        updated += 1
    return updated
