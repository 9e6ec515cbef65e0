"""The classification heads: AdaCos' adaptive scale follows its rule, sub-cluster AdaCos sums its centres'
probabilities, AdaProj measures the angle to a subspace, and both heads train a linear embedding to separate
classes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raysd.families.augment import soft_cross_entropy
from raysd.families.heads import AdaProj, SubClusterAdaCos, make_head


def test_sub_cluster_adacos_scale_starts_at_its_fixed_value_and_follows_the_dynamic_rule():
    torch.manual_seed(0)
    head = SubClusterAdaCos(8, n_classes=3, sub_clusters=4)
    assert head.scale == pytest.approx(math.sqrt(2) * math.log(3 * 4 - 1))
    x, y = torch.randn(32, 8), torch.arange(32) % 3
    s = head.scale
    cos = F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).T  # (32, 12)
    own = torch.arange(12)[None, :] // 4 == y[:, None]
    b_avg = (torch.exp(s * cos) * ~own).sum(1).mean()
    theta_med = (torch.acos(cos) * own).sum(1).div(4).median()
    expect = math.log(b_avg) / math.cos(min(math.pi / 4, float(theta_med)))
    head.eval()
    head(x, y)  # scoring never adapts
    assert head.scale == pytest.approx(s)
    head.train()
    head(x, y)
    assert head.scale == pytest.approx(expect, rel=1e-4)
    # a batch sitting on its class centres (one per class) has median angle 0: the scale becomes log(B_avg)
    one = SubClusterAdaCos(8, n_classes=3, sub_clusters=1)
    on_centre = one.weight[y].detach().clone()
    cos = F.normalize(on_centre, dim=1) @ F.normalize(one.weight, dim=1).T
    b_avg = (torch.exp(one.scale * cos) * (torch.arange(3)[None, :] != y[:, None])).sum(1).mean()
    one(on_centre, y)
    assert one.scale == pytest.approx(math.log(b_avg), rel=1e-4)


def test_sub_cluster_adacos_class_probability_is_the_sum_over_its_centres():
    torch.manual_seed(1)
    head = SubClusterAdaCos(6, n_classes=2, sub_clusters=3).eval()
    x = torch.randn(5, 6)
    per_centre = torch.softmax(head.scale * F.normalize(x, dim=1) @ F.normalize(head.weight, dim=1).T, dim=1)
    assert torch.allclose(torch.softmax(head(x), dim=1), per_centre.reshape(5, 2, 3).sum(2), atol=1e-6)


def test_adaproj_cosine_is_the_norm_of_the_projection_onto_the_class_subspace():
    torch.manual_seed(2)
    head = AdaProj(5, n_classes=2, sub_clusters=2).eval()
    inside = head.weight[1].detach() @ torch.tensor([0.3, -2.0])  # a vector of class 1's subspace
    cos = head(inside[None]) / head.scale
    assert cos[0, 1].item() == pytest.approx(1.0, abs=1e-5) and cos[0, 0].item() < 1.0
    with pytest.raises(ValueError, match="sub_clusters must be in"):
        AdaProj(4, 2, sub_clusters=5)


@pytest.mark.parametrize("kind", ["adacos", "adaproj"])
def test_heads_train_an_embedding_that_separates_classes(kind: str):
    """Four Gaussian classes in 16-d through a linear 8-d embedding: accuracy from chance to near 1."""
    g = torch.Generator().manual_seed(3)
    means = torch.randn(4, 16, generator=g) * 2
    y = torch.arange(400) % 4
    x = means[y] + torch.randn(400, 16, generator=g)
    torch.manual_seed(3)
    embed = torch.nn.Linear(16, 8, bias=False)
    head = make_head(kind, 8, 4, sub_clusters=2)
    opt = torch.optim.Adam([*embed.parameters(), *head.parameters()], lr=1e-2)
    start = head.scale

    def accuracy() -> float:
        head.eval()
        with torch.no_grad():
            return (head(embed(x)).argmax(1) == y).float().mean().item()

    before = accuracy()
    head.train()
    for _ in range(150):
        loss = soft_cross_entropy(head(embed(x), y), F.one_hot(y, 4).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = accuracy()
    assert after > 0.95 and after > before + 0.3, (before, after)
    assert head.scale != start  # it adapted
