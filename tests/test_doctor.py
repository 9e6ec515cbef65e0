"""``python -m raysd.doctor``: reports this machine, and fails loudly with the name of what is broken."""

from __future__ import annotations

import importlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from raysd import doctor

REPO = Path(__file__).resolve().parents[1]


def test_the_tested_set_is_read_from_the_constraints_file(tmp_path: Path) -> None:
    lock = tmp_path / "constraints.txt"
    lock.write_text("# comment\ntorch==2.14.1\nPyYAML==6.0.4  # trailing\nscikit_learn==1.9.1\n\n")
    assert doctor.tested_versions(lock) == {"torch": "2.14.1", "pyyaml": "6.0.4", "scikit-learn": "1.9.1"}
    assert doctor.tested_versions(tmp_path / "missing.txt") == {}


def test_the_repository_lock_pins_the_heavy_dependencies() -> None:
    pins = doctor.tested_versions()
    for dist in ("torch", "torchaudio", "torchvision", "ray", "optuna", "numpy"):
        assert dist in pins, dist


def test_quick_check_passes_on_this_install_and_names_versions() -> None:
    out = io.StringIO()
    assert doctor.run(quick=True, cache=Path("."), out=out) == 0
    text = out.getvalue()
    for module in ("torch", "torchaudio", "torchvision", "ray.train", "ray.tune", "optuna"):
        assert f"ok    {module}" in text or f"warn  {module}" in text, text
    assert "log-mel" in text and "ready" in text


def test_a_dependency_that_does_not_import_fails_with_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a torchaudio built for another torch does: the import raises OSError (undefined symbol)."""
    real = importlib.import_module

    def broken(name: str, *args, **kwargs):
        if name == "torchaudio":
            raise OSError("libtorchaudio.so: undefined symbol: torch_exception_get_what_without_backtrace")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(doctor.importlib, "import_module", broken)
    out = io.StringIO()
    assert doctor.run(quick=True, cache=Path("."), out=out) == 1
    text = out.getvalue()
    assert "FAIL  torchaudio   does not import: OSError: libtorchaudio.so: undefined symbol" in text
    assert "broken: torchaudio" in text and "pip install -c constraints.txt" in text
    assert "log-mel" not in text  # nothing more is tried on a library that does not load


def test_a_version_other_than_the_tested_one_is_a_warning() -> None:
    checks = doctor.check_imports({"optuna": "0.0.1"})
    (optuna,) = [c for c in checks if c.name == "optuna"]
    assert optuna.ok and optuna.warning and "tested: 0.0.1" in optuna.detail


def test_an_unwritable_cache_fails_and_names_the_setting(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    check = doctor.check_cache(blocker / "cache")
    assert not check.ok and str(blocker / "cache") in check.detail and "RAYSD_CACHE" in check.detail
    ok = doctor.check_cache(tmp_path / "cache")
    assert ok.ok and "GiB free" in ok.detail


def test_cuda_required_fails_without_a_device() -> None:
    import torch

    if torch.cuda.is_available():
        assert doctor.check_cuda(required=True).ok
    else:
        assert not doctor.check_cuda(required=True).ok
        assert doctor.check_cuda().warning and "--gpus-per-worker 0" in doctor.check_cuda().detail


@pytest.mark.slow
def test_full_check_reports_this_machine(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "raysd.doctor", "--cache-dir", str(tmp_path / "cache")],
                          cwd=REPO, env={**env, "RAY_USAGE_STATS_ENABLED": "0"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "a local instance starts and runs a task" in done.stdout
    assert f"{tmp_path / 'cache'}: writable" in done.stdout
    assert ("no CUDA device" in done.stdout) or ("bf16" in done.stdout)
