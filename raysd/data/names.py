"""Names and folders of audio data: the DCASE file-name patterns (machine ID / section, domain, split, label,
attributes), the attribute tables of DCASE 2022-2024, and the walk that finds audio files under a root."""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

AUDIO_SUFFIXES: tuple[str, ...] = (".wav", ".flac")


class CatalogError(ValueError):
    """A data root or file that raysd cannot catalog; the message says which and why."""


EXPECTED_NAMES = {
    "dcase2020": "{normal,anomaly}_id_XX_NNNNNNNN.wav or id_XX_NNNNNNNN.wav in <machine_type>/{train,test}/",
    "dcase2021": "section_XX_{source,target}_{train,test}_{normal,anomaly}_NNNN[_<attributes>].wav or "
                 "section_XX_{source,target}_test_NNNN.wav in <machine_type>/{train,source_test,target_test}/",
    "dcase2022": "section_XX_{source,target}_{train,test}_{normal,anomaly}_NNNN[_<attributes>].wav or "
                 "section_XX_[test_]NNNN.wav in <machine_type>/{train,test}/",
}

_P2020_LABELLED = re.compile(r"(?P<label>normal|anomaly)_id_(?P<section>\d{2})_(?P<num>\d+)")
_P2020_UNLABELLED = re.compile(r"id_(?P<section>\d{2})_(?P<num>\d+)")
_PSECTION_LABELLED = re.compile(
    r"section_(?P<section>\d{2})_(?P<domain>source|target)_(?P<split>train|test)_(?P<label>normal|anomaly)"
    r"_(?P<num>\d+)(?:_(?P<attrs>.+))?"
)
_P2021_UNLABELLED = re.compile(r"section_(?P<section>\d{2})_(?P<domain>source|target)_test_(?P<num>\d+)")
_P2022_UNLABELLED = re.compile(r"section_(?P<section>\d{2})_(?:test_)?(?P<num>\d+)")
ATTRIBUTES_CSV = re.compile(r"attributes_\d{2}\.csv")
_ATTR_COLUMN = re.compile(r"d(?P<n>\d+)(?P<kind>[pv])")

# split folder -> (split, domain implied by the folder)
SPLIT_DIRS_2020 = {"train": ("train", ""), "test": ("test", "")}
SPLIT_DIRS_SECTION = {**SPLIT_DIRS_2020, "source_test": ("test", "source"), "target_test": ("test", "target")}
LABELS = {"normal": 0, "anomaly": 1}


@dataclass(frozen=True)
class ClipName:
    family: str  # 'dcase2020' or 'section' (2021-2024)
    section: str
    domain: str
    split: str | None  # split written in the name (2021+), None when the name has none
    label: int | None
    attributes: str
    only_2021: bool  # a name only the 2021 layout uses


def parse_name(path: Path) -> ClipName | None:
    """What a DCASE file name says about its clip; None for any other name."""
    if path.suffix.lower() != ".wav":
        return None
    stem = path.stem
    if m := _P2020_LABELLED.fullmatch(stem):
        return ClipName("dcase2020", m["section"], "", None, LABELS[m["label"]], "", False)
    if m := _P2020_UNLABELLED.fullmatch(stem):
        return ClipName("dcase2020", m["section"], "", None, None, "", False)
    if m := _PSECTION_LABELLED.fullmatch(stem):
        return ClipName("section", m["section"], m["domain"], m["split"], LABELS[m["label"]], m["attrs"] or "", False)
    if m := _P2021_UNLABELLED.fullmatch(stem):
        return ClipName("section", m["section"], m["domain"], "test", None, "", True)
    if m := _P2022_UNLABELLED.fullmatch(stem):
        return ClipName("section", m["section"], "", "test", None, "", False)
    return None


def walk(root: Path):
    """(folder, sorted visible file names) under ``root``; follows folder symlinks once, skips hidden entries."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink cycle or a folder linked twice
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield Path(dirpath), sorted(f for f in filenames if not f.startswith("."))


def find_audio(root: Path) -> list[Path]:
    """Audio files under ``root``, sorted; hidden files and folders (e.g. macOS ``._*`` forks) are ignored."""
    return [d / f for d, files in walk(root) for f in files if os.path.splitext(f)[1].lower() in AUDIO_SUFFIXES]


def read_attributes_csv(csv_path: Path) -> dict[str, str]:
    """``file_name`` (as written in the csv) -> 'd1p=d1v;d2p=d2v' (a parameter without value is kept alone)."""
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or not rows[0] or rows[0][0].strip() != "file_name":
        got = ",".join(rows[0]) if rows and rows[0] else "an empty file"
        raise CatalogError(f"{csv_path}: expected a header 'file_name,d1p,d1v[,d2p,d2v,...]', got {got!r}")
    header = [h.strip() for h in rows[0]]
    cols: dict[int, dict[str, int]] = {}
    for i, h in enumerate(header):
        if m := _ATTR_COLUMN.fullmatch(h):
            cols.setdefault(int(m["n"]), {})[m["kind"]] = i
    out: dict[str, str] = {}
    for row in rows[1:]:
        if not row or not row[0].strip():
            continue
        items = []
        for n in sorted(cols):
            ip, iv = cols[n].get("p"), cols[n].get("v")
            p = row[ip].strip() if ip is not None and ip < len(row) else ""
            v = row[iv].strip() if iv is not None and iv < len(row) else ""
            if p or v:
                items.append(f"{p}={v}" if v else p)
        out[row[0].strip()] = ";".join(items)
    return out
