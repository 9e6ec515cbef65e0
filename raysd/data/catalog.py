"""Find every clip under a data root: DCASE 2020, 2021, 2022-2024 layouts or plain recording folders.

``Catalog.scan(root)`` detects the layout from the file names, reads only the audio headers (never the
samples) and returns a ``Catalog`` whose ``table`` has one row per clip (see ``COLUMNS``). Machine types come
from folder names, machine IDs / sections / domains / labels / attributes from file names and, for 2022+,
from ``attributes_XX.csv`` files, so no list of known machines is needed.

Plain recordings (any audio that does not use DCASE names) are cut into fixed-length clips of
``clip_seconds``. The last, shorter piece of a file is kept as a clip when it is at least half a clip long
(the audio loader right-pads it) and dropped otherwise: a few hundred milliseconds of padding-dominated
audio would mostly teach a model what silence looks like. A file shorter than half a clip gives no clip and
is listed in ``catalog.skipped``.

CLI: ``python -m raysd.data.catalog ROOT [--csv OUT] [--clip-seconds S] [--layout L]``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, cast

import pandas as pd
import soundfile as sf

from raysd.atomic import atomic_path
from raysd.data.names import (
    ATTRIBUTES_CSV,
    EXPECTED_NAMES,
    SPLIT_DIRS_2020,
    SPLIT_DIRS_SECTION,
    CatalogError,
    ClipName,
    find_audio,
    parse_name,
    read_attributes_csv,
    walk,
)

COLUMNS: tuple[str, ...] = (
    "path", "file", "offset", "num_samples", "sample_rate", "layout", "machine_type", "section", "domain",
    "split", "label", "attributes", "recording",
)
INT_COLUMNS: tuple[str, ...] = ("offset", "num_samples", "sample_rate")
STR_COLUMNS: tuple[str, ...] = tuple(c for c in COLUMNS if c not in INT_COLUMNS and c != "label")
LAYOUTS: tuple[str, ...] = ("dcase2020", "dcase2021", "dcase2022", "recordings")
DCASE_LAYOUTS: tuple[str, ...] = LAYOUTS[:3]

LAYOUT_HELP = """raysd understands these data layouts (machine types, IDs and sections are read from names and folders):
  dcase2020   <root>/<machine_type>/train/normal_id_00_00000000.wav
              <root>/<machine_type>/test/anomaly_id_00_00000000.wav   (unlabelled eval: test/id_01_00000000.wav)
              the root may also be the parent of dev_data/<machine_type>/... and eval_data/<machine_type>/...
  dcase2021   <root>/<machine_type>/train/section_00_source_train_normal_0000_<attributes>.wav
              <root>/<machine_type>/target_test/section_00_target_test_anomaly_0000.wav   (folders source_test/, target_test/;
              unlabelled eval: source_test/section_03_source_test_0000.wav)
  dcase2022   (2022-2024) <root>/<machine_type>/test/section_00_source_test_normal_0000_<attributes>.wav, train/ likewise
              (unlabelled eval: test/section_03_0000.wav or test/section_00_test_0000.wav;
              optional <root>/<machine_type>/attributes_00.csv with columns file_name,d1p,d1v[,d2p,d2v,...])
  recordings  any other folder of .wav/.flac files, e.g. <root>/<site>/2021-05-01_morning.wav:
              every file is cut into fixed-length clips (1 s by default)"""

def _error(message: str) -> CatalogError:
    return CatalogError(f"{message}\n{LAYOUT_HELP}")


def _list_examples(items: list[str], limit: int = 10) -> str:
    shown = "\n".join(f"  {x}" for x in items[:limit])
    more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
    return shown + more


def _read_header(path: Path) -> tuple[Any, str]:
    """(info, '') for a readable non-empty file, else (None, reason)."""
    try:
        if path.stat().st_size == 0:
            return None, "empty file (0 bytes)"
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, OSError) as e:
        return None, f"unreadable audio header ({e})"
    if info.frames <= 0:
        return None, "no audio samples (0 frames)"
    return info, ""


def _abs(path: Path) -> str:
    return os.path.normpath(os.path.abspath(path))


class Catalog:
    """One row per clip (``table``, columns ``COLUMNS``), plus the files that were skipped and why."""

    def __init__(self, table: pd.DataFrame, root: str | os.PathLike, layout: str, clip_seconds: float = 1.0,
                 skipped: list[tuple[str, str]] | None = None):
        missing = [c for c in COLUMNS if c not in table.columns]
        if missing:
            raise CatalogError(f"catalog table lacks columns {missing}; expected {list(COLUMNS)}")
        if layout not in LAYOUTS:
            raise CatalogError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
        self.table = _typed(table[list(COLUMNS)])
        self.root = Path(root)
        self.layout = layout
        self.clip_seconds = float(clip_seconds)
        self.skipped: list[tuple[str, str]] = list(skipped or [])
        self._stats: dict[str, tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return f"Catalog(root={str(self.root)!r}, layout={self.layout!r}, clips={len(self)}, skipped={len(self.skipped)})"

    @property
    def machine_types(self) -> list[str]:
        return sorted(self.table["machine_type"].unique().tolist())

    # ------------------------------------------------------------------ scanning
    @classmethod
    def scan(cls, root: str | os.PathLike, clip_seconds: float = 1.0, layout: str | None = None) -> Catalog:
        """Catalog every clip under ``root``; ``layout`` (one of ``LAYOUTS``) overrides the detection."""
        root = Path(root).expanduser()
        if not clip_seconds > 0:
            raise CatalogError(f"clip_seconds must be positive, got {clip_seconds}")
        if layout is not None and layout not in LAYOUTS:
            raise CatalogError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
        if not root.exists():
            raise _error(f"data root {root} does not exist.")
        if not root.is_dir():
            raise _error(f"data root {root} is not a folder.")
        root = Path(_abs(root))
        files = find_audio(root)
        if not files:
            raise _error(f"data root {root} holds no audio files (.wav or .flac).")

        names = {p: parse_name(p) for p in files}
        detected = cls._detect_layout(root, names, layout)
        if detected == "recordings":
            rows, skipped, stats = cls._scan_recordings(root, files, clip_seconds)
        else:
            rows, skipped, stats = cls._scan_dcase(root, names, detected)
        if skipped:
            warnings.warn(
                f"raysd catalog: skipped {len(skipped)} audio file(s) under {root}:\n"
                + _list_examples([f"{p}: {why}" for p, why in skipped], 5),
                stacklevel=2,
            )
        if not rows["path"]:
            raise _error(f"data root {root}: no usable audio clip ({len(skipped)} file(s) skipped, see the warning).")
        table = pd.DataFrame(rows).sort_values(["file", "offset"], kind="stable").reset_index(drop=True)
        cat = cls(table, root, detected, clip_seconds, skipped)
        cat._stats = stats
        return cat

    @staticmethod
    def _detect_layout(root: Path, names: dict[Path, ClipName | None], layout: str | None) -> str:
        if layout == "recordings":
            return "recordings"
        rel = {p: p.relative_to(root).as_posix() for p in names}
        by_family: dict[str, list[Path]] = {"dcase2020": [], "section": []}
        unmatched: list[Path] = []
        for p, n in names.items():
            (by_family[n.family] if n else unmatched).append(p)
        if by_family["dcase2020"] and by_family["section"]:
            raise _error(
                f"data root {root} mixes DCASE 2020 names (e.g. {rel[by_family['dcase2020'][0]]}) and DCASE 2021+ "
                f"names (e.g. {rel[by_family['section'][0]]}); point raysd at one data set at a time."
            )
        if not by_family["dcase2020"] and not by_family["section"]:
            if layout is not None:
                raise _error(
                    f"layout {layout!r} was requested but no file under {root} has a {layout} name "
                    f"(e.g. {rel[unmatched[0]]}); expected {EXPECTED_NAMES[layout]}."
                )
            return "recordings"
        if by_family["dcase2020"]:
            detected = "dcase2020"
        else:
            evidence_2021 = any(
                cast(ClipName, names[p]).only_2021 or p.parent.name in ("source_test", "target_test") for p in by_family["section"]
            )
            detected = "dcase2021" if evidence_2021 else "dcase2022"
        if layout is not None and layout != detected:
            if {layout, detected} != {"dcase2021", "dcase2022"}:
                raise _error(f"layout {layout!r} was requested but the files under {root} use {detected} names.")
            detected = layout
        if unmatched:
            raise _error(
                f"data root {root} uses the {detected} layout, but {len(unmatched)} audio file(s) have names that fit "
                f"no {detected} pattern (expected {EXPECTED_NAMES[detected]}):\n"
                + _list_examples([rel[p] for p in unmatched])
            )
        return detected

    @staticmethod
    def _scan_dcase(root: Path, names: dict[Path, ClipName | None], layout: str):
        split_dirs = SPLIT_DIRS_2020 if layout == "dcase2020" else SPLIT_DIRS_SECTION
        rows: dict[str, list] = {c: [] for c in COLUMNS}
        skipped: list[tuple[str, str]] = []
        stats: dict[str, tuple[int, int]] = {}
        problems: list[str] = []
        seen: dict[tuple[str, str, str], str] = {}
        by_abs: dict[str, int] = {}
        for p, n in names.items():
            assert n is not None, f"{p}: _detect_layout lets no unmatched name into a DCASE layout"
            rel = p.relative_to(root)
            folder = rel.parts[-2] if len(rel.parts) >= 2 else root.name
            machine_type = rel.parts[-3] if len(rel.parts) >= 3 else (root.name if len(rel.parts) == 2 else root.parent.name)
            if folder not in split_dirs:
                problems.append(f"{rel.as_posix()}: is in folder {folder!r}; expected "
                                f"<machine_type>/{{{','.join(split_dirs)}}}/{p.name}")
                continue
            split, folder_domain = split_dirs[folder]
            if n.split is not None and n.split != split:
                problems.append(f"{rel.as_posix()}: the name says {n.split!r} but the file is in folder {folder!r}")
                continue
            if folder_domain and n.domain and n.domain != folder_domain:
                problems.append(f"{rel.as_posix()}: the name says {n.domain!r} but the file is in folder {folder!r}")
                continue
            key = (machine_type, split, p.name)
            if key in seen:
                problems.append(f"{rel.as_posix()}: duplicate of {seen[key]} (same machine type, split and name)")
                continue
            seen[key] = rel.as_posix()
            info, why = _read_header(p)
            if info is None:
                skipped.append((rel.as_posix(), why))
                continue
            st = p.stat()
            stats[rel.as_posix()] = (st.st_size, st.st_mtime_ns)
            by_abs[_abs(p)] = len(rows["path"])
            for c, v in (
                ("path", _abs(p)), ("file", rel.as_posix()), ("offset", 0), ("num_samples", info.frames),
                ("sample_rate", info.samplerate), ("layout", layout), ("machine_type", machine_type),
                ("section", n.section), ("domain", n.domain or folder_domain), ("split", split), ("label", n.label),
                ("attributes", n.attributes), ("recording", rel.as_posix()),
            ):
                rows[c].append(v)
        if problems:
            raise _error(f"data root {root}: {len(problems)} file(s) do not fit the {layout} layout:\n"
                         + _list_examples(problems))
        if layout != "dcase2020":
            Catalog._merge_attribute_csvs(root, rows, by_abs)
        return rows, skipped, stats

    @staticmethod
    def _merge_attribute_csvs(root: Path, rows: dict[str, list], by_abs: dict[str, int]) -> None:
        for folder, names in walk(root):
            for name in names:
                if not ATTRIBUTES_CSV.fullmatch(name):
                    continue
                csv_path = folder / name
                for file_name, attrs in read_attributes_csv(csv_path).items():
                    if not attrs:
                        continue
                    parts = PurePosixPath(file_name.replace("\\", "/")).parts
                    if len(parts) >= 2:  # '<machine_type>/<split>/<name>' relative to the csv's parent folder
                        candidates = [csv_path.parent / parts[-2] / parts[-1]]
                    else:
                        candidates = [csv_path.parent / d / parts[0] for d in SPLIT_DIRS_SECTION]
                    for c in candidates:
                        i = by_abs.get(_abs(c))
                        if i is not None:
                            rows["attributes"][i] = attrs
                            break

    @staticmethod
    def _scan_recordings(root: Path, files: list[Path], clip_seconds: float):
        rows: dict[str, list] = {c: [] for c in COLUMNS}
        skipped: list[tuple[str, str]] = []
        stats: dict[str, tuple[int, int]] = {}
        for p in files:
            rel = p.relative_to(root).as_posix()
            info, why = _read_header(p)
            if info is None:
                skipped.append((rel, why))
                continue
            clip = max(1, int(round(clip_seconds * info.samplerate)))
            n_full, rest = divmod(info.frames, clip)
            clips = [(k * clip, clip) for k in range(n_full)]
            if 2 * rest >= clip:
                clips.append((n_full * clip, rest))
            if not clips:
                skipped.append((rel, f"shorter than half a clip ({info.frames} samples < {clip}/2 at {info.samplerate} Hz)"))
                continue
            st = p.stat()
            stats[rel] = (st.st_size, st.st_mtime_ns)
            parent = PurePosixPath(rel).parent.as_posix()
            machine_type = "recordings" if parent == "." else parent
            for offset, n in clips:
                for c, v in (
                    ("path", _abs(p)), ("file", rel), ("offset", offset), ("num_samples", n),
                    ("sample_rate", info.samplerate), ("layout", "recordings"), ("machine_type", machine_type),
                    ("section", "00"), ("domain", ""), ("split", "train"), ("label", None), ("attributes", ""),
                    ("recording", rel),
                ):
                    rows[c].append(v)
        return rows, skipped, stats

    # ------------------------------------------------------------------ identity and reports
    def content_key(self) -> str:
        """Hash of layout, every cataloged file's (relative name, size, mtime_ns) and every clip's boundaries.

        Hashing the clip boundaries (file, offset, num_samples) makes the key change with ``clip_seconds``
        exactly when the clips change, and lets a catalog re-read with ``from_csv`` give the same key.
        """
        if self._stats is None:
            self._stats = {}
            for file, path in self.table[["file", "path"]].drop_duplicates("file").itertuples(index=False):
                try:
                    st = os.stat(path)
                except OSError as e:
                    raise CatalogError(f"cataloged file {path} cannot be read any more: {e}") from e
                self._stats[file] = (st.st_size, st.st_mtime_ns)
        h = hashlib.sha256(f"raysd-catalog-v1\n{self.layout}\n".encode())
        for file in sorted(self._stats):
            size, mtime = self._stats[file]
            h.update(f"{file}\t{size}\t{mtime}\n".encode())
        t = self.table
        clips = t["file"] + "\t" + t["offset"].astype(str) + "\t" + t["num_samples"].astype(str)
        h.update("\n".join(clips.tolist()).encode())
        return h.hexdigest()[:16]

    def summary(self) -> str:
        t = self.table
        n_files = t["file"].nunique()
        lines = [f"raysd catalog of {self.root} (layout {self.layout}): {len(t)} clips from {n_files} files"]
        if self.layout == "recordings":
            hours = (t["num_samples"] / t["sample_rate"]).sum() / 3600
            lines[0] += f", {hours:.2f} h of audio in clips of {self.clip_seconds:g} s"
        rates = sorted(t["sample_rate"].unique().tolist())
        lines.append("sample rates: " + ", ".join(f"{r} Hz" for r in rates))
        view = pd.DataFrame({
            "machine_type": t["machine_type"],
            "section": t["section"],
            "domain": t["domain"].replace("", "-"),
            "split": t["split"],
            "label": t["label"].map({0: "normal", 1: "anomaly"}).astype(object).where(t["label"].notna(), "unlabelled"),
        })
        counts = view.groupby(list(view.columns), sort=True).size().rename("clips").reset_index()
        lines.append("")
        lines.append("clips per machine type, section, domain, split and label:")
        lines.append(counts.to_string(index=False))
        per_type = view.groupby("machine_type").size()
        lines.append("")
        lines.append("clips per machine type: " + ", ".join(f"{k} {v}" for k, v in per_type.items()))
        lines.append("")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)} file(s):")
            lines.extend(f"  {p}: {why}" for p, why in self.skipped)
        else:
            lines.append("skipped files: none")
        return "\n".join(lines)

    # ------------------------------------------------------------------ persistence
    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the whole table atomically (label <NA> as an empty field)."""
        with atomic_path(path) as tmp:
            self.table.to_csv(tmp, index=False)
        return Path(path)

    @classmethod
    def from_csv(cls, path: str | os.PathLike, root: str | os.PathLike | None = None,
                 clip_seconds: float | None = None) -> Catalog:
        """Read a table written by ``to_csv``; dtypes (zero-padded sections, nullable labels) are restored."""
        path = Path(path)
        try:
            table = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
        except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise CatalogError(f"cannot read catalog csv {path}: {e}") from e
        missing = [c for c in COLUMNS if c not in table.columns]
        if missing:
            raise CatalogError(f"catalog csv {path} lacks columns {missing}; expected {list(COLUMNS)}")
        if table.empty:
            raise CatalogError(f"catalog csv {path} has no rows")
        layouts = sorted(table["layout"].unique().tolist())
        if len(layouts) != 1 or layouts[0] not in LAYOUTS:
            raise CatalogError(f"catalog csv {path}: expected one layout of {', '.join(LAYOUTS)}, found {layouts}")
        bad = ~table["label"].isin(["", "0", "1"])
        if bad.any():
            raise CatalogError(f"catalog csv {path}: label must be 0, 1 or empty; row {int(bad.idxmax()) + 2} "
                               f"has {table.loc[bad.idxmax(), 'label']!r}")
        for c in INT_COLUMNS:
            try:
                table[c] = table[c].astype("int64")
            except ValueError as e:
                raise CatalogError(f"catalog csv {path}: column {c} must hold integers ({e})") from e
        table["label"] = pd.array([None if v == "" else int(v) for v in table["label"]], dtype="Int8")
        if root is None:
            first_path, first_file = Path(table["path"].iloc[0]), PurePosixPath(table["file"].iloc[0])
            root = first_path.parents[len(first_file.parts) - 1]
        if clip_seconds is None:
            full = table["num_samples"] / table["sample_rate"]
            clip_seconds = float(full.mode().max()) if layouts[0] == "recordings" else 1.0
        return cls(table, root, layouts[0], clip_seconds)


def _typed(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    for c in STR_COLUMNS:
        table[c] = table[c].astype(str)
    for c in INT_COLUMNS:
        table[c] = table[c].astype("int64")
    if table["label"].dtype != "Int8":
        table["label"] = pd.array([None if pd.isna(v) else int(v) for v in table["label"]], dtype="Int8")
    return table.reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raysd.data.catalog",
        description="List the clips raysd finds under a data root, and optionally write them as a CSV table.",
        epilog=LAYOUT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("root", help="data root")
    parser.add_argument("--csv", metavar="OUT", help="write the whole catalog table to this CSV file")
    parser.add_argument("--clip-seconds", type=float, default=1.0, metavar="S",
                        help="clip length for plain recordings (default 1.0)")
    parser.add_argument("--layout", choices=LAYOUTS, default=None, help="skip layout detection")
    args = parser.parse_args(argv)
    try:
        cat = Catalog.scan(args.root, clip_seconds=args.clip_seconds, layout=args.layout)
    except CatalogError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(cat.summary())
    if args.csv:
        out = cat.to_csv(args.csv)
        print(f"\nwrote {len(cat)} rows to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
