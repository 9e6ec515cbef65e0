"""The full-clip spectrum as a cached feature a view asks for, and the ``adacos_knn`` family that uses it: it learns
the auxiliary classes of held-out clips, its kNN score beats the untrained network's, and its kNN bank survives a
``weights_only`` load. The figures in the comments were measured with the settings of the tests (one thread)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from raysd.data import audio
from raysd.data.catalog import Catalog
from raysd.data.features import FeatureSpec, SpectrumSpec, extract_all
from raysd.data.store import FeatureStore
from raysd.data.study import load_study
from raysd.families.base import create_family
from raysd.families.clips import ClipSet
from raysd.inference import stream
from raysd.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

PARAMS = {"epochs": 10, "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-5, "mixup_prob": 0.5}


def test_spectrum_spec_keeps_the_bins_of_its_range_and_fills_rate_and_length_from_the_log_mel():
    base = FeatureSpec(sample_rate=16000, clip_seconds=2.0)
    full = SpectrumSpec().for_clips(base)
    assert (full.sample_rate, full.clip_seconds) == (16000, 2.0)
    assert full.bins == (0, 16000) and full.item_shape == (16000,)  # 32000 samples: bins 0.5 Hz apart, no Nyquist
    band = SpectrumSpec(f_min=100.0, f_max=4000.0).for_clips(base)
    assert band.bins == (200, 8000)
    assert band.key() != full.key() != base.key()
    with pytest.raises(ValueError, match="f_min"):
        SpectrumSpec(f_min=500.0, f_max=100.0)
    with pytest.raises(ValueError, match="for_clips"):
        SpectrumSpec().bins


def test_spectrum_of_a_real_clip_is_the_magnitude_of_one_fft_over_it(fixture_clip: Path, tmp_path: Path):
    import pandas as pd

    info = sf.info(fixture_clip)
    table = pd.DataFrame({"path": [str(fixture_clip)], "file": [fixture_clip.name], "offset": [0],
                          "num_samples": [info.frames], "sample_rate": [info.samplerate]})
    mel = FeatureSpec(clip_seconds=10.0)
    spectrum = SpectrumSpec(f_max=4000.0).for_clips(mel)
    (rows, (logmel, spec)), = list(extract_all(table, [mel, spectrum]))
    assert rows == [0] and logmel.shape == (1, *mel.item_shape) and spec.shape == (1, *spectrum.item_shape)
    wave = audio.load(fixture_clip, sample_rate=16000, seconds=10.0).numpy().astype(np.float64)
    lo, hi = spectrum.bins
    expect = np.abs(np.fft.rfft(wave))[lo:hi]
    np.testing.assert_allclose(spec[0], expect, rtol=1e-3, atol=1e-3 * expect.max())


@pytest.fixture(scope="module")
def aux23(tmp_path_factory):
    """Fan and valve in the 2023 layout, two sections each (36 training clips per section, 3 of them in the target
    domain; 12 normal and 18 anomalous test clips), with the adacos_knn view's spectrum beside the log-mel."""
    from raysd.data import synth

    types = ("fan", "valve")
    counts = {t: {i: (36, 12, 18) for i in synth.DEV_IDS[t][:2]} for t in types}
    root = synth.generate(tmp_path_factory.mktemp("aux") / "aux23", synth.Preset("aux", 3.0, counts, target_train=3),
                          seed=0, layout="dcase2023")
    catalog = Catalog.scan(root)
    cache = tmp_path_factory.mktemp("aux_cache")
    spec = FeatureSpec(clip_seconds=3.0)
    fam, _ = create_family("adacos_knn", {"labels": "attribute"})
    store = FeatureStore.open(catalog, spec, cache)
    extras = [FeatureStore.open(catalog, s, cache) for s in fam.view().extra_specs(spec)]
    assert extras[0].spec.item_shape == (24000,) and extras[0].features.shape == (len(catalog.table), 24000)
    assert FeatureStore.open(catalog, extras[0].spec, cache).extracted is False  # cached, memory-mapped
    study = load_study(catalog, store, types, "attribute", extras)
    meta = synth.read_meta(root).set_index("file").loc[study.test_table["file"].tolist()].reset_index()
    return study, meta, catalog, spec


def _train(study, epochs: int, seed: int = 0, **params):
    fam, hp = create_family("adacos_knn", {**PARAMS, "labels": study.info.labelling, "seed": seed, **params})
    trainer = Trainer(fam, hp, study.info)
    trainer.fit(study.train_set(fam.view()), epochs=epochs)
    return fam, trainer


def test_learns_the_attribute_classes_of_held_out_normal_clips(aux23):
    """One network for fan and valve classifies machine type x section x attributes of clips it never saw."""
    study, meta, _, _ = aux23
    assert study.info.n_classes == 20
    normal = torch.from_numpy(np.flatnonzero((meta["label"] == 0).to_numpy()))
    y = study.test_y[normal]
    assert (y >= 0).all()
    acc = {}
    for epochs in (0, 10):
        fam, trainer = _train(study, epochs)
        test = study.test_set(fam.view()).subset(normal)
        with torch.no_grad():
            logits = trainer.model.eval()(test.clips.unsqueeze(1), extra=test.extras)
        acc[epochs] = (logits.argmax(1) == y).float().mean().item()
    # measured: untrained 0.000, trained 0.438 (seed 1: 0.104, 0.396); chance 0.05
    assert acc[10] >= 0.25 and acc[10] > acc[0] + 0.2, f"attribute accuracy on held-out normal clips {acc}"


def test_knn_score_beats_the_untrained_network(tiny_root: Path, tmp_path: Path):
    """Per machine type on the tiny 2020 set (its two IDs as classes): high-severity anomalies against normals."""
    from raysd.data.synth import read_meta
    from raysd.metrics import auc

    catalog = Catalog.scan(tiny_root)
    meta = read_meta(tiny_root).set_index("file")
    spec = FeatureSpec(clip_seconds=3.0)
    params = {"scope": "machine_type", "labels": "section", "batch_size": 16}
    fam, _ = create_family("adacos_knn", params)
    store = FeatureStore.open(catalog, spec, tmp_path)
    extras = [FeatureStore.open(catalog, s, tmp_path) for s in fam.view().extra_specs(spec)]
    aucs: dict[int, list[float]] = {0: [], 10: []}
    for mt in ("fan", "ToyConveyor"):
        study = load_study(catalog, store, mt, "section", extras)
        m = meta.loc[study.test_table["file"].tolist()]
        keep = ((m["label"] == 0) | (m["severity"] == "high")).to_numpy()
        for epochs in aucs:
            fam, trainer = _train(study, epochs, **params)
            aucs[epochs].append(auc(m["label"].to_numpy()[keep], trainer.score(study.test_set(fam.view()))[keep]))
    mean = {e: float(np.mean(a)) for e, a in aucs.items()}
    # measured: untrained 0.458, trained 0.719 (seed 1: 0.521, 0.802)
    assert mean[10] > mean[0] + 0.1, f"mean high-severity AUC over fan and ToyConveyor, untrained vs trained {aucs}"


def test_knn_bank_survives_a_weights_only_load_and_new_recordings_score_alike(aux23, tmp_path: Path):
    """The saved state (branches, head scale, kNN bank with sections and domains) restores through
    ``weights_only``; scoring clips read from their files (``raysd.score``'s path) matches the trial's scores."""
    study, _, catalog, spec = aux23
    fam, trainer = _train(study, 1, knn_means=4)
    test = study.test_set(fam.view())
    scores = trainer.score(test)
    assert np.isfinite(scores).all() and np.ptp(scores) > 0
    knn = trainer.model.knn
    assert knn.bank.shape[0] == 4 * 4 + 3 * 4  # 4 sections: 4 source means and 3 target clips each
    torch.save(trainer.model.state_dict(), tmp_path / "state.pt")
    fam2, hp2 = create_family("adacos_knn", {**PARAMS, "labels": "attribute", "knn_means": 4, "seed": 7})
    fresh = Trainer(fam2, hp2, study.info)
    fresh.model.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    np.testing.assert_allclose(fresh.score(test), scores, rtol=1e-5, atol=1e-6)
    table = catalog.table.set_index(["file", "offset"]).loc[
        list(zip(study.test_table["file"], study.test_table["offset"]))].reset_index()
    streamed = np.full(len(table), np.nan)
    for ok, s, _ in stream(fresh, spec, table, batch_size=8):
        streamed[ok] = s
    np.testing.assert_allclose(streamed, scores, rtol=1e-4, atol=1e-5)


def test_a_clip_set_carries_its_extra_features_through_batches_and_subsets():
    from raysd.data.views import View

    view = View(frames=0, layout="image", extras=(SpectrumSpec(),))
    clips, spectra = torch.randn(5, 8, 12), torch.arange(5.0)[:, None].repeat(1, 3)
    data = ClipSet(clips, torch.arange(5) % 2, view, extras=[spectra])
    batch = data.batch(torch.tensor([3, 1]))
    assert torch.equal(batch.extra[0][:, 0], torch.tensor([3.0, 1.0]))
    assert torch.equal(data.subset(torch.tensor([4, 2])).extras[0][:, 0], torch.tensor([4.0, 2.0]))
    with pytest.raises(ValueError, match="extra feature"):
        ClipSet(clips, torch.arange(5) % 2, view)


def test_no_training_batch_of_one_window_and_no_mixup_in_the_held_out_loss():
    """BatchNorm needs two samples: a last batch of one clip joins the one before. The held-out loss (eval mode)
    does not mix, so it is the same twice, and a class unseen in training (-1) adds nothing."""
    from raysd.data.views import View
    from raysd.families.clips import DataInfo

    view = View(frames=0, layout="image", extras=(SpectrumSpec(),))
    data = ClipSet(torch.randn(9, 8, 12), torch.arange(9) % 2, view, extras=[torch.rand(9, 300)])
    sizes = [b.x.shape[0] for b in data.batches(4, generator=torch.Generator().manual_seed(0))]
    assert sizes == [4, 5] and sum(sizes) == 9
    assert [b.x.shape[0] for b in data.batches(3, shuffle=False)] == [3, 3, 3]

    fam, hp = create_family("adacos_knn", {"labels": "type_section", "channels": [4, 8], "emb_size": 8})
    trainer = Trainer(fam, hp, DataInfo(8, 12, 2, ("a", "b"), extra_shapes=((300,),)))
    trainer.model.eval()
    batch = data.batch(torch.arange(9))
    with torch.no_grad():
        first, second = fam.loss(trainer.model, batch), fam.loss(trainer.model, batch)
        unseen = ClipSet(data.clips, torch.tensor([0, 1, -1, 0, 1, -1, 0, 1, -1]), view, extras=data.extras)
        partial = fam.loss(trainer.model, unseen.batch(torch.arange(9)))
    assert torch.equal(first, second) and torch.isfinite(partial)
