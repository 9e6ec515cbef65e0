"""``python -m raysd.score MODEL PATH... [--out scores.csv] [--report DIR --top N]``: score new recordings with a
saved ensemble or a single trial.

``MODEL`` is the ``ensemble.json`` that ``python -m raysd.leaderboard`` writes (per machine type, the chosen
members (checkpoints, families, hyperparameters, feature specs), their per-section standardisation statistics,
the combination rule and a decision threshold per section), or a trial's last checkpoint folder (``state.pt``,
``trial.json``, ``scores_train.csv``), scored as a one-member ensemble standardised by its training scores with
the ``--quantile`` threshold. ``PATH`` is any mix of audio files and folders (searched recursively for .wav /
.flac).

Each file's machine type comes from ``--machine-type``, or from the nearest folder above it named after a machine
type the ensemble knows (for a ``recordings`` ensemble of one machine type, that one), or else from the DCASE
layout ``<machine_type>/<train|test|source_test|target_test>/<file>``. Its machine ID / section comes from
``--section``, from its DCASE-style name (``normal_id_00_...``, ``section_01_...``), or from the machine type when
the ensemble knows a single section for it. Files whose machine type or section the ensemble does not know are
listed by name on stderr and not scored.

Audio is featurised exactly as at training time (``raysd.data.features.extract``: soundfile, mono mix, the clip
length of the training spec, torchaudio resampling and log-mel). Members are loaded with
``torch.load(..., weights_only=True)``; nothing else is unpickled.

Output: CSV with columns file, machine_type, section, score, decision (1 = anomalous: score above the
threshold); for the ``recordings`` layout also offset (sample), start_s and end_s of each clip. For long
recordings (the ``recordings`` layout, or whenever ``--report`` is given) an anomaly report goes to ``--report``
(default ``./anomalies``; see ``raysd.report.unlabelled``): ``anomalies.csv`` with the ``--top`` clips, their spectrograms
beside a typical clip, a histogram of all scores and, for members with a bottleneck, an embedding view
(``--projection pca|tsne|none``). Recordings are read and scored a batch of clips at a time, so a six-hour file
needs no more memory than a short one. Exit status 0 when every file was scored, 1 when some could not be
(unknown machine type / section, or undecodable audio), 2 on bad arguments or an unusable model.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from raysd import artifacts
from raysd.artifacts import ArtifactError, Member, TypeModel
from raysd.atomic import atomic_write_csv
from raysd.data import audio
from raysd.data.features import resolve_device
from raysd.data.names import find_audio as find_audio_under
from raysd.data.names import parse_name
from raysd.ensemble import combine_matrix
from raysd.inference import stream
from raysd.log import module_logger, setup_logging
from raysd.report.unlabelled import DEFAULT_TOP, PROJECTIONS, ReportError, write_report

log = module_logger(__name__, __spec__)

SPLIT_FOLDERS = ("train", "test", "source_test", "target_test")
OUTPUT_COLUMNS = ["file", "machine_type", "section", "score", "decision"]


class ScoreError(ArtifactError):
    """An input that cannot be scored, with what is wrong (an unusable model raises :class:`ArtifactError`)."""


# ---------------------------------------------------------------------- which files, which machine / section
@dataclass
class Item:
    path: Path
    machine_type: str | None
    section: str | None
    problem: str = ""


def find_audio(paths: list[str]) -> list[Path]:
    """Audio files of the given files and folders (recursive, hidden entries skipped), in a stable order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += find_audio_under(p)
        elif p.is_file():
            out.append(p)
        else:
            raise ScoreError(f"{p}: no such file or folder")
    return list(dict.fromkeys(out))


def resolve_items(files: list[Path], doc: dict, machine_type: str | None, section: str | None) -> list[Item]:
    """Machine type and section of each file, or the reason it cannot be scored."""
    known = {mt: sorted(str(s) for s in e["threshold"]) for mt, e in doc["machine_types"].items()}
    only = next(iter(known)) if len(known) == 1 and doc.get("layout") == "recordings" else None
    items = []
    for f in files:
        mt = machine_type
        if mt is None:
            mt = next((d.name for d in f.resolve().parents if d.name in known), only)
        if mt is None and f.resolve().parent.name in SPLIT_FOLDERS:  # <machine_type>/<split>/<file>, a type we lack
            mt = f.resolve().parent.parent.name
        if mt is None:
            items.append(Item(f, None, None, "machine type unknown: no folder above it is named after a machine type "
                                             f"of the ensemble ({', '.join(sorted(known))}); pass --machine-type"))
            continue
        if mt not in known:
            items.append(Item(f, mt, None, f"machine type {mt!r} is not in the ensemble "
                                           f"(it knows {', '.join(sorted(known))})"))
            continue
        sec = section
        if sec is None:
            parsed = parse_name(f)
            sec = parsed.section if parsed is not None else (known[mt][0] if len(known[mt]) == 1 else None)
        if sec is None:
            items.append(Item(f, mt, None, f"machine ID / section unknown: the name is not a DCASE name and {mt} has "
                                           f"several ({', '.join(known[mt])}); pass --section"))
            continue
        if sec not in known[mt]:
            items.append(Item(f, mt, sec, f"{mt} section {sec} is not in the ensemble (it knows "
                                          f"{', '.join(known[mt])})"))
            continue
        items.append(Item(f, mt, sec))
    return items


def clip_table(items: list[Item], layout: str, clip_seconds: float) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Catalog-like rows (path, file, offset, num_samples, sample_rate, section) of the files' clips.

    DCASE layouts: one clip per file. ``recordings``: fixed-length clips, the last kept if at least half a clip
    long, as ``raysd.data.catalog`` cuts them.
    """
    rows, bad = [], []
    for it in items:
        try:
            inf = audio.info(it.path)
            if inf.frames <= 0:
                raise audio.AudioError(f"{it.path}: no audio samples")
        except audio.AudioError as e:
            bad.append((str(it.path), str(e)))
            continue
        if layout == "recordings":
            clip = max(1, int(round(clip_seconds * inf.sample_rate)))
            full, rest = divmod(inf.frames, clip)
            spans = [(k * clip, clip) for k in range(full)] + ([(full * clip, rest)] if 2 * rest >= clip else [])
            if not spans:
                bad.append((str(it.path), f"shorter than half a clip ({inf.frames} samples)"))
        else:
            spans = [(0, inf.frames)]
        for off, n in spans:
            rows.append({"path": str(it.path.resolve()), "file": str(it.path), "offset": off, "num_samples": n,
                         "sample_rate": inf.sample_rate, "machine_type": it.machine_type, "section": it.section})
    cols = ["path", "file", "offset", "num_samples", "sample_rate", "machine_type", "section"]
    return pd.DataFrame(rows, columns=cols), bad


# ---------------------------------------------------------------------- scoring
def member_scores(m: Member, table: pd.DataFrame, device: torch.device, batch_size: int, failed: list,
                  embed: bool = False, workers: int | None = None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(positions in ``table``, raw anomaly scores, clip embeddings or None) batch by batch, featurised with the
    member's spec and read straight from the files."""
    for ok, scores, emb in stream(m.trainer, m.spec, table, device, batch_size, embed=embed, failed=failed,
                                  workers=workers):
        assert scores is not None  # stream scores unless told not to
        yield ok, scores, emb


def score_type(model: TypeModel, table: pd.DataFrame, device: torch.device, batch_size: int = 64,
               chunk: int = 512, embed: bool = False, workers: int | None = None
               ) -> tuple[pd.DataFrame, list, tuple[np.ndarray, str] | None]:
    """Combined standardised scores and decisions of one machine type's clips, ``chunk`` clips at a time, and
    (with ``embed``) the clips' embeddings by the first member that has a bottleneck with that member's name
    (None if none has)."""
    failed: list = []
    parts, embedded = [], []
    embedder = 0 if embed else None  # member whose embeddings are kept; moves on past members without one
    for lo in range(0, len(table), chunk):
        part = table.iloc[lo:lo + chunk].reset_index(drop=True)
        z = np.full((len(part), len(model.members)), np.nan)
        emb = None
        for j, m in enumerate(model.members):
            mu = part["section"].map(lambda s: m.stats[s][0]).to_numpy(float)
            sd = np.maximum(part["section"].map(lambda s: m.stats[s][1]).to_numpy(float), 1e-12)
            for ok, s, e in member_scores(m, part, device, batch_size, failed, embed=embedder == j, workers=workers):
                z[ok, j] = (s - mu[ok]) / sd[ok]
                if embedder == j and e is None:
                    embedder = j + 1 if j + 1 < len(model.members) else None
                elif embedder == j and e is not None:
                    emb = np.full((len(part), e.shape[1]), np.nan, np.float32) if emb is None else emb
                    emb[ok] = e
        good = np.isfinite(z).all(axis=1)
        out = part.loc[good].copy()
        out["score"] = combine_matrix(z[good], [m.weight for m in model.members], model.combine)
        out["decision"] = (out["score"] > out["section"].map(model.threshold).astype(float)).astype(int)
        parts.append(out)
        if emb is not None:
            embedded.append(emb[good])
    bad = sorted({(f.file, f.reason) for f in failed})
    scored = pd.concat(parts, ignore_index=True) if parts else table.iloc[:0].assign(score=[], decision=[])
    if not embedded or embedder is None or sum(map(len, embedded)) != len(scored):
        return scored, bad, None
    return scored, bad, (np.concatenate(embedded), model.members[embedder].name)


@dataclass
class Scored:
    table: pd.DataFrame  # every scored clip with path, sample_rate, num_samples, ... (all machine types)
    problems: list[tuple[str, str]]
    layout: str
    embeddings: dict[str, tuple[np.ndarray, str]]  # machine type -> (embeddings of its rows, member name)


def score_all(ensemble: str | os.PathLike, paths: list[str], machine_type: str | None = None,
              section: str | None = None, device: str | None = None, batch_size: int = 64, embed: bool = False,
              quantile: float = artifacts.DEFAULT_QUANTILE, workers: int | None = None) -> Scored:
    """Score audio files / folders with a saved ensemble or trial checkpoint (and embed their clips).

    Clips are read ``batch_size`` at a time by ``workers`` threads (default: one per CPU), so memory does not grow
    with the length of a recording."""
    ensemble = str(ensemble)
    doc = artifacts.read_ensemble(ensemble, quantile)
    dev = resolve_device(device)
    items = resolve_items(find_audio(paths), doc, machine_type, section)
    problems = [(str(it.path), it.problem) for it in items if it.problem]
    layout = str(doc.get("layout", ""))
    frames, embeddings = [], {}
    for mt in sorted({str(it.machine_type) for it in items if not it.problem}):
        model = artifacts.load_type(doc, mt, dev, ensemble)
        clip_seconds = model.members[0].spec.clip_seconds
        table, bad = clip_table([it for it in items if not it.problem and it.machine_type == mt], layout, clip_seconds)
        problems += bad
        if table.empty:
            continue
        scored, undecodable, emb = score_type(model, table, dev, batch_size, embed=embed, workers=workers)
        problems += undecodable
        sr = scored["sample_rate"].astype(float)
        scored["start_s"] = scored["offset"] / sr
        scored["end_s"] = (scored["offset"] + scored["num_samples"]) / sr
        if emb is not None:
            embeddings[mt] = emb
        frames.append(scored)
    cols = ["path", *OUTPUT_COLUMNS, "offset", "num_samples", "sample_rate", "start_s", "end_s"]
    out = pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)
    return Scored(out, problems, layout, embeddings)


def score_paths(ensemble: str | os.PathLike, paths: list[str], machine_type: str | None = None,
                section: str | None = None, device: str | None = None, batch_size: int = 64
                ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Score audio files / folders with a saved ensemble: (scores table, [(file, why not scored)])."""
    s = score_all(ensemble, paths, machine_type, section, device, batch_size)
    cols = OUTPUT_COLUMNS + (["offset", "start_s", "end_s"] if s.layout == "recordings" else [])
    return s.table[cols].reset_index(drop=True), s.problems


def write_reports(s: Scored, out: Path, top: int, projection: str, plots: bool = True) -> list:
    """One anomaly report per machine type (``out`` itself when there is one, else ``out/<machine type>``)."""
    reports = []
    types = sorted(s.table["machine_type"].unique())
    for mt in types:
        rows = s.table["machine_type"] == mt
        clips = s.table.loc[rows].assign(recording=lambda t: t["file"].astype(str)).reset_index(drop=True)
        emb, who = s.embeddings.get(mt, (None, ""))
        reports.append(write_report(clips, out if len(types) == 1 else out / mt.replace("/", "-"), top=top,
                                    embeddings=emb, projection=projection, title=mt, plots=plots,
                                    embedding_label=f"{who} bottleneck"))
    return reports


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    p = argparse.ArgumentParser(prog="python -m raysd.score", description=__doc__.split("\n\n")[0])
    p.add_argument("ensemble", help="ensemble.json written by python -m raysd.leaderboard, or a trial's last "
                                    "checkpoint folder")
    p.add_argument("paths", nargs="+", help="audio files and/or folders (searched recursively)")
    p.add_argument("--out", help="write the CSV here (atomically) instead of printing it")
    p.add_argument("--machine-type", help="machine type of every file (default: from the folder names)")
    p.add_argument("--section", help="machine ID / section of every file (default: from the file names)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    p.add_argument("--batch-size", type=int, default=64, help="clips featurised per batch (default 64)")
    p.add_argument("--report", help="anomaly report folder (default ./anomalies for long recordings; "
                                    "with this option also for DCASE-style clips)")
    p.add_argument("--no-report", action="store_true", help="write no anomaly report")
    p.add_argument("--top", type=int, default=DEFAULT_TOP,
                   help=f"clips listed in anomalies.csv (default {DEFAULT_TOP})")
    p.add_argument("--projection", choices=PROJECTIONS, default="pca",
                   help="embedding view for families with a bottleneck (default pca)")
    p.add_argument("--no-plots", action="store_true",
                   help="anomalies.csv only: no spectrograms, histogram or embedding view")
    p.add_argument("--quantile", type=float, default=artifacts.DEFAULT_QUANTILE,
                   help="for a checkpoint folder: decision threshold as this quantile of its standardised training "
                        f"scores (default {artifacts.DEFAULT_QUANTILE})")
    args = p.parse_args(argv)
    if args.section is not None and args.section.isdigit():
        args.section = f"{int(args.section):02d}"
    if args.top < 1:
        print(f"error: --top must be >= 1, got {args.top}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # undecodable clips are reported below instead
            layout = None if args.no_report else str(artifacts.read_ensemble(args.ensemble, args.quantile)
                                                    .get("layout", ""))
            report = None if args.no_report or (layout != "recordings" and not args.report) else \
                Path(args.report or "anomalies")
            scored = score_all(args.ensemble, args.paths, args.machine_type, args.section, args.device,
                               args.batch_size, embed=report is not None and not args.no_plots
                               and args.projection != "none", quantile=args.quantile)
    except (ArtifactError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cols = OUTPUT_COLUMNS + (["offset", "start_s", "end_s"] if scored.layout == "recordings" else [])
    table = scored.table[cols]
    if args.out:
        atomic_write_csv(table, args.out)
        log.info("%d clip scores written to %s (%d above threshold)", len(table), args.out,
                 int(table["decision"].sum()) if len(table) else 0)
    else:
        table.to_csv(sys.stdout, index=False)
    if report is not None and len(scored.table):
        try:
            for r in write_reports(scored, report, args.top, args.projection, plots=not args.no_plots):
                log.info("strangest %d clips: %s", len(r.top), r.csv)
                for n in r.notes:
                    log.info("  %s", n)
        except ReportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if scored.problems:
        log.info("%d file(s) not scored:%s", len(scored.problems),
                 "".join(f"\n  {f}: {why}" for f, why in scored.problems))
    return 1 if scored.problems else 0


if __name__ == "__main__":
    sys.exit(main())
