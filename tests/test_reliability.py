"""Searches that do not hang or lose work: two searches at once on one machine share raysd's local Ray instance;
a trial whose process dies is retried from its last checkpoint, and one still lost after its retries makes the
search's exit code say so. (A lost node: ``tests/test_job_submit.py``.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raysd import local_ray

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
FEATURES = {"sample_rate": 16000, "n_fft": 1024, "hop_length": 512, "n_mels": 64, "clip_seconds": 3.0}


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", **extra}


def _records(exp: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in sorted((exp / "trials").glob("*/*.json")):
        out.setdefault(f.parent.name, []).append(json.loads(f.read_text()))
    return out


def test_two_searches_started_five_seconds_apart_share_one_instance_and_both_finish(tiny_root: Path,
                                                                                    tmp_path: Path) -> None:
    def start(name: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "raysd.search", "demo", "--data-root", str(tiny_root), "--machine-types", "fan",
               "--families", "dense_ae", "--num-samples", "2", "--epochs", "1", "--cache-dir", str(tmp_path / "cache"),
               "--storage-path", str(tmp_path / "exp"), "--name", name, "--results-dir", str(tmp_path / name)]
        return subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    first = start("first")
    time.sleep(5)
    second = start("second")
    logs = {}
    for name, proc in (("first", first), ("second", second)):
        try:
            logs[name], _ = proc.communicate(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 0, logs[name][-5000:]
        assert "multiple active Ray instances" not in logs[name]
        (records,) = _records(tmp_path / "exp" / name).values()
        assert len(records) == 2 == len({r["trial_id"] for r in records})
        assert all(r["status"] == "finished" for r in records)
    assert "joining raysd's local Ray instance" in logs["second"] or "joining raysd's local Ray instance" in logs["first"]
    assert not (local_ray.state_dir() / local_ray.INSTANCE_FILE).exists()  # the last one out stopped it


def test_a_dead_trial_resumes_from_its_checkpoint_and_one_lost_after_its_retries_fails_the_search(
        tiny_root: Path, tmp_path: Path) -> None:
    """``once`` dies at the end of its 2nd epoch, is retried from its 1st epoch's checkpoint and finishes; ``always``
    dies in every attempt: after its one retry the search names it and exits 1, and both have their records."""
    crash = tmp_path / "crashes"
    crash.mkdir()
    space = {"lr": 1e-3, "batch_size": 512}
    preset = tmp_path / "crash.yaml"
    preset.write_text(yaml.safe_dump({
        "name": "crash", "dataset": {"layout": "auto"}, "rule": "2020", "features": FEATURES, "metric": "sel_auc",
        "machine_types": ["fan"], "scheduler": {"type": "none"}, "max_failures": 1,
        "resources": {"workers": 1, "cpus_per_worker": 1},
        "families": {"once": {"family": "test_crash", "num_samples": 1, "epochs": 3,
                              "space": {**space, "crash_at_epoch": 2, "crashes": 1}},
                     "always": {"family": "test_crash", "num_samples": 1, "epochs": 2,
                                "space": {**space, "crash_at_epoch": 1, "crashes": 9}}}}))
    env = _env(RAYSD_FAMILY_MODULES="crash_family", RAYSD_CRASH_DIR=str(crash),
               PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "raysd.search", str(preset), "--data-root", str(tiny_root),
                           "--cache-dir", str(tmp_path / "cache"), "--storage-path", str(tmp_path / "exp"),
                           "--no-leaderboard"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    said = done.stdout + done.stderr
    assert done.returncode == 1, said[-5000:]
    records = _records(tmp_path / "exp" / "crash")
    (once,), (always,) = records["fan__once"], records["fan__always"]
    assert once["status"] == "finished" and once["metrics"]["epoch"] == 3, once
    epochs = (crash / f"{once['trial_id']}.epochs").read_text().split()
    assert epochs == ["1", "2", "2", "3"]  # epoch 2 again after the crash, from epoch 1's checkpoint: nothing else
    assert always["status"] == "failed" and always["reason"].startswith("lost after 1 retry"), always
    assert len(list(crash.glob(f"{always['trial_id']}.crash*"))) == 2  # the first attempt and its one retry
    (line,) = [ln for ln in said.splitlines() if "lost after their retries" in ln]
    assert f"fan__always/{always['trial_id']}" in line and "fan__once" not in line
