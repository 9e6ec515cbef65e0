"""Ensembles of one machine type's trials (Giri et al.): candidates (the best single model, the best trial of each
family, the seed ensembles of configurations trained several times, greedy forward selection with replacement),
the choice among them by the selection half, the ensembles tables and the ``ensemble.json`` document (its format
is :mod:`raysd.artifacts`).

A seed ensemble is the mean of the standardised scores of the finished trials of one study whose hyperparameters
differ in ``seed`` alone (a preset entry's ``repeats``, or a configuration Tune ran more than once): "the best
configuration, trained N times, averaged".

The chosen model is the candidate with the best selection figure. With ``needs_gain`` (``--ensemble-gain noise``),
an ensemble replaces the best single model only when its gain on the selection half is above its bootstrap noise:
the one-sided 95% lower bound of the paired bootstrap of the gain (:func:`raysd.uncertainty.gain`) is above 0; a
gain within the noise keeps the single model, and the reason says so. ``benchmarks/selection_rules.py`` measures
both rules on the report half."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from raysd import artifacts
from raysd.ensemble import (
    METRIC_KEYS,
    align,
    combine_matrix,
    fit_stats,
    greedy_select,
    half_rows,
    selection_value,
    standardise,
)
from raysd.families.hparams import TrainHP
from raysd.report.board import aggregate_columns, figures
from raysd.report.experiment import Experiment, Trial
from raysd.report.intervals import Bootstrap
from raysd.uncertainty import gain


@dataclass
class Candidate:
    """One model of a machine type: the best single trial or an ensemble of standardised members."""

    machine_type: str
    name: str
    kind: str  # 'single', 'family-best', 'seeds', 'greedy'
    combine: str
    weights: dict[str, int]  # member name -> weight
    test: pd.DataFrame  # combined standardised scores, test clips
    train: pd.DataFrame  # combined standardised scores, training clips
    selection: float = math.nan
    figures: dict[str, float] = field(default_factory=dict)
    member_figures: dict[str, dict[str, float]] = field(default_factory=dict)  # seeds: each member's own figures
    seeds: dict[str, Any] = field(default_factory=dict)  # seeds: member name -> its seed
    replicates: np.ndarray | None = None  # the search metric's bootstrap replicates on the selection half

    @property
    def members(self) -> list[str]:
        return list(self.weights)


def member_label(weights: dict[str, int]) -> str:
    return " + ".join(f"{n} x{w}" if w > 1 else n for n, w in weights.items())


SEED = "seed"


def seed_of(t: Trial) -> Any:
    return t.params.get(SEED, TrainHP.seed)


def seed_groups(trials: list[Trial]) -> dict[str, list[Trial]]:
    """Trials of one study whose hyperparameters differ in ``seed`` alone, by ensemble name: ``seeds:<study>``,
    with the first trial id of the group where the study has several; the trials' order is kept (best first).

    A group needs two seeds or more: trials of one configuration and one seed (Tune repeating a fixed space)
    are the same model up to nondeterminism, no ensemble."""
    groups: dict[tuple[str, str], list[Trial]] = {}
    for t in trials:
        rest = json.dumps({k: v for k, v in t.params.items() if k != SEED}, sort_keys=True, default=str)
        groups.setdefault((t.study, rest), []).append(t)
    kept = [g for g in groups.values() if len({json.dumps(seed_of(t), default=str) for t in g}) > 1]
    per_study = Counter(g[0].study for g in kept)
    return {f"seeds:{g[0].study}" + (f":{min(t.trial_id for t in g)}" if per_study[g[0].study] > 1 else ""): g
            for g in kept}


def ensembles_for_type(exp: Experiment, mt: str, trials: list[Trial], values: dict[str, float],
                       top_k: int, steps: int, boot: Bootstrap | None = None,
                       single: Trial | None = None) -> tuple[list[Candidate], dict[str, pd.DataFrame]]:
    """Candidates of one machine type (best single first: ``single``, else the top trial by the search metric) and
    each used member's standardisation statistics; with ``boot``, their intervals and selection replicates."""
    rule, metric, mode = exp.rule, exp.metric, exp.mode
    sign = 1 if mode == "max" else -1
    ranked = sorted((t for t in trials if t.key in values), key=lambda t: (-sign * values[t.key], t.name))
    if not ranked:
        return [], {}
    if single is not None and single in ranked:
        ranked.remove(single)
        ranked.insert(0, single)
    fam_best: dict[str, Trial] = {}
    for t in ranked:
        fam_best.setdefault(t.family, t)
    library = ranked[:max(1, top_k)]
    seeds = seed_groups(ranked)
    pool = list({t.key: t for t in library + list(fam_best.values()) + [t for g in seeds.values() for t in g]}.values())
    stats = {t.name: fit_stats(t.train, t.name) for t in pool}
    z_test = [standardise(t.test, stats[t.name], t.name) for t in pool]
    z_train = [standardise(train.loc[train["split"] == "train"], stats[t.name], t.name)
               for t in pool if (train := t.train) is not None]  # every trial of the pool is scored
    names = [t.name for t in pool]
    meta_test, zt = align(z_test, names)
    meta_train, zr = align(z_train, names)
    col = {n: j for j, n in enumerate(names)}

    def build(name: str, kind: str, rule_: str, weights: dict[str, int]) -> Candidate:
        w = np.zeros(len(names))
        for n, k in weights.items():
            w[col[n]] = k
        test = meta_test.assign(score=combine_matrix(zt, w, rule_))
        train = meta_train.assign(score=combine_matrix(zr, w, rule_))
        c = Candidate(mt, name, kind, rule_, dict(weights), test, train,
                      selection=selection_value(test, metric, rule), figures=figures(test, rule))
        if boot is not None:
            c.figures.update(boot.columns(test))
            c.replicates = boot.search_metric(test)
        return c

    out = [build("best single", "single", "mean", {ranked[0].name: 1})]
    if len(fam_best) > 1:
        for r in ("mean", "max"):
            out.append(build(f"family-best {r}", "family-best", r, {t.name: 1 for t in fam_best.values()}))
    for name, group in seeds.items():
        c = build(name, "seeds", "mean", {t.name: 1 for t in group})
        c.member_figures = {t.name: figures(t.test, rule) for t in group if t.test is not None}
        c.seeds = {t.name: seed_of(t) for t in group}
        out.append(c)
    if len(library) > 1:
        lib_idx = [col[t.name] for t in library]
        sel_mask = half_rows(meta_test, "selection").index.to_numpy()
        sel_meta = meta_test.loc[sel_mask]
        for r in ("mean", "max"):
            zs = zt[np.ix_(sel_mask, lib_idx)]
            pick = greedy_select(zs, [t.name for t in library],
                                 lambda s: selection_value(sel_meta.assign(score=s), metric, rule), rule=r,
                                 steps=steps, mode=mode)
            out.append(build(f"greedy {r}", "greedy", r, pick.weights))
    return out, {n: stats[n] for c in out for n in c.members}


def choose(cands: list[Candidate], mode: str, needs_gain: bool = False) -> tuple[Candidate, str]:
    """The machine type's model and why: the candidate with the best selection figure (ties to fewer members); with
    ``needs_gain`` (and replicates), an ensemble only when its gain over the best single model is above its
    bootstrap noise (module docstring)."""
    sign = 1 if mode == "max" else -1
    single = cands[0]
    valid = [c for c in cands if math.isfinite(c.selection)]
    if not valid:
        return single, "no candidate has a selection figure"
    best = max(valid, key=lambda c: (sign * c.selection, -len(c.members), -cands.index(c)))
    if best is single or len(best.members) <= 1:
        return best, "the best single model: no ensemble has a better selection figure"
    if not needs_gain or best.replicates is None or single.replicates is None:
        return best, (f"{best.name}: the best selection figure, {sign * (best.selection - single.selection):+.4f} over "
                      f"the best single model")
    bound, median = gain(best.replicates, single.replicates, mode)
    if math.isfinite(bound) and bound > 0:
        return best, (f"{best.name}: selection gain {sign * (best.selection - single.selection):+.4f} over the best "
                      f"single model, above its bootstrap noise (one-sided 95% bound {bound:+.4f})")
    return single, (f"kept the best single model: {best.name} gains {sign * (best.selection - single.selection):+.4f} "
                    f"on the selection half, within its bootstrap noise (one-sided 95% bound {bound:+.4f})")


def ensembles_table(exp: Experiment, per_type: dict[str, list[Candidate]], chosen: dict[str, Candidate],
                    boot: Bootstrap | None = None) -> pd.DataFrame:
    rule = exp.rule
    key = METRIC_KEYS.get(exp.metric.removeprefix("sel_"), "auc")
    key = "official" if key == "score" else key
    rows = []

    def row(mt: str, name: str, kind: str, comb: str, members: str, n: float, figs: dict, single: dict,
            is_chosen: bool, member_figs: list[dict] | None = None) -> None:
        r = {"machine_type": mt, "ensemble": name, "kind": kind, "combine": comb, "n_members": n, "members": members,
             "chosen": is_chosen}
        r.update({c: figs.get(c, math.nan) for a in aggregate_columns(rule) for c in (a, f"{a}_lo", f"{a}_hi")})
        for p in ("report", "test"):
            r[f"gain_{p}_{key}"] = figs.get(f"{p}_{key}", math.nan) - single.get(f"{p}_{key}", math.nan)
        for p in ("report", "test"):  # a seed ensemble beside its own members
            own = [f.get(f"{p}_{key}", math.nan) for f in member_figs or ()]
            if own:
                r[f"members_mean_{p}_{key}"], r[f"members_best_{p}_{key}"] = float(np.mean(own)), float(np.max(own))
        rows.append(r)

    for mt, cands in per_type.items():
        single = cands[0].figures
        for c in cands:
            row(mt, c.name, c.kind, c.combine, member_label(c.weights), len(c.members), c.figures, single,
                c is chosen[mt], list(c.member_figures.values()))
    # over all machine types: the same candidate kind in every type, and the chosen ones
    names = [c.name for c in next(iter(per_type.values()))] if per_type else []
    overall: dict[str, dict] = {}
    for name in names:
        parts = [c for cands in per_type.values() for c in cands if c.name == name]
        if len(parts) < len(per_type):
            continue
        overall[name] = all_figures(pd.concat([p.test for p in parts], ignore_index=True), rule, boot)
    overall["chosen"] = all_figures(pd.concat([c.test for c in chosen.values()], ignore_index=True), rule, boot)
    single = overall.get("best single", {})
    for name, figs in overall.items():
        kind = "chosen" if name == "chosen" else next(c.kind for c in next(iter(per_type.values())) if c.name == name)
        row("(all)", name, kind, "", "", math.nan, figs, single, False)
    df = pd.DataFrame(rows)
    df["n_members"] = df["n_members"].astype("Int64")
    return df.dropna(axis=1, how="all")


def all_figures(test: pd.DataFrame, rule: str, boot: Bootstrap | None) -> dict[str, float]:
    """Figures of a score table over several machine types, with their intervals when there is a bootstrap."""
    figs = figures(test, rule)
    if boot is not None:
        figs.update(boot.columns(test))
    return figs


def seed_table(exp: Experiment, per_type: dict[str, list[Candidate]]) -> pd.DataFrame:
    """Each seed ensemble's figures (``member`` '(mean)') followed by each of its members' own figures."""
    cols = ["machine_type", "ensemble", "member", "seed"] + aggregate_columns(exp.rule)
    rows = []
    for mt, cands in per_type.items():
        for c in (c for c in cands if c.kind == "seeds"):
            rows.append({"machine_type": mt, "ensemble": c.name, "member": f"(mean of {len(c.members)})", "seed": "",
                         **c.figures})
            rows += [{"machine_type": mt, "ensemble": c.name, "member": n, "seed": c.seeds.get(n, ""), **figs}
                     for n, figs in c.member_figures.items()]
    df = pd.DataFrame(rows, columns=cols)
    return df.dropna(axis=1, how="all") if rows else df


def ensemble_document(exp: Experiment, chosen: dict[str, Candidate], stats: dict[str, dict[str, pd.DataFrame]],
                      by_name: dict[str, Trial], quantile: float) -> dict:
    """``ensemble.json``: per machine type, the chosen candidate's members, rule and thresholds."""
    types = {}
    for mt, c in chosen.items():
        thr = artifacts.thresholds(c.train, quantile)
        members = [trial_member(by_name[n], w, stats[mt][n].loc[stats[mt][n]["machine_type"] == mt])
                   for n, w in c.weights.items()]
        types[mt] = artifacts.type_entry(c.name, c.kind, c.combine, members, {s: v for (_, s), v in thr.items()},
                                         {k: v for k, v in c.figures.items() if k in aggregate_columns(exp.rule)})
    return experiment_document(exp, types, quantile)


def trial_member(trial: Trial, weight: int, stats: pd.DataFrame) -> dict:
    """The ``ensemble.json`` member entry of a finished trial."""
    return artifacts.member_entry(trial.name, trial.family, str(trial.checkpoint), trial.params, stats, weight,
                                  study=trial.study, trial_id=trial.trial_id,
                                  machine_type=trial.machine_type if trial.covers else None)


def experiment_document(exp: Experiment, types: dict, quantile: float) -> dict:
    """The ``ensemble.json`` document of an experiment around its per-machine-type entries."""
    return artifacts.ensemble_document(types, quantile, exp.meta.get("layout", ""), experiment=exp.root,
                                       preset=exp.preset, rule=exp.rule, metric=exp.metric)
