"""The record-holding recipe (``adacos_knn``) against the families of the papers raysd started from, on synthetic
data, through raysd's search, with the same budget for every family.

For each layout (``--layouts``, default the DCASE 2020 and 2023 layouts of the synthetic ``--preset``, ``small``:
6 machine types, 3-4 IDs / sections each, 60 training and 30 test clips per section, 10 s):

(a) one search with ``--trials`` trials of ``--epochs`` epochs per study of each family in ``--families``:
    ``dense_ae`` per machine type (the DCASE baseline's family), and over every machine type at once (dataset
    scope, attribute labels, which fall back to machine type x section where a clip has none, kNN score)
    ``id_classifier``, ``triplet`` and ``adacos_knn`` (its published settings as the first trial). Reported per
    family: the official score (rule 2020 for the 2020 layout: mean AUC and pAUC over every ID; rule 2022 for
    the 2023 layout: harmonic mean of the source AUCs, target AUCs and pAUCs of every section) of its best trial,
    chosen on the selection half, on the report half and on the full test set. The best ``dense_ae`` is its
    best trial per machine type.
(b) ``adacos_knn``'s best configuration of (a) trained with 3 seeds (``repeats: 3``), and the leaderboard's seed
    ensemble of the three (mean of their standardised scores) against each member.

    python benchmarks/recipe.py [--preset small] [--layouts dcase2020,dcase2023] [--trials 3] [--epochs 4]
                                [--families dense_ae,id_classifier,triplet,adacos_knn] [--work DIR]
                                [--prior EXPERIMENT --prior-families dense_ae,...] [--tag TAG]

``--prior`` reuses the finished trials of an earlier search of the same data and budget (e.g. one this script or
``benchmarks/dataset_scope.py`` ran) for ``--prior-families`` instead of training them again; ``--tag`` names the
new search apart from an earlier one.

Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from raysd import artifacts
from raysd.data import synth
from raysd.ensemble import half_metrics
from raysd.report.experiment import read_scores

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dataset_scope import best, preset, records, search  # noqa: E402

RULES = {"dcase2020": "2020", "dcase2023": "2022"}
DATASET = {"scope": "dataset", "labels": "attribute"}
PUBLISHED = {"lr": 1.0e-3, "mixup_prob": 1.0, "knn_means": 16}  # batch 64, weight decay 1e-5: fixed below


def families(trials: int, epochs: int, wanted: list[str]) -> dict:
    every = {
        "dense_ae": {"space": {"lr": {"loguniform": [3.0e-4, 3.0e-3]}, "batch_size": {"choice": [256, 512]}}},
        "id_classifier": {"space": {**DATASET, "score": "knn", "batch_size": 64, "patch_hop": 64, "precise_bn": 4096,
                                    "lr": {"loguniform": [1.0e-3, 4.0e-3]}, "knn_means": {"choice": [0, 16]}}},
        "triplet": {"space": {**DATASET, "score": "knn", "normalize": True, "batch_size": 64,
                              "lr": {"loguniform": [1.0e-4, 1.0e-3]}, "knn_means": {"choice": [0, 16]}}},
        "adacos_knn": {"space": {**DATASET, "batch_size": 64, "weight_decay": 1.0e-5,
                                 "lr": {"loguniform": [5.0e-4, 3.0e-3]}, "mixup_prob": {"uniform": [0.25, 1.0]},
                                 "knn_means": {"choice": [0, 16]}},
                       "points_to_evaluate": [PUBLISHED]},
    }
    return {f: {"num_samples": trials, "epochs": epochs, **every[f]} for f in wanted}


def official(table: pd.DataFrame, rule: str) -> dict[str, float]:
    out = {}
    for half in ("report", "test"):
        res = half_metrics(table, half, rule)
        if res is not None:
            out[half] = round(float(res[1]["score"]), 4)
    return out


def best_table(recs: list[artifacts.TrialRecord], family: str) -> pd.DataFrame:
    mine = [r for r in recs if r.family == family]
    picks = [best([r for r in mine if r.study == s]) for s in sorted({r.study for r in mine})]
    return pd.concat([read_scores(f"{r.checkpoint}/{artifacts.SCORES_TEST}") for r in picks], ignore_index=True)


def run_layout(work: Path, layout: str, args: argparse.Namespace) -> dict:
    rule = RULES[layout]
    t0 = time.perf_counter()
    data = synth.generate(work / f"data_{layout}", args.preset, seed=0, layout=layout)
    out: dict = {"generate_s": round(time.perf_counter() - t0, 1)}
    body = {**preset(f"recipe_{layout}{args.tag}", families(args.trials, args.epochs, args.families)), "rule": rule}
    t0 = time.perf_counter()
    recs = records(search(work, data, body))
    out["search_s"] = round(time.perf_counter() - t0, 1)
    for prior in args.prior:
        recs += [r for r in records(Path(prior)) if r.family in args.prior_families]
    every = [*args.prior_families, *args.families]
    out["official"] = {f: official(best_table(recs, f), rule) for f in every}
    out["trials_finished"] = {f: sum(r.family == f for r in recs) for f in every}
    out["prior"] = {"experiments": args.prior, "families": args.prior_families}
    if "adacos_knn" not in args.families:
        return out
    top = best([r for r in recs if r.family == "adacos_knn"])
    config = {k: v for k, v in top.params.items() if k not in ("epochs", "seed")}
    out["adacos_knn_best"] = config
    seeds = {**preset(f"recipe_{layout}{args.tag}_seeds", {"adacos_knn": {"repeats": 3, "epochs": args.epochs, "space": config}}),
             "rule": rule}
    t0 = time.perf_counter()
    search(work, data, seeds)
    out["seeds_s"] = round(time.perf_counter() - t0, 1)
    table = pd.read_csv(work / "results" / seeds["name"] / "seed_ensembles.csv")
    out["seed_ensemble"] = json.loads(table.to_json(orient="records"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="synthetic preset (default small)")
    p.add_argument("--layouts", default="dcase2020,dcase2023")
    p.add_argument("--families", default="dense_ae,id_classifier,triplet,adacos_knn")
    p.add_argument("--trials", type=int, default=3, help="trials per study")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--work", help="working folder (default: a temporary one)")
    p.add_argument("--prior", action="append", default=[], help="an earlier experiment folder (repeatable)")
    p.add_argument("--prior-families", default="", help="the families whose trials --prior supplies")
    p.add_argument("--tag", default="", help="suffix of the experiment names")
    args = p.parse_args(argv)
    args.families = [f for f in args.families.split(",") if f]
    args.prior_families = [f for f in args.prior_families.split(",") if f]
    if set(args.families) & set(args.prior_families):
        p.error("a family is either trained (--families) or taken from --prior (--prior-families), not both")
    if len(args.layouts.split(",")) > 1 and args.prior:
        p.error("--prior goes with one layout at a time")
    work = Path(args.work or tempfile.mkdtemp(prefix="raysd-recipe-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    result: dict = {"preset": args.preset, "trials": args.trials, "epochs": args.epochs, "work": str(work)}
    for layout in args.layouts.split(","):
        result[layout] = run_layout(work, layout, args)
        print(json.dumps({layout: result[layout]}), file=sys.stderr, flush=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
