"""Windowed views of log-mel clips: frame vectors, overlapping patches, whole clips.

Every view is a window of ``frames`` consecutive log-mel frames, taken every ``hop`` frames. The
``vector`` layout flattens a window frame by frame (the DCASE 2020 baseline's 5 x 128 = 640 vectors);
the ``image`` layout keeps it as a 1-channel image of shape (1, n_mels, frames).

A view may also ask for per-clip features beside its windows (``extras``, e.g. the full-clip magnitude
spectrum, :class:`raysd.data.features.SpectrumSpec`): every window of a clip comes with them (see
:class:`raysd.families.clips.ClipSet`), and the feature store caches them like the log-mel.

Windows are gathered by index from a frame-major copy of the clips, so a batch of windows costs one
indexed read and no per-clip Python loop; this works the same on CPU and on a device-resident tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from raysd.data.features import FeatureSpec, SpectrumSpec

Layout = Literal["vector", "image"]


@dataclass(frozen=True)
class View:
    """``frames=0`` means the whole clip (one window per clip); ``extras`` are per-clip features each window comes
    with, their clip rate and length left open (filled from the log-mel's by :meth:`extra_specs`)."""

    frames: int
    hop: int = 1
    layout: Layout = "vector"
    extras: tuple[SpectrumSpec, ...] = ()

    def extra_specs(self, base: FeatureSpec) -> list[SpectrumSpec]:
        """The specs of the extra features for clips featurised with ``base``."""
        return [e.for_clips(base) for e in self.extras]

    def __post_init__(self) -> None:
        if self.frames < 0 or self.hop < 1:
            raise ValueError(f"View needs frames >= 0 and hop >= 1, got frames={self.frames} hop={self.hop}")
        if self.layout not in ("vector", "image"):
            raise ValueError(f"View layout must be 'vector' or 'image', got {self.layout!r}")

    def window_length(self, n_frames: int) -> int:
        w = self.frames or n_frames
        if w > n_frames:
            raise ValueError(f"view of {w} frames does not fit clips of {n_frames} frames")
        return w

    def starts(self, n_frames: int) -> torch.Tensor:
        """Start frames of the windows of one clip."""
        w = self.window_length(n_frames)
        return torch.arange(0, n_frames - w + 1, self.hop if self.frames else 1)

    def sample_shape(self, n_mels: int, n_frames: int) -> tuple[int, ...]:
        w = self.window_length(n_frames)
        return (w * n_mels,) if self.layout == "vector" else (1, n_mels, w)

    def gather(self, frames_major: torch.Tensor, clip_idx: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """Windows ``(clip_idx[i], start[i])`` from clips stored frame-major as (N, T, M).

        Returns (B, *sample_shape).
        """
        n, t, m = frames_major.shape
        w = self.window_length(t)
        flat = frames_major.reshape(n * t, m)
        rows = (clip_idx * t + start).unsqueeze(1) + torch.arange(w, device=flat.device)
        x = flat[rows]  # (B, w, M)
        if self.layout == "vector":
            return x.reshape(x.shape[0], w * m)
        return x.transpose(1, 2).unsqueeze(1)

    def windows(self, clips: torch.Tensor) -> torch.Tensor:
        """All windows of a batch of clips (B, M, T) -> (B, P, *sample_shape)."""
        b, m, t = clips.shape
        starts = self.starts(t).to(clips.device)
        p = starts.numel()
        fm = clips.transpose(1, 2).contiguous()
        clip_idx = torch.arange(b, device=clips.device).repeat_interleave(p)
        x = self.gather(fm, clip_idx, starts.repeat(b))
        return x.reshape(b, p, *x.shape[1:])
