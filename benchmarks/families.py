"""Training and scoring throughput of every registered model family, on CPU and (when present) on CUDA.

For each family (default: all registered; ``--families a,b``) on random log-mel clips of DCASE shape
(128 mels x 313 frames = 10 s at 16 kHz, hop 512), in the family's default configuration:

- ``train_samples_per_s``: windows per second through ``raysd.train.Trainer.train_epoch`` at a fixed
  batch size (``--batch-size``, 64), windows gathered by index from the device-resident clips;
- ``plain_loop_samples_per_s``: the named reference, a plain single-process PyTorch loop over the same
  windows materialised once into a ``TensorDataset`` and drawn by a ``DataLoader`` (same model, loss,
  optimiser, autocast); ``train_vs_plain_loop`` is the ratio (> 1: the Trainer is faster);
- ``score_clips_per_s``: clips per second through ``Trainer.score`` (all of a clip's windows, the
  family's own scoring, e.g. masked_unet's K masks).

On CPU the runs use ``torch.set_num_threads(--threads)`` (default: every core) and float32; on CUDA
they use bf16 autocast when the device supports it. On a CPU shared with other work use ``--threads 1``:
OpenMP threads that spin while another process holds the core made these models 10-20x slower here. ``masked_unet_batched_vs_loop`` compares
masked_unet's vectorised K-mask scoring (windows x masks in chunks) with a clip-by-clip Python loop over
the same clips and masks (``loop_clip``: one clip's windows x K masks per forward pass; and
``loop_clip_mask``: one clip and one mask per forward pass) and checks the scores agree.

After a short warm-up, the methods compared with each other run in ``--repeats`` interleaved rounds,
each call repeated until ``--seconds`` have passed; the best round counts. The last line is ONE JSON
object keyed by family name, plus ``masked_unet_batched_vs_loop``.

    python benchmarks/families.py [--families dense_ae,masked_unet] [--batch-size 64] [--seconds 3]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable

import torch

from raysd.data.features import FeatureSpec
from raysd.data.views import View
from raysd.families import REGISTRY
from raysd.families.clips import Batch, ClipSet, DataInfo
from raysd.families.hparams import TrainHP
from raysd.train import Trainer, make_optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_rates(fns: dict[str, Callable[[], int]], device: torch.device, repeats: int, seconds: float) -> dict[str, float]:
    """Items per second of each ``fn`` (which returns the items it processed): the methods run in
    interleaved rounds, each call repeated until ``seconds`` have passed, and the best round counts, so
    a burst of load from other processes does not favour one method."""
    best = dict.fromkeys(fns, 0.0)
    for _ in range(repeats):
        for label, fn in fns.items():
            items, t0 = 0, time.perf_counter()
            while True:
                items += fn()
                sync(device)
                dt = time.perf_counter() - t0
                if dt >= seconds:
                    break
            best[label] = max(best[label], items / dt)
    return best


def random_clips(n: int, n_mels: int, n_frames: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, n_mels, n_frames, generator=g) * 8.0 - 40.0).to(device)


def random_extras(view: View, n: int, device: torch.device, seed: int = 0) -> list[torch.Tensor]:
    """Random non-negative stand-ins for the extra per-clip features a view asks for (10 s clips at 16 kHz)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(n, *s.item_shape, generator=g).to(device) for s in view.extra_specs(FeatureSpec(clip_seconds=10.0))]


def bench_family(name: str, device: torch.device, amp: str, args: argparse.Namespace) -> dict:
    fam = REGISTRY[name]()
    view = fam.view()
    shapes = tuple(s.item_shape for s in view.extra_specs(FeatureSpec(clip_seconds=10.0)))
    info = DataInfo(args.n_mels, args.n_frames, 2, ("00", "01"), extra_shapes=shapes)
    per_clip = view.starts(args.n_frames).numel()
    hp = TrainHP(batch_size=args.batch_size, amp=amp, epochs=1)
    steps = args.steps
    n_train = max(2, math.ceil(steps * args.batch_size / per_clip))
    clips = random_clips(n_train, args.n_mels, args.n_frames, device)
    labels = (torch.arange(n_train) % 2).to(device)
    extras = random_extras(view, n_train, device)
    train = ClipSet(clips, labels, view, extras=extras)
    n_warm = math.ceil(args.batch_size / per_clip)
    one_step = train.subset(torch.arange(n_warm))  # warm-up: one full batch (and a remainder)
    trainer = Trainer(fam, hp, info, device=device)
    trainer.before_training(train)

    def trainer_epoch() -> int:
        return trainer.train_epoch(train).samples

    trainer.train_epoch(one_step)

    # reference: a plain PyTorch loop over pre-materialised windows
    ref = Trainer(fam, hp, info, device=device)
    ref.before_training(train)
    windows = view.windows(clips).flatten(0, 1)
    wlabels = labels.repeat_interleave(per_clip)
    wextras = [e.repeat_interleave(per_clip, dim=0) for e in extras]
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(windows, wlabels, torch.arange(len(windows), device=device), *wextras),
        batch_size=args.batch_size, shuffle=True)
    opt = make_optimizer(ref.model.parameters(), hp)

    def plain_epoch(max_batches: int | None = None) -> int:
        ref.model.train()
        n = 0
        total = torch.zeros((), device=device)
        for i, (x, y, c, *extra) in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                break
            with ref.autocast():
                loss = fam.loss(ref.model, Batch(x, y, c, tuple(extra)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach().float()
            n += x.shape[0]
        total.item()
        return n

    plain_epoch(1)
    sync(device)
    rates = best_rates({"trainer": trainer_epoch, "plain": plain_epoch}, device, args.repeats, args.seconds)
    train_rate, plain_rate = rates["trainer"], rates["plain"]

    trainer.after_training(train)
    n_score = args.score_clips if device.type == "cpu" else args.score_clips_cuda
    test = ClipSet(random_clips(n_score, args.n_mels, args.n_frames, device, seed=1), (torch.arange(n_score) % 2).to(device),
                   view, extras=random_extras(view, n_score, device, seed=1))

    def score() -> int:
        return len(trainer.score(test, clips_per_batch=args.clips_per_batch))

    trainer.score(test.subset(torch.arange(min(n_score, args.clips_per_batch))), clips_per_batch=args.clips_per_batch)
    score_rate = best_rates({"score": score}, device, args.repeats, args.seconds)["score"]
    return {
        "train_samples_per_s": round(train_rate, 2),
        "plain_loop_samples_per_s": round(plain_rate, 2),
        "train_vs_plain_loop": round(train_rate / plain_rate, 3),
        "score_clips_per_s": round(score_rate, 3),
        "windows_per_clip": per_clip,
        "sample_shape": list(view.sample_shape(args.n_mels, args.n_frames)),
        "batch_size": args.batch_size,
        "amp": str(trainer.dtype).replace("torch.", "") if trainer.dtype else "float32",
    }


def bench_masked_scoring(device: torch.device, amp: str, args: argparse.Namespace) -> dict:
    """Batched K-mask scoring against clip-by-clip loops over the same clips and the same masks."""
    from raysd.families.masked_unet import masked_error

    cls = REGISTRY["masked_unet"]
    fam = cls(cls.Config(k_masks=args.k_masks, width=args.unet_width))
    view = fam.view()
    info = DataInfo(args.n_mels, args.n_frames, 1)
    n = args.masked_clips if device.type == "cpu" else args.masked_clips_cuda
    clips = random_clips(n, args.n_mels, args.n_frames, device)
    trainer = Trainer(fam, TrainHP(amp=amp), info, device=device)
    data = ClipSet(clips, torch.zeros(n, dtype=torch.long, device=device), view)
    trainer.before_training(data)
    model = trainer.model.eval()

    def batched() -> torch.Tensor:
        return torch.from_numpy(trainer.score(data, clips_per_batch=n))

    @torch.no_grad()
    def loop_clip() -> torch.Tensor:
        out = []
        masks = fam.scoring_masks(view.windows(clips[:1])[0])
        k = masks.shape[0]
        for c in range(n):
            w = view.windows(clips[c:c + 1])[0]  # (P, 1, M, T)
            p = w.shape[0]
            x = w.repeat_interleave(k, dim=0)
            m = masks.repeat(p, 1, 1, 1)
            with trainer.autocast():
                recon, target = model(x, m)
            out.append(masked_error(recon, target, m).mean().float().cpu())
        return torch.stack(out).double()

    @torch.no_grad()
    def loop_clip_mask() -> torch.Tensor:
        out = []
        masks = fam.scoring_masks(view.windows(clips[:1])[0])
        for c in range(n):
            w = view.windows(clips[c:c + 1])[0]
            errs = []
            for k in range(masks.shape[0]):
                m = masks[k:k + 1].expand(w.shape[0], -1, -1, -1)
                with trainer.autocast():
                    recon, target = model(w, m)
                errs.append(masked_error(recon, target, m))
            out.append(torch.stack(errs).mean().float().cpu())
        return torch.stack(out).double()

    scores: dict[str, torch.Tensor] = {}

    def run(label: str, fn: Callable[[], torch.Tensor]) -> Callable[[], int]:
        def call() -> int:
            scores[label] = fn()
            return n
        return call

    methods = {"batched": batched, "loop_clip": loop_clip, "loop_clip_mask": loop_clip_mask}
    for fn in methods.values():  # warm-up (and first scores)
        fn()
    results = best_rates({k: run(k, fn) for k, fn in methods.items()}, device, args.repeats, args.seconds)
    diff = max(float((scores[k] - scores["batched"]).abs().max()) for k in ("loop_clip", "loop_clip_mask"))
    return {
        "batched_clips_per_s": round(results["batched"], 3),
        "loop_clip_clips_per_s": round(results["loop_clip"], 3),
        "loop_clip_mask_clips_per_s": round(results["loop_clip_mask"], 3),
        "ratio": round(results["batched"] / results["loop_clip"], 3),
        "ratio_vs_loop_clip_mask": round(results["batched"] / results["loop_clip_mask"], 3),
        "max_abs_score_diff": diff,
        "clips": n, "k_masks": args.k_masks, "windows_per_clip": view.starts(args.n_frames).numel(),
        "unet_width": args.unet_width, "device": device.type,
        "score_chunk": fam.hp.score_batch or (16 if device.type == "cpu" else 256),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=None, help="comma-separated names (default: every registered family)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2, help="training steps per timed epoch")
    ap.add_argument("--n-mels", type=int, default=128)
    ap.add_argument("--n-frames", type=int, default=313)
    ap.add_argument("--score-clips", type=int, default=4, help="clips per scoring run on CPU")
    ap.add_argument("--score-clips-cuda", type=int, default=64)
    ap.add_argument("--clips-per-batch", type=int, default=16)
    ap.add_argument("--k-masks", type=int, default=16, help="masks per window in the masked_unet comparison")
    ap.add_argument("--unet-width", type=int, default=64, help="masked_unet width in the comparison")
    ap.add_argument("--masked-clips", type=int, default=2, help="clips in the masked_unet comparison on CPU")
    ap.add_argument("--masked-clips-cuda", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=1.0, help="minimum duration of one timed round")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds per measurement (best counts)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                    help="auto: CPU, plus CUDA (bf16) when a GPU is present")
    args = ap.parse_args(argv)
    names = args.families.split(",") if args.families else sorted(REGISTRY)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        ap.error(f"unknown families {unknown}; registered: {', '.join(sorted(REGISTRY))}")
    torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("auto", "cpu"):
        devices.append((torch.device("cpu"), "off"))
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device available")
        devices.append((torch.device("cuda"), "auto"))

    out: dict = {}
    for name in names:
        out[name] = {}
        for device, amp in devices:
            key = "cpu" if device.type == "cpu" else "cuda_bf16"
            t0 = time.perf_counter()
            out[name][key] = bench_family(name, device, amp, args)
            print(f"{name} [{key}] {out[name][key]} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    if "masked_unet" in REGISTRY and (args.families is None or "masked_unet" in names):
        out["masked_unet_batched_vs_loop"] = {}
        for device, amp in devices:
            key = "cpu" if device.type == "cpu" else "cuda_bf16"
            out["masked_unet_batched_vs_loop"][key] = bench_masked_scoring(device, amp, args)
            print(f"masked_unet_batched_vs_loop [{key}] {out['masked_unet_batched_vs_loop'][key]}", file=sys.stderr, flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
