"""thresholds.json: the exit thresholds solved for each budget, the one file eval.py writes and `--adaptive`,
export.py and the library read.

A row is {"budget_gflops": B, "thresholds": [one per exit]} (eval.py adds expected GFLOPs and top-1); a
budget B picks the row solved for the largest budget that does not exceed B. `src/deploy/runner.py` keeps its
own copy of the row check and the lookup, as it must stay one self-contained file; tests/test_adaptive.py
holds the two to the same answers.
"""

from __future__ import annotations

import json
import math
import os

from .atomic import write_json

FILE_NAME = "thresholds.json"
Table = list[tuple[float, list[float]]]


def write_thresholds(curve: list[dict], meta: dict, output_dir: str) -> str:
    """Write `output_dir`/thresholds.json from the budget curve's rows, with `meta` (model, method, exit costs)."""
    path = os.path.join(output_dir, FILE_NAME)
    content = dict(meta, budgets=[{"budget_gflops": r["budget_gflops"], "thresholds": r["thresholds"],
                                   "expected_gflops": r["expected_gflops"], "top1": r["top1"]} for r in curve])
    write_json(path, content)
    return path


def _finite(value) -> bool:
    """A finite int or float (not a bool, not an int too large for a float)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def check_rows(rows, num_exits: int, source: str) -> Table:
    """(budget, thresholds) by increasing budget from thresholds-by-budget rows; ValueError naming `source` and
    the row when a row lacks a key, holds a budget that is not positive, or not one finite threshold per exit."""
    if not isinstance(rows, list):
        raise ValueError(f"{source}: the thresholds must be a list of rows, not {type(rows).__name__}")
    table = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "budget_gflops" not in row or "thresholds" not in row:
            raise ValueError(f"{source}: row {i} must hold 'budget_gflops' and 'thresholds'")
        budget, values = row["budget_gflops"], row["thresholds"]
        if not _finite(budget) or budget <= 0:
            raise ValueError(f"{source}: row {i}: budget_gflops must be a positive finite number, not {budget!r}")
        if not isinstance(values, list) or not all(_finite(v) for v in values):
            raise ValueError(f"{source}: row {i} ({budget:.4g} GFLOPs): thresholds must be a list of finite numbers")
        if len(values) != num_exits:
            raise ValueError(f"{source}: row {i} ({budget:.4g} GFLOPs) holds {len(values)} threshold(s) for "
                             f"{num_exits} exits: give one per exit (the last exit's is not used)")
        table.append((float(budget), [float(v) for v in values]))
    return sorted(table)


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
    table = check_rows(content["budgets"], num_exits, path)
    if not table:
        raise ValueError(f"{path} holds no thresholds")
    return table


def thresholds_for(table: Table, budget: float) -> list[float]:
    """The thresholds solved for the largest budget that does not exceed `budget` (1e-12 GFLOPs of slack)."""
    fitting = [thresholds for solved, thresholds in table if solved <= budget + 1e-12]
    if not fitting:
        raise ValueError(f"no thresholds for a budget of {budget:.4g} GFLOPs: the smallest solved is {table[0][0]:.4g}")
    return fitting[-1]
