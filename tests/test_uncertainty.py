"""The stratified bootstrap: its closed-form AUC and pAUC agree with scikit-learn (the official evaluators' calls) on
the original sample, its intervals cover a known AUC about as often as they claim, it is paired across models, and
the picks that use it (ties, the ensemble rule, pick rules, leave one type out) do what they say."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from raysd import uncertainty
from raysd.metrics import evaluate
from raysd.report.experiment import Trial
from raysd.report.picks import default_distance, distances, neighbour_values


def clips(rng: np.random.Generator, separation: float = 1.0, per: int = 30) -> pd.DataFrame:
    """Two machine types x 2 sections x 2 domains of normal and anomalous clips, split into halves."""
    rows = []
    for mt in ("fan", "valve"):
        for sec in ("00", "01"):
            for dom, n_normal, n_anomaly in (("source", per, per // 2), ("target", per // 3, per // 4)):
                for label, n in ((0, n_normal), (1, n_anomaly)):
                    for i in range(n):
                        rows.append({"file": f"{mt}_{sec}_{dom}_{label}_{i}.wav", "machine_type": mt, "section": sec,
                                     "domain": dom, "split": "test", "label": label,
                                     "half": "selection" if i % 2 else "report",
                                     "score": rng.normal(label * separation, 1.0)})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("rule", ["2020", "2021", "2022"])
def test_the_closed_forms_agree_with_the_official_figures_on_the_sample(rule: str) -> None:
    t = clips(np.random.default_rng(1))
    t["score"] = t["score"].round(1)  # ties too: the closed forms count a tie one half, as scikit-learn does
    ones = uncertainty.Resampler(uncertainty.clip_keys(t), np.ones((1, len(t))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for half in ("selection", "report", "test"):
            _, official = evaluate(t if half == "test" else t[t["half"] == half], rule=rule)
            reps = uncertainty.replicates(ones, t, rule, half)
            assert reps["auc"][0] == pytest.approx(official["auc"], abs=1e-9)
            assert reps["score"][0] == pytest.approx(official["score"], abs=0.01)  # pAUC: ties at the 10% edge


def test_the_pauc_closed_form_is_scikit_learns_without_ties() -> None:
    rng = np.random.default_rng(2)
    y = np.r_[np.zeros(60), np.ones(25)].astype(int)
    s = rng.normal(y * 1.2, 1.0)
    auc, pauc = uncertainty.auc_pauc(s, y, np.ones((1, len(y))))
    assert auc[0] == pytest.approx(roc_auc_score(y, s)) and pauc[0] == pytest.approx(roc_auc_score(y, s, max_fpr=0.1))


def test_intervals_cover_a_known_auc_about_as_often_as_they_claim() -> None:
    """Binormal scores with separation d have AUC Phi(d / sqrt 2): 95% intervals from 200 replicates of samples of
    40 normal and 20 anomalous clips cover it in 88-99% of 200 samples."""
    rng = np.random.default_rng(3)
    truth, hits = norm.cdf(1.0 / math.sqrt(2)), 0
    for i in range(200):
        t = pd.DataFrame({"file": [f"c{j}" for j in range(60)], "machine_type": "fan", "section": "00",
                          "domain": "source", "split": "test", "label": [0] * 40 + [1] * 20, "half": "test"})
        t["score"] = rng.normal(t["label"] * 1.0, 1.0)
        lo, hi = uncertainty.interval(uncertainty.replicates(uncertainty.resampler([t], 200, i), t, "2020", "test")["auc"])
        hits += lo <= truth <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_replicates_keep_each_stratum_and_pair_models() -> None:
    rng = np.random.default_rng(4)
    a = clips(rng)
    b = a.assign(score=a["score"] + rng.normal(0, 0.05, len(a)))  # nearly the same model
    worse = a.assign(score=rng.normal(0, 1.0, len(a)))  # a model that learned nothing
    t0 = time.perf_counter()
    rs = uncertainty.resampler([a], 1000, 0)
    ra, rb, rw = (uncertainty.replicates(rs, t, "2022", "selection")["score"] for t in (a, b, worse))
    assert time.perf_counter() - t0 < 30  # vectorised: a leaderboard's worth in seconds (loose bound, busy CI)
    meta = a.reset_index(drop=True)
    strata = meta.groupby(list(uncertainty.STRATA)).indices
    for idx in strata.values():  # every replicate draws each stratum's size from it
        assert (rs.weights[:, idx].sum(axis=1) == len(idx)).all()
    assert uncertainty.tied(ra, rb)  # paired: a tiny change is within the noise
    assert not uncertainty.tied(ra, rw)
    bound, median = uncertainty.gain(ra, rw)
    assert bound > 0 and median > 0.1


def _trial(tid: str, value_params: dict, study: str = "fan__dense_ae") -> Trial:
    return Trial(study=study, family="dense_ae", machine_type="fan", trial_id=tid, status="finished",
                 params=value_params)


def test_neighbours_smooth_a_lucky_trial_and_defaults_are_nearest_the_familys() -> None:
    """A good region of three trials, and a lucky trial whose neighbours did poorly: the lucky one leads on its own
    figure, not on its neighbourhood's."""
    good = [_trial(f"g{i}", {"lr": lr, "batch_size": 256}) for i, lr in enumerate((1e-3, 1.2e-3, 0.9e-3))]
    poor = [_trial(f"p{i}", {"lr": lr, "batch_size": 64}) for i, lr in enumerate((8e-2, 1.2e-1))]
    lucky = _trial("lucky", {"lr": 1e-1, "batch_size": 64})
    trials = good + poor + [lucky]
    figs = {"g0": 0.80, "g1": 0.79, "g2": 0.78, "p0": 0.62, "p1": 0.60, "lucky": 0.82}
    values = {f"fan__dense_ae/{k}": v for k, v in figs.items()}
    d = distances(trials)
    assert d.shape == (6, 6) and np.allclose(np.diag(d), 0) and d[0, 5] > d[0, 1]
    smooth = neighbour_values(trials, values)
    assert smooth["fan__dense_ae/lucky"] == pytest.approx((0.82 + 0.62 + 0.60) / 3)
    assert max(smooth, key=smooth.__getitem__) == "fan__dense_ae/g0"
    assert default_distance(good[0]) < default_distance(lucky)  # dense_ae's defaults: lr 1e-3, batch 256


def test_the_ensemble_rule_any_gain_or_above_the_noise() -> None:
    from raysd.report.ensembles import Candidate, choose

    rng = np.random.default_rng(0)
    base = rng.normal(0.80, 0.02, 500)

    def cand(name: str, members: int, selection: float, replicates: np.ndarray) -> Candidate:
        return Candidate("fan", name, "single" if members == 1 else "greedy", "mean",
                         {f"m{i}": 1 for i in range(members)}, pd.DataFrame(), pd.DataFrame(), selection,
                         replicates=replicates)

    single = cand("best single", 1, 0.80, base)
    small = cand("greedy mean", 2, 0.801, base + rng.normal(0.001, 0.01, 500))  # within the noise
    assert choose([single, small], "max", needs_gain=False)[0] is small  # the default: any selection gain
    kept, why = choose([single, small], "max", needs_gain=True)
    assert kept is single and "within its bootstrap noise" in why
    clear = cand("greedy max", 2, 0.83, base + 0.03 + rng.normal(0, 0.005, 500))
    chosen, why = choose([single, clear], "max", needs_gain=True)
    assert chosen is clear and "above its bootstrap noise" in why


def test_a_roc_plots_section_interval_holds_its_auc_and_widens_with_fewer_clips() -> None:
    from raysd.report.plots import section_auc_interval

    rng = np.random.default_rng(3)
    widths = []
    for per in (12, 120):
        t = clips(rng, separation=1.0, per=per)
        r = t[(t["machine_type"] == "fan") & (t["section"] == "00") & (t["half"] == "report")]
        score, label = r["score"].to_numpy(), r["label"].to_numpy()
        lo, hi = section_auc_interval(r, score, label)
        assert lo <= roc_auc_score(label, score) <= hi
        widths.append(hi - lo)
    assert widths[0] > 2 * widths[1] > 0  # about sqrt(10) wider with a tenth of the clips
