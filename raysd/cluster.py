"""What a Ray cluster can hold: the nodes present or the largest cluster its autoscaler may build, whether a
trial's workers fit on them, and how many trials run at once.

A single-worker trial holds its worker's CPUs and GPU (share) in its Tune trainable; a multi-worker trial's
trainable only drives a ``TorchTrainer`` and holds a token CPU share (:data:`DRIVER_CPU`) beside its workers."""

from __future__ import annotations

import logging
from pathlib import Path

import ray
import yaml

from raysd.trial import StudyJob

log = logging.getLogger(__name__)

DRIVER_CPU = 0.001  # the token CPU share of a multi-worker trial's Tune driver, which only waits on its TorchTrainer
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")  # the cluster YAML as the launcher leaves it on the head


class InfeasibleTrial(RuntimeError):
    """A trial that no node of the cluster can ever hold, with the override that fixes it."""


def driver_cpu(job: StudyJob) -> float:
    """The CPU share of a trial's Tune driver beside its workers: none for one worker (the driver trains)."""
    return DRIVER_CPU if job.workers > 1 else 0.0


def trainable_resources(job: StudyJob) -> dict[str, float]:
    """What a trial's Tune trainable holds: the whole trial for one worker, a token share for a DDP trial's driver."""
    if job.workers == 1:
        return {"CPU": job.cpus_per_worker, "GPU": job.gpus}
    return {"CPU": DRIVER_CPU, "GPU": 0.0}


def trial_resources(job: StudyJob) -> dict[str, float]:
    """Everything one trial holds at once."""
    return {"CPU": job.workers * job.cpus_per_worker + driver_cpu(job), "GPU": job.gpus}


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


def _workers_that_fit(nodes: list[dict[str, float]], per_worker: dict[str, float], driver: float = DRIVER_CPU) -> int:
    """How many workers of ``per_worker`` (one bundle each, never split across nodes) the nodes hold at once,
    next to a ``driver`` CPU share on one of them."""
    need = {k: v for k, v in per_worker.items() if v > 0}

    def held(node: dict[str, float]) -> int:
        return min(int(node[k] / v + 1e-9) for k, v in need.items()) if need else 1

    counts = [held(n) for n in nodes]
    if not driver:
        return sum(counts)
    with_driver = [held({**n, "CPU": n["CPU"] - driver}) - c for n, c in zip(nodes, counts) if n["CPU"] >= driver]
    return sum(counts) + max(with_driver, default=-sum(counts))


def infeasible_reason(job: StudyJob, nodes: list[dict[str, float]], autoscaling: bool) -> str | None:
    """Why no cluster of ``nodes`` can ever run a trial of ``job``, with the override that fixes it; None
    when it can. Each DDP worker is one bundle (its CPUs and GPUs on one node); the trial's driver takes a
    token CPU share anywhere."""
    gpus = job.gpus_per_worker if job.use_gpu else 0.0
    per_worker = {"CPU": job.cpus_per_worker, "GPU": gpus}
    driver = driver_cpu(job)
    if _workers_that_fit(nodes, per_worker, driver) >= job.workers:
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
    fit = _workers_that_fit(nodes, per_worker, driver)
    if fit == 0:
        able = [n for n in nodes if n["GPU"] >= gpus]
        most_cpu = max((n["CPU"] for n in able), default=0.0)
        fits = [c for c in {float(int(n["CPU"] - driver)) for n in able} | {most_cpu - driver} if c > 0
                and _workers_that_fit(nodes, {"CPU": c, "GPU": gpus}, driver) >= 1]
        cpus = max(fits, default=None)
        kind = "node with a GPU" if gpus else "node"
        return (f"{asks}, but the largest {kind} has {most_cpu:g} CPU(s)"
                + (", one share of which the trial's driver needs" if driver and most_cpu >= job.cpus_per_worker else "")
                + (f". Pass --cpus-per-worker {_round_down(cpus)} (or fewer)" if cpus else ""))
    if driver and _workers_that_fit(nodes, per_worker, 0.0) >= job.workers:
        per = _round_down(min(n["CPU"] for n in nodes if n["GPU"] >= gpus) / job.workers - driver)
        return (f"{asks}, but the trial's driver also needs a {DRIVER_CPU:g} CPU share beside its workers. Pass "
                f"--cpus-per-worker {per} (or fewer)")
    return f"{asks}, but the cluster holds at most {fit} such worker(s) at once. Pass --workers {fit}"


def _round_down(cpus: float) -> str:
    """A CPU count the user can pass: whole when it is, else two decimals, rounded down."""
    return f"{cpus:g}" if float(cpus).is_integer() else f"{int(cpus * 100) / 100:g}"


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


def capacity(job: StudyJob, total: dict[str, float]) -> int:
    """How many trials of ``job`` fit at once (at least 1) on a cluster of ``total`` resources."""
    fits = [int(total.get(k, 0.0) / v + 1e-9) for k, v in trial_resources(job).items() if v > 0]
    return max(1, min(fits) if fits else 1)


def cluster_total(present: dict[str, float], most: dict[str, float] | None = None) -> dict[str, float]:
    """The CPUs and GPUs to size concurrency by: those present now or, on an autoscaling cluster, the most it may
    grow to."""
    return {k: max(present.get(k, 0.0), (most or {}).get(k, 0.0)) for k in ("CPU", "GPU")}


def cluster_capacity(jobs: list[StudyJob], present: dict[str, float], most: dict[str, float] | None = None) -> int:
    """How many trials of the largest kind fit at once (at least 1) on the cluster's resources ``present``
    now or, on an autoscaling cluster, on the ``most`` it may grow to."""
    total = cluster_total(present, most)
    return min(capacity(j, total) for j in jobs)
