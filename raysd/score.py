"""``python -m raysd.score ENSEMBLE_JSON PATH... [--out scores.csv]``: score new recordings with a saved ensemble.

``ENSEMBLE_JSON`` is the ``ensemble.json`` that ``python -m raysd.leaderboard`` writes: per machine type, the
chosen members (checkpoints, families, hyperparameters, feature specs), their per-section standardisation
statistics, the combination rule and a decision threshold per section. ``PATH`` is any mix of audio files and
folders (searched recursively for .wav / .flac).

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
threshold); for the ``recordings`` layout also offset (sample), start_s and end_s of each clip. Exit status 0
when every file was scored, 1 when some could not be (unknown machine type / section, or undecodable audio),
2 on bad arguments or an unusable ensemble file.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch

from raysd import storage
from raysd.atomic import atomic_path
from raysd.ensemble import combine_matrix

AUDIO_SUFFIXES = (".wav", ".flac")
SPLIT_FOLDERS = ("train", "test", "source_test", "target_test")
OUTPUT_COLUMNS = ["file", "machine_type", "section", "score", "decision"]


class ScoreError(RuntimeError):
    """An ensemble file or input that cannot be scored, with what is wrong."""


# ---------------------------------------------------------------------- the ensemble file
@dataclass
class Member:
    name: str
    trainer: object  # raysd.train.Trainer holding the member's model
    spec: object  # FeatureSpec
    weight: float
    stats: dict[str, tuple[float, float]]  # section -> (mean, std)


@dataclass
class TypeModel:
    machine_type: str
    combine: str
    members: list[Member]
    threshold: dict[str, float]

    @property
    def sections(self) -> list[str]:
        return sorted(self.threshold)


def read_ensemble(path: str | os.PathLike) -> dict:
    try:
        doc = json.loads(storage.read_bytes(path))
    except (OSError, json.JSONDecodeError) as e:
        raise ScoreError(f"{path}: cannot read ensemble file ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("machine_types"), dict) or not doc["machine_types"]:
        raise ScoreError(f"{path}: not a raysd ensemble file (expected a 'machine_types' mapping as written by "
                         "python -m raysd.leaderboard)")
    for mt, e in doc["machine_types"].items():
        for key in ("combine", "members", "threshold"):
            if key not in e:
                raise ScoreError(f"{path}: machine type {mt!r} lacks key {key!r}")
        for i, m in enumerate(e["members"]):
            for key in ("family", "params", "spec", "info", "stats"):
                if not m.get(key):
                    raise ScoreError(f"{path}: machine type {mt!r}, member {i} ({m.get('name', '?')}) lacks {key!r}")
            if not (m.get("state") or m.get("checkpoint")):
                raise ScoreError(f"{path}: machine type {mt!r}, member {i} has no checkpoint")
    return doc


def _resolve(uri: str, base: str) -> str:
    """Checkpoint paths relative to the ensemble file's folder are allowed (a copied results folder)."""
    if storage.is_remote(uri) or os.path.isabs(uri) or storage.exists(uri):
        return uri
    return str(Path(base).parent / uri)


def load_member(entry: dict, device: torch.device, ensemble_path: str) -> Member:
    """Rebuild one member from its family, hyperparameters and ``state.pt`` (weights only)."""
    from raysd.data.features import FeatureSpec
    from raysd.families.base import DataInfo, get_family
    from raysd.presets import split_hp
    from raysd.train import Trainer

    name = entry.get("name", entry["family"])
    hp, cfg = split_hp(entry["family"], entry["params"])
    family = get_family(entry["family"])(cfg)
    info = dict(entry["info"])
    info["class_names"] = tuple(info.get("class_names") or ())
    info = DataInfo(**info)
    state_uri = _resolve(entry.get("state") or storage.join(entry["checkpoint"], "state.pt"), ensemble_path)
    try:
        blob = storage.read_bytes(state_uri)
    except OSError as e:
        raise ScoreError(f"member {name}: cannot read its weights {state_uri} ({e})") from None
    try:
        state = torch.load(io.BytesIO(blob), map_location=device, weights_only=True)
    except Exception as e:  # an unpickling error names the disallowed global
        raise ScoreError(f"member {name}: {state_uri} is not a weights-only checkpoint "
                         f"({type(e).__name__}: {e})") from None
    trainer = Trainer(family, hp, info, device)
    try:
        trainer.model.load_state_dict(state["model"] if isinstance(state, dict) and "model" in state else state)
    except (RuntimeError, KeyError) as e:
        raise ScoreError(f"member {name}: {state_uri} does not fit a {entry['family']} model built from its "
                         f"hyperparameters ({e})") from None
    stats = {str(s): (float(v["mean"]), float(v["std"])) for s, v in entry["stats"].items()}
    return Member(name, trainer, FeatureSpec.from_dict(entry["spec"]), float(entry.get("weight", 1)), stats)


def load_type(doc: dict, mt: str, device: torch.device, path: str) -> TypeModel:
    e = doc["machine_types"][mt]
    members = [load_member(m, device, path) for m in e["members"]]
    return TypeModel(mt, e["combine"], members, {str(k): float(v) for k, v in e["threshold"].items()})


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
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                out += [Path(dirpath) / f for f in sorted(filenames)
                        if not f.startswith(".") and os.path.splitext(f)[1].lower() in AUDIO_SUFFIXES]
        elif p.is_file():
            out.append(p)
        else:
            raise ScoreError(f"{p}: no such file or folder")
    return list(dict.fromkeys(out))


def resolve_items(files: list[Path], doc: dict, machine_type: str | None, section: str | None) -> list[Item]:
    """Machine type and section of each file, or the reason it cannot be scored."""
    from raysd.data.catalog import parse_name

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
    from raysd.data import audio

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
def member_scores(m: Member, table: pd.DataFrame, device: torch.device, batch_size: int,
                  failed: list) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(positions in ``table``, raw anomaly scores) batch by batch, featurised with the member's spec."""
    from raysd.data.features import extract
    from raysd.families.base import ClipSet

    code = {c: i for i, c in enumerate(m.trainer.info.class_names)}
    view = m.trainer.family.view()
    for ok, feats in extract(table, m.spec, device=device, batch_size=batch_size, failed=failed):
        if not ok:
            continue
        ok = np.asarray(ok)
        labels = torch.tensor([code.get(str(s), -1) for s in table["section"].to_numpy()[ok]], dtype=torch.long)
        clips = ClipSet(torch.from_numpy(np.ascontiguousarray(feats)).to(device), labels.to(device), view)
        yield ok, m.trainer.score(clips)


def score_type(model: TypeModel, table: pd.DataFrame, device: torch.device, batch_size: int = 64,
               chunk: int = 512) -> tuple[pd.DataFrame, list]:
    """Combined standardised scores and decisions of one machine type's clips, ``chunk`` clips at a time."""
    failed: list = []
    parts = []
    for lo in range(0, len(table), chunk):
        part = table.iloc[lo:lo + chunk].reset_index(drop=True)
        z = np.full((len(part), len(model.members)), np.nan)
        for j, m in enumerate(model.members):
            mu = part["section"].map(lambda s: m.stats[s][0]).to_numpy(float)
            sd = np.maximum(part["section"].map(lambda s: m.stats[s][1]).to_numpy(float), 1e-12)
            for ok, s in member_scores(m, part, device, batch_size, failed):
                z[ok, j] = (s - mu[ok]) / sd[ok]
        good = np.isfinite(z).all(axis=1)
        out = part.loc[good].copy()
        out["score"] = combine_matrix(z[good], [m.weight for m in model.members], model.combine)
        out["decision"] = (out["score"] > out["section"].map(model.threshold).astype(float)).astype(int)
        parts.append(out)
    bad = sorted({(f.file, f.reason) for f in failed})
    return (pd.concat(parts, ignore_index=True) if parts else table.iloc[:0].assign(score=[], decision=[])), bad


def score_paths(ensemble: str | os.PathLike, paths: list[str], machine_type: str | None = None,
                section: str | None = None, device: str | None = None, batch_size: int = 64
                ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Score audio files / folders with a saved ensemble: (scores table, [(file, why not scored)])."""
    from raysd.data.features import resolve_device

    ensemble = str(ensemble)
    doc = read_ensemble(ensemble)
    dev = resolve_device(device)
    items = resolve_items(find_audio(paths), doc, machine_type, section)
    problems = [(str(it.path), it.problem) for it in items if it.problem]
    layout = str(doc.get("layout", ""))
    frames = []
    for mt in sorted({it.machine_type for it in items if not it.problem}):
        model = load_type(doc, mt, dev, ensemble)
        clip_seconds = model.members[0].spec.clip_seconds
        table, bad = clip_table([it for it in items if not it.problem and it.machine_type == mt], layout, clip_seconds)
        problems += bad
        if table.empty:
            continue
        scored, undecodable = score_type(model, table, dev, batch_size)
        problems += undecodable
        if layout == "recordings":
            sr = scored["sample_rate"].astype(float)
            scored["start_s"] = scored["offset"] / sr
            scored["end_s"] = (scored["offset"] + scored["num_samples"]) / sr
        frames.append(scored)
    cols = OUTPUT_COLUMNS + (["offset", "start_s", "end_s"] if layout == "recordings" else [])
    out = pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)
    return out, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raysd.score", description=__doc__.split("\n\n")[0])
    p.add_argument("ensemble", help="ensemble.json written by python -m raysd.leaderboard")
    p.add_argument("paths", nargs="+", help="audio files and/or folders (searched recursively)")
    p.add_argument("--out", help="write the CSV here (atomically) instead of printing it")
    p.add_argument("--machine-type", help="machine type of every file (default: from the folder names)")
    p.add_argument("--section", help="machine ID / section of every file (default: from the file names)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    p.add_argument("--batch-size", type=int, default=64, help="clips featurised per batch (default 64)")
    args = p.parse_args(argv)
    if args.section is not None and args.section.isdigit():
        args.section = f"{int(args.section):02d}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # undecodable clips are reported below instead
            table, problems = score_paths(args.ensemble, args.paths, args.machine_type, args.section, args.device,
                                          args.batch_size)
    except (ScoreError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        with atomic_path(args.out) as tmp:
            table.to_csv(tmp, index=False)
        print(f"[raysd] {len(table)} clip scores written to {args.out} "
              f"({int(table['decision'].sum()) if len(table) else 0} above threshold)", file=sys.stderr)
    else:
        table.to_csv(sys.stdout, index=False)
    if problems:
        print(f"[raysd] {len(problems)} file(s) not scored:", file=sys.stderr)
        for f, why in problems:
            print(f"  {f}: {why}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
