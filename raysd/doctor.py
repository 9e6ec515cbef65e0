"""``python -m raysd.doctor``: is this machine ready to run raysd?

Checks, in order, and prints one line each:

- every heavy dependency imports (torch, torchaudio, torchvision, ray.train, ray.tune, optuna, ...) and
  its version, and whether that version is the tested one in ``constraints.txt``; torchaudio also
  computes a log-mel, since a torchaudio built for another torch fails only when its library loads;
- CUDA: devices, and whether they support bf16;
- Ray: a local instance starts and runs a task (or, with ``RAY_ADDRESS`` set, the cluster answers);
- the feature cache directory: writable, and its free space.

Exit 0 when all is well (warnings allowed), 1 with the reason when something is broken. ``--quick``
checks the imports only (what ``.ci/run`` and ``scripts/lock.sh`` run right after installing);
``--require-cuda`` also fails without a CUDA device (the cluster's GPU nodes run it in their setup).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from raysd.paths import CONSTRAINTS, default_cache_dir

# module to import -> distribution whose version it reports
HEAVY = {
    "torch": "torch",
    "torchaudio": "torchaudio",
    "torchvision": "torchvision",
    "ray.train": "ray",
    "ray.tune": "ray",
    "optuna": "optuna",
    "numpy": "numpy",
    "scipy": "scipy",
    "sklearn": "scikit-learn",
    "pandas": "pandas",
    "soundfile": "soundfile",
    "yaml": "PyYAML",
    "matplotlib": "matplotlib",
}
LOW_DISK_BYTES = 5 * 2**30  # one DCASE year's log-mel cache is a few GB


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False

    def line(self) -> str:
        tag = "FAIL" if not self.ok else ("warn" if self.warning else "ok")
        return f"{tag:4s}  {self.name:12s} {self.detail}"


def tested_versions(path: Path = CONSTRAINTS) -> dict[str, str]:
    """``name -> version`` from a pip constraints file (empty when there is none, e.g. a wheel install)."""
    pins: dict[str, str] = {}
    if path.is_file():
        for raw in path.read_text().splitlines():
            line = raw.split("#", 1)[0].strip()
            if "==" in line:
                name, version = line.split("==", 1)
                pins[_normalise(name)] = version.strip()
    return pins


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _first_line(e: BaseException) -> str:
    """The exception's first line, and its cause's (a library that fails to load says why only there)."""
    text = str(e).strip().splitlines()
    line = f"{type(e).__name__}: {text[0] if text else ''}"
    cause = e.__cause__ or e.__context__
    return line + (f" ({_first_line(cause)})" if cause is not None and cause is not e else "")


def check_imports(tested: dict[str, str]) -> list[Check]:
    checks = []
    for module, dist in HEAVY.items():
        try:
            importlib.import_module(module)
            version = importlib.metadata.version(dist)
        except Exception as e:  # an import that fails for any reason is the finding
            checks.append(Check(module, False, f"does not import: {_first_line(e)}"))
            continue
        want = tested.get(_normalise(dist))
        if want and want != version:
            checks.append(Check(module, True, f"{version} (tested: {want}; install with "
                                              f"pip install -c {CONSTRAINTS.name} ...)", warning=True))
        else:
            checks.append(Check(module, True, version))
    return checks


def check_torchaudio() -> Check:
    """A log-mel and a resample: both load torchaudio's compiled parts where they exist."""
    try:
        import torch
        import torchaudio

        x = torch.randn(1, 16000)
        mel = torchaudio.transforms.MelSpectrogram(sample_rate=16000, n_fft=1024, hop_length=512, n_mels=64)(x)
        torchaudio.functional.resample(x, 16000, 8000)
        return Check("log-mel", True, f"torchaudio computes a log-mel {tuple(mel.shape)} and resamples")
    except Exception as e:
        return Check("log-mel", False, f"torchaudio cannot compute features: {_first_line(e)}")


def check_cuda(required: bool = False) -> Check:
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only"
        if required:
            return Check("cuda", False, f"torch (built for {build}) sees no CUDA device: check the NVIDIA driver "
                                        "(`nvidia-smi`; a CUDA 13 build needs driver 580 or newer)")
        return Check("cuda", True, f"no CUDA device (torch built for {build}): trials run on "
                                   "CPU; pass --gpus-per-worker 0 to presets that ask for GPUs", warning=True)
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    bf16 = torch.cuda.is_bf16_supported()
    return Check("cuda", True, f"{len(names)} device(s): {', '.join(names)}; bf16 "
                               + ("supported (trials use bf16 autocast)" if bf16 else "not supported (float32)"))


def check_ray() -> Check:
    import ray

    address = os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address="auto", log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
        answer = ray.get(ray.remote(lambda: 42).remote(), timeout=120)
        res = ray.cluster_resources()
        where = f"cluster at {address}" if address else "a local instance"
        return Check("ray", answer == 42, f"{where} starts and runs a task; {res.get('CPU', 0):g} CPU, "
                                          f"{res.get('GPU', 0):g} GPU")
    except Exception as e:
        return Check("ray", False, f"cannot start or reach Ray: {_first_line(e)}")
    finally:
        if ray.is_initialized():
            ray.shutdown()


def check_cache(cache: Path) -> Check:
    probe_dir = cache
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    free = shutil.disk_usage(probe_dir).free
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache, prefix=".doctor-"):
            pass
    except OSError as e:
        return Check("cache", False, f"{cache} is not writable ({_first_line(e)}); set RAYSD_CACHE or --cache-dir")
    detail = f"{cache}: writable, {free / 2**30:.1f} GiB free"
    if free < LOW_DISK_BYTES:
        return Check("cache", True, detail + f" (under {LOW_DISK_BYTES / 2**30:.0f} GiB: a DCASE feature cache may "
                                             "not fit; set RAYSD_CACHE to a larger disk)", warning=True)
    return Check("cache", True, detail)


def run(quick: bool, cache: Path, require_cuda: bool = False, out=sys.stdout) -> int:
    print(f"raysd doctor: Python {sys.version.split()[0]} at {sys.executable}", file=out)
    tested = tested_versions()
    checks = check_imports(tested)
    steps: list[tuple[set[str], Callable[[], Check]]] = [({"torch", "torchaudio"}, check_torchaudio)]
    if require_cuda or not quick:
        steps.append(({"torch"}, lambda: check_cuda(required=require_cuda)))
    if not quick:
        steps += [ ({"ray.tune"}, check_ray), (set(), lambda: check_cache(cache))]
    imported = {c.name for c in checks if c.ok}
    for needs, step in steps:
        if needs <= imported:  # otherwise the failed import is already the finding
            checks.append(step())
    for c in checks:
        print(c.line(), file=out, flush=True)
    failed = [c.name for c in checks if not c.ok]
    if failed:
        fix = (f" Reinstall the tested set: pip install -c {CONSTRAINTS.name} -e ."
               if set(failed) & (set(HEAVY) | {"log-mel"}) else "")
        print(f"raysd doctor: broken: {', '.join(failed)}.{fix}", file=out)
        return 1
    print("raysd doctor: ready" + (" (imports only; run without --quick for CUDA, Ray and the cache)" if quick else ""),
          file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raysd.doctor", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="check the imports only (no CUDA, Ray or cache checks)")
    p.add_argument("--require-cuda", action="store_true", help="fail when torch sees no CUDA device (GPU nodes)")
    p.add_argument("--cache-dir", help="feature cache to check (default $RAYSD_CACHE or ~/.cache/raysd)")
    args = p.parse_args(argv)
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else default_cache_dir()
    return run(args.quick, cache, require_cuda=args.require_cuda)


if __name__ == "__main__":
    sys.exit(main())
