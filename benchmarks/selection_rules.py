"""Which choices hold beyond the data that made them: pick rules, the ensemble rule and label-free selection,
measured on pools of trials trained once on synthetic data sets.

``record`` (once; trains): for each synthetic data set (the ``demo`` preset's generator with ``--data-seeds``), one
search through ``python -m raysd.search`` over several cheap families with many trials per study, with a tenth of
the training clips held out, so every trial also reports ``pseudo_official`` (:mod:`raysd.pseudo`) and
``heldout_loss``::

    python benchmarks/selection_rules.py record [--data-seeds 0 1 2] [--trials 10] [--work DIR]

``measure`` (the default; no training): on each recorded pool,

- *label-free selection*: per study, Spearman's rank correlation across its finished trials between the report-half
  official score and each selection figure: ``sel_official`` (the labelled selection half, the reference),
  ``pseudo_official`` and ``-heldout_loss``; the median over studies and data sets;
- *picks*: ``--replicates`` small searches drawn from the pool (``--per-study`` trials of each study, without
  replacement), each run through the leaderboard's own functions (bootstrap, ties, pick rules, ensemble
  candidates), and the report-half official score of what each rule keeps for each machine type: the best
  selection figure (``top``, the reference), the tie rules ``neighbours`` and ``defaults``, any ensemble with a
  better selection figure (``ensemble:any``, the leaderboard's rule before the bootstrap) and an ensemble only above
  its bootstrap noise (``ensemble:noise``). Reported: each rule's mean gain over ``top`` with a 95% interval over
  replicates (a bootstrap of the replicates' mean), and how often it changed the pick.

Prints one JSON object on its last line and writes ``selection_rules.json`` under ``--out``::

    python benchmarks/selection_rules.py [measure] [--work DIR] [--replicates 100] [--per-study 4] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from raysd.presets import SEARCH_SPACES
from raysd.report.board import figures, leaderboard_table
from raysd.report.ensembles import choose, ensembles_for_type
from raysd.report.experiment import Experiment, load_experiment
from raysd.report.intervals import bootstrap
from raysd.report.picks import pick

FAMILIES = {
    "dense_ae": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}, "batch_size": {"choice": [128, 256, 512]},
                 "bottleneck": {"choice": [4, 8, 16]}},
    "vae": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}, "batch_size": {"choice": [128, 256, 512]},
            "beta": {"loguniform": [0.01, 1.0]}},
    "group_made": {"lr": {"loguniform": [1.0e-4, 1.0e-2]}, "batch_size": {"choice": [256, 512]}},
    "conv_ae": {"lr": {"loguniform": [1.0e-4, 3.0e-3]}, "batch_size": {"choice": [32, 64]}},
}
RULES = ("top", "neighbours", "defaults", "ensemble:any", "ensemble:noise")


def pool_preset(seed: int, trials: int, epochs: int) -> dict[str, Any]:
    demo = yaml.safe_load((SEARCH_SPACES / "demo.yaml").read_text())
    return {**{k: demo[k] for k in ("rule", "features", "machine_types", "resources")},
            "name": f"pool{seed}", "description": "benchmarks/selection_rules.py: a pool of trials",
            "dataset": {**demo["dataset"], "synthetic_seed": seed}, "metric": "sel_official", "seed": seed,
            "scheduler": {"type": "none"}, "max_failures": 1, "heldout": {"mode": "clips", "fraction": 0.1},
            "families": {f: {"num_samples": trials, "epochs": epochs, "space": space} for f, space in FAMILIES.items()}}


def record(a: argparse.Namespace, extra: list[str]) -> int:
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    for seed in a.data_seeds:
        path = work / f"pool{seed}.yaml"
        path.write_text(yaml.safe_dump(pool_preset(seed, a.trials, a.epochs), sort_keys=False))
        cmd = [sys.executable, "-m", "raysd.search", str(path), "--storage-path", str(work / "experiments"),
               "--no-leaderboard", *extra]
        t0 = time.time()
        rc = subprocess.call(cmd)
        print(f"pool {seed}: exit {rc} in {time.time() - t0:.0f} s ({' '.join(cmd)})", flush=True)
        if rc != 0:
            return rc
    return 0


# ---------------------------------------------------------------------- label-free selection
def rank_correlations(exp: Experiment) -> pd.DataFrame:
    """Per study: Spearman's rho between the report-half official score and each selection figure."""
    rows = []
    for study in sorted({t.study for t in exp.trials}):
        done = [t for t in exp.trials if t.study == study and t.scored and t.test is not None]
        if len(done) < 4:
            continue
        report = [figures(t.test, exp.rule).get("report_official", math.nan) for t in done]
        row: dict[str, Any] = {"study": study, "trials": len(done)}
        for name, sign in (("sel_official", 1), ("pseudo_official", 1), ("heldout_loss", -1)):
            x = [sign * float(t.metrics.get(name, math.nan)) for t in done]
            frame = pd.DataFrame({"x": x, "y": report}).dropna()
            row[name] = float(frame["x"].corr(frame["y"], method="spearman")) if len(frame) >= 4 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------- picks
def picks_of(sub: Experiment, n_boot: int, top_k: int, steps: int) -> dict[str, dict[str, float]]:
    """Per machine type of one small search, the report-half official score of what each rule keeps."""
    boot = bootstrap(sub, n_boot)
    _, values = leaderboard_table(sub, boot)
    sign = 1 if sub.mode == "max" else -1
    out: dict[str, dict[str, float]] = {}
    for mt in sorted({t.machine_type for t in sub.trials}):
        trials = [t for t in sub.trials if t.machine_type == mt]
        ranked = sorted((t for t in trials if t.key in values), key=lambda t: (-sign * values[t.key], t.name))
        if not ranked:
            continue
        got = {}
        for rule in ("top", "neighbours", "defaults"):
            t = pick(ranked, values, boot, rule, sub.trials)
            got[rule] = figures(t.test, sub.rule)["report_official"]
        cands, _ = ensembles_for_type(sub, mt, trials, values, top_k, steps, boot, ranked[0])
        for rule, needs_gain in (("ensemble:any", False), ("ensemble:noise", True)):
            c, _ = choose(cands, sub.mode, needs_gain)
            got[rule] = c.figures["report_official"]
        out[mt] = got
    return out


def mean_interval(x: np.ndarray, rng: np.random.Generator, n: int = 2000) -> tuple[float, float, float]:
    means = rng.choice(x, size=(n, len(x)), replace=True).mean(axis=1)
    return float(x.mean()), float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def measure(a: argparse.Namespace) -> int:
    exps = sorted(Path(a.work, "experiments").glob("pool*"))
    if not exps:
        raise SystemExit(f"no recorded pools under {a.work}/experiments: run `record` first")
    rng = np.random.default_rng(a.seed)
    correlations, picks = [], []
    for path in exps:
        exp = load_experiment(path)
        corr = rank_correlations(exp).assign(pool=path.name)
        correlations.append(corr)
        studies = sorted({t.study for t in exp.trials})
        finished = {s: sorted({t.trial_id for t in exp.trials if t.study == s and t.scored}) for s in studies}
        t0 = time.time()
        for r in range(a.replicates):
            keep = {(s, tid) for s in studies for tid in rng.choice(finished[s], size=min(a.per_study, len(finished[s])),
                                                                     replace=False)}
            sub = dataclasses.replace(exp, trials=[t for t in exp.trials if (t.study, t.trial_id) in keep])
            for mt, got in picks_of(sub, a.bootstrap, a.top_k, a.steps).items():
                picks.append({"pool": path.name, "replicate": r, "machine_type": mt, **got})
        print(f"{path.name}: {len(exp.trials)} trials, {a.replicates} small searches in {time.time() - t0:.0f} s",
              file=sys.stderr, flush=True)
    corr = pd.concat(correlations, ignore_index=True)
    table = pd.DataFrame(picks)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    corr.to_csv(out / "rank_correlations.csv", index=False)
    table.to_csv(out / "picks.csv", index=False)
    result: dict[str, Any] = {
        "pools": [p.name for p in exps], "replicates": a.replicates, "per_study": a.per_study,
        "rank_correlation_median": {k: float(corr[k].median()) for k in ("sel_official", "pseudo_official",
                                                                         "heldout_loss")},
        "rank_correlation_by_pool": {p: {k: float(g[k].median()) for k in ("sel_official", "pseudo_official",
                                                                           "heldout_loss")}
                                     for p, g in corr.groupby("pool")},
        "report_official_mean": {rule: float(table[rule].mean()) for rule in RULES}, "gain_over_top": {}}
    for rule in RULES[1:]:
        d = (table[rule] - table["top"]).to_numpy()
        mean, lo, hi = mean_interval(d, rng)
        result["gain_over_top"][rule] = {"mean": mean, "lo": lo, "hi": hi, "changed": float((d != 0).mean())}
    for rule, g in result["gain_over_top"].items():
        print(f"{rule:16s} report-half official vs top: {g['mean']:+.4f} [{g['lo']:+.4f}, {g['hi']:+.4f}], "
              f"changed the pick in {g['changed']:.0%}", file=sys.stderr)
    text = json.dumps(result)
    (out / "selection_rules.json").write_text(text + "\n")
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    command = argv.pop(0) if argv and argv[0] in ("record", "measure") else "measure"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "raysd_selection_rules"))
    if command == "record":
        p.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1, 2])
        p.add_argument("--trials", type=int, default=10, help="trials per study (default 10)")
        p.add_argument("--epochs", type=int, default=3)
        return record(p.parse_args(argv), extra)
    p.add_argument("--replicates", type=int, default=100)
    p.add_argument("--per-study", type=int, default=4, help="trials of each study in a small search (default 4)")
    p.add_argument("--bootstrap", type=int, default=300, help="bootstrap replicates per small search")
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results/selection_rules")
    return measure(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
