"""Search presets: ``search_spaces/<name>.yaml`` read, checked and turned into Ray Tune search spaces.

Every key is checked against the family's typed ``Config`` and the shared :class:`TrainHP` before Ray
starts; an unknown key or an invalid range is a :class:`PresetError` naming the file, the key and what
is allowed.

A search-space entry is either a fixed value or one of::

    {loguniform: [lo, hi]}   {uniform: [lo, hi]}   {randint: [lo, hi]}   {choice: [a, b, ...]}

A family entry may also say

- ``points_to_evaluate: [{key: value, ...}, ...]``: configurations Optuna tries first, in order (e.g. the
  family's published defaults), before its sampler takes over. A point names searched keys only; a searched
  key it leaves out takes the family's default (its ``Config`` or :class:`TrainHP` field default) when that
  lies inside the searched distribution, else the point must give it (Ray's ``OptunaSearch`` needs a value
  for every searched key, and a value Optuna could not sample would mislead its sampler);
- ``repeats: N``: train the entry's one configuration N times, with seeds ``seed, seed + 1, ...`` (``seed``
  the space's fixed value, else :class:`TrainHP`'s default), as a Ray Tune grid over ``seed``; the
  leaderboard then offers the N trials' seed ensemble. The space must be fixed (Optuna samples no grid), and
  ``num_samples`` defaults to 1: a study trains ``num_samples x repeats`` trials;
- ``search: {...}``: the entry's own search settings (:mod:`raysd.search_settings`), replacing the preset's
  top-level ``search:``. Under ``algorithm: grid`` every searched key must be a ``choice``, there are no
  ``points_to_evaluate``, ``num_samples`` defaults to 1 and a study trains ``grid size x num_samples x repeats``.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from raysd.data.features import CROP_VARIANTS, FeatureSpec
from raysd.data.heldout import HeldoutConfig
from raysd.data.study import ALL_TYPES, FIRST_SHOT
from raysd.data.views import View
from raysd.families.base import get_family
from raysd.families.hparams import TrainHP, config_fields, make_config
from raysd.paths import SEARCH_SPACES
from raysd.preset_schema import DISTRIBUTIONS, METRICS, RULES, Dataset, PresetFile, Resources, Scheduler, errors, schema
from raysd.search_settings import SearchSettings

__all__ = ["DISTRIBUTIONS", "METRICS", "RULES", "SEARCH_SPACES", "FamilySearch", "Preset", "PresetError", "Resources",
           "Scheduler", "in_distribution", "load_preset"]


class PresetError(ValueError):
    """A preset file that cannot be used, with the file and key named."""


@dataclass
class FamilySearch:
    family: str
    space: dict[str, Any]  # key -> fixed value or {distribution: args}
    num_samples: int
    epochs: int
    scope: str = "machine_type"  # the family's scope under this space (fixed: never searched)
    entry: str = ""  # its name under 'families:' (the family's name unless the entry says 'family: NAME')
    repeats: int = 1  # the configuration trained this many times, one seed each (a fixed space only)
    points_to_evaluate: list[dict[str, Any]] = field(default_factory=list)  # complete points: every searched key
    search: SearchSettings = field(default_factory=SearchSettings)  # the entry's, else the preset's search settings
    resources: Resources | None = None  # the entry's own per-trial resources, else the preset's

    @property
    def searched(self) -> bool:
        """Whether the space has anything to search (else Tune repeats the one configuration)."""
        return any(isinstance(v, dict) for v in self.space.values())

    def grid_size(self) -> int:
        """Configurations of a grid search (the product of the choices' lengths); 1 for the other algorithms."""
        size = 1
        if self.search.algorithm == "grid":
            for v in self.space.values():
                size *= len(v["choice"]) if isinstance(v, dict) else 1
        return size

    def seeds(self) -> list[int]:
        """The seeds of the repeats: the space's fixed seed (else TrainHP's default) and the next ones."""
        base = self.space.get("seed", TrainHP.seed)
        return [int(base) + i for i in range(self.repeats)]

    def trials(self, num_samples: int | None = None) -> int:
        """Trials of one study: ``num_samples`` when given (``--num-samples``: trials per study, whatever the entry),
        else the entry's ``num_samples`` times its grid (of the repeats' seeds, and of the choices under a grid
        search)."""
        return num_samples or self.num_samples * self.repeats * self.grid_size()

    def grid_points(self) -> list[dict[str, Any]]:
        """Every configuration of a grid search or of repeats (the searched keys, and ``seed``), in Tune's order;
        [] for the other searches."""
        axes: dict[str, list[Any]] = {}
        if self.search.algorithm == "grid":
            axes = {k: list(v["choice"]) for k, v in self.space.items() if isinstance(v, dict)}
        if self.repeats > 1:
            axes["seed"] = self.seeds()
        return [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())] if axes else []


@dataclass
class Preset:
    name: str
    path: Path
    dataset: Dataset
    features: FeatureSpec
    rule: str
    metric: str
    mode: str
    seed: int
    scheduler: Scheduler
    resources: Resources
    max_failures: int
    families: dict[str, FamilySearch]
    machine_types: list[str] | None = None
    heldout: HeldoutConfig | None = None
    first_shot: bool = False  # one configuration per family over every machine type (DCASE 2023-24: no per-type tuning)
    search: SearchSettings = field(default_factory=SearchSettings)  # the top-level ``search:`` (entries may replace it)

    def data_root(self, override: str | os.PathLike | None = None) -> Path | None:
        if override:
            return Path(override).expanduser()
        env = self.dataset.root_env
        if env and os.environ.get(env):
            return Path(os.environ[env]).expanduser()
        root = self.dataset.root
        return Path(root).expanduser() if root else None

    def study_scope(self, entry: str) -> str:
        """How an entry's studies are cut: the family's own scope, or first-shot for a per-type family in a
        first-shot preset."""
        scope = self.families[entry].scope
        return FIRST_SHOT if self.first_shot and scope == "machine_type" else scope

    def study_units(self, entries: list[str], types: list[str]) -> list[tuple[str, str, tuple[str, ...], str]]:
        """(entry, machine_type, the machine types of a study over several, scope) of every study: one per
        machine type and entry, or one per entry over every type."""
        per_type = [(e, mt, (), "machine_type") for mt in types for e in entries if self.study_scope(e) == "machine_type"]
        return per_type + [(e, ALL_TYPES, tuple(types), self.study_scope(e)) for e in entries
                           if self.study_scope(e) != "machine_type"]

    def crops(self, entry: str) -> list[str]:
        v = self.families[entry].space.get("crop", "default")
        return list(v["choice"]) if isinstance(v, dict) else [v]

    def example_view(self, entry: str) -> View:
        """The view of an entry's first configuration (each searched key at its first value), e.g. to know which
        extra features to extract before trials start."""
        family_cls = get_family(self.families[entry].family)
        config = make_config(family_cls.Config, _context(self.families[entry].space, family_cls, ""), str(self.path))
        return family_cls(config).view()


def _err(path: Path, key: str, msg: str) -> PresetError:
    return PresetError(f"{path}: key '{key}': {msg}")


def _check_value(path: Path, key: str, value: Any, allowed: dict, family_cls, context: dict | None = None) -> None:
    """Check one candidate value by building the config that would hold it, beside ``context`` (a value of each
    other key of the family's space)."""
    where = f"{path}: family '{family_cls.name}'"
    if key in config_fields(TrainHP):
        make_config(TrainHP, {key: value}, where)
    else:
        make_config(family_cls.Config, {**(context or {}), key: value}, where)
    if key == "crop" and value != "default" and value not in CROP_VARIANTS:
        raise _err(path, key, f"unknown crop variant {value!r}; allowed: default, {', '.join(CROP_VARIANTS)}")


def _example(entry: Any) -> Any:
    """One value a search-space entry can take (the first choice, the low end of a range)."""
    if not isinstance(entry, dict):
        return entry
    (dist, args), = entry.items()
    return args[0] if dist != "loguniform" and dist != "uniform" else float(args[0])


def _context(space: dict[str, Any], family_cls, key: str) -> dict[str, Any]:
    fields = config_fields(family_cls.Config)
    return {k: _example(v) for k, v in space.items() if k != key and k in fields}


def _check_entry(path: Path, fam: str, key: str, entry: Any, family_cls, context: dict | None = None) -> None:
    allowed = {**config_fields(TrainHP), **config_fields(family_cls.Config)}
    if key not in allowed:
        raise _err(path, f"families.{fam}.space.{key}",
                   f"unknown hyperparameter; allowed for '{fam}': {sorted(allowed)}")
    full = f"families.{fam}.space.{key}"
    if key == "scope" and isinstance(entry, dict):
        raise _err(path, full, "the scope decides how many studies there are, so it cannot be searched: fix it "
                               "(machine_type or dataset) and put each scope in a preset of its own")
    if isinstance(entry, dict):
        if len(entry) != 1 or next(iter(entry)) not in DISTRIBUTIONS:
            raise _err(path, full, f"a distribution must be one of {list(DISTRIBUTIONS)} with its arguments, got {entry!r}")
        (dist, args), = entry.items()
        if dist == "choice":
            if not isinstance(args, list) or not args:
                raise _err(path, full, "choice needs a non-empty list")
            for v in args:
                _check_value(path, key, v, allowed, family_cls, context)
            return
        try:
            lo, hi = (float(a) for a in args) if isinstance(args, list) and len(args) == 2 else (None, None)
        except (TypeError, ValueError):
            lo = hi = None
        if lo is None or hi is None or isinstance(args[0], bool) or isinstance(args[1], bool):
            raise _err(path, full, f"{dist} needs [low, high], got {args!r}")
        if not lo < hi:
            raise _err(path, full, f"{dist} needs low < high, got [{lo}, {hi}]")
        if dist == "loguniform" and lo <= 0:
            raise _err(path, full, f"loguniform needs low > 0, got {lo}")
        _check_value(path, key, lo if dist != "randint" else int(lo), allowed, family_cls, context)
        _check_value(path, key, hi if dist != "randint" else int(hi) - 1, allowed, family_cls, context)
        return
    try:
        _check_value(path, key, entry, allowed, family_cls, context)
    except ValueError as e:
        raise _err(path, full, str(e)) from None


def _check_repeats(path: Path, fam: str, repeats: int, space: dict[str, Any]) -> None:
    """Repeats train one configuration with several seeds: a Tune grid, which Optuna cannot sample beside."""
    searched = [k for k, v in space.items() if isinstance(v, dict)]
    if repeats == 1 or not searched:
        return
    if "seed" in searched:
        raise _err(path, f"families.{fam}.repeats", "repeats sets the seeds itself (seed, seed + 1, ...), so `seed` "
                                                    "cannot be searched beside it: fix seed (the first one) or drop repeats")
    raise _err(path, f"families.{fam}.repeats", f"repeats needs a fixed space: fix every value (the configuration "
                                                f"to repeat), or drop repeats and search `seed` as a choice; searched here: {searched}")


def _field_default(cls: type, key: str) -> Any:
    f = config_fields(cls)[key]
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING


def in_distribution(entry: dict, value: Any) -> tuple[bool, Any]:
    """Whether ``value`` can be drawn from a distribution entry, and the value as Optuna would draw it."""
    (dist, args), = entry.items()
    if dist == "choice":
        same = [a for a in args if a == value and isinstance(a, bool) == isinstance(value, bool)]
        return bool(same), same[0] if same else value
    if isinstance(value, bool):
        return False, value
    if dist == "randint":
        return isinstance(value, int) and int(args[0]) <= value < int(args[1]), value
    try:
        v = float(value)  # YAML 1.1 reads 1e-3 as a string
    except (TypeError, ValueError):
        return False, value
    return float(args[0]) <= v <= float(args[1]), v


def _points(path: Path, fam: str, raw: Any, space: dict[str, Any], family_cls) -> list[dict[str, Any]]:
    """An entry's ``points_to_evaluate``, checked and completed with the family's defaults (module docstring)."""
    where = f"families.{fam}.points_to_evaluate"
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(p, dict) for p in raw):
        raise _err(path, where, f"must be a list of mappings of searched keys to values, got {raw!r}")
    searched = {k: v for k, v in space.items() if isinstance(v, dict)}
    if raw and not searched:
        raise _err(path, where, "the space searches nothing (every value is fixed): there is no point to start from")
    allowed = {**config_fields(TrainHP), **config_fields(family_cls.Config)}
    family_keys = config_fields(family_cls.Config)
    points: list[dict[str, Any]] = []
    for i, point in enumerate(raw):
        for key in point:
            if key not in searched:
                what = "fixed in the space" if key in space else "not in the space"
                raise _err(path, f"{where}[{i}].{key}", f"{what}; a point gives searched keys only: {sorted(searched)}")
        full: dict[str, Any] = {}
        for key, entry in searched.items():
            given = key in point
            value = point[key] if given else _field_default(TrainHP if key in config_fields(TrainHP) else
                                                             family_cls.Config, key)
            if value is dataclasses.MISSING:
                raise _err(path, f"{where}[{i}].{key}", "not given, and the family has no default for it: give it")
            ok, value = in_distribution(entry, value)
            if not ok:
                raise _err(path, f"{where}[{i}].{key}", f"{value!r} is outside the searched {entry}" if given else
                           f"not given, and the family's default {value!r} is outside the searched {entry}: give it")
            full[key] = value
        for key, value in full.items():
            context = {**_context(space, family_cls, key), **{k: v for k, v in full.items() if k != key and k in family_keys}}
            try:
                _check_value(path, key, value, allowed, family_cls, context)
            except ValueError as e:
                raise _err(path, f"{where}[{i}].{key}", str(e)) from None
        if full in points:
            raise _err(path, f"{where}[{i}]", f"the same configuration as points_to_evaluate[{points.index(full)}]")
        points.append(full)
    return points


def _check_grid(path: Path, fam: str, space: dict[str, Any], has_points: bool) -> None:
    """A grid enumerates choices: a range cannot be gridded, and every point is trained anyway."""
    for key, entry in space.items():
        if isinstance(entry, dict) and "choice" not in entry:
            raise _err(path, f"families.{fam}.space.{key}", f"search algorithm grid needs a choice of values, got "
                                                            f"{entry!r}: list the grid's values, e.g. {{choice: [...]}}")
    if has_points:
        raise _err(path, f"families.{fam}.points_to_evaluate", "a grid search trains every point of its grid: "
                                                               "drop points_to_evaluate or search with tpe")


def read_file(path: Path) -> PresetFile:
    """The preset file, checked against its typed sections (:mod:`raysd.preset_schema`)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PresetError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise PresetError(f"{path}: a preset must be a YAML mapping")
    try:
        return PresetFile.model_validate(raw)
    except ValidationError as e:
        (key, msg), *rest = errors(e)
        more = f" (and {len(rest)} more: {', '.join(k for k, _ in rest)})" if rest else ""
        raise _err(path, key, msg + more) from None


def load_preset(name_or_path: str | os.PathLike) -> Preset:
    path = Path(name_or_path)
    if not path.suffix:
        path = SEARCH_SPACES / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in SEARCH_SPACES.glob("*.yaml"))
        raise PresetError(f"no preset {str(name_or_path)!r} (looked for {path}); known presets: {', '.join(known)}")
    doc = read_file(path)
    search = doc.search or SearchSettings()
    families: dict[str, FamilySearch] = {}
    for fam, body in doc.families.items():
        family_name = body.family or fam
        try:
            family_cls = get_family(family_name)
        except (KeyError, ImportError) as e:
            raise _err(path, f"families.{fam}" + (".family" if body.family else ""), str(e.args[0])) from None
        space = dict(body.space)
        for key, entry in space.items():
            try:
                _check_entry(path, fam, key, entry, family_cls, _context(space, family_cls, key))
            except PresetError:
                raise
            except ValueError as e:
                raise _err(path, f"families.{fam}.space.{key}", str(e)) from None
        settings = body.search or search
        if settings.algorithm == "grid":
            _check_grid(path, fam, space, bool(body.points_to_evaluate))
        num_samples = body.num_samples or (4 if body.repeats == 1 and settings.algorithm != "grid" else 1)
        epochs = body.epochs or TrainHP.epochs
        _check_repeats(path, fam, body.repeats, space)
        points = _points(path, fam, body.points_to_evaluate, space, family_cls)
        if len(points) > num_samples:
            raise _err(path, f"families.{fam}.num_samples", f"{num_samples} trial(s) cannot start from "
                                                            f"{len(points)} points_to_evaluate")
        scope = family_cls(family_cls.Config(**_context(space, family_cls, ""))).scope()
        families[fam] = FamilySearch(family_name, space, num_samples, epochs, scope, fam, body.repeats, points, settings,
                                     body.resources)
    if doc.heldout is not None:
        try:
            doc.heldout.validate()
        except ValueError as e:
            raise _err(path, "heldout", str(e)) from None
    return Preset(
        name=doc.name or path.stem, path=path, dataset=doc.dataset, features=doc.features,
        rule=doc.rule or doc.dataset.rule or "2020", metric=doc.metric, mode=METRICS[doc.metric], seed=doc.seed,
        scheduler=doc.scheduler, resources=doc.resources, max_failures=doc.max_failures, families=families,
        machine_types=doc.machine_types, heldout=doc.heldout, first_shot=doc.first_shot, search=search)


def main(argv: list[str] | None = None) -> int:
    """``python -m raysd.presets --schema``: print the JSON Schema of a preset file; ``python -m raysd.presets
    PRESET``: check one."""
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m raysd.presets", description=main.__doc__)
    p.add_argument("preset", nargs="?", help="a preset name or YAML path to check")
    p.add_argument("--schema", action="store_true", help="print the JSON Schema of a preset file")
    args = p.parse_args(argv)
    if args.schema:
        print(json.dumps(schema(), indent=2))
        return 0
    if not args.preset:
        p.error("name a preset to check, or pass --schema")
    try:
        preset = load_preset(args.preset)
    except PresetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{preset.path}: ok ({len(preset.families)} family entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
