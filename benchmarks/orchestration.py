"""Orchestration: how busy ``python -m raysd.search`` keeps a cluster, simulated on one machine.

A local Ray instance declares ``--slots`` logical trial slots; many studies (``--entries`` family entries x the
machine types) of trials whose epochs only sleep (the benchmark-only family ``bench_sleep``,
``benchmarks/sleep_family.py``, named in ``$RAYSD_FAMILY_MODULES``: only the processes that look it up import it)
run through raysd's own search, with its searcher (the preset default) and its study scheduling. Each trial takes
one slot: the slots are logical CPUs (``cpus_per_worker: 1``, the cluster's CPUs = slots), because a trial asking
for a GPU would start CUDA, which a machine without a GPU cannot; Ray schedules a logical CPU like a logical GPU
(both are counted resources in placement groups), so the orchestration measured is the one a GPU cluster runs.

Reported:
- utilisation: the slot-seconds spent in training epochs (the sleeps) over the slot-seconds available from the
  search's start to its last trial's end (and over those of the busy part: from the first epoch to the last);
- the gap between trials on one slot: from one trial's last epoch to the next trial's first epoch on the same
  slot (slots reconstructed by giving each trial, in order of its first epoch, the slot freed first); the time from
  the search's start to the first epoch (the cluster's first trial process, data, model); a trial's end (its last
  epoch to its record: final checkpoint, scores, the study driver's record); and how many processes ran trials
  (fewer than trials: a slot's next trial reused the process);
- the CPU time of the head node's parts, sampled from every process once a second: the search driver, the study
  controllers (Tune, Optuna), the trials (Tune trainables, which only sleep, so all of theirs is overhead), Ray
  Train's controllers, helper actors and workers when trials have several workers, Ray's pool of idle workers and
  its own processes (GCS, raylet, dashboard). A process's CPU time goes to what its title says at the sample.

    python benchmarks/orchestration.py [--slots 8] [--epoch-seconds 10] [--epochs 6] [--entries 3] [--trials 8]
        [--machine-types fan valve] [-- RAYSD_SEARCH_ARGS ...]

Prints one JSON object on its last line. Needs the demo data and features in the cache (made by its first run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from raysd import artifacts
from raysd.families.base import FAMILY_MODULES_ENV
from raysd.presets import SEARCH_SPACES

HERE = Path(__file__).resolve().parent
CATEGORIES = {  # process title fragment -> category, first match wins
    "run_study": "study controllers (Tune + Optuna)",
    "TrainController": "Train controllers",
    "RayTrainWorker": "trial workers",
    "raysd:": "trials (Tune trainables)",
    "ImplicitFunc": "trials (Tune trainables)",
    "SynchronizationActor": "Train helper actors",
    "PlacementGroupCleaner": "Train helper actors",
    "_QueueActor": "Train helper actors",
    "AutoscalingCoordinator": "Train helper actors",
    "DatasetManager": "Train helper actors",
    "ray::IDLE": "idle pooled Ray workers",
    "gcs_server": "Ray system",
    "raylet": "Ray system",
    "dashboard": "Ray system",
    "log_monitor": "Ray system",
    "monitor.py": "Ray system",
    "runtime_env": "Ray system",
}


@dataclass
class TrialTimes:
    trial: str
    started: float  # its Tune trainable started (trial record time - wall seconds)
    first: float  # first epoch began
    last: float  # last epoch ended
    ended: float  # its trial record was written
    busy: float  # seconds in epochs


def trial_times(events: list[dict], records: list[dict]) -> list[TrialTimes]:
    """Per trial: its epochs' sleeps (``events``: trial, start, end) and its record (trial_id, wall_seconds,
    written: the record file's time)."""
    by_trial: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        by_trial[e["trial"]].append(e)
    out = []
    for r in records:
        ev = by_trial.get(r["trial_id"])
        if not ev:
            continue
        out.append(TrialTimes(r["trial_id"], r["written"] - r["wall_seconds"], min(e["start"] for e in ev),
                              max(e["end"] for e in ev), r["written"], sum(e["end"] - e["start"] for e in ev)))
    return sorted(out, key=lambda t: t.first)


def slot_gaps(trials: list[TrialTimes], slots: int) -> list[float]:
    """The gap between consecutive trials on one slot: each trial, in order of its first epoch, takes the slot
    whose last trial's last epoch ended first."""
    return [t.first - last for t, last in _follow(trials, slots)]


def _follow(trials: list[TrialTimes], slots: int) -> list[tuple[TrialTimes, float]]:
    """Each trial that followed another on its slot (:func:`slot_gaps`), with the last epoch's end before it."""
    free = [-np.inf] * slots
    out = []
    for t in trials:
        i = int(np.argmin(free))
        if np.isfinite(free[i]):
            out.append((t, free[i]))
        free[i] = t.last
    return out


def utilisation(trials: list[TrialTimes], slots: int, start: float) -> dict[str, float]:
    """Busy slot-seconds over available slot-seconds, from ``start`` (the search's) and from the first epoch."""
    busy = sum(t.busy for t in trials)
    end = max(t.ended for t in trials)
    first = min(t.first for t in trials)
    last = max(t.last for t in trials)
    return {"utilisation": busy / (slots * (end - start)), "utilisation_busy_part": busy / (slots * (last - first)),
            "busy_slot_seconds": busy, "makespan_s": end - start}


class CpuSampler(threading.Thread):
    """CPU seconds per process category (``CATEGORIES``; this process is 'search driver'), sampled every
    ``period`` seconds; a process's CPU time since the last sample goes to its category at this sample."""

    def __init__(self, period: float = 1.0):
        super().__init__(daemon=True)
        import psutil

        self.psutil, self.period = psutil, period
        self.seen: dict[tuple[int, float], float] = {}
        self.cpu: dict[str, float] = defaultdict(float)
        self.stop = threading.Event()

    def category(self, p: Any) -> str | None:
        if p.pid == os.getpid():
            return "search driver"
        try:
            text = " ".join(p.cmdline()) or p.name()
        except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
            return None
        for fragment, cat in CATEGORIES.items():
            if fragment in text:
                return cat
        return "other Ray workers" if "ray::" in text or "default_worker.py" in text else None

    def sample(self) -> None:
        for p in self.psutil.process_iter():
            try:
                key = (p.pid, p.create_time())
                t = p.cpu_times()
                total = t.user + t.system
            except (self.psutil.NoSuchProcess, self.psutil.AccessDenied, self.psutil.ZombieProcess):
                continue
            cat = self.category(p)
            if cat is None:
                continue
            self.cpu[cat] += total - self.seen.get(key, total if cat == "search driver" else 0.0)
            self.seen[key] = total

    def run(self) -> None:
        self.sample()
        while not self.stop.wait(self.period):
            self.sample()


def write_preset(path: Path, a: argparse.Namespace) -> None:
    base = yaml.safe_load((SEARCH_SPACES / "demo.yaml").read_text())
    body = {k: v for k, v in base.items() if k in ("dataset", "rule", "features", "metric", "seed")}
    body.update(name="orchestration", description="benchmarks/orchestration.py: trials that sleep",
                machine_types=a.machine_types, scheduler={"type": "none"},
                resources={"workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0}, max_failures=0,
                families={f"sleep_{i}": {"family": "bench_sleep", "num_samples": a.trials, "epochs": a.epochs,
                                         "space": {"epoch_seconds": a.epoch_seconds, "knob": {"uniform": [0.0, 1.0]}}}
                          for i in range(a.entries)})
    path.write_text(yaml.safe_dump(body, sort_keys=False))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", type=int, default=8, help="logical trial slots (default 8)")
    p.add_argument("--epoch-seconds", type=float, default=10.0)
    p.add_argument("--epochs", type=int, default=6, help="epochs per trial (default 6: 60 s trials)")
    p.add_argument("--entries", type=int, default=3, help="family entries: studies = entries x machine types")
    p.add_argument("--trials", type=int, default=8, help="trials per study")
    p.add_argument("--machine-types", nargs="+", default=["fan", "valve"])
    p.add_argument("--work", help="experiment folder (default: a temporary one)")
    a = p.parse_args(argv)

    work = Path(a.work or tempfile.mkdtemp(prefix="raysd_orchestration_"))
    events = work / "events"
    events.mkdir(parents=True, exist_ok=True)
    os.environ["RAYSD_SLEEP_EVENTS"] = str(events)
    os.environ[FAMILY_MODULES_ENV] = "sleep_family"
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.path.insert(0, str(HERE))
    import ray
    import sleep_family  # noqa: F401  (registers bench_sleep here)

    from raysd import search

    preset = work / "orchestration.yaml"
    write_preset(preset, a)
    ray.init(address="local", include_dashboard=False, num_cpus=a.slots, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "RAYSD_SLEEP_EVENTS": str(events),
                                       FAMILY_MODULES_ENV: "sleep_family", "OMP_NUM_THREADS": "1"}})
    sampler = CpuSampler()
    sampler.start()
    t0 = time.time()
    try:
        rc = search.main([str(preset), "--storage-path", str(work / "experiments"), "--no-leaderboard", *extra])
    finally:
        sampler.stop.set()
        sampler.join()
        ray.shutdown()
    if rc != 0:
        raise SystemExit(f"the search failed (exit {rc}); its experiment is in {work}")

    evs = [json.loads(line) for f in events.glob("*.jsonl") for line in f.read_text().splitlines() if line.strip()]
    records = []
    for f in (work / "experiments" / "orchestration" / artifacts.TRIALS_DIR).glob("*/*.json"):
        rec = artifacts.read_trial_record(str(f))
        if rec.status == "finished" and rec.wall_seconds is not None:
            records.append({"trial_id": rec.trial_id, "wall_seconds": rec.wall_seconds, "written": f.stat().st_mtime})
    trials = trial_times(evs, records)
    studies = a.entries * len(a.machine_types)
    if len(trials) != studies * a.trials:
        print(f"warning: {len(trials)} of {studies * a.trials} trials finished with events", file=sys.stderr)
    use = utilisation(trials, a.slots, t0)
    gaps = slot_gaps(trials, a.slots)
    end = [t.ended - t.last for t in trials]
    pids = {e["trial"]: e["pid"] for e in evs}
    cpu = dict(sorted(sampler.cpu.items(), key=lambda kv: -kv[1]))
    ideal = studies * a.trials * a.epochs * a.epoch_seconds / a.slots
    result: dict[str, Any] = {
        "slots": a.slots, "studies": studies, "trials": len(trials), "trial_seconds": a.epochs * a.epoch_seconds,
        "utilisation": round(use["utilisation"], 4), "utilisation_busy_part": round(use["utilisation_busy_part"], 4),
        "makespan_s": round(use["makespan_s"], 1), "ideal_makespan_s": round(ideal, 1),
        "slot_gap_s_median": round(float(np.median(gaps)), 2) if gaps else None,
        "slot_gap_s_p90": round(float(np.quantile(gaps, 0.9)), 2) if gaps else None,
        "first_epoch_s": round(min(t.first for t in trials) - t0, 2), "trial_end_s_median": round(float(np.median(end)), 2),
        "trial_processes": len(set(pids.values())),
        "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
        "cpu_seconds_per_trial": {k: round(v / max(1, len(trials)), 2) for k, v in cpu.items()},
        "machine_cores": os.cpu_count(), "search_args": extra}
    print(f"{len(trials)} trials of {result['trial_seconds']:g} s in {studies} studies on {a.slots} slots: "
          f"utilisation {use['utilisation']:.1%} (busy part {use['utilisation_busy_part']:.1%}); makespan "
          f"{use['makespan_s']:.0f} s, ideal {ideal:.0f} s")
    print(f"gap between trials on a slot: median {result['slot_gap_s_median']} s, p90 {result['slot_gap_s_p90']} s; "
          f"first epoch {result['first_epoch_s']} s after the search started; trial end {result['trial_end_s_median']} s "
          f"(median); {result['trial_processes']} trial process(es)")
    for k, v in cpu.items():
        print(f"  cpu {k:36s} {v:8.1f} s  ({v / use['makespan_s']:.2f} cores)")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
