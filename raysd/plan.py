"""A search's plan: the preset, the data it runs on, and its studies with their searches and resources.

A study is one (machine type, family entry), or one entry over every machine type: when the family's scope is
``dataset`` (one model for all types), or in a ``first_shot`` preset (one model per type, one configuration for
all); :meth:`raysd.presets.Preset.study_units` cuts them from what each family declares, never from its name.
Choices a study's data cannot train (:mod:`raysd.feasibility`) are dropped here, with a line in the plan.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from raysd import storage
from raysd.data import synth
from raysd.data.catalog import Catalog
from raysd.data.heldout import HeldoutConfig, assign
from raysd.data.store import FeatureStore
from raysd.feasibility import feasible_search
from raysd.log import module_logger
from raysd.paths import default_cache_dir
from raysd.preset_schema import Resources, errors
from raysd.presets import FamilySearch, Preset
from raysd.trial import StudyJob

log = module_logger(__name__, __spec__)
PSEUDO_HOLDOUT = 0.1  # the training clips held out for pseudo_official when the preset holds none out itself


class SearchError(RuntimeError):
    """A search that cannot start, with what to do about it."""


class NoDataError(SearchError):
    """A preset for real data was run without a data root."""


@dataclass
class Plan:
    preset: Preset
    experiment: str
    data_root: Path
    layout: str
    catalog: Any
    studies: list[StudyJob]
    num_samples: dict[str, int | None]  # trials per study when --num-samples says (else the entry's budget)
    searches: dict[str, FamilySearch] = field(default_factory=dict)  # per study: its entry's search, narrowed
    notes: list[str] = field(default_factory=list)  # what the plan dropped, and why

    def search(self, job: StudyJob) -> FamilySearch:
        return self.searches.get(job.study) or self.preset.families[job.search_entry]

    def trials(self, job: StudyJob) -> int:
        """Trials of one study (:meth:`raysd.presets.FamilySearch.trials`)."""
        return self.search(job).trials(self.num_samples[job.study])

    def trials_total(self) -> int:
        return sum(self.trials(s) for s in self.studies)


def resolve_data(preset: Preset, data_root: str | None, cache_dir: Path, quiet: bool = False) -> Path:
    root = preset.data_root(data_root)
    if root is not None:
        if not root.exists():
            raise SearchError(f"data root {root} does not exist")
        return root
    synthetic = preset.dataset.synthetic
    if not synthetic:
        env = preset.dataset.root_env or "a data root"
        raise NoDataError(
            f"preset '{preset.name}' needs real data: pass --data-root DIR or set {env}.\n"
            f"  Download it with: python -m raysd.data.download {preset.dataset.download or preset.name} --dest DIR "
            f"(it prints the --data-root to pass)\n"
            f"  Or try the whole loop on synthetic machine sounds first: python -m raysd.search demo")
    seed = preset.dataset.synthetic_seed
    layout = preset.dataset.synthetic_layout
    out = cache_dir / "synthetic" / f"{synthetic}-{layout}-seed{seed}"
    if not quiet:
        done = (out / "synth_config.json").exists()
        log.info(f"no data root given: {'using' if done else 'generating'} synthetic machine sounds "
                 f"(preset '{synthetic}') in {out}")
    return synth.generate(out, preset=synthetic, seed=seed, layout=layout)  # returns at once when complete


def experiment_path(preset: Preset, args: argparse.Namespace) -> str:
    """The experiment's folder or URI; a local path is made absolute (Ray Tune's storage needs one)."""
    base = args.storage_path or "experiments"
    if not storage.is_remote(base):
        base = str(Path(base).expanduser().resolve())
    return storage.join(base, args.name or preset.name)


def resources(preset: Preset, entry: str | None, args: argparse.Namespace) -> Resources:
    """An entry's resources per trial (its own, else the preset's) with the command line's overrides."""
    base = (preset.families[entry].resources if entry else None) or preset.resources
    given = {k: v for k, v in (("workers", args.workers), ("cpus_per_worker", args.cpus_per_worker),
                               ("gpus_per_worker", args.gpus_per_worker)) if v is not None}
    try:
        return Resources.model_validate({**base.model_dump(), **given})
    except ValidationError as e:
        (key, msg), *_ = errors(e, Resources)
        raise SearchError(f"invalid resources per trial: --{key.replace('_', '-')}: {msg}") from None


def per_trial_text(res: Resources) -> str:
    text = f"{res.workers} worker(s) x {res.cpus_per_worker:g} CPU" + (f" + {res.gpus_per_worker:g} GPU" if res.use_gpu else "")
    if res.workers == 1 and 0 < res.gpus_per_worker < 1:
        text += f" ({int(1 / res.gpus_per_worker + 1e-9)} trials per GPU)"
    return text


def make_plan(preset: Preset, args: argparse.Namespace) -> Plan:
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    root = resolve_data(preset, args.data_root, cache_dir)
    catalog = Catalog.scan(root, clip_seconds=preset.features.clip_seconds,
                           layout=preset.dataset.layout if preset.dataset.layout != "auto" else None)
    found = catalog.machine_types
    wanted = args.machine_types or preset.machine_types or found
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise SearchError(f"machine type(s) {missing} not found in {root}; found: {found}")
    families = args.families or list(preset.families)
    unknown = sorted(set(families) - set(preset.families))
    if unknown:
        raise SearchError(f"famil(ies) {unknown} are not in preset {preset.path}; it searches: {list(preset.families)}")
    study_table, heldout = None, preset.heldout
    if heldout is None and preset.metric == "pseudo_official":  # its normals: training clips no trial trains on
        heldout = HeldoutConfig(mode="recordings" if catalog.layout == "recordings" else "clips", fraction=PSEUDO_HOLDOUT)
    if heldout is not None:
        study_table = assign(catalog.table, heldout)
    table = study_table if study_table is not None else catalog.table
    experiment = experiment_path(preset, args)
    plan = Plan(preset, experiment, root, catalog.layout, catalog, [], {})
    for fam, mt, types, scope in preset.study_units(families, wanted):
        name = f"{mt.replace('/', '-')}__{fam}"
        rows = table[table["machine_type"].isin(types or (mt,)) & (table["split"] == "train")]
        search, notes = feasible_search(preset.families[fam], name, rows, preset.features, scope)
        plan.notes += notes
        if search is None:
            continue
        res = resources(preset, fam, args)
        plan.studies.append(StudyJob(
            study=name, family=preset.families[fam].family, entry=fam, machine_type=mt, catalog=catalog.table,
            data_root=str(root), layout=catalog.layout, spec=preset.features.to_dict(), rule=preset.rule,
            metric=preset.metric, cache_dir=str(cache_dir), experiment=experiment, workers=res.workers,
            use_gpu=res.use_gpu, cpus_per_worker=res.cpus_per_worker, gpus_per_worker=res.gpus_per_worker,
            max_failures=preset.max_failures, study_table=study_table, machine_types=types, scope=scope))
        plan.searches[name] = search
        plan.num_samples[name] = args.num_samples
    return plan


def print_plan(plan: Plan, epochs: dict[str, int], args: argparse.Namespace) -> None:
    print(f"preset {plan.preset.name} ({plan.preset.path}); data {plan.data_root} [{plan.layout}], "
          f"{len(plan.catalog.table)} clips; experiment {plan.experiment}")
    print(f"metric {plan.preset.metric} ({plan.preset.mode}), rule {plan.preset.rule}, scheduler {plan.preset.scheduler.type}")
    print(f"{'study':40s} {'scope':12s} {'trials':>6s} {'epochs':>6s} {'search':11s}  resources per trial")
    for s in plan.studies:
        search = plan.search(s).search.algorithm
        res = resources(plan.preset, s.search_entry, args)
        print(f"{s.study:40s} {s.scope:12s} {plan.trials(s):6d} {epochs[s.search_entry]:6d} {search:11s}  "
              f"{per_trial_text(res)}" + (f"  (machine types: {', '.join(s.machine_types)})" if s.machine_types else ""))
    for note in plan.notes:
        print(f"dropped: {note}")
    print(f"total: {len(plan.studies)} studies, {plan.trials_total()} trials")


def print_plan_without_data(preset: Preset, args: argparse.Namespace, epochs: dict[str, int]) -> None:
    """The part of the plan a preset fixes; the machine types, and so the studies, come from the data."""
    families = args.families or list(preset.families)
    types = args.machine_types or preset.machine_types
    print(f"preset {preset.name} ({preset.path}); no data root: the machine types come from the data "
          + (f"(only {', '.join(types)})" if types else "(every type found there)")
          + "; one study per machine type and family, or per family for scope dataset")
    print(f"metric {preset.metric} ({preset.mode}), rule {preset.rule}, scheduler {preset.scheduler.type}; "
          f"experiment {experiment_path(preset, args)}")
    print(f"{'family':40s} {'scope':12s} {'trials':>6s} {'epochs':>6s} {'search':11s}  resources per trial")
    for fam in families:
        trials, search = preset.families[fam].trials(args.num_samples), preset.families[fam].search.algorithm
        print(f"{fam:40s} {preset.study_scope(fam):12s} {trials:6d} {epochs[fam]:6d} {search:11s}  "
              f"{per_trial_text(resources(preset, fam, args))}")


def feature_specs(plan: Plan) -> list:
    specs: list = []
    for fam in sorted({s.search_entry for s in plan.studies}):
        view = plan.preset.example_view(fam)
        for crop in plan.preset.crops(fam):
            spec = plan.preset.features.with_crop(crop)
            specs.extend(s for s in (spec, *view.extra_specs(spec)) if s not in specs)
    return specs


def warm_cache(plan: Plan) -> None:
    """Fill the feature cache once for every crop variant and extra feature the preset asks for, before trials start."""
    for spec in feature_specs(plan):
        t0 = time.perf_counter()
        store = FeatureStore.open(plan.catalog, spec, plan.studies[0].cache_dir)
        log.info(f"features {spec.key()} ({spec.describe()}): "
                 f"{len(plan.catalog.table)} clips ready in {time.perf_counter() - t0:.1f}s"
                 + (f", {len(store.failed)} unreadable clip(s) skipped" if getattr(store, "failed", None) else ""))
