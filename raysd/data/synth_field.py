"""Synthetic long field recordings: forest ambience with loud foreign events at known times.

``python -m raysd.data.synth_field OUT --minutes M --events N --seed S`` writes a mono 16-bit WAV at
22,050 Hz (``OUT`` is a .wav/.flac path, or a folder that gets ``field_seed<S>.wav``) and, beside it,
``<stem>.events.csv`` with the inserted events (kind, start_s, end_s, gain_db). ``--event KIND@START[+DURATION]``
(repeatable) inserts events at given times instead of ``N`` evenly spread ones.

The ambience, in the spirit of the field study's forest sensor (Rajani, 2022):

- wind: low-passed noise under slow gusts, with a brighter rustle of leaves;
- a faint broadband hiss (the recorder's noise floor);
- insects: narrow-band stridulation at 4-6.5 kHz, pulsed at 25-60 Hz, waxing and waning;
- birds: chirps in the 2-8 kHz band (down/up sweeps, trills of short notes, vibrato whistles) at a
  rate that drifts over minutes.

Foreign events, each rendered from its own random stream and added at its start time, ``gain_db``
above the ambience level over their loudest second:

- ``motorcycle``: an engine (40-70 Hz firing rate, harmonics to ~5 kHz, exhaust noise) passing by, with
  the Doppler shift and 1/distance level of a vehicle at 15-25 m/s;
- ``plane``: a low-frequency rumble (< 600 Hz) and a turbine tone swelling and fading overhead;
- ``knock``: a few percussive knocks (click + damped 150-900 Hz resonances), as of hammering.

Peaks beyond 0.7 of full scale pass a smooth limiter (as a recorder's would), so nothing clips.
The recording is synthesised and written block by block (10 s), with filter states and phases carried
across blocks, so memory stays flat for a six-hour file. Output depends only on (seed, length, events).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import signal

from raysd.atomic import atomic_path, atomic_write_text

SAMPLE_RATE = 22050
BLOCK_SECONDS = 10.0
EVENT_KINDS = ("motorcycle", "plane", "knock")
DURATIONS = {"motorcycle": 8.0, "plane": 30.0, "knock": 1.5}  # seconds
GAINS_DB = {"motorcycle": 16.0, "plane": 18.0, "knock": 10.0}  # loudest second above the ambience level
AMBIENCE_RMS = 0.02  # reference level of the ambience (about -34 dBFS)
SOUND_SPEED = 343.0


@dataclass(frozen=True)
class FieldEvent:
    kind: str
    start_s: float
    duration_s: float
    gain_db: float

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s

    def overlaps(self, start_s: float, end_s: float) -> bool:
        return self.start_s < end_s and start_s < self.end_s


def _rng(seed: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, key)]))


def plan_events(seconds: float, n: int, seed: int = 0, kinds: Sequence[str] = EVENT_KINDS,
                durations: dict[str, float] | None = None, gains_db: dict[str, float] | None = None,
                margin: float = 5.0) -> list[FieldEvent]:
    """``n`` events cycling through ``kinds``, one in each of ``n`` equal slots of the recording (after a
    ``margin`` at both ends), at a seeded random place inside its slot; never overlapping."""
    if n < 0:
        raise ValueError(f"number of events must be >= 0, got {n}")
    dur = {**DURATIONS, **(durations or {})}
    gain = {**GAINS_DB, **(gains_db or {})}
    for k in kinds:
        if k not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {k!r}; choose from {', '.join(EVENT_KINDS)}")
    if n == 0:
        return []
    rng = _rng(seed, 7001)
    lo, hi = margin, seconds - margin
    width = (hi - lo) / n
    out = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        d = float(dur[kind])
        room = width - d - 1.0  # keep a second between neighbouring events
        if room < 0:
            raise ValueError(f"{seconds:g} s is too short for {n} events: slot {i} ({width:.1f} s) cannot hold a "
                             f"{d:g} s {kind}; use fewer events, shorter durations or a longer recording")
        start = lo + i * width + rng.uniform(0, room)
        out.append(FieldEvent(kind, round(float(start), 3), d, float(gain[kind])))
    return out


# ---------------------------------------------------------------------- foreign events
def _normalise_loudest_second(x: np.ndarray, sr: int) -> np.ndarray:
    """Scale so that the loudest 1 s window has unit RMS."""
    win = min(len(x), sr)
    energy = np.concatenate([[0.0], np.cumsum(x.astype(np.float64) ** 2)])
    power = (energy[win:] - energy[:-win]) / win
    return x / np.sqrt(max(float(power.max()), 1e-20))


def _motorcycle(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    tc = t[-1] / 2 + rng.uniform(-0.1, 0.1) * t[-1]
    v, d0 = rng.uniform(15, 25), rng.uniform(8, 25)
    x_pos = v * (t - tc)
    dist = np.sqrt(d0 ** 2 + x_pos ** 2)
    radial = v * x_pos / dist  # m/s away from the listener
    doppler = 1.0 / (1.0 + radial / SOUND_SPEED)
    f0 = rng.uniform(40, 70) * (1 + 0.03 * np.sin(2 * np.pi * rng.uniform(0.2, 0.6) * t))
    phase = 2 * np.pi * np.cumsum(f0 * doppler) / sr
    engine = np.zeros(n)
    for k in range(1, 80):
        if k * f0.max() * 1.1 > 5000:
            break
        engine += k ** -0.7 * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    pulses = 0.5 + 0.5 * np.cos(phase)  # exhaust noise bursts at the firing rate
    sos = signal.butter(2, [150, 2500], btype="band", fs=sr, output="sos")
    exhaust = signal.sosfilt(sos, rng.standard_normal(n)) * pulses ** 2
    x = engine / np.std(engine) + 0.3 * exhaust / (np.std(exhaust) + 1e-12)
    env = (d0 / dist) * np.clip(np.minimum(t, t[-1] - t) / 0.3, 0, 1)
    return _normalise_loudest_second(x * env, sr)


def _plane(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    t = np.arange(n) / sr
    brown = np.cumsum(rng.standard_normal(n))
    sos = signal.butter(2, [25, rng.uniform(350, 600)], btype="band", fs=sr, output="sos")
    rumble = signal.sosfilt(sos, brown)
    f = rng.uniform(300, 800) * (1.03 - 0.06 * t / t[-1])  # a slow Doppler glide down
    tone = np.sin(2 * np.pi * np.cumsum(f) / sr) + 0.4 * np.sin(4 * np.pi * np.cumsum(f) / sr)
    x = rumble / np.std(rumble) + 0.25 * tone
    env = np.sin(np.pi * t / t[-1]) ** 2
    return _normalise_loudest_second(x * env, sr)


def _knock(rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    x = np.zeros(n)
    k = int(rng.integers(3, 7))
    period = (n / sr - 0.15) / k
    length = int(0.12 * sr)
    tt = np.arange(length) / sr
    for i in range(k):
        at = int((0.02 + i * period + rng.uniform(0, 0.2 * period)) * sr)
        if at >= n:
            break
        click = rng.standard_normal(length) * np.exp(-tt / 0.004)
        body = sum(rng.uniform(0.5, 1.0) * np.sin(2 * np.pi * f * tt + rng.uniform(0, 6.3))
                   * np.exp(-tt / rng.uniform(0.02, 0.06)) for f in rng.uniform(150, 900, 3))
        hit = rng.uniform(0.7, 1.0) * (0.8 * click + body)
        m = min(length, n - at)
        x[at:at + m] += hit[:m]
    return _normalise_loudest_second(x, sr)


RENDER_EVENT = {"motorcycle": _motorcycle, "plane": _plane, "knock": _knock}


def render_event(event: FieldEvent, seed: int, index: int, sr: int = SAMPLE_RATE) -> np.ndarray:
    """The event's waveform at its inserted level (float64, ``duration_s`` long)."""
    n = max(1, int(round(event.duration_s * sr)))
    x = RENDER_EVENT[event.kind](_rng(seed, 9001, index), n, sr)
    return x * AMBIENCE_RMS * 10 ** (event.gain_db / 20)


# ---------------------------------------------------------------------- ambience
class _Control:
    """A smooth random curve in [0, 1] of absolute time (cosine interpolation between seeded points)."""

    def __init__(self, rng: np.random.Generator, seconds: float, rate_hz: float):
        self.rate = rate_hz
        self.points = rng.uniform(0, 1, int(seconds * rate_hz) + 3)

    def __call__(self, t: np.ndarray) -> np.ndarray:
        u = t * self.rate
        i = np.floor(u).astype(np.int64)
        f = (1 - np.cos(np.pi * (u - i))) / 2
        return self.points[i] * (1 - f) + self.points[i + 1] * f


class Ambience:
    """Forest ambience generated block after block with continuous filter states and phases."""

    def __init__(self, seconds: float, seed: int, sr: int = SAMPLE_RATE):
        self.sr, self.seed = sr, seed
        g = _rng(seed, 1)
        self.gust = _Control(g, seconds, 0.15)
        self.birds = _Control(g, seconds, 1 / 45)
        self.insect_level = _Control(g, seconds, 1 / 30)
        self.wind_sos = signal.butter(2, g.uniform(250, 450), btype="low", fs=sr, output="sos")
        self.leaf_sos = signal.butter(2, [800, min(6000, sr / 2 - 100)], btype="band", fs=sr, output="sos")
        self.hiss_sos = signal.butter(1, min(9000, sr / 2 - 100), btype="low", fs=sr, output="sos")
        self.zi = {k: np.zeros((s.shape[0], 2)) for k, s in
                   (("wind", self.wind_sos), ("leaf", self.leaf_sos), ("hiss", self.hiss_sos))}
        self.insect_f = g.uniform(4000, 6500, 2)
        self.insect_rate = g.uniform(25, 60)
        self.bird_rate = g.uniform(1.0, 3.0)  # chirps per second at full activity
        self.carry = np.zeros(0)  # bird chirps running past the end of the previous block

    def _filtered(self, key: str, sos: np.ndarray, x: np.ndarray) -> np.ndarray:
        y, self.zi[key] = signal.sosfilt(sos, x, zi=self.zi[key])
        return y

    def block(self, index: int, start: int, n: int) -> np.ndarray:
        sr = self.sr
        rng = _rng(self.seed, 2, index)
        t = (start + np.arange(n)) / sr
        gust = 0.35 + 0.65 * self.gust(t)
        wind = 2.2 * self._filtered("wind", self.wind_sos, rng.standard_normal(n)) * gust
        leaves = 0.35 * self._filtered("leaf", self.leaf_sos, rng.standard_normal(n)) * gust ** 2
        hiss = 0.08 * self._filtered("hiss", self.hiss_sos, rng.standard_normal(n))
        pulse = (0.5 + 0.5 * np.sin(2 * np.pi * self.insect_rate * t)) ** 4
        insects = sum(np.sin(2 * np.pi * f * t + 0.3 * np.sin(2 * np.pi * 3.1 * t)) for f in self.insect_f)
        insects = 0.3 * insects * pulse * (0.2 + 0.8 * self.insect_level(t))
        x = (wind + leaves + hiss + insects) * AMBIENCE_RMS
        tail = np.zeros(int(0.8 * sr))
        out = np.concatenate([x, tail])
        out[:len(self.carry)] += self.carry
        activity = float(self.birds(np.array([t[n // 2]]))[0])
        k = rng.poisson(self.bird_rate * activity * n / sr)
        for at in np.sort(rng.integers(0, n, k)):
            chirp = _chirp(rng, sr) * AMBIENCE_RMS * 10 ** (rng.uniform(0, 12) / 20)
            out[at:at + len(chirp)] += chirp
        self.carry = out[n:].copy()
        return out[:n]


def _chirp(rng: np.random.Generator, sr: int) -> np.ndarray:
    """One bird call in the 2-8 kHz band: a sweep, a trill of short notes or a vibrato whistle."""
    kind = rng.integers(0, 3)
    if kind == 0:
        d = rng.uniform(0.06, 0.25)
        f1, f2 = rng.uniform(2500, 7500, 2)
        tt = np.arange(int(d * sr)) / sr
        f = f1 + (f2 - f1) * tt / d
        x = np.sin(2 * np.pi * np.cumsum(f) / sr) * np.hanning(len(tt))
    elif kind == 1:
        notes = int(rng.integers(3, 9))
        gap, d = rng.uniform(0.06, 0.1), rng.uniform(0.025, 0.05)
        f1 = rng.uniform(3000, 7500)
        x = np.zeros(int((notes * gap + d) * sr) + 1)
        tt = np.arange(int(d * sr)) / sr
        for i in range(notes):
            f = f1 * (1 - 0.25 * tt / d)
            at = int(i * gap * sr)
            x[at:at + len(tt)] += np.sin(2 * np.pi * np.cumsum(f) / sr) * np.hanning(len(tt))
    else:
        d = rng.uniform(0.2, 0.6)
        tt = np.arange(int(d * sr)) / sr
        f = rng.uniform(2500, 5000) * (1 + 0.04 * np.sin(2 * np.pi * rng.uniform(5, 10) * tt))
        x = np.sin(2 * np.pi * np.cumsum(f) / sr) * np.hanning(len(tt))
    return x


# ---------------------------------------------------------------------- the recording
LIMIT_KNEE = 0.7


def _limit(x: np.ndarray) -> np.ndarray:
    """A recorder's peak limiter: samples beyond +-0.7 are compressed smoothly below full scale."""
    a = np.abs(x)
    over = a > LIMIT_KNEE
    if over.any():
        head = 1.0 - LIMIT_KNEE - 1e-3
        x[over] = np.sign(x[over]) * (LIMIT_KNEE + head * np.tanh((a[over] - LIMIT_KNEE) / head))
    return x


def blocks(seconds: float, events: Sequence[FieldEvent], seed: int = 0, sr: int = SAMPLE_RATE
           ) -> Iterator[np.ndarray]:
    """The recording as consecutive float32 blocks of ``BLOCK_SECONDS`` (the last one shorter)."""
    total = int(round(seconds * sr))
    if total <= 0:
        raise ValueError(f"recording length must be > 0 s, got {seconds}")
    for e in events:
        if e.kind not in RENDER_EVENT:
            raise ValueError(f"unknown event kind {e.kind!r}; choose from {', '.join(EVENT_KINDS)}")
        if e.start_s < 0 or e.end_s > seconds:
            raise ValueError(f"{e.kind} event at {e.start_s:g}-{e.end_s:g} s lies outside the {seconds:g} s recording")
    amb = Ambience(seconds, seed, sr)
    spans = [(int(round(e.start_s * sr)), i, e) for i, e in enumerate(events)]
    cache: dict[int, np.ndarray] = {}
    step = int(BLOCK_SECONDS * sr)
    for b, start in enumerate(range(0, total, step)):
        n = min(step, total - start)
        x = amb.block(b, start, n)
        for at, i, e in spans:
            length = int(round(e.duration_s * sr))
            lo, hi = max(at, start), min(at + length, start + n)
            if at + length <= start:
                cache.pop(i, None)  # over: free its waveform
            if lo >= hi:
                continue
            if i not in cache:
                cache[i] = render_event(e, seed, i, sr)
            x[lo - start:hi - start] += cache[i][lo - at:hi - at]
        yield _limit(x).astype(np.float32)


def render(seconds: float, events: Sequence[FieldEvent] = (), seed: int = 0, sr: int = SAMPLE_RATE) -> np.ndarray:
    """The whole recording in memory (for short recordings)."""
    return np.concatenate(list(blocks(seconds, events, seed, sr)))


def events_csv(events: Sequence[FieldEvent]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "start_s", "end_s", "gain_db"])
    for e in events:
        w.writerow([e.kind, f"{e.start_s:.3f}", f"{e.end_s:.3f}", f"{e.gain_db:g}"])
    return buf.getvalue()


def read_events(path: str | os.PathLike) -> list[FieldEvent]:
    """The events of a ``<stem>.events.csv`` file."""
    with open(path, newline="") as f:
        return [FieldEvent(r["kind"], float(r["start_s"]), float(r["end_s"]) - float(r["start_s"]),
                           float(r["gain_db"])) for r in csv.DictReader(f)]


def events_path(wav: str | os.PathLike) -> Path:
    p = Path(wav)
    return p.with_name(f"{p.stem}.events.csv")


def generate(path: str | os.PathLike, minutes: float, events: int | Sequence[FieldEvent] = 3, seed: int = 0,
             sr: int = SAMPLE_RATE, durations: dict[str, float] | None = None,
             gains_db: dict[str, float] | None = None) -> list[FieldEvent]:
    """Write a recording of ``minutes`` to ``path`` (16-bit PCM, streamed block by block; atomic) and its
    events beside it (``<stem>.events.csv``). ``events`` is a count (placed by :func:`plan_events`) or the
    events themselves. Returns the events."""
    import soundfile as sf

    seconds = float(minutes) * 60.0
    if isinstance(events, int):
        events = plan_events(seconds, events, seed, durations=durations, gains_db=gains_db)
    events = list(events)
    path = Path(path)
    fmt = "FLAC" if path.suffix.lower() == ".flac" else "WAV"
    with atomic_path(path) as tmp:
        with sf.SoundFile(tmp, "w", samplerate=sr, channels=1, subtype="PCM_16", format=fmt) as f:
            for x in blocks(seconds, events, seed, sr):
                f.write(x)
    atomic_write_text(events_path(path), events_csv(events))
    return events


def parse_event(text: str) -> FieldEvent:
    """``KIND@START[+DURATION]`` (seconds) as an event at the kind's default level."""
    kind, sep, when = text.partition("@")
    start, _, dur = when.partition("+")
    try:
        if not sep or kind not in EVENT_KINDS:
            raise ValueError
        return FieldEvent(kind, float(start), float(dur) if dur else DURATIONS[kind], GAINS_DB[kind])
    except ValueError:
        raise ValueError(f"--event {text!r}: expected KIND@START[+DURATION] with KIND one of "
                         f"{', '.join(EVENT_KINDS)} and times in seconds, e.g. motorcycle@44.2") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m raysd.data.synth_field", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output .wav/.flac file, or a folder (gets field_seed<S>.wav)")
    ap.add_argument("--minutes", type=float, default=10.0, help="length in minutes (default 10)")
    ap.add_argument("--events", type=int, default=3, help="number of foreign events, placed evenly (default 3)")
    ap.add_argument("--event", action="append", default=[], metavar="KIND@START[+DURATION]",
                    help="an event at a given time instead, e.g. motorcycle@44.2 or plane@600+40 (seconds; repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-rate", type=int, default=SAMPLE_RATE, help=f"Hz (default {SAMPLE_RATE})")
    a = ap.parse_args(argv)
    out = Path(a.out)
    if out.suffix.lower() not in (".wav", ".flac"):
        out = out / f"field_seed{a.seed}.wav"
    if a.minutes <= 0:
        print(f"error: --minutes must be > 0, got {a.minutes}", file=sys.stderr)
        return 2
    try:
        events = generate(out, a.minutes, [parse_event(x) for x in a.event] if a.event else a.events, a.seed,
                          a.sample_rate)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out}: {a.minutes:g} min at {a.sample_rate} Hz, {len(events)} events (listed in {events_path(out)})")
    for ev in events:
        print(f"  {ev.kind:10s} {ev.start_s:9.3f} - {ev.end_s:9.3f} s  +{ev.gain_db:g} dB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
