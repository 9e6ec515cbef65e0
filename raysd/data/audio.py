"""Reading audio clips: soundfile for I/O, torchaudio for resampling.

A clip is (path, offset, num_samples) at the file's native rate, so a clip of a six-hour recording is
read without loading the whole file. Any channel count is mixed down to mono (channel mean); clips are
resampled to the target rate and right-padded with zeros (or truncated) to the target length.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
import torch


class AudioError(RuntimeError):
    """A file that cannot be read as a clip; the message names the file and what is wrong."""


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    frames: int
    channels: int


def info(path: str | os.PathLike) -> AudioInfo:
    import soundfile as sf

    try:
        i = sf.info(str(path))
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / OSError
        raise AudioError(f"{path}: cannot read audio header ({_reason(e)})") from None
    return AudioInfo(int(i.samplerate), int(i.frames), int(i.channels))


def _reason(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".replace(f"{getattr(e, 'filename', '')}", "").strip()


def read(path: str | os.PathLike, offset: int = 0, num_samples: int | None = None,
         max_seconds: float | None = None, out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """Mono float32 samples ``[offset, offset + num_samples)`` of a file and its native sample rate.

    ``num_samples=None`` reads to the end of the file; ``max_seconds`` caps the read at that duration.
    A clip that runs past the end of the file is returned short (callers pad). With ``out`` (a
    contiguous float32 1-D array long enough) the samples are written into ``out[:k]``, which is returned.
    """
    import soundfile as sf

    if offset < 0 or (num_samples is not None and num_samples < 0):
        raise AudioError(f"{path}: invalid clip offset={offset} num_samples={num_samples}")
    try:
        with sf.SoundFile(str(path)) as f:
            sr, frames, ch = int(f.samplerate), int(f.frames), int(f.channels)
            if frames <= 0:
                raise AudioError(f"{path}: empty audio file (0 samples)")
            if offset >= frames:
                raise AudioError(f"{path}: clip offset {offset} is beyond the end of the file ({frames} samples)")
            k = frames - offset if num_samples is None else min(num_samples, frames - offset)
            if max_seconds is not None:
                k = min(k, native_length(max_seconds, sr))
            if out is not None and len(out) < k:
                raise ValueError(f"output buffer of {len(out)} samples is shorter than the clip ({k})")
            if offset:
                f.seek(offset)
            if ch == 1 and f.subtype == "PCM_16":
                # libsndfile's int16 read plus one numpy scale is ~2x faster than its float conversion, and
                # gives the same values (x / 32768)
                raw = f.read(k, dtype="int16", out=_int16_buffer(k))
                mono = np.multiply(raw, np.float32(1 / 32768), out=out[:len(raw)] if out is not None else None,
                                   dtype=np.float32)
            elif ch == 1 and out is not None:
                mono = f.read(k, dtype="float32", out=out[:k])
            else:
                data = f.read(k, dtype="float32", always_2d=True)
                mono = data[:, 0] if ch == 1 else data.mean(axis=1, dtype=np.float32)
                if out is not None:
                    out[:len(mono)] = mono
                    mono = out[:len(mono)]
    except AudioError:
        raise
    except Exception as e:
        raise AudioError(f"{path}: cannot decode audio ({_reason(e)})") from None
    if len(mono) == 0:
        raise AudioError(f"{path}: no samples could be read at offset {offset}")
    return mono, sr


_LOCAL = threading.local()


def _int16_buffer(k: int) -> np.ndarray:
    """A per-thread scratch buffer of at least ``k`` int16 samples (reused, so no page faults per clip)."""
    buf = getattr(_LOCAL, "int16", None)
    if buf is None or len(buf) < k:
        buf = np.empty(max(k, 1 << 16), np.int16)
        _LOCAL.int16 = buf
    return buf[:k]


_RESAMPLERS: dict[tuple[int, int, str], torch.nn.Module] = {}
_LOCK = threading.Lock()


def resampler(orig_sr: int, new_sr: int, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A cached ``torchaudio.transforms.Resample`` (its sinc kernel is built once per rate pair and device)."""
    key = (int(orig_sr), int(new_sr), str(torch.device(device)))
    with _LOCK:
        r = _RESAMPLERS.get(key)
        if r is None:
            import torchaudio

            r = torchaudio.transforms.Resample(key[0], key[1]).to(device)
            _RESAMPLERS[key] = r
    return r


def resample(wave: torch.Tensor | np.ndarray, orig_sr: int, new_sr: int) -> torch.Tensor:
    """Resamples (..., samples) from ``orig_sr`` to ``new_sr`` on the wave's device (a no-op when equal)."""
    x = torch.as_tensor(wave, dtype=torch.float32)
    if orig_sr == new_sr:
        return x
    return resampler(orig_sr, new_sr, x.device)(x)


def fit_length(wave: torch.Tensor, n: int) -> torch.Tensor:
    """Right-pads (..., samples) with zeros, or truncates, to exactly ``n`` samples."""
    k = wave.shape[-1]
    if k == n:
        return wave
    if k > n:
        return wave[..., :n]
    return torch.nn.functional.pad(wave, (0, n - k))


def native_length(seconds: float, sr: int) -> int:
    """Samples needed at rate ``sr`` to cover ``seconds`` (rounded up, so resampling never falls short)."""
    return int(np.ceil(seconds * sr - 1e-9))


def load(path: str | os.PathLike, offset: int = 0, num_samples: int | None = None,
         sample_rate: int | None = None, seconds: float | None = None) -> torch.Tensor:
    """One clip as a mono float32 tensor, resampled to ``sample_rate`` (default: native) and fitted to
    ``seconds`` (default: the clip's own length)."""
    x, sr = read(path, offset, num_samples, max_seconds=seconds)
    target = sample_rate or sr
    w = torch.from_numpy(x)
    if seconds is not None and target != sr:
        w = fit_length(w, native_length(seconds, sr))  # pad before resampling, as batched extraction does
    y = resample(w, sr, target)
    if seconds is not None:
        y = fit_length(y, int(round(seconds * target)))
    return y
