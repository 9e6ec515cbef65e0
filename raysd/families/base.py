"""The model-family interface and its registry.

A family is one file in ``raysd/families/`` holding a :class:`Family` subclass decorated with
:func:`register`, plus one import line in ``raysd/families/__init__.py``. Shared code (training loop,
search, leaderboard) only ever talks to this interface; it never asks for a family by name.

A family instance carries its typed hyperparameters (``self.hp``, an instance of its ``Config``
dataclass). Per-family state that scoring needs after training (an SVDD centre, a triplet reference
set, Mahalanobis statistics) lives in registered buffers of the module that :meth:`Family.build`
returns, so a ``state_dict`` round-trip restores it.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch
from torch import nn

from raysd.data.views import View


@dataclass(frozen=True)
class DataInfo:
    """What a family needs to know about a study's data to build its model."""

    n_mels: int
    n_frames: int
    n_classes: int
    class_names: tuple[str, ...] = ()
    sample_rate: int = 16000
    f_max: float = 8000.0


@dataclass
class Batch:
    """A training batch of windows: ``x`` (B, *sample_shape), ``y`` class (machine ID / section) index,
    ``clip`` index of the clip each window came from (into the worker's :class:`ClipSet`)."""

    x: torch.Tensor
    y: torch.Tensor
    clip: torch.Tensor


class ClipSet:
    """Log-mel clips of one study held as one (optionally device-resident) tensor.

    ``clips`` is (N, M, T); ``labels`` (N,) the class index of each clip. Batches are drawn by index
    from a frame-major copy, so an epoch costs no host-to-device copies once the tensor is on the device.
    """

    def __init__(self, clips: torch.Tensor, labels: torch.Tensor, view: View):
        if clips.ndim != 3:
            raise ValueError(f"ClipSet expects clips of shape (N, n_mels, n_frames), got {tuple(clips.shape)}")
        if labels.shape != (clips.shape[0],):
            raise ValueError(f"ClipSet labels must have shape ({clips.shape[0]},), got {tuple(labels.shape)}")
        self.clips = clips
        self.labels = labels.long()
        self.view = view
        self.frames_major = clips.transpose(1, 2).contiguous()
        self.starts = view.starts(clips.shape[2]).to(clips.device)

    @property
    def device(self) -> torch.device:
        return self.clips.device

    def __len__(self) -> int:
        return self.clips.shape[0]

    @property
    def num_windows(self) -> int:
        return len(self) * self.starts.numel()

    def subset(self, idx: torch.Tensor) -> "ClipSet":
        idx = idx.to(self.clips.device)
        return ClipSet(self.clips[idx], self.labels[idx], self.view)

    def to(self, device: torch.device | str) -> "ClipSet":
        return ClipSet(self.clips.to(device), self.labels.to(device), self.view)

    def batch(self, window_idx: torch.Tensor) -> Batch:
        p = self.starts.numel()
        clip = torch.div(window_idx, p, rounding_mode="floor")
        start = self.starts[window_idx % p]
        return Batch(self.view.gather(self.frames_major, clip, start), self.labels[clip], clip)

    def batches(
        self, batch_size: int, shuffle: bool = True, generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """One epoch over every window of every clip."""
        n = self.num_windows
        if shuffle:
            order = torch.randperm(n, generator=generator, device="cpu").to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        for i in range(0, stop, batch_size):
            yield self.batch(order[i:i + batch_size])

    def clip_batches(self, clips_per_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(clip indices, windows (B, P, *shape), labels) in clip order, for scoring."""
        for i in range(0, len(self), clips_per_batch):
            idx = torch.arange(i, min(i + clips_per_batch, len(self)), device=self.device)
            yield idx, self.view.windows(self.clips[idx]), self.labels[idx]


class Family:
    """Base class of a model family. Subclasses set ``name``, ``Config`` and implement the methods."""

    name: ClassVar[str]
    Config: ClassVar[type]
    description: ClassVar[str] = ""

    def __init__(self, hp: Any = None):
        self.hp = hp if hp is not None else self.Config()

    def view(self) -> View:
        """The windows of the log-mel this family trains and scores on."""
        raise NotImplementedError

    def build(self, info: DataInfo) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Scalar training loss. ``model`` may be DDP-wrapped: call it, do not reach into it."""
        raise NotImplementedError

    def window_scores(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One anomaly score per window (higher = more anomalous); ``model`` is unwrapped."""
        raise NotImplementedError

    def score(self, model: nn.Module, windows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One anomaly score per clip from its windows (B, P, *shape): the mean window score."""
        b, p = windows.shape[:2]
        x = windows.reshape(b * p, *windows.shape[2:])
        s = self.window_scores(model, x, labels.repeat_interleave(p))
        return s.reshape(b, p).float().mean(dim=1)

    def embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Bottleneck embedding per window, for families that have one (else None)."""
        return None

    def before_training(self, model: nn.Module, data: ClipSet) -> None:
        """Hook run once on the worker's training data before the first epoch (e.g. SVDD centre)."""

    def after_training(self, model: nn.Module, data: ClipSet) -> None:
        """Hook run once after the last epoch (e.g. a triplet reference set, embedding statistics)."""


REGISTRY: dict[str, type[Family]] = {}


def register(cls: type[Family]) -> type[Family]:
    if not getattr(cls, "name", None):
        raise TypeError(f"{cls.__qualname__} must set a class attribute 'name'")
    if not dataclasses.is_dataclass(getattr(cls, "Config", None)):
        raise TypeError(f"family {cls.name!r} must set 'Config' to a dataclass of hyperparameters")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"family {cls.name!r} is registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_family(name: str) -> type[Family]:
    import raysd.families  # noqa: F401  (fills the registry)

    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model family {name!r}; registered: {', '.join(sorted(REGISTRY))}") from None


def config_fields(config_cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_cls)}


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ValueError(f"{where}: key {key!r} must be one of {list(allowed)}, got {value!r}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
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
