"""Every picture raysd writes, and the one helper that saves them (PNG, atomically, figure closed).

Anomaly reports: a top clip's spectrogram beside a typical clip's, the score histogram, the embedding view.
Leaderboard: ROC curves per section and the histogram of an ensemble's standardised scores with its thresholds.
matplotlib (Agg backend) is imported when the first picture is drawn.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from raysd import uncertainty
from raysd.atomic import atomic_path
from raysd.ensemble import half_rows
from raysd.report.ensembles import Candidate, member_label


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` as PNG atomically and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        pyplot().close(fig)
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
    plt = pyplot()
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
    return save(fig, path)


def plot_score_histogram(scores: np.ndarray, top_scores: np.ndarray, typical: float, path: Path, title: str) -> Path:
    plt = pyplot()
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
    return save(fig, path)


def plot_embedding(xy: np.ndarray, pct: np.ndarray, top_pos: np.ndarray, path: Path, title: str) -> Path:
    """Clips in the projection plane coloured by score percentile; ``top_pos`` (rows of ``xy``, best first) circled."""
    plt = pyplot()
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
    return save(fig, path)


def section_auc_interval(rows: pd.DataFrame, score: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """The 95% bootstrap interval of one section's AUC (clips drawn within domain x label, as the leaderboard's)."""
    rs = uncertainty.resampler([rows], n_boot=uncertainty.N_BOOT)
    auc, _ = uncertainty.auc_pauc(score, label, rs.weights[:, rs.positions(rows)])
    return uncertainty.interval(auc)


def plot_roc(mt: str, single: Candidate, ens: Candidate | None, path: Path, half: str = "report") -> Path | None:
    """ROC curves per section on one half of the test clips, best single model against the best ensemble, each with
    its AUC and that AUC's 95% bootstrap interval."""
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = pyplot()
    rows = half_rows(single.test, half)
    if rows.empty:
        return None
    sections = sorted(rows["section"].astype(str).unique())
    fig, axes = plt.subplots(1, len(sections), figsize=(3.4 * len(sections), 3.4), squeeze=False)
    for ax, sec in zip(axes[0], sections):
        for cand, style in ((single, "-"), (ens, "--")):
            if cand is None:
                continue
            r = half_rows(cand.test, half)
            r = r[r["section"].astype(str) == sec]
            y = r["label"].astype(int).to_numpy()
            if len(set(y)) < 2:
                continue
            score = r["score"].astype(float).to_numpy()
            fpr, tpr, _ = roc_curve(y, score)
            lo, hi = section_auc_interval(r, score, y)
            ax.plot(fpr, tpr, style, label=f"{cand.name}: AUC {roc_auc_score(y, score):.3f} [{lo:.2f}, {hi:.2f}]")
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
        ax.axvline(0.1, color="grey", lw=0.5)
        ax.set_title(f"{mt} section {sec}", fontsize=9)
        ax.set_xlabel("false positive rate")
        ax.legend(fontsize=7, loc="lower right")
    axes[0][0].set_ylabel("true positive rate")
    fig.suptitle(f"{mt}: ROC per section on the {half} half, AUC [95% bootstrap interval] (grey line: FPR 0.1, the "
                 "pAUC limit)", fontsize=10)
    fig.tight_layout()
    return save(fig, path, dpi=110)


def plot_ensemble_histogram(mt: str, cand: Candidate, path: Path, threshold: dict[str, float] | None = None
                            ) -> Path | None:
    """Standardised scores of normal and anomalous test clips, with each section's decision threshold."""
    plt = pyplot()
    rows = half_rows(cand.test, "test")
    if rows.empty:
        return None
    s = rows["score"].astype(float).to_numpy()
    y = rows["label"].astype(int).to_numpy()
    bins = np.histogram_bin_edges(s, bins=30)
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.hist(s[y == 0], bins=bins, alpha=0.6, label=f"normal ({int((y == 0).sum())})")
    ax.hist(s[y == 1], bins=bins, alpha=0.6, label=f"anomalous ({int((y == 1).sum())})")
    for i, v in enumerate(sorted((threshold or {}).values())):
        ax.axvline(v, color="black", ls="--", lw=0.8, label="decision threshold per section" if i == 0 else None)
    ax.set_xlabel("standardised anomaly score")
    ax.set_ylabel("test clips")
    ax.set_title(f"{mt}: {cand.name} ({member_label(cand.weights)[:60]})", fontsize=8)
    ax.legend(fontsize=8)
    return save(fig, path, dpi=110)
