"""What a family trains and scores on: the study's data description, training batches and clip sets."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from raysd.data.views import View


@dataclass(frozen=True)
class DataInfo:
    """What a family needs to know about a study's data to build its model."""

    n_mels: int
    n_frames: int
    n_classes: int
    class_names: tuple[str, ...] = ()
    sample_rate: int = 16000
    f_max: float = 8000.0
    labelling: str = "section"  # what a class is: see raysd.data.study.LABELLINGS
    section_names: tuple[str, ...] = ()  # the sections of the training clips ('<machine type>/<section>')
    extra_shapes: tuple[tuple[int, ...], ...] = ()  # per-clip shape of each of the view's extra features

    def __post_init__(self) -> None:  # read back from JSON, tuples arrive as lists
        object.__setattr__(self, "extra_shapes", tuple(tuple(int(d) for d in s) for s in self.extra_shapes))


@dataclass
class Batch:
    """A training batch of windows: ``x`` (B, *sample_shape), ``y`` class (machine ID / section) index,
    ``clip`` index of the clip each window came from (into the worker's :class:`ClipSet`), ``extra`` the view's
    per-clip features of that clip, one tensor (B, *shape) each."""

    x: torch.Tensor
    y: torch.Tensor
    clip: torch.Tensor
    extra: tuple[torch.Tensor, ...] = ()


class ClipSet:
    """Log-mel clips of one study held as one (optionally device-resident) tensor.

    ``clips`` is (N, M, T); ``labels`` (N,) the class index of each clip under the study's labelling (-1:
    a class not seen in training); ``sections`` (N,) the index of its section in ``DataInfo.section_names``
    (-1: unseen; default: the labels), ``domains`` (N,) 0 for the source domain, 1 for the target domain
    (default: all source), ``extras`` the view's per-clip features, one tensor (N, *shape) each. Batches are drawn
    by index from a frame-major copy, so an epoch costs no
    host-to-device copies once the tensor is on the device.
    """

    def __init__(self, clips: torch.Tensor, labels: torch.Tensor, view: View, sections: torch.Tensor | None = None,
                 domains: torch.Tensor | None = None, extras: tuple[torch.Tensor, ...] | list[torch.Tensor] = ()):
        if clips.ndim != 3:
            raise ValueError(f"ClipSet expects clips of shape (N, n_mels, n_frames), got {tuple(clips.shape)}")
        n = clips.shape[0]
        for name, t in (("labels", labels), ("sections", sections), ("domains", domains)):
            if t is not None and t.shape != (n,):
                raise ValueError(f"ClipSet {name} must have shape ({n},), got {tuple(t.shape)}")
        if len(extras) != len(view.extras) or any(e.shape[0] != n for e in extras):
            raise ValueError(f"ClipSet needs one extra feature tensor of {n} clips per extra of its view "
                             f"({len(view.extras)}), got shapes {[tuple(e.shape) for e in extras]}")
        self.clips = clips
        self.labels = labels.long().to(clips.device)
        self.sections = self.labels if sections is None else sections.long().to(clips.device)
        self.domains = torch.zeros_like(self.labels) if domains is None else domains.long().to(clips.device)
        self.extras = tuple(e.to(clips.device) for e in extras)
        self.view = view
        self.frames_major = clips.transpose(1, 2).contiguous()
        self.starts = view.starts(clips.shape[2]).to(clips.device)

    @property
    def device(self) -> torch.device:
        return self.clips.device

    def __len__(self) -> int:
        return self.clips.shape[0]

    @property
    def num_windows(self) -> int:
        return len(self) * self.starts.numel()

    def subset(self, idx: torch.Tensor) -> ClipSet:
        idx = idx.to(self.clips.device)
        return ClipSet(self.clips[idx], self.labels[idx], self.view, self.sections[idx], self.domains[idx],
                       self.extra_of(idx))

    def to(self, device: torch.device | str) -> ClipSet:
        return ClipSet(self.clips.to(device), self.labels, self.view, self.sections, self.domains, self.extras)

    def extra_of(self, idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The extra features of the clips ``idx``."""
        return tuple(e[idx] for e in self.extras)

    def batch(self, window_idx: torch.Tensor) -> Batch:
        p = self.starts.numel()
        clip = torch.div(window_idx, p, rounding_mode="floor")
        start = self.starts[window_idx % p]
        return Batch(self.view.gather(self.frames_major, clip, start), self.labels[clip], clip, self.extra_of(clip))

    def batches(
        self, batch_size: int, shuffle: bool = True, generator: torch.Generator | None = None,
        drop_last: bool = False,
    ) -> Iterator[Batch]:
        """One epoch over every window of every clip; a last batch of a single window joins the one before."""
        n = self.num_windows
        if shuffle:
            order = torch.randperm(n, generator=generator, device="cpu").to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        stop = n - n % batch_size if drop_last and n >= batch_size else n
        starts = list(range(0, stop, batch_size))
        if len(starts) > 1 and stop - starts[-1] == 1:
            starts.pop()  # a batch of one window has no batch statistics: the last batch takes it
        for i, j in zip(starts, [*starts[1:], stop]):
            yield self.batch(order[i:j])

    def clip_batches(self, clips_per_batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(clip indices, windows (B, P, *shape), labels) in clip order, for scoring; ``sections[idx]``,
        ``domains[idx]`` and ``extra_of(idx)`` give the rest of a clip's description."""
        for i in range(0, len(self), clips_per_batch):
            idx = torch.arange(i, min(i + clips_per_batch, len(self)), device=self.device)
            yield idx, self.view.windows(self.clips[idx]), self.labels[idx]
