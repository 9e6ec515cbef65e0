"""Self-supervised machine-ID classifier (Giri et al., ICASSP 2021; the DCASE 2020 winning system).

A torchvision CNN (MobileNetV2 with width multiplier 0.5, ResNet-18 or ResNet-50, from scratch, first
convolution taking one channel) learns to tell apart the machine IDs (sections) of one machine type from
64-frame log-mel patches taken every 8 frames. Auxiliary tasks, all hyperparameters:

- mixup of two patches of different IDs with a random proportion, in the power domain (``pre_log``) or
  on the log-mel (``post_log``), trained with KL divergence against the mixing proportions;
- spectral warping ``f -> f_max * (f / f_max) ** alpha`` (alpha 0.95 and 1.05), each warp a class of its
  own, so every ID gets two synthetic classes (see :func:`raysd.families.augment.warp_table`);
- an ArcFace head instead of the plain softmax layer, or, for the embeddings of the record-holding recipes,
  a sub-cluster AdaCos or AdaProj head (:mod:`raysd.families.heads`).

After training, the BatchNorm statistics are recomputed over training patches with the final weights
(:func:`raysd.families.augment.recalibrate_batchnorm`): after short trainings the running averages trail
the weights far enough for eval-mode outputs to collapse to one class.

Anomaly score of a clip (``score='class'``): the negative log softmax probability of its true ID, averaged
over its patches. A test clip whose class was not seen in training (label -1) is scored with the most
probable one instead: ``-max_c log p(c | patch)``, i.e. how unlike every known class it is. With
``score='knn'``, the cosine distance of its mean patch embedding to the nearest training clips of its
section, per domain (:class:`raysd.families.knn.KnnScorer`), the way the DCASE records since 2021 score.

The classes need not be one machine type's IDs: with :class:`raysd.families.hparams.AuxTaskConfig`'s
``scope='dataset'`` one network learns every machine type of the data set, and ``labels`` chooses machine
type x section or machine type x section x attributes as classes (the other machines' clips then act as
outliers for each class).

The warp is applied on the mel axis with centre frequencies of ``info.n_mels`` slaney mel bands over
``[0, info.f_max]``, the layout of the default feature spec; with a crop variant the kept bands cover a
sub-range, so the warp is still a monotone map of the axis fixing its top, only not the exact Hz law.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from raysd.families.augment import (
    mel_centres,
    mixup,
    recalibrate_batchnorm,
    soft_cross_entropy,
    warp,
    warp_table,
)
from raysd.families.base import Family, register
from raysd.families.clips import Batch, ClipSet, DataInfo
from raysd.families.heads import HeadKind, make_head
from raysd.families.hparams import FORBID, AuxTaskConfig, Bool, Float, Int
from raysd.families.knn import KnnScorer, clip_embeddings, clip_keys, fit_scorer


def torchvision_backbone(name: str, width_mult: float = 0.5, dropout: float = 0.2) -> tuple[nn.Module, int]:
    """A torchvision classifier from scratch, with a 1-channel first convolution and its classifier
    replaced by dropout, so it returns pooled features; also returns the feature width."""
    import torchvision

    if name == "mobilenet_v2":
        net = torchvision.models.mobilenet_v2(weights=None, width_mult=width_mult)
        first = net.features[0][0]
        net.features[0][0] = nn.Conv2d(1, first.out_channels, first.kernel_size, first.stride, first.padding, bias=False)
        width = net.classifier[-1].in_features
        net.classifier = nn.Dropout(dropout)
    elif name in ("resnet18", "resnet50"):
        net = getattr(torchvision.models, name)(weights=None)
        first = net.conv1
        net.conv1 = nn.Conv2d(1, first.out_channels, first.kernel_size, first.stride, first.padding, bias=False)
        width = net.fc.in_features
        net.fc = nn.Dropout(dropout)
    else:
        raise ValueError(f"unknown backbone {name!r}; choose mobilenet_v2, resnet18 or resnet50")
    conv = net.features[0][0] if name == "mobilenet_v2" else net.conv1
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return net, width


@dataclass
class IdClassifierConfig(AuxTaskConfig):
    __pydantic_config__ = FORBID

    backbone: Annotated[Literal["mobilenet_v2", "resnet18", "resnet50"], Field(description="the torchvision network")] = "mobilenet_v2"
    width_mult: Annotated[Float, Field(description="MobileNetV2 width multiplier")] = 0.5
    dropout: Annotated[Float, Field(description="dropout before the classification head")] = 0.2
    input_norm: Annotated[Bool, Field(description="normalise the input with the training clips' statistics")] = True
    head: Annotated[HeadKind, Field(description="classification head: softmax, arcface, adacos or adaproj")] = "softmax"
    arc_margin: Annotated[Float, Field(description="ArcFace's additive angular margin")] = 0.5
    arc_scale: Annotated[Float, Field(description="ArcFace's scale")] = 30.0
    sub_clusters: Annotated[Int, Field(description="adacos: centres per class; adaproj: dimension of each class's "
                                                   "subspace")] = 16
    mixup: Annotated[Literal["none", "pre_log", "post_log"], Field(description="mixup of the log-mel before (pre_log) "
                                                                               "or after (post_log) the logarithm, or "
                                                                               "none")] = "none"
    mixup_fraction: Annotated[Float, Field(description="share of each batch replaced by mixtures")] = 0.5
    mixup_lambda: Annotated[Literal["uniform", "beta"], Field(description="distribution of the mixing weight: uniform, "
                                                                          "or Beta(mixup_beta, mixup_beta)")] = "uniform"
    mixup_beta: Annotated[Float, Field(description="parameter of the Beta distribution when mixup_lambda is beta")] = 1.0
    warp: Annotated[Bool, Field(description="spectral warping: each warp of a class is a class of its own (Giri et al.)")] = False
    warp_alphas: Annotated[tuple[Float, ...], Field(description="warp exponents beside the identity")] = (0.95, 1.05)
    patch_frames: Annotated[Int, Field(description="frames per input image")] = 64
    patch_hop: Annotated[Int, Field(description="frames between the starts of consecutive images")] = 8
    precise_bn: Annotated[Int, Field(description="training windows to recompute BatchNorm statistics with after "
                                                 "training (0: off)")] = 16384
    score: Annotated[Literal["class", "knn"], Field(description="anomaly score: the class's negative log-probability "
                                                                "(class) or kNN in the embedding (knn)")] = "class"

    def validate(self) -> None:
        super().validate()
        if self.width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {self.width_mult}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.arc_scale <= 0 or self.arc_margin < 0:
            raise ValueError(f"arc_scale must be > 0 and arc_margin >= 0, got {self.arc_scale}, {self.arc_margin}")
        if not 0 <= self.mixup_fraction <= 1:
            raise ValueError(f"mixup_fraction must be in [0, 1], got {self.mixup_fraction}")
        if self.mixup_beta <= 0:
            raise ValueError(f"mixup_beta must be > 0, got {self.mixup_beta}")
        if self.warp and (not self.warp_alphas or any(a <= 0 or a == 1.0 for a in self.warp_alphas)):
            raise ValueError(f"warp_alphas must be positive and differ from 1, got {list(self.warp_alphas)}")
        if self.patch_frames < 1 or self.patch_hop < 1:
            raise ValueError(f"patch_frames and patch_hop must be >= 1, got {self.patch_frames}, {self.patch_hop}")
        if self.precise_bn < 0:
            raise ValueError(f"precise_bn must be >= 0, got {self.precise_bn}")
        if self.sub_clusters < 1:
            raise ValueError(f"sub_clusters must be >= 1, got {self.sub_clusters}")


class IdClassifierNet(nn.Module):
    """Input standardisation (BatchNorm over the single channel), backbone, classifier head; in training also
    the warp tables (non-persistent buffers, rebuilt from the data description) and the mixup settings."""

    def __init__(self, backbone: nn.Module, head: nn.Module, n_ids: int, hp: IdClassifierConfig,
                 warps: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        self.norm = nn.BatchNorm2d(1) if hp.input_norm else nn.Identity()
        self.backbone = backbone
        self.head = head
        self.n_ids = n_ids
        self.n_warps = 1 + len(hp.warp_alphas) if warps is not None else 1
        self.mix = (hp.mixup, hp.mixup_fraction, hp.mixup_lambda, hp.mixup_beta)
        self.warp_lo: torch.Tensor | None
        self.warp_hi: torch.Tensor | None
        self.warp_w: torch.Tensor | None
        self.knn = KnnScorer(hp.knn_k, hp.knn_means, seed=0) if hp.score == "knn" else None
        for name, t in zip(("warp_lo", "warp_hi", "warp_w"), warps or (None, None, None)):
            self.register_buffer(name, t, persistent=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.norm(x))

    def augment(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training inputs and target distributions: random warp class per patch, then mixup."""
        n, k = self.n_ids, self.n_warps
        cls = y
        if self.warp_lo is not None and self.warp_hi is not None and self.warp_w is not None:
            state = torch.randint(0, k, (x.shape[0],), device=x.device)
            x = warp(x, (self.warp_lo, self.warp_hi, self.warp_w), state)
            cls = y + state * n
        mode, fraction, lam, beta = self.mix
        if mode != "none":
            m = mixup(x, cls, n * k, mode, fraction, lam, beta, groups=y)
            return m.x, m.target
        return x, F.one_hot(cls, n * k).float()

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None, labels: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits over IDs (and warp classes); ``target`` (B, C) puts the ArcFace margin in training. With
        ``labels`` (training), the inputs are augmented first and (logits, target distributions) returned."""
        if labels is not None:
            x, target = self.augment(x, labels)
            return self.head(self.features(x), target), target
        return self.head(self.features(x), target)


@register
class IdClassifierFamily(Family):
    name = "id_classifier"
    Config = IdClassifierConfig
    description = "machine-ID classifier on log-mel patches (Giri et al.): torchvision CNN, mixup, warping, ArcFace"
    layout = "image"
    window_fields = ("patch_frames", "patch_hop")

    def n_warps(self) -> int:
        return 1 + len(self.hp.warp_alphas) if self.hp.warp else 1

    def data_problem(self, info: DataInfo) -> str | None:
        if info.n_classes * self.n_warps() < 2:
            return (f"id_classifier needs at least 2 classes, but the training data has {info.n_classes} "
                    f"({info.labelling}); enable warp=true (2 synthetic classes per class), choose labels that split "
                    "the data further (type_section or attribute, with scope: dataset) or use another family")
        return None

    def build(self, info: DataInfo) -> nn.Module:
        hp = self.hp
        n_out = info.n_classes * self.n_warps()
        backbone, width = torchvision_backbone(hp.backbone, hp.width_mult, hp.dropout)
        head = make_head(hp.head, width, n_out, hp.arc_margin, hp.arc_scale, hp.sub_clusters)
        warps = None
        if hp.warp:
            centres = mel_centres(info.n_mels, 0.0, info.f_max)
            warps = warp_table((1.0, *hp.warp_alphas), centres, info.f_max)
        return IdClassifierNet(backbone, head, info.n_classes, hp, warps)

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        logits, target = model(batch.x, labels=batch.y)
        return soft_cross_entropy(logits, target)

    def after_training(self, model: nn.Module, data: ClipSet) -> None:
        recalibrate_batchnorm(model, data, self.hp.precise_bn)
        net = cast(IdClassifierNet, model)
        if net.knn is not None:
            fit_scorer(net.knn, lambda w, _: clip_embeddings(net.features, w), data)

    def score(self, model: nn.Module, windows: torch.Tensor, labels: torch.Tensor,
              sections: torch.Tensor | None = None, extra: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        net = cast(IdClassifierNet, model)
        if net.knn is None:
            return super().score(model, windows, labels, sections, extra)
        return net.knn(clip_embeddings(net.features, windows), labels if sections is None else sections,
                       clip_keys(windows))

    def class_log_probs(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """log p(class | patch) over every output class (IDs first, then each warp's copies)."""
        return F.log_softmax(model(x).float(), dim=1)

    def window_scores(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        net = cast(IdClassifierNet, model)
        n = net.n_ids
        if y.numel() and int(y.max()) >= n:
            raise ValueError(f"class index {int(y.max())} out of range for a net of {n} machine IDs")
        logp = self.class_log_probs(net, x)[:, :n]
        true = logp.gather(1, y.clamp(min=0).unsqueeze(1)).squeeze(1)
        return -torch.where(y >= 0, true, logp.max(dim=1).values)

    def embed(self, model: nn.Module, x: torch.Tensor, extra: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        net = cast(IdClassifierNet, model)
        return net.features(x)
