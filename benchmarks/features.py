"""Feature extraction throughput: raysd's FeatureStore against the DCASE 2020 baseline's per-file librosa code.

Featurises the same WAV files (by default 200 synthetic 10 s clips at 16 kHz) with

- ``baseline``: the DCASE 2020 Task 2 baseline's ``file_to_vector_array`` (``librosa.load`` then
  ``librosa.feature.melspectrogram`` file by file, 128 mels, n_fft 1024, hop 512, power 2,
  10*log10(mel + eps), 5-frame 640-d vectors), the named reference. It runs twice: with numpy's BLAS
  threads as installed, and limited to one BLAS thread (faster on a busy machine); the faster of the
  two is the reference for ``speedup``;
- ``raysd``: ``FeatureStore.open`` on a cold cache (threaded decoding, batched log-mel, cache written);
- ``cache hit``: ``FeatureStore.open`` again (no audio decoded);
- ``raysd spectrum``: ``FeatureStore.open`` of the full-clip magnitude spectrum (``SpectrumSpec``, one FFT over the
  whole clip, the ``adacos_knn`` family's second input) on a cold cache, next to the log-mel's rate;
- ``decode only``: ``soundfile.read`` of every file, the ceiling for any method that decodes.

Every file is read once before timing, so all methods read from the page cache. Each method runs
``--repeats`` times, interleaved; the best run counts (the machine may be shared). The last line is
one JSON object.

    python benchmarks/features.py [--n 200] [--repeats 3] [--data ROOT] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from threadpoolctl import threadpool_limits

from raysd.data import synth
from raysd.data.catalog import Catalog
from raysd.data.features import FeatureSpec, SpectrumSpec, resolve_device
from raysd.data.store import FeatureStore


def baseline_file_to_vector_array(file_name: str, n_mels: int = 128, frames: int = 5, n_fft: int = 1024,
                                  hop_length: int = 512, power: float = 2.0) -> np.ndarray:
    """The DCASE 2020 Task 2 baseline's ``common.file_to_vector_array``, as published."""
    import librosa

    dims = n_mels * frames
    y, sr = librosa.load(file_name, sr=None, mono=False)
    mel_spectrogram = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=n_fft, hop_length=hop_length,
                                                     n_mels=n_mels, power=power)
    log_mel_spectrogram = 20.0 / power * np.log10(mel_spectrogram + sys.float_info.epsilon)
    vector_array_size = len(log_mel_spectrogram[0, :]) - frames + 1
    if vector_array_size < 1:
        return np.empty((0, dims))
    vector_array = np.zeros((vector_array_size, dims))
    for t in range(frames):
        vector_array[:, n_mels * t: n_mels * (t + 1)] = log_mel_spectrogram[:, t: t + vector_array_size].T
    return vector_array


def make_data(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` synthetic 10 s training clips spread over the six machine types (one ID each)."""
    types = synth.MACHINE_TYPES
    counts = {t: {synth.DEV_IDS[t][0]: (n // len(types) + (i < n % len(types)), 0, 0)} for i, t in enumerate(types)}
    preset = synth.Preset(f"bench{n}", 10.0, {t: c for t, c in counts.items() if sum(next(iter(c.values())))})
    return synth.generate(root, preset, seed=seed, workers=os.cpu_count())


CPU: dict[str, list[float]] = {}


def timed(fn, name: str | None = None) -> float:
    """Wall seconds of ``fn()``; the process CPU seconds go to ``CPU[name]``."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    if name:
        CPU.setdefault(name, []).append(time.process_time() - c0)
    return wall


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200, help="synthetic clips to generate (ignored with --data)")
    ap.add_argument("--data", type=Path, default=None, help="use this data root instead of synthetic clips")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None, help="decoding threads (default: FeatureStore's)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data and caches")
    a = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="raysd-bench-"))
    load_before = os.getloadavg()
    try:
        t_gen = 0.0
        if a.data is None:
            t_gen = timed(lambda: make_data(work / "data", a.n))
        root = a.data or work / "data"
        cat = Catalog.scan(root, clip_seconds=10.0)
        paths = cat.table["path"].tolist()
        n = len(paths)
        for p in paths:  # page cache
            Path(p).read_bytes()
        spec = FeatureSpec(clip_seconds=float((cat.table["num_samples"] / cat.table["sample_rate"]).max()))
        device = resolve_device(a.device)
        baseline_file_to_vector_array(paths[0])  # warm-up (librosa filter cache, imports)
        torch_threads = torch.get_num_threads()

        times: dict[str, list[float]] = {"baseline": [], "baseline_blas1": [], "raysd": [], "cache_hit": [],
                                         "decode_only": [], "raysd_spectrum": []}
        spectrum = SpectrumSpec().for_clips(spec)
        for r in range(a.repeats):
            times["decode_only"].append(timed(lambda: [sf.read(p, dtype="float32") for p in paths], "decode_only"))
            times["baseline"].append(timed(lambda: [baseline_file_to_vector_array(p) for p in paths], "baseline"))
            with threadpool_limits(1):
                times["baseline_blas1"].append(
                    timed(lambda: [baseline_file_to_vector_array(p) for p in paths], "baseline_blas1"))
            cache = work / f"cache{r}"
            store = None

            def cold():
                nonlocal store
                store = FeatureStore.open(cat, spec, cache, device=device, batch_size=a.batch_size, workers=a.workers)

            times["raysd"].append(timed(cold, "raysd"))
            assert store.extracted and len(store) == n, "cold open must extract every clip"
            hit = None

            def warm():
                nonlocal hit
                hit = FeatureStore.open(cat, spec, cache, device=device)

            times["cache_hit"].append(timed(warm))
            assert not hit.extracted
            times["raysd_spectrum"].append(timed(lambda: FeatureStore.open(
                cat, spectrum, work / f"spectrum{r}", device=device, batch_size=a.batch_size, workers=a.workers),
                "raysd_spectrum"))
            shutil.rmtree(work / f"spectrum{r}")
            if r + 1 < a.repeats:
                shutil.rmtree(cache)
            print(f"run {r + 1}/{a.repeats}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)

        best = {k: min(v) for k, v in times.items()}
        rate = {k: n / v for k, v in best.items()}
        reference = max(rate["baseline"], rate["baseline_blas1"])
        result = {
            "clips": n, "clip_seconds": spec.clip_seconds, "sample_rate": spec.sample_rate,
            "baseline_clips_per_s": round(reference, 1),
            "baseline_default_threads_clips_per_s": round(rate["baseline"], 1),
            "baseline_blas1_clips_per_s": round(rate["baseline_blas1"], 1),
            "raysd_clips_per_s": round(rate["raysd"], 1),
            "raysd_spectrum_clips_per_s": round(rate["raysd_spectrum"], 1),
            "spectrum_bins": spectrum.item_shape[0],
            "speedup": round(rate["raysd"] / reference, 2),
            "cache_hit_s": round(best["cache_hit"], 4),
            "decode_only_clips_per_s": round(rate["decode_only"], 1),
            "decode_only_over_baseline": round(rate["decode_only"] / reference, 2),
            # CPU seconds per clip (all threads): a figure that load from other processes disturbs less
            "cpu_ms_per_clip": {k: round(1000 * min(v) / n, 2) for k, v in CPU.items()},
            "cpu_speedup": round(min(min(CPU["baseline"]), min(CPU["baseline_blas1"])) / min(CPU["raysd"]), 2),
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "cpus": os.cpu_count(), "torch_threads": torch_threads, "repeats": a.repeats,
            "runs_s": {k: [round(x, 3) for x in v] for k, v in times.items()},
            "generate_s": round(t_gen, 1),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "reference": "DCASE 2020 Task 2 baseline common.file_to_vector_array (librosa, per file)",
        }
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    print(f"baseline (DCASE 2020, librosa per file): {result['baseline_clips_per_s']} clips/s")
    print(f"raysd FeatureStore, cold cache ({result['device']}): {result['raysd_clips_per_s']} clips/s")
    print(f"raysd full-clip spectrum, cold cache: {result['raysd_spectrum_clips_per_s']} clips/s")
    print(f"speedup: {result['speedup']}x   cache hit: {result['cache_hit_s']} s   "
          f"decode only: {result['decode_only_clips_per_s']} clips/s ({result['decode_only_over_baseline']}x)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
