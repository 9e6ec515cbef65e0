"""LCBench grid tables for the search replay, from the YAHPO Gym surrogate of LCBench.

LCBench (Zimmer, Lindauer and Hutter, "Auto-PyTorch Tabular", TPAMI 2021) trained funnel-shaped MLPs with 7
hyperparameters on 35 OpenML data sets and recorded 52 epochs of learning curves. YAHPO Gym (Pfisterer et al.,
"YAHPO Gym - An Efficient Multi-Objective Multi-Fidelity Benchmark for Hyperparameter Optimization", AutoML-Conf
2022) fits one surrogate network to those curves and ships it as an ONNX file (Apache-2.0). This module evaluates
that file with onnxruntime (no ``yahpo-gym``, which pins numpy < 2) and writes, per task, a grid table in the
replay's layout (``benchmarks/search_efficiency.py``: columns ``family, machine_type, config, hp_*, epoch, metric,
sel, report_final``): :data:`GRID`'s configurations, validation accuracy (0-1) at every 4th epoch from
:data:`FIRST_EPOCH`, and the last epoch's test balanced accuracy as the report figure.

Get the surrogate (about 2 MB) once, outside the repository::

    git clone --depth 1 https://github.com/slds-lmu/yahpo_data /tmp/yahpo_data
    python benchmarks/lcbench.py --surrogate /tmp/yahpo_data/lcbench --out /tmp/lcbench_tables

The surrogate takes raw hyperparameter values (``x_cont``: epoch, batch size, learning rate, momentum, weight decay,
layers, units, dropout) and the task's code from ``encoding.json`` (``x_cat``), and returns time, validation
accuracy (percent), validation cross-entropy, validation balanced accuracy, test cross-entropy and test balanced
accuracy; every scaling is inside the graph. Epoch 1 is the untrained network and epoch 52 repeats 51, so the
fidelity runs from 2 to 51, as its authors advise.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd

CONT = ["epoch", "batch_size", "learning_rate", "momentum", "weight_decay", "num_layers", "max_units", "max_dropout"]
OUTPUTS = ["time", "val_accuracy", "val_cross_entropy", "val_balanced_accuracy", "test_cross_entropy",
           "test_balanced_accuracy"]
# 5 x 3 x 2 x 2 x 2 x 2 = 240 configurations of 6 hyperparameters; dropout fixed.
GRID: dict[str, list] = {
    "learning_rate": [1e-4, 5.6e-4, 3.2e-3, 1.8e-2, 1e-1],
    "weight_decay": [1e-5, 1e-3, 1e-1],
    "batch_size": [32, 256],
    "momentum": [0.5, 0.95],
    "num_layers": [1, 4],
    "max_units": [64, 512],
}
FIXED = {"max_dropout": 0.2}
FIRST_EPOCH, EVERY, LAST_EPOCH = 3, 4, 51  # epochs 3, 7, ..., 51: 13 points of each curve
# 24 of LCBench's 34 OpenML tasks (the first 24 by id in the surrogate's encoding, skipping 167083, which it
# encodes but has no data for).
TASKS = ["3945", "7593", "34539", "126025", "126026", "126029", "146212", "167104", "167149", "167152", "167161",
         "167168", "167181", "167184", "167185", "167190", "167200", "167201", "168329", "168330", "168331", "168335",
         "168868", "168908"]


class Surrogate:
    """The LCBench surrogate network: :meth:`predict` gives every output for configurations x epochs of a task."""

    def __init__(self, folder: str | Path, threads: int = 1):
        import onnxruntime

        folder = Path(folder)
        missing = [f for f in ("model.onnx", "encoding.json") if not (folder / f).is_file()]
        if missing:
            raise SystemExit(f"{folder}: no {' or '.join(missing)}; fetch the surrogate first (git clone --depth 1 "
                             "https://github.com/slds-lmu/yahpo_data, then --surrogate yahpo_data/lcbench)")
        self.codes: dict[str, int] = json.loads((folder / "encoding.json").read_text())["OpenML_task_id"]
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(folder / "model.onnx"), sess_options=options,
                                                    providers=["CPUExecutionProvider"])

    def predict(self, task: str, configs: list[dict], epochs: list[int]) -> np.ndarray:
        """(configurations, epochs, outputs) in :data:`OUTPUTS`' order."""
        if task not in self.codes:
            raise SystemExit(f"task {task!r} is not in the surrogate's encoding.json; known: {sorted(self.codes)}")
        x_cont = np.asarray([[e, *(c[k] for k in CONT[1:])] for c in configs for e in epochs], dtype=np.float32)
        x_cat = np.full((len(x_cont), 1), self.codes[task], dtype=np.int32)
        (out,) = self.session.run(["output"], {"x_cat": x_cat, "x_cont": x_cont})
        return out.reshape(len(configs), len(epochs), len(OUTPUTS))


def grid_configs(grid: dict[str, list] = GRID) -> list[dict]:
    return [{**dict(zip(grid, values)), **FIXED} for values in itertools.product(*grid.values())]


def table(surrogate: Surrogate, task: str, grid: dict[str, list] = GRID) -> pd.DataFrame:
    """One task's grid table in the replay's layout (module docstring)."""
    configs = grid_configs(grid)
    epochs = list(range(FIRST_EPOCH, LAST_EPOCH + 1, EVERY))
    out = surrogate.predict(task, configs, epochs)
    val = out[:, :, OUTPUTS.index("val_accuracy")] / 100.0
    report = out[:, -1, OUTPUTS.index("test_balanced_accuracy")]
    rows = [{"family": "lcbench", "machine_type": f"task{task}", "config": i,
             **{f"hp_{k}": c[k] for k in grid}, "epoch": j + 1, "metric": "val_accuracy", "sel": float(val[i, j]),
             "report_final": float(report[i])}
            for i, c in enumerate(configs) for j in range(len(epochs))]
    return pd.DataFrame(rows)


def write_tables(surrogate_dir: str | Path, out: str | Path, tasks: list[str] = TASKS) -> list[Path]:
    """``lcbench_<task>.csv.gz`` under ``out`` for every task; returns their paths."""
    surrogate = Surrogate(surrogate_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for task in tasks:
        path = out / f"lcbench_{task}.csv.gz"
        table(surrogate, task).to_csv(path, index=False)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--surrogate", required=True, help="the yahpo_data/lcbench folder (model.onnx, encoding.json)")
    p.add_argument("--out", required=True, help="where lcbench_<task>.csv.gz go")
    p.add_argument("--tasks", nargs="+", default=TASKS, help=f"OpenML task ids (default: {len(TASKS)} tasks)")
    a = p.parse_args(argv)
    paths = write_tables(a.surrogate, a.out, a.tasks)
    n = len(grid_configs())
    print(f"{len(paths)} tables of {n} configurations x {len(range(FIRST_EPOCH, LAST_EPOCH + 1, EVERY))} epochs in "
          f"{a.out}: replay them with --tables '{a.out}/lcbench_*.csv.gz'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
