"""Anomaly pruning against plain training when loud foreign events contaminate the training clips.

``python benchmarks/pruning.py [--seeds 3] [--epochs 12] [--prune-every 3] [--fractions 0.01 0.05]``

Data: synthetic forest field recordings (``raysd.data.synth_field``, 22,050 Hz, 1 s clips, the ``birdaudio``
features). Normal clips come from event-free recordings; anomalous clips are the seconds of other recordings in
which an inserted motorcycle, plane or knock is louder than the ambience (its own waveform's RMS in that second
above the ambience reference level). The TRAINING set holds ``--train`` clips of which a fraction (0 %, 1 %, 5 %)
are such event clips; the test set holds unseen normal clips and unseen event clips (other seeds).

For each contamination rate and seed the same family is trained on the same clips for the same epochs
(``raysd.train.Trainer``) without pruning -- the reference run -- and with anomaly pruning (every
``--prune-every`` epochs drop the fraction p of the remaining training clips with the highest reconstruction
error). Reported: test AUC and pAUC (mean over seeds), the gain over the reference, and how many of the planted
event clips pruning removed. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from raysd.data import synth_field
from raysd.data.features import FeatureSpec, LogMel
from raysd.families.base import create_family
from raysd.families.clips import ClipSet, DataInfo
from raysd.metrics import auc, pauc
from raysd.train import Trainer

SR = synth_field.SAMPLE_RATE
DURATIONS = {"motorcycle": 4.0, "plane": 6.0, "knock": 1.0}


@dataclass
class Data:
    train: torch.Tensor  # (N, mels, frames)
    planted: np.ndarray  # bool per training clip: an event clip mixed in
    test: torch.Tensor
    test_label: np.ndarray


def clips(seconds: int, n_events: int, seed: int, logmel: LogMel) -> tuple[torch.Tensor, np.ndarray]:
    """Log-mel of every 1 s clip of a generated recording, and per clip 1 (an event louder than the ambience),
    0 (no event) or -1 (only a faint part of an event)."""
    events = synth_field.plan_events(seconds, n_events, seed, durations=DURATIONS, margin=2.0) if n_events else []
    x = synth_field.render(seconds, events, seed)
    alone = np.zeros(len(x))
    for i, e in enumerate(events):
        w = synth_field.render_event(e, seed, i)
        at = int(round(e.start_s * SR))
        alone[at:at + len(w)] += w[:len(alone) - at]
    rms = np.sqrt((alone.reshape(seconds, SR) ** 2).mean(axis=1))
    label = np.where(rms > synth_field.AMBIENCE_RMS, 1, np.where(rms > 0, -1, 0))
    with torch.inference_mode():
        return logmel(torch.from_numpy(x.reshape(seconds, SR))), label


@dataclass
class Pools:
    normal: torch.Tensor  # clips of an event-free recording
    loud: torch.Tensor  # event clips for training
    test_loud: torch.Tensor  # event clips for testing (another recording)


def make_pools(n_normal: int, seed: int, logmel: LogMel) -> Pools:
    normal, _ = clips(n_normal, 0, 1000 + seed, logmel)
    pool, label = clips(240, 16, 2000 + seed, logmel)  # 16 events in 4 minutes: about 60 loud seconds
    test_pool, test_label = clips(240, 16, 3000 + seed, logmel)
    return Pools(normal, pool[torch.from_numpy(label == 1)], test_pool[torch.from_numpy(test_label == 1)])


def make_data(pools: Pools, rate: float, n_train: int, n_test: int, seed: int) -> Data:
    """``n_train`` training clips of which ``round(rate * n_train)`` are event clips; the test set is the
    next ``n_test`` normal clips and the test event clips."""
    k = int(round(rate * n_train))
    if len(pools.loud) < k:
        raise RuntimeError(f"seed {seed}: only {len(pools.loud)} event clips for {k} planted ones; lower --train")
    pick = torch.randperm(len(pools.loud), generator=torch.Generator().manual_seed(seed))[:k]
    train = torch.cat([pools.normal[:n_train - k], pools.loud[pick]])
    test = torch.cat([pools.normal[n_train:n_train + n_test], pools.test_loud])
    return Data(train, np.arange(n_train) >= n_train - k, test,
                np.r_[np.zeros(n_test, int), np.ones(len(pools.test_loud), int)])


def run(family_name: str, params: dict, data: Data, info: DataInfo, seed: int) -> dict:
    family, hp = create_family(family_name, {**params, "seed": seed})
    trainer = Trainer(family, hp, info)
    view = family.view()
    t0 = time.perf_counter()
    trainer.fit(ClipSet(data.train, torch.zeros(len(data.train), dtype=torch.long), view))
    seconds = time.perf_counter() - t0
    scores = trainer.score(ClipSet(data.test, torch.zeros(len(data.test), dtype=torch.long), view))
    dropped = sorted({i for _, i, _ in trainer.pruned})
    return {"auc": auc(data.test_label, scores), "pauc": pauc(data.test_label, scores), "seconds": seconds,
            "pruned": len(dropped), "planted_pruned": int(data.planted[dropped].sum()) if dropped else 0,
            "planted": int(data.planted.sum())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", default="dense_ae", help="reconstruction family (default dense_ae; conv_ae is "
                                                          "about 10x slower on CPU)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--prune-every", type=int, default=3)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.05])
    ap.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.01, 0.05])
    ap.add_argument("--train", type=int, default=400, help="training clips (normal + planted event clips)")
    ap.add_argument("--test", type=int, default=200, help="normal test clips (event test clips: about 60 per seed)")
    ap.add_argument("--hop", type=int, default=4, help="dense_ae: frames between 5-frame vectors (default 4)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    spec = FeatureSpec(sample_rate=SR, n_fft=2048, hop_length=512, n_mels=64, clip_seconds=1.0)  # birdaudio's
    logmel = LogMel(spec)
    info = DataInfo(n_mels=spec.kept_mels, n_frames=spec.n_frames, n_classes=1, class_names=("00",), sample_rate=SR)
    params = {"lr": 1e-3, "batch_size": 256 if a.family == "dense_ae" else 32, "epochs": a.epochs,
              **({"hop": a.hop} if a.family == "dense_ae" else {})}
    configs = {"no pruning": {}} | {f"prune p={p:g}": {"prune_every": a.prune_every, "prune_fraction": p}
                                    for p in a.fractions}
    t0 = time.perf_counter()
    results: dict[str, dict[str, list[dict]]] = {}
    for seed in range(a.seeds):
        pools = make_pools(a.train + a.test, seed, logmel)
        for rate in a.rates:
            label = f"{100 * rate:g}%"
            results.setdefault(label, {c: [] for c in configs})
            data = make_data(pools, rate, a.train, a.test, seed)
            for name, extra in configs.items():
                if rate == 0 and name != "no pruning":
                    continue
                r = run(a.family, {**params, **extra}, data, info, seed)
                results[label][name].append(r)
                print(f"seed {seed} contamination {label:>3s} {name:14s} AUC {r['auc']:.4f} pAUC {r['pauc']:.4f} "
                      f"pruned {r['pruned']:3d} ({r['planted_pruned']}/{r['planted']} planted) {r['seconds']:.1f}s",
                      flush=True)
    summary: dict[str, dict] = {}
    print(f"\n{a.family} on synthetic field recordings: {a.train} training clips, {a.epochs} epochs, pruning every "
          f"{a.prune_every} epochs; test {a.test} normal clips + unseen event clips; mean over {a.seeds} seed(s); "
          "reference: no pruning")
    for label, by_cfg in results.items():
        row = {}
        for name, runs in by_cfg.items():
            if not runs:
                continue
            row[name] = {"auc": float(np.mean([r["auc"] for r in runs])),
                         "pauc": float(np.mean([r["pauc"] for r in runs])),
                         "auc_per_seed": [round(r["auc"], 4) for r in runs],
                         "planted_pruned": int(sum(r["planted_pruned"] for r in runs)),
                         "planted": int(sum(r["planted"] for r in runs)), "pruned": int(sum(r["pruned"] for r in runs))}
        ref = row["no pruning"]["auc"]
        for name, v in row.items():
            v["auc_gain"] = v["auc"] - ref
            extra = (f"; removed {v['planted_pruned']} of {v['planted']} planted event clips among {v['pruned']} "
                     "pruned") if name != "no pruning" else ""
            print(f"  contamination {label:>3s} {name:14s} AUC {v['auc']:.4f} ({v['auc_gain']:+.4f}) "
                  f"pAUC {v['pauc']:.4f}{extra}")
        summary[label] = row
    print(json.dumps({"benchmark": "pruning", "data": "synthetic field recordings (raysd.data.synth_field)",
                      "family": a.family, "reference": "no pruning (same clips, seeds and epochs)",
                      "epochs": a.epochs, "prune_every": a.prune_every, "train_clips": a.train,
                      "seeds": a.seeds, "contamination": summary, "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
