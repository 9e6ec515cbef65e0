"""The record-holding recipe of DCASE Task 2 since 2021 as a family: a two-branch embedding trained across every
machine type on auxiliary labels with sub-cluster AdaCos, scored by kNN (Wilkinghoff, "Sub-cluster AdaCos:
learning representations for anomalous sound detection", IJCNN 2021; "Design choices for learning embeddings from
auxiliary tasks for domain generalization in anomalous sound detection", ICASSP 2023).

- The **spectrum branch** is a 1-D CNN on the magnitude of one FFT over the whole clip (a
  :class:`raysd.data.features.SpectrumSpec` the view asks for, cached like the log-mel): strided convolutions,
  dense layers, a bias-free embedding layer. One FFT over 10 s resolves the fine tonal lines of rotating machines.
- The **spectrogram branch** is a ResNet-like 2-D CNN (:func:`raysd.families.blocks.resnet_stages`) on the whole
  clip's log-mel with its mean over time removed (a per-clip, per-band normalisation) and each band batch-normed;
  its feature map is max-pooled over time and flattened into a bias-free embedding layer.
- The two embeddings are concatenated. Training classifies the auxiliary labels (:class:`AuxTaskConfig`'s
  ``labels``, over the whole data set by default) with a sub-cluster AdaCos or AdaProj head
  (:mod:`raysd.families.heads`, fixed random centres), with mixup between clips.
- A clip's anomaly score is the cosine distance of its embedding to the nearest training embeddings of its
  section, per domain (:class:`raysd.families.knn.KnnScorer`, k-means centres for the source domain).

The family's defaults are the published ones (ICASSP 2023 code): 128-dimensional embeddings per branch, 16
sub-clusters with fixed centres, mixup on every batch, 16 source-domain means. The published training settings
(batch size 64, Adam at 1e-3 with an L2 weight decay of 1e-5, 10 epochs) are shared hyperparameters
(:class:`raysd.families.hparams.TrainHP`, whose own defaults every family shares): the presets set them, as their
first enqueued trial. Where raysd differs from the published code:

- its features are cached rather than computed from the waveform in the network, so the spectrogram branch reads
  the log-mel (the published one a linear-frequency magnitude STFT), and mixup mixes the cached inputs (log-mels
  in the power domain, spectra as magnitudes, one proportion per clip) instead of the waveforms, with a partner
  of another class (the published code pairs the batch with itself reversed);
- the ``attribute`` labels are machine type x section x attributes; the published classes also split by domain;
- the spectrum passes a BatchNorm first (the published branch takes raw magnitudes), the residual shortcut takes
  the block's input before its BatchNorm, and the strided convolutions pad ``(kernel - stride) / 2`` per side;
- the kNN score's source-domain means come from the source clips only (:class:`KnnScorer`), and PyTorch's Adam
  weight decay adds ``wd * w`` to the gradient (Keras' L2 regulariser adds ``2 * wd * w``) and also decays
  BatchNorm parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raysd.data.features import SpectrumSpec
from raysd.data.views import View
from raysd.families.augment import (
    mix_pre_log,
    mixup_targets,
    pick_partners,
    recalibrate_batchnorm,
    sample_lambda,
    soft_cross_entropy,
)
from raysd.families.base import Family, register
from raysd.families.blocks import dense_stack, resnet_stages
from raysd.families.clips import Batch, ClipSet, DataInfo
from raysd.families.heads import make_head
from raysd.families.hparams import FORBID, AuxTaskConfig, Float, Int, Labelling, Scope
from raysd.families.knn import KnnScorer, clip_embeddings, clip_keys, fit_scorer

Branches = Literal["both", "spectrum", "spectrogram"]
Extra = tuple[torch.Tensor, ...]


@dataclass
class AdacosKnnConfig(AuxTaskConfig):
    __pydantic_config__ = FORBID

    scope: Annotated[Scope, Field(description="one model per machine type (machine_type) or one for the data set "
                                              "(dataset); fixed in a preset")] = "dataset"
    labels: Annotated[Labelling, Field(description="the classes it learns: section, type_section or attribute (see "
                                                   "AuxTaskConfig)")] = "attribute"
    branches: Annotated[Branches, Field(description="input branches: the full-clip spectrum, the spectrogram, or both")] = "both"
    emb_size: Annotated[Int, Field(description="embedding size per branch (twice as wide with both)")] = 128
    head: Annotated[Literal["adacos", "adaproj"], Field(description="sub-cluster AdaCos or AdaProj")] = "adacos"
    sub_clusters: Annotated[Int, Field(description="adacos: centres per class; adaproj: dimension of each class's "
                                                   "subspace")] = 16
    mixup_prob: Annotated[Float, Field(description="share of each batch replaced by a mixture with another clip")] = 1.0
    spectrum_f_min: Annotated[Float, Field(description="lowest frequency (Hz) of the spectrum branch's input")] = 0.0
    spectrum_f_max: Annotated[Float | None, Field(description="highest frequency (Hz) of the spectrum branch's input "
                                                              "(null: the Nyquist frequency)")] = None
    conv_channels: Annotated[Int, Field(description="channels of the spectrum branch's convolutions")] = 128
    dense_layers: Annotated[Int, Field(description="dense layers of the spectrum branch")] = 4
    channels: Annotated[tuple[Int, ...], Field(description="channels of the spectrogram branch's residual stages")] = (16, 32, 64, 128)
    blocks: Annotated[Int, Field(description="residual blocks per stage")] = 2
    precise_bn: Annotated[Int, Field(description="training clips to recompute BatchNorm statistics with after training "
                                                 "(0: off)")] = 4096

    def validate(self) -> None:
        super().validate()
        if self.emb_size < 1 or self.sub_clusters < 1 or self.conv_channels < 1 or self.blocks < 1:
            raise ValueError(f"emb_size, sub_clusters, conv_channels and blocks must be >= 1, got {self.emb_size}, "
                             f"{self.sub_clusters}, {self.conv_channels}, {self.blocks}")
        if not 0 <= self.mixup_prob <= 1:
            raise ValueError(f"mixup_prob must be in [0, 1], got {self.mixup_prob}")
        if self.dense_layers < 0 or not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"dense_layers must be >= 0 and channels positive, got {self.dense_layers}, "
                             f"{list(self.channels)}")
        if self.precise_bn < 0:
            raise ValueError(f"precise_bn must be >= 0, got {self.precise_bn}")
        SpectrumSpec(f_min=self.spectrum_f_min, f_max=self.spectrum_f_max)  # checks the range


class SpectrumBranch(nn.Module):
    """Magnitude spectrum (B, bins) -> embedding (B, emb): input BatchNorm, three strided 1-D convolutions
    (kernels 256 / 64 / 16, strides 64 / 32 / 4), dense layers, bias-free projection."""

    KERNELS = ((256, 64), (64, 32), (16, 4))

    def __init__(self, n_bins: int, emb: int, channels: int, dense_layers: int):
        super().__init__()
        self.min_bins = 1  # shorter spectra are zero-padded to the length the strided kernels need
        for k, s in reversed(self.KERNELS):
            self.min_bins = (self.min_bins - 1) * s + k - 2 * ((k - s) // 2)
        self.norm = nn.BatchNorm1d(1)
        layers: list[nn.Module] = []
        c_in = 1
        for k, s in self.KERNELS:
            layers += [nn.Conv1d(c_in, channels, k, s, padding=(k - s) // 2, bias=False), nn.ReLU()]
            c_in = channels
        self.conv = nn.Sequential(*layers)
        with torch.no_grad():
            width = self.conv(torch.zeros(1, 1, max(n_bins, self.min_bins))).shape[1:].numel()
        self.dense = dense_stack([width, *[128] * dense_layers]) if dense_layers else nn.Identity()
        self.out = nn.Linear(128 if dense_layers else width, emb, bias=False)

    def forward(self, spectrum: torch.Tensor) -> torch.Tensor:
        x = spectrum.unsqueeze(1)
        if x.shape[-1] < self.min_bins:
            x = F.pad(x, (0, self.min_bins - x.shape[-1]))
        return self.out(self.dense(self.conv(self.norm(x)).flatten(1)))


class SpectrogramBranch(nn.Module):
    """Whole-clip log-mel (B, 1, M, T) -> embedding (B, emb): mean over time removed, BatchNorm per band, a 7x7
    stride-2 stem and max-pool, residual stages, max over time, BatchNorm, bias-free projection."""

    def __init__(self, n_mels: int, n_frames: int, emb: int, channels: tuple[int, ...], blocks: int):
        super().__init__()
        self.band_norm = nn.BatchNorm1d(n_mels)
        self.stem = nn.Sequential(nn.Conv2d(1, channels[0], 7, 2, 3, bias=False), nn.BatchNorm2d(channels[0]),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.stages = resnet_stages(channels[0], channels, blocks)
        self.eval()  # the shape probe must not move the BatchNorm statistics
        with torch.no_grad():
            width = self._pooled(torch.zeros(1, 1, n_mels, n_frames)).shape[1]
        self.train()
        self.flat_norm = nn.BatchNorm1d(width)
        self.out = nn.Linear(width, emb, bias=False)

    def _pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).amax(dim=-1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x - x.mean(dim=-1, keepdim=True)
        x = self.band_norm(x[:, 0]).unsqueeze(1)
        return self.out(self.flat_norm(self._pooled(x)))


class AdacosKnnNet(nn.Module):
    """The branches, the margin head and the kNN scorer (its bank travels in the ``state_dict``)."""

    def __init__(self, info: DataInfo, hp: AdacosKnnConfig):
        super().__init__()
        self.spectrum: SpectrumBranch | None = None
        self.spectrogram: SpectrogramBranch | None = None
        if hp.branches != "spectrogram":
            if not info.extra_shapes:
                raise ValueError("adacos_knn's spectrum branch needs the full-clip spectrum: the data description has "
                                 "no extra feature (build the study with the family's view)")
            self.spectrum = SpectrumBranch(info.extra_shapes[0][0], hp.emb_size, hp.conv_channels, hp.dense_layers)
        if hp.branches != "spectrum":
            self.spectrogram = SpectrogramBranch(info.n_mels, info.n_frames, hp.emb_size, hp.channels, hp.blocks)
        width = hp.emb_size * (2 if hp.branches == "both" else 1)
        self.n_classes = info.n_classes
        self.head = make_head(hp.head, width, info.n_classes, sub_clusters=hp.sub_clusters)
        self.mixup_prob = hp.mixup_prob
        self.knn = KnnScorer(hp.knn_k, hp.knn_means, seed=0)

    def embed(self, x: torch.Tensor, extra: Extra) -> torch.Tensor:
        parts = []
        if self.spectrum is not None:
            parts.append(self.spectrum(extra[0]))
        if self.spectrogram is not None:
            parts.append(self.spectrogram(x))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def mix(self, x: torch.Tensor, extra: Extra, y: torch.Tensor) -> tuple[torch.Tensor, Extra, torch.Tensor]:
        """Mixup between clips: a ``mixup_prob`` share of the batch is mixed with a partner of another class, the
        log-mels in the power domain and the spectra as magnitudes, with one uniform proportion per clip."""
        partner, ok = pick_partners(y)
        chosen = (torch.rand(len(y), device=y.device) < self.mixup_prob) & ok
        lam = sample_lambda(len(y), "uniform", 1.0, y.device)
        lam = torch.where(chosen, lam, torch.ones_like(lam))
        w = lam.to(x.dtype)
        mixed_extra = tuple(w.view(-1, *[1] * (e.ndim - 1)) * e + (1 - w.view(-1, *[1] * (e.ndim - 1))) * e[partner]
                            for e in extra)
        return mix_pre_log(x, x[partner], lam), mixed_extra, mixup_targets(y, y[partner], lam, self.n_classes)

    def forward(self, x: torch.Tensor, extra: Extra = (), target: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits over the classes; with ``labels``, (logits, target distributions), the inputs mixed first in
        training mode."""
        if labels is not None and self.training:
            x, extra, target = self.mix(x, extra, labels)
            return self.head(self.embed(x, extra), target), target
        if labels is not None:  # held-out loss: no mixup; a class unseen in training (-1) weighs nothing
            target = F.one_hot(labels.clamp(min=0), self.n_classes).float() * (labels >= 0)[:, None]
            return self.head(self.embed(x, extra), target), target
        return self.head(self.embed(x, extra), target)


def _embed_clips(net: AdacosKnnNet, windows: torch.Tensor, extra: Extra) -> torch.Tensor:
    """(B, P, *shape) windows with their clips' extra features -> (B, D) mean window embeddings."""
    per_window = tuple(e.repeat_interleave(windows.shape[1], dim=0) for e in extra)
    return clip_embeddings(lambda w: net.embed(w, per_window), windows)


@register
class AdacosKnnFamily(Family):
    name = "adacos_knn"
    Config = AdacosKnnConfig
    description = ("two-branch (full-clip spectrum + spectrogram) embedding, sub-cluster AdaCos on auxiliary labels, "
                   "kNN score (Wilkinghoff)")
    layout = "image"

    def view(self) -> View:
        hp = self.hp
        extras = () if hp.branches == "spectrogram" else (SpectrumSpec(f_min=hp.spectrum_f_min, f_max=hp.spectrum_f_max),)
        return View(frames=0, hop=1, layout="image", extras=extras)

    def data_problem(self, info: DataInfo) -> str | None:
        if info.n_classes < 2:
            return (f"adacos_knn needs at least 2 classes, but the training data has {info.n_classes} "
                    f"({info.labelling}); choose labels that split the data further (type_section or attribute)")
        return None

    def build(self, info: DataInfo) -> nn.Module:
        return AdacosKnnNet(info, self.hp)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits, target = model(batch.x, extra=batch.extra, labels=batch.y)
        return soft_cross_entropy(logits, target)

    def after_training(self, model: nn.Module, data: ClipSet) -> None:
        net = cast(AdacosKnnNet, model)
        recalibrate_batchnorm(net, data, self.hp.precise_bn, batch_size=64)
        fit_scorer(net.knn, lambda w, e: _embed_clips(net, w, e), data)

    def score(self, model: nn.Module, windows: torch.Tensor, labels: torch.Tensor,
              sections: torch.Tensor | None = None, extra: Extra = ()) -> torch.Tensor:
        net = cast(AdacosKnnNet, model)
        return net.knn(_embed_clips(net, windows, extra), labels if sections is None else sections, clip_keys(windows))

    def embed(self, model: nn.Module, x: torch.Tensor, extra: Extra = ()) -> torch.Tensor:
        return cast(AdacosKnnNet, model).embed(x, extra)
