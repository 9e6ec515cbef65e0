"""Search efficiency: grid, random, Optuna TPE as shipped before and the improved TPE, each with and without ASHA,
replayed on learning curves recorded once through raysd's own search.

``record`` (once; trains): one grid search through ``python -m raysd.search`` with ``search: grid`` and no
scheduler over every family (``dense_ae`` and ``vae``, 36 configurations each, unless ``--families`` and
``--grid`` say otherwise; ``--set`` fixes other keys, by default ``hop=4``) on a synthetic data set (the
``demo`` preset's data, features and machine types unless ``--preset`` and ``--machine-types`` say otherwise), then
the selection metric after every epoch of every trial (Tune's ``result.json`` of each trial) and the report-half
value at its last epoch (the leaderboard's ``report_*`` column), one row per machine type, configuration and epoch,
into ``benchmarks/tables/search_<family>.csv.gz``, with the command that made it in ``search_<family>.json``::

    python benchmarks/search_efficiency.py record [--families dense_ae vae] [--epochs 6] [--set hop=4]
        [--machine-types fan valve] [--grid lr=1e-4,3e-4 batch_size=128,256 ...] [-- RAYSD_SEARCH_ARGS ...]

A table holds one or more machine types; ``merge OTHER_OUT_DIR`` adds those of a second record (same grid, fixed
keys, epochs and preset) to the committed tables, and each table's ``.json`` lists every record run::

    python benchmarks/search_efficiency.py record --machine-types valve --out-dir /tmp/valve -- ...
    python benchmarks/search_efficiency.py merge /tmp/valve

``replay`` (the default; no training, minutes): every searcher x {no scheduler, ASHA} x concurrency x seed on
every committed table. Replaying is a discrete-event simulation of one study: ``concurrency`` slots (under the
searcher's ``max_concurrent_per_study``); a free slot asks the searcher for a configuration; each running trial
trains one epoch per time step, and its recorded value after that epoch goes to the scheduler
(``on_trial_result``: continue or stop) and, as Tune does, to the searcher (``on_trial_result``, or
``on_trial_complete`` when the trial ends). The searcher, the sampler and ASHA are the objects a study uses,
built by the same functions (:mod:`raysd.searchers`) and driven through Ray's own methods, not a
re-implementation; ASHA's settings are :class:`raysd.presets.Scheduler`'s defaults unless given. The search space
is what a preset would write for the grid's axes: a float axis of three or more values (learning rate, weight
decay) log-uniform over the grid's range, every other axis a ``choice`` over its values (``--categorical``: every
axis a choice); a suggestion trains the recorded configuration nearest to it (in log scale on a float axis), and a
repeated one trains again and costs its epochs again. ``grid`` is the grid
in a seeded random order: Tune expands ``grid_search`` in a fixed order, where the best falls in it is an accident
of how the axes are listed, and a random order measures over where it may fall. Warm start
(``tpe:warm_start=N``) starts each machine type from the best finished configurations of the same searcher's
replay on the family's other machine types.

Per replay: the budget is the grid's trial-epochs (configurations x epochs, times ``--budget``); TPE's ``auto``
start-up is sized to the full-length trials the budget pays for (36 for a 36-configuration grid). A trial's value
is what the leaderboard ranks: a trial that ran every epoch, by its value at the last epoch (a trial ASHA stopped
is no candidate). The grid's best is the best last-epoch value over the grid. Reported per searcher and
concurrency: the trial-epochs used until a finished trial reaches the grid's best (and within ``--tolerance`` of
it), as a fraction of the grid's trial-epochs, median and IQR over tables x seeds (never reached: infinite); the
time steps until then (wall time with every epoch equally long); at ``--pick-at`` of the budget, the report-half
value of the configuration the searcher would pick (its best finished trial). Writes ``runs.csv``, ``summary.csv``
and ``search_efficiency.png`` (median gap to the grid's best against trial-epochs) under ``--out``, prints a table
and, last, one JSON object: ``{"fraction_to_grid_best": {"<searcher>[+asha]": {"1": f, "8": f, "32": f}},
"shipped": "<the searcher a preset without search: gets>"}`` (the median fraction; null: not reached in most runs).

    python benchmarks/search_efficiency.py [replay] [--tables GLOB ...] [--searchers grid random tpe_default tpe]
        [--concurrency 1 8 32] [--seeds 30] [--jobs 1] [--out results/search_efficiency]

A replay ends once the grid's best is reached and the pick is known (``used`` in ``runs.csv``), since nothing
measured changes after that. Cost: 120 replays (4 searchers x 2 schedulers x 3 concurrencies x 5 seeds) of 4
made-up tables of 36 configurations x 8 epochs took 34 s on one core of a busy 2-core machine (``fabricate --out
/tmp/fab``, then ``--tables '/tmp/fab/search_*.csv.gz' --seeds 5``). On the 4 committed tables, 6 searchers x 2
schedulers x 3 concurrencies x 30 seeds took 417 s with ``--jobs 2`` (two processes) on 2 cores.

Options of the improved search are measured by naming variants, e.g. ``--searchers tpe tpe:constant_liar=false
tpe:n_startup_trials=10 tpe:stopped_trials=complete tpe:max_concurrent_per_study=4 tpe:warm_start=4``.
``fabricate --out DIR`` writes small made-up tables (a known best) to try the replay without recording.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import gzip
import itertools
import json
import math
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from raysd import artifacts, searchers
from raysd.atomic import atomic_path, atomic_write_text
from raysd.presets import METRICS, SEARCH_SPACES, Scheduler
from raysd.search_settings import SearchSettings, SettingError, read_settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tournament  # noqa: E402  (benchmarks/tournament.py, beside this file)

TABLES = Path(__file__).resolve().parent / "tables"
SEARCHERS = ["grid", "random", "tpe_default", "tpe"]
TOURNAMENT = ["random", "tpe_default", "tpe", "gp", "cmaes", "bohb", "topk"]
DEFAULT_GRIDS = {  # 4 x 3 x 3 = 36 configurations each
    "dense_ae": {"lr": [1e-4, 3e-4, 1e-3, 3e-3], "batch_size": [128, 256, 512], "bottleneck": [4, 8, 16]},
    "vae": {"lr": [1e-4, 3e-4, 1e-3, 3e-3], "batch_size": [128, 256, 512], "latent": [8, 16, 32]},
}
# Fixed for every family of the record run: every 4th frame vector, a quarter of the baseline's (72 trials of 6
# epochs, both families on one machine type, took 43 minutes on 2 CPU cores, mostly Ray's start of each trial).
DEFAULT_FIXED = ["hop=4"]
HP = "hp_"  # prefix of a table's grid-axis columns
REGRET_AT = (0.10, 0.25, 0.50)  # shares of the grid's trial-epochs
REGRET_KEYS = [int(round(f * 100)) for f in REGRET_AT]
TABLE_METRICS = {"val_accuracy": "max"}  # metrics of tables from outside raysd (benchmarks/lcbench.py)


# ---------------------------------------------------------------------- tables
@dataclass
class Problem:
    """One table: a family's grid on one machine type, with every configuration's learning curve."""

    family: str
    machine_type: str
    metric: str
    axes: dict[str, list]  # grid axis -> its values
    configs: list[dict[str, Any]]  # configuration id -> its values
    curves: np.ndarray  # (configurations, epochs): the selection metric after each epoch
    report: np.ndarray  # (configurations,): the report-half value after the last epoch
    ordered: bool = True  # False: every axis a choice over its values (no log axes)
    index: dict[tuple, int] = field(default_factory=dict)
    logs: set[str] = field(default_factory=set)  # :meth:`log_axes`

    def __post_init__(self) -> None:
        self.index = {tuple(c[k] for k in self.axes): i for i, c in enumerate(self.configs)}
        self.logs = {k for k, v in self.axes.items()
                     if len(v) >= 3 and all(isinstance(x, float) and x > 0 for x in v)} if self.ordered else set()

    @property
    def mode(self) -> str:
        return METRICS.get(self.metric) or TABLE_METRICS[self.metric]

    @property
    def sign(self) -> float:
        return 1.0 if self.mode == "max" else -1.0

    @property
    def epochs(self) -> int:
        return self.curves.shape[1]

    @property
    def grid_epochs(self) -> int:
        return self.curves.size

    @property
    def best(self) -> float:
        """The grid's best value after the last epoch."""
        return float(self.sign * np.max(self.sign * self.curves[:, -1]))

    @property
    def worst(self) -> float:
        return float(self.sign * np.min(self.sign * self.curves[:, -1]))

    def log_axes(self) -> set[str]:
        """Axes searched log-uniformly over the grid's range, as the presets search learning rates and weight
        decays: every value a positive float, at least three of them."""
        return self.logs

    def config_id(self, params: dict[str, Any]) -> int:
        """The recorded configuration that answers a suggestion: a log axis's nearest value in log scale."""
        logs = self.log_axes()
        key = tuple(min(v, key=lambda x: abs(math.log(x) - math.log(params[k]))) if k in logs else params[k]
                    for k, v in self.axes.items())
        return self.index[key]

    def space(self) -> dict[str, Any]:
        """The replay's search space as a preset writes it: log axes log-uniform over the grid's range, every
        other axis a choice over its values."""
        logs = self.log_axes()
        return {k: {"loguniform": [min(v), max(v)]} if k in logs else {"choice": list(v)} for k, v in self.axes.items()}


def _py(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def problems(table: pd.DataFrame, ordered: bool = True) -> list[Problem]:
    """A table (columns family, machine_type, config, hp_*, epoch, metric, sel, report_final) as one problem per
    (family, machine type); ``ordered``: see :attr:`Problem.ordered`."""
    out = []
    axes_cols = [c for c in table.columns if c.startswith(HP)]
    for (family, mt), g in table.groupby(["family", "machine_type"], sort=True):
        g = g.sort_values(["config", "epoch"])
        ids = sorted(g["config"].unique())
        first = g.drop_duplicates("config").set_index("config").loc[ids]
        axes = {c[len(HP):]: sorted({_py(v) for v in first[c]}) for c in axes_cols}
        configs = [{c[len(HP):]: _py(first.loc[i, c]) for c in axes_cols} for i in ids]
        epochs = int(g["epoch"].max())
        curves = g.pivot(index="config", columns="epoch", values="sel").loc[ids, list(range(1, epochs + 1))]
        if curves.isna().any().any():
            raise ValueError(f"table {family}/{mt}: some configurations lack epochs")
        out.append(Problem(str(family), str(mt), str(g["metric"].iloc[0]), axes, configs, curves.to_numpy(float),
                           first["report_final"].to_numpy(float), ordered))
    return out


def read_tables(patterns: Sequence[str], ordered: bool = True) -> list[Problem]:
    paths = sorted({p for pat in patterns for p in glob.glob(pat)})
    if not paths:
        raise SystemExit(f"no tables match {list(patterns)}: record them first (python benchmarks/search_efficiency.py "
                         f"record), or try the replay on made-up ones (fabricate --out DIR)")
    return [p for path in paths for p in problems(pd.read_csv(path), ordered)]


def fabricate(family: str, machine_types: Sequence[str], axes: dict[str, list], epochs: int, seed: int = 0) -> pd.DataFrame:
    """A made-up table: each configuration's curve rises to its own level at its own pace, with noise, and some
    overfit after a peak; the best last-epoch configuration is unique."""
    rng = np.random.default_rng(seed)
    rows = []
    configs = [dict(zip(axes, vals)) for vals in itertools.product(*axes.values())]
    for mt in machine_types:
        level = 0.55 + 0.35 * rng.random(len(configs))
        level[rng.integers(len(configs))] = 0.97  # the known best
        pace = rng.uniform(0.5, 3.0, len(configs))
        overfit = rng.uniform(0.0, 0.02, len(configs)) * (rng.random(len(configs)) < 0.3)
        for i, c in enumerate(configs):
            for e in range(1, epochs + 1):
                sel = level[i] * (1 - 0.5 * math.exp(-e / pace[i])) - overfit[i] * e + 0.005 * rng.standard_normal()
                rows.append({"family": family, "machine_type": mt, "config": i, **{HP + k: v for k, v in c.items()},
                             "epoch": e, "metric": "sel_auc", "sel": sel, "report_final": 0.0})
    table = pd.DataFrame(rows)
    last = table[table["epoch"] == epochs].index
    table.loc[last, "sel"] += np.where(table.loc[last, "sel"].groupby(table.loc[last, "machine_type"]).rank(
        ascending=False, method="first") == 1, 0.01, 0.0)  # a clear margin for the best
    final = table.loc[last].set_index(["machine_type", "config"])["sel"]
    table["report_final"] = [final[(m, c)] + 0.01 * rng.standard_normal()
                             for m, c in zip(table["machine_type"], table["config"])]
    return table


# ---------------------------------------------------------------------- replay
@dataclass(frozen=True)
class ReplayConfig:
    """One contender on one seed and concurrency. ``settings``: raysd's search settings, or the name of a searcher
    only the tournament runs (``bohb``, ``topk``); ``scheduler``: a preset's scheduler section
    (``bohb`` always runs with ``HyperBandForBOHB``)."""

    settings: SearchSettings | str
    scheduler: Scheduler
    concurrency: int
    seed: int
    budget: float = 1.0  # of the grid's trial-epochs
    pick_at: float = 1 / 3  # of the budget

    @property
    def searcher_label(self) -> str:
        return self.settings if isinstance(self.settings, str) else self.settings.label()

    @property
    def label(self) -> str:
        """``<searcher>[+<scheduler>]``, e.g. ``tpe+asha``."""
        if self.settings in ("bohb", "topk"):
            return str(self.settings)
        return self.searcher_label + ("" if self.scheduler.type == "none" else f"+{self.scheduler.type}")


Replay = tournament.Run


class GridOrder:
    """The grid's configurations in a seeded random order, then nothing (the searcher of ``search: grid``)."""

    def __init__(self, p: Problem, seed: int):
        self.configs = [p.configs[i] for i in np.random.default_rng(seed).permutation(len(p.configs))]

    def suggest(self, trial_id: str) -> dict | None:
        return self.configs.pop(0) if self.configs else None

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        pass

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass


def make_searcher(p: Problem, cfg: ReplayConfig, num_samples: int, points: list[dict]):
    """The study's searcher as :func:`raysd.studies.tune_config` makes it (in-memory Optuna storage), over the space
    a preset would write for the table's grid (:meth:`Problem.space`); Ray's ``TuneBOHB`` for ``bohb``."""
    if isinstance(cfg.settings, str):
        return tournament.ray_searcher(cfg.settings, p.space(), p.metric, p.mode, cfg.seed)
    if not cfg.settings.optuna:
        return GridOrder(p, cfg.seed)
    spec = searchers.SearcherSpec(cfg.settings, p.metric, p.mode, num_samples, p.epochs, cfg.seed)
    searcher = searchers.make_searcher(spec, f"{p.family}_{p.machine_type}", p.space(), None, points)
    assert searcher is not None
    return searcher


def warm_points(p: Problem, cfg: ReplayConfig, siblings: Sequence[Problem], num_samples: int) -> list[dict]:
    """The best finished configurations of the same search on the family's other machine types."""
    assert isinstance(cfg.settings, SearchSettings)
    cold = dataclasses.replace(cfg, settings=dataclasses.replace(cfg.settings, warm_start=0))
    results = [(s.configs[c], v) for s in siblings for _, _, c, v in replay(s, cold, stop_when_done=False).finished]
    return searchers.warm_start_points(results, p.space(), min(cfg.settings.warm_start, num_samples), p.mode)


def replay(p: Problem, cfg: ReplayConfig, siblings: Sequence[Problem] = (), stop_when_done: bool = True) -> Replay:
    """One study replayed on a table (module docstring; :func:`tournament.simulate`). ``stop_when_done``: end once
    the grid's best is reached and the pick is known (nothing measured changes after that)."""
    budget = int(round(cfg.budget * p.grid_epochs))
    best, pick_budget = p.sign * p.best - 1e-12, cfg.pick_at * budget

    def done(run: Replay) -> bool:
        return stop_when_done and run.used >= pick_budget and any(p.sign * v >= best for *_, v in run.finished)

    if cfg.settings == "topk":
        return tournament.top_k(p.curves, p.sign, cfg.concurrency, budget, cfg.seed, done)
    num_samples = max(1, budget // p.epochs)  # the full-length trials the budget pays for
    warm = isinstance(cfg.settings, SearchSettings) and cfg.settings.warm_start and siblings
    points = warm_points(p, cfg, siblings, num_samples) if warm else []
    searcher = make_searcher(p, cfg, num_samples, points)
    kind = "hyperband_bohb" if cfg.settings == "bohb" else cfg.scheduler.type
    scheduler = tournament.ray_scheduler(kind, p.epochs, cfg.scheduler.grace_period, cfg.scheduler.reduction_factor)
    scheduler.set_search_properties(p.metric, p.mode)
    settings = cfg.settings if isinstance(cfg.settings, SearchSettings) else SearchSettings()
    slots = searchers.study_concurrency(settings, cfg.concurrency)
    return tournament.simulate(p.curves, p.metric, p.sign, p.config_id, searcher, scheduler, slots, budget, done)


def problem_set(p: Problem) -> str:
    """The set a table belongs to in the reports: LCBench, or tables recorded through raysd."""
    return "lcbench" if p.family == "lcbench" else "recorded"


def measure(p: Problem, cfg: ReplayConfig, run: Replay, tolerance: float, fractions: np.ndarray) -> dict[str, Any]:
    """A replay's figures (module docstring), and its gap to the grid's best at each fraction of the grid's
    trial-epochs (``gap_<i>``; before any trial finished, the gap of the grid's worst configuration)."""
    s = p.sign
    best_config = int(np.argmax(s * p.curves[:, -1]))

    def first(tol: float) -> tuple[float, float]:
        hit = [(u, st) for u, st, _, v in run.finished if s * v >= s * p.best - tol - 1e-12]
        return (float(hit[0][0]), float(hit[0][1])) if hit else (math.inf, math.inf)

    (to_best, steps_best), (to_within, _) = first(0.0), first(tolerance)
    early = [(s * v, -u, c) for u, _, c, v in run.finished if u <= cfg.pick_at * run.budget]
    pick = max(early)[2] if early else None
    regret = {}
    for f in REGRET_AT:  # normalised regret of the best finished trial at a share of the grid's trial-epochs
        seen = [s * v for u, _, _, v in run.finished if u <= f * p.grid_epochs]
        regret[f"regret_{int(round(f * 100))}"] = (s * p.best - (max(seen) if seen else s * p.worst)) / max(
            s * p.best - s * p.worst, 1e-12)
    row: dict[str, Any] = {
        "problem_set": problem_set(p), "family": p.family, "machine_type": p.machine_type, "contender": cfg.label,
        "searcher": cfg.searcher_label,
        "scheduler": {"bohb": "hyperband_bohb", "topk": "topk"}.get(cfg.searcher_label, cfg.scheduler.type),
        "concurrency": cfg.concurrency, "stopped_best": best_config in run.stopped, "tried_best": best_config in run.configs, **regret,
        "seed": cfg.seed, "grid_epochs": p.grid_epochs,
        "budget": run.budget, "used": run.used, "trials": run.trials,
        "distinct": len(run.configs), "epochs_to_best": to_best,
        "fraction_to_best": to_best / p.grid_epochs, "fraction_to_within": to_within / p.grid_epochs,
        "steps_to_best": steps_best, "pick_config": pick,
        "pick_sel": float(p.curves[pick, -1]) if pick is not None else math.nan,
        "pick_report": float(p.report[pick]) if pick is not None else math.nan,
        "grid_best_sel": p.best, "grid_best_report": float(p.report[best_config])}
    for i, f in enumerate(fractions):
        seen = [s * v for u, _, _, v in run.finished if u <= f * p.grid_epochs]
        row[f"gap_{i}"] = s * p.best - (max(seen) if seen else s * p.worst)
    return row


# ---------------------------------------------------------------------- the benchmark
PROBLEMS: list[Problem] = []


def _init(problems_: list[Problem]) -> None:
    global PROBLEMS
    PROBLEMS = problems_
    warnings.filterwarnings("ignore")  # Optuna's experimental-feature warnings, once per trial
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)


def run_task(task: tuple[ReplayConfig, float, np.ndarray]) -> list[dict[str, Any]]:
    cfg, tolerance, fractions = task
    rows = []
    for p in PROBLEMS:
        siblings = [q for q in PROBLEMS if q.family == p.family and q is not p]
        rows.append(measure(p, cfg, replay(p, cfg, siblings), tolerance, fractions))
    return rows


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    def q(x: pd.Series, p: float) -> float:
        """A quantile in which a run that never reached (infinite) counts as the longest."""
        return float(np.quantile(x.to_numpy(float), p, method="inverted_cdf"))  # a value of the sample: no inf - inf

    rows = []
    for (pset, name, conc), g in runs.groupby(["problem_set", "contender", "concurrency"], sort=False):
        rows.append({"problem_set": pset, "searcher": name, "concurrency": conc, "runs": len(g),
                     "fraction_to_best_median": q(g["fraction_to_best"], 0.5),
                     "fraction_to_best_q25": q(g["fraction_to_best"], 0.25),
                     "fraction_to_best_q75": q(g["fraction_to_best"], 0.75),
                     "reached_best": float(np.isfinite(g["fraction_to_best"]).mean()),
                     "stopped_best": float(g["stopped_best"].mean()),
                     **{f"regret_{k}_median": float(g[f"regret_{k}"].median()) for k in REGRET_KEYS},
                     "fraction_to_within_median": q(g["fraction_to_within"], 0.5),
                     "fraction_to_within_q25": q(g["fraction_to_within"], 0.25),
                     "fraction_to_within_q75": q(g["fraction_to_within"], 0.75),
                     "epochs_to_best_median": q(g["epochs_to_best"], 0.5),
                     "steps_to_best_median": q(g["steps_to_best"], 0.5),
                     "picked": float(g["pick_config"].notna().mean()),
                     "pick_report_mean": float(g["pick_report"].mean()),
                     "pick_report_median": float(g["pick_report"].median()),
                     "grid_best_report_mean": float(g["grid_best_report"].mean()),
                     "trials_median": float(g["trials"].median()), "distinct_median": float(g["distinct"].median())})
    return pd.DataFrame(rows)


def plot(runs: pd.DataFrame, fractions: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concs = sorted(runs["concurrency"].unique())
    scheds = list(dict.fromkeys(runs["scheduler"]))
    fig, axes = plt.subplots(len(scheds), len(concs), figsize=(4.2 * len(concs), 3.5 * len(scheds)), sharex=True,
                             sharey=True, squeeze=False)
    gaps = [f"gap_{i}" for i in range(len(fractions))]
    for r, sched in enumerate(scheds):
        for c, conc in enumerate(concs):
            ax = axes[r][c]
            sub = runs[(runs["scheduler"] == sched) & (runs["concurrency"] == conc)]
            for name, g in sub.groupby("searcher", sort=False):
                ax.plot(fractions, np.median(g[gaps].to_numpy(float), axis=0), label=name)
            ax.set_title(f"scheduler {sched}, concurrency {conc}", fontsize=9)
            ax.grid(alpha=0.3)
            if r == len(scheds) - 1:
                ax.set_xlabel("trial-epochs / grid's trial-epochs")
            if c == 0:
                ax.set_ylabel("median gap to the grid's best (selection)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_searcher(text: str) -> SearchSettings:
    """``tpe`` or ``tpe:constant_liar=false,n_startup_trials=10`` as search settings."""
    name, _, opts = text.partition(":")
    raw: dict[str, Any] = {"algorithm": name}
    for opt in filter(None, opts.split(",")):
        key, _, value = opt.partition("=")
        raw[key] = yaml.safe_load(value)
    try:
        return read_settings(raw)
    except SettingError as e:
        raise SystemExit(f"searcher {text!r}: {e.key}: {e}") from None


def contenders(a: argparse.Namespace) -> list[tuple[SearchSettings | str, Scheduler]]:
    """Every (searcher, scheduler) pair the options name; a Ray-wrapped searcher whose package is missing is left
    out with a note (install the ``tournament`` extra)."""
    out: list[tuple[SearchSettings | str, Scheduler]] = []
    schedulers = [Scheduler(type=t, grace_period=a.grace_period, reduction_factor=a.reduction_factor)
                  for t in a.schedulers]
    for name in a.searchers:
        if name in ("topk", "bohb"):  # a scheduler of its own
            if tournament.available(name):
                out.append((name, Scheduler()))
            else:
                print(f"note: {name} left out: pip install -c constraints.txt -e \".[tournament]\"", file=sys.stderr)
            continue
        if name in tournament.RAY_SEARCHERS:
            if not tournament.available(name):
                print(f"note: {name} left out: pip install -c constraints.txt -e \".[tournament]\"", file=sys.stderr)
                continue
            out += [(name, sch) for sch in schedulers]
            continue
        settings = parse_searcher(name)
        out += [(settings, sch) for sch in schedulers]
    return out


def shipped_scheduled() -> str:
    """The shipped searcher with the scheduler the DCASE presets use, e.g. ``tpe+asha``."""
    raw = yaml.safe_load((SEARCH_SPACES / "dcase20.yaml").read_text()).get("scheduler") or {}
    kind = raw.get("type", "none")
    return SearchSettings().label() + ("" if kind == "none" else f"+{kind}")


def run_replay(a: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    patterns = list(a.tables)
    if a.lcbench:
        built = tournament_tables(a.lcbench, Path(a.out) / "lcbench_tables", a.lcbench_tasks)
        patterns.append(str(built / "lcbench_*.csv.gz"))
    probs = read_tables(patterns, ordered=not a.categorical)
    fractions = np.linspace(0.0, a.budget, 41)
    tasks = [(ReplayConfig(s, sch, conc, seed, a.budget, a.pick_at), a.tolerance, fractions)
             for s, sch in contenders(a) for conc in a.concurrency for seed in range(a.seeds)]
    rows: list[dict] = []
    if a.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(a.jobs, _init, (probs,)) as pool:
            for part in pool.imap_unordered(run_task, tasks):
                rows.extend(part)
    else:
        _init(probs)
        for task in tasks:
            rows.extend(run_task(task))
    runs = pd.DataFrame(rows).sort_values(["contender", "concurrency", "seed", "family", "machine_type"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "runs.csv", index=False)
    plot(runs, fractions, out / "search_efficiency.png")
    seconds = time.perf_counter() - t0
    sets = runs.groupby("problem_set")["machine_type"].nunique().to_dict()
    print(f"{len(probs)} table(s): " + ", ".join(f"{k} {v}" for k, v in sets.items()) + "; " + ", ".join(
        sorted({f"{len(p.configs)} configurations x {p.epochs} epochs" for p in probs})))
    print(f"{len(tasks)} replays x {len(probs)} tables in {seconds:.0f}s; budget {a.budget:g} x the grid's "
          f"trial-epochs; pick at {a.pick_at:.2f} of it; ASHA grace {a.grace_period}, reduction {a.reduction_factor}")
    return report(runs, out, a.tolerance)


def report(runs: pd.DataFrame, out: Path, tolerance: float) -> dict[str, Any]:
    """``summary.csv`` in ``out``, the table on stdout, and the JSON line's object."""
    summary = summarise(runs)
    summary.to_csv(out / "summary.csv", index=False)
    print(f"{'set':9s} {'contender':34s} {'conc':>4s}  {'to best: median [IQR]':>24s} {'reached':>7s} "
          f"{f'to within {tolerance:g}':>22s} {'regret@10/25/50%':>17s} {'stopped best':>12s}")
    for r in summary.to_dict("records"):
        regret = "/".join(f"{r[f'regret_{k}_median']:.3f}" for k in REGRET_KEYS)
        print(f"{r['problem_set']:9s} {r['searcher']:34s} {r['concurrency']:4d}  {_iqr(r, 'fraction_to_best'):>24s} "
              f"{r['reached_best']:7.0%} {_iqr(r, 'fraction_to_within'):>22s} {regret:>17s} {r['stopped_best']:12.0%}")
    result: dict[str, dict[str, float | None]] = {}
    reached: dict[str, dict[str, float]] = {}
    for (name, conc), g in runs.groupby(["contender", "concurrency"], sort=False):
        v = float(np.quantile(g["fraction_to_best"].to_numpy(float), 0.5, method="inverted_cdf"))
        result.setdefault(name, {})[str(conc)] = round(v, 4) if math.isfinite(v) else None
        reached.setdefault(name, {})[str(conc)] = round(float(np.isfinite(g["fraction_to_best"]).mean()), 4)
    return {"fraction_to_grid_best": result, "shipped": SearchSettings().label(),
            "shipped_scheduled": shipped_scheduled(), "reached": reached}


def markdown(summary: pd.DataFrame, problem_set: str) -> str:
    """One problem set's summary as a Markdown table: per contender and concurrency, the median fraction of the
    grid's trial-epochs to reach its best and the share of runs that did (the README's tournament table)."""
    sub = summary[summary["problem_set"] == problem_set]
    concs = sorted(sub["concurrency"].unique())
    lines = ["| contender | " + " | ".join(f"concurrency {c}" for c in concs) + " | stopped best (8) |",
             "|---" * (len(concs) + 2) + "|"]
    for name, g in sub.groupby("searcher", sort=True):
        cells = []
        for c in concs:
            r = g[g["concurrency"] == c]
            if r.empty:
                cells.append("")
                continue
            r0 = r.iloc[0]
            med = r0["fraction_to_best_median"]
            cells.append(f"{med:.3f} ({r0['reached_best']:.0%})" if math.isfinite(med)
                         else f"- ({r0['reached_best']:.0%})")
        at8 = g[g["concurrency"] == 8]
        stopped = f"{at8.iloc[0]['stopped_best']:.0%}" if not at8.empty else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {stopped} |")
    return "\n".join(lines)


def run_summarise(a: argparse.Namespace) -> dict[str, Any]:
    """Several replays' ``runs.csv`` (e.g. a tournament run in parts) summarised as one."""
    parts = []
    for d in a.runs:
        path = Path(d) / "runs.csv" if Path(d).is_dir() else Path(d)
        if not path.exists():
            raise SystemExit(f"{path}: no runs.csv (the --out of a replay)")
        parts.append(pd.read_csv(path))
    runs = pd.concat(parts, ignore_index=True)
    key = ["problem_set", "family", "machine_type", "contender", "concurrency", "seed"]
    runs = runs.drop_duplicates(key, keep="last")  # a later part's rerun of a replay wins
    runs["fraction_to_best"] = runs["fraction_to_best"].astype(float)  # CSV writes a never-reached run as inf
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out / "runs.csv", index=False)
    result = report(runs, out, a.tolerance)
    if a.markdown:
        summary = pd.read_csv(out / "summary.csv")
        for pset in summary["problem_set"].unique():
            print(f"\n{pset}: median fraction of the grid's trial-epochs to finish its best (share of runs that did)\n")
            print(markdown(summary, pset))
        print()
    return result


def tournament_tables(surrogate: str, out: Path, tasks: list[str] | None) -> Path:
    """LCBench grid tables built from the YAHPO Gym surrogate in ``surrogate`` (``benchmarks/lcbench.py``)."""
    import lcbench

    lcbench.write_tables(surrogate, out, tasks or lcbench.TASKS)
    return out


def _iqr(r: dict, key: str) -> str:
    return f"{r[key + '_median']:.3f} [{r[key + '_q25']:.3f}, {r[key + '_q75']:.3f}]"


# ---------------------------------------------------------------------- record
def parse_grid(items: Sequence[str]) -> dict[str, list]:
    """``lr=1e-4,1e-3 batch_size=128,256`` as grid axes (values read as YAML scalars)."""
    grid = {}
    for item in items:
        key, _, values = item.partition("=")
        parsed = [yaml.safe_load(v) for v in values.split(",")]
        grid[key] = [float(v) if isinstance(v, str) and _is_float(v) else v for v in parsed]  # YAML 1.1 reads 1e-4 as text
    return grid


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def recorded_table(exp: Path, board: pd.DataFrame, family: str, grid: dict[str, list], metric: str,
                   epochs: int) -> pd.DataFrame:
    """Every trial's selection value after each epoch (Tune's ``result.json``) and its report-half value (the
    leaderboard), one row per (machine type, configuration, epoch)."""
    report_col = metric.replace("sel_", "report_", 1)
    report = dict(zip(board["trial_id"], board[report_col])) if report_col in board else {}
    combos = list(itertools.product(*grid.values()))
    rows, missing = [], []
    for f in sorted(exp.glob(f"{artifacts.STUDIES_DIR}/*__{family}/*/result.json")):
        lines = [r for r in map(_json_line, f.read_text().splitlines()) if r]
        if not lines:
            continue
        mt = f.parent.parent.name.split("__")[0]
        params = lines[0]["config"]
        cid = next(i for i, combo in enumerate(combos) if all(_same(params[k], v) for k, v in zip(grid, combo)))
        values = {int(r.get("epoch", r["training_iteration"])): r[metric] for r in lines if metric in r}
        if sorted(values) != list(range(1, epochs + 1)):
            missing.append(f"{mt} {params}: epochs {sorted(values)}")
            continue
        for e, v in sorted(values.items()):
            rows.append({"family": family, "machine_type": mt, "config": cid,
                         **{HP + k: val for k, val in zip(grid, combos[cid])}, "epoch": e, "metric": metric, "sel": v,
                         "report_final": report.get(lines[0]["trial_id"], math.nan)})
    if missing:
        raise RuntimeError("trials without a complete learning curve (rerun them):\n  " + "\n  ".join(missing))
    return pd.DataFrame(rows).sort_values(["machine_type", "config", "epoch"]).reset_index(drop=True)


def _json_line(line: str) -> dict | None:
    """One result line; ``None`` for a blank or partly written one."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def record_preset(base_preset: str, name: str, grids: dict[str, dict[str, list]], epochs: int,
                  machine_types: list[str] | None, fixed: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record run's preset: the base preset's data and features, one grid per family (and the ``fixed``
    keys), no scheduler."""
    base = yaml.safe_load((SEARCH_SPACES / f"{base_preset}.yaml").read_text())
    body = {k: v for k, v in base.items() if k not in ("families", "scheduler", "search", "name", "description")}
    body.update(name=name, description="benchmarks/search_efficiency.py record: one grid per family",
                search={"algorithm": "grid"}, scheduler={"type": "none"},
                families={f: {"epochs": epochs, "space": {**(fixed or {}), **{k: {"choice": v} for k, v in g.items()}}}
                          for f, g in grids.items()})
    if machine_types:
        body["machine_types"] = machine_types
    return body


def run_record(a: argparse.Namespace, extra: list[str]) -> None:
    """One grid search over every family (their studies share the cluster), then one table per family."""
    if a.grid and len(a.families) != 1:
        raise SystemExit("--grid gives one family's grid: name one family with it")
    grids = {f: parse_grid(a.grid) if a.grid else DEFAULT_GRIDS.get(f, {}) for f in a.families}
    for f, grid in grids.items():
        if not grid:
            raise SystemExit(f"no default grid for {f}: give --grid key=v1,v2 ... (one family at a time)")
    name = a.name
    fixed = {k: v[0] for k, v in parse_grid(a.set).items()}
    body = record_preset(a.preset, name, grids, a.epochs, a.machine_types, fixed)
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    preset = work / f"{name}.yaml"
    preset.write_text(yaml.safe_dump(body, sort_keys=False))
    results = work / "results" / name
    cmd = [sys.executable, "-m", "raysd.search", str(preset), "--storage-path", str(work / "experiments"),
           "--results-dir", str(results), *extra]
    print("running: " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    board = pd.read_csv(results / "leaderboard.csv")
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for family, grid in grids.items():
        table = recorded_table(work / "experiments" / name, board, family, grid, body.get("metric", "sel_auc"), a.epochs)
        out = out_dir / f"search_{family}.csv.gz"
        write_table(table, out)
        mts = sorted(table["machine_type"].unique())
        about = {"preset": a.preset, "grid": grid, "fixed": fixed, "epochs": a.epochs, "machine_types": mts,
                 "configurations": len(list(itertools.product(*grid.values()))),
                 "records": [{"command": " ".join(["python", "benchmarks/search_efficiency.py", *sys.argv[1:]]),
                              "machine_types": mts, "search_seconds_all_families": round(seconds),
                              "recorded": time.strftime("%Y-%m-%d")}]}
        atomic_write_text(about_path(out), json.dumps(about, indent=1) + "\n")
        print(f"{out}: {len(table)} rows ({about['configurations']} configurations x {a.epochs} epochs x "
              f"{len(about['machine_types'])} machine types)")
    print(f"search of {len(grids)} famil(ies) in {seconds:.0f}s")


def write_table(table: pd.DataFrame, path: Path) -> None:
    """Gzipped CSV without a time stamp or file name in its header, so the same rows give the same bytes."""
    with atomic_path(path) as tmp, open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb",
                                                                          mtime=0) as gz:
        gz.write(table.to_csv(index=False).encode())


def read_about(table: Path) -> dict:
    """The ``.json`` beside a table, or an error naming it."""
    path = about_path(table)
    try:
        about = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: cannot read the record's description beside {table.name} ({e})") from None
    if not isinstance(about, dict):
        raise SystemExit(f"{path}: expected a JSON object, got {type(about).__name__}")
    return about


def about_path(table: Path) -> Path:
    return table.with_name(table.name.replace(".csv.gz", ".json"))


def records_of(about: dict) -> list[dict]:
    """The record runs a table's ``.json`` lists (a table recorded before ``merge`` existed holds one, inline)."""
    if "records" in about:
        return list(about["records"])
    return [{k: about[k] for k in ("command", "machine_types", "search_seconds_all_families", "recorded") if k in about}]


def merge_tables(src: Path, dest: Path) -> list[Path]:
    """Add the machine types of the tables in ``src`` (a second ``record --out-dir``) to those in ``dest``: one
    table per family, as the replay reads it (rows grouped by machine type). Refuses a table recorded with another
    grid, fixed keys, epochs or preset, or a machine type that ``dest`` already holds."""
    merged = []  # every family checked before any table is written
    for table_path in sorted(src.glob("search_*.csv.gz")):
        target = dest / table_path.name
        if not target.exists():
            raise SystemExit(f"{target}: no table to merge {table_path} into (copy it instead)")
        new, new_about = pd.read_csv(table_path), read_about(table_path)
        old, old_about = pd.read_csv(target), read_about(target)
        for key in ("preset", "grid", "fixed", "epochs", "configurations"):
            if not _same(old_about.get(key), new_about.get(key)):
                raise SystemExit(f"{table_path}: its {key!r} is {new_about.get(key)!r}, but {target} was recorded "
                                 f"with {old_about.get(key)!r}; tables merge only when recorded alike")
        both = sorted(set(old["machine_type"]) & set(new["machine_type"]))
        if both:
            raise SystemExit(f"{target} already holds machine type(s) {', '.join(both)} that {table_path} holds too")
        table = pd.concat([old, new], ignore_index=True).sort_values(["machine_type", "config", "epoch"])
        about = {**old_about, "machine_types": sorted(table["machine_type"].unique()),
                 "records": records_of(old_about) + records_of(new_about)}
        for key in ("command", "search_seconds_all_families", "recorded"):
            about.pop(key, None)
        merged.append((target, table, about))
    if not merged:
        raise SystemExit(f"{src}: no search_*.csv.gz to merge")
    for target, table, about in merged:
        write_table(table, target)
        atomic_write_text(about_path(target), json.dumps(about, indent=1) + "\n")
        print(f"{target}: {len(table)} rows, machine types {', '.join(about['machine_types'])}")
    return [target for target, _, _ in merged]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    if not argv or argv[0] not in ("record", "replay", "fabricate", "merge", "summarise"):
        argv = ["replay", *argv]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="train the grid once through raysd.search and write its table")
    rec.add_argument("--families", nargs="+", default=list(DEFAULT_GRIDS),
                     help=f"default: {' '.join(DEFAULT_GRIDS)} (36 configurations each)")
    rec.add_argument("--grid", nargs="+", help="one family's axes, key=v1,v2,... (default: the family's built-in grid)")
    rec.add_argument("--name", default="search_efficiency", help="the experiment's name")
    rec.add_argument("--epochs", type=int, default=6)
    rec.add_argument("--set", nargs="*", default=DEFAULT_FIXED,
                     help=f"fixed keys of every family, key=value (default: {' '.join(DEFAULT_FIXED)})")
    rec.add_argument("--preset", default="demo", help="the preset whose data and features to use (default demo)")
    rec.add_argument("--machine-types", nargs="+", help="default: the preset's")
    rec.add_argument("--work", default="experiments/search_efficiency_record", help="the record run's experiment and reports")
    rec.add_argument("--out-dir", default=str(TABLES), help="where search_<family>.csv.gz go (default benchmarks/tables)")
    rep = sub.add_parser("replay", help="replay the searchers on the tables (the default)")
    rep.add_argument("--tables", nargs="+", default=[str(TABLES / "search_*.csv.gz")])
    rep.add_argument("--searchers", nargs="+", default=SEARCHERS,
                     help="algorithms, variants like tpe:warm_start=4, bohb (Ray's TuneBOHB with HyperBandForBOHB), or "
                          "topk (train every configuration one epoch, then the best to the end)")
    rep.add_argument("--schedulers", nargs="+", default=["none", "asha"], choices=tournament.SCHEDULERS)
    rep.add_argument("--tournament", action="store_true",
                     help=f"every contender: searchers {' '.join(TOURNAMENT)}, every scheduler")
    rep.add_argument("--lcbench", metavar="DIR", help="add LCBench grid tables built from the YAHPO Gym surrogate in "
                                                      "DIR (yahpo_data/lcbench; benchmarks/lcbench.py)")
    rep.add_argument("--lcbench-tasks", nargs="+", help="OpenML task ids (default: benchmarks/lcbench.py's 24)")
    rep.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    rep.add_argument("--seeds", type=int, default=30)
    rep.add_argument("--budget", type=float, default=1.0, help="trial-epochs, as a fraction of the grid's")
    rep.add_argument("--pick-at", type=float, default=1 / 3, help="the pick's budget, as a fraction of the budget")
    rep.add_argument("--tolerance", type=float, default=0.005)
    rep.add_argument("--grace-period", type=int, default=Scheduler.model_fields["grace_period"].default)
    rep.add_argument("--reduction-factor", type=int, default=Scheduler.model_fields["reduction_factor"].default)
    rep.add_argument("--categorical", action="store_true",
                     help="search every axis as a choice (default: float axes log-uniform over the grid's range)")
    rep.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    rep.add_argument("--out", default="results/search_efficiency")
    summ = sub.add_parser("summarise", help="summarise several replays' runs.csv as one (a tournament run in parts)")
    summ.add_argument("runs", nargs="+", help="replay --out folders or their runs.csv")
    summ.add_argument("--tolerance", type=float, default=0.005, help="the --tolerance the replays used")
    summ.add_argument("--out", default="results/search_efficiency")
    summ.add_argument("--markdown", action="store_true", help="also print each problem set's table as Markdown")
    mer = sub.add_parser("merge", help="add the machine types of another record's tables to the committed ones")
    mer.add_argument("src", help="the other record's --out-dir")
    mer.add_argument("--into", default=str(TABLES), help="the tables to extend (default benchmarks/tables)")
    fab = sub.add_parser("fabricate", help="write made-up tables (a known best) to try the replay")
    fab.add_argument("--out", required=True)
    fab.add_argument("--epochs", type=int, default=8)
    a = p.parse_args(argv)
    if a.command == "replay" and a.tournament:
        a.searchers, a.schedulers = TOURNAMENT, list(tournament.SCHEDULERS)
    if a.command == "record":
        run_record(a, extra)
    elif a.command == "merge":
        merge_tables(Path(a.src), Path(a.into))
    elif a.command == "fabricate":
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        for fam, axes in DEFAULT_GRIDS.items():
            fabricate(fam, ["fan", "valve"], axes, a.epochs, seed=len(fam)).to_csv(out / f"search_{fam}.csv.gz", index=False)
        print(f"made-up tables in {out}: replay them with --tables '{out}/search_*.csv.gz'")
    elif a.command == "summarise":
        print(json.dumps(run_summarise(a)))
    else:
        print(json.dumps(run_replay(a)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
