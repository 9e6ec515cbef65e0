"""Anomaly reports: the strangest moments of long unlabelled recordings, for a person to look at before listening.

:func:`write_report` turns per-clip anomaly scores of recordings (columns ``recording, offset, num_samples,
sample_rate, score`` and, for the pictures, ``path`` of the audio file) into a report folder:

- ``anomalies.csv``: the top N clips by score with ``rank, recording, start, end`` (``hh:mm:ss.sss`` from the
  start of the recording), ``score``, ``percentile`` (percent of all scored clips scoring at most as high)
  and ``spectrogram`` (the clip's picture, relative to the folder);
- ``spectrograms/``: one PNG per top clip, its spectrogram beside that of a typical clip (the clip with the
  median score), on the same colour scale;
- ``anomaly_scores.png``: a histogram of every clip's score with the top N marked;
- ``embedding_<pca|tsne>.png``: for families with a bottleneck (``Family.embed``), a 2-D projection of the
  clips' embeddings coloured by score percentile, the top N circled.

Both ``python -m raysd.leaderboard`` (unlabelled experiments: :func:`unlabelled_reports` on the best trial's
score tables) and ``python -m raysd.score`` (new recordings) write it. Every file is written atomically; the
spectrogram folder is swapped in whole.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from raysd import artifacts, storage
from raysd.atomic import atomic_path, replace_dir
from raysd.data import audio
from raysd.data.audio import AudioError
from raysd.data.features import resolve_device
from raysd.ensemble import EnsembleError, fit_stats, standardise
from raysd.inference import embed_table
from raysd.report.ensembles import experiment_document, trial_member
from raysd.report.experiment import Experiment, Trial, read_scores
from raysd.report.plots import plot_embedding, plot_pair, plot_score_histogram

EMBED_MAX_CLIPS = 20000  # clips embedded again for the embedding view of unlabelled data (top clips always)
REPORT_CSV = "anomalies.csv"
SPECTROGRAM_DIR = "spectrograms"
HISTOGRAM_PNG = "anomaly_scores.png"
CSV_COLUMNS = ["rank", "recording", "start", "end", "score", "percentile", "spectrogram"]
REQUIRED = ("recording", "offset", "num_samples", "sample_rate", "score")
PROJECTIONS = ("pca", "tsne", "none")
DEFAULT_TOP = 20
TSNE_MAX_POINTS = 5000


class ReportError(ValueError):
    """Scores that cannot make a report, with what is wrong."""


def format_time(seconds: float) -> str:
    """``hh:mm:ss.sss`` (hours keep counting past 24), rounded to the millisecond."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"a time stamp needs a finite time >= 0 s, got {seconds}")
    ms = int(round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


_TIME = re.compile(r"(\d+):([0-5]\d):([0-5]\d)\.(\d{3})")


def parse_time(text: str) -> float:
    """Seconds of an ``hh:mm:ss.sss`` time stamp."""
    m = _TIME.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"not an hh:mm:ss.sss time stamp: {text!r}")
    h, mi, s, ms = map(int, m.groups())
    return h * 3600 + mi * 60 + s + ms / 1000


def percentiles(scores: np.ndarray) -> np.ndarray:
    """For each score, the percent of all scores that are at most as high (the top clip is 100)."""
    s = np.asarray(scores, dtype=float)
    if len(s) == 0:
        return np.zeros(0)
    return 100.0 * np.searchsorted(np.sort(s), s, side="right") / len(s)


def check_clips(clips: pd.DataFrame, where: str = "scores") -> tuple[pd.DataFrame, np.ndarray]:
    """The clips with finite scores (others dropped with a warning) and a clean index, and which rows were kept."""
    missing = [c for c in REQUIRED if c not in clips.columns]
    if missing:
        raise ReportError(f"{where}: per-clip scores lack column(s) {missing}; an anomaly report needs "
                          f"{list(REQUIRED)}")
    t = clips.reset_index(drop=True)
    score = pd.to_numeric(t["score"], errors="coerce").to_numpy(float)
    keep = np.isfinite(score)
    if not keep.any():
        raise ReportError(f"{where}: no clip has a finite score")
    if not keep.all():
        bad = ~keep
        warnings.warn(f"{where}: {int(bad.sum())} clip(s) with a NaN or infinite score are left out of the anomaly "
                      f"report, e.g. {t.loc[bad, 'recording'].iloc[0]} @ {int(t.loc[bad, 'offset'].iloc[0])}",
                      RuntimeWarning, stacklevel=3)
    t = t.loc[keep].reset_index(drop=True)
    t["score"] = score[keep]
    return t, keep


def rank_clips(clips: pd.DataFrame, top: int) -> pd.DataFrame:
    """The ``top`` clips by score (ties: earlier recording and time first) with rank, times and percentile.

    Keeps the clips' own columns and adds ``clip`` (row in ``clips``), ``start_s`` and ``end_s``."""
    if top < 1:
        raise ReportError(f"the number of top clips must be >= 1, got {top}")
    pct = percentiles(clips["score"].to_numpy(float))
    order = np.lexsort((clips["offset"].to_numpy(), clips["recording"].astype(str).to_numpy(),
                        -clips["score"].to_numpy(float)))[:top]
    t = clips.iloc[order].copy()
    t.insert(0, "clip", order)
    t.insert(0, "rank", np.arange(1, len(t) + 1))
    sr = t["sample_rate"].astype(float).to_numpy()
    t["start_s"] = t["offset"].astype(float).to_numpy() / sr
    t["end_s"] = (t["offset"].astype(float).to_numpy() + t["num_samples"].astype(float).to_numpy()) / sr
    t["start"] = [format_time(v) for v in t["start_s"]]
    t["end"] = [format_time(v) for v in t["end_s"]]
    t["percentile"] = pct[order]
    return t.reset_index(drop=True)


def typical_clip(scores: np.ndarray) -> int:
    """Row of the clip with the median score (the lower median for an even count)."""
    order = np.argsort(np.asarray(scores, dtype=float), kind="stable")
    return int(order[(len(order) - 1) // 2])


def project(z: np.ndarray, method: str = "pca", seed: int = 0, keep: np.ndarray | None = None,
            max_points: int = TSNE_MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """2-D projection of embeddings: (rows projected, their coordinates). PCA uses every row; t-SNE at most
    ``max_points`` (a seeded sample that always includes the rows in ``keep``)."""
    if method not in ("pca", "tsne"):
        raise ReportError(f"projection must be one of {PROJECTIONS}, got {method!r}")
    z = np.asarray(z, dtype=np.float64)
    rows = np.arange(len(z))
    if z.shape[1] < 2:
        z = np.hstack([z, np.zeros((len(z), 2 - z.shape[1]))])
    if method == "pca":
        from sklearn.decomposition import PCA

        return rows, PCA(n_components=2, random_state=seed).fit_transform(z)
    from sklearn.manifold import TSNE

    if len(z) > max_points:
        rng = np.random.default_rng(seed)
        must = np.unique(keep) if keep is not None else np.zeros(0, int)
        rest = np.setdiff1d(rows, must)
        rows = np.sort(np.concatenate([must, rng.choice(rest, max_points - len(must), replace=False)]))
    perplexity = float(min(30.0, max(2.0, (len(rows) - 1) / 3)))
    return rows, TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(z[rows])


@dataclass
class AnomalyReport:
    out: Path
    top: pd.DataFrame  # anomalies.csv rows (plus clip, start_s, end_s)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def csv(self) -> Path:
        return self.out / REPORT_CSV


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "clip"


def _clip_audio(row: pd.Series) -> tuple[np.ndarray, int]:
    return audio.read(str(row["path"]), int(row["offset"]), int(row["num_samples"]))


def _clip_title(prefix: str, row: pd.Series, pct: float) -> str:
    rec = str(row["recording"]).rsplit("/", 1)[-1]
    sr = float(row["sample_rate"])
    start = format_time(row["offset"] / sr)
    end = format_time((row["offset"] + row["num_samples"]) / sr)
    return f"{prefix} {rec} {start}-{end}\nscore {row['score']:.4g} ({pct:.2f}th percentile)"


def write_spectrograms(clips: pd.DataFrame, top: pd.DataFrame, out: Path, notes: list[str]) -> list[str]:
    """One PNG per top clip beside the typical clip, in ``out/spectrograms`` (swapped in whole).
    Returns each top clip's PNG path relative to ``out`` ('' where its audio could not be read)."""
    pct = percentiles(clips["score"].to_numpy(float))
    mid = typical_clip(clips["score"].to_numpy(float))
    try:
        x, sr = _clip_audio(clips.iloc[mid])
    except (AudioError, OSError) as e:
        notes.append(f"no spectrograms: the typical clip's audio cannot be read ({e})")
        return [""] * len(top)
    typical = {"audio": x, "sr": sr, "title": _clip_title("typical clip (median score):", clips.iloc[mid], pct[mid])}
    width = len(str(len(top)))
    names: list[str] = []
    unreadable: list[str] = []

    def fill(d: Path) -> None:
        for r in top.itertuples(index=False):
            row = clips.iloc[int(r.clip)]
            name = f"rank{int(r.rank):0{width}d}_{_safe(Path(str(r.recording)).stem)}_{r.start.replace(':', '-')}.png"
            try:
                a, s = _clip_audio(row)
            except (AudioError, OSError) as e:
                unreadable.append(f"{r.recording} @ {r.start}: {e}")
                names.append("")
                continue
            plot_pair({"audio": a, "sr": s, "title": _clip_title(f"#{int(r.rank)}", row, float(r.percentile))},
                      typical, d / name)
            names.append(f"{SPECTROGRAM_DIR}/{name}")

    replace_dir(out / SPECTROGRAM_DIR, fill)
    if unreadable:
        notes.append(f"{len(unreadable)} top clip(s) without a spectrogram (audio unreadable), e.g. {unreadable[0]}")
    return names


def write_report(clips: pd.DataFrame, out: str | os.PathLike, top: int = DEFAULT_TOP,
                 embeddings: np.ndarray | None = None, projection: str = "pca", title: str = "",
                 plots: bool = True, seed: int = 0, embedding_label: str = "embedding") -> AnomalyReport:
    """Write anomalies.csv and (with ``plots``) the spectrograms, histogram and embedding view into ``out``.

    ``embeddings`` (one row per clip of ``clips``, NaN rows allowed) draw the embedding view when ``projection``
    is 'pca' or 'tsne'. Spectrograms need a ``path`` column naming each clip's audio file."""
    if projection not in PROJECTIONS:
        raise ReportError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    if embeddings is not None and len(embeddings) != len(clips):
        raise ReportError(f"{len(embeddings)} embeddings for {len(clips)} clips")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clips, kept = check_clips(clips, title or str(out))
    if embeddings is not None:
        embeddings = np.asarray(embeddings)[kept]
    ranked = rank_clips(clips, top)
    report = AnomalyReport(out, ranked)
    scores = clips["score"].to_numpy(float)
    ranked["spectrogram"] = ""
    if plots:
        if "path" in clips.columns:
            ranked["spectrogram"] = write_spectrograms(clips, ranked, out, report.notes)
            if (ranked["spectrogram"] != "").any():
                report.files.append(out / SPECTROGRAM_DIR)
        else:
            report.notes.append("no spectrograms: the clips' audio files are not known")
        head = f"{title}: " if title else ""
        report.files.append(plot_score_histogram(scores, ranked["score"].to_numpy(float), float(np.median(scores)),
                                           out / HISTOGRAM_PNG, f"{head}{len(scores)} clips, top {len(ranked)} marked"))
        if embeddings is not None and projection != "none":
            good = np.isfinite(embeddings).all(axis=1)
            if good.sum() < 3:
                report.notes.append("no embedding view: fewer than 3 clips have embeddings")
            else:
                pos = np.cumsum(good) - 1  # row among the embedded clips
                top_rows = ranked["clip"].to_numpy()
                top_rows = top_rows[good[top_rows]]
                rows, xy = project(embeddings[good], projection, seed, keep=pos[top_rows])
                where = {r: i for i, r in enumerate(rows)}
                top_pos = np.array([where[p] for p in pos[top_rows] if p in where], dtype=int)
                pct = percentiles(scores)[good][rows]
                name = f"embedding_{projection}.png"
                report.files.append(plot_embedding(
                    xy, pct, top_pos, out / name,
                    f"{head}{embedding_label} ({embeddings.shape[1]}-d), {projection.upper()} of {len(rows)} clips"))
    table = ranked[CSV_COLUMNS].copy()
    table["percentile"] = table["percentile"].round(4)
    with atomic_path(out / REPORT_CSV) as tmp:
        table.to_csv(tmp, index=False)
    report.files.insert(0, out / REPORT_CSV)
    return report


def read_report(path: str | os.PathLike) -> pd.DataFrame:
    """An anomalies.csv with ``start_s`` / ``end_s`` (seconds) parsed from its time stamps."""
    t = pd.read_csv(path, dtype={"recording": str, "start": str, "end": str, "spectrogram": str},
                    keep_default_na=False)
    t["start_s"] = [parse_time(v) for v in t["start"]]
    t["end_s"] = [parse_time(v) for v in t["end"]]
    return t


# ---------------------------------------------------------------------- unlabelled experiments
def report_clips(t: Trial) -> tuple[pd.DataFrame, str]:
    """The clips whose strangest moments are reported for a trial, and what they are: the examined recording's
    test clips if there are any, else every clip the trial scored (training, held-out, test)."""
    test = t.test.loc[t.test["split"] == "test"] if t.test is not None else None
    if test is not None and len(test):
        n = test["file"].nunique()
        return test, f"the examined recording{'s' if n > 1 else ''} ({', '.join(sorted(test['file'].unique())[:3])})"
    if t.heldout is None and t.checkpoint and storage.exists(storage.join(t.checkpoint, artifacts.SCORES_HELDOUT)):
        t.heldout = read_scores(storage.join(t.checkpoint, artifacts.SCORES_HELDOUT))
    parts = [p for p in (t.train, t.heldout, t.test) if p is not None and len(p)]
    clips = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    key = [c for c in ("file", "offset") if c in clips.columns]
    clips = clips.drop_duplicates(key) if key else clips
    return clips, "every clip the trial scored (training and held-out; no recording was examined: set " \
                  "heldout.examine in the preset to report on one recording)"


@dataclass
class Unlabelled:
    reports: dict[str, AnomalyReport]  # machine type -> its report
    what: dict[str, str]  # machine type -> which clips, which trial
    doc: dict | None
    files: list[Path]


def unlabelled_reports(exp: Experiment, board: pd.DataFrame, values: dict[str, float], out: Path, top: int,
                       quantile: float, projection: str, plots: bool, notes: list[str],
                       device: str | None = None) -> Unlabelled:
    """For each machine type, the best trial by the search metric: its anomaly report and a one-member entry of
    ``ensemble.json``."""
    by_key = {t.key: t for t in exp.trials}
    best = board[board["rank"] == 1]
    types_with = sorted(best["machine_type"].unique())
    reports, what, entries, files = {}, {}, {}, []
    data_root = str(exp.meta.get("data_root") or "")
    for mt in types_with:
        row = best[best["machine_type"] == mt].iloc[0]
        t = by_key[f"{row['study']}/{row['trial_id']}"]
        assert t.train is not None, f"{t.name} is ranked, so its score tables were read"
        try:
            stats = fit_stats(t.train, t.name)
            z_train = standardise(t.train.loc[t.train["split"] == "train"], stats, t.name)
        except EnsembleError as e:
            notes.append(f"{mt}: best trial {t.name} has unusable training scores ({e}); no report")
            continue
        entry = trial_member(t, 1, stats.loc[stats["machine_type"] == mt])
        thr = {s: v for (_, s), v in artifacts.thresholds(z_train, quantile).items()}
        entries[mt] = artifacts.type_entry("best single", "single", "mean", [entry], thr, {exp.metric: values[t.key]})
        clips, which = report_clips(t)
        missing = [c for c in ("offset", "num_samples", "sample_rate") if c not in clips.columns]
        if clips.empty or missing:
            notes.append(f"{mt}: no anomaly report: the score tables of {t.name} "
                         + ("are empty" if clips.empty else f"lack the clip columns {missing} (written by an older "
                                                            "raysd; score the recording with python -m raysd.score)"))
            continue
        clips = clips.assign(recording=clips["file"].astype(str), num_samples=clips["num_samples"].astype("int64"),
                             sample_rate=clips["sample_rate"].astype("int64")).reset_index(drop=True)
        has_audio = bool(data_root) and not storage.is_remote(str(data_root)) and \
            Path(data_root, str(clips["file"].iloc[0])).is_file()
        embeddings, label = None, ""
        if has_audio:
            clips["path"] = [str(Path(data_root, f)) for f in clips["file"].astype(str)]
        elif plots:
            notes.append(f"{mt}: the recordings are not under the experiment's data root {data_root}: no "
                         "spectrograms or embedding view")
        if has_audio and plots and projection != "none":
            rows = np.arange(len(clips))
            if len(clips) > EMBED_MAX_CLIPS:  # the top clips and a seeded sample of the others
                best_rows = np.argsort(-clips["score"].astype(float).to_numpy(), kind="stable")[:top]
                rest = np.setdiff1d(rows, best_rows)
                rows = np.union1d(best_rows, np.random.default_rng(0).choice(rest, EMBED_MAX_CLIPS - len(best_rows),
                                                                               replace=False))
                notes.append(f"{mt}: the embedding view shows the top {len(best_rows)} and a random sample of "
                             f"{len(rows) - len(best_rows)} of the other {len(clips) - len(best_rows)} clips")
            try:
                member = artifacts.load_member(entry, resolve_device(device), str(out / artifacts.ENSEMBLE_FILE))
                sub, failed = embed_table(member.trainer, member.spec, clips.iloc[rows].reset_index(drop=True),
                                          resolve_device(device))
            except (artifacts.ArtifactError, KeyError, TypeError, ValueError) as e:
                notes.append(f"{mt}: no embedding view ({type(e).__name__}: {e})")
            else:
                label = f"{t.name} bottleneck"
                if sub is None:
                    notes.append(f"{mt}: {t.family} has no bottleneck embedding: no embedding view")
                else:
                    embeddings = np.full((len(clips), sub.shape[1]), np.nan, np.float32)
                    embeddings[rows] = sub
                    if failed:
                        notes.append(f"{mt}: {len(failed)} clip(s) could not be decoded for the embedding view")
        dest = out if len(types_with) == 1 else out / "anomalies" / mt.replace("/", "-")
        try:
            rep = write_report(clips, dest, top=top, embeddings=embeddings, projection=projection,
                               title=f"{mt}: {t.name}", plots=plots, embedding_label=label)
        except ReportError as e:
            notes.append(f"{mt}: no anomaly report ({e})")
            continue
        reports[mt], what[mt] = rep, f"best trial {t.name} ({exp.metric} {values[t.key]:.4g}); clips: {which}"
        notes += [f"{mt}: {n}" for n in rep.notes]
        files += rep.files
    return Unlabelled(reports, what, experiment_document(exp, entries, quantile) if entries else None, files)


