"""The orchestration benchmark's arithmetic (``benchmarks/orchestration.py``): trial times from the sleep events
and trial records, slots reconstructed from them, utilisation; and how the search shares a cluster's slots."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

from raysd import searchers
from raysd.search_settings import read_settings

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("orchestration", REPO / "benchmarks" / "orchestration.py")
assert _spec is not None and _spec.loader is not None
orch = sys.modules["orchestration"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(orch)


def _events(trial: str, start: float, epochs: int, seconds: float) -> list[dict]:
    return [{"trial": trial, "start": start + i * seconds, "end": start + (i + 1) * seconds} for i in range(epochs)]


def test_two_slots_two_rounds() -> None:
    """Four 10 s trials on two slots: each starts 3 s after its driver and ends 2 s before its record; the second
    round starts 6 s after the first ends, so the gap on each slot is 6 s."""
    events = [*_events("a", 3, 2, 5), *_events("b", 4, 2, 5), *_events("c", 19, 2, 5), *_events("d", 20, 2, 5)]
    records = [{"trial_id": t, "wall_seconds": 15.0, "written": w} for t, w in
               [("a", 15.0), ("b", 16.0), ("c", 31.0), ("d", 32.0), ("lost", 40.0)]]  # 'lost': no events
    trials = orch.trial_times(events, records)
    assert [t.trial for t in trials] == ["a", "b", "c", "d"]
    assert [t.first - t.started for t in trials] == [3.0, 3.0, 3.0, 3.0]
    assert [t.ended - t.last for t in trials] == [2.0, 2.0, 2.0, 2.0]
    assert orch.slot_gaps(trials, 2) == [6.0, 6.0]
    use = orch.utilisation(trials, 2, start=0.0)
    assert use["busy_slot_seconds"] == 40.0 and use["makespan_s"] == 32.0
    assert math.isclose(use["utilisation"], 40 / 64) and math.isclose(use["utilisation_busy_part"], 40 / (2 * 27))


def test_a_slot_left_idle_shows_in_utilisation_not_in_gaps() -> None:
    """Two trials one after the other on a cluster of two slots: one slot never works."""
    trials = orch.trial_times([*_events("a", 0, 1, 10), *_events("b", 10, 1, 10)],
                              [{"trial_id": "a", "wall_seconds": 10.0, "written": 10.0},
                               {"trial_id": "b", "wall_seconds": 10.0, "written": 20.0}])
    assert orch.slot_gaps(trials, 2) == []  # b took the slot that had never worked
    assert orch.slot_gaps(trials, 1) == [0.0]
    assert orch.utilisation(trials, 2, start=0.0)["utilisation"] == pytest.approx(0.5)


@pytest.mark.parametrize(("capacity", "studies", "share"), [(8, 6, 2), (8, 8, 1), (32, 12, 3), (8, 1, 8), (4, 16, 1)])
def test_the_studies_ask_for_the_whole_cluster(capacity: int, studies: int, share: int) -> None:
    """Rounded up: 6 studies on 8 slots run 2 trials each (Ray queues the 4 that do not fit), not 1 each with 2
    slots idle."""
    assert searchers.study_share(capacity, studies) == share
    assert searchers.study_share(capacity, studies) * min(studies, capacity) >= capacity


def test_a_capped_study_takes_less_than_its_share() -> None:
    assert searchers.study_concurrency(read_settings({"max_concurrent_per_study": 1}), searchers.study_share(8, 2)) == 1


@pytest.mark.slow
def test_the_benchmark_runs_sleeping_trials_through_the_search(tiny_root: Path, tmp_path: Path) -> None:
    """End to end in its own process (its family must not join this process's registry): one slot, one study of
    two 2-epoch trials; the second starts in the first one's process; every part of the report is there."""
    import json
    import os
    import subprocess

    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "orchestration.py"), "--slots", "1", "--entries", "1", "--trials", "2",
         "--epochs", "2", "--epoch-seconds", "1", "--machine-types", "fan", "--work", str(tmp_path / "work"), "--",
         "--data-root", str(tiny_root), "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["trials"] == 2 and result["studies"] == 1 and 0 < result["utilisation"] <= 1
    assert result["first_epoch_s"] > 0 and result["slot_gap_s_median"] >= 0
    assert result["trial_processes"] == 1  # the slot's second trial reused the first one's process
    assert {"search driver", "trials (Tune trainables)", "study controllers (Tune + Optuna)"} <= set(result["cpu_seconds"])
