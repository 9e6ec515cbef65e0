"""A selection metric that needs no anomalous clips: ``pseudo_official``.

Held-out normal clips (training clips no trial trains on, :mod:`raysd.data.heldout`) are the normals of a
pseudo test set; its anomalies are made from them, of kinds raysd's synthetic generator never plants (it plants
tones, bursts and knocks), so that measuring the metric on synthetic data measures the metric, not the generator:

- ``pitch``: each held-out clip with every frequency scaled by a factor (a machine running faster or slower, a
  changed resonance): the log-mel bands read at ``f / factor`` along the mel axis, a per-clip spectrum likewise
  along its frequency bins;
- ``other``: the held-out clips of the study's other sections (or machine types), scored as clips of the section
  at hand, where the study has several (outlier exposure's view of other machines as anomalies).

Every clip is scored by the trial's model, and the pseudo test set is evaluated as the real one is
(:func:`raysd.metrics.evaluate` with the data set's rule): ``pseudo_official``, ``pseudo_auc``, ``pseudo_pauc``.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import torch

from raysd.data.features import FeatureSpec
from raysd.families.augment import mel_centres
from raysd.families.clips import ClipSet
from raysd.metrics import MetricError, evaluate

PITCH_FACTORS = (0.92, 1.08)
ROW_COLUMNS = ["file", "machine_type", "section", "domain", "split", "label"]


def _resample(x: torch.Tensor, positions: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` read at fractional ``positions`` along ``dim`` by linear interpolation, clamped at the edges."""
    n = x.shape[dim]
    pos = positions.clamp(0, n - 1).to(x.device, torch.float32)
    lo = pos.floor().long().clamp(max=n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo.float()).reshape([-1 if d == dim else 1 for d in range(x.dim())])
    return x.index_select(dim, lo) * (1 - frac) + x.index_select(dim, hi) * frac


def mel_positions(spec: FeatureSpec, factor: float) -> torch.Tensor:
    """For each kept mel band of ``spec``, the fractional band whose frequency is its centre / ``factor``."""
    f_max = float(spec.f_max or spec.sample_rate / 2)
    centres = mel_centres(spec.n_mels, spec.f_min, f_max, spec.mel_scale).numpy()
    lo, hi = spec.mel_range or (0, spec.n_mels)
    kept = centres[lo:hi]
    pos = np.interp(kept / factor, kept, np.arange(len(kept), dtype=float))
    return torch.from_numpy(pos)


def pitch_shifted(data: ClipSet, spec: FeatureSpec, factor: float) -> ClipSet:
    """Every clip of ``data`` with its frequencies scaled by ``factor`` (its per-clip spectra too)."""
    clips = _resample(data.clips, mel_positions(spec, factor), dim=1)
    extras = [_resample(e, torch.arange(e.shape[1], dtype=torch.float64) / factor, dim=1) if e.dim() == 2 else e
              for e in data.extras]
    return ClipSet(clips, data.labels, data.view, data.sections, data.domains, extras)


def as_section(data: ClipSet, label: int, section: int) -> ClipSet:
    """The clips of ``data`` presented as clips of one class and section (their own features)."""
    n = len(data)
    return ClipSet(data.clips, torch.full((n,), label, dtype=torch.long), data.view,
                   torch.full((n,), section, dtype=torch.long), data.domains, list(data.extras))


def pseudo_set(heldout: ClipSet, rows: pd.DataFrame, spec: FeatureSpec) -> tuple[list[ClipSet], pd.DataFrame]:
    """The pseudo test set of held-out clips ``heldout`` (their catalog ``rows``): the clip sets to score, in order,
    and one row per scored clip (normals label 0, pseudo-anomalies label 1, each with the section it is scored as)."""
    rows = rows.reset_index(drop=True)
    base = rows.reindex(columns=ROW_COLUMNS).assign(split="test", label=0)
    sets, tables = [heldout], [base]
    for factor in PITCH_FACTORS:
        sets.append(pitch_shifted(heldout, spec, factor))
        tables.append(base.assign(label=1, file=base["file"] + f"#pitch{factor:g}"))
    keys = (rows["machine_type"].astype(str) + "/" + rows["section"].astype(str)).to_numpy()
    for key in sorted(set(keys)):
        mine, others = np.flatnonzero(keys == key), np.flatnonzero(keys != key)
        if not len(others):
            continue
        other = heldout.subset(torch.from_numpy(others))
        sets.append(as_section(other, int(heldout.labels[mine[0]]), int(heldout.sections[mine[0]])))
        first = rows.iloc[mine[0]]
        tables.append(rows.iloc[others].reindex(columns=ROW_COLUMNS).assign(
            split="test", label=1, machine_type=first["machine_type"], section=first["section"],
            file=rows["file"].iloc[others].to_numpy() + f"#as:{key}"))
    return sets, pd.concat(tables, ignore_index=True)


def pseudo_metrics(scores: np.ndarray, table: pd.DataFrame, rule: str) -> dict[str, float]:
    """``pseudo_official``, ``pseudo_auc`` and ``pseudo_pauc`` of the pseudo test set's scores ({} if undefined)."""
    t = table.assign(score=scores)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            _, official = evaluate(t, rule=rule)
        except MetricError:
            return {}
    return {"pseudo_official": float(official["score"]), "pseudo_auc": float(official["auc"]),
            "pseudo_pauc": float(official["pauc"])}
