"""Which of a study's searched choices can train on the data at hand, decided from the catalog before any trial
starts (:meth:`raysd.families.base.Family.data_problem`): a classifier's labelling that gives one class here, say.

Every combination of the space's choices is checked against the study's training clips (each machine type's
alone when a first-shot study trains one model per type); a value that works in no combination is dropped from
the study's space, with a line in the plan that says why, and a study none of whose combinations works is
dropped whole. A space with more combinations than :data:`MAX_COMBINATIONS` is checked one key at a time.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import pandas as pd

from raysd.data.features import FeatureSpec
from raysd.data.study import FIRST_SHOT, class_keys, section_keys
from raysd.families.base import get_family
from raysd.families.clips import DataInfo
from raysd.families.hparams import config_fields, make_config
from raysd.presets import FamilySearch

MAX_COMBINATIONS = 512


def data_info(train_rows: pd.DataFrame, spec: FeatureSpec, labelling: str) -> DataInfo:
    """What a family would learn of a study's data, from its training rows alone (no features read)."""
    classes = tuple(sorted(set(class_keys(train_rows, labelling))))
    return DataInfo(n_mels=spec.kept_mels, n_frames=spec.n_frames, n_classes=len(classes), class_names=classes,
                    sample_rate=spec.sample_rate, labelling=labelling,
                    section_names=tuple(sorted(set(section_keys(train_rows)))))


def _value(entry: Any) -> Any:
    """One value a space entry takes (its first choice, the low end of a range)."""
    if not isinstance(entry, dict):
        return entry
    (dist, args), = entry.items()
    return args[0]


def _problem(search: FamilySearch, values: dict[str, Any], groups: list[pd.DataFrame], spec: FeatureSpec) -> str | None:
    """Why the family configured with ``values`` cannot train on one of the ``groups`` of training rows."""
    family_cls = get_family(search.family)
    try:
        family = family_cls(make_config(family_cls.Config, values, f"family {search.family}"))
    except ValueError:
        return None  # an invalid combination is the trial's to report
    for rows in groups:
        problem = family.data_problem(data_info(rows, spec, family.labelling()))
        if problem:
            return problem
    return None


def feasible_search(search: FamilySearch, study: str, train_rows: pd.DataFrame, spec: FeatureSpec,
                    scope: str) -> tuple[FamilySearch | None, list[str]]:
    """The study's search with the choices that cannot work on ``train_rows`` dropped (None: nothing works), and a
    line for each thing dropped."""
    fields = config_fields(get_family(search.family).Config)
    base = {k: _value(v) for k, v in search.space.items() if k in fields}
    choices = {k: list(v["choice"]) for k, v in search.space.items()
               if isinstance(v, dict) and "choice" in v and k in fields}
    groups = [g for _, g in train_rows.groupby("machine_type")] if scope == FIRST_SHOT else [train_rows]
    keys = list(choices)
    sizes = [len(choices[k]) for k in keys]
    total = 1
    for n in sizes:
        total *= n
    combos = (itertools.product(*(range(n) for n in sizes)) if total <= MAX_COMBINATIONS else
              (tuple(i if j == pos else 0 for j in range(len(keys))) for pos in range(len(keys)) for i in range(sizes[pos])))
    works: dict[str, set[int]] = {k: set() for k in keys}
    problems: dict[tuple[str, int], str] = {}
    first: str | None = None
    for combo in combos:
        values = {**base, **{k: choices[k][i] for k, i in zip(keys, combo)}}
        problem = _problem(search, values, groups, spec)
        if problem is None:
            for k, i in zip(keys, combo):
                works[k].add(i)
            continue
        first = first or problem
        for k, i in zip(keys, combo):
            problems.setdefault((k, i), problem)
    if not keys:
        first = _problem(search, base, groups, spec)
        return (None, [f"{study}: not searched: {first}"]) if first else (search, [])
    if not any(works.values()):
        return None, [f"{study}: not searched: no configuration can train on this data: {first}"]
    space, notes = dict(search.space), []
    for k in keys:
        dropped = [i for i in range(len(choices[k])) if i not in works[k]]
        if dropped:
            space[k] = {"choice": [v for i, v in enumerate(choices[k]) if i in works[k]]}
            notes += [f"{study}: {k}={choices[k][i]!r} dropped: {problems.get((k, i), 'never works here')}"
                      for i in dropped]
    if not notes:
        return search, []
    kept = [p for p in search.points_to_evaluate
            if all(_allowed(space.get(k), v) for k, v in p.items())]
    if len(kept) < len(search.points_to_evaluate):
        notes.append(f"{study}: {len(search.points_to_evaluate) - len(kept)} points_to_evaluate dropped with them")
    return dataclasses.replace(search, space=space, points_to_evaluate=kept), notes


def _allowed(entry: Any, value: Any) -> bool:
    return not (isinstance(entry, dict) and "choice" in entry) or any(
        v == value and isinstance(v, bool) == isinstance(value, bool) for v in entry["choice"])
