"""What a raysd trial costs over a plain PyTorch loop, and what its batching gains over a DataLoader.

(a) plain: one process, the same family, data and epochs, trained with a textbook loop (a
    ``torch.utils.data.DataLoader`` over precomputed windows), then the test clips scored;
(b) trial: the same as one raysd trial (the trial body in its Ray Tune function trainable: checkpoints, score
    tables, the study driver's record) on an already running local Ray instance; then two trials of one study
    one after the other, the second in the first one's process (``reuse_actors``).
``overhead_s = trial_s - plain_s``, ``trial_s`` the wall time of a study of one trial (Tune's start, a new trial
process, the trial); ``warm_overhead_s = warm_trial_s - plain_s``, ``warm_trial_s`` what a second trial adds to
that study (a slot's next trial). Then the samples/s of raysd's batching (windows gathered by index
from one resident tensor, ``ClipSet.batches``) against a ``DataLoader`` over the same cached features
(``batching_speedup``), and the same comparison for a whole training epoch.

    python benchmarks/trial_overhead.py [--family dense_ae] [--epochs 3] [--data DIR]

Prints one JSON object on its last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class WindowDataset(torch.utils.data.Dataset):
    """The textbook way: one window per ``__getitem__`` from the cached clip array."""

    def __init__(self, clips: torch.Tensor, view, labels: torch.Tensor):
        self.clips, self.view, self.labels = clips, view, labels
        self.starts = view.starts(clips.shape[2])
        self.w = view.window_length(clips.shape[2])

    def __len__(self) -> int:
        return self.clips.shape[0] * len(self.starts)

    def __getitem__(self, i: int):
        c, s = divmod(i, len(self.starts))
        x = self.clips[c, :, self.starts[s]:self.starts[s] + self.w]
        x = x.T.reshape(-1) if self.view.layout == "vector" else x.unsqueeze(0)
        return x, self.labels[c]


def plain_loop(family, hp, study, view, epochs: int, score: bool = True) -> float:
    """Train (and score the test clips) with a plain loop; returns wall seconds."""
    t0 = time.perf_counter()
    torch.manual_seed(hp.seed)
    model = family.build(study.info)
    opt = torch.optim.Adam(model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
    loader = torch.utils.data.DataLoader(WindowDataset(study.train_x, view, study.train_y),
                                         batch_size=hp.batch_size, shuffle=True)
    from raysd.families.clips import Batch

    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = family.loss(model, Batch(x, y, torch.zeros_like(y)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        for i in range(0, study.test_x.shape[0] if score else 0, 16):
            family.score(model, view.windows(study.test_x[i:i + 16]), study.test_y[i:i + 16])
    return time.perf_counter() - t0


def batching(study, view, batch_size: int, repeats: int = 3) -> tuple[float, float, int]:
    """Samples/s of one pass over every window: raysd's ClipSet against a DataLoader."""
    from raysd.families.clips import ClipSet

    data = ClipSet(study.train_x, study.train_y, view)
    loader = torch.utils.data.DataLoader(WindowDataset(study.train_x, view, study.train_y),
                                         batch_size=batch_size, shuffle=True)
    n = data.num_windows
    best_r = best_d = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for b in data.batches(batch_size):
            b.x.sum()
        best_r = min(best_r, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for x, _ in loader:
            x.sum()
        best_d = min(best_d, time.perf_counter() - t0)
    return n / best_r, n / best_d, n


def epoch_times(family, hp, study, view) -> tuple[float, float]:
    """One training epoch through raysd's Trainer against the same epoch through a DataLoader loop."""
    from raysd.train import Trainer

    trainer = Trainer(family, hp, study.info)
    data = study.train_set(view)
    t0 = time.perf_counter()
    trainer.train_epoch(data)
    raysd_s = time.perf_counter() - t0
    plain_s = plain_loop(family, hp, study, view, 1, score=False)
    return raysd_s, plain_s


def study_seconds(study_job, params: dict, n: int, name: str) -> float:
    """Wall seconds of a study of ``n`` trials run one after the other (the second and later in the first one's
    process)."""
    import ray.tune

    from raysd.studies import register

    tuner = ray.tune.Tuner(
        register(study_job), param_space=params,
        tune_config=ray.tune.TuneConfig(num_samples=n, max_concurrent_trials=1, reuse_actors=True),
        run_config=ray.tune.RunConfig(name=name, storage_path=str(Path(study_job.experiment) / "studies"), verbose=0))
    t0 = time.perf_counter()
    grid = tuner.fit()
    if any(r.error is not None for r in grid):
        raise RuntimeError(f"benchmark trial failed: {[r.error for r in grid]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="dense_ae")
    ap.add_argument("--machine-type", default="fan")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for both sides of every comparison (default 1: stable on a shared machine)")
    ap.add_argument("--data", help="data root (default: the demo synthetic set, generated into a temp dir)")
    args = ap.parse_args(argv)

    import ray

    from raysd.data import synth
    from raysd.data.catalog import Catalog
    from raysd.data.features import FeatureSpec
    from raysd.data.store import FeatureStore
    from raysd.data.study import load_study
    from raysd.families.base import create_family
    from raysd.trial import StudyJob

    work = Path(tempfile.mkdtemp(prefix="raysd-bench-"))
    root = Path(args.data) if args.data else synth.generate(work / "data", preset="demo", seed=0)
    spec = FeatureSpec(clip_seconds=3.0 if not args.data else 10.0)
    catalog = Catalog.scan(root)
    store = FeatureStore.open(catalog, spec, work / "cache")
    study = load_study(catalog, store, args.machine_type)
    params = {"lr": 1e-3, "batch_size": args.batch_size, "epochs": args.epochs}
    family, hp = create_family(args.family, params)
    view = family.view()
    torch.set_num_threads(args.threads)

    raysd_sps, loader_sps, n_windows = batching(study, view, args.batch_size)
    raysd_epoch_s, loader_epoch_s = epoch_times(family, hp, study, view)
    plain_s = plain_loop(family, hp, study, view, args.epochs)

    ray.init(address="local", include_dashboard=False, num_cpus=os.cpu_count() or 1, log_to_driver=False)
    job = StudyJob(study=f"{args.machine_type}__{args.family}", family=args.family, machine_type=args.machine_type,
                   catalog=catalog.table, data_root=str(root), layout=catalog.layout, spec=spec.to_dict(),
                   rule="2020", metric="sel_auc", cache_dir=str(work / "cache"), experiment=str(work / "exp"))
    trial_s = study_seconds(job, params, 1, "one")
    warm_s = study_seconds(job, params, 2, "two") - trial_s  # the second trial, in the first one's process
    ray.shutdown()

    result = {
        "family": args.family, "epochs": args.epochs, "train_windows": n_windows, "batch_size": args.batch_size,
        "plain_s": round(plain_s, 2), "trial_s": round(trial_s, 2), "overhead_s": round(trial_s - plain_s, 2),
        "warm_trial_s": round(warm_s, 2), "warm_overhead_s": round(warm_s - plain_s, 2),
        "raysd_batching_samples_per_s": round(raysd_sps), "dataloader_samples_per_s": round(loader_sps),
        "batching_speedup": round(raysd_sps / loader_sps, 2),
        "epoch_raysd_s": round(raysd_epoch_s, 3), "epoch_dataloader_s": round(loader_epoch_s, 3),
        "epoch_speedup": round(loader_epoch_s / raysd_epoch_s, 2),
        "device": "cpu", "cpus": os.cpu_count(), "threads": args.threads, "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
