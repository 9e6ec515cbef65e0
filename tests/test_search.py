"""The search: presets validate, bad presets name the key, and real Ray runs (tiny trials on CPU).

The Ray tests start real clusters, so they are slow on 2 cores; they share one tiny data set and keep
every trial to one or two epochs.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raysd import cluster, runner, search, studies
from raysd import plan as planning
from raysd.presets import SEARCH_SPACES, PresetError, load_preset
from raysd.trial import StudyJob

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("path", sorted(SEARCH_SPACES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_validates(path: Path) -> None:
    preset = load_preset(path)
    assert preset.families
    assert preset.metric in ("sel_auc", "sel_pauc", "sel_official", "heldout_loss")


def _write(tmp_path: Path, body: dict) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


BASE = {"dataset": {"synthetic": "tiny"}, "families": {"dense_ae": {"space": {"lr": {"loguniform": [1e-4, 1e-2]}}}}}


@pytest.mark.parametrize("change, key", [
    ({"families": {"dense_ae": {"space": {"learning_rate": 0.1}}}}, "learning_rate"),
    ({"families": {"dense_ae": {"space": {"lr": {"loguniform": [1e-2, 1e-4]}}}}}, "lr"),
    ({"families": {"dense_ae": {"space": {"lr": {"loguniform": [0, 1e-2]}}}}}, "lr"),
    ({"families": {"dense_ae": {"space": {"batch_size": {"choice": [32, "big"]}}}}}, "batch_size"),
    ({"families": {"dense_ae": {"space": {"crop": {"choice": ["none", "wide"]}}}}}, "crop"),
    ({"families": {"dense_ae": {"space": {"lr": {"normal": [0, 1]}}}}}, "lr"),
    ({"families": {"no_such_family": {}}}, "no_such_family"),
    ({"metric": "accuracy"}, "metric"),
    ({"scheduler": {"type": "pbt"}}, "scheduler.type"),
    ({"resources": {"workers": 2, "gpus_per_worker": 0.5}}, "resources.gpus_per_worker"),
    ({"features": {"n_mel": 64}}, "features.n_mel"),
    ({"epochs_total": 3}, "epochs_total"),
])
def test_invalid_preset_names_file_and_key(tmp_path: Path, change: dict, key: str) -> None:
    body = {**BASE, **change}
    path = _write(tmp_path, body)
    with pytest.raises(PresetError) as e:
        load_preset(path)
    msg = str(e.value)
    assert str(path) in msg and key in msg


def test_missing_data_root_explains_how_to_get_data(tmp_path: Path, capsys) -> None:
    assert search.main(["dcase20", "--storage-path", str(tmp_path / "exp")]) == 2
    err = capsys.readouterr().err
    assert "--data-root" in err and "raysd.data.download" in err and "demo" in err
    assert not (tmp_path / "exp").exists()


def test_dry_run_without_data_prints_what_the_preset_fixes(capsys) -> None:
    """A real preset's dry run needs no data: families, trials, epochs and resources; the machine types are
    said to come from the data, and the note says how to get it."""
    assert search.main(["dcase20", "--dry-run", "--gpus-per-worker", "0", "--cpus-per-worker", "2"]) == 0
    out, err = capsys.readouterr()
    assert "machine types come from the data" in out
    for fam in load_preset("dcase20").families:
        assert fam in out
    assert "dense_ae" in out and " 16 " in out and " 100 " in out  # dcase20: 16 trials of 100 epochs
    assert "1 worker(s) x 2 CPU" in out and "GPU" not in out.split("resources per trial")[1]
    assert "--data-root" in err and "raysd.data.download" in err


def test_cli_lines_reach_the_user_under_python_m(tmp_path: Path) -> None:
    """Run as ``python -m raysd.search`` the module is ``__main__``: its log lines must still be raysd's."""
    preset = _write(tmp_path, {**BASE, "name": "t"})
    done = subprocess.run([sys.executable, "-m", "raysd.search", str(preset), "--dry-run", "--cache-dir",
                           str(tmp_path / "cache")], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[raysd] no data root given: generating synthetic machine sounds" in done.stdout


def test_resource_overrides_reach_every_study(tiny_root: Path, tmp_path: Path, capsys) -> None:
    args = ["dcase20", "--data-root", str(tiny_root), "--dry-run", "--cache-dir", str(tmp_path / "c"),
            "--machine-types", "fan", "--families", "dense_ae", "conv_ae"]
    assert search.main(args) == 0
    assert "1 worker(s) x 4 CPU + 1 GPU" in capsys.readouterr().out  # the preset's
    assert search.main(args + ["--gpus-per-worker", "0", "--cpus-per-worker", "1", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("2 worker(s) x 1 CPU\n") == 2 and "GPU\n" not in out
    plan = planning.make_plan(load_preset("dcase20"), search.parse_args(args + ["--gpus-per-worker", "0"]))
    assert {(j.use_gpu, j.gpus_per_worker, j.cpus_per_worker) for j in plan.studies} == {(False, 0.0, 4.0), (False, 0.0, 2.0)}
    assert search.main(args + ["--workers", "2", "--gpus-per-worker", "0.5"]) == 2
    assert "--gpus-per-worker: fractional GPUs are only allowed for single-worker trials" in capsys.readouterr().err


def test_dry_run_prints_studies_and_totals(tiny_root: Path, tmp_path: Path, capsys) -> None:
    rc = search.main(["demo", "--data-root", str(tiny_root), "--dry-run", "--cache-dir", str(tmp_path / "c"),
                      "--storage-path", str(tmp_path / "exp")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "fan__dense_ae" in out and "valve__conv_ae" in out
    assert "all__adacos_knn" in out and "total: 5 studies, 10 trials" in out
    assert not (tmp_path / "exp").exists()


# ---------------------------------------------------------------------------------------------------
# Real Ray runs


def _preset(tmp_path: Path, families: dict, **extra) -> Path:
    body = {
        "name": "t", "dataset": {"layout": "auto"}, "rule": "2020",
        "features": {"sample_rate": 16000, "n_fft": 1024, "hop_length": 512, "n_mels": 64, "clip_seconds": 3.0},
        "metric": "sel_auc", "seed": 0, "scheduler": {"type": "none"}, "max_failures": 1,
        "resources": {"workers": 1, "cpus_per_worker": 1}, "families": families, **extra,
    }
    p = tmp_path / "preset.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


def _search_cmd(preset: Path, root: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "raysd.search", str(preset), "--data-root", str(root),
            "--cache-dir", str(tmp_path / "cache"), "--storage-path", str(tmp_path / "exp"),
            "--results-dir", str(tmp_path / "results"), *extra]


def _story(proc: subprocess.CompletedProcess) -> str:
    """What a failed search said: its own lines and errors, then the tail of its output."""
    lines = (proc.stdout + proc.stderr).splitlines()
    said = [ln for ln in lines if "[raysd]" in ln or "Error" in ln or "error:" in ln]
    return "\n".join(said[-60:]) + "\n---\n" + "\n".join(lines[-40:])


def _records(exp: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for f in sorted((exp / "trials").glob("*/*.json")):
        out.setdefault(f.parent.name, []).append(json.loads(f.read_text()))
    return out


@pytest.mark.slow
def test_demo_end_to_end_with_ddp_and_resume(tiny_root: Path, tmp_path: Path) -> None:
    """2 families x 2 trials, trials of 2 DDP workers (gloo); the driver is interrupted after the first finished
    trial and resumed; every requested trial exists exactly once."""
    fams = {
        "dense_ae": {"num_samples": 2, "epochs": 2, "space": {"lr": {"loguniform": [1e-3, 3e-3]}, "batch_size": 512}},
        "conv_ae": {"num_samples": 2, "epochs": 2, "space": {"lr": {"loguniform": [1e-3, 3e-3]}, "batch_size": 64, "hop": 44}},
    }
    preset = _preset(tmp_path, fams, machine_types=["fan"])
    exp = tmp_path / "exp" / "t"
    cmd = _search_cmd(preset, tiny_root, tmp_path, "--workers", "2", "--cpus-per-worker", "0.9")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    deadline = time.time() + 900
    try:
        while time.time() < deadline and proc.poll() is None:
            if any(r["status"] == "finished" for rs in _records(exp).values() for r in rs):
                break
            time.sleep(2)
        assert proc.poll() is None, f"search ended before it could be interrupted:\n{proc.stdout.read()}"
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    said = proc.stdout.read()
    # like a tool, not a crash: exit 130, one line with what finished and the exact command that resumes
    assert proc.returncode == 130, said[-5000:]
    (line,) = [ln for ln in said.splitlines() if ln.startswith("[raysd] interrupted")]
    assert "fan__dense_ae" in line and "fan__conv_ae" in line
    assert line.endswith(shlex.join(["python", "-m", "raysd.search", *cmd[3:], "--resume"]))
    assert "Traceback" not in said.split("[raysd] interrupted")[1]
    before = _records(exp)
    assert 1 <= sum(len(v) for v in before.values()) < 4

    done = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, _story(done)
    records = _records(exp)
    assert sorted(records) == ["fan__conv_ae", "fan__dense_ae"]
    for study, rs in records.items():
        ids = [r["trial_id"] for r in rs]
        assert len(ids) == 2 == len(set(ids)), (study, ids)
        for r in rs:
            assert r["status"] == "finished", r
            assert r["workers"] == 2
            assert 0.0 <= r["metrics"]["sel_auc"] <= 1.0
            ck = Path(r["checkpoint"])
            scores = __import__("pandas").read_csv(ck / "scores_test.csv")
            assert set(scores["half"]) == {"selection", "report"}
            assert scores["score"].notna().all()
            train_scores = __import__("pandas").read_csv(ck / "scores_train.csv")
            assert (train_scores["split"] == "train").all() and len(train_scores) > 0
    # the trials that had finished before the interruption were not run again
    for study, rs in before.items():
        for r in rs:
            again = [x for x in records[study] if x["trial_id"] == r["trial_id"]]
            assert again and again[0]["checkpoint"] == r["checkpoint"]
    assert (tmp_path / "exp" / "t" / "optuna" / "fan__dense_ae.db").exists()
    assert (tmp_path / "results" / "leaderboard.csv").exists()


@pytest.mark.slow
def test_first_shot_and_dataset_scope_studies_end_to_end(tiny23_root: Path, tmp_path: Path) -> None:
    """A first-shot preset on the 2023 layout: dense_ae trains one model per machine type with one configuration,
    id_classifier one model for both types on their attributes; each trial ranks and joins the ensembles of both
    types, and the chosen ensembles score audio files as the leaderboard did."""
    import pandas as pd
    import torch

    from raysd.score import score_paths

    fams = {
        "dense_ae": {"num_samples": 2, "epochs": 1, "space": {"lr": {"loguniform": [1e-4, 1e-2]}, "batch_size": 512}},
        "id_classifier": {"num_samples": 1, "epochs": 1, "space": {
            "scope": "dataset", "labels": "attribute", "score": "knn", "batch_size": 64, "patch_hop": 30,
            "precise_bn": 512}},
    }
    preset = _preset(tmp_path, fams, machine_types=["fan", "valve"], rule="2022", metric="sel_official",
                     first_shot=True)
    done = subprocess.run(_search_cmd(preset, tiny23_root, tmp_path), cwd=tmp_path, env=ENV, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, _story(done)
    said = done.stdout + done.stderr
    assert "all__id_classifier: " in said and "classes (attribute) over 2 machine type(s)" in said
    assert "all__dense_ae (fan): 2 classes (section) over 1 machine type(s)" in said
    records = _records(tmp_path / "exp" / "t")
    assert sorted(records) == ["all__dense_ae", "all__id_classifier"]
    dense, (clf,) = records["all__dense_ae"][0], records["all__id_classifier"]
    assert len(records["all__dense_ae"]) == 2
    assert (dense["scope"], clf["scope"]) == ("first_shot", "dataset")
    assert dense["machine_types"] == clf["machine_types"] == ["fan", "valve"] and dense["status"] == "finished"
    state = torch.load(Path(dense["checkpoint"]) / "state.pt", weights_only=True)
    assert sorted(state["parts"]) == ["fan", "valve"]  # one model per machine type
    for r in (dense, clf):
        scores = pd.read_csv(Path(r["checkpoint"]) / "scores_test.csv")
        assert set(scores["machine_type"]) == {"fan", "valve"} and scores["score"].notna().all()

    board = pd.read_csv(tmp_path / "results" / "leaderboard.csv")
    assert sorted(zip(board["machine_type"], board["family"], board["scope"])) == [
        ("fan", "dense_ae", "first_shot"), ("fan", "dense_ae", "first_shot"), ("fan", "id_classifier", "dataset"),
        ("valve", "dense_ae", "first_shot"), ("valve", "dense_ae", "first_shot"), ("valve", "id_classifier", "dataset")]
    # each type's figure of the configuration chosen on the other type, beside the one chosen on both
    first = pd.read_csv(tmp_path / "results" / "first_shot.csv", dtype={"in_sample_trial": str, "loto_trial": str})
    ids = {r["trial_id"] for r in records["all__dense_ae"]}
    mine = first[first["study"] == "all__dense_ae"].set_index("machine_type")
    assert sorted(mine.index) == ["fan", "valve"] and set(mine["loto_trial"]) <= ids
    assert mine["loto_report_official"].between(0, 1).all() and mine["in_sample_report_official"].between(0, 1).all()
    assert "leave one type out" in (tmp_path / "results" / "summary.md").read_text()
    assert board["rank"].notna().all()
    ens = pd.read_csv(tmp_path / "results" / "ensembles.csv")
    fam_best = ens[ens["kind"] == "family-best"].groupby("machine_type")["members"].first()
    assert all("dense_ae/" in m and "id_classifier/" in m for m in fam_best[["fan", "valve"]])
    doc = json.loads((tmp_path / "results" / "ensemble.json").read_text())["machine_types"]
    per_clip = pd.read_csv(tmp_path / "results" / "ensemble_scores.csv")
    for mt in ("fan", "valve"):
        files = per_clip[(per_clip["machine_type"] == mt) & (per_clip["split"] == "test")].head(6)
        got, problems = score_paths(tmp_path / "results" / "ensemble.json",
                                    [str(tiny23_root / f) for f in files["file"]], device="cpu")
        assert not problems and len(got) == 6, (doc[mt]["ensemble"], problems)
        want = dict(zip(files["file"].map(lambda f: Path(f).name), files["score"]))
        assert [want[Path(f).name] for f in got["file"]] == pytest.approx(got["score"].tolist(), rel=1e-4, abs=1e-4)


@pytest.mark.slow
def test_a_gpu_preset_runs_on_cpu_with_the_overrides(tiny_root: Path, tmp_path: Path) -> None:
    """The dcase20 preset asks for a GPU per worker: on this CPU-only machine the search stops before any
    trial starts and names the override; with the overrides the same preset trains and scores."""
    cmd = [sys.executable, "-m", "raysd.search", "dcase20", "--data-root", str(tiny_root), "--machine-types", "fan",
           "--families", "dense_ae", "--num-samples", "1", "--epochs", "1", "--cache-dir", str(tmp_path / "cache"),
           "--storage-path", str(tmp_path / "exp"), "--no-leaderboard"]
    refused = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, _story(refused)
    assert "no node of this cluster has a GPU" in refused.stderr and "--gpus-per-worker 0" in refused.stderr
    assert not (tmp_path / "exp" / "dcase20" / "trials").exists()
    assert not (tmp_path / "cache").exists()  # refused before filling the feature cache

    done = subprocess.run(cmd + ["--gpus-per-worker", "0", "--cpus-per-worker", "1"], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, _story(done)
    (record,) = _records(tmp_path / "exp" / "dcase20")["fan__dense_ae"]  # ASHA ended it at its last epoch
    assert record["status"] == "finished" and 0.0 <= record["metrics"]["sel_auc"] <= 1.0
    scores = __import__("pandas").read_csv(Path(record["checkpoint"]) / "scores_test.csv")
    assert scores["score"].notna().all() and set(scores["machine_type"]) == {"fan"}


@pytest.mark.slow
def test_nan_trial_fails_with_reason_and_search_continues(tiny_root: Path, tmp_path: Path) -> None:
    fams = {
        "dense_ae": {"num_samples": 1, "epochs": 1, "space": {"optimizer": "sgd", "lr": 1.0e12, "batch_size": 512}},
        "vae": {"num_samples": 1, "epochs": 1, "space": {"lr": 1e-3, "batch_size": 512}},
    }
    preset = _preset(tmp_path, fams, machine_types=["fan"])
    done = subprocess.run(_search_cmd(preset, tiny_root, tmp_path, "--no-leaderboard"), cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    records = _records(tmp_path / "exp" / "t")
    (bad,) = records["fan__dense_ae"]
    assert bad["status"] == "failed"
    assert "nan" in bad["reason"].lower() or "inf" in bad["reason"].lower()
    (good,) = records["fan__vae"]
    assert good["status"] == "finished"


def _job(workers: int, gpus: float, cpus: float = 8.0) -> StudyJob:
    import pandas as pd

    return StudyJob(study="s", family="dense_ae", machine_type="fan", catalog=pd.DataFrame(), data_root=".",
                           layout="dcase2020", spec={}, rule="2020", metric="sel_auc", cache_dir=".", experiment=".",
                           workers=workers, use_gpu=gpus > 0, cpus_per_worker=cpus, gpus_per_worker=gpus)


def test_a_trial_no_node_can_hold_is_refused_with_the_override_that_fixes_it() -> None:
    laptop = [{"CPU": 2.0, "GPU": 0.0}]  # raysd's local instance on 2 cores
    reason = cluster.infeasible_reason(_job(1, 1.0, cpus=4.0), laptop, autoscaling=False)
    assert "has a GPU" in reason and "--gpus-per-worker 0" in reason
    reason = cluster.infeasible_reason(_job(1, 0.0, cpus=4.0), laptop, autoscaling=False)
    assert "largest node has 2 CPU" in reason and "--cpus-per-worker 2" in reason
    assert cluster.infeasible_reason(_job(1, 0.0, cpus=2.0), laptop, autoscaling=False) is None  # one worker: no driver
    assert "--workers 1" in cluster.infeasible_reason(_job(4, 0.0, cpus=1.0), laptop, autoscaling=False)
    # two DDP workers of one CPU each leave no share for their driver: just under one CPU each does
    assert "--cpus-per-worker 0.99" in cluster.infeasible_reason(_job(2, 0.0, cpus=1.0), laptop, autoscaling=False)
    assert cluster.infeasible_reason(_job(2, 0.0, cpus=0.99), laptop, autoscaling=False) is None
    gpu_node = [{"CPU": 8.0, "GPU": 2.0}]
    assert "--gpus-per-worker 2" in cluster.infeasible_reason(_job(1, 4.0, cpus=1.0), gpu_node, autoscaling=False)
    # a worker's CPUs and GPUs come from one node: two nodes of 4 CPU cannot hold an 8-CPU worker
    assert "--cpus-per-worker 4" in cluster.infeasible_reason(_job(1, 0.0, cpus=8.0), [{"CPU": 4.0, "GPU": 0.0}] * 2,
                                                               autoscaling=False)
    with pytest.raises(cluster.InfeasibleTrial, match="--no-resource-check"):
        cluster.check_resources([_job(1, 1.0, cpus=4.0)], laptop, None)


def test_an_autoscaling_cluster_is_judged_by_what_it_may_add() -> None:
    """The A100 cluster starts as a CPU-less, GPU-less head: one-GPU trials are not refused, since the
    autoscaler may add 8-GPU nodes; a trial asking for more than any node type has still is."""
    head_only = [{"CPU": 0.0, "GPU": 0.0}]
    most = cluster.autoscaler_nodes(REPO / "clusters" / "aws-a100.yaml")
    assert most is not None and len(most) == 5 and max(n["GPU"] for n in most) == 8
    cluster.check_resources([_job(1, 1.0, cpus=4.0), _job(8, 1.0, cpus=8.0)], head_only, most)
    with pytest.raises(cluster.InfeasibleTrial, match="may add"):
        cluster.check_resources([_job(1, 16.0, cpus=4.0)], head_only, most)
    with pytest.raises(cluster.InfeasibleTrial, match="has a GPU"):
        cluster.check_resources([_job(1, 1.0, cpus=4.0)], head_only, None)


def test_capacity_of_an_autoscaling_cluster_comes_from_its_config(tmp_path: Path) -> None:
    """The A100 cluster starts with no GPU node: concurrency is sized for what the autoscaler may add
    (4 nodes x 8 GPUs, the cluster's max_workers over both worker types), not for the bare head."""
    most = cluster.autoscaler_max_resources(REPO / "clusters" / "aws-a100.yaml")
    assert most == {"CPU": 4 * 96, "GPU": 4 * 8}
    head_only = {"CPU": 0.0, "GPU": 0.0}
    assert cluster.cluster_capacity([_job(1, 1.0)], head_only) == 1
    assert cluster.cluster_capacity([_job(1, 1.0)], head_only, most) == 32
    assert cluster.cluster_capacity([_job(1, 1.0), _job(4, 1.0)], head_only, most) == 8  # sized by the largest trial
    assert cluster.cluster_capacity([_job(1, 1.0)], {"CPU": 96.0, "GPU": 8.0}) == 8  # no config: what is there
    assert cluster.autoscaler_max_resources(tmp_path / "missing.yaml") is None
    broken = tmp_path / "broken.yaml"
    broken.write_text("available_node_types: [1, 2]\n")
    assert cluster.autoscaler_max_resources(broken) is None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_trials_stopped_early_free_their_workers(tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune stops each 2-worker trial after its first epoch (as ASHA does), killing its Train controller: the
    workers' placement group must still be freed, or the next trial waits for CPUs forever."""
    from ray import tune
    from ray.util import placement_group_table

    for k, v in ENV.items():
        monkeypatch.setenv(k, v)
    path = _preset(tmp_path, {"dense_ae": {"num_samples": 3, "epochs": 3, "space": {"lr": 1e-3, "batch_size": 512}}},
                   machine_types=["fan"])
    args = search.parse_args([str(path), "--data-root", str(tiny_root), "--cache-dir", str(tmp_path / "cache"),
                              "--storage-path", str(tmp_path / "exp"), "--workers", "2", "--cpus-per-worker", "0.9"])
    plan = planning.make_plan(load_preset(path), args)
    planning.warm_cache(plan)
    (job,) = plan.studies
    with runner.attached_ray():
        grid = tune.Tuner(
            studies.register(job), param_space={"lr": 1e-3, "batch_size": 512, "epochs": 3},
            tune_config=tune.TuneConfig(metric="sel_auc", mode="max", num_samples=3, max_concurrent_trials=1),
            run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="stopped",
                                      stop={"training_iteration": 1}),
        ).fit()
        assert [r.error for r in grid] == [None] * 3
        assert [r.metrics["epoch"] for r in grid] == [1, 1, 1]
        deadline = time.time() + 60
        while time.time() < deadline:
            live = [g for g, t in placement_group_table().items() if t["state"] != "REMOVED" and len(t["bundles"]) == 2]
            if not live:
                break
            time.sleep(1)
        assert not live, f"placement groups of stopped trials never freed: {live}"
