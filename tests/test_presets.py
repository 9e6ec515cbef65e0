"""A preset entry's ``points_to_evaluate`` (the first trials of a search) and ``repeats`` (one configuration
trained with several seeds): checked when the preset is read, and carried into each study's ``Tuner``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from raysd import plan as planning
from raysd import runner, search
from raysd.presets import PresetError, load_preset
from raysd.searchers import param_space
from raysd.studies import StudyRun, tune_config
from raysd.trial import StudyJob

SPACE = {"lr": {"loguniform": [1e-4, 1e-2]}, "batch_size": {"choice": [128, 256]},
         "hidden": {"randint": [8, 256]}, "weight_decay": 0.0}


def _write(tmp_path: Path, entry: dict, **extra) -> Path:
    body = {"dataset": {"synthetic": "tiny"}, "families": {"dense_ae": entry}, **extra}
    p = tmp_path / "p.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


def _job(tmp_path: Path, entry: str = "dense_ae") -> StudyJob:
    return StudyJob(study=f"fan__{entry}", family="dense_ae", machine_type="fan", catalog=pd.DataFrame(),
                    data_root="/nowhere", layout="dcase2020", spec={}, rule="2020", metric="sel_auc",
                    cache_dir=str(tmp_path / "cache"), experiment=str(tmp_path / "exp"), entry=entry)


def _config(tmp_path: Path, preset, num_samples: int | None, epochs: int, share: int, warm: list | None = None):
    """The study's Tune param_space and TuneConfig, as its driver builds them."""
    run = StudyRun(preset, preset.families["dense_ae"], num_samples, epochs, share, 3, warm_points=warm)
    return tune_config(_job(tmp_path), run)


# ---------------------------------------------------------------------- points_to_evaluate
def test_points_are_completed_with_the_family_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, {"space": SPACE, "points_to_evaluate": [{"lr": 3e-4, "hidden": 64}, {}]})
    path.write_text(path.read_text().replace("0.0003", "3e-4"))  # YAML 1.1 reads 3e-4 as a string
    fam = load_preset(path).families["dense_ae"]
    # DenseAEConfig.hidden = 128, TrainHP.lr = 1e-3 and batch_size = 256 lie inside the space: the defaults fill in
    assert fam.points_to_evaluate == [{"lr": 3e-4, "batch_size": 256, "hidden": 64},
                                      {"lr": 1e-3, "batch_size": 256, "hidden": 128}]
    assert isinstance(fam.points_to_evaluate[0]["lr"], float)
    assert load_preset(_write(tmp_path, {"space": SPACE})).families["dense_ae"].points_to_evaluate == []


@pytest.mark.parametrize("entry, key", [
    ({"points_to_evaluate": [{"depth": 2}]}, "points_to_evaluate[0].depth"),  # not in the space
    ({"points_to_evaluate": [{"weight_decay": 0.1}]}, "points_to_evaluate[0].weight_decay"),  # fixed there
    ({"points_to_evaluate": [{}, {"lr": 0.5}]}, "points_to_evaluate[1].lr"),  # outside [lo, hi]
    ({"points_to_evaluate": [{"lr": "fast"}]}, "points_to_evaluate[0].lr"),
    ({"points_to_evaluate": [{"batch_size": 64}]}, "points_to_evaluate[0].batch_size"),  # not a choice
    ({"points_to_evaluate": [{"hidden": 256}]}, "points_to_evaluate[0].hidden"),  # randint's high end is excluded
    ({"points_to_evaluate": [{"hidden": 16.5}]}, "points_to_evaluate[0].hidden"),
    ({"points_to_evaluate": [{"lr": 1e-3}, {}]}, "points_to_evaluate[1]"),  # the defaults twice
    ({"points_to_evaluate": {"lr": 1e-3}}, "families.dense_ae.points_to_evaluate"),  # not a list
    ({"points_to_evaluate": [{}, {"lr": 2e-3}], "num_samples": 1}, "families.dense_ae.num_samples"),
    ({"space": {**SPACE, "lr": {"loguniform": [1e-2, 1e-1]}}, "points_to_evaluate": [{}]},
     "points_to_evaluate[0].lr"),  # the default 1e-3 cannot be drawn: the point must give lr
    ({"space": {"lr": 1e-3}, "points_to_evaluate": [{}]}, "families.dense_ae.points_to_evaluate"),  # nothing searched
])
def test_invalid_points_name_file_and_key(tmp_path: Path, entry: dict, key: str) -> None:
    path = _write(tmp_path, {"space": SPACE, **entry})
    with pytest.raises(PresetError) as e:
        load_preset(path)
    assert str(path) in str(e.value) and f"'{key if key.startswith('families') else 'families.dense_ae.' + key}'" \
        in str(e.value)


def test_the_study_starts_its_search_from_the_points(tmp_path: Path) -> None:
    path = _write(tmp_path, {"space": SPACE, "num_samples": 3, "points_to_evaluate": [{}]},
                  scheduler={"type": "asha"})
    space, config = _config(tmp_path, load_preset(path), 3, 2, 1)
    assert config.search_alg.suggest("t1") == {"lr": 1e-3, "batch_size": 256, "hidden": 128}
    assert space == {"weight_decay": 0.0, "epochs": 2}  # the searched keys are the searcher's
    assert config.scheduler is not None  # no repeats: ASHA as the preset says


# ---------------------------------------------------------------------- repeats
def test_repeats_are_a_grid_of_seeds_from_the_fixed_seed(tmp_path: Path) -> None:
    from ray import tune

    fixed = {"lr": 1e-3, "batch_size": 256, "hidden": 64}
    fam = load_preset(_write(tmp_path, {"space": {**fixed, "seed": 7}, "repeats": 3})).families["dense_ae"]
    assert fam.seeds() == [7, 8, 9] and fam.num_samples == 1 and fam.trials() == 3 and fam.trials(2) == 2
    assert param_space(fam, 3)["seed"] == tune.grid_search([7, 8, 9])
    fam = load_preset(_write(tmp_path, {"space": fixed, "repeats": 2, "num_samples": 2})).families["dense_ae"]
    assert fam.seeds() == [0, 1] and fam.trials() == 4  # each seed twice
    assert "seed" not in param_space(load_preset(_write(tmp_path, {"space": fixed})).families["dense_ae"], 3)


@pytest.mark.parametrize("entry, words", [
    ({"space": SPACE, "repeats": 3}, "fixed space"),
    ({"space": {"lr": 1e-3, "seed": {"choice": [0, 1]}}, "repeats": 2}, "`seed` cannot be searched"),
    ({"space": {"lr": 1e-3}, "repeats": 0}, "greater than or equal to 1"),
    ({"space": {"lr": 1e-3}, "repeats": True}, "not true or false"),
])
def test_repeats_need_a_fixed_space(tmp_path: Path, entry: dict, words: str) -> None:
    path = _write(tmp_path, entry)
    with pytest.raises(PresetError) as e:
        load_preset(path)
    assert str(path) in str(e.value) and "'families.dense_ae.repeats'" in str(e.value) and words in str(e.value)


def test_repeats_reach_the_tuner_and_every_trial_count(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("RAYSD_NO_SUCH_ROOT", raising=False)
    path = _write(tmp_path, {"space": {"lr": 1e-3, "seed": 5}, "repeats": 3, "epochs": 2},
                  dataset={"root_env": "RAYSD_NO_SUCH_ROOT"}, scheduler={"type": "asha"})
    preset = load_preset(path)
    space, config = _config(tmp_path, preset, None, 2, 1)
    assert config.search_alg is None and config.scheduler is None and config.num_samples == 1  # every seed to its end
    assert space["seed"] == {"grid_search": [5, 6, 7]}
    job = _job(tmp_path)
    plan = planning.Plan(preset, str(tmp_path / "exp"), tmp_path, "dcase2020", None, [job], {job.study: None})
    assert plan.trials(job) == 3 and plan.trials_total() == 3
    assert runner.finished_summary(plan) == "trials done per study: fan__dense_ae 0/3"
    assert search.main([str(path), "--dry-run"]) == 0  # no data: the part of the plan the preset fixes
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("dense_ae"))
    assert row.split()[2:4] == ["3", "2"]  # trials, epochs


# ---------------------------------------------------------------------- search settings
@pytest.mark.parametrize("extra, entry, key", [
    ({"search": {"algorithm": "bayes"}}, {}, "search.algorithm"),
    ({"search": {"sampler": "tpe"}}, {}, "search.sampler"),
    ({"search": 3}, {}, "search"),
    ({"search": {"n_startup_trials": -1}}, {}, "search.n_startup_trials"),
    ({"search": {"n_startup_trials": "many"}}, {}, "search.n_startup_trials"),
    ({"search": {"multivariate": "yes"}}, {}, "search.multivariate"),
    ({"search": {"constant_liar": 1}}, {}, "search.constant_liar"),
    ({"search": {"stopped_trials": "dropped"}}, {}, "search.stopped_trials"),
    ({"search": {"max_concurrent_per_study": -2}}, {}, "search.max_concurrent_per_study"),
    ({"search": {"warm_start": 1.5}}, {}, "search.warm_start"),
    ({"search": {"algorithm": "tpe_default", "constant_liar": False}}, {}, "search.constant_liar"),
    ({"search": {"algorithm": "random", "n_startup_trials": 3}}, {}, "search.n_startup_trials"),
    ({"search": {"algorithm": "grid", "warm_start": 2}}, {}, "search.warm_start"),
    ({}, {"search": {"algorithm": "nope"}}, "families.dense_ae.search.algorithm"),
    ({"search": "grid"}, {}, "families.dense_ae.space.hidden"),  # a range cannot be gridded
    ({}, {"search": "grid", "space": {"batch_size": {"choice": [128, 256]}}, "points_to_evaluate": [{}]},
     "families.dense_ae.points_to_evaluate"),
])
def test_invalid_search_settings_name_file_and_key(tmp_path: Path, extra: dict, entry: dict, key: str) -> None:
    path = _write(tmp_path, {"space": SPACE, **entry}, **extra)
    with pytest.raises(PresetError) as e:
        load_preset(path)
    assert str(path) in str(e.value) and f"'{key}'" in str(e.value)


GRID = {"lr": {"choice": [1e-4, 1e-3, 1e-2]}, "batch_size": {"choice": [128, 256]}, "weight_decay": 0.0}


def test_a_grid_trains_every_combination_of_the_choices(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("RAYSD_NO_SUCH_ROOT", raising=False)
    path = _write(tmp_path, {"space": GRID, "epochs": 2}, search="grid", scheduler={"type": "asha"},
                  dataset={"root_env": "RAYSD_NO_SUCH_ROOT"})
    preset = load_preset(path)
    fam = preset.families["dense_ae"]
    assert preset.search.algorithm == fam.search.algorithm == "grid" and not fam.search.optuna
    assert fam.num_samples == 1 and fam.grid_size() == 6 and fam.trials() == 6 and fam.trials(2) == 2
    space, config = _config(tmp_path, preset, None, 2, 4)
    assert space["lr"] == {"grid_search": [1e-4, 1e-3, 1e-2]} and space["batch_size"] == {"grid_search": [128, 256]}
    assert config.search_alg is None and config.num_samples == 1 and config.scheduler is not None
    job = _job(tmp_path)
    plan = planning.Plan(preset, str(tmp_path / "exp"), tmp_path, "dcase2020", None, [job], {job.study: None})
    assert plan.trials(job) == 6 and plan.trials_total() == 6
    assert search.main([str(path), "--dry-run"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("dense_ae"))
    assert row.split()[2:5] == ["6", "2", "grid"]  # trials, epochs, search


def test_an_entrys_search_replaces_the_presets(tmp_path: Path) -> None:
    path = _write(tmp_path, {"space": SPACE}, search={"algorithm": "grid"})
    body = yaml.safe_load(path.read_text())
    body["families"]["dense_ae"]["search"] = {"algorithm": "tpe", "n_startup_trials": 3}
    body["families"]["grid_ae"] = {"family": "dense_ae", "space": GRID}
    path.write_text(yaml.safe_dump(body))
    preset = load_preset(path)
    assert preset.families["dense_ae"].search.label() == "tpe:n_startup_trials=3"
    assert preset.families["dense_ae"].num_samples == 4 and preset.families["grid_ae"].trials() == 6
    assert load_preset(_write(tmp_path, {"space": SPACE})).families["dense_ae"].search.label() == "gp"  # the default


@pytest.mark.parametrize("settings, n_startup, multivariate, liar, pruned", [
    ({"algorithm": "tpe"}, 4, True, True, True),  # auto: a quarter of the 16 trials
    ({"algorithm": "tpe", "n_startup_trials": 7, "multivariate": False, "constant_liar": False, "stopped_trials": "complete"},
     7, False, False, False),
    ({"algorithm": "tpe_default"}, 10, None, True, False),  # TPESampler(seed) alone: Optuna's defaults
])
def test_search_settings_reach_the_sampler_and_searcher(tmp_path: Path, settings: dict, n_startup: int,
                                                        multivariate: bool | None, liar: bool, pruned: bool) -> None:
    import optuna

    preset = load_preset(_write(tmp_path, {"space": SPACE, "num_samples": 16}, search=settings))
    _, config = _config(tmp_path, preset, 16, 5, 8)
    searcher = config.search_alg
    sampler = searcher.sampler
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._n_startup_trials == n_startup
    assert sampler._multivariate is multivariate and sampler._constant_liar is liar
    assert searcher.stopped_as_pruned is pruned and searcher.epochs == 5
    assert config.max_concurrent_trials == 8 and config.reuse_actors  # one worker: the trial process is reused


def test_the_default_search_is_optunas_gp_sampler(tmp_path: Path) -> None:
    import optuna

    preset = load_preset(_write(tmp_path, {"space": SPACE, "num_samples": 16}))
    sampler = _config(tmp_path, preset, 16, 5, 8)[1].search_alg.sampler
    assert isinstance(sampler, optuna.samplers.GPSampler) and sampler._n_startup_trials == 4  # auto, as for tpe


def test_random_search_cap_and_warm_points_reach_the_tuner(tmp_path: Path) -> None:
    import optuna

    path = _write(tmp_path, {"space": SPACE, "num_samples": 6, "points_to_evaluate": [{}]},
                  search={"algorithm": "random", "max_concurrent_per_study": 2, "warm_start": 2})
    warm = [{"lr": 3e-3, "batch_size": 128, "hidden": 32}]
    _, config = _config(tmp_path, load_preset(path), 6, 5, 8, warm)
    assert isinstance(config.search_alg.sampler, optuna.samplers.RandomSampler)
    assert config.max_concurrent_trials == 2  # the cap under the study's share of 8
    assert config.search_alg.points == [{"lr": 1e-3, "batch_size": 256, "hidden": 128}, *warm]


def test_an_entry_may_hold_its_own_resources(tmp_path: Path, capsys) -> None:
    """A small family shares a GPU: its entry's fraction replaces the preset's whole GPU, the command line overrides
    both, and the dry run says how many of its trials share one GPU."""
    path = _write(tmp_path, {"space": SPACE, "resources": {"gpus_per_worker": 0.25, "cpus_per_worker": 2}},
                  resources={"workers": 1, "cpus_per_worker": 4, "gpus_per_worker": 1}, dataset={"root_env": "NOPE"})
    preset = load_preset(path)
    args = search.parse_args([str(path)])
    assert planning.resources(preset, "dense_ae", args).gpus_per_worker == 0.25
    assert planning.resources(preset, None, args).gpus_per_worker == 1
    assert planning.resources(preset, "dense_ae", search.parse_args([str(path), "--gpus-per-worker", "0"])).use_gpu is False
    assert search.main([str(path), "--dry-run"]) == 0
    assert "1 worker(s) x 2 CPU + 0.25 GPU (4 trials per GPU)" in capsys.readouterr().out
    body = yaml.safe_load(path.read_text())
    body["families"]["dense_ae"]["resources"] = {"workers": 2, "gpus_per_worker": 0.5}
    path.write_text(yaml.safe_dump(body))
    with pytest.raises(PresetError, match="families.dense_ae.resources.gpus_per_worker"):
        load_preset(path)


def test_the_committed_schema_is_the_presets_schema_and_every_preset_follows_it() -> None:
    """``search_spaces/preset.schema.json`` (what editors read) is ``python -m raysd.presets --schema``; every shipped
    preset validates against it and names it."""
    import json

    import jsonschema

    from raysd.preset_schema import schema
    from raysd.presets import SEARCH_SPACES

    committed = json.loads((SEARCH_SPACES / "preset.schema.json").read_text())
    assert committed == json.loads(json.dumps(schema())), "regenerate: python -m raysd.presets --schema > " \
                                                          "search_spaces/preset.schema.json"
    for path in sorted(SEARCH_SPACES.glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("# yaml-language-server: $schema=preset.schema.json"), path
        jsonschema.validate(yaml.safe_load(text), committed)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"families": {"dense_ae": {"epochs": 0}}}, committed)


def test_num_samples_on_the_command_line_is_trials_per_study_even_for_a_grid(tmp_path: Path, monkeypatch,
                                                                             capsys) -> None:
    """A 6-point grid with ``--num-samples 2`` trains 2 of its points (a seeded draw), and the dry run says 2; a
    repeats entry trains its first seeds."""
    monkeypatch.delenv("RAYSD_NO_SUCH_ROOT", raising=False)
    path = _write(tmp_path, {"space": GRID, "epochs": 2}, search="grid", dataset={"root_env": "RAYSD_NO_SUCH_ROOT"})
    preset = load_preset(path)
    fam = preset.families["dense_ae"]
    assert fam.trials(2) == 2 and fam.trials() == 6 and len(fam.grid_points()) == 6
    run = StudyRun(preset, fam, 2, 2, 4, 3)
    space, config = tune_config(_job(tmp_path), run)
    assert config.num_samples == 2 and "lr" not in space and space["weight_decay"] == 0.0
    points = config.search_alg._points_to_evaluate  # Tune's BasicVariantGenerator: the grid points it will run
    assert len(points) == 2 and all(p in fam.grid_points() for p in points) and points[0] != points[1]
    assert search.main([str(path), "--dry-run", "--num-samples", "2"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("dense_ae"))
    assert row.split()[2] == "2"
    seeds = load_preset(_write(tmp_path, {"space": {"lr": 1e-3, "seed": 5}, "repeats": 3})).families["dense_ae"]
    assert seeds.trials(2) == 2 and [p["seed"] for p in seeds.grid_points()] == [5, 6, 7]
