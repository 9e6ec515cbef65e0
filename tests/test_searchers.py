"""A study's searcher: what Optuna is told of trials the scheduler stops early, TPE's start-up trials, and the
warm start from finished sibling studies (no Ray cluster: the searcher objects are driven directly)."""

from __future__ import annotations

import math
from pathlib import Path

import optuna
import pytest

from raysd import artifacts, searchers
from raysd.presets import FamilySearch
from raysd.search_settings import SearchSettings, read_settings

TPE = read_settings("tpe")  # the tests of TPE's options (the default search is gp)
SPACE = {"lr": {"loguniform": [1e-4, 1e-2]}, "batch_size": {"choice": [128, 256]}, "epochs": 4}


SEARCHED = {"lr": {"loguniform": [1e-4, 1e-2]}, "batch_size": {"choice": [128, 256]}}


def _searcher(settings: SearchSettings, epochs: int = 4, url: str | None = None, points: list[dict] | None = None):
    spec = searchers.SearcherSpec(settings, "sel_auc", "max", num_samples=8, epochs=epochs, seed=0)
    s = searchers.make_searcher(spec, "s", SEARCHED, url, points or [])
    assert s is not None
    assert s.set_search_properties("sel_auc", "max", {"epochs": epochs})  # what Tune does first
    return s


def _run(s, trial_id: str, values: list[float], epochs: int = 4, report_epoch: int | None = None) -> None:
    """Tune's calls for a trial that reports ``values`` and ends after the last: the result that ends it goes to
    ``on_trial_complete`` only (Tune gives a stopping result to no ``on_trial_result``)."""
    s.suggest(trial_id)
    for i, v in enumerate(values, start=1):
        result = {"sel_auc": v, "training_iteration": i, "epoch": report_epoch or i}
        if i < len(values):
            s.on_trial_result(trial_id, result)
        else:
            s.on_trial_complete(trial_id, result)


@pytest.mark.parametrize("stopped, state", [("pruned", optuna.trial.TrialState.PRUNED),
                                            ("complete", optuna.trial.TrialState.COMPLETE)])
def test_a_trial_stopped_early_is_told_pruned_with_its_last_value(stopped: str, state) -> None:
    s = _searcher(read_settings({"algorithm": "tpe", "stopped_trials": stopped}))
    _run(s, "stopped", [0.6, 0.7])  # ASHA stopped it after 2 of 4 epochs
    _run(s, "finished", [0.5, 0.55, 0.6, 0.65])
    _run(s, "ended", [0.8], report_epoch=4)  # a resumed trial that had ended reports its last epoch once
    stopped_trial, finished, ended = s.study.trials
    assert stopped_trial.state == state and stopped_trial.value == 0.7
    assert stopped_trial.intermediate_values == ({1: 0.6, 2: 0.7} if stopped == "pruned" else {1: 0.6})
    assert finished.state == ended.state == optuna.trial.TrialState.COMPLETE and finished.value == 0.65
    s.on_trial_complete("stopped", {"sel_auc": 0.7, "training_iteration": 2})  # a second completion: ignored


def test_errors_and_tpe_default_keep_rays_handling() -> None:
    s = _searcher(read_settings("tpe_default"))
    assert s.stopped_as_pruned is False
    _run(s, "stopped", [0.6, 0.7])
    s.suggest("failed")
    s.on_trial_complete("failed", None, error=True)
    stopped, failed = s.study.trials
    assert stopped.state == optuna.trial.TrialState.COMPLETE and stopped.value == 0.7  # Ray's default
    assert failed.state == optuna.trial.TrialState.FAIL


def test_infeasible_and_diverged_configurations_are_pruned_where_they_ended() -> None:
    """TPE counts them among the bad configurations (a FAIL would leave it free to propose them again), a diverged
    one ranked by how far it got."""
    s = _searcher(TPE)
    s.suggest("infeasible")
    s.on_trial_complete("infeasible", {"sel_auc": math.nan, "epoch": 0, "infeasible": "needs at least 2 classes"})
    s.suggest("diverged")
    s.on_trial_result("diverged", {"sel_auc": 0.6, "epoch": 1, "training_iteration": 1})
    s.on_trial_complete("diverged", {"sel_auc": math.nan, "epoch": 2, "failed": "training loss became nan"})
    infeasible, diverged = s.study.trials
    assert infeasible.state == diverged.state == optuna.trial.TrialState.PRUNED
    assert infeasible.intermediate_values == {} and infeasible.user_attrs["raysd_ended"] == "needs at least 2 classes"
    assert diverged.intermediate_values == {1: 0.6}


def test_choices_of_lists_travel_as_json_inside_optuna() -> None:
    spec = searchers.SearcherSpec(read_settings("random"), "sel_auc", "max", 4, 2)
    s = searchers.make_searcher(spec, "s", {"hidden": {"choice": [[16], [32, 16]]}}, None, [{"hidden": [32, 16]}])
    assert s is not None
    assert s.suggest("a") == {"hidden": [32, 16]}  # the point first, then the sampler
    assert s.suggest("b")["hidden"] in ([16], [32, 16])


def test_grid_has_no_searcher_and_random_is_optunas() -> None:
    spec = searchers.SearcherSpec(read_settings("grid"), "sel_auc", "max", 8, 4)
    assert searchers.make_searcher(spec, "s", SEARCHED) is None and searchers.make_sampler(spec.settings, 8, 0) is None
    assert isinstance(searchers.make_sampler(read_settings("random"), 8, 0), optuna.samplers.RandomSampler)


@pytest.mark.parametrize("num_samples, startup", [(4, 2), (12, 3), (16, 4), (36, 9), (100, 10)])
def test_auto_startup_trials_scale_with_the_study(num_samples: int, startup: int) -> None:
    assert SearchSettings().startup_trials(num_samples) == startup == TPE.startup_trials(num_samples)
    assert read_settings({"algorithm": "tpe", "n_startup_trials": 5}).startup_trials(num_samples) == 5


def test_labels_name_what_differs_from_the_defaults() -> None:
    assert read_settings(None).label() == "gp" and read_settings("random").label() == "random"
    assert read_settings({"algorithm": "tpe", "constant_liar": False, "warm_start": 2}).label() == \
        "tpe:constant_liar=false,warm_start=2"


def test_the_study_cap_limits_its_share() -> None:
    assert searchers.study_concurrency(read_settings({"max_concurrent_per_study": 2}), 8) == 2
    assert searchers.study_concurrency(read_settings({"max_concurrent_per_study": 16}), 8) == 8
    assert searchers.study_concurrency(SearchSettings(), 8) == 8


# ---------------------------------------------------------------------- warm start
def test_warm_start_points_are_the_best_distinct_configurations_in_the_space() -> None:
    results = [({"lr": 1e-3, "batch_size": 128, "epochs": 4}, 0.70),
               ({"lr": 2e-3, "batch_size": 256, "epochs": 4}, 0.90),
               ({"lr": 2e-3, "batch_size": 256, "epochs": 4}, 0.85),  # the same configuration again
               ({"lr": 5e-2, "batch_size": 256, "epochs": 4}, 0.99),  # outside today's space
               ({"lr": 1e-3, "batch_size": 64}, 0.98),  # not a choice
               ({"batch_size": 128}, 0.97),  # lr missing
               ({"lr": 3e-3, "batch_size": 128}, math.nan),
               ({"lr": 4e-3, "batch_size": 128}, 0.80)]
    assert searchers.warm_start_points(results, SPACE, 2, "max") == [{"lr": 2e-3, "batch_size": 256},
                                                                     {"lr": 4e-3, "batch_size": 128}]
    assert searchers.warm_start_points(results, SPACE, 1, "min") == [{"lr": 1e-3, "batch_size": 128}]


def _record(exp: Path, study: str, trial: str, lr: float, value: float, status: str = "finished") -> None:
    artifacts.TrialRecord(study=study, family="dense_ae", machine_type=study.split("__")[0], trial_id=trial,
                          params={"lr": lr, "batch_size": 128, "epochs": 4}, status=status,
                          metrics={"sel_auc": value}).write(str(exp))


def test_warm_start_reads_the_finished_trials_of_finished_siblings(tmp_path: Path, caplog) -> None:
    exp = tmp_path / "exp"
    _record(exp, "fan__dense_ae", "a", 1e-3, 0.7)
    _record(exp, "fan__dense_ae", "b", 2e-3, 0.9, status="failed")
    _record(exp, "pump__dense_ae", "c", 3e-3, 0.8)
    _record(exp, "pump__dense_ae", "d", 4e-3, 0.6)
    search = FamilySearch("dense_ae", {k: v for k, v in SPACE.items() if k != "epochs"}, 4, 4, entry="dense_ae",
                          points_to_evaluate=[{"lr": 1e-3, "batch_size": 128}],
                          search=read_settings({"warm_start": 5}))
    spec = searchers.SearcherSpec(search.search, "sel_auc", "max", num_samples=3, epochs=4)
    got = searchers.warm_start(spec, search, str(exp), "valve__dense_ae", ["fan__dense_ae", "pump__dense_ae"])
    assert got == [{"lr": 3e-3, "batch_size": 128}, {"lr": 4e-3, "batch_size": 128}]  # 3 trials: 1 point + 2
    with caplog.at_level("INFO"):
        assert searchers.warm_start(spec, search, str(exp), "valve__dense_ae", []) == []
    assert "no finished sibling study" in caplog.text
    off = searchers.SearcherSpec(TPE, "sel_auc", "max", 3, 4)
    assert searchers.warm_start(off, search, str(exp), "valve__dense_ae", ["fan__dense_ae"]) == []


def test_a_resumed_searcher_told_again_of_a_stopped_trial_keeps_going(tmp_path: Path) -> None:
    """Tune's snapshot predates Optuna pruning the trial: the resumed searcher is told of it again, and fails the
    trial it asked for after the snapshot (no Tune trial will ever report it)."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    first = _searcher(TPE, url=url)
    first.suggest("t1")
    first.save(str(tmp_path / "snapshot.pkl"))
    first.suggest("t-after-the-snapshot")
    result = {"sel_auc": 0.7, "training_iteration": 1, "epoch": 1}
    first.on_trial_complete("t1", result)  # stopped after its first epoch
    resumed = _searcher(TPE, url=url)
    resumed.restore(str(tmp_path / "snapshot.pkl"))
    resumed.on_trial_complete("t1", result)
    assert "lr" in resumed.suggest("t2")
    study = optuna.load_study(study_name="s", storage=url)
    assert [t.state.name for t in study.trials] == ["PRUNED", "FAIL", "RUNNING"] and study.trials[0].value == 0.7


def test_points_are_the_searchers_first_trials_and_a_resume_does_not_repeat_them(tmp_path: Path) -> None:
    """A restored searcher comes from Tune's pickled copy and its snapshot: the points already in the Optuna study
    are not enqueued again."""
    points = [{"lr": 1e-3, "batch_size": 256}, {"lr": 3e-4, "batch_size": 128}]
    url = f"sqlite:///{tmp_path / 's.db'}"
    first = _searcher(TPE, url=url, points=points)
    got = [first.suggest("t1")]
    first.on_trial_complete("t1", {"sel_auc": 0.7, "training_iteration": 4, "epoch": 4})
    first.save(str(tmp_path / "snapshot.pkl"))  # Tune's snapshot; then the driver stops
    resumed = _searcher(TPE, url=url, points=points)
    resumed.restore(str(tmp_path / "snapshot.pkl"))
    got += [resumed.suggest(f"t{i}") for i in (2, 3, 4)]
    assert got[:2] == points and got[2] not in points and got[3] not in points
    study = optuna.load_study(study_name="s", storage=url)
    assert sum("fixed_params" in t.system_attrs for t in study.trials) == 2
