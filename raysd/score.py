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
(default ``./anomalies``; see ``raysd.anomalies``): ``anomalies.csv`` with the ``--top`` clips, their spectrograms
beside a typical clip, a histogram of all scores and, for members with a bottleneck, an embedding view
(``--projection pca|tsne|none``). Recordings are read and scored a batch of clips at a time, so a six-hour file
needs no more memory than a short one. Exit status 0 when every file was scored, 1 when some could not be
(unknown machine type / section, or undecodable audio), 2 on bad arguments or an unusable model.
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
from raysd.storage import STATE_FILE, TRIAL_FILE

AUDIO_SUFFIXES = (".wav", ".flac")
TRAIN_SCORES = "scores_train.csv"
DEFAULT_QUANTILE = 0.9
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


def is_checkpoint(path: str | os.PathLike) -> bool:
    return storage.exists(storage.join(str(path), TRIAL_FILE)) and storage.exists(storage.join(str(path), STATE_FILE))


def checkpoint_document(ckpt: str, quantile: float = DEFAULT_QUANTILE) -> dict:
    """An ensemble document of one trial's last checkpoint: the trial alone, its scores standardised per section
    with its training-clip scores, the decision threshold at ``quantile`` of those standardised scores."""
    from raysd.ensemble import EnsembleError, fit_stats

    if not 0.0 < quantile < 1.0:
        raise ScoreError(f"--quantile must be between 0 and 1, got {quantile}")
    try:
        trial = storage.read_json(storage.join(ckpt, TRIAL_FILE))
        train = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(ckpt, TRAIN_SCORES))),
                            dtype={"section": str, "machine_type": str, "file": str}, keep_default_na=False)
    except FileNotFoundError as e:
        raise ScoreError(f"{ckpt}: not the last checkpoint of a trial ({e.filename or e} is missing; only the last "
                         f"checkpoint holds {TRAIN_SCORES}, needed to standardise and threshold its scores)") from None
    except (OSError, ValueError) as e:
        raise ScoreError(f"{ckpt}: cannot read the trial ({type(e).__name__}: {e})") from None
    for key in ("family", "params", "spec", "info", "machine_type"):
        if not trial.get(key):
            raise ScoreError(f"{storage.join(ckpt, TRIAL_FILE)} lacks {key!r}")
    mt = str(trial["machine_type"])
    try:
        stats = fit_stats(train.assign(machine_type=mt), storage.join(ckpt, TRAIN_SCORES))
    except (EnsembleError, KeyError) as e:
        raise ScoreError(f"{ckpt}: {e}") from None
    thr = {}
    for r in stats.itertuples(index=False):
        s = train.loc[train["section"].astype(str) == str(r.section), "score"].astype(float).to_numpy()
        thr[str(r.section)] = float(np.quantile((s - r.mean) / max(r.std, 1e-12), quantile))
    layout = trial.get("layout") or ("recordings" if "offset" in train.columns else "dcase2020")
    member = {"name": f"{trial['family']}/{Path(str(ckpt).rstrip('/')).parent.name or 'trial'}",
              "family": trial["family"], "weight": 1, "checkpoint": str(ckpt),
              "state": storage.join(str(ckpt), STATE_FILE), "params": trial["params"], "spec": trial["spec"],
              "info": trial["info"], "epoch": trial.get("epoch"),
              "stats": {str(r.section): {"mean": float(r.mean), "std": float(r.std), "n": int(r.n)}
                        for r in stats.itertuples(index=False)}}
    return {"version": 1, "layout": layout, "quantile": quantile, "source": "checkpoint",
            "machine_types": {mt: {"ensemble": "single trial", "kind": "single", "combine": "mean",
                                   "members": [member], "sections": sorted(thr), "threshold": thr}}}


def read_ensemble(path: str | os.PathLike, quantile: float = DEFAULT_QUANTILE) -> dict:
    """An ensemble document from an ``ensemble.json`` or from a trial's checkpoint folder."""
    if is_checkpoint(path):
        return checkpoint_document(str(path), quantile)
    if os.path.isdir(path):
        raise ScoreError(f"{path}: a folder, but not a trial checkpoint (no {TRIAL_FILE} and {STATE_FILE}); pass an "
                         "ensemble.json written by python -m raysd.leaderboard or a trial's last checkpoint folder")
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
def member_scores(m: Member, table: pd.DataFrame, device: torch.device, batch_size: int, failed: list,
                  embed: bool = False, workers: int | None = None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(positions in ``table``, raw anomaly scores, clip embeddings or None) batch by batch, featurised with the
    member's spec and read straight from the files."""
    from raysd.anomalies import stream

    yield from stream(m.trainer, m.spec, table, device, batch_size, embed=embed, failed=failed, workers=workers)


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
                elif embedder == j:
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
              quantile: float = DEFAULT_QUANTILE, workers: int | None = None) -> Scored:
    """Score audio files / folders with a saved ensemble or trial checkpoint (and embed their clips).

    Clips are read ``batch_size`` at a time by ``workers`` threads (default: one per CPU), so memory does not grow
    with the length of a recording."""
    from raysd.data.features import resolve_device

    ensemble = str(ensemble)
    doc = read_ensemble(ensemble, quantile)
    dev = resolve_device(device)
    items = resolve_items(find_audio(paths), doc, machine_type, section)
    problems = [(str(it.path), it.problem) for it in items if it.problem]
    layout = str(doc.get("layout", ""))
    frames, embeddings = [], {}
    for mt in sorted({it.machine_type for it in items if not it.problem}):
        model = load_type(doc, mt, dev, ensemble)
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
    from raysd.anomalies import write_report

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
    from raysd.anomalies import DEFAULT_TOP, PROJECTIONS, ReportError

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
    p.add_argument("--quantile", type=float, default=DEFAULT_QUANTILE,
                   help="for a checkpoint folder: decision threshold as this quantile of its standardised training "
                        f"scores (default {DEFAULT_QUANTILE})")
    args = p.parse_args(argv)
    if args.section is not None and args.section.isdigit():
        args.section = f"{int(args.section):02d}"
    if args.top < 1:
        print(f"error: --top must be >= 1, got {args.top}", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # undecodable clips are reported below instead
            layout = None if args.no_report else str(read_ensemble(args.ensemble, args.quantile).get("layout", ""))
            report = None if args.no_report or (layout != "recordings" and not args.report) else \
                Path(args.report or "anomalies")
            scored = score_all(args.ensemble, args.paths, args.machine_type, args.section, args.device,
                               args.batch_size, embed=report is not None and not args.no_plots
                               and args.projection != "none", quantile=args.quantile)
    except (ScoreError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cols = OUTPUT_COLUMNS + (["offset", "start_s", "end_s"] if scored.layout == "recordings" else [])
    table = scored.table[cols]
    if args.out:
        with atomic_path(args.out) as tmp:
            table.to_csv(tmp, index=False)
        print(f"[raysd] {len(table)} clip scores written to {args.out} "
              f"({int(table['decision'].sum()) if len(table) else 0} above threshold)", file=sys.stderr)
    else:
        table.to_csv(sys.stdout, index=False)
    if report is not None and len(scored.table):
        try:
            for r in write_reports(scored, report, args.top, args.projection, plots=not args.no_plots):
                print(f"[raysd] strangest {len(r.top)} clips: {r.csv}", file=sys.stderr)
                for n in r.notes:
                    print(f"[raysd]   {n}", file=sys.stderr)
        except ReportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if scored.problems:
        print(f"[raysd] {len(scored.problems)} file(s) not scored:", file=sys.stderr)
        for f, why in scored.problems:
            print(f"  {f}: {why}", file=sys.stderr)
    return 1 if scored.problems else 0


if __name__ == "__main__":
    sys.exit(main())
