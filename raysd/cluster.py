"""What a Ray cluster can hold: the nodes present or the largest cluster its autoscaler may build, whether a
trial's workers fit on them, and how many trials run at once."""

from __future__ import annotations

import logging
from pathlib import Path

import ray
import yaml

from raysd.trial import StudyJob

log = logging.getLogger(__name__)

DRIVER_CPU = 0.001  # the token CPU share of each trial's Tune driver, which only waits on its TorchTrainer
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")  # the cluster YAML as the launcher leaves it on the head


class InfeasibleTrial(RuntimeError):
    """A trial that no node of the cluster can ever hold, with the override that fixes it."""


def trial_resources(job: StudyJob) -> dict[str, float]:
    return {"CPU": job.workers * job.cpus_per_worker + DRIVER_CPU, "GPU": job.workers * job.gpus_per_worker if job.use_gpu else 0.0}


def autoscaler_nodes(config_path: Path = BOOTSTRAP_CONFIG) -> list[dict[str, float]] | None:
    """The CPUs and GPUs of every node of the largest cluster the autoscaler may build: the head plus worker
    nodes up to each type's ``max_workers`` and the cluster's ``max_workers``, biggest nodes first. Read from
    the cluster launcher's config on the head node (the file Ray Tune also looks for); None when there is none."""
    path = config_path.expanduser()
    if not path.is_file():
        return None
    try:
        config = yaml.safe_load(path.read_text())
        types = config["available_node_types"]
        head = types[config["head_node_type"]].get("resources", {})
        workers = sorted(((t.get("resources", {}), int(t.get("max_workers", 0)))
                          for name, t in types.items() if name != config["head_node_type"]),
                         key=lambda rw: (rw[0].get("GPU", 0), rw[0].get("CPU", 0)), reverse=True)
        left = int(config.get("max_workers", sum(n for _, n in workers)))
        nodes = [_cpu_gpu(head)]
        for res, n in workers:
            n = min(n, left)
            left -= n
            nodes += [_cpu_gpu(res)] * n
    except (KeyError, TypeError, ValueError, AttributeError, yaml.YAMLError) as e:
        log.warning(f"cannot read the autoscaler config {path} ({type(e).__name__}: {e}); "
                    "sizing concurrency from the nodes present now")
        return None
    return nodes


def _cpu_gpu(resources: dict) -> dict[str, float]:
    return {k: float(resources.get(k, 0)) for k in ("CPU", "GPU")}


def autoscaler_max_resources(config_path: Path = BOOTSTRAP_CONFIG) -> dict[str, float] | None:
    """Total CPUs and GPUs of :func:`autoscaler_nodes`; None without an autoscaler config."""
    nodes = autoscaler_nodes(config_path)
    return None if nodes is None else total_resources(nodes)


def total_resources(nodes: list[dict[str, float]]) -> dict[str, float]:
    return {k: sum(n[k] for n in nodes) for k in ("CPU", "GPU")}


def present_nodes() -> list[dict[str, float]]:
    return [_cpu_gpu(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def _workers_that_fit(nodes: list[dict[str, float]], per_worker: dict[str, float]) -> int:
    """How many workers of ``per_worker`` (one bundle each, never split across nodes) the nodes hold at once,
    next to the trial driver's token CPU share on one of them."""
    need = {k: v for k, v in per_worker.items() if v > 0}

    def held(node: dict[str, float]) -> int:
        return min(int(node[k] / v + 1e-9) for k, v in need.items()) if need else 1

    counts = [held(n) for n in nodes]
    with_driver = [held({**n, "CPU": n["CPU"] - DRIVER_CPU}) - c for n, c in zip(nodes, counts) if n["CPU"] >= DRIVER_CPU]
    return sum(counts) + max(with_driver, default=-sum(counts))


def infeasible_reason(job: StudyJob, nodes: list[dict[str, float]], autoscaling: bool) -> str | None:
    """Why no cluster of ``nodes`` can ever run a trial of ``job``, with the override that fixes it; None
    when it can. Each DDP worker is one bundle (its CPUs and GPUs on one node); the trial's driver takes a
    token CPU share anywhere."""
    gpus = job.gpus_per_worker if job.use_gpu else 0.0
    per_worker = {"CPU": job.cpus_per_worker, "GPU": gpus}
    if _workers_that_fit(nodes, per_worker) >= job.workers:
        return None
    where = "no node this cluster has or its autoscaler may add" if autoscaling else "no node of this cluster"
    most_gpu = max((n["GPU"] for n in nodes), default=0.0)
    asks = (f"study {job.study} asks for {job.workers} worker(s) x {job.cpus_per_worker:g} CPU"
            + (f" + {gpus:g} GPU" if gpus else ""))
    if gpus and most_gpu == 0:
        return (f"{asks}, but {where} has a GPU. Train on CPU with --gpus-per-worker 0 "
                "(and --cpus-per-worker N to size each worker), or attach a cluster with GPUs")
    if gpus and most_gpu < gpus:
        return f"{asks}, but {where} has more than {most_gpu:g} GPU(s). Pass --gpus-per-worker {most_gpu:g}"
    fit = _workers_that_fit(nodes, per_worker)
    if fit == 0:
        able = [n for n in nodes if n["GPU"] >= gpus]
        most_cpu = max((n["CPU"] for n in able), default=0.0)
        options = {float(int(n["CPU"] - d)) for n in able for d in (0.0, DRIVER_CPU)} - {0.0}
        cpus = max((c for c in options if _workers_that_fit(nodes, {"CPU": c, "GPU": gpus}) >= 1), default=None)
        kind = "node with a GPU" if gpus else "node"
        return (f"{asks}, but the largest {kind} has {most_cpu:g} CPU(s)"
                + (", one share of which the trial's driver needs" if most_cpu >= job.cpus_per_worker else "")
                + (f". Pass --cpus-per-worker {cpus:g} (or fewer)" if cpus else ""))
    return f"{asks}, but the cluster holds at most {fit} such worker(s) at once. Pass --workers {fit}"


def check_resources(jobs: list[StudyJob], present: list[dict[str, float]],
                    autoscaled: list[dict[str, float]] | None) -> None:
    """Fail before any trial starts when a trial asks for what the cluster can never provide (Ray would wait
    forever on 'No available node types can fulfill resource request'). On an autoscaling cluster, judge by
    the largest cluster the autoscaler may build."""
    for job in jobs:
        reason = infeasible_reason(job, present, autoscaling=False)
        if reason and autoscaled is not None:
            reason = infeasible_reason(job, autoscaled, autoscaling=True)
        if reason:
            raise InfeasibleTrial(reason + " (or --no-resource-check to wait for resources anyway).")


def cluster_capacity(jobs: list[StudyJob], present: dict[str, float], most: dict[str, float] | None = None) -> int:
    """How many trials of the largest kind fit at once (at least 1) on the cluster's resources ``present``
    now or, on an autoscaling cluster, on the ``most`` it may grow to."""
    total = {k: max(present.get(k, 0.0), (most or {}).get(k, 0.0)) for k in ("CPU", "GPU")}
    need = max((trial_resources(j) for j in jobs), key=lambda r: (r["GPU"], r["CPU"]))
    fits = [int(total.get(k, 0) // v) for k, v in need.items() if v > 0]
    return max(1, min(fits) if fits else 1)
