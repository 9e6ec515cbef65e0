"""The model-family interface, its registry and :func:`create_family`.

A family is one file in ``raysd/families/`` holding a :class:`Family` subclass decorated with
:func:`register` and a module-level ``<Name>Config`` dataclass of its hyperparameters, bound as the
family's ``Config``; plus one import line in ``raysd/families/__init__.py``. Shared code (training loop,
search, leaderboard) only ever talks to this interface; it never asks for a family by name.

A family instance carries its typed hyperparameters (``self.hp``) and nothing else. Per-family state that
training or scoring needs (an SVDD centre, a triplet reference set, Mahalanobis statistics, warp tables)
lives in buffers of the module that :meth:`Family.build` returns, so a ``state_dict`` round-trip restores it.

A family trains one model per machine type unless its :meth:`Family.scope` says ``dataset``: then one model
learns every machine type of the data set at once, classifying the auxiliary labels its
:meth:`Family.labelling` names (:mod:`raysd.data.study`). Families with these options take them from the
fields of :class:`raysd.families.hparams.AuxTaskConfig`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from importlib.metadata import entry_points
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import nn

from raysd.data.views import View
from raysd.families.clips import Batch, ClipSet, DataInfo
from raysd.families.hparams import Labelling, Scope, TrainHP, config_fields, make_config

SCOPES: tuple[str, ...] = get_args(Scope)

class Family:
    """Base class of a model family. Subclasses set ``name`` and ``Config`` and implement the methods.

    The default :meth:`view` reads the window length and hop from the config fields named by
    ``window_fields`` and lays the windows out as ``layout``.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    description: ClassVar[str] = ""
    layout: ClassVar[Literal["vector", "image"]] = "vector"
    window_fields: ClassVar[tuple[str, str]] = ("frames", "hop")

    def __init__(self, hp: Any = None):
        self.hp = hp if hp is not None else self.Config()

    def view(self) -> View:
        """The windows of the log-mel this family trains and scores on."""
        frames, hop = self.window_fields
        return View(frames=getattr(self.hp, frames), hop=getattr(self.hp, hop), layout=self.layout)

    def scope(self) -> Scope:
        """``machine_type``: one model per machine type (the default); ``dataset``: one model for every type."""
        return getattr(self.hp, "scope", "machine_type")

    def labelling(self) -> Labelling:
        """What the class labels of the training clips are (``section`` unless the config chooses)."""
        return getattr(self.hp, "labels", "section")

    def data_problem(self, info: DataInfo) -> str | None:
        """Why this configuration cannot train on data described by ``info`` (e.g. a classifier given one class),
        else None. :meth:`build` raises it; the search asks before any trial starts, from the catalog alone, and
        drops the choices that cannot work on the data at hand."""
        return None

    def build(self, info: DataInfo) -> nn.Module:
        raise NotImplementedError

    def checked_build(self, info: DataInfo) -> nn.Module:
        """:meth:`build`, after :meth:`data_problem` (a :class:`ValueError` naming the problem)."""
        problem = self.data_problem(info)
        if problem:
            raise ValueError(problem)
        return self.build(info)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Scalar training loss. ``model`` may be DDP-wrapped: call it, do not reach into it."""
        raise NotImplementedError

    def window_scores(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One anomaly score per window (higher = more anomalous); ``model`` is unwrapped."""
        raise NotImplementedError

    def score(self, model: nn.Module, windows: torch.Tensor, labels: torch.Tensor,
              sections: torch.Tensor | None = None, extra: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """One anomaly score per clip from its windows (B, P, *shape), given each clip's class (``labels``),
        section index (``sections``, see :class:`ClipSet`) and its view's extra features (``extra``, (B, *shape)
        each): by default the mean window score."""
        b, p = windows.shape[:2]
        x = windows.reshape(b * p, *windows.shape[2:])
        s = self.window_scores(model, x, labels.repeat_interleave(p))
        return s.reshape(b, p).float().mean(dim=1)

    def embed(self, model: nn.Module, x: torch.Tensor, extra: tuple[torch.Tensor, ...] = ()) -> torch.Tensor | None:
        """Bottleneck embedding per window (``extra``: the view's extra features of each window's clip), for
        families that have one (else None)."""
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


FAMILY_MODULES_ENV = "RAYSD_FAMILY_MODULES"
ENTRY_POINT_GROUP = "raysd.families"  # an installed package's families: [project.entry-points."raysd.families"]


def import_family_modules() -> list[str]:
    """Import the modules that register families kept outside raysd (one file with an ``@register``ed class): those
    an installed package declares in the entry-point group ``raysd.families`` (``name = "package.module"``, Python's
    plugin mechanism), then those named in ``$RAYSD_FAMILY_MODULES`` (comma-separated, importable on every node).
    Returns the modules' names."""
    plugins = [(ep.value.split(":", 1)[0], f"the entry point {ep.name!r} of group {ENTRY_POINT_GROUP!r}")
               for ep in entry_points(group=ENTRY_POINT_GROUP)]
    env = [(m.strip(), f"${FAMILY_MODULES_ENV}") for m in os.environ.get(FAMILY_MODULES_ENV, "").split(",") if m.strip()]
    for module, source in plugins + env:
        if module not in sys.modules:
            try:
                importlib.import_module(module)
            except ImportError as e:
                fix = ("put it on PYTHONPATH (on every node of a cluster)" if e.name == module.split(".")[0] or
                       e.name == module else "install what it imports")
                raise ImportError(f"{source} names the module {module!r}, which cannot be imported here ({e}); "
                                  f"{fix}") from e
    return [m for m, _ in plugins + env]


def get_family(name: str) -> type[Family]:
    """The registered family class (``raysd.families`` imports every family, so the registry is full; a name
    it lacks is looked for in :func:`import_family_modules`)."""
    if name not in REGISTRY:
        import_family_modules()
    try:
        return REGISTRY[name]
    except KeyError:
        extra = f" (after importing ${FAMILY_MODULES_ENV} and the {ENTRY_POINT_GROUP!r} entry points)"
        raise KeyError(f"unknown model family {name!r}; registered{extra}: {', '.join(sorted(REGISTRY))}") from None


def split_params(family: str, params: dict[str, Any]) -> tuple[TrainHP, Any]:
    """Trial parameters -> (TrainHP, the family's Config), naming the offending key on error."""
    cls = get_family(family)
    shared = config_fields(TrainHP)
    hp = make_config(TrainHP, {k: v for k, v in params.items() if k in shared}, f"trial of {family}")
    cfg = make_config(cls.Config, {k: v for k, v in params.items() if k not in shared}, f"trial of {family}")
    return hp, cfg


def create_family(name: str, params: dict[str, Any]) -> tuple[Family, TrainHP]:
    """The one way to make a family from trial parameters: (the family with its Config, the training HP)."""
    hp, cfg = split_params(name, params)
    return get_family(name)(cfg), hp
