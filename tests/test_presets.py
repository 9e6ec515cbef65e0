"""A preset entry's ``points_to_evaluate`` (the first trials of a search) and ``repeats`` (one configuration
trained with several seeds): checked when the preset is read, and carried into each study's ``Tuner``."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from raysd import search
from raysd.presets import PresetError, load_preset, tune_space
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


def test_points_are_the_searchers_first_trials_and_a_resume_does_not_repeat_them(tmp_path: Path) -> None:
    """``Tuner.restore`` hands the search space to a fresh searcher (which enqueues its points) before it
    restores the snapshot: points already in the Optuna study must not be enqueued again."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from raysd.tune_optuna import ResumableOptunaSearch

    points = [{"lr": 1e-3, "batch_size": 256}, {"lr": 3e-4, "batch_size": 128}]
    space = {"lr": tune.loguniform(1e-4, 1e-2), "batch_size": tune.choice([128, 256]), "epochs": 3}

    def run(cls, db: str) -> list[dict]:
        url = f"sqlite:///{tmp_path / db}"

        def searcher() -> OptunaSearch:
            s = cls(metric="sel_auc", mode="max", study_name="s", storage=optuna.storages.RDBStorage(url),
                    sampler=optuna.samplers.TPESampler(seed=0), points_to_evaluate=points)
            s.set_search_properties("sel_auc", "max", space)  # what Tuner.fit does first
            return s

        first = searcher()
        got = [first.suggest("t1")]
        first.on_trial_complete("t1", {"sel_auc": 0.7, "training_iteration": 3})
        first.save(str(tmp_path / f"{db}.pkl"))  # Tune's snapshot; then the driver stops
        resumed = searcher()
        resumed.restore(str(tmp_path / f"{db}.pkl"))
        got += [resumed.suggest(f"t{i}") for i in (2, 3, 4)]
        return got

    got = run(ResumableOptunaSearch, "resumable.db")
    assert got[:2] == points and got[2] not in points and got[3] not in points
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'resumable.db'}")
    assert sum("fixed_params" in t.system_attrs for t in study.trials) == 2
    # plain OptunaSearch enqueues the points again on resume and trains them twice
    assert run(OptunaSearch, "plain.db")[1:] == [points[1], points[0], points[1]]


def test_build_tuner_starts_the_search_from_the_points(tmp_path: Path) -> None:
    path = _write(tmp_path, {"space": SPACE, "num_samples": 3, "points_to_evaluate": [{}]},
                  scheduler={"type": "asha"})
    preset = load_preset(path)
    tuner = search.build_tuner(_job(tmp_path), preset, 3, 2, 1, 0, None, False)
    searcher = tuner._local_tuner._tune_config.search_alg
    assert searcher._points_to_evaluate == [{"lr": 1e-3, "batch_size": 256, "hidden": 128}]
    assert tuner._local_tuner._tune_config.scheduler is not None  # no repeats: ASHA as the preset says


# ---------------------------------------------------------------------- repeats
def test_repeats_are_a_grid_of_seeds_from_the_fixed_seed(tmp_path: Path) -> None:
    from ray import tune

    fixed = {"lr": 1e-3, "batch_size": 256, "hidden": 64}
    fam = load_preset(_write(tmp_path, {"space": {**fixed, "seed": 7}, "repeats": 3})).families["dense_ae"]
    assert fam.seeds() == [7, 8, 9] and fam.num_samples == 1 and fam.trials() == 3 and fam.trials(2) == 6
    assert tune_space(fam)["seed"] == tune.grid_search([7, 8, 9])
    fam = load_preset(_write(tmp_path, {"space": fixed, "repeats": 2, "num_samples": 2})).families["dense_ae"]
    assert fam.seeds() == [0, 1] and fam.trials() == 4  # each seed twice
    assert "seed" not in tune_space(load_preset(_write(tmp_path, {"space": fixed})).families["dense_ae"])


@pytest.mark.parametrize("entry, words", [
    ({"space": SPACE, "repeats": 3}, "fixed space"),
    ({"space": {"lr": 1e-3, "seed": {"choice": [0, 1]}}, "repeats": 2}, "`seed` cannot be searched"),
    ({"space": {"lr": 1e-3}, "repeats": 0}, "positive integer"),
    ({"space": {"lr": 1e-3}, "repeats": True}, "positive integer"),
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
    tuner = search.build_tuner(_job(tmp_path), preset, 1, 2, 1, 0, None, False)
    config = tuner._local_tuner._tune_config
    assert config.search_alg is None and config.scheduler is None and config.num_samples == 1  # every seed to its end
    assert tuner._local_tuner._param_space["seed"] == {"grid_search": [5, 6, 7]}
    job = _job(tmp_path)
    plan = search.Plan(preset, str(tmp_path / "exp"), tmp_path, "dcase2020", None, [job], {job.study: 2})
    assert plan.trials(job) == 6 and plan.trials_total() == 6
    assert search.finished_summary(plan) == "trials done per study: fan__dense_ae 0/6"
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
    assert fam.num_samples == 1 and fam.grid_size() == 6 and fam.trials() == 6 and fam.trials(2) == 12
    assert tune_space(fam)["lr"] == {"grid_search": [1e-4, 1e-3, 1e-2]}
    tuner = search.build_tuner(_job(tmp_path), preset, 1, 2, 4, 0, None, False)
    config = tuner._local_tuner._tune_config
    assert config.search_alg is None and config.num_samples == 1 and config.scheduler is not None
    assert tuner._local_tuner._param_space["batch_size"] == {"grid_search": [128, 256]}
    job = _job(tmp_path)
    plan = search.Plan(preset, str(tmp_path / "exp"), tmp_path, "dcase2020", None, [job], {job.study: 1})
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
    assert load_preset(_write(tmp_path, {"space": SPACE})).families["dense_ae"].search.label() == "tpe"


@pytest.mark.parametrize("settings, n_startup, multivariate, liar, pruned", [
    ({}, 4, True, True, True),  # auto: a quarter of the 16 trials
    ({"n_startup_trials": 7, "multivariate": False, "constant_liar": False, "stopped_trials": "complete"},
     7, False, False, False),
    ({"algorithm": "tpe_default"}, 10, None, True, False),  # TPESampler(seed) alone: Optuna's defaults
])
def test_search_settings_reach_the_sampler_and_searcher(tmp_path: Path, settings: dict, n_startup: int,
                                                        multivariate: bool | None, liar: bool, pruned: bool) -> None:
    import optuna

    preset = load_preset(_write(tmp_path, {"space": SPACE, "num_samples": 16}, search=settings))
    tuner = search.build_tuner(_job(tmp_path), preset, 16, 5, 8, 3, None, False)
    searcher = tuner._local_tuner._tune_config.search_alg
    sampler = searcher._sampler
    assert isinstance(sampler, optuna.samplers.TPESampler) and sampler._n_startup_trials == n_startup
    assert sampler._multivariate is multivariate and sampler._constant_liar is liar
    assert searcher._stopped_as_pruned is pruned and searcher._epochs == 5
    assert tuner._local_tuner._tune_config.max_concurrent_trials == 8


def test_random_search_cap_and_warm_points_reach_the_tuner(tmp_path: Path) -> None:
    import optuna

    path = _write(tmp_path, {"space": SPACE, "num_samples": 6, "points_to_evaluate": [{}]},
                  search={"algorithm": "random", "max_concurrent_per_study": 2, "warm_start": 2})
    warm = [{"lr": 3e-3, "batch_size": 128, "hidden": 32}]
    tuner = search.build_tuner(_job(tmp_path), load_preset(path), 6, 5, 8, 3, None, False, warm)
    config = tuner._local_tuner._tune_config
    assert isinstance(config.search_alg._sampler, optuna.samplers.RandomSampler)
    assert config.max_concurrent_trials == 2  # the cap under the study's share of 8
    assert config.search_alg._points_to_evaluate == [{"lr": 1e-3, "batch_size": 256, "hidden": 128}, *warm]
