"""Synthetic machine sounds in the DCASE layouts (``python -m raysd.data.synth OUT --preset tiny``).

Six machine types after DCASE 2020 (ToyCar, ToyConveyor, fan, pump, slider, valve), each with its own
sound, and machine IDs that differ audibly within a type: every ID parameter (fundamental, modulation
rate, resonance, harmonic weights, ...) is spread over the type's range by a seeded permutation of eight
ID slots, so two IDs of one type always differ in every spread parameter. The same (seed, type, ID)
sounds the same in every preset and layout.

Each clip adds clip-level jitter (speed +-1.5 %, random phases and timing) and background noise of random
colour and level (machine-to-noise ratio drawn per clip), sometimes with faint mains hum or distant
knocks. Test anomalies come in five kinds at three severities (``low``, ``medium``, ``high``):

- ``shift``: the machine runs 3 / 6 / 12 % off its speed (every frequency and rate scales);
- ``tone``: an extra tonal component at -26 / -19 / -12 dB relative to the machine;
- ``knock``: impulsive low-frequency knocks with peaks 1 / 2 / 4 x the machine's RMS;
- ``am``: extra amplitude modulation of depth 0.15 / 0.3 / 0.6 at 2-12 Hz;
- ``burst``: a broadband noise burst at -12 / -6 / 0 dB relative to the machine.

Layouts: ``dcase2020`` (``<type>/{train,test}/{normal,anomaly}_id_XX_NNNNNNNN.wav``) and ``dcase2023``
(2022+ naming: ``<type>/{train,test}/section_XX_{source,target}_{train,test}_{normal,anomaly}_NNNN_spd_S_load_L_mic_M.wav``
plus ``<type>/attributes_XX.csv`` with columns ``file_name,d1p,d1v,d2p,d2v,d3p,d3v``). In the 2023 layout the IDs
become sections 00, 01, ...; the target domain runs at a shifted speed (10-20 %) with more background noise and
has only a few training clips. Every 2023 clip has three attributes that change its sound:

- ``spd``: running speed in percent, the domain speed times 0.96, 1.00 or 1.04 (source: 96 / 100 / 104,
  target e.g. 109 / 114 / 119 after a +14 % domain shift);
- ``load``: 2 boosts the machine's upper partials (above its log-spectral centroid, up to +6 dB from one
  octave higher) before anomalies and noise are added; 1 leaves the machine as it is;
- ``mic``: 2 colours the whole clip, background included, with a +6 dB microphone resonance around 3 kHz
  (0.4 octave wide); 1 is flat.

Each section has a fixed list of combinations per domain (see ``attribute_combos``): three in the source
domain, each with its own spd level and (load, mic) pair, and one or two in the target domain (no more than
it has training clips). Clips take them in turn by index in every (domain, split, label) group, so every
combination has training clips; anomaly severities are spread so that each combination gets all three. The
attributes change the sound less than high-severity anomalies do, but plain log-mel statistics tell the
combinations apart.

Every file's content depends only on (seed, relative path), via its own ``numpy.random.Generator``, so
generation is deterministic and can run in parallel. ``synth_meta.csv`` (file, machine_type, section,
domain, split, label, kind, severity, attributes; ``kind``/``severity`` are ``none`` for normal clips,
``attributes`` is ``spd=S;load=L;mic=M`` in the 2023 layout and empty in the 2020 one) and ``synth_config.json``
(written last: the completion marker) are written to the root.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from raysd.atomic import atomic_write_text
from raysd.data.synth_sounds import RENDER, SHIFT, IdParams, add_anomaly, apply_load, apply_mic, background, rms, seeded_rng, unit

MACHINE_TYPES = ("ToyCar", "ToyConveyor", "fan", "pump", "slider", "valve")
DEV_IDS = {
    "ToyCar": ("01", "02", "03", "04"), "ToyConveyor": ("01", "02", "03"),
    "fan": ("00", "02", "04", "06"), "pump": ("00", "02", "04", "06"),
    "slider": ("00", "02", "04", "06"), "valve": ("00", "02", "04", "06"),
}
KINDS = ("shift", "tone", "knock", "am", "burst")
SEVERITIES = ("low", "medium", "high")
LAYOUTS = ("dcase2020", "dcase2023")
SAMPLE_RATE = 16000
# dcase2023 attributes: running speed relative to the domain's, and the (load, mic) levels
SPD_LEVELS = (0.96, 1.0, 1.04)
LOAD_MIC = ((1, 1), (2, 1), (1, 2), (2, 2))
TARGET_COMBOS = 2  # at most; never more than the section's target training clips

# (train, test normal, test anomaly) per machine ID, approximately the DCASE 2020 development set.
DCASE20_COUNTS: dict[str, dict[str, tuple[int, int, int]]] = {
    "ToyCar": {"01": (1000, 250, 263), "02": (1000, 250, 265), "03": (1000, 250, 265), "04": (1000, 250, 265)},
    "ToyConveyor": {"01": (1000, 400, 345), "02": (1000, 400, 400), "03": (1000, 400, 400)},
    "fan": {"00": (911, 100, 407), "02": (916, 100, 359), "04": (933, 100, 348), "06": (915, 100, 361)},
    "pump": {"00": (906, 100, 143), "02": (905, 100, 111), "04": (602, 100, 100), "06": (936, 100, 102)},
    "slider": {"00": (968, 100, 356), "02": (968, 100, 267), "04": (534, 100, 178), "06": (534, 100, 89)},
    "valve": {"00": (891, 100, 119), "02": (608, 100, 120), "04": (900, 100, 120), "06": (892, 100, 120)},
}


@dataclass(frozen=True)
class Preset:
    """What to generate: per machine type and ID, (train, test normal, test anomaly) clip counts."""

    name: str
    seconds: float
    counts: Mapping[str, Mapping[str, tuple[int, int, int]]]
    target_train: int = 2  # dcase2023 layout: target-domain clips among each section's training clips
    sample_rate: int = SAMPLE_RATE

    def n_clips(self) -> int:
        return sum(sum(c) for ids in self.counts.values() for c in ids.values())


def _uniform_counts(ids_per_type: int | None, train: int, normal: int, anomaly: int) -> dict:
    return {t: {i: (train, normal, anomaly) for i in DEV_IDS[t][:ids_per_type]} for t in MACHINE_TYPES}


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", 3.0, _uniform_counts(2, 24, 6, 6), target_train=2),
    "demo": Preset("demo", 3.0, _uniform_counts(3, 40, 16, 16), target_train=3),
    "small": Preset("small", 10.0, _uniform_counts(None, 60, 15, 15), target_train=3),
    "dcase20": Preset("dcase20", 10.0, DCASE20_COUNTS, target_train=10),
}


@dataclass(frozen=True)
class ClipPlan:
    file: str
    machine_type: str
    machine_id: str
    section: str
    domain: str
    split: str
    label: int
    kind: str
    severity: str
    speed: float = 1.0  # domain speed times the spd attribute (clip jitter and shift anomalies are applied on top)
    snr_db: tuple[float, float] = (3.0, 15.0)
    load: int = 1
    mic: int = 1
    attributes: str = ""  # 'spd=S;load=L;mic=M' in the dcase2023 layout


def render_clip(plan: ClipPlan, seed: int, seconds: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """The float32 waveform of one planned clip (deterministic in (seed, plan.file))."""
    rng = seeded_rng(seed, plan.file)
    n = int(round(seconds * sr))
    p = IdParams(seed, plan.machine_type, plan.machine_id)
    sev = SEVERITIES.index(plan.severity) if plan.label else -1
    speed = plan.speed * (1 + rng.uniform(-0.015, 0.015))
    if plan.kind == "shift":
        speed *= 1 + (1 if rng.random() < 0.5 else -1) * SHIFT[sev]
    x = unit(RENDER[plan.machine_type](p, rng, n, sr, speed))
    if plan.load != 1:
        x = unit(apply_load(x, sr, plan.load))
    if plan.label and plan.kind != "shift":
        x = add_anomaly(plan.kind, sev, x, rng, sr)
    x = x + 10 ** (-rng.uniform(*plan.snr_db) / 20) * background(rng, n, sr)
    if plan.mic != 1:
        x = apply_mic(x, sr, plan.mic)
    x = x * 10 ** (rng.uniform(-30, -22) / 20) / rms(x)
    peak = np.abs(x).max()
    if peak > 0.99:
        x *= 0.99 / peak
    return x.astype(np.float32)


def plan(preset: Preset, seed: int = 0, layout: str = "dcase2020") -> list[ClipPlan]:
    """Every clip of a data set: its relative path and what it contains."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    out: list[ClipPlan] = []
    for mtype, ids in preset.counts.items():
        if mtype not in RENDER:
            raise ValueError(f"unknown machine type {mtype!r}; choose from {', '.join(MACHINE_TYPES)}")
        for s_idx, (mid, counts) in enumerate(ids.items()):
            if layout == "dcase2020":
                out += _plan_id_2020(seed, mtype, mid, counts)
            else:
                out += _plan_section(seed, mtype, mid, f"{s_idx:02d}", counts, preset.target_train)
    return out


def _plan_id_2020(seed: int, mtype: str, mid: str, counts: tuple[int, int, int]) -> list[ClipPlan]:
    n_train, n_normal, n_anom = counts
    slot = IdParams(seed, mtype, mid).slot
    anoms = [(KINDS[(i + slot) % len(KINDS)], SEVERITIES[i % len(SEVERITIES)]) for i in range(n_anom)]

    def name(split: str, label: int, i: int) -> str:
        return f"{mtype}/{split}/{'anomaly' if label else 'normal'}_id_{mid}_{i:08d}.wav"

    common: dict[str, Any] = dict(machine_type=mtype, machine_id=mid, section=mid, domain="")
    return ([ClipPlan(name("train", 0, i), split="train", label=0, kind="none", severity="none", **common)
             for i in range(n_train)]
            + [ClipPlan(name("test", 0, i), split="test", label=0, kind="none", severity="none", **common)
               for i in range(n_normal)]
            + [ClipPlan(name("test", 1, i), split="test", label=1, kind=k, severity=s, **common)
               for i, (k, s) in enumerate(anoms)])


def attribute_combos(seed: int, mtype: str, mid: str, n_target: int) -> dict[str, list[tuple[float, int, int]]]:
    """(speed, load, mic) combinations of a section per domain: three in the source domain, each with its own spd
    level and (load, mic) pair, and ``min(TARGET_COMBOS, n_target)`` (at least one) in the target domain, whose
    speeds are the target's shifted domain speed times an spd level."""
    p = IdParams(seed, mtype, mid)
    shift = p.uniform("domain_shift", 0.10, 0.20) * (1 if p.uniform("domain_sign", 0, 1) < 0.5 else -1)
    r = seeded_rng(seed, mtype, mid, "attributes")
    pairs = [LOAD_MIC[k] for k in r.permutation(len(LOAD_MIC))]
    spds = [SPD_LEVELS[k] for k in r.permutation(len(SPD_LEVELS))]
    n_t = max(1, min(TARGET_COMBOS, n_target))
    return {"source": [(spds[i], *pairs[i]) for i in range(len(SPD_LEVELS))],
            "target": [((1.0 + shift) * spds[i], *pairs[-1 - i]) for i in range(n_t)]}


def _severity(i: int, n_combos: int) -> str:
    """Severities cycle over a domain's anomalies, shifted by one every round of combinations when the two cycles
    would run in step (a multiple of three combinations), so every combination gets every severity."""
    k = len(SEVERITIES)
    return SEVERITIES[(i + (i // n_combos if n_combos % k == 0 else 0)) % k]


def _plan_section(seed: int, mtype: str, mid: str, section: str, counts: tuple[int, int, int],
                  target_train: int) -> list[ClipPlan]:
    n_train, n_normal, n_anom = counts
    slot = IdParams(seed, mtype, mid).slot
    n_target = min(target_train, max(n_train - 1, 0))
    combos = attribute_combos(seed, mtype, mid, n_target)
    snr = {"source": (3.0, 15.0), "target": (0.0, 10.0)}
    groups = [("source", "train", 0, n_train - n_target), ("target", "train", 0, n_target),
              ("source", "test", 0, (n_normal + 1) // 2), ("target", "test", 0, n_normal // 2),
              ("source", "test", 1, (n_anom + 1) // 2), ("target", "test", 1, n_anom // 2)]
    out = []
    for domain, split, label, count in groups:
        for i in range(count):
            speed, load, mic = combos[domain][i % len(combos[domain])]
            attrs = f"spd={int(round(speed * 100))};load={load};mic={mic}"
            kind, sev = "none", "none"
            if label:
                kind = KINDS[(2 * i + (domain == "target") + slot) % len(KINDS)]
                sev = _severity(i, len(combos[domain]))
            f = (f"{mtype}/{split}/section_{section}_{domain}_{split}_{'anomaly' if label else 'normal'}_{i:04d}_"
                 f"{attrs.replace('=', '_').replace(';', '_')}.wav")
            out.append(ClipPlan(f, mtype, mid, section, domain, split, label, kind, sev, speed, snr[domain],
                                load, mic, attrs))
    return out


def _write_one(args: tuple[str, ClipPlan, int, float, int]) -> None:
    import soundfile as sf

    root, clip, seed, seconds, sr = args
    path = Path(root) / clip.file
    tmp = path.with_name(f".{path.name}.tmp")
    sf.write(tmp, render_clip(clip, seed, seconds, sr), sr, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


def _meta_csv(plans: list[ClipPlan]) -> str:
    lines = ["file,machine_type,section,domain,split,label,kind,severity,attributes"]
    lines += [f"{c.file},{c.machine_type},{c.section},{c.domain},{c.split},{c.label},{c.kind},{c.severity},{c.attributes}"
              for c in plans]
    return "\n".join(lines) + "\n"


def _attribute_csvs(plans: list[ClipPlan]) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    for c in plans:
        key = f"{c.machine_type}/attributes_{c.section}.csv"
        row = ",".join(v for item in c.attributes.split(";") for v in item.split("="))
        out.setdefault(key, ["file_name,d1p,d1v,d2p,d2v,d3p,d3v"]).append(f"{c.file},{row}")
    return {k: "\n".join(v) + "\n" for k, v in out.items()}


def _remove_previous(root: Path) -> None:
    """Deletes the files of a data set generated earlier into ``root`` (as listed by its synth_meta.csv)."""
    meta = root / "synth_meta.csv"
    if not meta.exists():
        return
    for line in meta.read_text().splitlines()[1:]:
        (root / line.split(",", 1)[0]).unlink(missing_ok=True)
    for csv in root.glob("*/attributes_*.csv"):
        csv.unlink()
    meta.unlink()


def get_preset(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[preset]


def generate(out_dir: str | os.PathLike, preset: str | Preset = "tiny", seed: int = 0, layout: str = "dcase2020",
             workers: int | None = None, overwrite: bool = False) -> Path:
    """Writes a synthetic data set to ``out_dir`` and returns its path.

    If ``out_dir`` already holds a complete data set of the same (preset, seed, layout), nothing is
    written. ``workers``: processes (default: 1 for fewer than 1000 clips, else every CPU).
    """
    p = get_preset(preset)
    root = Path(out_dir).expanduser().resolve()
    config = {"preset": p.name, "seed": int(seed), "layout": layout, "seconds": p.seconds,
              "sample_rate": p.sample_rate, "target_train": p.target_train,
              "counts": {t: {i: list(c) for i, c in ids.items()} for t, ids in p.counts.items()}}
    if layout == "dcase2023":  # sets written before the attributes lack this key and count as different
        config["attributes"] = ["spd", "load", "mic"]
    marker = root / "synth_config.json"
    if marker.exists() and not overwrite:
        try:
            old = json.loads(marker.read_text())
        except (OSError, ValueError):
            old = None
        if old == config:
            return root
        raise FileExistsError(f"{root} already holds a different synthetic data set ({marker}); "
                              "pass overwrite=True (--overwrite) or choose another directory")
    if root.exists() and not marker.exists() and any(root.iterdir()) and not overwrite:
        if not (root / "synth_meta.csv").exists():
            raise FileExistsError(f"{root} is not empty and holds no raysd synthetic data set; choose an empty directory")
    plans = plan(p, seed, layout)
    for d in sorted({(root / c.file).parent for c in plans}):
        d.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    if overwrite:
        _remove_previous(root)
    jobs = [(str(root), c, int(seed), p.seconds, p.sample_rate) for c in plans]
    if workers is None:
        workers = 1 if len(jobs) < 1000 else (os.cpu_count() or 1)
    if workers <= 1:
        for j in jobs:
            _write_one(j)
    else:
        import multiprocessing

        # spawn, not fork: the caller may hold threads (torch, Ray) that a forked child would inherit locked
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_write_one, jobs, chunksize=32))
    if layout == "dcase2023":
        for rel, text in _attribute_csvs(plans).items():
            atomic_write_text(root / rel, text)
    atomic_write_text(root / "synth_meta.csv", _meta_csv(plans))
    atomic_write_text(marker, json.dumps(config, indent=1, sort_keys=True))
    return root


def read_meta(root: str | os.PathLike):
    """``synth_meta.csv`` as a pandas DataFrame (sections kept as two-digit strings)."""
    import pandas as pd

    meta = pd.read_csv(Path(root) / "synth_meta.csv", dtype={"section": str, "domain": str, "attributes": str},
                       keep_default_na=False).astype({"label": int})
    if "attributes" not in meta:  # written before the dcase2023 layout had attributes
        meta["attributes"] = ""
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raysd.data.synth", description=__doc__.split("\n")[0])
    ap.add_argument("out", help="output directory (created)")
    ap.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layout", default="dcase2020", choices=LAYOUTS)
    ap.add_argument("--workers", type=int, default=None, help="processes (default: all CPUs for large sets)")
    ap.add_argument("--overwrite", action="store_true", help="regenerate even if OUT holds another data set")
    a = ap.parse_args(argv)
    try:
        root = generate(a.out, a.preset, a.seed, a.layout, a.workers, a.overwrite)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = get_preset(a.preset).n_clips()
    print(f"{root}: {n} clips ({a.preset}, seed {a.seed}, layout {a.layout})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
