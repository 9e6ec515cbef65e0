"""`ray job submit` against local two-node Ray clusters on loopback (a head and a second node started with
`ray start`), with a shared folder as storage: a trial whose DDP workers must span both nodes, a multi-node
cluster that refuses local storage, and a second node lost while its trials train."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
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


def _start(*args: str, env: dict) -> subprocess.Popen:
    """`ray start ... --block` in a process session of its own, with free ports (another Ray's fixed defaults may be
    taken): ending its process group ends exactly that node's processes."""
    exe = shutil.which("ray", path=str(BIN)) or "ray"
    ports = [f"--{flag}={_free_port()}" for flag in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "runtime-env-agent-port", "metrics-export-port")]
    return subprocess.Popen([exe, "start", *args, *ports, "--block"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _end(node: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """End one node started by :func:`_start`: SIGTERM (Ray drains and stops), then SIGKILL to its process group."""
    if node.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, sig)
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGKILL)
    node.wait()


def _submit(address: str, cmd: list[str], env: dict, timeout: int) -> subprocess.CompletedProcess:
    """`ray job submit`, retried for up to three minutes while the new head's agent is not ready yet."""
    deadline = time.time() + 300
    while True:
        job = _ray("job", "submit", "--address", address, "--", *cmd, env=env, timeout=timeout)
        if "No available agent" not in job.stdout + job.stderr or time.time() > deadline:
            return job
        time.sleep(3)


def _cluster(head_cpus: int, node_cpus: int):
    """A head of ``head_cpus`` and a second node of ``node_cpus`` CPUs, each in a process session of its own; yields
    the dashboard address, the environment and the second node's process (a test may kill it whole)."""
    port, dash = _free_port(), _free_port()
    temp = Path("/tmp") / f"raysd-test-{os.getpid()}-{port}"  # Ray's socket paths must stay short
    # Token authentication (Ray's default for a local head) for the head, the second node and the job client
    # alike; they share the token file that the head writes.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    head = _start("--head", "--node-ip-address=127.0.0.1", f"--port={port}", f"--num-cpus={head_cpus}",
                  "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                  f"--ray-client-server-port={_free_port()}", f"--temp-dir={temp}", "--disable-usage-stats", env=env)
    node = None
    try:
        _wait_for_nodes(f"127.0.0.1:{port}", 1, env)
        node = _start(f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", f"--num-cpus={node_cpus}", env=env)
        _wait_for_nodes(f"127.0.0.1:{port}", 2, env)
        yield {"address": f"http://127.0.0.1:{dash}", "env": env, "node": node}
    finally:
        if node is not None:
            _end(node, signal.SIGKILL)
        _end(head)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_nodes(gcs: str, n: int, env: dict, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = _ray("status", f"--address={gcs}", env=env, timeout=60)
        if status.stdout.count(" node_") >= n:
            return
        time.sleep(2)
    raise AssertionError(f"the cluster did not reach {n} nodes: {status.stdout[-2000:]}")


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head and a second node of one CPU each: a trial of two 0.75-CPU workers must span both."""
    yield from _cluster(1, 1)


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


EPOCHS = 40  # about 30 s a trial here: the node is lost while its trials train


def test_a_lost_node_costs_a_retry_not_a_trial(tiny_root: Path, tmp_path: Path) -> None:
    """A head of one CPU and a second node of two, three trials of one CPU each: once every trial has a checkpoint,
    every process of the second node is killed. Its trials are retried on the head from their last checkpoints (their
    reports continue from there), the search finishes, and every trial has its record."""
    cluster = _cluster(1, 2)
    info = next(cluster)
    try:
        preset = tmp_path / "lost.yaml"
        preset.write_text(yaml.safe_dump({
            "name": "lost", "dataset": {"layout": "auto"}, "rule": "2020", "machine_types": ["fan"],
            "features": {"sample_rate": 16000, "n_fft": 1024, "hop_length": 512, "n_mels": 64, "clip_seconds": 3.0},
            "metric": "sel_auc", "scheduler": {"type": "none"}, "max_failures": 2,
            "resources": {"workers": 1, "cpus_per_worker": 1},
            "families": {"dense_ae": {"num_samples": 3, "epochs": EPOCHS,
                                      "space": {"lr": {"loguniform": [1e-3, 3e-3]}, "batch_size": 16}}},
        }))
        shared = tmp_path / "shared"
        cmd = [sys.executable, "-m", "raysd.search", str(preset), "--data-root", str(tiny_root),
               "--cache-dir", str(tmp_path / "cache"), "--storage-path", str(shared), "--shared-fs", "--no-leaderboard"]
        exe = shutil.which("ray", path=str(BIN)) or "ray"
        studies = shared / "lost" / "studies" / "fan__dense_ae"
        deadline = time.time() + 300
        while True:  # retried while the new head's job agent is not ready yet
            job = subprocess.Popen([exe, "job", "submit", "--address", info["address"], "--", *cmd], env=info["env"],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            while len({c.parent for c in studies.glob("*/checkpoint_*")}) < 3 and job.poll() is None:
                time.sleep(0.5)
            if job.poll() is None:
                break
            out = job.stdout.read() if job.stdout else ""
            assert "No available agent" in out and time.time() < deadline, f"the search ended too soon:\n{out[-5000:]}"
            time.sleep(3)
        os.killpg(info["node"].pid, signal.SIGKILL)  # the second node's raylet and every worker on it
        out, _ = job.communicate(timeout=1200)
        assert job.returncode == 0, out[-6000:]
        (records,) = _records(shared / "lost").values()
        assert len(records) == 3 and all(r["status"] == "finished" and r["metrics"]["epoch"] == EPOCHS for r in records)
        moved = 0
        for trial_dir in studies.iterdir():
            if not trial_dir.is_dir():
                continue
            reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line]
            epochs = [r["epoch"] for r in reports]
            # resumed from its last checkpoint: at most the epoch in flight again (Tune registers a report's
            # checkpoint just after logging the report, so a node lost in between costs that one epoch once more)
            assert epochs == sorted(epochs) and sorted(set(epochs)) == list(range(1, EPOCHS + 1)), epochs
            assert len(epochs) - len(set(epochs)) <= 1, epochs
            moved += len({r["nodes"] for r in reports}) > 1
        assert moved >= 1  # at least one trial trained on both nodes: retried on the head after the loss
    finally:
        cluster.close()


def _records(exp: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in sorted((exp / "trials").glob("*/*.json")):
        out.setdefault(f.parent.name, []).append(json.loads(f.read_text()))
    return out
