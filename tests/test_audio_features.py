"""Audio reading (mono mix-down, resampling, padding, partial reads), log-mel and the feature cache."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from raysd.data import audio, synth
from raysd.data.catalog import Catalog
from raysd.data.features import FeatureSpec, LogMel, extract
from raysd.data.store import FeatureStore

SR = 16000


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(min(n, 2))
    yield
    torch.set_num_threads(n)


def tone(freq: float, seconds: float, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


def peak_hz(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()])


# --------------------------------------------------------------------------------------------- audio

def test_multichannel_mixed_to_mono(tmp_path: Path) -> None:
    chans = np.stack([tone(440, 0.5), tone(1000, 0.5, amp=0.3), np.full(8000, 0.25, np.float32),
                      -tone(440, 0.5)], axis=1)
    for k in (2, 4):
        p = tmp_path / f"{k}ch.wav"
        sf.write(p, chans[:, :k], SR, subtype="FLOAT")
        x, sr = audio.read(p)
        assert sr == SR and x.dtype == np.float32 and x.shape == (8000,)
        np.testing.assert_allclose(x, chans[:, :k].mean(axis=1), atol=1e-6)
        buf = np.full(9000, np.nan, np.float32)
        y, _ = audio.read(p, out=buf)
        assert y.base is buf or np.shares_memory(y, buf)
        np.testing.assert_allclose(y, chans[:, :k].mean(axis=1), atol=1e-6)


def test_resample_to_22050_keeps_length_and_frequency(tmp_path: Path) -> None:
    p = tmp_path / "tone.wav"
    sf.write(p, tone(1000.0, 2.0), SR, subtype="PCM_16")
    y = audio.load(p, sample_rate=22050)
    assert y.dtype == torch.float32 and y.shape == (44100,)
    assert abs(peak_hz(y.numpy(), 22050) - 1000.0) <= 22050 / 44100
    np.testing.assert_allclose(float(y[1000:-1000].pow(2).mean().sqrt()), 0.5 / np.sqrt(2), rtol=0.01)
    assert audio.resampler(SR, 22050) is audio.resampler(SR, 22050)  # the kernel is built once
    z = audio.load(p, sample_rate=22050, seconds=1.0)
    assert z.shape == (22050,)
    assert torch.equal(audio.resample(torch.ones(5), SR, SR), torch.ones(5))


def test_right_padding_and_truncation(tmp_path: Path) -> None:
    p = tmp_path / "half.wav"
    x = tone(300, 0.5)
    sf.write(p, x, SR, subtype="FLOAT")
    y = audio.load(p, seconds=1.0)
    assert y.shape == (SR,)
    np.testing.assert_allclose(y[:8000].numpy(), x, atol=1e-7)
    assert torch.count_nonzero(y[8000:]) == 0
    assert torch.equal(audio.load(p, seconds=0.25), torch.from_numpy(x[:4000]))
    assert audio.load(p, sample_rate=22050, seconds=1.0).shape == (22050,)


def test_partial_read_of_a_long_file_reads_only_the_clip(tmp_path: Path, monkeypatch) -> None:
    n = 60 * SR
    ramp = (np.arange(n) % 20011 / 20011 - 0.5).astype(np.float32)
    p = tmp_path / "long.wav"
    sf.write(p, ramp, SR, subtype="FLOAT")
    requested = []
    real_read = sf.SoundFile.read

    def spy(self, frames=-1, *a, **k):
        requested.append(frames)
        return real_read(self, frames, *a, **k)

    monkeypatch.setattr(sf.SoundFile, "read", spy)
    x, sr = audio.read(p, offset=30 * SR + 17, num_samples=SR)
    np.testing.assert_array_equal(x, ramp[30 * SR + 17:31 * SR + 17])
    assert requested == [SR]
    tail, _ = audio.read(p, offset=n - 100, num_samples=SR)  # a clip running past the end comes back short
    np.testing.assert_array_equal(tail, ramp[-100:])
    y = audio.load(p, offset=10 * SR, num_samples=5 * SR, seconds=1.0)  # only the needed second is read
    assert requested[-1] == SR and torch.equal(y, torch.from_numpy(ramp[10 * SR:11 * SR]))


def test_bad_audio_is_a_clear_error_naming_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), SR)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF not really a wav file" * 10)
    short = tmp_path / "short.wav"
    sf.write(short, tone(100, 0.1), SR)
    cases = [(tmp_path / "missing.wav", {}, "missing.wav"), (empty, {}, "empty.wav: empty audio file"),
             (junk, {}, "junk.wav: cannot decode"), (short, {"offset": 5000}, "short.wav: clip offset 5000 is beyond")]
    for path, kw, msg in cases:
        with pytest.raises(audio.AudioError, match=msg):
            audio.read(path, **kw)


# ------------------------------------------------------------------------------------------ log-mel

@pytest.mark.parametrize("crop, n_mels, lo, hi", [
    ("none", 64, 0, 64), ("crop", 128, 64, 128), ("tight", 256, 128, 192), ("explicit", 96, 10, 50),
])
def test_log_mel_shapes_and_crops(crop: str, n_mels: int, lo: int, hi: int) -> None:
    base = FeatureSpec(sample_rate=22050, clip_seconds=1.0)
    spec = base.with_crop(crop) if crop != "explicit" else FeatureSpec(
        sample_rate=22050, clip_seconds=1.0, n_mels=n_mels, mel_range=(lo, hi))
    assert (spec.n_mels, spec.kept_mels, spec.n_frames) == (n_mels, hi - lo, 22050 // 512 + 1)
    x = torch.randn(3, spec.clip_samples) * 0.1
    y = LogMel(spec)(x)
    assert y.shape == (3, hi - lo, spec.n_frames) and torch.isfinite(y).all()
    full = LogMel(FeatureSpec(sample_rate=22050, clip_seconds=1.0, n_mels=n_mels))(x)
    torch.testing.assert_close(y, full[:, lo:hi])


@pytest.mark.parametrize("spec", [
    FeatureSpec(clip_seconds=1.0),
    FeatureSpec(sample_rate=22050, clip_seconds=1.0).with_crop("tight"),
    FeatureSpec(clip_seconds=1.0, win_length=800, window="hamming", f_min=50.0, f_max=7000.0, center=False),
    FeatureSpec(clip_seconds=1.0, n_fft=512, hop_length=160, win_length=400, pad_mode="reflect", n_mels=40,
                mel_scale="htk", mel_norm=None, mel_range=(2, 38)),
    FeatureSpec(clip_seconds=0.3, hop_length=300, pad_mode="replicate"),
    FeatureSpec(clip_seconds=1.0, power=1.0),
], ids=["dcase", "tight22k", "hamming-nocenter", "htk-reflect", "hop300-replicate", "power1"])
def test_log_mel_equals_torchaudio_melspectrogram(spec: FeatureSpec) -> None:
    """LogMel's fast path computes exactly torchaudio's MelSpectrogram, then 10*log10(. + eps), gradients too."""
    import torchaudio

    window_fn = torch.hann_window if spec.window == "hann" else torch.hamming_window
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=spec.sample_rate, n_fft=spec.n_fft, win_length=spec.win_length, hop_length=spec.hop_length,
        f_min=spec.f_min, f_max=spec.f_max, n_mels=spec.n_mels, window_fn=window_fn, power=spec.power,
        center=spec.center, pad_mode=spec.pad_mode, norm=spec.mel_norm, mel_scale=spec.mel_scale)
    torch.manual_seed(0)
    x = (torch.randn(3, spec.clip_samples) * 0.1).requires_grad_(True)
    lo, hi = spec.mel_range or (0, spec.n_mels)
    ref = 10.0 * torch.log10(mel(x)[:, lo:hi] + spec.eps)
    ours = LogMel(spec)(x)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(LogMel(spec)(x.detach()), ref.detach(), atol=1e-4, rtol=0)
    g_ref, = torch.autograd.grad(ref.sum(), x)
    g_ours, = torch.autograd.grad(ours.sum(), x)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-3, rtol=1e-3)


def test_log_mel_matches_librosa_dcase_baseline(fixture_clip: Path) -> None:
    librosa = pytest.importorskip("librosa")
    y, sr = sf.read(fixture_clip, dtype="float32")
    ref = librosa.feature.melspectrogram(y=y, sr=sr, n_fft=1024, hop_length=512, n_mels=128, power=2.0)
    ref_db = 20.0 / 2.0 * np.log10(ref + sys.float_info.epsilon)
    ours = LogMel(FeatureSpec(eps=sys.float_info.epsilon))(torch.from_numpy(y)[None])[0].numpy()
    assert ours.shape == ref_db.shape == (128, 313)
    np.testing.assert_allclose(ours, ref_db, atol=2e-3, rtol=0)


def test_real_fixture_clip_loads_like_a_synthetic_one(fixture_clip: Path, tiny_root: Path) -> None:
    spec = FeatureSpec()
    for sr in (16000, 22050):
        w = audio.load(fixture_clip, sample_rate=sr, seconds=10.0)
        assert w.shape == (10 * sr,) and torch.isfinite(w).all() and w.abs().max() > 0
    synthetic = next((tiny_root / "fan" / "train").glob("*.wav"))
    for p in (fixture_clip, synthetic):
        feats = LogMel(spec)(audio.load(p, sample_rate=spec.sample_rate, seconds=spec.clip_seconds)[None])
        assert feats.shape == (1, 128, 313) and torch.isfinite(feats).all()


# ------------------------------------------------------------------------------------ feature store

def small_root(tiny_root: Path, dest: Path, n: int = 6) -> Path:
    """A copy of a few tiny clips (ID 00 of fan: train and test) to change freely."""
    meta = synth.read_meta(tiny_root)
    fan = meta[(meta.machine_type == "fan") & (meta.section == "00")]
    pick = list(fan[fan.split == "train"].file.iloc[: n - 2]) + list(fan[fan.split == "test"].file.iloc[[0, -1]])
    for f in pick:
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tiny_root / f, dest / f)
    return dest


SPEC3 = FeatureSpec(clip_seconds=3.0)


def test_store_extracts_once_then_hits_the_cache_without_decoding(tiny_root: Path, tmp_path: Path, monkeypatch) -> None:
    root = small_root(tiny_root, tmp_path / "data")
    cat = Catalog.scan(root)
    store = FeatureStore.open(cat, SPEC3, tmp_path / "cache", device="cpu", batch_size=4)
    assert store.extracted and len(store) == len(cat) == 6 and not store.failed
    assert store.features.shape == (6, 128, 94) and store.features.dtype == np.float32
    assert isinstance(store.features, np.memmap)
    key = f"{cat.content_key()}-{SPEC3.key()}"
    assert store.path == tmp_path / "cache" / "features" / key
    assert sorted(p.name for p in store.path.iterdir()) == ["features.npy", "index.csv", "meta.json"]
    assert json.loads((store.path / "meta.json").read_text())["shape"] == [6, 128, 94]
    # every row equals the single-clip reference computation, in catalog order or any other
    t = cat.table.iloc[::-1]
    ref = torch.stack([LogMel(SPEC3)(audio.load(p, seconds=3.0)[None])[0] for p in t["path"]])
    torch.testing.assert_close(store.get(t), ref, atol=1e-4, rtol=0)

    def no_decoding(*a, **k):
        raise AssertionError("a cache hit must not decode audio")

    monkeypatch.setattr(audio, "read", no_decoding)
    again = FeatureStore.open(Catalog.scan(root), SPEC3, tmp_path / "cache")
    assert not again.extracted and again.path == store.path
    np.testing.assert_array_equal(np.asarray(again.features), np.asarray(store.features))


def test_extract_batches_in_order_and_keeps_the_callers_torch_threads(tiny_root: Path) -> None:
    cat = Catalog.scan(tiny_root)
    t = cat.table.iloc[::37]
    before = torch.get_num_threads()
    seen, failed = [], []
    for ok, feats in extract(t, SPEC3, device="cpu", batch_size=3, workers=2, failed=failed):
        assert torch.get_num_threads() == before
        assert feats.shape == (len(ok), 128, 94) and feats.dtype == np.float32
        seen.extend(ok)
    assert seen == list(range(len(t))) and not failed
    assert torch.get_num_threads() == before


def test_store_key_changes_with_a_file_or_the_spec(tiny_root: Path, tmp_path: Path) -> None:
    root = small_root(tiny_root, tmp_path / "data")
    cache = tmp_path / "cache"
    cat = Catalog.scan(root)
    first = FeatureStore.open(cat, SPEC3, cache, batch_size=4)
    other_spec = FeatureStore.open(cat, SPEC3.with_crop("none"), cache, batch_size=4)
    assert other_spec.extracted and other_spec.path != first.path and other_spec.features.shape == (6, 64, 94)
    # rewrite one clip with other content: new key, new features for that clip only
    changed = cat.table["path"].iloc[2]
    sf.write(changed, tone(2000, 3.0, amp=0.2), SR, subtype="PCM_16")
    os.utime(changed, ns=(1_000_000_000, 1_000_000_000))
    cat2 = Catalog.scan(root)
    second = FeatureStore.open(cat2, SPEC3, cache, batch_size=4)
    assert second.extracted and second.path != first.path
    a, b = first.get(cat.table), second.get(cat2.table)
    differs = [not torch.equal(a[i], b[i]) for i in range(len(a))]
    assert differs == [i == 2 for i in range(len(a))]
    # touching a file (same bytes, new mtime) also invalidates
    os.utime(cat2.table["path"].iloc[0], ns=(2_000_000_000, 2_000_000_000))
    assert FeatureStore.open(Catalog.scan(root), SPEC3, cache, batch_size=4).extracted


def test_undecodable_clip_is_skipped_counted_and_named(tiny_root: Path, tmp_path: Path) -> None:
    root = small_root(tiny_root, tmp_path / "data")
    cat = Catalog.scan(root)
    bad = cat.table.iloc[1]
    Path(bad["path"]).write_bytes(b"")  # broken after the scan
    with pytest.warns(RuntimeWarning, match=bad["file"]):
        store = FeatureStore.open(cat, SPEC3, tmp_path / "cache", batch_size=4)
    assert [(f.file, f.offset) for f in store.failed] == [(bad["file"], 0)]
    assert "empty audio file" in store.failed[0].reason or "cannot decode" in store.failed[0].reason
    assert len(store) == 5 and store.features.shape[0] == 5
    rows = store.row_of(cat.table, missing="mark")
    assert rows.tolist() == [0, -1, 1, 2, 3, 4]
    with pytest.raises(KeyError, match=bad["file"]):
        store.row_of(cat.table)
    reopened = FeatureStore.open(cat, SPEC3, tmp_path / "cache")  # the failure is remembered by the cache
    assert not reopened.extracted and [f.file for f in reopened.failed] == [bad["file"]]


def test_interrupted_extraction_leaves_no_cache(tiny_root: Path, tmp_path: Path, monkeypatch) -> None:
    root = small_root(tiny_root, tmp_path / "data")
    cat = Catalog.scan(root)
    real = audio.read
    calls = []

    def crash(*a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(audio, "read", crash)
    with pytest.raises(KeyboardInterrupt):
        FeatureStore.open(cat, SPEC3, tmp_path / "cache", batch_size=2, workers=1)
    assert [p.name for p in (tmp_path / "cache" / "features").iterdir() if not p.name.endswith(".lock")] == []
    monkeypatch.setattr(audio, "read", real)
    store = FeatureStore.open(cat, SPEC3, tmp_path / "cache", batch_size=2)
    assert store.extracted and len(store) == 6


def test_store_resamples_mixed_rates_and_features_real_and_synthetic_alike(
        fixture_clip: Path, tiny_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    (root / "fan" / "train").mkdir(parents=True)
    shutil.copy(fixture_clip, root / "fan" / "train" / "normal_id_00_00000000.wav")
    synthetic = next((tiny_root / "fan" / "train").glob("*.wav"))
    x, _ = sf.read(synthetic, dtype="float32")
    sf.write(root / "fan" / "train" / "normal_id_00_00000001.wav", x, SR, subtype="PCM_16")
    stereo_22k = audio.resample(torch.from_numpy(x), SR, 22050).numpy()
    sf.write(root / "fan" / "train" / "normal_id_02_00000000.wav", np.stack([stereo_22k, stereo_22k], 1), 22050)
    cat = Catalog.scan(root)
    assert sorted(cat.table["sample_rate"]) == [16000, 16000, 22050]
    spec = FeatureSpec()  # 16 kHz, 10 s: short clips are right-padded
    store = FeatureStore.open(cat, spec, tmp_path / "cache", batch_size=3)
    f = store.get(cat.table)
    assert f.shape == (3, 128, 313) and torch.isfinite(f).all()
    ref = torch.stack([LogMel(spec)(audio.load(p, sample_rate=SR, seconds=10.0)[None])[0] for p in cat.table["path"]])
    torch.testing.assert_close(f, ref, atol=1e-3, rtol=0)
    # the 22,050 Hz stereo copy of a synthetic clip comes back close to the original
    same = f[1, :, :90] - f[2, :, :90]
    assert same[:120].abs().median() < 0.5


@pytest.mark.cuda
def test_cuda_extraction_matches_cpu(tiny_root: Path, tmp_path: Path) -> None:
    root = small_root(tiny_root, tmp_path / "data")
    cat = Catalog.scan(root)
    cpu = FeatureStore.open(cat, SPEC3, tmp_path / "cpu", device="cpu")
    gpu = FeatureStore.open(cat, SPEC3, tmp_path / "gpu", device="cuda")
    assert gpu.meta["device"].startswith("cuda")
    torch.testing.assert_close(gpu.get(cat.table), cpu.get(cat.table), atol=1e-2, rtol=0)


def test_store_of_a_recording_folder_reads_each_clip_of_a_long_file(tmp_path: Path) -> None:
    root = tmp_path / "site"
    root.mkdir()
    sr = 22050
    x = np.concatenate([tone(3000.0 + 1000.0 * k, 1.0, sr) for k in range(4)] + [tone(300.0, 0.6, sr)])
    sf.write(root / "morning.wav", x, sr, subtype="PCM_16")
    cat = Catalog.scan(root, clip_seconds=1.0)
    assert cat.layout == "recordings" and cat.table["offset"].tolist() == [0, sr, 2 * sr, 3 * sr, 4 * sr]
    spec = FeatureSpec(sample_rate=sr, clip_seconds=1.0).with_crop("crop")
    store = FeatureStore.open(cat, spec, tmp_path / "cache", batch_size=2)
    f = store.get(cat.table)
    assert f.shape == (5, 64, sr // 512 + 1)
    for k, row in enumerate(cat.table.itertuples()):
        ref = LogMel(spec)(audio.load(row.path, row.offset, row.num_samples, sr, 1.0)[None])[0]
        torch.testing.assert_close(f[k], ref, atol=1e-3, rtol=0)
    # clip k holds a tone of 3+k kHz (inside the kept bands): its loudest band moves up clip by clip
    loudest = f[:4].mean(dim=2).argmax(dim=1)
    assert (loudest[1:] > loudest[:-1]).all()


KILLED_WRITER = """
import sys, time
from pathlib import Path

from raysd.data import store
from raysd.data.catalog import Catalog
from raysd.data.features import FeatureSpec

real = store.extract


def one_batch_then_wait(*args, **kwargs):
    for item in real(*args, **kwargs):
        yield item
        print("written", flush=True)  # the first batch is going to disk; the parent kills us while we wait
        time.sleep(600)


store.extract = one_batch_then_wait
store.FeatureStore.open(Catalog.scan(Path(sys.argv[1])), FeatureSpec(clip_seconds=3.0), sys.argv[2], device="cpu",
                        batch_size=2, workers=1)
"""


def test_a_killed_writers_partial_cache_is_removed_by_the_next_open(tiny_root: Path, tmp_path: Path) -> None:
    import signal
    import subprocess

    root = small_root(tiny_root, tmp_path / "data")
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root), str(cache)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "written"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (partial,) = (cache / "features").glob(".*.tmp-*")
    assert (partial / "features.npy").exists() and str(proc.pid) in partial.name

    cat = Catalog.scan(root)
    store = FeatureStore.open(cat, SPEC3, cache, device="cpu", batch_size=4)
    assert store.extracted and not list((cache / "features").glob(".*.tmp-*"))
    fresh = FeatureStore.open(cat, SPEC3, tmp_path / "fresh", device="cpu", batch_size=4)
    np.testing.assert_array_equal(np.asarray(store.features), np.asarray(fresh.features))


def test_a_running_writers_temporary_folder_is_kept(tmp_path: Path) -> None:
    from raysd.data.store import remove_dead_writers

    root = tmp_path / "features"
    mine = root / f".key.tmp-{os.getpid()}-0123abcd@{__import__('socket').gethostname()}"
    elsewhere = root / ".key.tmp-999999999-0123abcd@another-host"
    dead = root / ".key.tmp-999999999-0123abcd"  # an older raysd's name, without a host: this host's
    for d in (mine, elsewhere, dead):
        d.mkdir(parents=True)
    assert remove_dead_writers(root) == [dead]
    assert mine.exists() and elsewhere.exists() and not dead.exists()
