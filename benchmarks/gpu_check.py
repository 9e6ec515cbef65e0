"""The GPU check: raysd's training, scoring and feature extraction on a CUDA device, without Ray.

A device machine lent for a short while may not have Ray (its wheel is larger than what a call may
carry), so this drives ``raysd.train.Trainer`` directly. It measures, on the device:

- ``families``: every registered family's training and scoring throughput with bf16 autocast, and the
  plain PyTorch loop it is compared with (``benchmarks/families.py``, ``--device cuda``), plus
  masked_unet's batched K-mask scoring against the clip-by-clip loop (``masked_unet_batched_vs_loop``);
- ``features``: log-mel extraction (``raysd.data.features.LogMel``, torchaudio) of 10 s clips on the
  device against the same module on this machine's CPU cores, the reference, in clips per second;
  ``spectrum_features`` the same for the full-clip magnitude spectrum (``SpectrumSpec``, ``adacos_knn``'s input);
- ``fit``: one short end-to-end ``Trainer.fit`` of ``dense_ae`` on the device with bf16 on synthetic
  normal clips; its loss must fall and its scores must rank clips with an added tone above normal ones;
- ``sharing``: 1, 2, 4 and 8 trials of each small family (``dense_ae``, ``vae``, ``group_made``: the presets give
  them a quarter of a GPU) training at once on one device, each in a process of its own as Ray runs fractional-GPU
  trials: the samples per second of all of them together, against one trial alone (the reference).

Each part that fails is reported with its error and the check exits 1; the last line is one JSON object,
also written to ``$OUT/gpu_check.json`` when ``OUT`` is set (the device tool's result folder).

    python benchmarks/gpu_check.py                 # on a CUDA machine (not yet timed on one)
    python benchmarks/gpu_check.py --device cpu --quick   # the same code paths on a CPU, in a minute
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's raysd, without an install

from raysd.data.features import FeatureSpec, SpectrumSpec  # noqa: E402
from raysd.families import REGISTRY  # noqa: E402
from raysd.families.base import create_family  # noqa: E402
from raysd.families.clips import ClipSet, DataInfo  # noqa: E402
from raysd.train import Trainer  # noqa: E402


def environment(device: torch.device) -> dict[str, Any]:
    import torchaudio

    env: dict[str, Any] = {"torch": torch.__version__, "torchaudio": torchaudio.__version__,
                           "cuda_build": torch.version.cuda, "device": str(device), "cpus": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    return env


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def family_throughput(device: torch.device, quick: bool, families: str | None) -> dict[str, Any]:
    """``benchmarks/families.py`` on ``device`` only; its last printed line is its JSON."""
    spec = importlib.util.spec_from_file_location("raysd_bench_families", HERE / "families.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--device", device.type, "--threads", str(os.cpu_count() or 1)] + (["--families", families] if families else [])
    if quick:
        argv += ["--seconds", "0.2", "--repeats", "1", "--n-frames", "64", "--score-clips", "2",
                 "--score-clips-cuda", "8", "--masked-clips", "1", "--masked-clips-cuda", "4", "--k-masks", "4"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = bench.main(argv)
    if rc != 0:
        raise RuntimeError(f"benchmarks/families.py exited {rc}")
    return json.loads(out.getvalue().strip().splitlines()[-1])


def logmel_throughput(device: torch.device, quick: bool, spectrum: bool = False) -> dict[str, Any]:
    """Clips per second through ``LogMel`` (or, with ``spectrum``, the full-clip ``Spectrum``) on ``device`` and on
    the CPU (the reference), 10 s at 16 kHz."""
    spec: FeatureSpec | SpectrumSpec = FeatureSpec(clip_seconds=10.0)
    if spectrum:
        spec = SpectrumSpec().for_clips(spec)
    n = 16 if quick else 256
    wave = torch.randn(n, spec.clip_samples, generator=torch.Generator().manual_seed(0)) * 0.1

    def rate(on: torch.device, batch: int) -> float:
        module = spec.transform().to(on)
        x = wave.to(on)
        with torch.no_grad():
            module(x[:batch])  # warm-up: kernels, FFT plans
            sync(on)
            best = float("inf")
            for _ in range(1 if quick else 3):
                t0 = time.perf_counter()
                for lo in range(0, n, batch):
                    module(x[lo:lo + batch])
                sync(on)
                best = min(best, time.perf_counter() - t0)
        return n / best

    out = {"clips": n, "clip_seconds": spec.clip_seconds, "shape": list(spec.item_shape),
           "cpu_clips_per_s": round(rate(torch.device("cpu"), 16), 1)}
    if device.type != "cpu":
        out[f"{device.type}_clips_per_s"] = round(rate(device, 64), 1)
        out["speedup_over_cpu"] = round(out[f"{device.type}_clips_per_s"] / out["cpu_clips_per_s"], 1)
    out["reference"] = f"raysd {type(spec.transform()).__name__} on {os.cpu_count()} CPU cores, batches of 16"
    return out


def synthetic_clips(n: int, n_mels: int, n_frames: int, tone: bool, seed: int) -> torch.Tensor:
    """Log-mel-like clips: a smooth spectral slope with noise; ``tone`` adds a bright line at one mel band."""
    g = torch.Generator().manual_seed(seed)
    slope = torch.linspace(-20.0, -60.0, n_mels)[None, :, None]
    x = slope + 3.0 * torch.randn(n, n_mels, n_frames, generator=g)
    if tone:
        x[:, n_mels // 3] += 25.0
    return x


def end_to_end_fit(device: torch.device, quick: bool) -> dict[str, Any]:
    """``dense_ae`` trained by ``Trainer.fit`` on the device; normal clips must score below toned ones."""
    from sklearn.metrics import roc_auc_score

    n_mels, n_frames = 64, 64
    family, hp = create_family("dense_ae", {"epochs": 3 if quick else 8, "batch_size": 256, "lr": 1e-3,
                                            "amp": "auto" if device.type == "cuda" else "off"})
    view = family.view()
    train = ClipSet(synthetic_clips(48, n_mels, n_frames, False, 0).to(device), torch.zeros(48).to(device), view)
    test_x = torch.cat([synthetic_clips(16, n_mels, n_frames, False, 1), synthetic_clips(16, n_mels, n_frames, True, 2)])
    labels = torch.cat([torch.zeros(16), torch.ones(16)])
    test = ClipSet(test_x.to(device), torch.zeros(32).to(device), view)
    trainer = Trainer(family, hp, DataInfo(n_mels, n_frames, 1, ("00",)), device=device)
    t0 = time.perf_counter()
    stats = trainer.fit(train)
    sync(device)
    seconds = time.perf_counter() - t0
    scores = trainer.score(test)
    auc = float(roc_auc_score(labels.numpy(), scores))
    losses = [round(s.loss, 5) for s in stats]
    result = {"family": "dense_ae", "amp_dtype": str(trainer.dtype), "epochs": len(stats), "losses": losses,
              "fit_seconds": round(seconds, 2), "auc_tone_vs_normal": round(auc, 3)}
    if not losses[-1] < losses[0]:
        raise RuntimeError(f"loss did not fall: {losses}")
    if not auc > 0.9:
        raise RuntimeError(f"toned clips not ranked above normal ones: AUC {auc:.3f}")
    return result


SMALL_FAMILIES = ("dense_ae", "vae", "group_made")


def _sharing_worker(family: str, n_clips: int, seconds: float, device_name: str, ready: Any, go: Any,
                    results: Any) -> None:
    """One trial of a sharing round: ready, wait for the others, train whole epochs for ``seconds``, report."""
    torch.set_num_threads(1)
    device = torch.device(device_name)
    fam, hp = create_family(family, {"batch_size": 512, "lr": 1e-3, "amp": "auto" if device.type == "cuda" else "off"})
    n_mels, n_frames = 128, 313  # a 10 s DCASE clip
    clips = synthetic_clips(n_clips, n_mels, n_frames, False, os.getpid()).to(device)
    train = ClipSet(clips, torch.zeros(n_clips).to(device), fam.view())
    trainer = Trainer(fam, hp, DataInfo(n_mels, n_frames, 1, ("00",)), device=device)
    trainer.before_training(train)
    trainer.train_epoch(train.subset(torch.arange(min(8, n_clips))))  # warm-up: kernels, allocator
    sync(device)
    ready.put(os.getpid())
    go.wait()
    t0, samples = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        samples += trainer.train_epoch(train).samples
    sync(device)
    results.put(samples / (time.perf_counter() - t0))


def gpu_sharing(device: torch.device, quick: bool) -> dict[str, Any]:
    """Aggregate training throughput of N small trials sharing the device (module docstring)."""
    ctx = torch.multiprocessing.get_context("spawn")
    counts = (1, 2) if quick else (1, 2, 4, 8)
    n_clips, seconds = (16, 1.0) if quick else (400, 6.0)
    out: dict[str, Any] = {"clips_per_trial": n_clips, "seconds": seconds,
                           "reference": "one trial alone on the device, same family, data and batch size"}
    for family in SMALL_FAMILIES:
        rows = {}
        for n in counts:
            ready, go, results = ctx.Queue(), ctx.Event(), ctx.Queue()
            procs = [ctx.Process(target=_sharing_worker, args=(family, n_clips, seconds, str(device), ready, go, results))
                     for _ in range(n)]
            for proc in procs:
                proc.start()
            for _ in procs:
                ready.get(timeout=600)
            go.set()
            rates = [results.get(timeout=600) for _ in procs]
            for proc in procs:
                proc.join(timeout=60)
            rows[str(n)] = {"samples_per_s_total": round(sum(rates)), "samples_per_s_per_trial": round(sum(rates) / n)}
        one = rows["1"]["samples_per_s_total"]
        for row in rows.values():
            row["total_over_one_trial"] = round(row["samples_per_s_total"] / one, 2)
        out[family] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--quick", action="store_true", help="small sizes: checks the code paths, not the speed")
    ap.add_argument("--families", help="comma-separated families to measure (default: every registered one)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (pass --device cpu to run the same code on the CPU)", file=sys.stderr)
        return 1
    device = torch.device(args.device)
    result: dict[str, Any] = {"registered_families": sorted(REGISTRY)}
    failed = []
    for name, part in (("environment", lambda: environment(device)),
                       ("features", lambda: logmel_throughput(device, args.quick)),
                       ("spectrum_features", lambda: logmel_throughput(device, args.quick, spectrum=True)),
                       ("fit", lambda: end_to_end_fit(device, args.quick)),
                       ("sharing", lambda: gpu_sharing(device, args.quick)),
                       ("families", lambda: family_throughput(device, args.quick, args.families))):
        t0 = time.perf_counter()
        try:
            result[name] = part()
        except Exception as e:  # one broken part must not hide the others' figures
            failed.append(name)
            result[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=4)}
        print(f"gpu_check: {name} {'failed' if name in failed else 'done'} in {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
    result["failed"] = failed
    text = json.dumps(result)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text + "\n")
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
