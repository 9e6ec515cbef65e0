"""``python -m raysd.search PRESET``: every study of a preset, searched with Ray Tune and Optuna.

Reads the preset (``search_spaces/PRESET.yaml`` or a YAML path), finds the data (the preset's, ``--data-root``, or
synthetic machine sounds for the demo), plans one study per machine type and model family, runs them on the Ray
cluster it is attached to (or on raysd's local Ray instance) and writes the leaderboard under ``results/PRESET``.
This module is the command line only, so that ``--help`` answers at once; :mod:`raysd.runner` does the work.
"""

from __future__ import annotations

import argparse
import sys

from raysd.paths import SEARCH_SPACES
from raysd.tracking import TRACKERS

DESCRIPTION = ("Search every study of a preset with Ray Tune and Optuna: one study per machine type and model family, "
               "on the Ray cluster this is attached to (or on this machine), then write the leaderboard under "
               "results/PRESET. Without a data root the demo generates synthetic machine sounds.")
EXAMPLES = """examples:
  python -m raysd.search demo                          the whole loop on synthetic machine sounds, on this machine
  python -m raysd.search dcase20 --data-root DIR --dry-run --machine-types fan
                                                       the studies, trials and resources a run would use
  ray job submit -- python -m raysd.search dcase20 --data-root /data/dcase2020 --storage-path s3://bucket/exp
                                                       on a GPU cluster (clusters/*.yaml); --resume continues it
"""


def presets() -> list[str]:
    return sorted(p.stem for p in SEARCH_SPACES.glob("*.yaml"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m raysd.search", description=DESCRIPTION,
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", help=f"a preset in search_spaces/ ({', '.join(presets())}) or a YAML path")
    data = p.add_argument_group("data")
    data.add_argument("--data-root", help="data set root (default: the preset's, or its environment variable)")
    data.add_argument("--machine-types", nargs="+", metavar="TYPE", help="only these machine types")
    data.add_argument("--families", nargs="+", metavar="ENTRY", help="only these family entries of the preset")
    data.add_argument("--cache-dir", help="feature cache and synthetic data (default $RAYSD_CACHE or ~/.cache/raysd)")
    budget = p.add_argument_group("budget")
    budget.add_argument("--num-samples", type=int, metavar="N",
                        help="trials per study, for every entry (a grid or repeats entry trains N of its points); "
                             "default: each entry's own budget")
    budget.add_argument("--epochs", type=int, metavar="N", help="epochs per trial (default: each entry's)")
    budget.add_argument("--seed", type=int, help="the searchers' seed (default: the preset's)")
    res = p.add_argument_group("resources (per trial; override the preset's and every entry's)")
    res.add_argument("--workers", type=int, metavar="N", help="DDP workers per trial (1: the trial trains in its "
                                                              "Tune trainable)")
    res.add_argument("--cpus-per-worker", type=float, metavar="N", help="CPUs per worker")
    res.add_argument("--gpus-per-worker", type=float, metavar="N",
                     help="GPUs per worker; a fraction shares a GPU; 0 trains on CPU (a laptop)")
    res.add_argument("--concurrency", type=int, metavar="N",
                     help="studies running at once (default: the trials the cluster runs at once)")
    res.add_argument("--no-resource-check", action="store_true",
                     help="start even if no node can hold a trial (wait for nodes added by other means)")
    store = p.add_argument_group("storage")
    store.add_argument("--storage-path", help="where experiments go: a folder, s3://... or gs://... (default "
                                              "./experiments)")
    store.add_argument("--name", help="experiment name (default: the preset's)")
    store.add_argument("--shared-fs", action="store_true", help="the local storage path is shared by every node (NFS)")
    store.add_argument("--optuna-storage", metavar="URL", help="Optuna storage (default: SQLite in the experiment)")
    store.add_argument("--results-dir", help="where the leaderboard's reports go (default results/<preset>)")
    act = p.add_argument_group("behaviour")
    act.add_argument("--dry-run", action="store_true", help="print the studies, the trials they would train and "
                                                            "their resources; run nothing")
    act.add_argument("--resume", action="store_true", help="continue an interrupted experiment of the same name")
    act.add_argument("--no-leaderboard", action="store_true", help="do not build the leaderboard at the end")
    act.add_argument("--tracking", nargs="+", choices=TRACKERS, default=["tensorboard"], metavar="TRACKER",
                     help="experiment tracking, several allowed: tensorboard (always written by Ray Tune), mlflow "
                          "(pip install \"raysd[mlflow]\"), wandb (pip install \"raysd[wandb]\")")
    args = p.parse_args(argv)
    for flag in ("num_samples", "epochs", "workers", "concurrency"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be 1 or more, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from raysd.runner import run  # the search itself imports torch and Ray: not for --help

    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())
