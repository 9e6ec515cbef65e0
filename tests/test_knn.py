"""kNN scoring in embedding space: per section and domain, k-means-reduced source, state through weights_only."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from raysd.families.knn import SOURCE, TARGET, KnnScorer

D = 16


def _cloud(centre: torch.Tensor, n: int, spread: float, g: torch.Generator) -> torch.Tensor:
    return centre[None, :] + spread * torch.randn(n, D, generator=g)


def _domain_shift_case(seed: int = 0) -> dict[str, torch.Tensor]:
    """One section: 990 source-domain training clips around one direction, 10 target-domain clips around
    another (the DCASE 2022-24 first-shot setting); test normals from both domains, anomalies elsewhere."""
    g = torch.Generator().manual_seed(seed)
    src, tgt, bad = torch.eye(D)[0] * 3, torch.eye(D)[1] * 3, torch.eye(D)[2] * 3
    train = torch.cat([_cloud(src, 990, 0.6, g), _cloud(tgt, 10, 0.6, g)])
    domains = torch.cat([torch.full((990,), SOURCE), torch.full((10,), TARGET)])
    return {
        "train": train, "train_domains": domains, "train_sections": torch.zeros(1000, dtype=torch.long),
        "source_normal": _cloud(src, 50, 0.6, g), "target_normal": _cloud(tgt, 50, 0.6, g),
        "anomaly": torch.cat([_cloud(bad, 50, 0.6, g), _cloud((src + bad) / 2, 50, 0.6, g)]),
    }


def _scores(scorer: KnnScorer, x: torch.Tensor) -> np.ndarray:
    return scorer(x, torch.zeros(len(x), dtype=torch.long)).numpy()


def test_target_domain_normals_are_not_all_anomalies() -> None:
    """With 10 target clips against 990 source clips, reducing the source to a few means puts the two
    domains' neighbours at comparable distances: target normals score like source normals, below the
    anomalies, and few of them pass a threshold set on the source normals."""
    case = _domain_shift_case()
    reduced = KnnScorer(k=1, source_means=10).fit(case["train"], case["train_sections"], case["train_domains"])
    assert reduced.bank.shape == (20, D)
    src, tgt, bad = (_scores(reduced, case[k]) for k in ("source_normal", "target_normal", "anomaly"))
    threshold = np.quantile(src, 0.9)
    assert (tgt > threshold).mean() < 0.5
    assert 0.5 < np.median(tgt) / np.median(src) < 2.0
    labels = np.r_[np.zeros(100), np.ones(100)]
    assert roc_auc_score(labels, np.r_[src, tgt, bad]) > 0.9

    # every source clip kept: the dense source domain's neighbours are nearer, so target normals score higher
    full = KnnScorer(k=1).fit(case["train"], case["train_sections"], case["train_domains"])
    assert np.median(_scores(full, case["target_normal"])) > 1.5 * np.median(_scores(full, case["source_normal"]))


def test_scores_use_the_clip_s_own_section_and_the_nearer_domain() -> None:
    e = torch.eye(D)
    train = torch.stack([e[0], e[1], e[2], e[3]])
    sections = torch.tensor([0, 0, 1, 1])
    domains = torch.tensor([SOURCE, TARGET, SOURCE, TARGET])
    scorer = KnnScorer(k=1).fit(train, sections, domains)
    # e[2] is a training embedding of section 1, not of section 0: as section 0 it is far from everything
    assert scorer(e[2:3], torch.tensor([1])).item() == pytest.approx(0.0, abs=1e-6)
    assert scorer(e[2:3], torch.tensor([0])).item() == pytest.approx(1.0, abs=1e-6)
    # nearer to the target-domain entry: the minimum over domains
    q = (e[0] + 3 * e[1])[None]
    assert scorer(q, torch.tensor([0])).item() == pytest.approx(1 - 3 / 10 ** 0.5, abs=1e-5)
    # an unknown section is scored against every section
    assert scorer(e[3:4], torch.tensor([7])).item() == pytest.approx(0.0, abs=1e-6)


def test_k_averages_the_nearest_and_batches_agree_with_one_by_one() -> None:
    g = torch.Generator().manual_seed(1)
    train = torch.randn(300, D, generator=g)
    sections, domains = torch.randint(0, 3, (300,), generator=g), torch.randint(0, 2, (300,), generator=g)
    scorer = KnnScorer(k=4, chunk=7).fit(train, sections, domains)
    queries, qsec = torch.randn(40, D, generator=g), torch.randint(0, 3, (40,), generator=g)
    batched = scorer(queries, qsec)
    unit = torch.nn.functional.normalize(train, dim=1)
    for i in range(40):
        q = torch.nn.functional.normalize(queries[i], dim=0)
        per_domain = []
        for d in (SOURCE, TARGET):
            dist = 1 - unit[(sections == qsec[i]) & (domains == d)] @ q
            per_domain.append(dist.sort().values[:4].mean())
        assert batched[i].item() == pytest.approx(min(per_domain).item(), abs=1e-5)


def test_fitted_state_survives_a_weights_only_load() -> None:
    case = _domain_shift_case(seed=3)
    scorer = KnnScorer(k=2, source_means=8).fit(case["train"], case["train_sections"], case["train_domains"])
    buf = io.BytesIO()
    torch.save(scorer.state_dict(), buf)
    buf.seek(0)
    fresh = KnnScorer(k=2, source_means=8)
    assert not fresh.fitted
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.cat([case["target_normal"], case["anomaly"]])
    assert torch.equal(fresh(x, torch.zeros(len(x), dtype=torch.long)), scorer(x, torch.zeros(len(x), dtype=torch.long)))


def test_unfitted_or_malformed_input_is_refused() -> None:
    with pytest.raises(RuntimeError, match="before fit"):
        KnnScorer()(torch.zeros(1, D), torch.zeros(1))
    with pytest.raises(ValueError, match="embeddings"):
        KnnScorer().fit(torch.zeros(3, D), torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="k >= 1"):
        KnnScorer(k=0)


@pytest.mark.cuda
def test_scores_on_the_gpu_match_the_cpu() -> None:
    case = _domain_shift_case(seed=5)
    cpu = KnnScorer(k=2, source_means=8).fit(case["train"], case["train_sections"], case["train_domains"])
    gpu = KnnScorer(k=2, source_means=8).cuda().fit(case["train"], case["train_sections"], case["train_domains"])
    assert gpu.bank.is_cuda
    x, s = case["anomaly"], torch.zeros(100, dtype=torch.long)
    assert torch.allclose(gpu(x, s).cpu(), cpu(x, s), atol=1e-5)


def test_a_training_clip_is_scored_without_itself_and_centres_are_never_left_out() -> None:
    """Leave-one-out by input fingerprint: a training clip's score is its distance to the nearest other clip,
    not 0; an old state without fingerprints still loads and scores as before."""
    from raysd.families.knn import clip_keys

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, D, generator=g)
    windows = torch.randn(6, 2, 5, generator=g)  # the clips' inputs, fingerprinted
    sections, domains = torch.zeros(6, dtype=torch.long), torch.full((6,), TARGET)
    scorer = KnnScorer(k=1).fit(x, sections, domains, clip_keys(windows))
    with_self = scorer(x, sections)
    assert torch.allclose(with_self, torch.zeros(6), atol=1e-6)
    loo = scorer(x, sections, clip_keys(windows))
    unit = torch.nn.functional.normalize(x, dim=1)
    dist = 1 - unit @ unit.T
    expect = dist.masked_fill(torch.eye(6, dtype=torch.bool), float("inf")).min(1).values
    assert torch.allclose(loo, expect, atol=1e-6) and (loo > 0.01).all()
    assert torch.allclose(scorer(x, sections, clip_keys(windows[[1, 0, 2, 3, 4, 5]] * 1.5)), with_self, atol=1e-6)

    means = KnnScorer(k=1, source_means=2).fit(torch.cat([x, x + 0.01]), torch.zeros(12, dtype=torch.long),
                                               torch.full((12,), SOURCE), clip_keys(torch.cat([windows, windows])))
    assert means.bank_key.isnan().all()  # centres are no clip: never left out

    old = {k: v for k, v in scorer.state_dict().items() if k != "bank_key"}
    fresh = KnnScorer(k=1)
    fresh.load_state_dict(old)
    assert torch.allclose(fresh(x, sections, clip_keys(windows)), with_self, atol=1e-6)


def test_scores_under_bf16_autocast_equal_float32() -> None:
    """Cosine distances are computed in float32 even inside autocast (bf16 would round them to ~0.004 steps)."""
    case = _domain_shift_case()
    scorer = KnnScorer(k=2, source_means=16).fit(case["train"], case["train_sections"], case["train_domains"])
    x = torch.cat([case["source_normal"], case["anomaly"]])
    plain = _scores(scorer, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = _scores(scorer, x)
    np.testing.assert_allclose(mixed, plain, rtol=1e-5, atol=1e-6)
