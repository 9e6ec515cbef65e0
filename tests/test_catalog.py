"""Catalog: every layout from generated files, bad files, bad roots, CSV round trip, CLI and content key."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from raysd.data.catalog import COLUMNS, LAYOUT_HELP, Catalog, CatalogError, main

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "dcase2020" / "normal_id_00_00000000.wav"


def wav(path: Path, seconds: float = 0.1, sr: int = 16000, channels: int = 1, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(round(seconds * sr))
    data = np.random.default_rng(len(str(path))).uniform(-0.1, 0.1, (n, channels) if channels > 1 else n)
    sf.write(path, data.astype("float32"), sr, format=fmt)
    return path


def rows_by_name(cat: Catalog) -> dict[str, pd.Series]:
    return {Path(f).name: r for f, (_, r) in zip(cat.table["file"], cat.table.iterrows())}


# ---------------------------------------------------------------------------------------------- DCASE 2020
def make_2020(root: Path) -> None:
    """A root holding dev_data/ and eval_data/ as the Zenodo archives unpack, with made-up machine types."""
    dev, ev = root / "dev_data", root / "eval_data"
    wav(dev / "fan/train/normal_id_00_00000000.wav")
    wav(dev / "fan/train/normal_id_02_00000000.wav")
    wav(dev / "fan/test/normal_id_00_00000000.wav")
    wav(dev / "fan/test/anomaly_id_00_00000000.wav")
    wav(dev / "ToyWhatever/train/normal_id_07_00000003.wav", sr=8000)
    wav(dev / "ToyWhatever/test/anomaly_id_07_00000001.wav", sr=8000)
    wav(ev / "fan/train/normal_id_01_00000000.wav")  # additional training data
    wav(ev / "fan/test/id_01_00000000.wav")  # unlabelled evaluation clip
    wav(ev / "fan/test/id_01_00000001.wav")


def test_dcase2020_dev_and_eval_parents_are_merged(tmp_path):
    make_2020(tmp_path)
    (tmp_path / "README.txt").write_text("not audio")
    cat = Catalog.scan(tmp_path)
    t = cat.table
    assert list(t.columns) == list(COLUMNS)
    assert cat.layout == "dcase2020" and len(cat) == 9 and cat.skipped == []
    assert set(t["layout"]) == {"dcase2020"}
    assert cat.machine_types == ["ToyWhatever", "fan"]
    assert (t["offset"] == 0).all() and (t["domain"] == "").all() and (t["attributes"] == "").all()
    assert (t["recording"] == t["file"]).all()
    assert all(Path(p).is_absolute() and Path(p).exists() for p in t["path"])
    r = {f: row for f, (_, row) in zip(t["file"], t.iterrows())}
    a = r["dev_data/fan/test/anomaly_id_00_00000000.wav"]
    assert (a["machine_type"], a["section"], a["split"], a["label"], a["num_samples"], a["sample_rate"]) == (
        "fan", "00", "test", 1, 1600, 16000)
    n = r["dev_data/fan/test/normal_id_00_00000000.wav"]
    assert (n["split"], n["label"]) == ("test", 0)
    toy = r["dev_data/ToyWhatever/train/normal_id_07_00000003.wav"]
    assert (toy["machine_type"], toy["section"], toy["split"], toy["sample_rate"], toy["num_samples"]) == (
        "ToyWhatever", "07", "train", 8000, 800)
    extra = r["eval_data/fan/train/normal_id_01_00000000.wav"]
    assert (extra["machine_type"], extra["section"], extra["split"], extra["label"]) == ("fan", "01", "train", 0)
    unl = t[t["file"].str.startswith("eval_data/fan/test/")]
    assert len(unl) == 2 and unl["label"].isna().all() and (unl["section"] == "01").all()
    assert t["label"].dtype == "Int8"
    s = cat.summary()
    assert "dcase2020" in s and "unlabelled" in s and "ToyWhatever" in s and "skipped files: none" in s


def test_dcase2020_zenodo_archives_unpacked_into_one_folder_and_machine_folder_as_root(tmp_path):
    # dev_data_fan.zip, eval_data_train_fan.zip and eval_data_test_fan.zip all unpack to fan/{train,test}
    wav(tmp_path / "fan/train/normal_id_00_00000000.wav")
    wav(tmp_path / "fan/train/normal_id_01_00000000.wav")
    wav(tmp_path / "fan/test/anomaly_id_00_00000000.wav")
    wav(tmp_path / "fan/test/id_01_00000000.wav")
    cat = Catalog.scan(tmp_path)
    assert len(cat) == 4 and set(cat.table["machine_type"]) == {"fan"}
    assert sorted(cat.table["section"].unique()) == ["00", "01"]
    # pointing at the machine type folder itself works too
    one = Catalog.scan(tmp_path / "fan")
    assert len(one) == 4 and set(one.table["machine_type"]) == {"fan"}
    assert set(one.table["file"]) == {f.removeprefix("fan/") for f in cat.table["file"]}
    split_root = Catalog.scan(tmp_path / "fan" / "train")  # or at one split folder
    assert len(split_root) == 2 and set(split_root.table["machine_type"]) == {"fan"}
    assert set(split_root.table["split"]) == {"train"}


def test_symlinked_data_folders_are_followed(tmp_path):
    make_2020(tmp_path / "disk")
    root = tmp_path / "root"
    root.mkdir()
    (root / "dev_data").symlink_to(tmp_path / "disk" / "dev_data", target_is_directory=True)
    (root / "dev_data_again").symlink_to(tmp_path / "disk" / "dev_data", target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    cat = Catalog.scan(root)
    assert len(cat) == 6  # dev_data only once, no endless loop
    assert all(p.startswith(str(root / "dev_data") + os.sep) for p in cat.table["path"])


def test_dcase2020_non_matching_name_is_named_in_the_error(tmp_path):
    make_2020(tmp_path)
    wav(tmp_path / "dev_data/fan/test/recording_42.wav")
    with pytest.raises(CatalogError) as e:
        Catalog.scan(tmp_path)
    msg = str(e.value)
    assert "dev_data/fan/test/recording_42.wav" in msg
    assert "{normal,anomaly}_id_XX_NNNNNNNN.wav" in msg


def test_dcase_file_outside_split_folder_and_duplicates_are_errors(tmp_path):
    wav(tmp_path / "a/fan/train/normal_id_00_00000000.wav")
    wav(tmp_path / "a/fan/extra/normal_id_00_00000001.wav")
    with pytest.raises(CatalogError, match=r"a/fan/extra/normal_id_00_00000001\.wav.*'extra'"):
        Catalog.scan(tmp_path)
    shutil.rmtree(tmp_path / "a/fan/extra")
    wav(tmp_path / "b/fan/train/normal_id_00_00000000.wav")  # same clip unpacked twice
    with pytest.raises(CatalogError, match=r"duplicate of a/fan/train/normal_id_00_00000000\.wav"):
        Catalog.scan(tmp_path)


def test_unreadable_and_empty_wavs_are_skipped_with_a_warning_and_counted(tmp_path):
    make_2020(tmp_path)
    empty = tmp_path / "dev_data/fan/test/normal_id_00_00000009.wav"
    empty.write_bytes(b"")
    corrupt = tmp_path / "dev_data/fan/test/anomaly_id_00_00000009.wav"
    corrupt.write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk" * 4)
    no_frames = wav(tmp_path / "dev_data/fan/test/anomaly_id_00_00000010.wav", seconds=0.0)
    with pytest.warns(UserWarning, match="skipped 3 audio file") as rec:
        cat = Catalog.scan(tmp_path)
    assert "normal_id_00_00000009.wav" in str(rec[0].message)
    assert len(cat) == 9
    reasons = dict(cat.skipped)
    assert set(reasons) == {f"dev_data/fan/test/{p.name}" for p in (empty, corrupt, no_frames)}
    assert "0 bytes" in reasons["dev_data/fan/test/normal_id_00_00000009.wav"]
    assert "unreadable audio header" in reasons["dev_data/fan/test/anomaly_id_00_00000009.wav"]
    assert "0 frames" in reasons["dev_data/fan/test/anomaly_id_00_00000010.wav"]
    s = cat.summary()
    assert "skipped 3 file(s)" in s and "anomaly_id_00_00000009.wav: unreadable audio header" in s


def test_real_dcase2020_clip_is_cataloged(tmp_path):
    if not FIXTURE.exists():
        pytest.skip(f"fixture {FIXTURE} not present in this checkout")
    (tmp_path / "fan/train").mkdir(parents=True)
    shutil.copy(FIXTURE, tmp_path / "fan/train" / FIXTURE.name)
    row = Catalog.scan(tmp_path).table.iloc[0]
    assert (row["num_samples"], row["sample_rate"], row["section"], row["label"]) == (160000, 16000, "00", 0)


# ---------------------------------------------------------------------------------------------- DCASE 2021
def make_2021(root: Path) -> None:
    m = root / "gearbox"
    wav(m / "train/section_00_source_train_normal_0000_volt_1.0_wt_30.wav")
    wav(m / "train/section_00_target_train_normal_0000_volt_1.5_wt_30.wav")
    wav(m / "train/section_01_source_train_normal_0000_volt_1.0.wav")
    wav(m / "source_test/section_00_source_test_normal_0000.wav")
    wav(m / "source_test/section_00_source_test_anomaly_0001.wav")
    wav(m / "target_test/section_00_target_test_normal_0000.wav")
    wav(m / "target_test/section_00_target_test_anomaly_0001.wav")
    wav(m / "source_test/section_03_source_test_0000.wav")  # unlabelled evaluation clips
    wav(m / "target_test/section_03_target_test_0000.wav")


def test_dcase2021_layout(tmp_path):
    make_2021(tmp_path)
    cat = Catalog.scan(tmp_path)
    assert cat.layout == "dcase2021" and len(cat) == 9
    r = rows_by_name(cat)
    tr = r["section_00_source_train_normal_0000_volt_1.0_wt_30.wav"]
    assert (tr["machine_type"], tr["section"], tr["domain"], tr["split"], tr["label"], tr["attributes"]) == (
        "gearbox", "00", "source", "train", 0, "volt_1.0_wt_30")
    assert r["section_00_target_train_normal_0000_volt_1.5_wt_30.wav"]["domain"] == "target"
    an = r["section_00_target_test_anomaly_0001.wav"]
    assert (an["domain"], an["split"], an["label"], an["attributes"]) == ("target", "test", 1, "")
    ev = r["section_03_target_test_0000.wav"]
    assert (ev["section"], ev["domain"], ev["split"]) == ("03", "target", "test") and pd.isna(ev["label"])
    counts = cat.table.groupby(["split", "domain"]).size().to_dict()
    assert counts == {("test", "source"): 3, ("test", "target"): 3, ("train", "source"): 2, ("train", "target"): 1}


def test_name_that_contradicts_its_folder_is_an_error(tmp_path):
    make_2021(tmp_path)
    wav(tmp_path / "gearbox/target_test/section_00_source_test_normal_0005.wav")
    with pytest.raises(CatalogError, match=r"section_00_source_test_normal_0005\.wav: the name says 'source'"):
        Catalog.scan(tmp_path)


# ---------------------------------------------------------------------------------------------- DCASE 2022-2024
def make_2022(root: Path) -> None:
    m = root / "dev_data/raw/bearing"
    wav(m / "train/section_00_source_train_normal_0000_vel_6_loc_A.wav")
    wav(m / "train/section_00_target_train_normal_0000_vel_14_loc_B.wav")
    wav(m / "train/section_01_source_train_normal_0000_vel_6_loc_A.wav")
    wav(m / "test/section_00_source_test_normal_0000_vel_6_loc_A.wav")
    wav(m / "test/section_00_target_test_anomaly_0000_vel_14_loc_B.wav")
    wav(m / "test/section_01_source_test_anomaly_0000_noAttribute.wav")
    (m / "attributes_00.csv").write_text(
        "file_name,d1p,d1v,d2p,d2v\n"
        "bearing/train/section_00_source_train_normal_0000_vel_6_loc_A.wav,vel,6,loc,A\n"
        "bearing/test/section_00_source_test_normal_0000_vel_6_loc_A.wav,vel,6,loc,A\n"
        "bearing/test/section_00_target_test_anomaly_0000_vel_14_loc_B.wav,vel,14,loc,B\n"
        "bearing/test/section_00_not_downloaded_0000.wav,vel,1,loc,C\n"
    )
    e = root / "eval_data/raw/Vacuum"
    wav(e / "train/section_00_source_train_normal_0000_d1_3.wav")
    wav(e / "test/section_00_0001.wav")  # unlabelled evaluation clips, with and without "test_"
    wav(e / "test/section_00_test_0002.wav")
    (e / "attributes_00.csv").write_text(
        "file_name,d1p,d1v,d2p,d2v\n"
        "Vacuum/test/section_00_0001.wav,d1,3,,\n"
        "Vacuum/test/section_00_test_0002.wav,noAttribute,,,\n"
    )


def test_dcase2022_layout_with_attribute_csvs(tmp_path):
    make_2022(tmp_path)
    cat = Catalog.scan(tmp_path)
    assert cat.layout == "dcase2022" and len(cat) == 9
    assert cat.machine_types == ["Vacuum", "bearing"]
    r = rows_by_name(cat)
    tr = r["section_00_target_train_normal_0000_vel_14_loc_B.wav"]  # not in the csv: name suffix kept
    assert (tr["section"], tr["domain"], tr["split"], tr["label"], tr["attributes"]) == (
        "00", "target", "train", 0, "vel_14_loc_B")
    assert r["section_00_source_train_normal_0000_vel_6_loc_A.wav"]["attributes"] == "vel=6;loc=A"
    an = r["section_00_target_test_anomaly_0000_vel_14_loc_B.wav"]
    assert (an["domain"], an["split"], an["label"], an["attributes"]) == ("target", "test", 1, "vel=14;loc=B")
    assert r["section_01_source_test_anomaly_0000_noAttribute.wav"]["attributes"] == "noAttribute"
    for name, attrs in (("section_00_0001.wav", "d1=3"), ("section_00_test_0002.wav", "noAttribute")):
        ev = r[name]
        assert (ev["machine_type"], ev["section"], ev["domain"], ev["split"], ev["attributes"]) == (
            "Vacuum", "00", "", "test", attrs)
        assert pd.isna(ev["label"])


def test_malformed_attribute_csv_is_named(tmp_path):
    make_2022(tmp_path)
    (tmp_path / "dev_data/raw/bearing/attributes_01.csv").write_text("name;attr\nx;y\n")
    with pytest.raises(CatalogError, match=r"attributes_01\.csv: expected a header 'file_name,d1p,d1v"):
        Catalog.scan(tmp_path)


def test_mixed_or_mismatching_layouts_are_errors(tmp_path):
    make_2022(tmp_path / "a")
    with pytest.raises(CatalogError, match="layout 'dcase2020' was requested but the files .* use dcase2022"):
        Catalog.scan(tmp_path / "a", layout="dcase2020")
    make_2020(tmp_path / "a")
    with pytest.raises(CatalogError, match="mixes DCASE 2020 names"):
        Catalog.scan(tmp_path / "a")


# ---------------------------------------------------------------------------------------------- recordings
def test_recordings_are_cut_into_clips_from_the_header_only(tmp_path, monkeypatch):
    sr = 22050
    wav(tmp_path / "siteA/long.wav", seconds=10.5, sr=sr)  # 10 full clips + 0.5 s rest: kept
    wav(tmp_path / "siteA/cut.wav", seconds=10.4, sr=sr)  # 10 full clips + 0.4 s rest: dropped
    wav(tmp_path / "siteB/night/stereo.flac", seconds=2.0, sr=sr, channels=2, fmt="FLAC")
    wav(tmp_path / "root_clip.wav", seconds=0.6, sr=sr)  # one partial clip
    wav(tmp_path / "tiny.wav", seconds=0.3, sr=sr)  # shorter than half a clip

    def no_decoding(*args, **kwargs):
        raise AssertionError("the catalog must not decode audio")

    monkeypatch.setattr(sf, "read", no_decoding)
    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)
    with pytest.warns(UserWarning, match="tiny.wav"):
        cat = Catalog.scan(tmp_path)
    t = cat.table
    assert cat.layout == "recordings"
    long = t[t["file"] == "siteA/long.wav"]
    assert len(long) == 11
    assert long["offset"].tolist() == [k * sr for k in range(11)]
    assert long["num_samples"].tolist() == [sr] * 10 + [sr // 2]
    assert len(t[t["file"] == "siteA/cut.wav"]) == 10
    stereo = t[t["file"] == "siteB/night/stereo.flac"]
    assert stereo["offset"].tolist() == [0, sr] and (stereo["machine_type"] == "siteB/night").all()
    root_clip = t[t["file"] == "root_clip.wav"]
    assert root_clip["num_samples"].tolist() == [int(round(0.6 * sr))]
    assert root_clip["machine_type"].tolist() == ["recordings"]
    assert set(t.loc[t["file"].str.startswith("siteA/"), "machine_type"]) == {"siteA"}
    assert (t["split"] == "train").all() and t["label"].isna().all() and (t["section"] == "00").all()
    assert (t["domain"] == "").all() and (t["recording"] == t["file"]).all() and (t["sample_rate"] == sr).all()
    assert not t.duplicated(["file", "offset"]).any()
    assert [p for p, _ in cat.skipped] == ["tiny.wav"] and "shorter than half a clip" in cat.skipped[0][1]
    assert "h of audio in clips of 1 s" in cat.summary()

    with pytest.warns(UserWarning, match="root_clip.wav"):  # 0.6 s is now less than half a clip
        two = Catalog.scan(tmp_path, clip_seconds=2.0)  # 10.5 s = 5 clips of 2 s + 0.5 s (a quarter clip): dropped
    long2 = two.table[two.table["file"] == "siteA/long.wav"]
    assert long2["offset"].tolist() == [k * 2 * sr for k in range(5)]
    assert two.content_key() != cat.content_key()


def test_dcase_root_can_be_read_as_plain_recordings(tmp_path):
    make_2020(tmp_path)
    cat = Catalog.scan(tmp_path, layout="recordings", clip_seconds=0.05)
    assert cat.layout == "recordings" and len(cat) == 18  # 9 files of 0.1 s, 2 clips each
    assert "dev_data/fan/test" in set(cat.table["machine_type"])


# ---------------------------------------------------------------------------------------------- bad roots
def test_missing_empty_and_layoutless_roots_are_clear_errors(tmp_path):
    with pytest.raises(CatalogError, match="does not exist") as e:
        Catalog.scan(tmp_path / "nope")
    assert LAYOUT_HELP in str(e.value)
    assert "<root>/<machine_type>/train/normal_id_00_00000000.wav" in str(e.value)
    with pytest.raises(CatalogError, match="holds no audio files") as e:
        Catalog.scan(tmp_path)
    assert "dcase2021" in str(e.value) and "recordings" in str(e.value)
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "features.npy").write_bytes(b"\x93NUMPY")
    with pytest.raises(CatalogError, match="holds no audio files"):
        Catalog.scan(tmp_path)
    with pytest.raises(CatalogError, match="is not a folder"):
        Catalog.scan(tmp_path / "notes.txt")
    wav(tmp_path / "x/field.wav")
    with pytest.raises(CatalogError, match=r"layout 'dcase2022' was requested .* x/field\.wav"):
        Catalog.scan(tmp_path, layout="dcase2022")
    with pytest.raises(CatalogError, match="unknown layout"):
        Catalog.scan(tmp_path, layout="dcase2019")
    (tmp_path / "x/field.wav").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(CatalogError, match="no usable audio clip"):
        Catalog.scan(tmp_path)
    assert issubclass(CatalogError, ValueError)


# ---------------------------------------------------------------------------------------------- persistence, CLI, key
def test_csv_round_trip_preserves_dtypes_and_key(tmp_path):
    make_2022(tmp_path / "data")
    cat = Catalog.scan(tmp_path / "data")
    out = cat.to_csv(tmp_path / "cat.csv")
    back = Catalog.from_csv(out)
    pd.testing.assert_frame_equal(back.table, cat.table)
    assert back.table["section"].tolist()[0] == "00" and back.table["label"].dtype == "Int8"
    assert back.table["label"].isna().sum() == 2
    assert back.layout == cat.layout and back.root == cat.root
    assert back.content_key() == cat.content_key()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.csv", "data"]  # no temporary file left


def test_csv_with_bad_label_is_named(tmp_path):
    make_2020(tmp_path / "data")
    Catalog.scan(tmp_path / "data").to_csv(tmp_path / "cat.csv")
    df = pd.read_csv(tmp_path / "cat.csv", dtype=str, keep_default_na=False)
    df.loc[3, "label"] = "maybe"
    df.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(CatalogError, match="row 5 has 'maybe'"):
        Catalog.from_csv(tmp_path / "bad.csv")


def test_cli_prints_summary_and_writes_csv(tmp_path, capsys):
    make_2021(tmp_path / "data")
    out = tmp_path / "out" / "catalog.csv"
    assert main([str(tmp_path / "data"), "--csv", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "layout dcase2021" in printed and "gearbox" in printed and f"wrote 9 rows to {out}" in printed
    table = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(table.columns) == list(COLUMNS) and len(table) == 9
    assert sorted(p.name for p in out.parent.iterdir()) == ["catalog.csv"]  # no temporary file left
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_module_entry_point(tmp_path):
    wav(tmp_path / "data/rec.wav", seconds=2.5, sr=8000)
    out = tmp_path / "c.csv"
    proc = subprocess.run(
        [sys.executable, "-m", "raysd.data.catalog", str(tmp_path / "data"), "--csv", str(out), "--clip-seconds", "0.5"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "layout recordings" in proc.stdout and "5 clips" in proc.stdout
    assert len(pd.read_csv(out)) == 5


def test_content_key_tracks_file_changes(tmp_path):
    make_2020(tmp_path)
    k1 = Catalog.scan(tmp_path).content_key()
    assert Catalog.scan(tmp_path).content_key() == k1
    target = tmp_path / "dev_data/fan/test/anomaly_id_00_00000000.wav"
    st = target.stat()
    wav(target, seconds=0.2)  # content and size change
    k2 = Catalog.scan(tmp_path).content_key()
    assert k2 != k1
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # same bytes, new mtime
    k3 = Catalog.scan(tmp_path).content_key()
    assert k3 not in (k1, k2)
    wav(tmp_path / "dev_data/fan/test/anomaly_id_00_00000001.wav")  # a new file
    assert Catalog.scan(tmp_path).content_key() not in (k1, k2, k3)
