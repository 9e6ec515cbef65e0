"""Family-specific tests of the reconstruction and density families: dense_ae, conv_ae, masked_unet,
vae, svdd_ae, group_made."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from raysd.families import get_family
from raysd.families.blocks import GaussianStats, UNet
from raysd.families.clips import ClipSet, DataInfo
from raysd.families.hparams import TrainHP, make_config
from raysd.families.masked_unet import masked_error, patch_masks, pixel_masks
from raysd.train import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def family(name: str, **hp):
    cls = get_family(name)
    return cls(make_config(cls.Config, hp, where=name))


def clips(n: int, n_mels: int, n_frames: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, n_mels, n_frames, generator=g) * 8.0 - 40.0


def trained(name: str, n_mels: int = 64, n_frames: int = 80, n: int = 6, epochs: int = 1, batch_size: int = 32,
            **hp) -> tuple:
    """(family, Trainer, training ClipSet) on random clips; nothing trained yet."""
    fam = family(name, **hp)
    x = clips(n, n_mels, n_frames)
    data = ClipSet(x, torch.arange(n) % 2, fam.view())
    trainer = Trainer(fam, TrainHP(batch_size=batch_size, epochs=epochs), DataInfo(n_mels, n_frames, 2))
    return fam, trainer, data


# ------------------------------------------------------------------------------------------ dense_ae

def test_dense_ae_is_the_dcase_2020_baseline_architecture():
    fam = family("dense_ae")
    assert fam.view().frames == 5 and fam.view().hop == 1 and fam.view().layout == "vector"
    model = fam.build(DataInfo(128, 313, 4))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (640, 128), (128, 128), (128, 128), (128, 128), (128, 8),
        (8, 128), (128, 128), (128, 128), (128, 128), (128, 640)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 9
    assert isinstance(model.decoder[-1], nn.Linear), "linear output"


def test_dense_ae_clip_score_is_mean_error_over_its_vectors():
    fam, trainer, data = trained("dense_ae")
    trainer.fit(data)
    windows = fam.view().windows(data.clips[:2])  # (2, P, 320)
    per_window = fam.window_scores(trainer.model.eval(), windows.flatten(0, 1), torch.zeros(1)).reshape(2, -1)
    assert windows.shape[1] == 80 - 4, "every frame starts a vector (hop 1)"
    torch.testing.assert_close(torch.from_numpy(trainer.score(data.subset(torch.arange(2)))).float(),
                               per_window.mean(1), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- conv_ae

def conv_ae_layer_params(model: nn.Module) -> list[int]:
    layers = [*model.convs, model.fc_in, model.fc_out, *model.deconvs]
    return [sum(p.numel() for p in layer.parameters()) for layer in layers]


def test_conv_ae_parameter_counts_match_the_published_table():
    model = family("conv_ae").build(DataInfo(64, 44, 1))
    assert conv_ae_layer_params(model) == [160, 4640, 18496, 73856, 25610, 28160, 73792, 18464, 4624, 145]
    assert model.code_shape == (128, 5, 4)  # flatten = 2560


@pytest.mark.parametrize("n_mels,frames", [(64, 44), (128, 44), (64, 32), (128, 64), (64, 61)])
def test_conv_ae_reconstructs_every_input_size(n_mels, frames):
    fam = family("conv_ae", frames=frames)
    model = fam.build(DataInfo(n_mels, frames + 10, 1)).eval()
    x = torch.randn(3, 1, n_mels, frames)
    recon, target, z = model(x)
    assert recon.shape == x.shape == target.shape and z.shape == (3, 10)


def test_conv_ae_unpools_with_the_pooling_indices():
    """The decoder puts values back where the encoder's maxima were: an input whose energy sits in
    one corner is reconstructed by an untrained model mostly from activations routed to that corner."""
    model = family("conv_ae").build(DataInfo(64, 44, 1)).eval()
    z, trace = model.encode(torch.randn(2, 1, 64, 44))
    idx, size = trace[0]
    assert size[-2:] == (66, 46) and idx.shape[-2:] == (33, 23)
    out = model.unpool(torch.ones(2, 16, 33, 23), idx, output_size=size[-2:])
    nonzero = out.flatten(2) != 0
    assert torch.equal(nonzero.sum(2), torch.full((2, 16), 33 * 23))
    assert torch.equal(out.flatten(2).gather(2, idx.flatten(2)), torch.ones(2, 16, 33 * 23))


def test_conv_ae_mahalanobis_score_uses_training_embedding_statistics():
    fam, trainer, data = trained("conv_ae", n_mels=64, n_frames=44, n=24, epochs=2, score="mahalanobis", hop=1)
    model = trainer.model
    assert not bool(model.stats.fitted)
    with pytest.raises(RuntimeError, match="not fitted"):
        fam.window_scores(model.eval(), torch.randn(2, 1, 64, 44), torch.zeros(2))
    trainer.fit(data)
    assert bool(model.stats.fitted)
    model.eval()
    with torch.no_grad():
        z = torch.cat([fam.embed(model, b.x) for b in data.batches(64, shuffle=False)])
    torch.testing.assert_close(model.stats.mean, z.mean(0), rtol=1e-4, atol=1e-4)
    # in-distribution windows average about dim (10) in squared Mahalanobis distance; shifted ones far more
    with torch.no_grad():
        d_train = fam.window_scores(model, data.view.windows(data.clips).flatten(0, 1), torch.zeros(1))
        d_far = fam.window_scores(model, data.view.windows(data.clips + 30.0).flatten(0, 1), torch.zeros(1))
    assert 5.0 < d_train.mean() < 15.0
    assert d_far.mean() > 5 * d_train.mean()


def test_gaussian_stats_match_numpy_mahalanobis():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 3, generator=g) @ torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 0.3, 1.0]])
    stats = GaussianStats(3, shrinkage=0.0)
    stats.fit(z)
    cov = torch.cov(z.T.double())
    q = torch.randn(4, 3, generator=g)
    d = q.double() - z.double().mean(0)
    expect = ((d @ torch.linalg.inv(cov)) * d).sum(1)
    torch.testing.assert_close(stats.distance(q).double(), expect, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------- masked_unet

def test_unet_shapes_and_depth():
    net = UNet(1, 1, width=8)
    for size in [(64, 64), (128, 64), (32, 48)]:
        assert net(torch.randn(2, 1, *size)).shape == (2, 1, *size)
    ref = UNet(1, 1, width=64)
    assert ref.downs[-1][1][0].out_channels == 512  # 512 channels at 1/16 resolution (4 x 4 for 64 x 64)
    assert ref.inc[0].out_channels == 64


@pytest.mark.parametrize("ratio,grid,expect", [(0.75, (8, 8), 48), (0.5, (8, 8), 32), (0.75, (16, 8), 96),
                                                (0.1, (8, 8), 6), (0.99, (8, 8), 63)])
def test_mask_ratio_is_honoured_exactly_per_sample(ratio, grid, expect):
    fam = family("masked_unet", mask_ratio=ratio)
    x = torch.zeros(50, 1, grid[0] * 8, grid[1] * 8)
    assert fam.mask_layout(x) == (grid, expect)
    masks = fam.train_masks(x)
    assert masks.shape == x.shape and masks.dtype == torch.bool
    assert torch.equal(masks.flatten(1).sum(1), torch.full((50,), expect * 64))
    # masks are whole 8 x 8 patches
    patches = masks[:, 0].unfold(1, 8, 8).unfold(2, 8, 8)  # (50, gh, gw, 8, 8)
    assert torch.equal(patches.all(-1).all(-1), patches.any(-1).any(-1))
    assert torch.equal(patches.all(-1).all(-1).flatten(1).sum(1), torch.full((50,), expect))


def test_training_masks_are_fresh_each_step_and_vary_between_samples():
    fam = family("masked_unet")
    x = torch.zeros(8, 1, 64, 64)
    a, b = fam.train_masks(x), fam.train_masks(x)
    assert not torch.equal(a, b)
    assert len({tuple(m.flatten().tolist()) for m in a}) == 8


def test_masked_loss_counts_only_masked_pixels():
    mask = pixel_masks(patch_masks(2, (8, 8), 48), 8)
    target = torch.zeros(2, 1, 64, 64)
    recon = torch.where(mask, 1.0, 100.0)  # huge error on the visible pixels only
    assert torch.equal(masked_error(recon, target, mask), torch.ones(2))


def test_masked_unet_input_hides_masked_pixels():
    fam = family("masked_unet", width=8)
    model = fam.build(DataInfo(64, 64, 1)).eval()
    x = torch.randn(2, 1, 64, 64)
    mask = fam.train_masks(x)
    with torch.no_grad():
        out, _ = model(x, mask)
        changed = torch.where(mask, x + 50.0, x)
        assert torch.equal(model(changed, mask)[0], out), "masked pixels must not reach the network"


def test_masked_unet_rejects_sizes_the_unet_cannot_take():
    with pytest.raises(ValueError, match="divisible by 16"):
        family("masked_unet").build(DataInfo(100, 64, 1))
    with pytest.raises(ValueError, match="frames must be a multiple"):
        make_config(get_family("masked_unet").Config, {"frames": 60})
    with pytest.raises(ValueError, match="mask_ratio"):
        make_config(get_family("masked_unet").Config, {"mask_ratio": 1.0})


def test_masked_unet_batched_scoring_equals_a_loop_over_clips_and_masks():
    """The vectorised K-mask scoring gives exactly what a plain loop over clips and masks computes,
    whatever the chunk size."""
    fam = family("masked_unet", width=8, k_masks=5, hop=16, score_batch=7)
    x = clips(3, 64, 96)
    model = fam.build(DataInfo(64, 96, 1)).eval()
    model.norm.fit(x)
    windows = fam.view().windows(x)  # (3, 3, 1, 64, 64)
    with torch.no_grad():
        batched = fam.score(model, windows, torch.zeros(3, dtype=torch.long))
        masks = fam.scoring_masks(windows[0])
        loop = []
        for clip in windows:
            per_mask = [masked_error(*model(clip, masks[k].expand(len(clip), -1, -1, -1)),
                                     masks[k].expand(len(clip), -1, -1, -1)) for k in range(5)]
            loop.append(torch.stack(per_mask).mean())
        fam.hp.score_batch = 1000
        one_chunk = fam.score(model, windows, torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(batched, torch.stack(loop), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched, one_chunk, rtol=1e-5, atol=1e-6)
    assert masks.shape == (5, 1, 64, 64) and torch.equal(masks.flatten(1).sum(1), torch.full((5,), 48 * 64))


# ----------------------------------------------------------------------------------------------- vae

def test_vae_architecture_and_scores():
    fam = family("vae")
    model = fam.build(DataInfo(128, 313, 1))
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [(640, 400), (400, 400), (400, 20), (400, 20), (20, 400), (400, 400), (400, 640)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in model.modules()) == 4
    model.eval()
    x = torch.randn(16, 640)
    with torch.no_grad():
        recon = fam.window_scores(model, x, torch.zeros(16))
        fam.hp.score = "elbo"
        elbo = fam.window_scores(model, x, torch.zeros(16))
        again = fam.window_scores(model, x, torch.zeros(16))
    assert torch.equal(elbo, again), "scoring is deterministic (posterior mean)"
    assert torch.all(elbo > 0.5 * recon), "negative ELBO = half the squared error + KL (>= 0)"
    assert not torch.allclose(elbo, 0.5 * recon)


def test_vae_kl_pulls_the_posterior_towards_the_prior():
    """With a large beta the trained encoder's means collapse towards 0; with beta 0 they do not."""
    spread = {}
    for beta in (0.0, 20.0):
        fam, trainer, data = trained("vae", n=8, epochs=3, beta=beta)
        trainer.fit(data)
        with torch.no_grad():
            mu = fam.embed(trainer.model.eval(), data.view.windows(data.clips).flatten(0, 1))
        spread[beta] = mu.pow(2).mean().item()
    assert spread[20.0] < 0.2 * spread[0.0]


# ------------------------------------------------------------------------------------------- svdd_ae

def test_svdd_centre_is_fixed_before_training_and_unchanged_by_it():
    fam, trainer, data = trained("svdd_ae", n=6, epochs=2, hop=8)
    model = trainer.model
    assert not bool(model.centre_set)
    with pytest.raises(RuntimeError, match="centre is not set"):
        fam.window_scores(model.eval(), torch.randn(2, 1, 64, 64), torch.zeros(2))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.before_training(data)
    centre = model.centre.clone()
    assert bool(model.centre_set) and centre.shape == (1, 40, 4, 4)
    # the centre is the mean latent of the training windows under the initial network ...
    model.eval()
    with torch.no_grad():
        z = torch.cat([fam.embed(model, b.x) for b in data.batches(64, shuffle=False)]).mean(0)
    z = torch.where(z.abs() < 0.1, torch.where(z < 0, -0.1, 0.1), z)
    torch.testing.assert_close(centre.flatten(), z, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(initial[k], v) for k, v in model.state_dict().items() if k not in
               ("centre", "centre_set", "norm.mean", "norm.std"))
    # ... and training moves the weights but never the centre
    seen = []
    stats = trainer.fit(data, on_epoch=lambda epoch, s: seen.append(model.centre.clone()))
    assert stats[-1].loss < stats[0].loss
    assert len(seen) == 2 and all(torch.equal(c, centre) for c in seen)
    assert torch.equal(model.centre, centre)
    assert not torch.equal(model.enc[0].weight, initial["enc.0.weight"])


def test_svdd_encoder_is_bias_free_and_distance_falls_with_training():
    fam, trainer, data = trained("svdd_ae", n=6, epochs=4, batch_size=4, hop=8)
    model = trainer.model
    enc_params = [n for n, _ in model.named_parameters() if n.startswith(("enc.", "to_latent."))]
    assert enc_params and not any(n.endswith("bias") for n in enc_params)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model.decoder is None, "no decoder without a reconstruction term"
    trainer.before_training(data)
    before = trainer.score(data).mean()
    trainer.fit(data)
    assert trainer.score(data).mean() < 0.5 * before


@pytest.mark.parametrize("skips", [False, True])
def test_svdd_reconstruction_term_and_skips(skips):
    fam = family("svdd_ae", recon_weight=1.0, skips=skips)
    model = fam.build(DataInfo(128, 64, 1))
    model.norm.fit(torch.randn(10) * 10)
    out = model(torch.randn(3, 1, 128, 64), torch.zeros(3, dtype=torch.long))
    assert out["recon"].shape == (3, 1, 128, 64) and out["z"].shape == (3, 40, 8, 4)
    weights = sum(m.weight.pow(2).sum() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
    torch.testing.assert_close(out["penalty"], weights)
    assert model.decoder["convs"][0].in_channels == (512 if skips else 256)


def test_svdd_per_class_centres():
    """One centre per machine ID: the mean initial latent of that ID's windows; a window of an unseen
    section (class -1) is scored against the nearest centre."""
    fam, trainer, data = trained("svdd_ae", n=6, hop=8, centres="per_class")
    model = trainer.model
    trainer.before_training(data)
    assert model.centre.shape == (2, 40, 4, 4)
    with torch.no_grad():
        for k in range(2):
            part = data.subset(torch.nonzero(data.labels == k)[:, 0])
            z = torch.cat([fam.embed(model, b.x) for b in part.batches(64, shuffle=False)]).mean(0)
            z = torch.where(z.abs() < 0.1, torch.where(z < 0, -0.1, 0.1), z)
            torch.testing.assert_close(model.centre[k].flatten(), z, rtol=1e-4, atol=1e-5)
        x = data.view.windows(data.clips[:2]).flatten(0, 1)
        d = torch.stack([fam.window_scores(model, x, torch.full((len(x),), k)) for k in range(2)])
        unseen = fam.window_scores(model, x, torch.full((len(x),), -1))
    assert not torch.allclose(d[0], d[1])
    torch.testing.assert_close(unseen, d.min(0).values)


# ---------------------------------------------------------------------------------------- group_made

@pytest.mark.parametrize("frames,hidden", [(5, (64, 64)), (3, (32,)), (4, (48, 40, 32))])
def test_group_made_is_autoregressive_over_frames(frames, hidden):
    """d(output of group g) / d(input) is zero for every input in groups >= g and non-zero for some
    input of every earlier group."""
    n_mels = 6
    fam = family("group_made", frames=frames, hidden=list(hidden))
    model = fam.build(DataInfo(n_mels, 20, 1))
    for p in model.parameters():  # non-zero everywhere so that every allowed path carries gradient
        nn.init.uniform_(p, 0.1, 0.5)
    dim = frames * n_mels
    x = (torch.rand(1, dim) + 0.5).requires_grad_()  # positive input, weights and biases: every ReLU is active
    mean, logvar, _ = model(x)
    for out in (mean, logvar):
        for o in range(dim):
            g_out = o // n_mels
            (grad,) = torch.autograd.grad(out[0, o], x, retain_graph=True)
            dep = grad[0].reshape(frames, n_mels).abs().sum(1)
            assert torch.all(dep[g_out:] == 0), f"output {o} (group {g_out}) sees groups >= {g_out}: {dep}"
            if g_out > 0:
                assert torch.all(dep[:g_out] > 0), f"output {o} (group {g_out}) ignores an earlier group: {dep}"


def test_group_made_nll_is_a_gaussian_log_likelihood():
    fam = family("group_made", hidden=[16])
    model = fam.build(DataInfo(4, 20, 1)).eval()
    x = torch.randn(7, 20)
    with torch.no_grad():
        mean, logvar, t = model(x)
        expect = -torch.distributions.Normal(mean, torch.exp(0.5 * logvar.clamp(min=-7.0))).log_prob(t).mean(1)
        torch.testing.assert_close(fam.window_scores(model, x, torch.zeros(7)), expect, rtol=1e-5, atol=1e-5)


def test_group_made_needs_two_groups():
    with pytest.raises(ValueError, match="frames must be >= 2"):
        make_config(get_family("group_made").Config, {"frames": 1})
