"""Anomaly reports on unlabelled long recordings: a generated forest recording with loud foreign events at known
times, a conv_ae trained on held-out-assigned clips of another recording, and the reports of ``raysd.score`` (on a
trial checkpoint) and ``raysd.leaderboard`` (on an unlabelled experiment) putting those events on top with the
right time stamps; flat scoring memory; pruning that never sees a held-out clip."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from experiment_helpers import write_checkpoint, write_experiment, write_record

from raysd import inference, leaderboard, score
from raysd.data import synth_field
from raysd.data.synth_field import FieldEvent
from raysd.report import experiment, unlabelled

EVENTS = [FieldEvent("motorcycle", 20.3, 5.0, 16.0), FieldEvent("plane", 55.6, 8.0, 18.0),
          FieldEvent("knock", 95.2, 1.5, 10.0)]
PARAMS = {"lr": 1e-3, "batch_size": 32, "epochs": 6, "crop": "none"}
HELDOUT = {"mode": "time", "fraction": 0.2, "block_clips": 20, "gap_clips": 1}
TOP = 10
PNG = b"\x89PNG\r\n\x1a\n"


def _spec():
    from raysd.data.features import FeatureSpec

    return FeatureSpec(sample_rate=22050, n_fft=2048, hop_length=512, n_mels=64, clip_seconds=1.0)


def _study(root: Path, cache: Path, **heldout):
    from raysd.data.catalog import Catalog
    from raysd.data.heldout import HeldoutConfig, assign
    from raysd.data.store import FeatureStore
    from raysd.data.study import load_study

    catalog = Catalog.scan(root, clip_seconds=1.0)
    table = assign(catalog.table, HeldoutConfig(**{**HELDOUT, **heldout}))
    store = FeatureStore.open(catalog, _spec(), cache, device="cpu")
    return table, store, load_study(Catalog(table, catalog.root, catalog.layout), store, "site")


def _event_hits(start_s: float, end_s: float) -> list[str]:
    return [e.kind for e in EVENTS if e.overlaps(start_s, end_s)]


@pytest.fixture(scope="module")
def field(tmp_path_factory) -> SimpleNamespace:
    """Two 2-minute forest recordings (events only in ``field.wav``), a conv_ae trained on ``quiet.wav``'s training
    clips (the study's 15-file setting with field.wav examined) and its checkpoint as ``raysd.trial`` leaves it."""
    from raysd.families.base import create_family
    from raysd.train import Trainer
    from raysd.trial import score_table

    torch.set_num_threads(2)
    tmp = tmp_path_factory.mktemp("field")
    root = tmp / "data"
    (root / "site").mkdir(parents=True)
    assert synth_field.generate(root / "site" / "field.wav", 2, EVENTS, seed=3) == EVENTS
    synth_field.generate(root / "site" / "quiet.wav", 2, 0, seed=4)
    table, store, study = _study(root, tmp / "cache", examine="field.wav", training="others")
    family, hp = create_family("conv_ae", PARAMS)
    trainer = Trainer(family, hp, study.info)
    trainer.fit(study.train_set(family.view()))
    tables = {name: score_table(rows, trainer.score(clips)) for name, rows, clips in (
        ("test", study.test_table, study.test_set(family.view())),
        ("train", study.train_table, study.train_set(family.view())),
        ("heldout", study.heldout_table, study.heldout_set(family.view())))}
    trial_json = {"family": "conv_ae", "machine_type": "site", "layout": "recordings", "params": PARAMS,
                  "spec": _spec().to_dict(), "info": study.info.__dict__, "epoch": trainer.epoch}
    ck = tmp / "ckpt"
    ck.mkdir()
    torch.save(trainer.state_dict(), ck / "state.pt")
    (ck / "trial.json").write_text(json.dumps(trial_json))
    for name, t in tables.items():
        t.to_csv(ck / f"scores_{name}.csv", index=False)
    return SimpleNamespace(tmp=tmp, root=root, wav=root / "site" / "field.wav", table=table, study=study,
                           trainer=trainer, tables=tables, trial_json=trial_json, ckpt=ck)


def _check_events_on_top(report: pd.DataFrame) -> None:
    """Every listed clip overlaps an inserted event (time stamps right to within the clip) and every event is listed."""
    assert len(report) == TOP and list(report["rank"]) == list(range(1, TOP + 1))
    hits = [_event_hits(s, e) for s, e in zip(report["start_s"], report["end_s"])]
    assert all(hits), report.loc[[not h for h in hits], ["start", "end", "score"]]
    assert {k for h in hits for k in h} == {e.kind for e in EVENTS}
    assert (np.diff(report["score"]) <= 0).all() and report["percentile"].is_monotonic_decreasing
    assert ((report["end_s"] - report["start_s"]).round(3) == 1.0).all()


def test_time_stamps_and_percentiles() -> None:
    assert unlabelled.format_time(0) == "00:00:00.000"
    assert unlabelled.format_time(3725.5) == "01:02:05.500"
    assert unlabelled.format_time(59.9996) == "00:01:00.000"  # rounding carries into the minutes
    assert unlabelled.format_time(6 * 3600 - 1 + 1234 / 22050) == "05:59:59.056"
    assert unlabelled.format_time(100 * 3600) == "100:00:00.000"
    for v in (0.0, 44.212, 21599.999):
        assert unlabelled.parse_time(unlabelled.format_time(v)) == pytest.approx(v, abs=5e-4)
    with pytest.raises(ValueError):
        unlabelled.format_time(-1)
    with pytest.raises(ValueError, match="hh:mm:ss.sss"):
        unlabelled.parse_time("1:2:3")
    np.testing.assert_allclose(unlabelled.percentiles(np.array([3.0, 1.0, 2.0, 2.0])), [100, 25, 75, 75])


def test_report_of_bare_scores_and_a_family_without_bottleneck(tmp_path: Path) -> None:
    from raysd.families.base import get_family
    from raysd.families.clips import ClipSet, DataInfo
    from raysd.families.hparams import TrainHP
    from raysd.train import Trainer

    made = get_family("group_made")
    trainer = Trainer(made(made.Config(frames=4, hop=4)), TrainHP(), DataInfo(n_mels=8, n_frames=8, n_classes=1))
    clips = ClipSet(torch.randn(5, 8, 8), torch.zeros(5, dtype=torch.long), trainer.family.view())
    assert inference.clip_embeddings(trainer, clips) is None
    scores = pd.DataFrame({"recording": "a.wav", "offset": np.arange(50) * 1000, "num_samples": 1000,
                           "sample_rate": 1000, "score": np.arange(50.0)})
    scores.loc[49, "score"] = np.nan
    with pytest.warns(RuntimeWarning, match="1 clip"):
        rep = unlabelled.write_report(scores, tmp_path, top=3, embeddings=np.random.default_rng(0).normal(size=(50, 3)))
    got = unlabelled.read_report(tmp_path / "anomalies.csv")
    assert list(got["start"]) == ["00:00:48.000", "00:00:47.000", "00:00:46.000"]
    np.testing.assert_allclose(got["percentile"], [100, 100 * 48 / 49, 100 * 47 / 49], atol=1e-4)
    assert (got["spectrogram"] == "").all() and any("no spectrograms" in n for n in rep.notes)
    assert (tmp_path / "anomaly_scores.png").exists() and (tmp_path / "embedding_pca.png").exists()
    with pytest.raises(unlabelled.ReportError, match=r"lack column\(s\) \['score'\]"):
        unlabelled.write_report(scores.drop(columns="score"), tmp_path)


def test_field_generator_puts_loud_events_where_it_says(tmp_path: Path) -> None:
    events = synth_field.plan_events(90, 3, seed=5, durations={"plane": 10.0})
    assert [e.kind for e in events] == ["motorcycle", "plane", "knock"]
    assert all(a.end_s + 1 <= b.start_s for a, b in zip(events, events[1:])) and events[-1].end_s <= 85
    x = synth_field.render(90, events, seed=5)
    assert len(x) == 90 * 22050 and np.abs(x).max() < 1.0
    np.testing.assert_array_equal(x[:22050 * 12], synth_field.render(90, events, seed=5)[:22050 * 12])
    rms = np.sqrt((x.reshape(90, 22050).astype(np.float64) ** 2).mean(axis=1))
    quiet = np.median(rms)
    for e in events:
        inside = rms[int(e.start_s):int(np.ceil(e.end_s))]
        assert inside.max() > 4 * quiet, e  # at least 12 dB above the ambience somewhere in the event
    outside = [s for s in range(90) if not any(e.overlaps(s, s + 1) for e in events)]
    assert rms[outside].max() < 4 * quiet
    assert synth_field.main([str(tmp_path), "--minutes", "0.5", "--events", "1", "--seed", "2"]) == 0
    wav = tmp_path / "field_seed2.wav"
    (e,) = synth_field.read_events(synth_field.events_path(wav))
    assert e.kind == "motorcycle" and 5 <= e.start_s and e.end_s <= 25
    with pytest.raises(ValueError, match="too short"):
        synth_field.plan_events(30, 3)
    assert synth_field.main([str(tmp_path / "given.wav"), "--minutes", "0.5", "--event", "knock@12.5",
                             "--event", "plane@20+6"]) == 0
    assert [(e.kind, e.start_s, e.end_s) for e in synth_field.read_events(tmp_path / "given.events.csv")] == \
        [("knock", 12.5, 14.0), ("plane", 20.0, 26.0)]
    assert synth_field.main([str(tmp_path / "bad.wav"), "--minutes", "0.5", "--event", "train@3"]) == 2


def test_scored_recording_lists_the_events_first(field: SimpleNamespace, tmp_path: Path) -> None:
    """``raysd.score CHECKPOINT field.wav``: streamed scoring of the recording, report with the events on top."""
    rep, csv = tmp_path / "report", tmp_path / "scores.csv"
    assert score.main([str(field.ckpt), str(field.wav), "--report", str(rep), "--top", str(TOP), "--out", str(csv),
                       "--device", "cpu", "--projection", "tsne"]) == 0
    report = unlabelled.read_report(rep / "anomalies.csv")
    assert list(report.columns[:7]) == unlabelled.CSV_COLUMNS
    assert set(report["recording"]) == {str(field.wav)}
    _check_events_on_top(report)
    # every event's loudest clip outscores every clip that overlaps no event
    clips = pd.read_csv(csv)
    assert len(clips) == 120 and list(clips.columns) == ["file", "machine_type", "section", "score", "decision",
                                                          "offset", "start_s", "end_s"]
    hit = np.array([bool(_event_hits(s, e)) for s, e in zip(clips["start_s"], clips["end_s"])])
    for ev in EVENTS:
        mine = np.array([ev.overlaps(s, e) for s, e in zip(clips["start_s"], clips["end_s"])])
        assert clips.loc[mine, "score"].max() > clips.loc[~hit, "score"].max(), ev.kind
    # the same ranking as the in-process scores of the trained model (standardisation is monotonic)
    own = field.tables["test"].sort_values("offset")["score"].to_numpy()
    assert np.array_equal(np.argsort(-own, kind="stable")[:TOP],
                          np.argsort(-clips.sort_values("offset")["score"].to_numpy(), kind="stable")[:TOP])
    pics = sorted((rep / "spectrograms").glob("*.png"))
    assert len(pics) == TOP and [f"spectrograms/{p.name}" for p in pics] == sorted(report["spectrogram"])
    for p in [*pics, rep / "anomaly_scores.png", rep / "embedding_tsne.png"]:
        assert p.read_bytes()[:8] == PNG, p
    assert not list(rep.glob(".*"))  # nothing left under a temporary name


def test_unlabelled_leaderboard_reports_the_best_trials_strangest_clips(field: SimpleNamespace, tmp_path: Path):
    study = "site__conv_ae"
    root = write_experiment(tmp_path / "exp", [study], metric="heldout_loss", mode="min", preset="birdaudio",
                            layout="recordings")
    meta = json.loads((root / "experiment.json").read_text())
    (root / "experiment.json").write_text(json.dumps({**meta, "data_root": str(field.root)}))
    rng = np.random.default_rng(0)
    for tid, loss, shuffle in (("good", 0.3, False), ("worse", 0.9, True)):
        tabs = {k: t.assign(score=rng.permutation(t["score"].to_numpy())) if shuffle else t
                for k, t in field.tables.items()}
        ck = write_checkpoint(root, study, tid, field.trainer.state_dict(), field.trial_json, tabs["test"],
                              tabs["train"])
        tabs["heldout"].to_csv(ck / "scores_heldout.csv", index=False)
        write_record(root, study, tid, "conv_ae", "site", PARAMS, "finished", checkpoint=ck,
                     metrics={"epoch": 6, "heldout_loss": loss, "train_loss": 0.2})
    out = tmp_path / "results"
    assert leaderboard.main([str(root), "--out", str(out), "--top", str(TOP), "--device", "cpu"]) == 0
    board = pd.read_csv(out / "leaderboard.csv")
    assert board.loc[board["rank"] == 1, "trial_id"].tolist() == ["good"]
    report = unlabelled.read_report(out / "anomalies.csv")
    _check_events_on_top(report)
    assert set(report["recording"]) == {"site/field.wav"}  # the examined recording's test clips only
    good = field.tables["test"].sort_values(["score", "offset"], ascending=[False, True]).head(TOP)
    np.testing.assert_allclose(report["start_s"], good["offset"] / 22050)
    np.testing.assert_allclose(report["score"], good["score"])
    for p in [*(out / r for r in report["spectrogram"]), out / "anomaly_scores.png", out / "embedding_pca.png"]:
        assert p.read_bytes()[:8] == PNG, p
    summary = (out / "summary.md").read_text()
    assert "Unlabelled data: trials are ranked by `heldout_loss`" in summary
    assert "Strangest moments: site" in summary and "best trial conv_ae/good" in summary
    doc = json.loads((out / "ensemble.json").read_text())
    (member,) = doc["machine_types"]["site"]["members"]
    assert member["name"] == "conv_ae/good" and doc["layout"] == "recordings"
    # the leaderboard's ensemble.json scores the recording again, listing the same moments in the same order
    again = tmp_path / "again"
    assert score.main([str(out / "ensemble.json"), str(field.wav), "--report", str(again), "--top", str(TOP),
                       "--no-plots", "--out", str(tmp_path / "s.csv"), "--device", "cpu"]) == 0
    rescored = unlabelled.read_report(again / "anomalies.csv")
    assert list(rescored["start"]) == list(report["start"])
    assert not (again / "spectrograms").exists()


def test_no_examined_recording_reports_every_scored_clip(field: SimpleNamespace, tmp_path: Path) -> None:
    """Without heldout.examine the report covers training and held-out clips (never the gap clips nobody scored)."""
    t = experiment.Trial("s", "conv_ae", "site", "t1", "finished", checkpoint=None,
                          test=field.tables["test"].iloc[:0], train=field.tables["train"],
                          heldout=field.tables["heldout"])
    clips, which = unlabelled.report_clips(t)
    assert "every clip the trial scored" in which
    assert len(clips) == len(field.tables["train"]) + len(field.tables["heldout"])
    assert set(clips["split"]) == {"train", "heldout"} and set(clips["file"]) == {"site/quiet.wav"}


def _peak_traced(fn) -> float:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] / 2 ** 20
    finally:
        tracemalloc.stop()


def test_scoring_memory_does_not_grow_with_recording_length(field: SimpleNamespace, tmp_path: Path) -> None:
    from raysd.data import audio

    short, long = tmp_path / "short.wav", tmp_path / "long.wav"
    synth_field.generate(short, 1, 1, seed=11)
    synth_field.generate(long, 4, 2, seed=12)
    def run(p: Path):  # two batches of 16 clips in flight, whatever the machine's CPU count
        return score.score_all(str(field.ckpt), [str(p)], device="cpu", embed=True, batch_size=16, workers=1)

    run(short)  # warm-up: lazy imports and kernels
    peaks = {}
    for p in (short, long):
        result = {}
        peaks[p.name] = _peak_traced(lambda: result.update(s=run(p)))
        s = result["s"]
        assert len(s.table) == (60 if p is short else 240) and len(s.embeddings["site"][0]) == len(s.table)
    # three more minutes of 22,050 Hz audio are 15 MiB as float32: streamed scoring must not hold them
    assert peaks["long.wav"] - peaks["short.wav"] < 2.0, peaks
    # the measurement sees such a read: decoding the long file at once shows up in full
    whole = _peak_traced(lambda: audio.read(long))
    assert whole - peaks["short.wav"] > 12.0, (whole, peaks)


def test_pruning_never_sees_a_held_out_clip_and_drops_the_events_first(field: SimpleNamespace) -> None:
    """Single-file setting on the recording with the events: the training ClipSet holds the training clips and
    nothing else, so every pruned clip is a training clip; the loud foreign events go first."""
    from raysd.families.base import create_family
    from raysd.train import Trainer
    from raysd.trial import pruned_table

    table, store, study = _study(field.root, field.tmp / "cache", examine="field.wav", training="self",
                                 fraction=0.3, block_clips=10)
    key = lambda t: set(zip(t["file"], t["offset"]))  # noqa: E731
    train_rows = table[table["split"] == "train"]
    assert key(study.train_table) == key(train_rows)
    held = key(table[table["split"].isin(["heldout", "unused"])])
    assert held and not held & key(study.train_table)
    family, hp = create_family("conv_ae", {**PARAMS, "epochs": 2, "prune_every": 1, "prune_fraction": 0.05})
    data = study.train_set(family.view())
    assert torch.equal(data.clips, store.get(study.train_table))  # exactly the training rows' features
    trainer = Trainer(family, hp, study.info)
    trainer.fit(data)
    pruned = pruned_table(study.train_table, trainer.pruned)
    assert len(pruned) == len({i for _, i, _ in trainer.pruned}) > 0
    assert key(pruned) <= key(train_rows) and not key(pruned) & held
    train_events = [o for o in study.train_table["offset"] if _event_hits(o / 22050, o / 22050 + 1)]
    first = pruned[pruned["epoch"] == 1]
    assert train_events and len(first) == round(0.05 * len(data))
    assert all(_event_hits(o / 22050, o / 22050 + 1) for o in first["offset"].head(min(len(first), len(train_events))))
