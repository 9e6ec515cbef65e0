"""The trial body under its launchers: a configuration that cannot train ends at once, a restarted trial whose
checkpoint already ended it reports again without training, and the Tune trainable and the Ray Train worker give
the same scores for the same seed. The plan drops choices the data cannot train."""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from raysd import artifacts, runner, search
from raysd import plan as planning
from raysd.presets import load_preset
from raysd.trial import Session, trial_body

FEATURES = {"sample_rate": 16000, "n_fft": 1024, "hop_length": 512, "n_mels": 64, "clip_seconds": 3.0}


def _preset(tmp_path: Path, families: dict, **extra: Any) -> Path:
    body = {"name": "t", "dataset": {"layout": "auto"}, "rule": "2020", "features": FEATURES, "metric": "sel_auc",
            "scheduler": {"type": "none"}, "max_failures": 1, "resources": {"workers": 1, "cpus_per_worker": 1},
            "families": families, **extra}
    p = tmp_path / "preset.yaml"
    p.write_text(yaml.safe_dump(body))
    return p


def _plan(tmp_path: Path, root: Path, families: dict, **extra: Any) -> planning.Plan:
    path = _preset(tmp_path, families, **extra)
    args = search.parse_args([str(path), "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"),
                              "--storage-path", str(tmp_path / "exp")])
    return planning.make_plan(load_preset(path), args)


class Checkpoint:
    """What a launcher hands a restarted trial: a folder to open, where it lies."""

    def __init__(self, folder: str):
        self.path = folder

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


class Recorder(Session):
    """A single worker outside Ray that keeps each report and copies each checkpoint, as Tune would."""

    def __init__(self, root: Path, resume_from: str | None = None):
        super().__init__()
        self.root, self.resume_from = root, resume_from
        self.reports: list[tuple[dict, str | None]] = []

    def checkpoint(self) -> Any:
        return Checkpoint(self.resume_from) if self.resume_from else None

    def report(self, metrics: dict[str, Any], folder: str | None) -> None:
        kept = None
        if folder:
            kept = str(self.root / f"checkpoint_{len(self.reports):06d}")
            shutil.copytree(folder, kept)
        self.reports.append((metrics, kept))


def test_a_trial_resumed_from_its_final_checkpoint_reports_again_without_training(
        tiny_root: Path, tmp_path: Path, one_thread) -> None:
    """A driver stopped between a trial's last report and Tune recording it: the restarted trial finds its final
    checkpoint and reports its final metrics again, naming that checkpoint, instead of training."""
    plan = _plan(tmp_path, tiny_root, {"dense_ae": {"num_samples": 1, "epochs": 2,
                                                    "space": {"lr": 1e-3, "batch_size": 512}}}, machine_types=["fan"])
    planning.warm_cache(plan)
    (job,) = plan.studies
    params = {"lr": 1e-3, "batch_size": 512, "epochs": 2}
    first = Recorder(tmp_path / "first")
    trial_body(job, params, first)
    assert [m["epoch"] for m, _ in first.reports] == [1, 2]
    final_metrics, final = first.reports[-1]
    assert final is not None and (Path(final) / artifacts.SCORES_TEST).exists()

    again = Recorder(tmp_path / "again", resume_from=final)
    trial_body(job, params, again)
    ((metrics, folder),) = again.reports  # one report, no epoch trained, no new checkpoint: it names the final one
    assert metrics["sel_auc"] == final_metrics["sel_auc"] and metrics["epoch"] == 2
    assert folder is None and metrics["checkpoint_path"] == final


def test_a_configuration_that_cannot_train_ends_at_once_and_a_nan_loss_fails(tiny_root: Path, tmp_path: Path,
                                                                             one_thread) -> None:
    plan = _plan(tmp_path, tiny_root, {"triplet": {"num_samples": 1, "epochs": 1, "space": {"batch_size": 64}},
                                       "dense_ae": {"num_samples": 1, "epochs": 2, "space": {"batch_size": 512}}},
                 machine_types=["fan"])
    planning.warm_cache(plan)
    jobs = {j.family: j for j in plan.studies}
    one_class = Recorder(tmp_path / "triplet")
    # fan's training clips hold two sections: one section alone is one class, which triplet cannot train on
    job = jobs["triplet"]
    job.catalog = job.catalog[(job.catalog["machine_type"] != "fan") | (job.catalog["section"] == "00")]
    trial_body(job, {"batch_size": 64, "epochs": 1}, one_class)
    ((metrics, folder),) = one_class.reports
    assert "at least 2 classes" in metrics["infeasible"] and folder is None and math.isnan(metrics["sel_auc"])
    assert artifacts.trial_outcome(metrics, 1)[0] == "infeasible"

    diverged = Recorder(tmp_path / "nan")
    trial_body(jobs["dense_ae"], {"batch_size": 512, "epochs": 2, "optimizer": "sgd", "lr": 1e12}, diverged)
    metrics, folder = diverged.reports[-1]
    assert "nan" in metrics["failed"].lower() or "inf" in metrics["failed"].lower()
    assert artifacts.trial_outcome(metrics, 2)[0] == "failed" and folder is None


def _one_section(root: Path, out: Path, machine_type: str = "fan") -> Path:
    """A copy of one machine type of a 2022+ layout with section 00 alone, as DCASE 2023 and 2024 have."""
    for f in (root / machine_type).rglob("*"):
        if f.is_file() and (f.name.startswith("section_00") or f.name == "attributes_00.csv"):
            dest = out / machine_type / f.relative_to(root / machine_type)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(f, dest)
    return out


def test_the_plan_drops_choices_the_data_cannot_train(tiny23_root: Path, tmp_path: Path, capsys) -> None:
    """A machine type with one section (DCASE 2023): per type, labels 'section' or 'type_section' are one class, so
    a per-type triplet study keeps only 'attribute' (several attribute strings per section); a study that has no
    choice left is not searched. Every drop has a line in the plan."""
    root = _one_section(tiny23_root, tmp_path / "one_section")
    fams = {"triplet": {"num_samples": 2, "epochs": 1, "space": {"labels": {"choice": ["section", "attribute"]}}},
            "lonely": {"family": "triplet", "num_samples": 1, "epochs": 1, "space": {"labels": "type_section"}}}
    plan = _plan(tmp_path, root, fams, machine_types=["fan"], rule="2022")
    assert [j.study for j in plan.studies] == ["fan__triplet"]
    assert plan.search(plan.studies[0]).space["labels"] == {"choice": ["attribute"]}
    assert plan.trials(plan.studies[0]) == 2
    assert any("fan__triplet: labels='section' dropped: triplet needs at least 2 classes" in n for n in plan.notes)
    assert any(n.startswith("fan__lonely: not searched") for n in plan.notes)
    path = tmp_path / "preset.yaml"
    assert search.main([str(path), "--data-root", str(root), "--cache-dir", str(tmp_path / "cache"),
                        "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dropped: fan__triplet: labels='section'" in out and "total: 1 studies, 2 trials" in out


@pytest.mark.slow
def test_the_tune_trainable_and_a_ray_train_worker_give_the_same_scores(tiny_root: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """One trial body, two launchers: the single-worker trial inside its Tune trainable and the same trial as a
    one-worker ``TorchTrainer`` train the same model for the same seed."""
    import ray.train
    from ray import tune
    from ray.train.torch import TorchTrainer

    from raysd import studies
    from raysd.trial import train_worker

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    plan = _plan(tmp_path, tiny_root, {"dense_ae": {"num_samples": 1, "epochs": 2,
                                                    "space": {"lr": 1e-3, "batch_size": 256}}}, machine_types=["fan"])
    planning.warm_cache(plan)
    (job,) = plan.studies
    params = {"lr": 1e-3, "batch_size": 256, "epochs": 2, "seed": 3}
    with runner.attached_ray():
        (tuned,) = tune.Tuner(studies.register(job), param_space=params,
                              run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), name="one")).fit()
        trained = TorchTrainer(
            train_worker, train_loop_config={"job": job, "params": params},
            scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="one", storage_path=str(tmp_path / "train"))).fit()
    assert tuned.error is None and tuned.checkpoint is not None and trained.checkpoint is not None
    a = pd.read_csv(Path(tuned.checkpoint.path) / artifacts.SCORES_TEST)
    b = pd.read_csv(Path(trained.checkpoint.path) / artifacts.SCORES_TEST)
    assert a["file"].tolist() == b["file"].tolist()
    assert a["score"].to_numpy() == pytest.approx(b["score"].to_numpy(), rel=1e-4, abs=1e-6)
    assert tuned.metrics["sel_auc"] == pytest.approx(trained.metrics["sel_auc"], abs=1e-6)


def test_held_out_clips_give_a_label_free_metric(tiny_root: Path, tmp_path: Path, one_thread) -> None:
    """With ``metric: pseudo_official`` the plan holds out a tenth of the training clips (test clips untouched), and
    every epoch reports the model's figures on them against pseudo-anomalies made of them."""
    plan = _plan(tmp_path, tiny_root, {"dense_ae": {"num_samples": 1, "epochs": 2, "space": {"batch_size": 512}}},
                 machine_types=["fan"], metric="pseudo_official")
    (job,) = plan.studies
    splits = job.study_table[job.study_table["machine_type"] == "fan"]["split"].value_counts()
    raw = job.catalog[job.catalog["machine_type"] == "fan"]["split"].value_counts()
    assert splits["test"] == raw["test"] and splits["heldout"] + splits["train"] == raw["train"]
    assert 0.05 < splits["heldout"] / raw["train"] < 0.2
    planning.warm_cache(plan)
    run = Recorder(tmp_path / "run")
    trial_body(job, {"batch_size": 512, "epochs": 2}, run)
    for metrics, _ in run.reports:
        assert 0.0 <= metrics["pseudo_official"] <= 1.0 and metrics["heldout_loss"] > 0
        assert {"pseudo_auc", "pseudo_pauc", "sel_auc"} <= set(metrics)


def test_a_pitch_shift_moves_a_tone_up_the_mel_axis_and_its_spectrum_alike() -> None:
    import torch

    from raysd.data.features import FeatureSpec
    from raysd.data.views import View
    from raysd.families.clips import ClipSet
    from raysd.pseudo import pitch_shifted

    spec = FeatureSpec(n_mels=64, clip_seconds=1.0)
    clips = torch.full((1, 64, 10), -60.0)
    clips[0, 30] = 0.0  # a tone in band 30
    spectrum = torch.zeros(1, 100)
    spectrum[0, 40] = 1.0
    data = ClipSet(clips, torch.zeros(1), View(frames=0, hop=1, layout="image", extras=("s",)), extras=[spectrum])
    assert torch.equal(pitch_shifted(data, spec, 1.0).clips, clips)
    up = pitch_shifted(data, spec, 1.08)
    assert int(up.clips[0, :, 0].argmax()) > 30 and int(up.extras[0][0].argmax()) in (43, 44)
    down = pitch_shifted(data, spec, 0.92)
    assert int(down.clips[0, :, 0].argmax()) < 30
