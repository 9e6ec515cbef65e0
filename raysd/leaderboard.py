"""``python -m raysd.leaderboard EXPERIMENT_DIR [--out results/PRESET]``: what a search found.

Reads an experiment folder written by ``raysd.search`` (``experiment.json``, ``trials/<study>/<id>.json`` and the
Ray Tune study folders ``studies/<study>/`` for trials that were stopped early) and the per-clip score tables in
each finished trial's last checkpoint, and writes to ``--out``:

- ``leaderboard.csv``: one row per trial (finished, stopped early, failed with the reason, unfinished): its
  hyperparameters, epochs, AUC / pAUC per machine ID or section and the data set's official aggregates on the
  selection half, the report half and the full test set, training time, GPU-hours and checkpoint;
- ``best_models.csv``: the best finished trial of each (machine type, family) by the search metric;
- ``ensembles.csv``: per machine type, standardised-score ensembles (Giri et al.) of (a) the best trial of each
  family and (b) greedy forward selection with replacement over the top trials, each combined by mean and by
  max, and (c) the mean of each seed ensemble (``seeds:<study>``: a study's trials whose hyperparameters differ
  in ``seed`` alone, e.g. a preset entry's ``repeats``, with the mean and best of its members' own figures),
  beside the best single model; rows ``(all)`` aggregate over machine types by the official rule;
- ``seed_ensembles.csv``: each seed ensemble's figures followed by each of its members' own;
- ``ensemble.json`` (the chosen model per machine type, for ``python -m raysd.score``), ``ensemble_scores.csv``
  (its per-clip scores and decisions), ``submission/`` (official DCASE files), ``summary.md`` and PNG plots.

Every figure of a trial or an ensemble has a 95% interval (``*_lo``, ``*_hi``: a stratified bootstrap over the
test clips, paired across the models of a machine type, :mod:`raysd.report.intervals`), and ``tie`` marks the
trials the selection half cannot tell from their machine type's leader. The best single model of a machine type is
picked among those by ``--pick`` (:mod:`raysd.report.picks`). The chosen model of a machine type is the candidate
with the best selection-half metric (ties go to fewer members); with ``--ensemble-gain noise``, an ensemble only
when its gain over the best single model is above its bootstrap noise. ``summary.md`` says why. For a study over
several machine types (``first_shot``, ``dataset``), ``first_shot.csv`` gives each type's leave-one-type-out figure: the report-half
figure of the configuration chosen on the other types. Report-half figures were not used for any choice. Every
file is written atomically.

Unlabelled data (a search metric such as ``heldout_loss`` that needs no test labels, e.g. the ``birdaudio``
field recordings) has no AUC, ensembles or submission files: trials are ranked by the metric (the header of
``summary.md`` says so), and the best trial of each machine type reports the strangest moments of its
recordings (``raysd.report.unlabelled``): ``anomalies.csv`` with the ``--top`` clips (recording, start, end, score,
percentile) from the examined recording's clips if the preset names one, else from every clip the trial scored,
their spectrograms beside a typical clip, a score histogram and, for families with a bottleneck, an embedding
view (``--projection``). With several machine types each gets ``anomalies/<machine type>/``. ``ensemble.json``
then holds that best trial alone, so ``python -m raysd.score ensemble.json RECORDING.wav`` reports on new
recordings the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from raysd import artifacts
from raysd.atomic import atomic_write_csv, atomic_write_text, replace_dir
from raysd.ensemble import METRIC_KEYS, EnsembleError
from raysd.log import module_logger, setup_logging
from raysd.metrics import MetricError, write_submission
from raysd.report.board import best_models, leaderboard_table
from raysd.report.ensembles import (
    Candidate,
    choose,
    ensemble_document,
    ensembles_for_type,
    ensembles_table,
    member_label,
    seed_table,
)
from raysd.report.experiment import LeaderboardError, load_experiment
from raysd.report.intervals import bootstrap
from raysd.report.markdown import fmt, summary_markdown
from raysd.report.picks import PICK_RULES, first_shot_estimates, pick
from raysd.report.plots import plot_ensemble_histogram, plot_roc
from raysd.report.unlabelled import DEFAULT_TOP, AnomalyReport, unlabelled_reports

log = module_logger(__name__, __spec__)
N_BOOT = 1000
DEFAULT_PICK = "top"


@dataclass
class Report:
    out: Path
    board: pd.DataFrame
    best: pd.DataFrame
    ensembles: pd.DataFrame
    chosen: dict[str, Candidate]
    files: list[Path]
    anomalies: dict[str, AnomalyReport] = field(default_factory=dict)  # machine type -> report (unlabelled data)
    why: dict[str, str] = field(default_factory=dict)  # machine type -> why its chosen model


@dataclass
class Options:
    """How the leaderboard ranks, picks and reports (the CLI's options)."""

    quantile: float = artifacts.DEFAULT_QUANTILE
    top_k: int = 10
    steps: int = 15
    plots: bool = True
    top: int | None = None  # trials per type in summary.md; for unlabelled data, clips in anomalies.csv
    projection: str = "pca"
    device: str | None = None
    bootstrap: int = N_BOOT  # bootstrap replicates (0: no intervals, ties or noise rule)
    pick: str = DEFAULT_PICK
    ensemble_needs_gain: bool = False  # True: an ensemble replaces the best single model on a gain above its noise only


def _portable(table: pd.DataFrame, out: Path) -> pd.DataFrame:
    """A table as written into ``out``: its checkpoints named relative to ``out`` (:func:`artifacts.report_path`)."""
    if "checkpoint" not in table.columns:
        return table
    return table.assign(checkpoint=[artifacts.report_path(str(c), out) if isinstance(c, str) else c
                                    for c in table["checkpoint"]])


def build(experiment: str | os.PathLike, out: str | os.PathLike | None = None, options: Options | None = None,
          **kwargs: Any) -> Report:
    """Read an experiment and write every report into ``out`` (default ``results/<preset>``); ``options`` (or the
    same fields as keywords) say how."""
    opts = dataclasses.replace(options or Options(), **kwargs)
    quantile, top_k, steps, plots, top = opts.quantile, opts.top_k, opts.steps, opts.plots, opts.top
    if not 0.0 < quantile < 1.0:
        raise LeaderboardError(f"--quantile must be between 0 and 1, got {quantile}")
    exp = load_experiment(experiment)
    out = Path(out) if out is not None else Path("results") / exp.preset
    if not exp.trials:
        raise LeaderboardError(f"{exp.root}: no trials found (no trials/<study>/*.json and no Ray Tune trial folders "
                               "under studies/)")
    boot = bootstrap(exp, opts.bootstrap)
    board, values = leaderboard_table(exp, boot)
    files = [atomic_write_csv(_portable(board, out), out / "leaderboard.csv")]
    if not any(t.status == "finished" for t in exp.trials):
        counts = board["status"].value_counts().to_dict()
        raise LeaderboardError(f"{exp.root}: no finished trial ({', '.join(f'{v} {k}' for k, v in counts.items())}); "
                               f"nothing to rank or ensemble. The trials and their reasons are listed in "
                               f"{out / 'leaderboard.csv'}")
    best = best_models(exp, board)
    files.append(atomic_write_csv(_portable(best, out), out / "best_models.csv"))

    notes: list[str] = []
    per_type: dict[str, list[Candidate]] = {}
    chosen: dict[str, Candidate] = {}
    why: dict[str, str] = {}
    stats: dict[str, dict[str, pd.DataFrame]] = {}
    by_name = {t.name: t for t in exp.trials}
    label_metric = exp.metric.removeprefix("sel_") in METRIC_KEYS
    unlabelled = None
    if not values:
        notes.append("no finished trial has a usable score table and search metric: no ensembles")
    elif not label_metric:
        notes.append(f"search metric {exp.metric} needs no test labels: no AUC figures, ensembles or submission "
                     "files; the best trial of each machine type reports its strangest clips")
        unlabelled = unlabelled_reports(exp, board, values, out, top or DEFAULT_TOP, quantile, opts.projection, plots,
                                        notes, opts.device)
        files += unlabelled.files
        if unlabelled.doc is not None:
            files.append(atomic_write_text(out / artifacts.ENSEMBLE_FILE, json.dumps(
                artifacts.portable_document(unlabelled.doc, out), indent=2, default=str)))
    else:
        sign = 1 if exp.mode == "max" else -1
        for mt in sorted({t.machine_type for t in exp.trials}):
            trials = [t for t in exp.trials if t.machine_type == mt]
            ranked = sorted((t for t in trials if t.key in values), key=lambda t: (-sign * values[t.key], t.name))
            single = pick(ranked, values, boot, opts.pick, exp.trials) if ranked else None
            try:
                cands, st = ensembles_for_type(exp, mt, trials, values, top_k, steps, boot, single)
            except (EnsembleError, MetricError) as e:
                notes.append(f"{mt}: no ensembles ({e})")
                continue
            if not cands:
                notes.append(f"{mt}: no finished trial with scores")
                continue
            per_type[mt], stats[mt] = cands, st
            chosen[mt], why[mt] = choose(cands, exp.mode, opts.ensemble_needs_gain)
            if single is not None and single is not ranked[0]:
                why[mt] += f"; best single model {single.name} by --pick {opts.pick} among the trials tied with " \
                           f"the leader {ranked[0].name}"
            if len({t.family for t in trials if t.key in values}) < 2:
                notes.append(f"{mt}: only one family finished, so no best-of-each-family ensemble")
    ens = ensembles_table(exp, per_type, chosen, boot) if per_type else pd.DataFrame()
    files.append(atomic_write_csv(ens, out / "ensembles.csv"))
    first_shot = first_shot_estimates(exp, values) if label_metric and values else pd.DataFrame()
    if not first_shot.empty:
        files.append(atomic_write_csv(first_shot, out / "first_shot.csv"))
    seeds = seed_table(exp, per_type)
    files.append(atomic_write_csv(seeds, out / "seed_ensembles.csv"))

    plot_files: dict[str, list[str]] = {}
    if chosen:
        doc = ensemble_document(exp, chosen, stats, by_name, quantile)
        files.append(atomic_write_text(out / artifacts.ENSEMBLE_FILE, json.dumps(
            artifacts.portable_document(doc, out), indent=2, sort_keys=False, default=str)))
        per_clip = []
        for mt, c in chosen.items():
            thr = doc["machine_types"][mt]["threshold"]
            for part in (c.test, c.train):
                p = part.copy()
                p["decision"] = (p["score"].astype(float) > p["section"].astype(str).map(thr).astype(float)).astype(int)
                per_clip.append(p)
        files.append(atomic_write_csv(pd.concat(per_clip, ignore_index=True), out / "ensemble_scores.csv"))
        sub = pd.concat([pd.concat([c.test, c.train]) for c in chosen.values()], ignore_index=True)
        thr_all = {(mt, s): v for mt, c in chosen.items() for s, v in doc["machine_types"][mt]["threshold"].items()}
        try:
            replace_dir(out / "submission", lambda d: write_submission(
                sub, d, exp.rule, threshold=None if exp.rule == "2020" else thr_all))
            files.append(out / "submission")
        except MetricError as e:
            notes.append(f"no submission files: {e}")
        if plots:
            for mt, cands in per_type.items():
                multi = [c for c in cands if len(c.members) > 1 and math.isfinite(c.selection)]
                sign = 1 if exp.mode == "max" else -1
                best_ens = max(multi, key=lambda c: sign * c.selection) if multi else None
                made = [plot_roc(mt, cands[0], best_ens, out / f"roc_{mt}.png"),
                        plot_ensemble_histogram(mt, chosen[mt], out / f"hist_{mt}.png",
                                                doc["machine_types"][mt]["threshold"])]
                plot_files[mt] = [p.name for p in made if p is not None]
                files += [p for p in made if p is not None]
    text = summary_markdown(exp, board, best, ens, plot_files, notes, top or 5, unlabelled, out, seeds, why, first_shot)
    files.append(atomic_write_text(out / "summary.md", text))
    return Report(out, board, best, ens, chosen, files, unlabelled.reports if unlabelled else {}, why)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m raysd.leaderboard", description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="experiment folder (local, s3:// or gs://) written by python -m raysd.search")
    p.add_argument("--out", help="report folder (default results/<preset>)")
    p.add_argument("--quantile", type=float, default=artifacts.DEFAULT_QUANTILE,
                   help="decision threshold: this quantile of the ensemble's standardised training scores per section "
                        f"(default {artifacts.DEFAULT_QUANTILE})")
    p.add_argument("--top-k", type=int, default=10, help="library size for greedy ensemble selection (default 10)")
    p.add_argument("--steps", type=int, default=15, help="greedy selection steps (default 15)")
    p.add_argument("--top", type=int, default=None,
                   help="trials per machine type shown in summary.md (default 5); for unlabelled data, the strangest "
                        "clips listed in anomalies.csv (default 20)")
    p.add_argument("--projection", choices=("pca", "tsne", "none"), default="pca",
                   help="unlabelled data: 2-D projection of the clips' embeddings (default pca)")
    p.add_argument("--device", default=None, help="unlabelled data: device for the embedding view (default: CUDA "
                                                  "when available)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--bootstrap", type=int, default=N_BOOT, metavar="N",
                   help=f"bootstrap replicates for intervals, ties and the ensemble rule (default {N_BOOT}; 0: none)")
    p.add_argument("--pick", choices=PICK_RULES, default=DEFAULT_PICK,
                   help=f"which of the trials tied with a machine type's leader is its best single model (default "
                        f"{DEFAULT_PICK})")
    p.add_argument("--ensemble-gain", choices=("any", "noise"), default="any",
                   help="when an ensemble replaces the best single model: on any selection gain (default), or only on "
                        "a gain above its bootstrap noise (noise)")
    args = p.parse_args(argv)
    if args.top is not None and args.top < 1:
        p.error(f"--top must be >= 1, got {args.top}")
    return args


def main(argv: list[str] | None = None) -> int:
    setup_logging(stream="stdout")
    args = parse_args(argv)
    try:
        report = build(args.experiment, args.out, Options(
            quantile=args.quantile, top_k=args.top_k, steps=args.steps, plots=not args.no_plots, top=args.top,
            projection=args.projection, device=args.device, bootstrap=args.bootstrap, pick=args.pick,
            ensemble_needs_gain=args.ensemble_gain == "noise"))
    except (LeaderboardError, EnsembleError, MetricError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trials = report.board.drop_duplicates(["study", "trial_id"])
    counts = trials["status"].value_counts().to_dict()
    log.info("leaderboard of %d trials (%s) written to %s", len(trials),
             ", ".join(f"{v} {k}" for k, v in counts.items()), report.out)
    for mt, c in report.chosen.items():
        rep = {k: c.figures.get(f"report_{k}") for k in ("auc", "pauc")}
        log.info("  %s: chosen %s (%s); report half AUC %s pAUC %s; %s", mt, c.name, member_label(c.weights),
                 fmt(rep["auc"]), fmt(rep["pauc"]), report.why.get(mt, ""))
    for mt, r in report.anomalies.items():
        log.info("  %s: strangest %d clips in %s", mt, len(r.top), r.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
