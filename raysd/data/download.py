"""Download the official DCASE Task 2 archives from Zenodo and unpack them into the layout the catalog reads.

``python -m raysd.data.download dcase20 [--dest DIR] [--parts dev,eval_train,eval_test] [--machine-types ...]
[--base-url URL] [--jobs N]`` (likewise ``dcase21`` ... ``dcase24``).

For each part the tool first reads the Zenodo record (``<base-url>/api/records/<id>``), whose file listing
gives every archive's name, size and MD5, then downloads the selected archives several at a time:

- resumable: an interrupted download leaves ``<name>.part``, which the next attempt (or the next run)
  continues with an HTTP ``Range`` request; a dropped connection is retried with back-off;
- verified: the MD5 of the whole file is checked before anything is unpacked (DCASE 2020: against the
  checksums pinned in ``PINNED_MD5``, which must also agree with the record; later years: the record's);
- safe: an archive member with an absolute path, a ``..`` component, a symbolic link or a special file
  refuses the whole archive; members are extracted (CRC-checked) into a hidden temporary folder inside the
  destination and moved into place only when the whole archive has been read, so a corrupt or truncated
  archive leaves nothing half-unpacked.

Archives unpack into ``<dest>/<dcaseYYYY>/<machine_type>/<split folder>/...`` (``--data-root`` for the
search); bookkeeping (partial downloads, one ``.done`` marker per unpacked archive) lives in the hidden
``<dest>/<dcaseYYYY>/.raysd-download/`` folder, which the catalog ignores. Only the standard library is used
for HTTP; ``tqdm`` draws the progress bars when it is installed and stderr is a terminal, otherwise each file
reports plain lines every 10 %.
"""

from __future__ import annotations

import argparse
import calendar
import concurrent.futures
import hashlib
import http.client
import json
import os
import shutil
import stat
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from raysd.atomic import atomic_write_text
from raysd.data.zenodo import (
    DATASETS,
    PARTS,
    PINNED_MD5,
    ArchiveError,
    ChecksumError,
    Dataset,
    DownloadError,
    Progress,
    fetch_json,
    format_bytes,
    request,
    retry_after,
)

ZENODO_URL = "https://zenodo.org"
CHUNK = 1 << 20
STATE_DIR = ".raysd-download"
SPLIT_DIRS = frozenset({"train", "test", "source_test", "target_test"})
# words in archive names that are not the machine type ('dev_data_fan.zip', 'eval_data_bandsaw_train.zip')
_NAME_WORDS = frozenset({"dev", "data", "eval", "train", "test", "additional", "training", "evaluation"})
_SKIP_MEMBERS = ("__MACOSX/",)


@dataclass(frozen=True)
class RemoteFile:
    part: str
    record: str
    key: str  # file name in the record
    url: str
    size: int | None
    md5: str  # expected, lower-case hex
    md5_source: str  # where the expected MD5 comes from (for messages)
    machine_type: str  # '' when the archive holds every machine type


@dataclass
class Report:
    data_root: Path
    unpacked: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def machine_type_of(key: str) -> str:
    """Machine type named in an archive's file name ('' if none): 'eval_data_train_ToyCar.zip' -> 'ToyCar'."""
    stem = key[:-4] if key.lower().endswith(".zip") else key
    return "_".join(w for w in stem.split("_") if w and w.lower() not in _NAME_WORDS)


def record_files(record_json: Any, record: str, part: str, base_url: str) -> list[RemoteFile]:
    """The ``.zip`` files listed in a Zenodo record (``files`` as a list, or ``{"entries": [...]}``)."""
    files = record_json.get("files") if isinstance(record_json, dict) else None
    if isinstance(files, dict):
        files = files.get("entries", list(files.values()))
    if not isinstance(files, list):
        raise DownloadError(f"Zenodo record {record}: no file listing in the answer (expected a 'files' list)")
    base = urllib.parse.urlsplit(base_url)
    out = []
    for f in files:
        key = f.get("key") or f.get("filename") or ""
        if not key.lower().endswith(".zip"):
            continue
        checksum = str(f.get("checksum", ""))
        algo, _, digest = checksum.partition(":")
        if algo.lower() != "md5" or len(digest) != 32:
            raise DownloadError(f"Zenodo record {record}: file {key} has no MD5 checksum (got {checksum!r})")
        links = f.get("links") or {}
        link = links.get("content") or links.get("self") or links.get("download") or ""
        parsed = urllib.parse.urlsplit(link)
        if not (parsed.scheme == base.scheme and parsed.netloc == base.netloc and link.endswith("/content")):
            link = f"{base_url.rstrip('/')}/api/records/{record}/files/{urllib.parse.quote(key)}/content"
        size = f.get("size", f.get("filesize"))
        out.append(RemoteFile(part=part, record=record, key=key, url=link, size=int(size) if size is not None else None,
                              md5=digest.lower(), md5_source=f"Zenodo record {record}", machine_type=machine_type_of(key)))
    return out


# ---------------------------------------------------------------------------------------------- download
def file_md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download_file(url: str, part: Path, size: int | None, progress: Progress, name: str, *,
                  timeout: float = 60.0, retries: int = 5, backoff: float = 2.0,
                  stop: threading.Event | None = None) -> None:
    """Download ``url`` into ``part``, continuing what ``part`` already holds (HTTP Range), until it has
    ``size`` bytes (or the server's full length when ``size`` is None). Retries dropped connections,
    timeouts, 429 and 5xx answers with back-off; a server that ignores Range restarts the file."""
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have > size:
        part.unlink()
        have = 0
    last_error = ""
    with progress.bar(name, size, have) as bar:
        for attempt in range(retries + 1):
            wait = min(backoff * 2**attempt, 60.0)
            if stop is not None and stop.is_set():
                raise DownloadError(f"{name}: interrupted; run the command again to continue from {part}")
            have = part.stat().st_size if part.exists() else 0
            if size is not None and have == size:
                return
            headers = {"Range": f"bytes={have}-"} if have else {}
            try:
                with urllib.request.urlopen(request(url, headers), timeout=timeout) as resp:
                    if have and resp.status != 206:
                        have = 0  # Range ignored: the body is the whole file
                        bar.reset()
                    elif have and not str(resp.headers.get("Content-Range", "")).startswith(f"bytes {have}-"):
                        raise DownloadError(f"{name}: the server answered Range bytes={have}- with "
                                            f"Content-Range {resp.headers.get('Content-Range')!r}")
                    length = resp.headers.get("Content-Length")
                    expected = size if size is not None else (have + int(length) if length is not None else None)
                    with open(part, "ab" if have else "wb") as out:
                        while chunk := resp.read(CHUNK):
                            out.write(chunk)
                            bar.update(len(chunk))
                            if stop is not None and stop.is_set():
                                raise DownloadError(f"{name}: interrupted; run the command again to continue "
                                                    f"from {part}")
                got = part.stat().st_size
                if expected is None or got == expected:
                    return
                if got > expected:
                    part.unlink()
                    bar.reset()
                    last_error = f"received {got} bytes, more than the expected {expected}; starting again"
                else:
                    last_error = f"connection closed after {got} of {expected} bytes"
            except urllib.error.HTTPError as e:
                if e.code == 416 and have:  # Range not satisfiable: the part is complete or stale
                    if size is None:
                        return
                    part.unlink()
                    bar.reset()
                    last_error = "HTTP 416 for the partial file; starting again"
                elif e.code == 429 or e.code >= 500:
                    last_error = f"HTTP {e.code} {e.reason}"
                    wait = retry_after(e, wait)
                else:
                    raise DownloadError(f"{name}: HTTP {e.code} {e.reason} for {url}") from e
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                last_error = f"{type(e).__name__}: {e}"
            if attempt < retries:
                progress.line(f"[download] {name}: {last_error}; retrying ({attempt + 1}/{retries})")
                time.sleep(wait)
    raise DownloadError(f"{name}: download failed after {retries + 1} attempts ({last_error}); run the command "
                        f"again to continue from {part}")


# ---------------------------------------------------------------------------------------------- unpacking
def _member_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    fmt = stat.S_IFMT(mode)
    if info.is_dir():
        return "dir"
    if fmt == stat.S_IFLNK:
        return "symlink"
    if fmt not in (0, stat.S_IFREG):
        return "special"
    return "file"


def _safe_parts(name: str, archive: str) -> tuple[str, ...]:
    """The path components of a member name, or ArchiveError for a name that could leave the destination."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":") or "\x00" in posix:
        raise ArchiveError(f"{archive}: refusing the archive: member {name!r} has an absolute path")
    parts = tuple(p for p in PurePosixPath(posix).parts if p not in ("", "."))
    if ".." in parts:
        raise ArchiveError(f"{archive}: refusing the archive: member {name!r} would escape the destination ('..')")
    return parts


def plan_members(zf: zipfile.ZipFile, archive: str, machine_type: str = "") -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """(member, destination parts) for every file to unpack, as ``<machine_type>/<split>/<name>`` (plus
    ``<machine_type>/<file>`` such as ``attributes_00.csv``). Leading folders common to the audio files
    (e.g. ``dev_data/``) are dropped; members outside the machine-type folders are left out. Raises
    ArchiveError for a hostile member (absolute path, ``..``, symlink, special file) or an unknown layout."""
    files: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
    for info in zf.infolist():
        parts = _safe_parts(info.filename, archive)
        kind = _member_kind(info)
        if kind in ("symlink", "special"):
            raise ArchiveError(f"{archive}: refusing the archive: member {info.filename!r} is a {kind}, not a "
                               "regular file")
        if kind == "dir" or not parts or info.filename.startswith(_SKIP_MEMBERS) or parts[-1].startswith("._"):
            continue
        files.append((info, parts))
    audio = [p for _, p in files if p[-1].lower().endswith(".wav")]
    if not audio:
        raise ArchiveError(f"{archive}: no .wav files inside; is this a DCASE archive?")
    prefixes = set()
    for p in audio:
        if len(p) < 2 or p[-2] not in SPLIT_DIRS:
            raise ArchiveError(f"{archive}: member {'/'.join(p)} is not in a {{{','.join(sorted(SPLIT_DIRS))}}} "
                               "folder; unexpected archive layout")
        prefixes.add(p[:-3] if len(p) >= 3 else None)
    if len(prefixes) != 1:
        shown = sorted("/".join(x) if x is not None else "(none)" for x in prefixes)
        raise ArchiveError(f"{archive}: audio files sit at different depths ({', '.join(shown)}); unexpected layout")
    prefix = prefixes.pop()
    if prefix is None:  # '<split>/<file>' directly: the machine type comes from the archive's name
        if not machine_type:
            raise ArchiveError(f"{archive}: audio files are not inside a machine-type folder and the archive name "
                               "names no machine type")
        return [(info, (machine_type, *p)) for info, p in files if len(p) == 1 or (len(p) == 2 and p[0] in SPLIT_DIRS)]
    n = len(prefix)
    return [(info, p[n:]) for info, p in files if p[:n] == prefix and len(p) - n >= 2]


def _zip_mtime(info: zipfile.ZipInfo) -> float:
    """The member's timestamp, read as UTC so every node unpacks identical mtimes."""
    try:
        return float(calendar.timegm((*info.date_time, 0, 0, 0)))
    except (OverflowError, ValueError):
        return 0.0


def unpack(archive: Path, root: Path, machine_type: str = "") -> int:
    """Unpack ``archive`` into ``root`` (see ``plan_members``); returns the number of files written.

    Everything is first extracted, CRC-checked, into a hidden temporary folder inside ``root`` and only
    then moved into place, so a corrupt archive leaves ``root`` as it was."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise ArchiveError(f"{archive.name}: not a readable zip archive ({e}); it is truncated or corrupt. Nothing "
                           "was unpacked.") from e
    with zf:
        members = plan_members(zf, archive.name, machine_type)
        tmp = Path(tempfile.mkdtemp(prefix=f".raysd-unpack-{archive.stem}-", dir=root))
        try:
            base = tmp.resolve()
            for info, parts in members:
                target = tmp.joinpath(*parts)
                if not target.resolve().is_relative_to(base):
                    raise ArchiveError(f"{archive.name}: refusing member {info.filename!r} (leaves the destination)")
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(target, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
                except (zipfile.BadZipFile, EOFError, zlib.error) as e:
                    raise ArchiveError(f"{archive.name}: member {info.filename} is corrupt ({e}); the archive is "
                                       "damaged. Nothing was unpacked.") from e
                mtime = _zip_mtime(info)
                os.utime(target, (mtime, mtime))
            for _, parts in members:
                final = root.joinpath(*parts)
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp.joinpath(*parts), final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return len(members)


# ---------------------------------------------------------------------------------------------- orchestration
def select_files(dataset: Dataset, parts: Iterable[str], machine_types: Iterable[str] | None, base_url: str,
                 pinned: Mapping[str, str] | None, *, timeout: float = 60.0, retries: int = 5,
                 backoff: float = 2.0) -> list[RemoteFile]:
    """The archives to fetch: each part's record listing, filtered by machine type, with expected MD5s."""
    chosen: list[RemoteFile] = []
    for part in parts:
        record = dataset.records[part]
        url = f"{base_url.rstrip('/')}/api/records/{record}"
        chosen.extend(record_files(fetch_json(url, timeout, retries, backoff), record, part, base_url))
    available = {f.machine_type for f in chosen if f.machine_type}
    if machine_types:
        wanted = {m.lower(): m for m in machine_types}
        unknown = sorted(m for k, m in wanted.items() if k not in {a.lower() for a in available})
        if unknown:
            raise DownloadError(f"{dataset.title}: machine type(s) {', '.join(unknown)} not in the selected parts "
                                f"({', '.join(parts)}); available: {', '.join(sorted(available, key=str.lower))}")
        chosen = [f for f in chosen if not f.machine_type or f.machine_type.lower() in wanted]
    if pinned:
        checked = []
        for f in chosen:
            pin = pinned.get(f.key)
            if pin is None:
                checked.append(f)
                continue
            if pin.lower() != f.md5:
                raise ChecksumError(f"{f.key}: Zenodo record {f.record} lists MD5 {f.md5}, but raysd pins "
                                    f"{pin.lower()} for this file; the published archive has changed. Nothing was "
                                    "downloaded.")
            checked.append(replace(f, md5=pin.lower(), md5_source="raysd's pinned checksums"))
        chosen = checked
    if not chosen:
        raise DownloadError(f"{dataset.title}: the records of {', '.join(parts)} list no .zip archive to download")
    return chosen


def _process(f: RemoteFile, root: Path, progress: Progress, keep_archives: bool, opts: dict,
             stop: threading.Event) -> str:
    """Download, verify and unpack one archive; returns 'unpacked' or 'already'."""
    state = root / STATE_DIR
    marker = state / f"{f.key}.done"
    if marker.exists():
        try:
            if json.loads(marker.read_text()).get("md5") == f.md5:
                return "already"
        except (OSError, json.JSONDecodeError):
            pass
    archive = state / f.key
    part = state / f"{f.key}.part"
    if not (archive.exists() and (f.size is None or archive.stat().st_size == f.size)):
        download_file(f.url, part, f.size, progress, f.key, stop=stop, **opts)
        os.replace(part, archive)
    progress.line(f"[download] {f.key}: checking MD5")
    got = file_md5(archive)
    if got != f.md5:
        archive.unlink()
        raise ChecksumError(f"{f.key}: MD5 {got} does not match the expected {f.md5} (from {f.md5_source}); the "
                            "download is corrupt and was deleted, nothing was unpacked. Run the command again to "
                            "download it afresh.")
    progress.line(f"[download] {f.key}: MD5 ok, unpacking into {root}")
    n = unpack(archive, root, f.machine_type)
    atomic_write_text(marker, json.dumps({"key": f.key, "record": f.record, "md5": f.md5, "files": n,
                                          "unpacked": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    if not keep_archives:
        archive.unlink()
    progress.line(f"[download] {f.key}: {n} files unpacked")
    return "unpacked"


def download(dataset: str, dest: str | os.PathLike = "data", parts: Iterable[str] | None = None,
             machine_types: Iterable[str] | None = None, base_url: str = ZENODO_URL, jobs: int = 4,
             keep_archives: bool = False, pinned_md5: Mapping[str, str] | None = None, timeout: float = 60.0,
             retries: int = 5, backoff: float = 2.0, progress: Progress | None = None) -> Report:
    """Fetch, verify and unpack the selected archives of ``dataset`` (a key of ``DATASETS``) into
    ``<dest>/<folder>``; already unpacked archives are skipped. Failures of single archives are collected
    in the report (the others still finish); problems with the request itself raise DownloadError."""
    if dataset not in DATASETS:
        raise DownloadError(f"unknown data set {dataset!r}; expected one of {', '.join(DATASETS)}")
    ds = DATASETS[dataset]
    parts = list(parts or PARTS)
    bad = [p for p in parts if p not in ds.records]
    if bad:
        raise DownloadError(f"unknown part(s) {', '.join(bad)}; expected some of {', '.join(ds.records)}")
    if jobs < 1:
        raise DownloadError(f"--jobs must be at least 1, got {jobs}")
    progress = progress or Progress()
    opts: dict[str, Any] = {"timeout": timeout, "retries": retries, "backoff": backoff}
    pinned = PINNED_MD5.get(dataset) if pinned_md5 is None else pinned_md5
    files = select_files(ds, parts, machine_types, base_url, pinned, **opts)
    root = Path(dest).expanduser().resolve() / ds.folder
    root.mkdir(parents=True, exist_ok=True)
    report = Report(root)
    todo = [f for f in files if not (root / STATE_DIR / f"{f.key}.done").exists()]
    need = sum(f.size or 0 for f in todo)
    if need:
        free = shutil.disk_usage(root).free
        if free < 2.1 * need:
            progress.line(f"[download] warning: {format_bytes(free)} free under {root}, but the archives take "
                          f"{format_bytes(need)} and about as much again once unpacked")
    progress.line(f"[download] {ds.title} ({', '.join(parts)}): {len(files)} archive(s), "
                  f"{format_bytes(sum(f.size or 0 for f in files))}, into {root}")
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="raysd-download") as pool:
        futures = {pool.submit(_process, f, root, progress, keep_archives, opts, stop): f for f in files}
        try:
            for fut in concurrent.futures.as_completed(futures):
                f = futures[fut]
                try:
                    (report.unpacked if fut.result() == "unpacked" else report.already).append(f.key)
                except (DownloadError, OSError) as e:
                    report.failed.append((f.key, str(e) if isinstance(e, DownloadError) else f"{f.key}: {e}"))
                    progress.line(f"[download] FAILED {e}")
        except KeyboardInterrupt:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m raysd.data.download",
        description="Download DCASE Task 2 archives from Zenodo (resumable, MD5-verified) and unpack them into "
                    "the layout raysd's catalog reads.")
    p.add_argument("dataset", choices=list(DATASETS), help="which year's data")
    p.add_argument("--dest", default="data", help="destination folder (default ./data); the data root is "
                                                  "DEST/dcaseYYYY")
    p.add_argument("--parts", default=",".join(PARTS),
                   help="comma-separated parts: dev (development), eval_train (additional training), eval_test "
                        "(unlabelled evaluation); default all three")
    p.add_argument("--machine-types", nargs="+", metavar="TYPE",
                   help="only these machine types (space- or comma-separated; default every one in the records)")
    p.add_argument("--base-url", default=ZENODO_URL, help=f"Zenodo server or mirror (default {ZENODO_URL})")
    p.add_argument("--jobs", type=int, default=4, help="archives downloaded at once (default 4)")
    p.add_argument("--keep-archives", action="store_true", help="keep the .zip files after unpacking")
    p.add_argument("--retries", type=int, default=5, help="attempts per file after the first (default 5)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without data before a retry (default 60)")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    types = [t for item in args.machine_types or [] for t in item.split(",") if t] or None
    try:
        report = download(args.dataset, args.dest, parts, types, args.base_url, args.jobs, args.keep_archives,
                          timeout=args.timeout, retries=args.retries)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted; partial downloads are kept and continue when you run the command again",
              file=sys.stderr)
        return 130
    ds = DATASETS[args.dataset]
    root = report.data_root
    print(f"{ds.title}: {len(report.unpacked)} archive(s) unpacked, {len(report.already)} already there, "
          f"{len(report.failed)} failed; data root {root}")
    for key, msg in report.failed:
        print(f"  failed: {msg}", file=sys.stderr)
    if report.unpacked or report.already:
        print(f"check it:    python -m raysd.data.catalog {root}")
        if ds.preset:
            print(f"search it:   python -m raysd.search {ds.preset} --data-root {root}")
        else:
            print(f"search it:   python -m raysd.search PRESET --data-root {root}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
