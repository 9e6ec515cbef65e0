"""The strangest moments of long unlabelled recordings, for a person to look at before listening.

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

Both ``python -m raysd.leaderboard`` (unlabelled experiments: the best trial's score tables) and
``python -m raysd.score`` (new recordings) write it. :func:`stream` scores and embeds clips of any length of
recording in batches read straight from the file (``raysd.data.features.extract``), so memory stays flat.
Every file is written atomically; the spectrogram folder is swapped in whole.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from raysd.atomic import atomic_path

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


# ---------------------------------------------------------------------- scoring and embedding, streamed
@torch.no_grad()
def clip_embeddings(trainer, clips, clips_per_batch: int = 16) -> np.ndarray | None:
    """Mean bottleneck embedding of each clip's windows (float32 (N, d)); None for families without one."""
    model, family = trainer.model, trainer.family
    model.eval()
    out = []
    for _, windows, _ in clips.clip_batches(clips_per_batch):
        b, p = windows.shape[:2]
        with trainer.autocast():
            z = family.embed(model, windows.reshape(b * p, *windows.shape[2:]))
        if z is None:
            return None
        out.append(z.float().reshape(b, p, -1).mean(dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def stream(trainer, spec, table: pd.DataFrame, device: torch.device | str = "cpu", batch_size: int = 64,
           score: bool = True, embed: bool = False, failed: list | None = None, workers: int | None = None
           ) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
    """(positions in ``table``, anomaly scores, embeddings) batch by batch.

    ``table`` holds catalog-like rows (path, file, offset, num_samples, sample_rate, section); each batch of
    clips is read from its file, featurised with ``spec`` as at training time and dropped after use (at most
    ``workers + 1`` batches are in flight, see ``extract``). Clips that cannot be decoded are appended to
    ``failed`` and skipped. Embeddings are None for a family without a bottleneck."""
    from raysd.data.features import extract
    from raysd.families.base import ClipSet

    device = torch.device(device)
    code = {c: i for i, c in enumerate(trainer.info.class_names)}
    view = trainer.family.view()
    sections = table["section"].astype(str).to_numpy() if "section" in table.columns else None
    for ok, feats in extract(table, spec, device=device, batch_size=batch_size, workers=workers, failed=failed):
        if not ok:
            continue
        ok = np.asarray(ok)
        labels = torch.tensor([code.get(s, -1) for s in sections[ok]] if sections is not None else [0] * len(ok),
                              dtype=torch.long)
        clips = ClipSet(torch.from_numpy(np.ascontiguousarray(feats)).to(device), labels.to(device), view)
        yield ok, (trainer.score(clips) if score else None), (clip_embeddings(trainer, clips) if embed else None)


def embed_table(trainer, spec, table: pd.DataFrame, device: torch.device | str = "cpu", batch_size: int = 64
                ) -> tuple[np.ndarray | None, list]:
    """Embeddings of every row of ``table`` (NaN rows for clips that failed to decode), and the failures."""
    failed: list = []
    out: np.ndarray | None = None
    for ok, _, z in stream(trainer, spec, table, device, batch_size, score=False, embed=True, failed=failed):
        if z is None:
            return None, failed
        if out is None:
            out = np.full((len(table), z.shape[1]), np.nan, np.float32)
        out[ok] = z
    return out, failed


# ---------------------------------------------------------------------- pictures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def spectrogram_db(x: np.ndarray, sr: int, n_fft: int = 1024, hop: int = 256) -> np.ndarray:
    """Power spectrogram in dB (frequency bins x frames) for display."""
    w = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    n_fft = min(n_fft, max(16, 1 << int(math.log2(max(len(w), 16)))))
    spec = torch.stft(w, n_fft, hop_length=min(hop, n_fft // 4), window=torch.hann_window(n_fft),
                      return_complex=True, center=True)
    return (10 * torch.log10(spec.abs().square() + 1e-10)).numpy()


def plot_pair(top: dict, typical: dict, path: Path) -> Path:
    """A top clip's spectrogram beside the typical clip's, on one colour scale. Each dict holds the clip's
    ``audio``, ``sr`` and ``title``."""
    plt = _plt()
    specs = [spectrogram_db(c["audio"], c["sr"]) for c in (top, typical)]
    vmax = max(float(s.max()) for s in specs)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    for ax, c, s in zip(axes, (top, typical), specs):
        im = ax.imshow(s, origin="lower", aspect="auto", cmap="magma", vmin=vmax - 80, vmax=vmax,
                       extent=(0, len(c["audio"]) / c["sr"], 0, c["sr"] / 2000))
        ax.set_title(c["title"], fontsize=8)
        ax.set_xlabel("seconds into the clip")
    axes[0].set_ylabel("kHz")
    fig.colorbar(im, ax=list(axes), label="dB", fraction=0.03, pad=0.01)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_histogram(scores: np.ndarray, top_scores: np.ndarray, typical: float, path: Path, title: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.hist(scores, bins=int(np.clip(len(scores) // 4, 20, 120)), color="tab:blue", alpha=0.8,
            label=f"all clips ({len(scores)})")
    for i, v in enumerate(top_scores):
        ax.axvline(v, color="tab:red", lw=0.8, alpha=0.7, label=f"top {len(top_scores)}" if i == 0 else None)
    ax.axvline(typical, color="black", ls="--", lw=1, label="median (typical clip)")
    ax.set_yscale("log")
    ax.set_xlabel("anomaly score")
    ax.set_ylabel("clips")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


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


def plot_embedding(xy: np.ndarray, pct: np.ndarray, top_pos: np.ndarray, path: Path, title: str) -> Path:
    """Clips in the projection plane coloured by score percentile; ``top_pos`` (rows of ``xy``, best first) circled."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    order = np.argsort(pct, kind="stable")  # high percentiles drawn last, on top
    sc = ax.scatter(xy[order, 0], xy[order, 1], c=pct[order], cmap="viridis", vmin=0, vmax=100, s=7, lw=0)
    ax.scatter(xy[top_pos, 0], xy[top_pos, 1], s=60, facecolors="none", edgecolors="tab:red", lw=1.2,
               label=f"top {len(top_pos)}")
    for r, i in enumerate(top_pos[:10], start=1):
        ax.annotate(str(r), xy[i], fontsize=7, color="tab:red", xytext=(3, 3), textcoords="offset points")
    fig.colorbar(sc, ax=ax, label="score percentile")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="best")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------- the report
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
    from raysd.data import audio

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
    from raysd.data.audio import AudioError
    from raysd.leaderboard import replace_dir

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
        report.files.append(plot_histogram(scores, ranked["score"].to_numpy(float), float(np.median(scores)),
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


def markdown(report: AnomalyReport, base: Path) -> str:
    """The report's top clips and pictures as a markdown section (links relative to ``base``)."""
    def rel(p: Path) -> str:
        return os.path.relpath(p, base)

    lines = ["| rank | recording | start | end | score | percentile | spectrogram |", "|---|---|---|---|---|---|---|"]
    for r in report.top.itertuples(index=False):
        pic = f"[png]({rel(report.out / r.spectrogram)})" if r.spectrogram else ""
        lines.append(f"| {r.rank} | {r.recording} | {r.start} | {r.end} | {r.score:.4g} | {r.percentile:.2f} | {pic} |")
    lines.append("")
    lines += [f"![{p.stem}]({rel(p)})" for p in report.files if p.suffix == ".png"]
    lines += [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"
