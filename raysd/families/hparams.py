"""Hyperparameter dataclasses: the training hyperparameters every family shares (:class:`TrainHP`) and the
typed construction of any config dataclass from YAML / Tune values (:func:`make_config`), whose errors name
the file and the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any


def config_fields(config_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_cls)}


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ValueError(f"{where}: key {key!r} must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, where)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(f"{where}: key {key!r} has invalid value {value!r} ({'; '.join(errors)})")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: key {key!r} must be a list, got {value!r}")
        args = typing.get_args(tp)
        inner = args[0] if args else Any
        return tuple(_coerce(v, inner, key, where) for v in value) if origin is tuple else [
            _coerce(v, inner, key, where) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: key {key!r} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ValueError(f"{where}: key {key!r} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 and 1.0e12 as strings
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: key {key!r} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{where}: key {key!r} must be a string, got {value!r}")
        return value
    return value


def make_config(config_cls: type, values: dict[str, Any], where: str = "config") -> Any:
    """Build a hyperparameter dataclass from a plain dict, naming the offending key on error."""
    hints = typing.get_type_hints(config_cls)
    fields = config_fields(config_cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {k: _coerce(v, hints[k], k, where) for k, v in values.items()}
    cfg = config_cls(**kwargs)
    check = getattr(cfg, "validate", None)
    if callable(check):
        try:
            check()
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    return cfg


Scope = typing.Literal["machine_type", "dataset"]
Labelling = typing.Literal["section", "type_section", "attribute"]


@dataclass
class AuxTaskConfig:
    """Options of a family that learns an embedding by classifying auxiliary labels and can score by kNN.

    ``scope``: one model per machine type, or one for the whole data set (fixed in a preset, never searched);
    ``labels``: the classes (``section``; ``type_section``: machine type x section; ``attribute``: machine type x
    section x attribute string, the section where a clip has no attributes); ``knn_k`` / ``knn_means``: the kNN
    score's neighbours and k-means centres of the source domain (see :class:`raysd.families.knn.KnnScorer`).
    """

    scope: Scope = "machine_type"
    labels: Labelling = "section"
    knn_k: int = 1
    knn_means: int = 16

    def validate(self) -> None:
        if self.scope == "dataset" and self.labels == "section":
            raise ValueError("scope 'dataset' needs labels 'type_section' or 'attribute' (sections of different "
                             "machine types share numbers)")
        if self.knn_k < 1 or self.knn_means < 0:
            raise ValueError(f"knn_k must be >= 1 and knn_means >= 0, got {self.knn_k}, {self.knn_means}")


@dataclass
class TrainHP:
    """Hyperparameters shared by every family (searched alongside the family's own)."""

    lr: float = 1e-3
    batch_size: int = 256
    weight_decay: float = 0.0
    epochs: int = 10
    crop: str = "default"
    optimizer: typing.Literal["adam", "adamw", "sgd"] = "adam"
    amp: typing.Literal["auto", "off", "bf16"] = "auto"
    grad_clip: float = 0.0
    seed: int = 0
    prune_every: int = 0  # every n epochs drop the worst-scoring training clips (0 = never)
    prune_fraction: float = 0.0  # fraction p of the remaining training clips dropped each time

    def validate(self) -> None:
        if self.prune_every < 0:
            raise ValueError(f"prune_every must be >= 0, got {self.prune_every}")
        if not 0.0 <= self.prune_fraction < 1.0:
            raise ValueError(f"prune_fraction must be in [0, 1), got {self.prune_fraction}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
