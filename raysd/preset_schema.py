"""The shape of a preset file (``search_spaces/<name>.yaml``): one typed model per section, each field described.

pydantic checks a preset against :class:`PresetFile` before anything else happens: unknown keys, wrong types and
values outside a section's rules are errors naming the file and the key path. What depends on a family (its space's
keys and values, ``points_to_evaluate``) is checked against the family's own typed config by :mod:`raysd.presets`.
``python -m raysd.presets --schema`` prints the JSON Schema of :class:`PresetFile`; ``search_spaces/
preset.schema.json`` holds it for editors (``# yaml-language-server: $schema=preset.schema.json``).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, ValidationInfo, WithJsonSchema, field_validator

from raysd.data.features import FeatureSpec
from raysd.data.heldout import HeldoutConfig
from raysd.search_settings import ALGORITHMS, SearchSettings, prepared_settings
from raysd.typed import Bool, Int, NonNegative, no_bool

Metric = Literal["sel_auc", "sel_pauc", "sel_official", "heldout_loss", "pseudo_official"]
METRICS: dict[str, str] = {"sel_auc": "max", "sel_pauc": "max", "sel_official": "max", "heldout_loss": "min",
                           "pseudo_official": "max"}
Rule = Literal["2020", "2021", "2022"]
Layout = Literal["auto", "dcase2020", "dcase2021", "dcase2022", "recordings"]  # "auto" and raysd.data.catalog.LAYOUTS
RULES: tuple[str, ...] = get_args(Rule)
DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
Positive = Annotated[int, Field(ge=1), BeforeValidator(no_bool)]  # constraints first: the schema shows them
SPACE_ENTRY_SCHEMA = {
    "description": "a fixed value, or one distribution: {loguniform: [low, high]}, {uniform: [low, high]}, "
                   "{randint: [low, high)}, {choice: [a, b, ...]}",
    "anyOf": [{"type": ["number", "string", "boolean", "array", "null"]},
              *({"type": "object", "properties": {d: {"type": "array", "minItems": 1 if d == "choice" else 2,
                                                      **({} if d == "choice" else {"maxItems": 2})}},
                 "required": [d], "additionalProperties": False} for d in DISTRIBUTIONS)]}
SpaceEntry = Annotated[Any, WithJsonSchema(SPACE_ENTRY_SCHEMA)]
Search = Annotated[SearchSettings | None, BeforeValidator(prepared_settings)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(Section):
    """Resources of one trial: its workers, and the CPUs and GPUs (or a share of one) of each."""

    workers: Positive = Field(1, description="DDP workers per trial (1: the trial trains in its Tune trainable)")
    gpus_per_worker: Annotated[float, Field(ge=0), BeforeValidator(no_bool)] = Field(
        0.0, description="GPUs per worker; a fraction lets several single-worker trials share a GPU")
    cpus_per_worker: Annotated[float, Field(gt=0), BeforeValidator(no_bool)] = Field(1.0, description="CPUs per worker")

    @field_validator("gpus_per_worker")
    @classmethod
    def _whole_gpus_for_ddp(cls, value: float, info: ValidationInfo) -> float:
        if info.data.get("workers", 1) > 1 and 0 < value < 1:
            raise ValueError("fractional GPUs are only allowed for single-worker trials (DDP needs whole GPUs)")
        return value

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0


class Scheduler(Section):
    """``scheduler:`` of a preset: when a study gives up on a trial (docs/searching.md). The shipped presets use
    none, as measured by ``benchmarks/search_efficiency.py`` (docs/benchmarks.md); long trials want a longer grace
    than the default (``promote`` with 5 of 100 epochs for the DCASE presets' trials)."""

    type: Literal["promote", "asha", "hyperband", "none"] = Field(
        "none", description="promote (ASHA by promotion: a trial below a rung's cutoff pauses and resumes when it "
                            "ranks in the top fraction; raysd.schedulers), asha (Tune's ASHAScheduler: it stops), "
                            "hyperband (Tune's HyperBandScheduler) or none")
    grace_period: Positive = Field(2, description="promote, asha: epochs every trial trains before it may be paused "
                                                  "or stopped (the first rung)")
    reduction_factor: Annotated[int, Field(ge=2), BeforeValidator(no_bool)] = Field(
        3, description="promote, asha, hyperband: 1 in this many trials moves on at each rung")


class Dataset(Section):
    """Where a preset's data comes from."""

    layout: Layout = Field("auto", description="the data layout, or auto to detect it")
    root: str | None = Field(None, description="the data root (--data-root and root_env take precedence)")
    root_env: str | None = Field(None, description="an environment variable that may name the data root")
    download: str | None = Field(None, description="the python -m raysd.data.download set named in the error a "
                                                   "missing data root gives")
    synthetic: str | None = Field(None, description="a synthetic data preset generated when no data root is given")
    synthetic_seed: Int = Field(0, description="seed of the synthetic data")
    synthetic_layout: str = Field("dcase2020", description="layout of the synthetic data")
    rule: Rule | None = Field(None, description="evaluation rule (the preset's top-level rule wins)")


class FamilyEntry(Section):
    """One entry under ``families:``: the family it searches, its space and its budget."""

    family: str | None = Field(None, description="the registered family this entry searches (default: the entry's "
                                                 "name; python -m raysd.families lists them)")
    space: dict[str, SpaceEntry] = Field(default_factory=dict, description="hyperparameters: the family's own and "
                                                                           "the shared training ones")
    num_samples: Positive | None = Field(None, description="trials of each study (default 4; a grid or repeats: "
                                                           "1, repeating the whole grid)")
    epochs: Positive | None = Field(None, description="epochs per trial (default 10)")
    repeats: Positive = Field(1, description="train the one configuration of a fixed space this many times, seeds "
                                             "seed, seed + 1, ...")
    points_to_evaluate: list[dict[str, SpaceEntry]] | None = Field(
        None, description="configurations tried first, in order; a key left out takes the family's default")
    search: Search = Field(None, description="the entry's own search settings, replacing the preset's")
    resources: Resources | None = Field(None, description="the entry's own resources per trial, replacing the "
                                                          "preset's")


class PresetFile(Section):
    """A preset: the data, the features, the families and how they are searched."""

    name: str | None = Field(None, description="experiment name (default: the file's name)")
    description: str | None = Field(None, description="what the preset is for")
    dataset: Dataset = Field(default_factory=lambda: Dataset())
    features: FeatureSpec = Field(default_factory=lambda: FeatureSpec(), description="the log-mel every family reads")
    rule: Rule | None = Field(None, description="DCASE evaluation rule: 2020, 2021, or 2022 (2022-2024)")
    metric: Metric = Field("sel_auc", description="what the search maximises (or minimises: heldout_loss): a "
                                                  "selection-half figure, or a label-free one")
    seed: Int = Field(0, description="the searchers' seed")
    scheduler: Scheduler = Field(default_factory=lambda: Scheduler())
    resources: Resources = Field(default_factory=lambda: Resources())
    max_failures: NonNegative = Field(2, description="retries of a trial whose process, worker or node dies")
    families: dict[str, FamilyEntry] = Field(min_length=1, description="the entries searched, by name")
    machine_types: list[str] | None = Field(None, description="only these machine types (default: every one found)")
    heldout: HeldoutConfig | None = Field(None, description="held-out clips (unlabelled data; pseudo_official)")
    first_shot: Bool = Field(False, description="one configuration per family over every machine type (DCASE "
                                                "2023-24: no tuning per machine type)")
    search: Search = Field(None, description="how every entry searches unless it says otherwise")

    @field_validator("families", mode="before")
    @classmethod
    def _empty_entries(cls, value: Any) -> Any:
        return {k: v if v is not None else {} for k, v in value.items()} if isinstance(value, dict) else value


def schema() -> dict[str, Any]:
    """The JSON Schema of a preset file (``search:`` may also be an algorithm's name alone)."""
    doc = PresetFile.model_json_schema()
    for props in (doc["properties"], doc["$defs"]["FamilyEntry"]["properties"]):
        props["search"]["anyOf"].insert(1, {"type": "string", "enum": list(ALGORITHMS)})
    doc["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    doc["title"] = "raysd preset"
    return doc


def _allowed(loc: tuple, model: Any = PresetFile) -> list[str]:
    """The keys allowed where ``loc`` points (walking models, dataclasses and mappings)."""
    tp: Any = model
    for part in loc[:-1]:
        tp = _inner(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel) and str(part) in tp.model_fields:
            tp = tp.model_fields[str(part)].annotation
        elif dataclasses.is_dataclass(tp) and str(part) in {f.name for f in dataclasses.fields(tp)}:
            tp = typing.get_type_hints(tp)[str(part)]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return []
    tp = _inner(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return sorted(tp.model_fields)
    return sorted(f.name for f in dataclasses.fields(tp)) if dataclasses.is_dataclass(tp) else []


def _inner(tp: Any) -> Any:
    while True:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Annotated:
            tp = args[0]
        elif origin is typing.Union or type(tp).__name__ == "UnionType":
            tp = next(a for a in args if a is not type(None))
        else:
            return tp


def errors(e: ValidationError, model: Any = PresetFile) -> list[tuple[str, str]]:
    """(key path, message) of each of pydantic's errors on a preset, one per key. A check that names an option first
    (``warm_start: ...``) points at that option."""
    out: dict[str, str] = {}
    for err in e.errors(include_url=False):
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith(("function-",
                                                                                                    "lax-")))))
        msg = err["msg"].removeprefix("Value error, ")
        head = msg.split(" ", 1)[0].rstrip(":")
        if err["type"] == "value_error" and head in _allowed(loc + ("",), model):
            loc += (head,)
        key = ".".join(str(p) for p in loc)
        if err["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            out.setdefault(key, f"unknown key; allowed: {_allowed(loc, model)}")
        else:
            shown = err.get("input")
            out.setdefault(key, msg if isinstance(shown, (dict, list)) else f"{msg}, got {shown!r}")
    return list(out.items())
