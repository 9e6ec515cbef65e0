"""Metrics against hand-computed AUC / pAUC (ties included), the 2020/2021/2022 aggregation rules on small
hand-made tables, submission file names and formats, and a write -> read -> re-score round trip."""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from raysd.metrics import (
    MetricError,
    auc,
    decision_thresholds,
    evaluate,
    hmean,
    normalize_rule,
    pauc,
    read_submission,
    write_submission,
)

MAX_FPR = 0.1
PMIN, PMAX = MAX_FPR**2 / 2, MAX_FPR  # McClish: pAUC = 0.5 * (1 + (A - min) / (max - min))


def mcclish(raw_area: float) -> float:
    return 0.5 * (1 + (raw_area - PMIN) / (PMAX - PMIN))


# Hand-computed cases. Mann-Whitney AUC = fraction of (anomaly, normal) pairs ordered correctly, ties count 1/2.
# A: perfect separation.                                              AUC 1,    raw partial area 0.1
CASE_A = ([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4, 0.5], 1.0, mcclish(0.1))
# B: normals 0.1 0.4 0.5, anomalies 0.4 0.9. Pairs: 0.4>0.1 (1), 0.4=0.4 (1/2), 0.4<0.5 (0), 0.9 beats all (3):
#    4.5/6 = 0.75. ROC from (0,0) up to (0, 0.5) (the 0.9 anomaly), then flat to FPR 1/3: area to FPR 0.1 = 0.05.
CASE_B = ([0, 0, 0, 1, 1], [0.1, 0.4, 0.5, 0.4, 0.9], 0.75, mcclish(0.1 * 0.5))
# C: anomaly 0.8 ties the top normal 0.8: ROC goes diagonally from (0,0) to (0.2, 0.5), TPR at FPR 0.1 = 0.25,
#    area = 0.1 * 0.25 / 2 = 0.0125. AUC: 0.8 -> 4 + 1/2, 0.5 -> 4; 8.5/10 = 0.85.
CASE_C = ([1, 1, 0, 0, 0, 0, 0], [0.8, 0.5, 0.8, 0.4, 0.3, 0.2, 0.1], 0.85, mcclish(0.0125))
# D: normals 0.1 0.3, anomalies 0.2 0.2: each anomaly beats one normal: 2/4 = 0.5; the top clip is a normal, so
#    the ROC stays at TPR 0 until FPR 0.5: area 0.
CASE_D = ([0, 0, 1, 1], [0.1, 0.3, 0.2, 0.2], 0.5, mcclish(0.0))


@pytest.mark.parametrize("case", [CASE_A, CASE_B, CASE_C, CASE_D], ids="ABCD")
def test_auc_and_pauc_match_hand_computation(case):
    y, s, want_auc, want_pauc = case
    assert auc(y, s) == pytest.approx(want_auc, abs=1e-12)
    assert pauc(y, s) == pytest.approx(want_pauc, abs=1e-12)


def test_hand_values_are_the_expected_numbers():
    assert mcclish(0.05) == pytest.approx(0.7368421052631579)
    assert mcclish(0.0125) == pytest.approx(0.5394736842105263)
    assert mcclish(0.0) == pytest.approx(0.4736842105263158)


def test_auc_errors_are_clear():
    with pytest.raises(MetricError, match="needs both normal and anomalous clips, got 3 normal and 0 anomalous"):
        auc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(MetricError, match="needs both"):
        pauc([1, 1], [0.1, 0.2])
    with pytest.raises(MetricError, match="NaN or infinite"):
        auc([0, 1], [0.1, np.nan])
    with pytest.raises(MetricError, match="labels must be 0"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(MetricError, match="2 labels but 3 scores"):
        auc([0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(MetricError, match="no label"):
        auc(pd.array([0, None, 1], dtype="Int8"), [0.1, 0.2, 0.3])


def test_hmean_floors_at_epsilon_like_the_evaluators():
    assert hmean([0.5, 1.0]) == pytest.approx(2 / (2 + 1))
    assert hmean([0.0, 1.0]) == pytest.approx(scipy.stats.hmean([sys.float_info.epsilon, 1.0]))
    assert math.isnan(hmean([]))


def test_normalize_rule():
    assert [normalize_rule(r) for r in ("2020", 2021, "dcase2022", "2023", 2024)] == ["2020", "2021", "2022", "2022", "2022"]
    with pytest.raises(MetricError, match="unknown evaluation rule"):
        normalize_rule("2019")


# ---------------------------------------------------------------------------------------------- score tables
def rows(machine_type, section, case, domain="", prefix=""):
    y, s, *_ = case
    return [
        {"file": f"{machine_type}/test/{prefix}{domain}{'anomaly' if lab else 'normal'}_{section}_{i:04d}.wav",
         "machine_type": machine_type, "section": section, "domain": domain, "split": "test", "label": lab,
         "score": sc}
        for i, (lab, sc) in enumerate(zip(y, s))
    ]


def noise_rows(machine_type, section, domain=""):
    """Training and unlabelled rows with extreme scores: evaluate must ignore them."""
    return [
        {"file": f"{machine_type}/train/t_{section}_{domain}_{i}.wav", "machine_type": machine_type,
         "section": section, "domain": domain, "split": "train", "label": 0, "score": 100.0 * (i + 1)}
        for i in range(3)
    ] + [{"file": f"{machine_type}/test/u_{section}_{domain}.wav", "machine_type": machine_type, "section": section,
          "domain": domain, "split": "test", "label": pd.NA, "score": -50.0}]


def table(records) -> pd.DataFrame:
    t = pd.DataFrame(records)
    t["label"] = t["label"].astype("Int8")
    return t


def test_2020_arithmetic_means_over_ids():
    t = table(rows("fan", "00", CASE_A) + rows("fan", "02", CASE_B) + rows("pump", "00", CASE_C)
              + noise_rows("fan", "00") + noise_rows("pump", "00"))
    per, off = evaluate(t, "2020")
    assert per[["machine_type", "section"]].values.tolist() == [["fan", "00"], ["fan", "02"], ["pump", "00"]]
    assert per["auc"].tolist() == pytest.approx([1.0, 0.75, 0.85])
    assert per["pauc"].tolist() == pytest.approx([CASE_A[3], CASE_B[3], CASE_C[3]])
    assert per["n_normal"].tolist() == [3, 3, 5] and per["n_anomaly"].tolist() == [2, 2, 2]
    fan_auc, fan_pauc = (1.0 + 0.75) / 2, (CASE_A[3] + CASE_B[3]) / 2
    assert off["per_type"]["fan"]["auc"] == pytest.approx(fan_auc)
    assert off["per_type"]["fan"]["pauc"] == pytest.approx(fan_pauc)
    assert off["per_type"]["pump"]["auc"] == pytest.approx(0.85)
    assert off["auc"] == pytest.approx((fan_auc + 0.85) / 2)  # mean of per-type means, not of the 3 IDs
    assert off["pauc"] == pytest.approx((fan_pauc + CASE_C[3]) / 2)
    assert off["score"] == pytest.approx((off["auc"] + off["pauc"]) / 2)
    assert off["rule"] == "2020" and off["omitted"] == []


def test_2020_one_class_id_is_left_out_or_raises_when_strict():
    t = table(rows("fan", "00", CASE_A) + rows("fan", "04", ([0, 0], [0.1, 0.2], None, None)))
    with pytest.raises(MetricError, match="fan id 04: AUC needs both normal and anomalous clips"):
        evaluate(t, "2020", strict=True)
    with pytest.warns(UserWarning, match="fan id 04"):
        per, off = evaluate(t, "2020")
    assert math.isnan(per.loc[per["section"] == "04", "auc"].item())
    assert off["auc"] == pytest.approx(1.0) and len(off["omitted"]) == 1
    only_bad = table(rows("fan", "04", ([0, 0], [0.1, 0.2], None, None)))
    with pytest.raises(MetricError, match="no AUC or pAUC could be computed"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        evaluate(only_bad, "2020")


def test_2021_domains_separately_and_harmonic_mean_of_all_values():
    # the target anomalies of fan 00 (0.4, 0.9) would change the source AUC if the domains were mixed
    t = table(rows("fan", "00", CASE_A, "source") + rows("fan", "00", CASE_B, "target")
              + rows("pump", "01", CASE_C, "source") + rows("pump", "01", CASE_D, "target")
              + noise_rows("fan", "00", "source"))
    per, off = evaluate(t, 2021)
    assert per[["machine_type", "section", "domain"]].values.tolist() == [
        ["fan", "00", "source"], ["fan", "00", "target"], ["pump", "01", "source"], ["pump", "01", "target"]]
    aucs, paucs = [1.0, 0.75, 0.85, 0.5], [CASE_A[3], CASE_B[3], CASE_C[3], CASE_D[3]]
    assert per["auc"].tolist() == pytest.approx(aucs)
    assert per["pauc"].tolist() == pytest.approx(paucs)
    everything = aucs + paucs
    assert off["score"] == pytest.approx(len(everything) / sum(1 / v for v in everything))
    assert off["auc"] == pytest.approx(4 / sum(1 / v for v in aucs))
    assert off["pauc"] == pytest.approx(4 / sum(1 / v for v in paucs))
    fan = [1.0, 0.75, CASE_A[3], CASE_B[3]]
    assert off["per_type"]["fan"]["score"] == pytest.approx(4 / sum(1 / v for v in fan))


def test_2021_needs_domains():
    t = table(rows("fan", "00", CASE_A))
    with pytest.raises(MetricError, match="needs domain 'source' or 'target'"):
        evaluate(t, "2021")


def section_2022():
    """bearing 00: source normals .1 .2 .3, target normals .5 .7, a source anomaly .6 and a target anomaly .4.

    AUC(source) = source normals vs both anomalies = 1. AUC(target) = target normals vs both anomalies:
    only .6 > .5 is ordered correctly: 1/4. AUC over the whole section = (4 + 3) / 10 = 0.7. pAUC over the
    whole section: the top clip (.7) is a normal, so TPR is 0 up to FPR 0.2 and the raw area to 0.1 is 0.
    """
    recs = []
    for i, (dom, lab, sc) in enumerate([("source", 0, 0.1), ("source", 0, 0.2), ("source", 0, 0.3),
                                        ("target", 0, 0.5), ("target", 0, 0.7), ("source", 1, 0.6),
                                        ("target", 1, 0.4)]):
        recs.append({"file": f"bearing/test/section_00_{dom}_test_{'anomaly' if lab else 'normal'}_{i:04d}.wav",
                     "machine_type": "bearing", "section": "00", "domain": dom, "split": "test", "label": lab,
                     "score": sc})
    return recs


def test_2022_rule_source_and_target_against_all_anomalies():
    # pump 00 has no target normals: AUC(target) is left out and reported
    pump = rows("pump", "00", CASE_A, "source")
    t = table(section_2022() + pump + noise_rows("bearing", "00", "source"))
    with pytest.warns(UserWarning, match="pump section 00: no target normal clips"):
        per, off = evaluate(t, "2022")
    b = per.set_index("machine_type").loc["bearing"]
    assert (b["auc_source"], b["auc_target"], b["auc"]) == pytest.approx((1.0, 0.25, 0.7))
    assert b["pauc"] == pytest.approx(mcclish(0.0))
    assert (b["n_normal_source"], b["n_normal_target"], b["n_anomaly"]) == (3, 2, 2)
    p = per.set_index("machine_type").loc["pump"]
    assert p["auc_source"] == pytest.approx(1.0) and math.isnan(p["auc_target"])
    values = [1.0, 1.0, 0.25, mcclish(0.0), 1.0]  # AUC(source) x2, AUC(target) x1, pAUC x2
    assert off["score"] == pytest.approx(5 / sum(1 / v for v in values))
    assert off["auc_target"] == pytest.approx(0.25) and off["auc_source"] == pytest.approx(1.0)
    assert off["per_type"]["bearing"]["score"] == pytest.approx(3 / (1 + 4 + 1 / mcclish(0.0)))
    assert off["per_type"]["pump"]["score"] == pytest.approx(1.0)
    assert off["omitted"] == ["pump section 00: no target normal clips, AUC(target) left out"]
    with pytest.raises(MetricError, match="no target normal clips"):
        evaluate(t, "2023", strict=True)


def test_evaluate_matches_sklearn_on_random_scores():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    recs = []
    for sec in ("00", "01"):
        y = rng.integers(0, 2, 60)
        s = np.round(rng.normal(y * 0.7, 1.0), 1)  # rounded: many ties
        recs += rows("valve", sec, (y.tolist(), s.tolist()))
    t = table(recs)
    per, _ = evaluate(t, "2020")
    for sec, g in t.groupby("section"):
        got = per.set_index("section").loc[sec]
        assert got["auc"] == roc_auc_score(g["label"].astype(int), g["score"])
        assert got["pauc"] == roc_auc_score(g["label"].astype(int), g["score"], max_fpr=0.1)


def test_evaluate_rejects_bad_tables():
    with pytest.raises(MetricError, match="lacks columns"):
        evaluate(pd.DataFrame({"file": ["a"], "score": [1.0]}), "2020")
    t = table(rows("fan", "00", CASE_A))
    with pytest.raises(MetricError, match="no labelled test clips"):
        evaluate(t.assign(split="train"), "2020")
    bad = t.copy()
    bad.loc[1, "score"] = np.nan
    with pytest.raises(MetricError, match="NaN or infinite scores, e.g. fan/test/normal_00_0001.wav"):
        evaluate(bad, "2020")
    with pytest.raises(MetricError, match="repeat a test file"):
        evaluate(pd.concat([t, t.iloc[:1]]), "2020")


# ---------------------------------------------------------------------------------------------- submissions
def dcase_file(machine_type, name):
    return f"dev_data/{machine_type}/test/{name}"


def test_2020_submission_files_and_round_trip(tmp_path):
    recs = []
    for mt, sec, case in (("fan", "00", CASE_B), ("fan", "02", CASE_C), ("ToyCar", "01", CASE_D)):
        y, s, *_ = case
        for i, (lab, sc) in enumerate(zip(y, s)):
            recs.append({"file": dcase_file(mt, f"{'anomaly' if lab else 'normal'}_id_{sec}_{i:08d}.wav"),
                         "machine_type": mt, "section": sec, "domain": "", "split": "test", "label": lab,
                         "score": sc + 1e-9 * i})
    recs += noise_rows("fan", "00")
    t = table(recs)
    written = write_submission(t, tmp_path, "2020")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written) == [
        "anomaly_score_ToyCar_id_01.csv", "anomaly_score_fan_id_00.csv", "anomaly_score_fan_id_02.csv"]
    lines = (tmp_path / "anomaly_score_fan_id_00.csv").read_text().splitlines()
    assert len(lines) == 5 + 1  # 5 labelled clips + the unlabelled one; training clips are not written
    assert lines[0].startswith("anomaly_id_00_00000003.wav,")  # basenames, sorted, no header
    assert lines == sorted(lines)
    name, score = lines[0].split(",")
    assert float(score) == t.loc[t["file"].str.endswith(name), "score"].item()

    back = read_submission(tmp_path)
    assert set(back.columns) == {"machine_type", "section", "domain", "file_name", "score"}
    truth = t[t["split"] == "test"].assign(file_name=lambda d: d["file"].str.rsplit("/", n=1).str[-1])
    merged = back.merge(truth[["machine_type", "section", "file_name", "label", "split"]],
                        on=["machine_type", "section", "file_name"], validate="one_to_one")
    assert len(merged) == len(truth)
    rescored = merged.rename(columns={"file_name": "file"})
    per_a, off_a = evaluate(t, "2020")
    per_b, off_b = evaluate(rescored, "2020")
    pd.testing.assert_frame_equal(per_a, per_b)
    assert off_a == off_b
    one = read_submission(tmp_path / "anomaly_score_ToyCar_id_01.csv")
    assert len(one) == 4 and set(one["machine_type"]) == {"ToyCar"} and set(one["section"]) == {"01"}
    with pytest.raises(MetricError, match="no decision files"):
        write_submission(t, tmp_path, "2020", threshold=0.5)


def test_2021_submission_one_file_per_domain(tmp_path):
    t = table(rows("fan", "00", CASE_A, "source", "section_00_") + rows("fan", "00", CASE_B, "target", "section_00_"))
    written = write_submission(t, tmp_path, "2021", threshold={("fan", "00"): 0.35})
    assert sorted(p.name for p in written) == [
        "anomaly_score_fan_section_00_source_test.csv", "anomaly_score_fan_section_00_target_test.csv",
        "decision_result_fan_section_00_source_test.csv", "decision_result_fan_section_00_target_test.csv"]
    dec = read_submission(tmp_path, kind="decision_result")
    src = dec[dec["domain"] == "source"].set_index("file_name")["decision"]
    # source scores .1 .2 .3 .4 .5 against 0.35
    assert sorted(src.tolist()) == [0, 0, 0, 1, 1]
    back = read_submission(tmp_path)
    merged = back.merge(t.assign(file_name=t["file"].str.rsplit("/", n=1).str[-1]),
                        on=["machine_type", "section", "domain", "file_name"], suffixes=("", "_orig"))
    assert (merged["score"] == merged["score_orig"]).all() and len(merged) == len(t)
    _, off_a = evaluate(t, "2021")
    _, off_b = evaluate(merged.drop(columns="file").rename(columns={"file_name": "file"}), "2021")
    assert off_a == off_b
    with pytest.raises(MetricError, match=r"no value for \(machine_type, section\)"):
        write_submission(t, tmp_path, "2021", threshold={("pump", "00"): 0.5})


def test_2022_submission_with_unlabelled_eval_clips_and_baseline_threshold(tmp_path):
    recs = section_2022()
    rng = np.random.default_rng(1)
    train_scores = rng.gamma(2.0, 0.1, 40)
    recs += [{"file": f"bearing/train/section_00_source_train_normal_{i:04d}.wav", "machine_type": "bearing",
              "section": "00", "domain": "source", "split": "train", "label": 0, "score": float(v)}
             for i, v in enumerate(train_scores)]
    recs += [{"file": f"Vacuum/test/section_00_{i:04d}.wav", "machine_type": "Vacuum", "section": "00",
              "domain": "", "split": "test", "label": pd.NA, "score": 0.1 * i} for i in range(4)]
    t = table(recs)
    with pytest.raises(MetricError, match="Vacuum section 00: no training scores"):
        write_submission(t, tmp_path, "2023")
    thr = decision_thresholds(t[t["machine_type"] == "bearing"])
    a, loc, scale = scipy.stats.gamma.fit(train_scores)
    assert thr[("bearing", "00")] == pytest.approx(scipy.stats.gamma.ppf(0.9, a, loc=loc, scale=scale))
    assert np.mean(train_scores > thr[("bearing", "00")]) == pytest.approx(0.1, abs=0.08)

    written = write_submission(t, tmp_path, "2023", threshold={("bearing", "00"): 0.45, ("Vacuum", "00"): 0.15})
    assert sorted(p.name for p in written) == [
        "anomaly_score_Vacuum_section_00_test.csv", "anomaly_score_bearing_section_00_test.csv",
        "decision_result_Vacuum_section_00_test.csv", "decision_result_bearing_section_00_test.csv"]
    assert (tmp_path / "decision_result_Vacuum_section_00_test.csv").read_text() == (
        "section_00_0000.wav,0\nsection_00_0001.wav,0\nsection_00_0002.wav,1\nsection_00_0003.wav,1\n")
    scores = read_submission(tmp_path)
    assert len(scores) == 7 + 4 and set(scores["domain"]) == {""}
    bearing = scores[scores["machine_type"] == "bearing"].drop(columns="domain").merge(
        t.assign(file_name=t["file"].str.rsplit("/", n=1).str[-1]).drop(columns=["score", "machine_type", "section",
                                                                                  "file"]),
        on="file_name")
    _, off_a = evaluate(t, "2022")
    _, off_b = evaluate(bearing.rename(columns={"file_name": "file"}), "2022")
    assert off_a["score"] == off_b["score"] == pytest.approx(3 / (1 + 4 + 1 / mcclish(0.0)))
    dec = read_submission(tmp_path, kind="decision_result")
    d = dec[dec["machine_type"] == "bearing"].set_index("file_name")["decision"]
    s = scores[scores["machine_type"] == "bearing"].set_index("file_name")["score"]
    assert ((s > 0.45).astype(int) == d.loc[s.index]).all()
    assert not list(tmp_path.glob(".*.tmp"))


def test_read_submission_errors(tmp_path):
    with pytest.raises(MetricError, match="does not exist"):
        read_submission(tmp_path / "none")
    with pytest.raises(MetricError, match="no anomaly_score_"):
        read_submission(tmp_path)
    (tmp_path / "anomaly_score_fan_id_00.csv").write_text("a.wav,0.5\nb.wav,high\n")
    with pytest.raises(MetricError, match=r"line 2: score 'high' is not a number"):
        read_submission(tmp_path)
    (tmp_path / "anomaly_score_fan_id_00.csv").write_text("a.wav,0.5,extra\n")
    with pytest.raises(MetricError, match="line 1: expected 'file_name,score'"):
        read_submission(tmp_path)
    (tmp_path / "anomaly_score_fan_id_00.csv").unlink()
    (tmp_path / "anomaly_score_fan.csv").write_text("a.wav,0.5\n")
    with pytest.raises(MetricError, match="not a submission file name"):
        read_submission(tmp_path)
