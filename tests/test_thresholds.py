"""thresholds.json: written, read, checked row by row, looked up by budget; the runner's twins answer alike."""

import json

import pytest

from src.deploy.runner import threshold_rows, thresholds_for_budget
from src.thresholds import read_thresholds, thresholds_for, write_thresholds


def test_thresholds_by_budget():
    table = [(1.0, [0.9, 0.8, 0.0]), (2.0, [0.8, 0.7, 0.0]), (3.0, [0.7, 0.6, 0.0])]
    assert thresholds_for(table, 2.5) == [0.8, 0.7, 0.0]
    assert thresholds_for(table, 3.0) == [0.7, 0.6, 0.0]
    with pytest.raises(ValueError, match="smallest solved is 1"):
        thresholds_for(table, 0.5)


def test_the_runner_picks_the_thresholds_the_library_picks(tmp_path):
    """The runner's threshold lookup is a deliberate copy (runner.py stays one self-contained file) of src.thresholds':
    from the same rows (unsorted, with an int budget, as a thresholds file may hold them), read as eval.py's
    thresholds.json and as export's manifest, both give identical thresholds for every budget: each solved one,
    a hair either side of it (within and beyond the 1e-12 slack), between rows and above the largest; below the
    smallest both refuse."""
    rows = [{"budget_gflops": 2.5, "thresholds": [0.7, 0.6, 0.0]}, {"budget_gflops": 1, "thresholds": [0.95, 0.9, 0]},
            {"budget_gflops": 1.75, "thresholds": [0.8, 0.75, 0.0]}]
    path = tmp_path / "thresholds.json"
    path.write_text(json.dumps({"model": "m", "budgets": rows}))
    table = read_thresholds(str(path), 3)
    manifest = {"thresholds": [{"budget_gflops": b, "thresholds": t} for b, t in table]}  # as export.py writes it
    solved = [1.0, 1.75, 2.5]
    budgets = [b + d for b in solved for d in (0.0, 5e-13, -5e-13, 1e-9, -1e-9)] + [1.3, 2.0, 3.0, 1e6, 0.5, 1e-6]

    def pick(lookup, budget: float):
        try:
            return lookup(budget)
        except ValueError as err:
            assert "no thresholds" in str(err)
            return "refused"

    for budget in budgets:
        expected = pick(lambda b: thresholds_for(table, b), budget)
        assert pick(lambda b: thresholds_for_budget(manifest, b), budget) == expected, budget
        assert pick(lambda b: thresholds_for_budget({"thresholds": rows}, b), budget) == expected, budget
    assert [b for b in budgets if pick(lambda b: thresholds_for(table, b), b) == "refused"] == [1.0 - 1e-9, 0.5, 1e-6]
    assert thresholds_for(table, 1.75 - 5e-13) == [0.8, 0.75, 0.0] and thresholds_for(table, 1.3) == [0.95, 0.9, 0.0]
    assert thresholds_for(table, 2.5 - 1e-9) == [0.8, 0.75, 0.0] and thresholds_for(table, 1e6) == [0.7, 0.6, 0.0]


def test_threshold_table_is_checked_where_it_is_read(tmp_path):
    path = str(tmp_path / "thresholds.json")

    def table(rows) -> str:
        with open(path, "w") as handle:
            json.dump({"model": "m", "budgets": rows}, handle)
        return path

    good = [{"budget_gflops": 2.0, "thresholds": [0.8, 0.7, 0.0]}, {"budget_gflops": 1.0, "thresholds": [0.9, 0.8, 0]}]
    assert read_thresholds(table(good), 3) == [(1.0, [0.9, 0.8, 0.0]), (2.0, [0.8, 0.7, 0.0])]
    for values in ([0.5], [0.5, 0.4, 0.3, 0.2, 0.0]):
        with pytest.raises(ValueError, match=rf"^{path}: row 2 \(1 GFLOPs\) holds {len(values)} threshold\(s\) "
                                             "for 3 exits: give one per exit"):
            read_thresholds(table([good[0], {"budget_gflops": 1.0, "thresholds": values}]), 3)
    cases = {"budget": [{"budget_gflops": "cheap", "thresholds": [0.9, 0.8, 0.0]}],
             "nan": [{"budget_gflops": 1.0, "thresholds": [float("nan"), 0.8, 0.0]}],
             "keys": [{"thresholds": [0.9, 0.8, 0.0]}], "rows": {"budget_gflops": 1.0},
             "huge": [{"budget_gflops": 10**400, "thresholds": [0.9, 0.8, 0.0]}],
             "huge threshold": [{"budget_gflops": 1.0, "thresholds": [10**400, 0.8, 0.0]}]}
    messages = {"budget": "row 1: budget_gflops must be a positive finite number, not 'cheap'",
                "nan": r"row 1 \(1 GFLOPs\): thresholds must be a list of finite numbers",
                "keys": "row 1 must hold 'budget_gflops' and 'thresholds'", "rows": "must be a list of rows, not dict",
                "huge": "row 1: budget_gflops must be a positive finite number, not 1000",
                "huge threshold": r"row 1 \(1 GFLOPs\): thresholds must be a list of finite numbers"}
    for case, rows in cases.items():
        with pytest.raises(ValueError, match=messages[case]):
            read_thresholds(table(rows), 3)
    with pytest.raises(ValueError, match="holds no thresholds"):
        read_thresholds(table([]), 3)
    with open(path, "w") as handle:
        handle.write('{"budgets": [')
    with pytest.raises(ValueError, match=f"^cannot read thresholds file {path}: "):
        read_thresholds(path, 3)
    with open(path, "w") as handle:
        json.dump([1, 2], handle)
    with pytest.raises(ValueError, match="is not a thresholds file: it lacks 'budgets'"):
        read_thresholds(path, 3)
    with pytest.raises(FileNotFoundError, match="thresholds file not found"):
        read_thresholds(str(tmp_path / "none.json"), 3)


def test_what_eval_writes_reads_back(tmp_path):
    curve = [{"budget_gflops": 2.0, "expected_gflops": 1.9, "top1": 71.5, "thresholds": [0.8, 0.7, 0.0]},
             {"budget_gflops": 1.0, "expected_gflops": 0.98, "top1": 60.25, "thresholds": [0.9, 0.85, 0.0]}]
    path = write_thresholds(curve, {"model": "m", "exit_gflops": [0.5, 1.5, 3.0]}, str(tmp_path))
    assert path == str(tmp_path / "thresholds.json")
    content = json.loads((tmp_path / "thresholds.json").read_text())
    assert content["model"] == "m" and content["exit_gflops"] == [0.5, 1.5, 3.0]
    assert [row["top1"] for row in content["budgets"]] == [71.5, 60.25]
    assert read_thresholds(path, 3) == [(1.0, [0.9, 0.85, 0.0]), (2.0, [0.8, 0.7, 0.0])]


def test_threshold_rows_sorts_good_rows_and_names_the_file_for_bad_ones():
    """The one row check, the runner's, which read_thresholds uses too: a table by increasing budget, or a
    ValueError naming the file."""
    cases = [[{"budget_gflops": 2, "thresholds": [0.8, 0, 0.0]}, {"budget_gflops": 1.5, "thresholds": [1, 0.5, 0]}],
             [], {"budget_gflops": 1.0}, [[1.0, [0.9, 0.8, 0.0]]], [{"thresholds": [0.9, 0.8, 0.0]}],
             [{"budget_gflops": True, "thresholds": [0.9, 0.8, 0.0]}], [{"budget_gflops": -1, "thresholds": [0, 0, 0]}],
             [{"budget_gflops": 10**400, "thresholds": [0.9, 0.8, 0.0]}],
             [{"budget_gflops": 1.0, "thresholds": [float("inf"), 0.8, 0.0]}],
             [{"budget_gflops": 1.0, "thresholds": "0.9 0.8 0"}], [{"budget_gflops": 1.0, "thresholds": [0.9, 0.0]}]]

    def outcome(check, rows):
        try:
            return check(rows, 3, "f.json")
        except ValueError as err:
            return str(err)

    outcomes = [outcome(threshold_rows, rows) for rows in cases]
    assert outcomes[:2] == [[(1.5, [1.0, 0.5, 0.0]), (2.0, [0.8, 0.0, 0.0])], []]
    assert all(isinstance(o, str) and o.startswith("f.json: ") for o in outcomes[2:]), outcomes
