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
(2022+ naming: ``<type>/{train,test}/section_XX_{source,target}_{train,test}_{normal,anomaly}_NNNN_spd_S.wav``
plus ``<type>/attributes_XX.csv``). In the 2023 layout the IDs become sections 00, 01, ...; the target
domain runs at a shifted speed (10-20 %) with more background noise and has only a few training clips.

Every file's content depends only on (seed, relative path), via its own ``numpy.random.Generator``, so
generation is deterministic and can run in parallel. ``synth_meta.csv`` (file, machine_type, section,
domain, split, label, kind, severity; ``kind``/``severity`` are ``none`` for normal clips) and
``synth_config.json`` (written last: the completion marker) are written to the root.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raysd.atomic import atomic_write_text

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


def _crc(s: str) -> int:
    return zlib.crc32(s.encode())


def _rng(*key: int | str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([k if isinstance(k, int) else _crc(k) for k in key]))


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x * x)) + 1e-12)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / _rms(x)


@functools.lru_cache(maxsize=65536)
def _draw(seed: int, machine_type: str, machine_id: str, name: str, what: str, k: int = 1) -> tuple[float, ...]:
    r = _rng(seed, machine_type, machine_id, name)
    if what == "perm":
        return tuple(float(v) for v in r.permutation(k))
    if what == "weights":
        return tuple(float(v) for v in r.uniform(0.25, 1.0, k))
    return (float(r.uniform(0.0, 1.0)),)


class IdParams:
    """The parameters of one machine ID, each a pure function of (seed, machine type, ID, name)."""

    SLOTS = 8

    def __init__(self, seed: int, machine_type: str, machine_id: str):
        self.seed, self.type, self.id = seed, machine_type, machine_id
        self.slot = int(machine_id) % self.SLOTS if machine_id.isdigit() else _crc(machine_id) % self.SLOTS

    def _u(self, name: str) -> float:
        return _draw(self.seed, self.type, self.id, name, "u")[0]

    def spread(self, name: str, lo: float, hi: float) -> float:
        """Log-spaced over [lo, hi]: each slot gets its own eighth of the range (permuted per parameter)."""
        perm = _draw(self.seed, self.type, "*", name, "perm", self.SLOTS)
        u = 0.25 + 0.5 * self._u(name)
        return float(lo * (hi / lo) ** ((perm[self.slot] + u) / self.SLOTS))

    def uniform(self, name: str, lo: float, hi: float) -> float:
        return lo + (hi - lo) * self._u(name)

    def choice(self, name: str, options: tuple) -> object:
        return options[min(int(self._u(name) * len(options)), len(options) - 1)]

    def weights(self, name: str, k: int, decay: tuple[float, float] = (0.5, 1.5)) -> np.ndarray:
        """Harmonic weights k**-d * u_k, d in ``decay``, u_k in [0.25, 1]."""
        d = decay[0] + (decay[1] - decay[0]) * self._u(name + "/decay")
        return np.arange(1, k + 1) ** -d * np.asarray(_draw(self.seed, self.type, self.id, name, "weights", k))


# ---- signal pieces --------------------------------------------------------------------------------


def _smooth(rng: np.random.Generator, n: int, sr: int, rate_hz: float) -> np.ndarray:
    """A slowly varying random curve with about ``rate_hz`` independent values per second."""
    k = max(2, int(n / sr * rate_hz) + 2)
    return np.interp(np.linspace(0, k - 1, n), np.arange(k), rng.standard_normal(k))


def _harmonic(rng: np.random.Generator, n: int, sr: int, f0: float, weights, drift: float = 0.002,
               drift_rate: float = 0.5) -> np.ndarray:
    """Sum of harmonics ``w_k sin(k phase + phi_k)`` of a fundamental drifting slowly by ``drift`` (relative)."""
    inst = f0 * (1.0 + drift * _smooth(rng, n, sr, drift_rate))
    ang = (2 * np.pi * (np.cumsum(inst / sr) % 1.0)).astype(np.float32)
    z = np.empty(n, np.complex64)
    z.real, z.imag = np.cos(ang), np.sin(ang)
    zk = z.copy()
    acc = np.zeros(n, np.complex64)
    for k, w in enumerate(weights, 1):
        if k * f0 > 0.45 * sr:
            break
        if k > 1:
            zk *= z
        acc += np.complex64(w * np.exp(1j * rng.uniform(0, 2 * np.pi))) * zk
    return acc.imag.astype(np.float64)


@functools.lru_cache(maxsize=8)
def _log_freqs(n: int, sr: int) -> tuple[np.ndarray, np.ndarray]:
    f = np.fft.rfftfreq(n, 1.0 / sr)
    f[0] = f[1]
    return np.log(f), f < 20


def _noise(rng: np.random.Generator, n: int, sr: int, centre: float | None = None, width: float = 1.0,
           tilt: float = 0.0) -> np.ndarray:
    """Unit-RMS noise with power ~ f**-tilt, optionally a log-Gaussian band around ``centre`` Hz."""
    import scipy.fft

    lf, low = _log_freqs(n, sr)
    expo = (-tilt / 2) * lf
    if centre is not None:
        expo = expo - 0.5 * ((lf - np.log(centre)) / width) ** 2
    gain = np.exp(expo).astype(np.float32)
    gain[low] = 0.0
    spec = rng.standard_normal((len(lf), 2), dtype=np.float32).view(np.complex64)[:, 0]
    return _unit(scipy.fft.irfft(spec * gain, n).astype(np.float64))


def _resonance(sr: int, freqs, decay_s: float, weights=None) -> np.ndarray:
    """A click: damped sinusoids, peak-normalised."""
    t = np.arange(max(8, int(sr * decay_s * 6))) / sr
    weights = np.ones(len(freqs)) if weights is None else weights
    k = sum(w * np.sin(2 * np.pi * f * t) for f, w in zip(freqs, weights)) * np.exp(-t / decay_s)
    return k / (np.abs(k).max() + 1e-12)


def _events(n: int, sr: int, times: np.ndarray, amps: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    from scipy.signal import oaconvolve

    imp = np.zeros(n)
    idx = np.round(np.asarray(times) * sr).astype(np.int64)
    keep = (idx >= 0) & (idx < n)
    np.add.at(imp, idx[keep], np.asarray(amps, dtype=float)[keep])
    return oaconvolve(imp, kernel)[:n]


def _periodic(rng: np.random.Generator, dur: float, period: float, jitter: float = 0.0) -> np.ndarray:
    start = rng.uniform(-period, 0)
    t = start + period * np.arange(int(dur / period) + 3)
    return t + rng.normal(0, jitter * period, t.shape)


def _poisson(rng: np.random.Generator, dur: float, rate: float) -> np.ndarray:
    return np.sort(rng.uniform(0, dur, rng.poisson(rate * dur)))


# ---- machine types: (params, rng, n, sr, speed) -> machine signal ----------------------------------


def _fan(p: IdParams, rng, n, sr, speed):
    t = np.arange(n) / sr
    f_bp = p.spread("f_bp", 90, 260) * speed
    tone = _unit(_harmonic(rng, n, sr, f_bp, p.weights("w", 6), drift=0.002))
    rot = f_bp / p.choice("blades", (3, 4, 5, 6, 7))
    am = 1 + p.uniform("am", 0.05, 0.3) * np.sin(2 * np.pi * rot * t + rng.uniform(0, 2 * np.pi))
    noise = _noise(rng, n, sr, centre=p.spread("fc", 400, 2500), width=p.uniform("bw", 0.7, 1.2), tilt=0.3)
    r = p.uniform("tonal", 0.25, 0.6)
    return r * tone + (1 - r) * noise * am


def _pump(p: IdParams, rng, n, sr, speed):
    t = np.arange(n) / sr
    f0 = p.spread("f0", 45, 140) * speed
    pulse = p.spread("pulse", 1.5, 6.0) * speed
    phi = rng.uniform(0, 2 * np.pi)
    depth, gamma = p.uniform("depth", 0.4, 0.9), p.uniform("gamma", 1.0, 4.0)

    def env(lag: float) -> np.ndarray:
        return 1 - depth + depth * ((1 + np.cos(2 * np.pi * pulse * t + phi + lag)) / 2) ** gamma

    tone = _unit(_harmonic(rng, n, sr, f0, p.weights("w", 8, (0.3, 1.0)), drift=0.003)) * env(0.0)
    fluid = _noise(rng, n, sr, centre=p.spread("fc", 600, 3000), width=0.6) * env(p.uniform("lag", 0, np.pi))
    r = p.uniform("tonal", 0.4, 0.75)
    return r * tone + (1 - r) * fluid


def _slider(p: IdParams, rng, n, sr, speed):
    t = np.arange(n) / sr
    dur = n / sr
    half = p.spread("period", 0.45, 1.4) / speed / 2
    stroke = p.uniform("stroke", 0.5, 0.85)
    phi = rng.uniform(0, half * 2)
    pos = (t + phi) / half
    ph = pos % 1.0
    env = np.where(ph < stroke, np.sin(np.pi * ph / stroke) ** 2, 0.0)
    env *= np.where(np.floor(pos) % 2 == 0, 1.0, p.uniform("back", 0.5, 0.9))
    friction = _noise(rng, n, sr, centre=p.spread("fc", 1500, 5000), width=0.5) * env
    ends = np.arange(-1, dur / half + 2) * half - phi + stroke * half
    ends = ends + rng.normal(0, 0.004, ends.shape)
    kernel = _resonance(sr, [p.spread("fr", 800, 3500)], p.uniform("decay", 0.003, 0.01))
    clicks = _events(n, sr, ends, np.full(ends.shape, 1.0), kernel) * p.uniform("click", 0.5, 2.0)
    hum = _unit(_harmonic(rng, n, sr, p.spread("hum", 90, 250) * speed, [1, 0.5, 0.25]))
    return friction + clicks + p.uniform("humlvl", 0.1, 0.3) * hum


def _valve(p: IdParams, rng, n, sr, speed):
    cycle = p.spread("cycle", 0.6, 2.0) / speed
    open_frac = p.uniform("open", 0.2, 0.6)
    opens = _periodic(rng, n / sr, cycle, jitter=0.02)
    closes = opens + open_frac * cycle
    fr = p.spread("fr", 1000, 5000)
    decay = p.uniform("decay", 0.002, 0.008)
    k_open = _resonance(sr, [fr, fr * p.uniform("ratio", 1.3, 2.7)], decay, [1.0, 0.6])
    k_close = _resonance(sr, [fr * p.uniform("close", 0.8, 1.2)], decay * 1.5)
    amps = rng.uniform(0.85, 1.15, opens.shape)
    sig = _events(n, sr, opens, amps, k_open) + p.uniform("closelvl", 0.5, 1.5) * _events(n, sr, closes, amps, k_close)
    is_open = np.zeros(n)
    for a, b in zip(opens, closes):
        is_open[max(0, int(a * sr)):max(0, int(b * sr))] = 1.0
    from scipy.signal import lfilter

    smooth = lfilter([0.005], [1, -0.995], is_open)
    hiss = _noise(rng, n, sr, centre=p.spread("hiss", 2000, 6000), width=0.4) * smooth
    return sig + p.uniform("hisslvl", 0.05, 0.2) * hiss


def _toycar(p: IdParams, rng, n, sr, speed):
    t = np.arange(n) / sr
    f0 = p.spread("f0", 180, 520) * speed
    drift, drift_rate = p.uniform("drift", 0.005, 0.02), p.uniform("drift_rate", 0.1, 0.5)
    motor = _unit(_harmonic(rng, n, sr, f0, p.weights("w", 10, (0.4, 1.2)), drift, drift_rate))
    gear = _unit(_harmonic(rng, n, sr, f0 * p.uniform("gear", 2.6, 4.4), [1.0, 0.5], drift, drift_rate))
    rumble = _noise(rng, n, sr, centre=p.spread("rumble", 80, 250), width=0.6)
    wheel = 1 + p.uniform("wheel_am", 0.05, 0.2) * np.sin(2 * np.pi * p.spread("wheel", 3, 9) * speed * t
                                                         + rng.uniform(0, 2 * np.pi))
    return (motor + p.uniform("gearlvl", 0.1, 0.4) * gear + p.uniform("rumblelvl", 0.3, 0.8) * rumble) * wheel


def _toyconveyor(p: IdParams, rng, n, sr, speed):
    dur = n / sr
    hum = _unit(_harmonic(rng, n, sr, p.spread("f0", 50, 160) * speed, p.weights("w", 6), drift=0.003))
    times = _poisson(rng, dur, p.spread("rattle", 15, 60) * speed)
    k_rattle = _resonance(sr, [p.spread("fr", 2000, 6000)], p.uniform("decay", 0.001, 0.003))
    rattle = _unit(_events(n, sr, times, rng.lognormal(0, 0.4, times.shape), k_rattle) + 1e-9)
    seams = _periodic(rng, dur, p.spread("seam", 0.3, 1.2) / speed, jitter=0.01)
    k_seam = _resonance(sr, [p.uniform("seam_fr", 80, 200)], 0.02)
    seam = _events(n, sr, seams, np.ones(seams.shape), k_seam)
    belt = _noise(rng, n, sr, centre=p.spread("belt", 300, 1200), width=0.8)
    return hum + p.uniform("rattlelvl", 0.3, 1.0) * rattle + p.uniform("seamlvl", 0.5, 1.5) * seam + 0.3 * belt


RENDER: dict[str, Callable] = {
    "ToyCar": _toycar, "ToyConveyor": _toyconveyor, "fan": _fan, "pump": _pump, "slider": _slider,
    "valve": _valve,
}

# per severity (low, medium, high)
SHIFT = (0.03, 0.06, 0.12)
TONE_DB = (-26.0, -19.0, -12.0)
KNOCK_PEAK = (1.0, 2.0, 4.0)
AM_DEPTH = (0.15, 0.3, 0.6)
BURST_DB = (-12.0, -6.0, 0.0)


def _anomaly(kind: str, sev: int, x: np.ndarray, rng: np.random.Generator, sr: int) -> np.ndarray:
    """Adds an anomaly of ``kind`` to the unit-RMS machine signal ``x`` (``shift`` is applied by the caller)."""
    n = len(x)
    dur = n / sr
    if kind == "tone":
        f = float(np.exp(rng.uniform(np.log(300), np.log(5000))))
        return x + 10 ** (TONE_DB[sev] / 20) * _unit(_harmonic(rng, n, sr, f, [1.0, 0.3], drift=0.003))
    if kind == "knock":
        times = _poisson(rng, dur, rng.uniform(1.0, 4.0))
        if len(times) == 0:
            times = rng.uniform(0, dur, 1)
        kernel = _resonance(sr, [rng.uniform(100, 600)], rng.uniform(0.015, 0.04))
        return x + KNOCK_PEAK[sev] * _events(n, sr, times, rng.uniform(0.7, 1.3, times.shape), kernel)
    if kind == "am":
        t = np.arange(n) / sr
        return x * (1 + AM_DEPTH[sev] * np.sin(2 * np.pi * rng.uniform(2, 12) * t + rng.uniform(0, 2 * np.pi)))
    if kind == "burst":
        length = int(min(n, sr * rng.uniform(0.15, 0.5)))
        start = int(rng.integers(0, n - length + 1))
        burst = np.zeros(n)
        burst[start:start + length] = np.hanning(length) * _noise(rng, length, sr, tilt=rng.uniform(0, 1))
        return x + 10 ** (BURST_DB[sev] / 20) * burst * np.sqrt(8 / 3)  # unit RMS under the Hann window
    raise ValueError(f"unknown anomaly kind {kind!r}")


def _background(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    x = _noise(rng, n, sr, tilt=rng.uniform(0.6, 1.6))
    if rng.random() < 0.3:
        x = x + 10 ** (rng.uniform(-20, -10) / 20) * _unit(_harmonic(rng, n, sr, 50.0, [1.0, 0.5, 0.3, 0.2]))
    if rng.random() < 0.3:
        times = _poisson(rng, n / sr, rng.uniform(0.3, 1.5))
        kernel = _resonance(sr, [rng.uniform(150, 1500)], rng.uniform(0.01, 0.05))
        x = x + rng.uniform(0.5, 2.0) * _events(n, sr, times, rng.uniform(0.5, 1.0, times.shape), kernel)
    return _unit(x)


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
    speed: float = 1.0  # domain speed (clip jitter and shift anomalies are applied on top)
    snr_db: tuple[float, float] = (3.0, 15.0)


def render_clip(plan: ClipPlan, seed: int, seconds: float, sr: int = SAMPLE_RATE) -> np.ndarray:
    """The float32 waveform of one planned clip (deterministic in (seed, plan.file))."""
    rng = _rng(seed, plan.file)
    n = int(round(seconds * sr))
    p = IdParams(seed, plan.machine_type, plan.machine_id)
    sev = SEVERITIES.index(plan.severity) if plan.label else -1
    speed = plan.speed * (1 + rng.uniform(-0.015, 0.015))
    if plan.kind == "shift":
        speed *= 1 + (1 if rng.random() < 0.5 else -1) * SHIFT[sev]
    x = _unit(RENDER[plan.machine_type](p, rng, n, sr, speed))
    if plan.label and plan.kind != "shift":
        x = _anomaly(plan.kind, sev, x, rng, sr)
    x = x + 10 ** (-rng.uniform(*plan.snr_db) / 20) * _background(rng, n, sr)
    x = x * 10 ** (rng.uniform(-30, -22) / 20) / _rms(x)
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
        for s_idx, (mid, (n_train, n_normal, n_anom)) in enumerate(ids.items()):
            slot = IdParams(seed, mtype, mid).slot
            anoms = [(KINDS[(i + slot) % len(KINDS)], SEVERITIES[i % len(SEVERITIES)]) for i in range(n_anom)]
            if layout == "dcase2020":
                def name(split: str, label: int, i: int) -> str:
                    return f"{mtype}/{split}/{'anomaly' if label else 'normal'}_id_{mid}_{i:08d}.wav"

                common = dict(machine_type=mtype, machine_id=mid, section=mid, domain="")
                out += [ClipPlan(name("train", 0, i), split="train", label=0, kind="none", severity="none", **common)
                        for i in range(n_train)]
                out += [ClipPlan(name("test", 0, i), split="test", label=0, kind="none", severity="none", **common)
                        for i in range(n_normal)]
                out += [ClipPlan(name("test", 1, i), split="test", label=1, kind=k, severity=s, **common)
                        for i, (k, s) in enumerate(anoms)]
                continue
            section = f"{s_idx:02d}"
            p = IdParams(seed, mtype, mid)
            shift = p.uniform("domain_shift", 0.10, 0.20) * (1 if p.uniform("domain_sign", 0, 1) < 0.5 else -1)
            domains = {"source": (1.0, (3.0, 15.0)), "target": (1.0 + shift, (0.0, 10.0))}
            n_target = min(preset.target_train, max(n_train - 1, 0))
            groups = [
                ("source", "train", 0, [("none", "none")] * (n_train - n_target)),
                ("target", "train", 0, [("none", "none")] * n_target),
                ("source", "test", 0, [("none", "none")] * ((n_normal + 1) // 2)),
                ("target", "test", 0, [("none", "none")] * (n_normal // 2)),
                ("source", "test", 1, anoms[0::2]),
                ("target", "test", 1, anoms[1::2]),
            ]
            for domain, split, label, items in groups:
                speed, snr = domains[domain]
                attr = f"spd_{int(round(speed * 100))}"
                for i, (k, s) in enumerate(items):
                    f = (f"{mtype}/{split}/section_{section}_{domain}_{split}_{'anomaly' if label else 'normal'}"
                         f"_{i:04d}_{attr}.wav")
                    out.append(ClipPlan(f, mtype, mid, section, domain, split, label, k, s, speed, snr))
    return out


def _write_one(args: tuple[str, ClipPlan, int, float, int]) -> None:
    import soundfile as sf

    root, clip, seed, seconds, sr = args
    path = Path(root) / clip.file
    tmp = path.with_name(f".{path.name}.tmp")
    sf.write(tmp, render_clip(clip, seed, seconds, sr), sr, subtype="PCM_16", format="WAV")
    os.replace(tmp, path)


def _meta_csv(plans: list[ClipPlan]) -> str:
    lines = ["file,machine_type,section,domain,split,label,kind,severity"]
    lines += [f"{c.file},{c.machine_type},{c.section},{c.domain},{c.split},{c.label},{c.kind},{c.severity}"
              for c in plans]
    return "\n".join(lines) + "\n"


def _attribute_csvs(plans: list[ClipPlan]) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    for c in plans:
        key = f"{c.machine_type}/attributes_{c.section}.csv"
        spd = c.file.rsplit("_spd_", 1)[1].removesuffix(".wav")
        out.setdefault(key, ["file_name,d1p,d1v"]).append(f"{c.file},spd,{spd}")
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

    return pd.read_csv(Path(root) / "synth_meta.csv", dtype={"section": str, "domain": str},
                       keep_default_na=False).astype({"label": int})


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
