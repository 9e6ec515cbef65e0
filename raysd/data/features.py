"""Log-mel feature specification and extraction (torchaudio).

``FeatureSpec`` is the cache key of the feature store: two specs that compare equal produce identical
features. Crop variants (Rajani, 2022) are named presets of (n_mels, kept mel-bin range):

- ``none``:  64 mels, all kept
- ``crop``:  128 mels, bins 64-127 kept (ignores low-frequency traffic rumble)
- ``tight``: 256 mels, bins 128-191 kept (bird band only)
- ``default``: the spec's own ``n_mels`` and ``mel_range`` unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

import torch

CROP_VARIANTS: dict[str, tuple[int, tuple[int, int] | None]] = {
    "none": (64, None),
    "crop": (128, (64, 128)),
    "tight": (256, (128, 192)),
}


@dataclass(frozen=True)
class FeatureSpec:
    sample_rate: int = 16000
    n_fft: int = 1024
    hop_length: int = 512
    win_length: int | None = None
    window: str = "hann"
    n_mels: int = 128
    power: float = 2.0
    f_min: float = 0.0
    f_max: float | None = None
    mel_range: tuple[int, int] | None = None  # [lo, hi) mel bins kept after the transform
    clip_seconds: float = 10.0  # every clip is right-padded / truncated to this length
    eps: float = 1e-10  # log floor: 10*log10(power + eps); the DCASE baseline uses sys.float_info.epsilon
    center: bool = True
    pad_mode: str = "constant"  # librosa >= 0.10 centres with zeros, as the DCASE baseline does
    mel_scale: str = "slaney"  # librosa's default filterbank (the DCASE baseline's)
    mel_norm: str | None = "slaney"

    def __post_init__(self) -> None:
        if self.mel_range is not None:
            lo, hi = self.mel_range
            if not (0 <= lo < hi <= self.n_mels):
                raise ValueError(f"FeatureSpec.mel_range {self.mel_range} must satisfy 0 <= lo < hi <= n_mels={self.n_mels}")
            object.__setattr__(self, "mel_range", (int(lo), int(hi)))
        if self.window not in ("hann", "hamming"):
            raise ValueError(f"FeatureSpec.window must be 'hann' or 'hamming', got {self.window!r}")

    def with_crop(self, crop: str) -> "FeatureSpec":
        if crop == "default":
            return self
        if crop not in CROP_VARIANTS:
            raise ValueError(f"unknown crop variant {crop!r}; choose from default, {', '.join(CROP_VARIANTS)}")
        n_mels, rng = CROP_VARIANTS[crop]
        return dataclasses.replace(self, n_mels=n_mels, mel_range=rng)

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    @property
    def n_frames(self) -> int:
        n = self.clip_samples
        return n // self.hop_length + 1 if self.center else 1 + (n - (self.win_length or self.n_fft)) // self.hop_length

    @property
    def kept_mels(self) -> int:
        return self.n_mels if self.mel_range is None else self.mel_range[1] - self.mel_range[0]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["mel_range"] = list(self.mel_range) if self.mel_range else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        d = dict(d)
        if d.get("mel_range") is not None:
            d["mel_range"] = tuple(d["mel_range"])
        return cls(**d)

    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


class LogMel(torch.nn.Module):
    """Waveforms (B, samples) at ``spec.sample_rate`` -> log-mel (B, kept_mels, n_frames)."""

    def __init__(self, spec: FeatureSpec):
        super().__init__()
        import torchaudio

        self.spec = spec
        window_fn = torch.hann_window if spec.window == "hann" else torch.hamming_window
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=spec.sample_rate, n_fft=spec.n_fft, win_length=spec.win_length,
            hop_length=spec.hop_length, f_min=spec.f_min, f_max=spec.f_max, n_mels=spec.n_mels,
            window_fn=window_fn, power=spec.power, center=spec.center, pad_mode=spec.pad_mode,
            norm=spec.mel_norm, mel_scale=spec.mel_scale,
        )

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        m = self.mel(wave.float())
        if self.spec.mel_range is not None:
            m = m[..., self.spec.mel_range[0]:self.spec.mel_range[1], :]
        return 10.0 * torch.log10(m + self.spec.eps)
