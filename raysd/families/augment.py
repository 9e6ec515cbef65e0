"""Augmentations shared by model families: mixup, spectral warping, precise BN (the heads are in ``heads``).

All functions work on batches of log-mel windows in dB (``10 * log10(power)``), any leading shape with the
mel axis second to last (image windows ``(B, 1, M, T)`` or clips ``(B, M, T)``), on CPU or a device, and
draw their randomness from the global torch RNG (seeded by the trainer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from raysd.families.clips import ClipSet

MixMode = Literal["pre_log", "post_log"]
LambdaDist = Literal["uniform", "beta"]

_DB = 10.0 / math.log(10.0)  # dB per neper of power: 10*log10(p) = _DB * ln(p)


# --------------------------------------------------------------------------------------------- mixup

def mix_pre_log(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Mix two dB spectrograms in the power domain: ``10*log10(lam*10^(a/10) + (1-lam)*10^(b/10))``.

    ``lam`` has one value per sample (leading dimension). Computed with ``logaddexp`` so it neither
    overflows nor underflows; ``lam`` of exactly 0 or 1 returns the other or the same input.
    """
    lam = _per_sample(lam, a).to(torch.float32)
    la = torch.log(lam).clamp_min(-1e4)
    lb = torch.log1p(-lam).clamp_min(-1e4)
    out = _DB * torch.logaddexp(a.float() / _DB + la, b.float() / _DB + lb)
    return out.to(a.dtype)


def mix_post_log(a: torch.Tensor, b: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """Mix two dB spectrograms linearly: ``lam*a + (1-lam)*b``."""
    lam = _per_sample(lam, a).to(a.dtype)
    return lam * a + (1 - lam) * b


def mixup_targets(y_a: torch.Tensor, y_b: torch.Tensor, lam: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Target distribution of a mixed sample: ``lam`` on class ``y_a``, ``1 - lam`` on ``y_b``."""
    lam = lam.to(torch.float32).unsqueeze(1)
    return lam * F.one_hot(y_a, n_classes).float() + (1 - lam) * F.one_hot(y_b, n_classes).float()


def pick_partners(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample a random partner from a different group (machine ID) in the same batch.

    Returns ``(partner index, has_partner)``; a sample whose group fills the whole batch has no partner
    (its index points at itself).
    """
    b = groups.shape[0]
    r = torch.rand(b, b, device=groups.device)
    other = groups.unsqueeze(0) != groups.unsqueeze(1)
    r = torch.where(other, r, torch.full_like(r, -1.0))
    partner = r.argmax(dim=1)
    ok = other.any(dim=1)
    return torch.where(ok, partner, torch.arange(b, device=groups.device)), ok


def sample_lambda(n: int, dist: LambdaDist, beta: float, device: torch.device) -> torch.Tensor:
    """Mixing proportions in [0, 1]: uniform, or Beta(beta, beta)."""
    if dist == "uniform":
        return torch.rand(n, device=device)
    if dist != "beta":
        raise ValueError(f"mixup lambda distribution must be 'uniform' or 'beta', got {dist!r}")
    return torch.distributions.Beta(torch.tensor(beta, device=device), torch.tensor(beta, device=device)).sample((n,))


@dataclass
class Mixed:
    """A mixup batch: mixed inputs, their target distributions, proportions and partner indices."""

    x: torch.Tensor
    target: torch.Tensor
    lam: torch.Tensor
    partner: torch.Tensor


def mixup(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, mode: MixMode = "post_log",
    fraction: float = 0.5, dist: LambdaDist = "uniform", beta: float = 1.0, groups: torch.Tensor | None = None,
) -> Mixed:
    """Replace a random ``fraction`` of the batch by mixtures with a partner of another group.

    ``y`` are the class indices the targets are built from; ``groups`` (default ``y``) decide which
    samples may be mixed (e.g. base machine IDs when ``y`` also encodes a warp class). Unmixed samples
    keep ``lam = 1`` and a one-hot target.
    """
    if mode not in ("pre_log", "post_log"):
        raise ValueError(f"mixup mode must be 'pre_log' or 'post_log', got {mode!r}")
    b = x.shape[0]
    partner, ok = pick_partners(y if groups is None else groups)
    chosen = (torch.rand(b, device=x.device) < fraction) & ok
    lam = sample_lambda(b, dist, beta, x.device)
    lam = torch.where(chosen, lam, torch.ones_like(lam))
    mix = mix_pre_log if mode == "pre_log" else mix_post_log
    xm = mix(x, x[partner], lam)
    return Mixed(xm, mixup_targets(y, y[partner], lam, n_classes), lam, partner)


def _per_sample(lam: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    lam = torch.as_tensor(lam, device=like.device)
    if lam.ndim == 0:
        return lam
    return lam.reshape(lam.shape[0], *([1] * (like.ndim - 1)))


# ------------------------------------------------------------------------------------ spectral warping

def hz_to_mel(f: torch.Tensor, mel_scale: str = "slaney") -> torch.Tensor:
    """Hz -> mel (the same formulas as torchaudio / librosa)."""
    if mel_scale == "htk":
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    if mel_scale != "slaney":
        raise ValueError(f"mel_scale must be 'slaney' or 'htk', got {mel_scale!r}")
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    lin = f / f_sp
    log = min_log_mel + torch.log(torch.clamp(f, min=min_log_hz) / min_log_hz) / logstep
    return torch.where(f >= min_log_hz, log, lin)


def mel_to_hz(m: torch.Tensor, mel_scale: str = "slaney") -> torch.Tensor:
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    if mel_scale != "slaney":
        raise ValueError(f"mel_scale must be 'slaney' or 'htk', got {mel_scale!r}")
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(m >= min_log_mel, min_log_hz * torch.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_centres(n_mels: int, f_min: float, f_max: float, mel_scale: str = "slaney") -> torch.Tensor:
    """Centre frequency (Hz) of each band of a torchaudio/librosa mel filterbank, float64."""
    lo = hz_to_mel(torch.tensor(float(f_min), dtype=torch.float64), mel_scale)
    hi = hz_to_mel(torch.tensor(float(f_max), dtype=torch.float64), mel_scale)
    return mel_to_hz(torch.linspace(float(lo), float(hi), n_mels + 2, dtype=torch.float64)[1:-1], mel_scale)


def warp_table(alphas: tuple[float, ...] | list[float], centres: torch.Tensor, f_max: float,
               mel_scale: str = "slaney") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Interpolation table of the frequency warps ``f -> f_max * (f / f_max) ** alpha`` on a mel axis.

    The energy at frequency ``f`` moves to ``w(f)``; so output band ``k`` (centre ``c_k``) takes the input
    at ``w^-1(c_k) = f_max * (c_k / f_max) ** (1 / alpha)``, read by linear interpolation between the two
    neighbouring bands in mel position (the dB values are interpolated), clamped at the edge bands.
    With ``alpha < 1``, ``w(f) > f`` for ``0 < f < f_max``: energy moves up in frequency; with
    ``alpha > 1`` it moves down; ``alpha = 1`` is the identity exactly.

    Returns ``(lo, hi, w)``, each (len(alphas), n_mels): output = (1 - w) * x[lo] + w * x[hi].
    """
    c = centres.to(torch.float64)
    m = hz_to_mel(c, mel_scale)
    n = c.numel()
    step = (m[-1] - m[0]) / max(n - 1, 1)
    los, his, ws = [], [], []
    for alpha in alphas:
        if alpha <= 0:
            raise ValueError(f"warp alpha must be > 0, got {alpha}")
        if alpha == 1.0:
            pos = torch.arange(n, dtype=torch.float64)
        else:
            src = f_max * (c / f_max).clamp(min=0) ** (1.0 / alpha)
            pos = ((hz_to_mel(src, mel_scale) - m[0]) / step).clamp(0, n - 1)
        lo = pos.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        los.append(lo)
        his.append(hi)
        ws.append((pos - lo.double()).float())
    return torch.stack(los), torch.stack(his), torch.stack(ws)


def warp(x: torch.Tensor, table: tuple[torch.Tensor, torch.Tensor, torch.Tensor], which: torch.Tensor | int) -> torch.Tensor:
    """Warp the mel axis (second to last) of each sample ``i`` with table row ``which[i]`` (or one row for all)."""
    lo, hi, w = (t.to(x.device) for t in table)
    m = x.shape[-2]
    if lo.shape[1] != m:
        raise ValueError(f"warp table is for {lo.shape[1]} mel bands, input has {m}")
    if isinstance(which, int):
        shape = (1,) * (x.ndim - 2) + (m, 1)
        return (x.index_select(-2, lo[which]) * (1 - w[which]).to(x.dtype).reshape(shape)
                + x.index_select(-2, hi[which]) * w[which].to(x.dtype).reshape(shape))
    which = which.to(x.device)
    shape = (x.shape[0],) + (1,) * (x.ndim - 3) + (m, 1)
    ilo = lo[which].reshape(shape).expand(*x.shape[:-2], m, x.shape[-1])
    ihi = hi[which].reshape(shape).expand_as(ilo)
    ww = w[which].to(x.dtype).reshape(shape)
    return x.gather(-2, ilo) * (1 - ww) + x.gather(-2, ihi) * ww


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL divergence ``KL(target || softmax(logits))`` averaged over the batch (= cross-entropy for one-hot)."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), target.float(), reduction="batchmean")


# ------------------------------------------------------------------------------- batch-norm statistics

@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: ClipSet, max_windows: int = 16384, batch_size: int = 256,
                          seed: int = 0) -> int:
    """Recompute every BatchNorm layer's running statistics with the final weights ("precise BN").

    The running averages collected during training trail the changing weights; after a short training
    (a few hundred steps) they can be far enough off that eval-mode outputs collapse. This forwards up to
    ``max_windows`` random training windows in train mode (dropout stays off) and stores the plain
    average of their batch statistics. Returns the number of windows used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    n = data.num_windows
    if not bns or n == 0 or max_windows <= 0:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the recalibration batches
        m.train()
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)[:max_windows]
    if order.numel() > batch_size and order.numel() % batch_size == 1:
        order = order[:-1]  # a batch of one window has no variance
    try:
        for i in range(0, order.numel(), batch_size):
            batch = data.batch(order[i:i + batch_size].to(data.device))
            model(batch.x, extra=batch.extra) if batch.extra else model(batch.x)
    finally:
        for m, (momentum, training) in zip(bns, saved):
            m.momentum = momentum
            m.train(training)
    return order.numel()
