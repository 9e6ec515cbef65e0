"""The sounds of the synthetic machines (see ``raysd.data.synth``): per-ID parameters, signal pieces, the six
machine types, the five anomaly kinds, the background, and the load and microphone attributes. Every function
draws from the generator it is given (the attribute filters draw nothing), so a clip depends only on its seed."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable

import numpy as np


def _crc(s: str) -> int:
    return zlib.crc32(s.encode())


def seeded_rng(*key: int | str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([k if isinstance(k, int) else _crc(k) for k in key]))


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x * x)) + 1e-12)


def unit(x: np.ndarray) -> np.ndarray:
    return x / rms(x)


@functools.lru_cache(maxsize=65536)
def _draw(seed: int, machine_type: str, machine_id: str, name: str, what: str, k: int = 1) -> tuple[float, ...]:
    r = seeded_rng(seed, machine_type, machine_id, name)
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
    return unit(scipy.fft.irfft(spec * gain, n).astype(np.float64))


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
    tone = unit(_harmonic(rng, n, sr, f_bp, p.weights("w", 6), drift=0.002))
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

    tone = unit(_harmonic(rng, n, sr, f0, p.weights("w", 8, (0.3, 1.0)), drift=0.003)) * env(0.0)
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
    hum = unit(_harmonic(rng, n, sr, p.spread("hum", 90, 250) * speed, [1, 0.5, 0.25]))
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
    motor = unit(_harmonic(rng, n, sr, f0, p.weights("w", 10, (0.4, 1.2)), drift, drift_rate))
    gear = unit(_harmonic(rng, n, sr, f0 * p.uniform("gear", 2.6, 4.4), [1.0, 0.5], drift, drift_rate))
    rumble = _noise(rng, n, sr, centre=p.spread("rumble", 80, 250), width=0.6)
    wheel = 1 + p.uniform("wheel_am", 0.05, 0.2) * np.sin(2 * np.pi * p.spread("wheel", 3, 9) * speed * t
                                                         + rng.uniform(0, 2 * np.pi))
    return (motor + p.uniform("gearlvl", 0.1, 0.4) * gear + p.uniform("rumblelvl", 0.3, 0.8) * rumble) * wheel


def _toyconveyor(p: IdParams, rng, n, sr, speed):
    dur = n / sr
    hum = unit(_harmonic(rng, n, sr, p.spread("f0", 50, 160) * speed, p.weights("w", 6), drift=0.003))
    times = _poisson(rng, dur, p.spread("rattle", 15, 60) * speed)
    k_rattle = _resonance(sr, [p.spread("fr", 2000, 6000)], p.uniform("decay", 0.001, 0.003))
    rattle = unit(_events(n, sr, times, rng.lognormal(0, 0.4, times.shape), k_rattle) + 1e-9)
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


def add_anomaly(kind: str, sev: int, x: np.ndarray, rng: np.random.Generator, sr: int) -> np.ndarray:
    """Adds an anomaly of ``kind`` to the unit-RMS machine signal ``x`` (``shift`` is applied by the caller)."""
    n = len(x)
    dur = n / sr
    if kind == "tone":
        f = float(np.exp(rng.uniform(np.log(300), np.log(5000))))
        return x + 10 ** (TONE_DB[sev] / 20) * unit(_harmonic(rng, n, sr, f, [1.0, 0.3], drift=0.003))
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


def background(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    x = _noise(rng, n, sr, tilt=rng.uniform(0.6, 1.6))
    if rng.random() < 0.3:
        x = x + 10 ** (rng.uniform(-20, -10) / 20) * unit(_harmonic(rng, n, sr, 50.0, [1.0, 0.5, 0.3, 0.2]))
    if rng.random() < 0.3:
        times = _poisson(rng, n / sr, rng.uniform(0.3, 1.5))
        kernel = _resonance(sr, [rng.uniform(150, 1500)], rng.uniform(0.01, 0.05))
        x = x + rng.uniform(0.5, 2.0) * _events(n, sr, times, rng.uniform(0.5, 1.0, times.shape), kernel)
    return unit(x)


# ---- attributes (dcase2023 layout): level 1 leaves the sound unchanged --------------------------------

LOAD_DB = {1: 0.0, 2: 6.0}  # boost of the partials above the machine's log-spectral centroid, full from one octave up
MIC_DB = {1: 0.0, 2: 6.0}  # the microphone's resonance peak at MIC_HZ, a log-Gaussian MIC_OCTAVES wide (std)
MIC_HZ, MIC_OCTAVES = 3000.0, 0.4


def _filter(x: np.ndarray, sr: int, gain_db: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
    """``x`` through a zero-phase filter: ``gain_db(log frequency, power spectrum of x)`` at the rfft bins."""
    import scipy.fft

    lf, _ = _log_freqs(len(x), sr)
    spec = scipy.fft.rfft(x)
    return scipy.fft.irfft(spec * 10 ** (gain_db(lf, np.abs(spec) ** 2) / 20), len(x))


def apply_load(x: np.ndarray, sr: int, load: int) -> np.ndarray:
    """The machine signal ``x`` under ``load``: its upper partials stronger, relative to its own spectrum."""
    db = LOAD_DB[load]
    if db == 0:
        return x

    def gain(lf: np.ndarray, power: np.ndarray) -> np.ndarray:
        centroid = float((power * lf).sum() / (power.sum() + 1e-12))
        return db * np.clip((lf - centroid) / np.log(2), 0.0, 1.0)

    return _filter(x, sr, gain)


def apply_mic(x: np.ndarray, sr: int, mic: int) -> np.ndarray:
    """The clip ``x`` (machine and background) as recorded by microphone ``mic``."""
    db = MIC_DB[mic]
    if db == 0:
        return x
    width = MIC_OCTAVES * np.log(2)
    return _filter(x, sr, lambda lf, _: db * np.exp(-0.5 * ((lf - np.log(MIC_HZ)) / width) ** 2))
