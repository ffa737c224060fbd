"""thresholds.json: the exit thresholds solved for each budget, the one file eval.py writes and `--adaptive`,
export.py and the library read.

A row is {"budget_gflops": B, "thresholds": [one per exit]} (eval.py adds expected GFLOPs and top-1); a
budget B picks the row solved for the largest budget that does not exceed B. The rows are checked by
`src/deploy/runner.py`'s `threshold_rows`, which the runner needs too and which must stay in that one
self-contained file; the runner keeps its own lookup, on a manifest rather than a checked table.
"""

from __future__ import annotations

import json
import os

from .atomic import write_json
from .deploy.runner import threshold_rows

FILE_NAME = "thresholds.json"
Table = list[tuple[float, list[float]]]


def write_thresholds(curve: list[dict], meta: dict, output_dir: str) -> str:
    """Write `output_dir`/thresholds.json from the budget curve's rows, with `meta` (model, method, exit costs)."""
    path = os.path.join(output_dir, FILE_NAME)
    content = dict(meta, budgets=[{"budget_gflops": r["budget_gflops"], "thresholds": r["thresholds"],
                                   "expected_gflops": r["expected_gflops"], "top1": r["top1"]} for r in curve])
    write_json(path, content)
    return path


def read_thresholds(path: str, num_exits: int) -> Table:
    """The checked rows of a thresholds.json (FileNotFoundError, or ValueError naming the file and row)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"thresholds file not found: {path} (eval.py writes it: run it without --adaptive "
                                "on the same checkpoint, or give --thresholds_file)")
    try:
        with open(path, encoding="utf-8") as handle:
            content = json.load(handle)
    except (OSError, ValueError) as err:  # ValueError: not JSON, not UTF-8
        raise ValueError(f"cannot read thresholds file {path}: {err}") from err
    if not isinstance(content, dict) or "budgets" not in content:
        raise ValueError(f"{path} is not a thresholds file: it lacks 'budgets' (eval.py writes thresholds.json)")
    table = threshold_rows(content["budgets"], num_exits, path)
    if not table:
        raise ValueError(f"{path} holds no thresholds")
    return table


def thresholds_for(table: Table, budget: float) -> list[float]:
    """The thresholds solved for the largest budget that does not exceed `budget` (1e-12 GFLOPs of slack)."""
    fitting = [thresholds for solved, thresholds in table if solved <= budget + 1e-12]
    if not fitting:
        raise ValueError(f"no thresholds for a budget of {budget:.4g} GFLOPs: the smallest solved is {table[0][0]:.4g}")
    return fitting[-1]
