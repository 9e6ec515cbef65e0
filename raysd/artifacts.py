"""The single owner of raysd's on-disk formats: where a search's results lie and what each file holds.

An experiment folder (local, s3:// or gs://) holds ``experiment.json``, one trial record per trial
(``trials/<study>/<trial_id>.json``, :class:`TrialRecord`, written by the study's driver when the trial ends),
Ray Tune's study folders (``studies/<study>/``, with a single-worker trial's checkpoints) and Ray Train's runs of
multi-worker trials (``train/<study>/<trial_id>/``). Each checkpoint holds the trainer state (``state.pt``, loaded
weights-only) and :class:`CheckpointInfo` (``trial.json``); the last one also holds the per-clip score tables that
everything downstream reads.
``ensemble.json`` (written by the leaderboard, read by ``raysd.score``) names, per machine type, the chosen
members with their standardisation statistics, the combination rule and a decision threshold per section.

A format change is one edit here.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import torch

from raysd import storage
from raysd.data.features import FeatureSpec
from raysd.ensemble import EnsembleError, fit_stats, standardise
from raysd.families.base import create_family, split_params
from raysd.families.clips import DataInfo
from raysd.train import Trainer

EXPERIMENT_FILE = "experiment.json"
STUDIES_FILE = "studies.json"  # each study's outcome, written by raysd.search at the end
OPTUNA_DIR = "optuna"  # the studies' Optuna SQLite files
TRIALS_DIR, STUDIES_DIR, TRAIN_DIR = "trials", "studies", "train"
CHECKPOINT_PREFIX = "checkpoint_"

STATE_FILE = "state.pt"
TRIAL_FILE = "trial.json"
SCORES_TEST = "scores_test.csv"
SCORES_TRAIN = "scores_train.csv"
SCORES_HELDOUT = "scores_heldout.csv"  # unlabelled data: held-out clips
PRUNED_FILE = "pruned.csv"  # training clips that anomaly pruning dropped

ENSEMBLE_FILE = "ensemble.json"
ENSEMBLE_VERSION = 1
DEFAULT_QUANTILE = 0.9  # decision threshold: this quantile of the standardised training scores per section
STANDARDISATION = "z = (score - mean) / std of the member's scores on the section's training clips (population std)"


class ArtifactError(RuntimeError):
    """A result file that cannot be read or used, with what is wrong."""


# ---------------------------------------------------------------------- experiment layout
def trial_record_path(experiment: str, study: str, trial_id: str) -> str:
    return storage.join(experiment, TRIALS_DIR, study, f"{trial_id}.json")


def train_storage(experiment: str, study: str) -> str:
    """Where Ray Train keeps the runs (checkpoints) of a study's trials."""
    return storage.join(experiment, TRAIN_DIR, study)


# ---------------------------------------------------------------------- trial records and checkpoints
STATUSES = ("finished", "stopped early", "infeasible", "failed", "unfinished")
TUNE_BOOKKEEPING = frozenset({  # keys Ray Tune adds to every report that say nothing of the trial's outcome
    "config", "date", "timestamp", "hostname", "pid", "node_ip", "experiment_tag", "should_checkpoint",
    "checkpoint_dir_name", "done", "iterations_since_restore", "time_since_restore", "time_this_iter_s"})


def trial_outcome(last: dict[str, Any], epochs: int | None, error: str | None = None) -> tuple[str, str]:
    """(status, reason) of a trial from its last report (``last``), its planned ``epochs`` and the error Ray Tune
    ended it with (after its retries): one of :data:`STATUSES`. A trial whose last report did not reach its
    epochs, without an error, was stopped by the scheduler."""
    if error:
        return "failed", error
    if last.get("infeasible"):
        return "infeasible", str(last["infeasible"])
    if last.get("failed"):
        return "failed", str(last["failed"])
    reached = last.get("epoch", last.get("training_iteration"))
    if not isinstance(reached, (int, float)):
        return "unfinished", "no result reported"
    if epochs is None or reached >= epochs:
        return "finished", ""
    return "stopped early", f"stopped by the scheduler after {reached:g} of {epochs} epochs"


@dataclass
class TrialRecord:
    """``trials/<study>/<trial_id>.json``: a trial's outcome (:func:`trial_outcome`), its last report and where its
    last checkpoint lies, written once by the study's driver when the trial ends."""

    study: str = ""
    family: str = ""
    machine_type: str = ""  # the machine type, or 'all' for a study over several
    trial_id: str = ""
    params: dict = field(default_factory=dict)
    machine_types: list[str] | None = None  # the types a study over several covers
    scope: str | None = None  # the family's scope when not 'machine_type'
    workers: int | None = None
    gpus: float | None = None
    status: str = "finished"  # one of STATUSES
    reason: str | None = None
    metrics: dict | None = None
    wall_seconds: float | None = None
    gpu_hours: float | None = None
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def ended(self, last: dict[str, Any], epochs: int | None, checkpoint: str | None,
              error: str | None = None) -> TrialRecord:
        """This record with a trial's outcome (:func:`trial_outcome`) from its last report ``last``; its wall time
        (and GPU hours) from Tune's ``time_total_s``; its checkpoint when it has a model."""
        status, reason = trial_outcome(last, epochs, error)
        metrics = {k: v for k, v in last.items() if isinstance(v, (int, float, str, bool)) and k not in TUNE_BOOKKEEPING}
        seconds = last.get("time_total_s")
        wall = float(seconds) if isinstance(seconds, (int, float)) else None
        return dataclasses.replace(self, status=status, reason=reason or None, metrics=metrics, wall_seconds=wall,
                                   gpu_hours=(self.gpus or 0.0) * wall / 3600 if wall is not None else None,
                                   checkpoint=checkpoint if status in ("finished", "stopped early") else None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def write(self, experiment: str) -> None:
        storage.write_json(trial_record_path(experiment, self.study, self.trial_id), self.to_dict())


def read_trial_record(uri: str) -> TrialRecord:
    return TrialRecord.from_dict(storage.read_json(uri))


@dataclass
class CheckpointInfo:
    """``trial.json`` of a checkpoint: how to rebuild the model (family, params, feature spec, data info)."""

    family: str
    machine_type: str
    params: dict
    spec: dict
    info: dict
    epoch: int | None = None
    layout: str | None = None
    final_metrics: dict | None = None  # the last report, in the last checkpoint only
    parts: dict | None = None  # a first-shot trial's models: machine type -> its data info (``info`` is then {})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if v is not None or k == "final_metrics"}


def write_checkpoint(folder: str | os.PathLike, state: dict, info: CheckpointInfo | dict,
                     test: pd.DataFrame | None = None, train: pd.DataFrame | None = None,
                     heldout: pd.DataFrame | None = None, pruned: pd.DataFrame | None = None) -> Path:
    """A checkpoint folder: ``state.pt``, ``trial.json`` and whichever score tables are given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / STATE_FILE)
    doc = info.to_dict() if isinstance(info, CheckpointInfo) else info
    (folder / TRIAL_FILE).write_text(json.dumps(doc, default=str))
    for name, table in ((SCORES_TEST, test), (SCORES_TRAIN, train), (SCORES_HELDOUT, heldout), (PRUNED_FILE, pruned)):
        if table is not None:
            table.to_csv(folder / name, index=False)
    return folder


def read_checkpoint_info(checkpoint: str) -> dict[str, Any]:
    return storage.read_json(storage.join(checkpoint, TRIAL_FILE))


def is_checkpoint(path: str | os.PathLike) -> bool:
    return storage.exists(storage.join(str(path), TRIAL_FILE)) and storage.exists(storage.join(str(path), STATE_FILE))


# ---------------------------------------------------------------------- ensemble.json
def thresholds(train: pd.DataFrame, quantile: float) -> dict[tuple[str, str], float]:
    """Decision threshold per (machine_type, section): a quantile of the standardised training scores."""
    out = {}
    for (mt, sec), g in train.groupby(["machine_type", "section"], sort=True):
        out[(str(mt), str(sec))] = float(np.quantile(g["score"].astype(float).to_numpy(), quantile))
    return out


def member_entry(name: str, family: str, checkpoint: str, params: dict, stats: pd.DataFrame, weight: int = 1,
                 info: dict | None = None, study: str | None = None, trial_id: str | None = None,
                 machine_type: str | None = None) -> dict:
    """What ``raysd.score`` needs to rebuild and standardise one member. ``info`` is the checkpoint's
    ``trial.json`` (read from ``checkpoint`` when not given; without it the entry lacks the feature spec). A
    first-shot trial holds one model per machine type: ``machine_type`` picks the member's (its ``part``)."""
    if info is None:
        try:
            info = read_checkpoint_info(checkpoint)
        except (OSError, json.JSONDecodeError) as e:
            warnings.warn(f"raysd leaderboard: {name}: cannot read {TRIAL_FILE} from its checkpoint ({e}); "
                          "ensemble.json lacks its feature spec", stacklevel=2)
            info = {}
    config = {}
    try:
        hp, cfg = split_params(family, params)
        config = {"train": dataclasses.asdict(hp), "family": dataclasses.asdict(cfg)}
    except (KeyError, ValueError, TypeError) as e:
        warnings.warn(f"raysd leaderboard: {name}: its parameters do not make a {family} config ({e})", stacklevel=2)
    entry = {
        "name": name, "study": study, "trial_id": trial_id, "family": family, "weight": int(weight),
        "checkpoint": checkpoint, "state": storage.join(checkpoint, STATE_FILE), "params": params, "config": config,
        "spec": info.get("spec"), "info": info.get("info"), "epoch": info.get("epoch"),
        "part": machine_type if info.get("parts") else None,
        "stats": {str(r.section): {"mean": float(r.mean), "std": float(r.std), "n": int(r.n)}
                  for r in stats.itertuples(index=False)},
    }
    if entry["part"] is not None:
        if machine_type not in info["parts"]:
            raise ArtifactError(f"member {name}: its checkpoint {checkpoint} holds models of "
                                f"{', '.join(info['parts'])}, not of {machine_type!r}")
        entry["info"] = info["parts"][machine_type]
    return {k: v for k, v in entry.items() if v is not None or k not in ("study", "trial_id", "part")}


def type_entry(ensemble: str, kind: str, combine: str, members: list[dict], threshold: dict[str, float],
               figures: dict[str, float] | None = None) -> dict:
    """The ``ensemble.json`` entry of one machine type."""
    entry = {"ensemble": ensemble, "kind": kind, "combine": combine, "members": members,
             "sections": sorted(threshold), "threshold": threshold}
    if figures is not None:
        entry["figures"] = figures
    return entry


def ensemble_document(types: dict[str, dict], quantile: float, layout: str, **about: Any) -> dict:
    """The ``ensemble.json`` document around the per-machine-type entries; ``about`` says where it came from."""
    return {"version": ENSEMBLE_VERSION, **about, "layout": layout, "quantile": quantile,
            "standardisation": STANDARDISATION, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine_types": types}


def checkpoint_document(ckpt: str, quantile: float = DEFAULT_QUANTILE) -> dict:
    """An ensemble document of one trial's last checkpoint: the trial alone, its scores standardised per section
    with its training-clip scores, the decision threshold at ``quantile`` of those standardised scores."""
    if not 0.0 < quantile < 1.0:
        raise ArtifactError(f"--quantile must be between 0 and 1, got {quantile}")
    try:
        trial = read_checkpoint_info(ckpt)
        train = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(ckpt, SCORES_TRAIN))),
                            dtype={"section": str, "machine_type": str, "file": str}, keep_default_na=False)
    except FileNotFoundError as e:
        raise ArtifactError(f"{ckpt}: not the last checkpoint of a trial ({e.filename or e} is missing; only the "
                            f"last checkpoint holds {SCORES_TRAIN}, needed to standardise and threshold its "
                            "scores)") from None
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{ckpt}: cannot read the trial ({type(e).__name__}: {e})") from None
    for key in ("family", "params", "spec", "info", "machine_type"):
        if not trial.get(key):
            raise ArtifactError(f"{storage.join(ckpt, TRIAL_FILE)} lacks {key!r}")
    mt = str(trial["machine_type"])
    train = train.assign(machine_type=mt)
    try:
        stats = fit_stats(train, storage.join(ckpt, SCORES_TRAIN))
        z = standardise(train.loc[train["split"] == "train"] if "split" in train.columns else train, stats)
    except (EnsembleError, KeyError) as e:
        raise ArtifactError(f"{ckpt}: {e}") from None
    thr = {s: v for (_, s), v in thresholds(z, quantile).items()}
    layout = trial.get("layout") or ("recordings" if "offset" in train.columns else "dcase2020")
    member = member_entry(f"{trial['family']}/{PurePosixPath(str(ckpt).rstrip('/')).parent.name or 'trial'}",
                          trial["family"], str(ckpt), trial["params"], stats, info=trial)
    types = {mt: type_entry("single trial", "single", "mean", [member], thr)}
    return ensemble_document(types, quantile, layout, source="checkpoint")


def read_ensemble(path: str | os.PathLike, quantile: float = DEFAULT_QUANTILE) -> dict:
    """An ensemble document from an ``ensemble.json`` or from a trial's checkpoint folder."""
    if is_checkpoint(path):
        return checkpoint_document(str(path), quantile)
    if os.path.isdir(path):
        raise ArtifactError(f"{path}: a folder, but not a trial checkpoint (no {TRIAL_FILE} and {STATE_FILE}); pass "
                            f"an {ENSEMBLE_FILE} written by python -m raysd.leaderboard or a trial's last checkpoint "
                            "folder")
    try:
        doc = json.loads(storage.read_bytes(path))
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: cannot read ensemble file ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("machine_types"), dict) or not doc["machine_types"]:
        raise ArtifactError(f"{path}: not a raysd ensemble file (expected a 'machine_types' mapping as written by "
                            "python -m raysd.leaderboard)")
    for mt, entry in doc["machine_types"].items():
        for key in ("combine", "members", "threshold"):
            if key not in entry:
                raise ArtifactError(f"{path}: machine type {mt!r} lacks key {key!r}")
        for i, m in enumerate(entry["members"]):
            for key in ("family", "params", "spec", "info", "stats"):
                if not m.get(key):
                    raise ArtifactError(f"{path}: machine type {mt!r}, member {i} ({m.get('name', '?')}) lacks "
                                        f"{key!r}")
            if not (m.get("state") or m.get("checkpoint")):
                raise ArtifactError(f"{path}: machine type {mt!r}, member {i} has no checkpoint")
    return doc


# ---------------------------------------------------------------------- loading members
@dataclass
class Member:
    name: str
    trainer: Trainer  # holds the member's model
    spec: FeatureSpec
    weight: float
    stats: dict[str, tuple[float, float]]  # section -> (mean, std)


@dataclass
class TypeModel:
    machine_type: str
    combine: str
    members: list[Member]
    threshold: dict[str, float]

    @property
    def sections(self) -> list[str]:
        return sorted(self.threshold)


def report_path(uri: str, folder: str | os.PathLike) -> str:
    """A local path as a report in ``folder`` names it: relative to that folder, so that no report names a machine's
    folders and a results folder moved together with its experiment still finds the checkpoints. A remote URI (or
    an empty value) is kept as it is."""
    if not uri or storage.is_remote(uri) or storage.is_remote(folder):
        return uri
    return Path(os.path.relpath(os.path.abspath(uri), os.path.abspath(folder))).as_posix()


def portable_document(doc: dict, folder: str | os.PathLike) -> dict:
    """An ensemble document to be written into ``folder``, with its experiment and members' checkpoints named by
    :func:`report_path`; :func:`load_member` resolves them against the file's folder."""
    out = {**doc}
    if isinstance(out.get("experiment"), str):
        out["experiment"] = report_path(out["experiment"], folder)
    out["machine_types"] = {
        mt: {**entry, "members": [{**m, **{k: report_path(str(m[k]), folder) for k in ("checkpoint", "state")
                                           if m.get(k)}} for m in entry["members"]]}
        for mt, entry in doc["machine_types"].items()}
    return out


def _resolve(uri: str, base: str) -> str:
    """A member's checkpoint path: absolute or remote as written, or relative to the ensemble file's folder (as the
    leaderboard writes it); a relative path that is not there is tried from the working folder."""
    if storage.is_remote(uri) or os.path.isabs(uri):
        return uri
    beside = storage.join(str(base).rsplit("/", 1)[0], uri) if storage.is_remote(base) else str(Path(base).parent / uri)
    return beside if storage.exists(beside) or not storage.exists(uri) else uri


def load_state(uri: str, device: torch.device | str, what: str) -> dict:
    """A ``state.pt`` loaded weights-only (nothing else is unpickled)."""
    try:
        blob = storage.read_bytes(uri)
    except OSError as e:
        raise ArtifactError(f"{what}: cannot read its weights {uri} ({e})") from None
    try:
        return torch.load(io.BytesIO(blob), map_location=device, weights_only=True)
    except Exception as e:  # an unpickling error names the disallowed global
        raise ArtifactError(f"{what}: {uri} is not a weights-only checkpoint ({type(e).__name__}: {e})") from None


def load_member(entry: dict, device: torch.device, ensemble_path: str) -> Member:
    """Rebuild one member from its family, hyperparameters and ``state.pt`` (weights only)."""
    name = entry.get("name", entry["family"])
    family, hp = create_family(entry["family"], entry["params"])
    info = dict(entry["info"])
    info["class_names"] = tuple(info.get("class_names") or ())
    state_uri = _resolve(entry.get("state") or storage.join(entry["checkpoint"], STATE_FILE), ensemble_path)
    state = load_state(state_uri, device, f"member {name}")
    if entry.get("part"):
        try:
            state = state["parts"][entry["part"]]
        except KeyError:
            raise ArtifactError(f"member {name}: {state_uri} holds no model of {entry['part']!r}") from None
    trainer = Trainer(family, hp, DataInfo(**info), device)
    try:
        trainer.model.load_state_dict(state["model"] if isinstance(state, dict) and "model" in state else state)
    except (RuntimeError, KeyError) as e:
        raise ArtifactError(f"member {name}: {state_uri} does not fit a {entry['family']} model built from its "
                            f"hyperparameters ({e})") from None
    stats = {str(s): (float(v["mean"]), float(v["std"])) for s, v in entry["stats"].items()}
    return Member(name, trainer, FeatureSpec.from_dict(entry["spec"]), float(entry.get("weight", 1)), stats)


def load_type(doc: dict, mt: str, device: torch.device, path: str) -> TypeModel:
    e = doc["machine_types"][mt]
    members = [load_member(m, device, path) for m in e["members"]]
    return TypeModel(mt, e["combine"], members, {str(k): float(v) for k, v in e["threshold"].items()})
