"""One model for every machine type against one per type, on synthetic DCASE 2023-layout data, through raysd's search.

(a) quality: the synthetic ``small`` set in the 2023 layout (6 machine types x 4 sections, 10 s clips, attributes,
    source and target domains) searched once with ``dense_ae`` per machine type (the DCASE baseline's family)
    and ``id_classifier`` over every machine type (attribute labels, kNN score), the same trials and epochs for
    both. Reported per family: the official 2022+ score (harmonic mean of the source AUCs, target AUCs and
    pAUCs of every section of every type) of its best, on the report half and on the full test set. The best
    ``dense_ae`` is its best trial per machine type (chosen on that type's selection half); the best
    ``id_classifier`` is its trial with the best selection score over all types.
(b) cost: ``id_classifier`` with the best configuration of (a) once more, as one dataset-scope trial and as the
    per-type trials it replaces (one per machine type, same hyperparameters and labels), each alone on one CPU:
    wall and training seconds.

    python benchmarks/dataset_scope.py [--preset small] [--trials 3] [--epochs 4] [--work DIR]

Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml

from raysd import artifacts
from raysd.data import synth
from raysd.ensemble import half_metrics
from raysd.report.experiment import read_scores

FEATURES = {"sample_rate": 16000, "n_fft": 1024, "hop_length": 512, "n_mels": 64, "clip_seconds": 10.0}
CLASSIFIER = {"scope": "dataset", "labels": "attribute", "score": "knn", "batch_size": 64, "patch_hop": 64,
              "precise_bn": 4096}


def preset(name: str, families: dict, concurrency_note: str = "") -> dict:
    return {"name": name, "description": f"benchmarks/dataset_scope.py {concurrency_note}".strip(),
            "dataset": {"layout": "auto"}, "rule": "2022", "metric": "sel_official", "seed": 0,
            "features": FEATURES, "scheduler": {"type": "none"}, "max_failures": 0,
            "resources": {"workers": 1, "cpus_per_worker": 1}, "families": families}


def search(work: Path, data: Path, body: dict, *extra: str) -> Path:
    path = work / f"{body['name']}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    env = {**os.environ, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300", "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "raysd.search", str(path), "--data-root", str(data), "--cache-dir",
           str(work / "cache"), "--storage-path", str(work / "exp"), "--results-dir", str(work / "results" / body["name"]),
           *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(f"search {body['name']}: rc {done.returncode}, {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"search {body['name']} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
    return work / "exp" / body["name"]


def records(exp: Path) -> list[artifacts.TrialRecord]:
    out = [artifacts.read_trial_record(str(f)) for f in sorted((exp / artifacts.TRIALS_DIR).glob("*/*.json"))]
    return [r for r in out if r.status == "finished" and r.checkpoint]


def best(recs: list[artifacts.TrialRecord]) -> artifacts.TrialRecord:
    return max(recs, key=lambda r: (r.metrics or {}).get("sel_official", float("-inf")))


def official(table: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per half: the official score and its parts. A single AUC of 0 (likely with a few clips per section,
    domain and half) makes a harmonic mean 0, so the arithmetic means of the per-section values come too."""
    out = {}
    for half in ("report", "test"):
        res = half_metrics(table, half, "2022")
        if res is None:
            continue
        per, agg = res
        out[half] = {"official": float(agg["score"]), "hmean_auc_source": float(agg["auc_source"]),
                     "hmean_auc_target": float(agg["auc_target"]), "hmean_pauc": float(agg["pauc"]),
                     **{f"mean_{k}": float(per[k].mean()) for k in ("auc_source", "auc_target", "pauc")}}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small", help="synthetic preset (default small)")
    p.add_argument("--trials", type=int, default=3, help="trials per study in (a)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--work", help="working folder (default: a temporary one)")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="raysd-scope-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = synth.generate(work / "data", args.preset, seed=0, layout="dcase2023")
    generate_s = time.perf_counter() - t0

    quality = search(work, data, preset("scope_quality", {
        "dense_ae": {"num_samples": args.trials, "epochs": args.epochs,
                     "space": {"lr": {"loguniform": [3.0e-4, 3.0e-3]}, "batch_size": {"choice": [256, 512]}}},
        "id_classifier": {"num_samples": args.trials, "epochs": args.epochs,
                          "space": {**CLASSIFIER, "lr": {"loguniform": [1.0e-3, 4.0e-3]},
                                    "knn_means": {"choice": [0, 16]}}},
    }))
    recs = records(quality)
    dense = [best([r for r in recs if r.study == s]) for s in sorted({r.study for r in recs if r.family == "dense_ae"})]
    dense_table = pd.concat([read_scores(f"{r.checkpoint}/{artifacts.SCORES_TEST}") for r in dense], ignore_index=True)
    clf = best([r for r in recs if r.family == "id_classifier"])
    clf_table = read_scores(f"{clf.checkpoint}/{artifacts.SCORES_TEST}")
    types = sorted(set(dense_table["machine_type"]))

    config = {k: v for k, v in clf.params.items() if k != "epochs"}
    per_type = {**config, "scope": "machine_type"}
    cost = search(work, data, preset("scope_cost", {
        "id_classifier": {"num_samples": 1, "epochs": args.epochs, "space": config},
        "id_classifier_per_type": {"family": "id_classifier", "num_samples": 1, "epochs": args.epochs,
                                   "space": per_type},
    }), "--concurrency", "1", "--no-leaderboard")
    cost_recs = records(cost)
    one = [r for r in cost_recs if r.scope == "dataset"]
    many = [r for r in cost_recs if r.scope is None]
    result = {
        "data": {"preset": args.preset, "layout": "dcase2023", "machine_types": types, "generate_s": round(generate_s, 1)},
        "trials": args.trials, "epochs": args.epochs,
        "official_2022": {"dense_ae_best_per_type": official(dense_table), "id_classifier_dataset_knn": official(clf_table)},
        "id_classifier_best": {k: v for k, v in clf.params.items()},
        "dataset_trial": {"wall_s": round(sum(r.wall_seconds or 0 for r in one), 1),
                          "train_s": round(sum((r.metrics or {}).get("train_seconds", 0) for r in one), 1)},
        "per_type_trials": {"n": len(many), "wall_s": round(sum(r.wall_seconds or 0 for r in many), 1),
                            "train_s": round(sum((r.metrics or {}).get("train_seconds", 0) for r in many), 1)},
        "work": str(work),
    }
    d, m = result["dataset_trial"], result["per_type_trials"]
    result["wall_ratio_per_type_over_dataset"] = round(m["wall_s"] / d["wall_s"], 2) if d["wall_s"] else None
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
