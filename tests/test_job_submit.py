"""`ray job submit` against a local two-node Ray cluster on loopback (a head and a second node started
with `ray start`), with a shared folder as storage: the job runs a tiny preset whose one trial has two
DDP workers of one CPU each, placed so that the trial must span both nodes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, env: dict, timeout: int = 180) -> subprocess.CompletedProcess:
    exe = shutil.which("ray", path=str(BIN)) or "ray"
    return subprocess.run([exe, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _stop_cluster(port: int, temp: Path) -> None:
    """End the processes of this cluster only (matched by its GCS port or temp dir), not every Ray on
    the machine as `ray stop` would."""
    import psutil

    marks = (f"127.0.0.1:{port}", f"--gcs_server_port={port}", str(temp))
    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.pid != os.getpid() and any(m in cmd for m in marks):
            procs.append(p)
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _submit(address: str, cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """`ray job submit`, retried for up to three minutes while the new head's agent is not ready yet."""
    import time

    deadline = time.time() + 180
    while True:
        job = _ray("job", "submit", "--address", address, "--", *cmd, env=env, timeout=timeout)
        if "No available agent" not in job.stdout + job.stderr or time.time() > deadline:
            return job
        time.sleep(3)


@pytest.fixture(scope="module")
def two_node_cluster():
    port, dash = _free_port(), _free_port()
    temp = Path("/tmp") / f"raysd-test-{os.getpid()}"  # Ray's socket paths must stay short
    # Token authentication (Ray's default for a local head) for the head, the second node and the job client
    # alike; they share the token file that the head writes.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
           "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    # Two nodes of one CPU each; the trial's two workers take 0.75 CPU each, so no node can hold both
    # (wherever the trial driver's 0.001 CPU lands) and the trial has to span the nodes.
    head = _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                f"--temp-dir={temp}", "--disable-usage-stats", env=env)
    try:
        assert head.returncode == 0, head.stdout + head.stderr
        worker = _ray("start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                      env=env)
        assert worker.returncode == 0, worker.stdout + worker.stderr
        yield {"address": f"http://127.0.0.1:{dash}", "env": env}
    finally:
        _stop_cluster(port, temp)
        shutil.rmtree(temp, ignore_errors=True)


def test_job_submit_runs_trials_across_two_nodes(two_node_cluster, tiny_root: Path, tmp_path: Path) -> None:
    preset = tmp_path / "job.yaml"
    preset.write_text(yaml.safe_dump({
        "name": "job", "dataset": {"layout": "auto"}, "rule": "2020", "machine_types": ["fan"],
        "features": {"sample_rate": 16000, "n_fft": 1024, "hop_length": 512, "n_mels": 64, "clip_seconds": 3.0},
        "metric": "sel_auc", "scheduler": {"type": "none"},
        "resources": {"workers": 2, "cpus_per_worker": 0.75},
        "families": {"dense_ae": {"num_samples": 1, "epochs": 1, "space": {"lr": 1e-3, "batch_size": 512}}},
    }))
    shared = tmp_path / "shared"
    cmd = [sys.executable, "-m", "raysd.search", str(preset), "--data-root", str(tiny_root),
           "--cache-dir", str(tmp_path / "cache"), "--storage-path", str(shared), "--shared-fs",
           "--results-dir", str(tmp_path / "results")]
    job = _submit(two_node_cluster["address"], cmd, two_node_cluster["env"], timeout=1200)
    assert job.returncode == 0, job.stdout[-6000:] + job.stderr[-3000:]
    (record,) = [json.loads(p.read_text()) for p in (shared / "job" / "trials").glob("*/*.json")]
    assert record["status"] == "finished", record
    assert len(record["metrics"]["nodes"].split(",")) == 2, record["metrics"]["nodes"]
    assert (tmp_path / "results" / "leaderboard.csv").exists()


def test_multi_node_cluster_refuses_local_storage(two_node_cluster, tiny_root: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "raysd.search", "demo", "--data-root", str(tiny_root),
           "--cache-dir", str(tmp_path / "cache"), "--storage-path", str(tmp_path / "local")]
    job = _submit(two_node_cluster["address"], cmd, two_node_cluster["env"], timeout=600)
    assert job.returncode != 0
    assert "shared storage" in job.stdout or "s3://" in job.stdout
