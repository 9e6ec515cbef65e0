"""raysd.data.download against a fake Zenodo on loopback (http.server on 127.0.0.1, port 0): a record JSON
plus zips of tiny synthetic WAVs, served with HTTP Range support. Never reaches the internet."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import stat
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from raysd.data import download as dl
from raysd.data.catalog import Catalog


def wav_bytes(seed: int, n: int = 800) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.random.default_rng(seed).uniform(-0.5, 0.5, n).astype("float32"), 16000, subtype="PCM_16",
             format="WAV")
    return buf.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def dcase2020_archives(types=("fan", "ToyCar")) -> dict[str, dict[str, bytes]]:
    """record id -> {file name: zip bytes} for the three DCASE 2020 records, in the real archives' layout."""
    dev, extra, evaluation = {}, {}, {}
    for k, mt in enumerate(types):
        ids_dev, ids_eval = ("00", "02"), ("01", "03")
        dev[f"dev_data_{mt}.zip"] = make_zip({
            **{f"{mt}/train/normal_id_{i}_{n:08d}.wav": wav_bytes(100 * k + n) for i in ids_dev for n in range(3)},
            **{f"{mt}/test/{lab}_id_{i}_{n:08d}.wav": wav_bytes(200 * k + n) for i in ids_dev
               for lab in ("normal", "anomaly") for n in range(2)},
        })
        extra[f"eval_data_train_{mt}.zip"] = make_zip(
            {f"{mt}/train/normal_id_{i}_{n:08d}.wav": wav_bytes(300 * k + n) for i in ids_eval for n in range(2)})
        evaluation[f"eval_data_test_{mt}.zip"] = make_zip(
            {f"{mt}/test/id_{i}_{n:08d}.wav": wav_bytes(400 * k + n) for i in ids_eval for n in range(2)})
    return {"3678171": dev, "3727685": extra, "3841772": evaluation}


class FakeZenodo:
    """``/api/records/<id>`` (JSON listing) and ``/api/records/<id>/files/<key>/content`` (bytes, Range)."""

    def __init__(self, records: dict[str, dict[str, bytes]]):
        self.records = records
        self.listed_md5: dict[str, str] = {}  # key -> MD5 to list instead of the real one
        self.drop_after: dict[str, int] = {}  # key -> bytes sent before dropping the connection (first GET only)
        self.ignore_range: set[str] = set()
        self.fail_once: set[str] = set()  # paths answered once with 503 Service Unavailable
        self.log: list[tuple[str, str | None]] = []  # (path, Range header)
        self.sent: dict[str, int] = {}
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                rng = self.headers.get("Range")
                with outer.lock:
                    outer.log.append((self.path, rng))
                    fail = self.path in outer.fail_once
                    outer.fail_once.discard(self.path)
                if fail:
                    self.send_response(503)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                m = re.fullmatch(r"/api/records/(\d+)", self.path)
                if m and m[1] in outer.records:
                    return self._json(outer.listing(m[1], f"http://{self.headers['Host']}"))
                m = re.fullmatch(r"/api/records/(\d+)/files/([^/]+)/content", self.path)
                if not m or m[2] not in outer.records.get(m[1], {}):
                    self.send_error(404)
                    return
                self._file(m[2], outer.records[m[1]][m[2]], rng)

            def _json(self, obj):
                body = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, key, data, rng):
                start = 0
                if rng and key not in outer.ignore_range:
                    start = int(re.fullmatch(r"bytes=(\d+)-", rng)[1])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                with outer.lock:
                    cut = outer.drop_after.pop(key, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    body = body[:cut]
                else:
                    self.wfile.write(body)
                with outer.lock:
                    outer.sent[key] = outer.sent.get(key, 0) + len(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def listing(self, record: str, host: str) -> dict:
        files = [{"key": key, "size": len(data), "checksum": f"md5:{self.listed_md5.get(key, md5(data))}",
                  "links": {"self": f"{host}/api/records/{record}/files/{key}/content"}}
                 for key, data in self.records[record].items()]
        return {"id": int(record), "files": files + [{"key": "README.txt", "size": 3, "checksum": "md5:" + "0" * 32}]}

    def file_requests(self) -> list[tuple[str, str | None]]:
        return [(p, r) for p, r in self.log if p.endswith("/content")]


@pytest.fixture
def zenodo():
    servers = []

    def start(records: dict[str, dict[str, bytes]]) -> FakeZenodo:
        z = FakeZenodo(records)
        z.thread.start()
        servers.append(z)
        return z

    yield start
    for z in servers:
        z.server.shutdown()
        z.server.server_close()


def pins(records: dict[str, dict[str, bytes]]) -> dict[str, str]:
    return {key: md5(data) for files in records.values() for key, data in files.items()}


def fetch(z: FakeZenodo, dest: Path, dataset: str = "dcase20", **kw) -> dl.Report:
    kw.setdefault("pinned_md5", {})
    return dl.download(dataset, dest, base_url=z.url, backoff=0.0, timeout=10, jobs=3,
                       progress=dl.Progress(io.StringIO(), bars=False), **kw)


def leftovers(root: Path) -> list[str]:
    """Temporary or partial files anywhere under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.startswith(".raysd-unpack-") or p.name.endswith((".part", ".tmp")))


def audio_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.wav"))


# ------------------------------------------------------------------------------------------------ tests
def test_complete_download_unpacks_into_catalog_layout(zenodo, tmp_path, capsys, monkeypatch):
    records = dcase2020_archives()
    z = zenodo(records)
    monkeypatch.setitem(dl.PINNED_MD5, "dcase20", pins(records))  # the real pins cannot match synthetic zips
    rc = dl.main(["dcase20", "--dest", str(tmp_path), "--base-url", z.url, "--jobs", "3"])
    out = capsys.readouterr()
    root = tmp_path / "dcase2020"
    assert rc == 0, out.err
    assert f"--data-root {root}" in out.out and "python -m raysd.search dcase20" in out.out
    assert "MD5 ok" in out.err

    cat = Catalog.scan(root)
    t = cat.table
    assert cat.layout == "dcase2020" and not cat.skipped
    assert cat.machine_types == ["ToyCar", "fan"]
    assert len(t) == 2 * (6 + 8 + 4 + 4)
    fan = t[t.machine_type == "fan"]
    assert sorted(fan[fan.split == "train"].section.unique()) == ["00", "01", "02", "03"]
    test = fan[fan.split == "test"]
    assert test.label.isna().sum() == 4 and (test.label == 1).sum() == 4 and (test.label == 0).sum() == 4
    assert (root / "fan" / "train" / "normal_id_01_00000000.wav").read_bytes() == wav_bytes(0)

    assert leftovers(tmp_path) == []
    state = sorted(p.name for p in (root / dl.STATE_DIR).iterdir())
    assert state == sorted(f"{k}.done" for k in pins(records))  # archives deleted, one marker each

    # a second run finds everything unpacked and downloads nothing
    before = len(z.file_requests())
    report = fetch(z, tmp_path, pinned_md5=pins(records))
    assert len(report.already) == 6 and not report.unpacked and len(z.file_requests()) == before


def test_machine_type_and_part_selection(zenodo, tmp_path):
    records = dcase2020_archives()
    z = zenodo(records)
    report = fetch(z, tmp_path, parts=["dev"], machine_types=["FAN"])
    assert report.unpacked == ["dev_data_fan.zip"] and not report.failed
    assert [p for p, _ in z.file_requests()] == ["/api/records/3678171/files/dev_data_fan.zip/content"]
    assert {Path(f).parts[0] for f in audio_files(report.data_root)} == {"fan"}

    with pytest.raises(dl.DownloadError, match=r"machine type\(s\) gearbox .*available: fan, ToyCar"):
        fetch(z, tmp_path, parts=["dev"], machine_types=["gearbox"])
    with pytest.raises(dl.DownloadError, match="unknown part"):
        fetch(z, tmp_path, parts=["dev", "train"])


def test_interrupted_download_resumes_with_range(zenodo, tmp_path):
    records = dcase2020_archives(types=("fan",))
    data = records["3678171"]["dev_data_fan.zip"]
    z = zenodo(records)
    cut = len(data) // 3
    z.drop_after["dev_data_fan.zip"] = cut  # the first GET breaks off after a third of the file
    report = fetch(z, tmp_path, parts=["dev"], pinned_md5=pins(records))
    assert report.unpacked == ["dev_data_fan.zip"] and not report.failed
    gets = z.file_requests()
    assert gets == [(gets[0][0], None), (gets[0][0], f"bytes={cut}-")]
    assert z.sent["dev_data_fan.zip"] == len(data)  # nothing was downloaded twice
    assert len(audio_files(report.data_root)) == 14 and leftovers(tmp_path) == []


def test_partial_file_from_an_earlier_run_is_continued(zenodo, tmp_path):
    records = dcase2020_archives(types=("fan",))
    data = records["3727685"]["eval_data_train_fan.zip"]
    z = zenodo(records)
    state = tmp_path / "dcase2020" / dl.STATE_DIR
    state.mkdir(parents=True)
    (state / "eval_data_train_fan.zip.part").write_bytes(data[:1000])
    report = fetch(z, tmp_path, parts=["eval_train"])
    assert report.unpacked == ["eval_data_train_fan.zip"]
    assert z.file_requests() == [("/api/records/3727685/files/eval_data_train_fan.zip/content", "bytes=1000-")]
    assert z.sent["eval_data_train_fan.zip"] == len(data) - 1000


def test_transient_server_errors_are_retried(zenodo, tmp_path):
    records = dcase2020_archives(types=("fan",))
    z = zenodo(records)
    content = "/api/records/3727685/files/eval_data_train_fan.zip/content"
    z.fail_once |= {"/api/records/3727685", content}
    report = fetch(z, tmp_path, parts=["eval_train"])
    assert report.unpacked == ["eval_data_train_fan.zip"] and not report.failed
    assert [p for p, _ in z.log] == ["/api/records/3727685"] * 2 + [content] * 2


def test_server_ignoring_range_restarts_the_file(zenodo, tmp_path):
    records = dcase2020_archives(types=("fan",))
    z = zenodo(records)
    z.ignore_range.add("eval_data_train_fan.zip")
    state = tmp_path / "dcase2020" / dl.STATE_DIR
    state.mkdir(parents=True)
    (state / "eval_data_train_fan.zip.part").write_bytes(b"x" * 500)  # stale bytes the server will not continue
    report = fetch(z, tmp_path, parts=["eval_train"])
    assert report.unpacked == ["eval_data_train_fan.zip"] and not report.failed


def test_md5_mismatch_is_rejected_and_nothing_is_unpacked(zenodo, tmp_path):
    records = dcase2020_archives(types=("fan",))
    z = zenodo(records)
    z.listed_md5["dev_data_fan.zip"] = "0123456789abcdef0123456789abcdef"
    report = fetch(z, tmp_path, parts=["dev"])
    assert not report.unpacked
    [(key, msg)] = report.failed
    assert key == "dev_data_fan.zip"
    assert "dev_data_fan.zip: MD5" in msg and "0123456789abcdef0123456789abcdef" in msg
    assert md5(records["3678171"]["dev_data_fan.zip"]) in msg and "nothing was unpacked" in msg
    root = tmp_path / "dcase2020"
    assert audio_files(root) == [] and not (root / "fan").exists() and leftovers(tmp_path) == []
    assert not (root / dl.STATE_DIR / "dev_data_fan.zip").exists()  # the corrupt download is gone


def test_cli_reports_failure_with_exit_code(zenodo, tmp_path, capsys):
    records = dcase2020_archives(types=("fan",))
    z = zenodo(records)
    z.listed_md5["eval_data_test_fan.zip"] = "f" * 32
    rc = dl.main(["dcase20", "--dest", str(tmp_path), "--base-url", z.url, "--parts", "eval_test"])
    out = capsys.readouterr()
    assert rc == 2  # the pinned 2020 checksum disagrees with the record: refused before any download
    assert "eval_data_test_fan.zip: Zenodo record 3841772 lists MD5 ffff" in out.err
    assert z.file_requests() == []


def test_pinned_md5_is_checked_against_the_download(zenodo, tmp_path):
    records = dcase2020_archives(types=("fan",))
    z = zenodo(records)
    wrong = {**pins(records), "dev_data_fan.zip": "a" * 32}
    z.listed_md5["dev_data_fan.zip"] = "a" * 32  # record and pin agree, the bytes do not
    report = fetch(z, tmp_path, parts=["dev"], pinned_md5=wrong)
    [(_, msg)] = report.failed
    assert "from raysd's pinned checksums" in msg
    assert audio_files(tmp_path) == []


def test_truncated_archive_is_rejected_and_nothing_is_unpacked(zenodo, tmp_path):
    records = dcase2020_archives(types=("fan",))
    good = records["3678171"]["dev_data_fan.zip"]
    records["3678171"]["dev_data_fan.zip"] = good[: len(good) // 2]  # listed MD5 is that of the truncated bytes
    z = zenodo(records)
    report = fetch(z, tmp_path, parts=["dev"])
    [(_, msg)] = report.failed
    assert "not a readable zip archive" in msg and "Nothing was unpacked" in msg
    assert audio_files(tmp_path) == [] and leftovers(tmp_path) == []


def test_corrupt_member_leaves_nothing_half_unpacked(zenodo, tmp_path):
    members = {f"fan/train/normal_id_00_{n:08d}.wav": wav_bytes(n, 4000) for n in range(4)}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    raw = bytearray(buf.getvalue())
    last = raw.rfind(members["fan/train/normal_id_00_00000003.wav"][100:200])
    raw[last + 50] ^= 0xFF  # damage the last member's data: its CRC fails after three members were extracted
    z = zenodo({"3678171": {"dev_data_fan.zip": bytes(raw)}, "3727685": {}, "3841772": {}})
    report = fetch(z, tmp_path, parts=["dev"])
    [(_, msg)] = report.failed
    assert "normal_id_00_00000003.wav is corrupt" in msg and "Nothing was unpacked" in msg
    assert audio_files(tmp_path) == [] and leftovers(tmp_path) == []


def symlink_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("fan/train/normal_id_00_00000000.wav", wav_bytes(0))
        info = zipfile.ZipInfo("fan/train/normal_id_00_00000001.wav")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../../../../etc/passwd")
    return buf.getvalue()


@pytest.mark.parametrize("archive, why", [
    (make_zip({"fan/train/normal_id_00_00000000.wav": wav_bytes(0), "../evil.wav": wav_bytes(1)}),
     "would escape the destination"),
    (make_zip({"fan/train/normal_id_00_00000000.wav": wav_bytes(0), "fan/../../evil.wav": wav_bytes(1)}),
     "would escape the destination"),
    (make_zip({"fan/train/normal_id_00_00000000.wav": wav_bytes(0), "/tmp/evil.wav": wav_bytes(1)}),
     "absolute path"),
    (symlink_zip(), "is a symlink"),
], ids=["dotdot", "nested-dotdot", "absolute", "symlink"])
def test_hostile_archive_is_refused(zenodo, tmp_path, archive, why):
    z = zenodo({"3678171": {"dev_data_fan.zip": archive}, "3727685": {}, "3841772": {}})
    dest = tmp_path / "dest"
    report = fetch(z, dest, parts=["dev"])
    [(_, msg)] = report.failed
    assert "refusing the archive" in msg and why in msg
    assert audio_files(tmp_path) == [] and leftovers(tmp_path) == []
    assert not (tmp_path / "evil.wav").exists() and not (dest / "evil.wav").exists()


def test_later_years_use_the_record_md5_and_unpack_for_the_catalog(zenodo, tmp_path):
    """DCASE 2023 style: 'dev_<type>.zip' / 'eval_data_<type>_train.zip' with attributes CSVs."""
    dev = make_zip({
        "bearing/train/section_00_source_train_normal_0000_vel_6.wav": wav_bytes(1),
        "bearing/train/section_00_target_train_normal_0000_vel_10.wav": wav_bytes(2),
        "bearing/test/section_00_source_test_anomaly_0000_vel_6.wav": wav_bytes(3),
        "bearing/test/section_00_target_test_normal_0000_vel_10.wav": wav_bytes(4),
        "bearing/attributes_00.csv": b"file_name,d1p,d1v\n"
                                     b"bearing/train/section_00_source_train_normal_0000_vel_6.wav,vel,6\n",
    })
    extra = make_zip({"eval_data/bandsaw/train/section_00_source_train_normal_0000_vel_3.wav": wav_bytes(5)})
    z = zenodo({"7882613": {"dev_bearing.zip": dev}, "7830345": {"eval_data_bandsaw_train.zip": extra},
                "7860847": {}})
    report = fetch(z, tmp_path, dataset="dcase23", parts=["dev", "eval_train"])
    assert sorted(report.unpacked) == ["dev_bearing.zip", "eval_data_bandsaw_train.zip"] and not report.failed
    root = tmp_path / "dcase2023"
    assert (root / "bearing" / "attributes_00.csv").exists()
    assert (root / "bandsaw" / "train" / "section_00_source_train_normal_0000_vel_3.wav").exists()
    cat = Catalog.scan(root)
    assert cat.layout == "dcase2022" and cat.machine_types == ["bandsaw", "bearing"]
    row = cat.table.set_index("file").loc["bearing/train/section_00_source_train_normal_0000_vel_6.wav"]
    assert row.domain == "source" and row.attributes == "vel=6"


@pytest.mark.parametrize("key, expected", [
    ("dev_data_fan.zip", "fan"), ("eval_data_train_ToyCar.zip", "ToyCar"),
    ("eval_data_test_ToyConveyor.zip", "ToyConveyor"), ("dev_bearing.zip", "bearing"),
    ("eval_data_bandsaw_train.zip", "bandsaw"), ("eval_data_3DPrinter_test.zip", "3DPrinter"),
    ("eval_data.zip", ""),
])
def test_machine_type_from_archive_name(key, expected):
    assert dl.machine_type_of(key) == expected
