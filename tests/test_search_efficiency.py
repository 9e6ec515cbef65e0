"""The search benchmark (``benchmarks/search_efficiency.py``) at CI size: made-up tables with a known best, every
searcher with and without ASHA at concurrency 1 and 4 for two seeds; it runs, respects its budget, a full grid
finds the best, the JSON line has its shape; and ``record``'s reader turns Tune result files into a table."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from raysd.presets import Scheduler, load_preset
from raysd.search_settings import SearchSettings
from raysd.tune_optuna import OptunaSearcher

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("search_efficiency", REPO / "benchmarks" / "search_efficiency.py")
assert _spec is not None and _spec.loader is not None
se = sys.modules["search_efficiency"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(se)

AXES = {"lr": [1e-4, 1e-3, 1e-2], "batch_size": [128, 256], "bottleneck": [4, 8]}  # 12 configurations
SEARCHERS = ["grid", "random", "tpe_default", "tpe", "tpe:warm_start=2,max_concurrent_per_study=2"]
ASHA = Scheduler(type="asha", grace_period=1, reduction_factor=2)


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tables")
    se.fabricate("dense_ae", ["fan", "valve"], AXES, epochs=5, seed=1).to_csv(out / "search_dense_ae.csv.gz", index=False)
    return out


@pytest.fixture(scope="module")
def problems(tables: Path) -> list:
    se._init([])
    return se.read_tables([str(tables / "search_*.csv.gz")])


def test_the_made_up_tables_read_back_with_their_best(problems: list) -> None:
    assert [(p.family, p.machine_type, len(p.configs), p.epochs) for p in problems] == \
        [("dense_ae", "fan", 12, 5), ("dense_ae", "valve", 12, 5)]
    for p in problems:
        last = np.sort(p.curves[:, -1])
        assert p.best == last[-1] and last[-1] - last[-2] >= 0.01 and p.grid_epochs == 60 and p.mode == "max"
        assert p.config_id(p.configs[7]) == 7 and p.space()["lr"] == {"loguniform": [1e-4, 1e-2]}
        assert p.space()["batch_size"] == {"choice": [128, 256]}  # integers stay choices, as presets write them


def test_a_suggested_learning_rate_trains_the_nearest_recorded_one(problems: list) -> None:
    p = problems[0]
    near = {**p.configs[0], "lr": 2.9e-4}  # nearer 1e-4 than 1e-3 in log scale (the middle is 3.16e-4)
    assert p.config_id(near) == p.config_id({**p.configs[0], "lr": 1e-4})
    assert p.config_id({**near, "lr": 3.3e-4}) == p.config_id({**p.configs[0], "lr": 1e-3})
    categorical = dataclasses.replace(p, ordered=False)
    assert p.space()["lr"] == {"loguniform": [1e-4, 1e-2]}
    assert categorical.space()["lr"] == {"choice": [1e-4, 1e-3, 1e-2]}
    with pytest.raises(KeyError):
        categorical.config_id(near)


@pytest.mark.parametrize("searcher", SEARCHERS)
def test_every_searcher_runs_within_its_budget(problems: list, searcher: str) -> None:
    settings = se.parse_searcher(searcher)
    for scheduler in (Scheduler(type="none"), ASHA):
        for concurrency in (1, 4):
            for seed in (0, 1):
                cfg = se.ReplayConfig(settings, scheduler, concurrency, seed, budget=0.75)
                for p in problems:
                    run = se.replay(p, cfg, [q for q in problems if q is not p], stop_when_done=False)
                    assert run.budget == 45 and 0 < run.used <= run.budget and run.trials >= 1
                    assert all(u <= run.budget for u, *_ in run.finished)
                    if settings.algorithm != "grid":
                        assert run.used == run.budget  # a searcher never runs dry: the budget ends the study
                    row = se.measure(p, cfg, run, 0.005, np.linspace(0, 0.75, 5))
                    assert row["fraction_to_within"] <= row["fraction_to_best"]
                    assert row["gap_0"] == pytest.approx(p.best - p.worst) and row["gap_4"] >= 0


def test_a_full_grid_finds_the_best_and_asha_stops_trials(problems: list) -> None:
    grid = se.parse_searcher("grid")
    for concurrency in (1, 4):
        for p in problems:
            run = se.replay(p, se.ReplayConfig(grid, Scheduler(type="none"), concurrency, 0), stop_when_done=False)
            assert run.used == run.budget == p.grid_epochs and run.trials == len(run.configs) == 12
            row = se.measure(p, se.ReplayConfig(grid, Scheduler(type="none"), concurrency, 0), run, 0.005, np.zeros(1))
            assert row["fraction_to_best"] <= 1.0 and row["pick_config"] is not None
            stopped = se.replay(p, se.ReplayConfig(grid, ASHA, concurrency, 0), stop_when_done=False)
            assert stopped.trials == 12 and stopped.used < p.grid_epochs  # ASHA stopped some trials early


def test_the_replay_drives_the_searcher_a_study_uses(problems: list) -> None:
    p = problems[0]
    cfg = se.ReplayConfig(se.parse_searcher("tpe"), ASHA, 2, 0)
    searcher = se.make_searcher(p, cfg, 16, [])
    assert isinstance(searcher, OptunaSearcher) and searcher.sampler._n_startup_trials == 4
    assert searcher.stopped_as_pruned and searcher.epochs == p.epochs
    captured = {}
    original = se.make_searcher

    def spy(*args):
        captured["s"] = original(*args)
        return captured["s"]

    se.make_searcher = spy
    try:
        se.replay(p, cfg, stop_when_done=False)
    finally:
        se.make_searcher = original
    states = {t.state for t in captured["s"].study.trials}
    assert optuna.trial.TrialState.PRUNED in states and optuna.trial.TrialState.COMPLETE in states
    warm = se.ReplayConfig(se.parse_searcher("tpe:warm_start=2"), Scheduler(type="none"), 1, 0)
    points = se.warm_points(p, warm, problems[1:], 12)  # the best of the same search on the other machine type
    assert len(points) == 2 and all(pt in p.configs for pt in points)
    assert se.make_searcher(p, warm, 12, points).study.trials[0].system_attrs["fixed_params"] == points[0]


def test_the_cli_prints_the_json_shape(tables: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert se.main(["--tables", str(tables / "search_*.csv.gz"), "--seeds", "2", "--concurrency", "1", "4",
                    "--searchers", "grid", "tpe", "--out", str(out)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(last) == {"fraction_to_grid_best", "shipped", "shipped_scheduled", "reached"}
    assert last["shipped"] == SearchSettings().label() == "gp" and last["shipped_scheduled"] == se.shipped_scheduled()
    assert last["shipped_scheduled"].startswith(last["shipped"])
    assert set(last["fraction_to_grid_best"]) == {"grid", "grid+asha", "tpe", "tpe+asha"}
    for per in last["fraction_to_grid_best"].values():
        assert set(per) == {"1", "4"} and all(v is None or 0 < v <= 1 for v in per.values())
    assert last["fraction_to_grid_best"]["grid"]["1"] is not None  # a full grid always finds its best
    assert last["reached"]["grid"] == {"1": 1.0, "4": 1.0} and set(last["reached"]) == set(last["fraction_to_grid_best"])
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 2 * 2 * 2 * 2 * 2 and (runs["used"] <= runs["budget"]).all()
    assert (out / "summary.csv").exists() and (out / "search_efficiency.png").stat().st_size > 0
    # summarise joins replays run in parts (a part given twice counts once) into the same figures, and --markdown
    # prints each problem set's table
    assert se.main(["summarise", str(out), str(out / "runs.csv"), "--out", str(tmp_path / "joined"), "--markdown"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == last and len(pd.read_csv(tmp_path / "joined" / "runs.csv")) == len(runs)
    assert "| tpe+asha | " in "\n".join(printed) and "| contender | concurrency 1 | concurrency 4 |" in "\n".join(printed)


def test_record_reads_every_epoch_of_every_trial(tmp_path: Path) -> None:
    """What ``record`` reads after the grid search: Tune's result.json per trial and the leaderboard."""
    grid = {"lr": [1e-3, 1e-2], "batch_size": [128, 256]}
    exp = tmp_path / "exp"
    board = []
    for mt in ("fan", "valve"):
        for i, (lr, bs) in enumerate([(a, b) for a in grid["lr"] for b in grid["batch_size"]]):
            tid = f"{mt}{i}"
            d = exp / "studies" / f"{mt}__dense_ae" / f"trainable_{tid}"
            d.mkdir(parents=True)
            lines = [{"trial_id": tid, "config": {"lr": lr, "batch_size": bs, "epochs": 3}, "training_iteration": e,
                      "epoch": e, "sel_auc": 0.5 + 0.01 * i * e} for e in (1, 2, 3)]
            (d / "result.json").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
            board.append({"trial_id": tid, "report_auc": 0.6 + 0.01 * i})
    table = se.recorded_table(exp, pd.DataFrame(board), "dense_ae", grid, "sel_auc", 3)
    assert len(table) == 2 * 4 * 3 and list(table.columns[:4]) == ["family", "machine_type", "config", "hp_lr"]
    path = tmp_path / "t.csv.gz"
    table.to_csv(path, index=False, compression={"method": "gzip", "mtime": 0})
    fan, valve = se.read_tables([str(path)])
    assert fan.curves.shape == (4, 3) and fan.curves[3, 2] == pytest.approx(0.5 + 0.09)
    assert fan.configs[2] == {"lr": 1e-2, "batch_size": 128} and fan.report[3] == pytest.approx(0.63)
    (exp / "studies" / "valve__dense_ae" / "trainable_valve0" / "result.json").write_text(
        json.dumps({"trial_id": "valve0", "config": {"lr": 1e-3, "batch_size": 128}, "training_iteration": 1,
                    "epoch": 1, "sel_auc": 0.5}) + "\n")
    with pytest.raises(RuntimeError, match="complete learning curve"):
        se.recorded_table(exp, pd.DataFrame(board), "dense_ae", grid, "sel_auc", 3)
    assert not math.isnan(table["report_final"].iloc[0])


def test_the_record_run_is_a_grid_of_36_per_family_and_machine_type(tmp_path: Path) -> None:
    body = se.record_preset("demo", "rec", se.DEFAULT_GRIDS, 8, None, {"hop": 4})
    path = tmp_path / "rec.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    preset = load_preset(path)
    assert preset.machine_types == ["fan", "valve"] and preset.scheduler.type == "none"
    assert {f: (s.search.algorithm, s.trials(), s.epochs) for f, s in preset.families.items()} == \
        {"dense_ae": ("grid", 36, 8), "vae": ("grid", 36, 8)}
    assert all(s.space["hop"] == 4 for s in preset.families.values())
    assert se.parse_grid(["lr=1e-4,1e-3", "batch_size=128,256", "crop=none,crop"]) == \
        {"lr": [1e-4, 1e-3], "batch_size": [128, 256], "crop": ["none", "crop"]}


def _recorded(out: Path, machine_type: str, axes: dict, seconds: int) -> Path:
    """A table as ``record`` writes it, for one machine type."""
    out.mkdir(parents=True)
    se.write_table(se.fabricate("dense_ae", [machine_type], axes, epochs=3, seed=1), out / "search_dense_ae.csv.gz")
    about = {"preset": "demo", "grid": axes, "fixed": {"hop": 4}, "epochs": 3, "machine_types": [machine_type],
             "configurations": 12, "command": f"record --machine-types {machine_type}",
             "search_seconds_all_families": seconds, "recorded": "2026-11-30"}
    (out / "search_dense_ae.json").write_text(json.dumps(about))
    return out


def test_merge_adds_a_second_records_machine_types(tmp_path: Path) -> None:
    fan, valve = _recorded(tmp_path / "fan", "fan", AXES, 10), _recorded(tmp_path / "valve", "valve", AXES, 20)
    fan_rows = len(pd.read_csv(fan / "search_dense_ae.csv.gz"))
    se.main(["merge", str(valve), "--into", str(fan)])
    table = pd.read_csv(fan / "search_dense_ae.csv.gz")
    assert len(table) == 2 * fan_rows and set(table["machine_type"]) == {"fan", "valve"}
    about = json.loads((fan / "search_dense_ae.json").read_text())
    assert about["machine_types"] == ["fan", "valve"] and "command" not in about
    assert [r["search_seconds_all_families"] for r in about["records"]] == [10, 20]
    assert {p.machine_type for p in se.read_tables([str(fan / "search_*.csv.gz")])} == {"fan", "valve"}
    with pytest.raises(SystemExit, match="already holds machine type"):
        se.main(["merge", str(valve), "--into", str(fan)])
    se.write_table(table, tmp_path / "again.csv.gz")  # the same rows, the same bytes, whatever the file's name
    assert (tmp_path / "again.csv.gz").read_bytes() == (fan / "search_dense_ae.csv.gz").read_bytes()
    (valve / "search_dense_ae.json").write_text("{not json")
    with pytest.raises(SystemExit, match="valve/search_dense_ae.json: cannot read"):
        se.main(["merge", str(valve), "--into", str(fan)])


def test_merge_refuses_a_table_recorded_on_another_grid(tmp_path: Path) -> None:
    fan = _recorded(tmp_path / "fan", "fan", AXES, 10)
    valve = _recorded(tmp_path / "valve", "valve", {**AXES, "bottleneck": [4, 16]}, 20)
    with pytest.raises(SystemExit, match="'grid'"):
        se.main(["merge", str(valve), "--into", str(fan)])
    assert set(pd.read_csv(fan / "search_dense_ae.csv.gz")["machine_type"]) == {"fan"}


@pytest.mark.slow
def test_record_and_replay_through_raysd_search(tiny_root: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """``record`` end to end on a 2-configuration grid of 2-epoch trials (Ray starts), then its table replayed."""
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    tables = tmp_path / "tables"
    assert se.main(["record", "--families", "dense_ae", "--grid", "lr=1e-3,3e-3", "--epochs", "2", "--machine-types",
                    "fan", "--work", str(tmp_path / "work"), "--out-dir", str(tables), "--",
                    "--data-root", str(tiny_root), "--cache-dir", str(tmp_path / "cache")]) == 0
    table = pd.read_csv(tables / "search_dense_ae.csv.gz")
    assert len(table) == 2 * 2 and set(table["hp_lr"]) == {1e-3, 3e-3} and table["report_final"].notna().all()
    assert json.loads((tables / "search_dense_ae.json").read_text())["configurations"] == 2
    assert se.main(["--tables", str(tables / "search_*.csv.gz"), "--seeds", "1", "--concurrency", "1",
                    "--searchers", "grid", "tpe", "--out", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fraction_to_grid_best"]["grid"]["1"] <= 1
