"""Hyperparameter dataclasses: the training hyperparameters every family shares (:class:`TrainHP`) and the options
of families that learn from auxiliary labels (:class:`AuxTaskConfig`), typed configs of :mod:`raysd.typed` (a
family's ``Config`` is one too). Their descriptions feed ``python -m raysd.families``, the presets' JSON Schema and
the docs."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Annotated

from pydantic import Field

from raysd.typed import FORBID, Bool, Float, Int, config_fields, make_config

__all__ = ["FORBID", "AuxTaskConfig", "Bool", "Float", "Int", "Labelling", "Scope", "TrainHP", "config_fields",
           "make_config"]

Scope = typing.Literal["machine_type", "dataset"]
Labelling = typing.Literal["section", "type_section", "attribute"]


@dataclass
class AuxTaskConfig:
    """Options of a family that learns an embedding by classifying auxiliary labels and can score by kNN
    (:class:`raysd.families.knn.KnnScorer`)."""

    __pydantic_config__ = FORBID

    scope: Annotated[Scope, Field(description="one model per machine type (machine_type), or one for every machine "
                                              "type of the data set (dataset); fixed in a preset, never searched")] = \
        "machine_type"
    labels: Annotated[Labelling, Field(description="the classes it learns: section; type_section (machine type x "
                                                   "section); attribute (machine type x section x attribute string, "
                                                   "the section where a clip has none)")] = "section"
    knn_k: Annotated[Int, Field(description="kNN score: nearest training embeddings averaged")] = 1
    knn_means: Annotated[Int, Field(description="kNN score: k-means centres the source domain's embeddings are "
                                                "reduced to (0: every clip)")] = 16

    def validate(self) -> None:
        if self.scope == "dataset" and self.labels == "section":
            raise ValueError("scope 'dataset' needs labels 'type_section' or 'attribute' (sections of different "
                             "machine types share numbers)")
        if self.knn_k < 1 or self.knn_means < 0:
            raise ValueError(f"knn_k must be >= 1 and knn_means >= 0, got {self.knn_k}, {self.knn_means}")


@dataclass
class TrainHP:
    """Hyperparameters shared by every family (searched alongside the family's own)."""

    __pydantic_config__ = FORBID

    lr: Annotated[Float, Field(description="learning rate")] = 1e-3
    batch_size: Annotated[Int, Field(description="windows per training batch (per worker)")] = 256
    weight_decay: Annotated[Float, Field(description="the optimiser's weight decay")] = 0.0
    epochs: Annotated[Int, Field(description="training epochs (a preset entry's epochs)")] = 10
    crop: Annotated[str, Field(description="log-mel crop variant: default, none, crop or tight (Rajani, 2022)")] = \
        "default"
    optimizer: Annotated[typing.Literal["adam", "adamw", "sgd"], Field(description="the optimiser (sgd: momentum "
                                                                                    "0.9)")] = "adam"
    amp: Annotated[typing.Literal["auto", "off", "bf16"],
                   Field(description="mixed precision: auto (bf16 on a CUDA device that has it), off, or bf16")] = "auto"
    grad_clip: Annotated[Float, Field(description="clip the gradient norm to this (0: no clipping)")] = 0.0
    seed: Annotated[Int, Field(description="seed of the model's initialisation and the batch order")] = 0
    prune_every: Annotated[Int, Field(description="anomaly pruning: every n epochs drop the worst-scoring training "
                                                  "clips (0: never)")] = 0
    prune_fraction: Annotated[Float, Field(description="anomaly pruning: the fraction of the remaining training "
                                                       "clips dropped each time")] = 0.0

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
