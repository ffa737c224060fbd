"""eval.py as users run it: a tiny trained DVT on a generated folder, curve files, --from_probs, errors."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from src.budget import confidences, simulate
from src.report import draw_curve, plot_curve, table
from tests.faults import limit_file_size
from tests.helpers import QUIET, make_folder, run_train, synthetic_probs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_aligned(text: str, first: str, rows: int) -> None:
    """The table in `text` whose header starts with the word `first` has `rows` rows under the header, and every
    cell (a run of text two or more spaces from the next) ends where the header's cell ends."""
    lines = text.splitlines()
    block = lines[next(i for i, line in enumerate(lines) if line.split()[:1] == [first]):]
    block = block[:block.index("")] if "" in block else block
    ends = [[m.end() for m in re.finditer(r"\S+(?: \S+)*", line)] for line in block]
    assert len(ends) == rows + 1 and all(row == ends[0] for row in ends), text


def run_eval(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "eval.py", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"eval.py failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    folder = make_folder(tmp / "data", per_class=12, size=(24, 24), modes=("RGB",))
    run_dir = str(tmp / "run")
    model = ["--model", "dvt_tiny_deit", "--dataset", "folder", "--data_path", folder, "--num_classes", "3",
             "--img_size", "16", "--eval_batch_size", "7"]
    run_train(*model, "--batch_size", "6", "--epochs", "3", "--lr", "0.005", "--ema", "false",
              "--output_dir", run_dir)
    return tmp, model, os.path.join(run_dir, "best.ckpt")


def test_eval_writes_the_curve_and_from_probs_reproduces_it(trained):
    tmp, model, ckpt = trained
    out = str(tmp / "out")
    probs = str(tmp / "probs.npz")
    result = run_eval(*model, *QUIET[:2], "--checkpoint_path", ckpt, "--output_dir", out, "--save_probs", probs,
                      "--budgets", "official", "--calib_size", "30")
    assert_aligned(result.stdout, "exit", 3)
    with open(os.path.join(out, "budget_curve.json")) as handle:
        curve = json.load(handle)
    assert len(curve) == 59
    assert set(curve[0]) == {"budget_gflops", "expected_gflops", "top1", "exit_fractions", "thresholds"}
    saved = np.load(probs)
    assert saved["val_probs"].shape == (3, 36, 3) and saved["calib_probs"].shape == (3, 30, 3)
    conf, correct = confidences(saved["val_probs"], saved["val_labels"])
    calib_conf, calib_correct = confidences(saved["calib_probs"], saved["calib_labels"])
    for row in curve:
        # the budget holds on the calibration data the thresholds were solved on
        on_calib = simulate(row["thresholds"], calib_conf, calib_correct, saved["flops"])
        assert on_calib.expected_gflops <= row["budget_gflops"] + 1e-12
        assert row["thresholds"][-1] == 0.0
        again = simulate(row["thresholds"], conf, correct, saved["flops"])
        assert again.top1 == pytest.approx(row["top1"]) and sum(row["exit_fractions"]) == pytest.approx(1.0)
    with open(os.path.join(out, "budget_curve.csv")) as handle:
        assert len(handle.read().strip().splitlines()) == 60
    with open(os.path.join(out, "thresholds.json")) as handle:
        thresholds = json.load(handle)
    assert thresholds["model"] == "dvt_tiny_deit" and len(thresholds["budgets"]) == 59
    assert os.path.isfile(os.path.join(out, "budget_curve.png"))

    again_out = str(tmp / "again")
    run_eval("--from_probs", probs, "--output_dir", again_out, "--budgets", "official")
    with open(os.path.join(again_out, "budget_curve.json")) as handle:
        assert json.load(handle) == curve


def test_eval_errors(trained):
    tmp, model, ckpt = trained
    result = run_eval(*model, "--checkpoint_path", str(tmp / "missing.ckpt"), check=False)
    assert result.returncode == 1 and "checkpoint not found" in result.stderr
    negative = run_eval(*model, "--checkpoint_path", ckpt, "--eval_micro_batch", "-2", check=False)
    assert negative.returncode == 1 and "--eval_micro_batch must be 0 (one graph) or a number" in negative.stderr
    probs = str(tmp / "p.npz")
    run_eval(*model, "--checkpoint_path", ckpt, "--output_dir", str(tmp / "o"), "--save_probs", probs,
             "--budgets", "0.5x", "--calib_size", "12")
    low = run_eval("--from_probs", probs, "--budgets", "0.00001", "--output_dir", str(tmp / "o2"), check=False)
    assert low.returncode == 1 and "below the first exit's cost" in low.stderr
    report = run_eval("--mode", "report", "--checkpoint_path", ckpt)
    assert report.stdout.startswith(f"{ckpt}: dvt_tiny_deit, epoch ") and "; accuracy on 36 validation" in report.stdout
    assert_aligned(report.stdout, "exit", 3)
    with open(ckpt[:-len(".ckpt")] + ".json") as handle:
        top1 = json.load(handle)["val"]["top1"]
    assert [line.split()[2] for line in report.stdout.splitlines()[2:5]] == [f"{t:.2f}" for t in top1]


def test_without_a_recipe_the_checkpoint_json_names_the_model(trained, tmp_path, capsys):
    """eval.py and export.py build the model best.json records (no --model, --num_classes, --img_size given);
    an explicit recipe still wins and its mismatch is named; with neither recipe nor JSON, one line says what
    to pass."""
    import eval as eval_py
    import export

    tmp, model, ckpt = trained
    data = ["--dataset", "folder", "--data_path", model[model.index("--data_path") + 1]]
    result = run_eval(*data, "--checkpoint_path", ckpt, "--output_dir", str(tmp_path / "out"),
                      "--budgets", "0.3x,0.5x,1x", "--calib_size", "12")
    assert_aligned(result.stdout, "exit", 3)
    assert_aligned(result.stdout, "budget", 3)
    with open(tmp_path / "out" / "thresholds.json") as handle:
        assert json.load(handle)["model"] == "dvt_tiny_deit"
    assert export.main(["--ckpt_file", ckpt, "--file_name", str(tmp_path / "export" / "tiny")]) == 0
    with open(tmp_path / "export" / "manifest.json") as handle:
        manifest = json.load(handle)
    assert (manifest["model"], manifest["num_classes"], manifest["grids"]) == ("dvt_tiny_deit", 3, [2, 3, 4])
    assert manifest["preprocess"]["img_size"] == 16
    capsys.readouterr()
    assert eval_py.main(["--config_path", "config/demo.yaml", "--checkpoint_path", ckpt]) == 1
    assert "holds a dvt_tiny_deit model, this run builds dvt_tiny_t2t:" in capsys.readouterr().err
    bare = str(tmp_path / "bare.ckpt")
    shutil.copy(ckpt, bare)
    expected = (f"no --config_path, and no {tmp_path}/bare.json names the model of {bare}: give --config_path "
                "RECIPE (config/*.yaml) or --model NAME")
    assert eval_error(capsys, "--checkpoint_path", bare, *data) == expected
    assert export.main(["--ckpt_file", bare, "--file_name", str(tmp_path / "bare" / "tiny")]) == 1
    assert capsys.readouterr().err == f"export.py: error: {expected}\n"


def test_tables_pad_every_column_to_its_widest_cell():
    curve = [{"budget_gflops": b, "expected_gflops": e, "top1": t, "exit_fractions": f} for b, e, t, f in
             [(0.00038, 0.000386, 96.94, [0.986, 0.014, 0.0]), (0.0006333, 0.0005766, 100.0, [0.8, 0.1, 0.1])]]
    text = table(curve, {"top1": [9.5, 96.94, 100.0], "top5": [99.72, 99.72, 99.16]}, [0.0003646, 0.01, 12.5])
    assert_aligned(text, "exit", 3)
    assert_aligned(text, "budget", 2)


def test_plot_numbers_each_budget_and_keeps_every_label_inside_the_axes():
    rows = [(0.001, 52.4), (0.0017, 54.0), (0.0056, 65.2), (0.0056, 65.2)]  # budgets 3 and 4 reach one point
    curve = [{"expected_gflops": gflops, "top1": top1} for gflops, top1 in rows]
    exit_gflops = [0.0013, 0.0058, 0.011]  # the last exit is the rightmost point, its label the likeliest to clip
    fig = draw_curve(curve, {"top1": [52.4, 64.6, 51.0]}, exit_gflops, "t", backbone=(0.011, 66.0))
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [gflops for gflops, _ in rows])
    labels = [text.get_text() for text in ax.texts]
    assert labels == ["1", "2", "3-4", "exit 1", "exit 2", "exit 3"]
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    legend = ax.get_legend().get_window_extent(renderer)
    for text in ax.texts:
        box = text.get_window_extent(renderer)
        inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        assert inside, f"label {text.get_text()!r} at {box} leaves the axes {frame}"
        assert not box.overlaps(legend), f"label {text.get_text()!r} lies under the legend"


def test_plot_without_matplotlib_says_how(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    curve = [{"expected_gflops": 1.0, "top1": 50.0}]
    assert plot_curve(curve, {"top1": [40.0, 60.0]}, [1.0, 2.0], str(tmp_path), "t") is None
    assert not os.listdir(tmp_path)


def test_adaptive_inference_matches_the_solved_curve(trained):
    tmp, model, ckpt = trained
    out = str(tmp / "one_budget")
    run_eval(*model, "--checkpoint_path", ckpt, "--output_dir", out, "--budgets", "0.4x", "--calib_size", "24")
    with open(os.path.join(out, "budget_curve.json")) as handle:
        (row,) = json.load(handle)
    result = run_eval(*model, "--checkpoint_path", ckpt, "--output_dir", out, "--adaptive",
                      "--budget", repr(row["budget_gflops"]))
    assert f"top-1 {row['top1']:.2f}% on 36 images" in result.stdout
    assert "exit fractions " + " ".join(f"{f:.3f}" for f in row["exit_fractions"]) in result.stdout
    assert re.search(r"images/s, not counting the [0-9.]+ s of compiling the stages' 15 graphs first", result.stdout)
    missing = run_eval(*model, "--checkpoint_path", ckpt, "--output_dir", str(tmp / "none"), "--adaptive",
                       "--budget", "1", check=False)
    assert missing.returncode == 1 and "thresholds file not found" in missing.stderr


def probs_file(path: str, **change) -> str:
    """An --save_probs file of synthetic 3-exit probabilities, with `change` applied to its arrays."""
    val_probs, val_labels = synthetic_probs(60, 3, classes=4, seed=1)
    calib_probs, calib_labels = synthetic_probs(80, 3, classes=4, seed=2)
    arrays = {"val_probs": val_probs, "val_labels": val_labels, "calib_probs": calib_probs,
              "calib_labels": calib_labels, "flops": np.array([0.5, 1.5, 3.0])}
    for key, edit in change.items():
        arrays[key] = edit(arrays[key].copy())
    np.savez(path, model=np.array("m"), **arrays)
    return path


def eval_error(capsys, *args) -> str:
    """eval.py's main in this process: it must return 1 with one line on stderr (an exception would escape)."""
    import eval as eval_py

    assert eval_py.main(list(args)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("eval.py: error: "), err
    return err.strip()[len("eval.py: error: "):]


def with_nan(probs):
    probs[1, 5, 2] = np.nan
    probs[2, 0, 0] = np.inf
    return probs


def test_from_probs_refuses_what_is_not_probabilities(tmp_path, capsys):
    out = ("--output_dir", str(tmp_path / "out"))
    bad = probs_file(str(tmp_path / "nan.npz"), calib_probs=with_nan)
    assert eval_error(capsys, "--from_probs", bad, *out) == f"{bad}: calib_probs holds 2 NaN/Inf value(s) of 960"
    bad = probs_file(str(tmp_path / "neg.npz"), val_probs=lambda p: p - 0.5)
    assert eval_error(capsys, "--from_probs", bad, *out).startswith(f"{bad}: val_probs holds values outside [0, 1]")
    bad = probs_file(str(tmp_path / "flops.npz"), flops=lambda f: f[:2])
    assert "val_probs must be floats (exits=2, samples, classes)" in eval_error(capsys, "--from_probs", bad, *out)
    csv = tmp_path / "probs.csv"
    csv.write_text("0.1,0.9\n0.5,0.5\n")
    message = eval_error(capsys, "--from_probs", str(csv), *out)
    assert message.startswith(f"{csv} is not a probabilities file (.npz of eval.py --save_probs): ")
    npy = str(tmp_path / "probs.npy")
    np.save(npy, np.zeros(3))
    assert eval_error(capsys, "--from_probs", npy, *out).endswith("it holds a single array (.npy)")
    good = probs_file(str(tmp_path / "good.npz"))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(open(good, "rb").read()[:900])
    assert eval_error(capsys, "--from_probs", str(cut), *out).startswith(f"{cut} is not a probabilities file")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("budget", ["nan", "inf", "-1", "0", "cheap", "nanx", "1.5,nan"])
def test_budgets_that_are_not_positive_numbers_are_refused(tmp_path, capsys, budget):
    good = probs_file(str(tmp_path / "good.npz"))
    message = eval_error(capsys, "--from_probs", good, "--budgets", budget, "--output_dir", str(tmp_path / "out"))
    assert message.startswith("cannot read budget '") and "give positive GFLOPs" in message
    assert not os.path.exists(tmp_path / "out")


def test_adaptive_refuses_bad_budgets_and_thresholds_rows(tmp_path, capsys):
    import mindspore as ms

    from src.models import create_model

    ckpt = str(tmp_path / "tiny.ckpt")
    ms.save_checkpoint(create_model("dvt_tiny_t2t"), ckpt)
    table = str(tmp_path / "thresholds.json")
    args = ("--config_path", "config/demo.yaml", "--checkpoint_path", ckpt, "--adaptive", "--thresholds_file", table)
    for budget in ("nan", "inf", "-2", "x"):
        assert eval_error(capsys, *args, "--budget", budget) == f"--budget must be a positive number of GFLOPs, " \
                                                               f"not {budget!r}"
    for row in ([0.5], [0.5, 0.4, 0.3, 0.2, 0.0]):
        with open(table, "w") as handle:
            json.dump({"budgets": [{"budget_gflops": 0.001, "thresholds": row}]}, handle)
        assert eval_error(capsys, *args, "--budget", "1") == (f"{table}: row 1 (0.001 GFLOPs) holds {len(row)} "
                                                              "threshold(s) for 3 exits: give one per exit (the "
                                                              "last exit's is not used)")


def test_report_of_a_converted_checkpoint_is_a_table(tmp_path, capsys):
    import mindspore as ms

    import eval as eval_py
    from src.models import create_model

    ckpt = str(tmp_path / "dvt_tiny.ckpt")
    ms.save_checkpoint(create_model("dvt_tiny_t2t"), ckpt)
    with open(tmp_path / "dvt_tiny.json", "w") as handle:  # older converters' keys, the official release's records
        json.dump({"arch": "dvt_tiny_t2t", "analytic_gflops": [0.0003646, 0.001903, 0.003167],
                   "flops": [0.1, 0.3, 0.7], "anytime_classification": [60.0, 65.5, 70.25],
                   "budgeted_batch_classification": [[0.2, 0.4], [61.0, 66.0]]}, handle)
    assert eval_py.main(["--mode", "report", "--checkpoint_path", ckpt]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{ckpt}: dvt_tiny_t2t\nexit")
    assert_aligned(out, "exit", 3)
    assert out.splitlines()[2].split() == ["1", "0.0003646", "0.1", "60.00"]
    assert_aligned(out, "GFLOPs", 2)
    assert out.rstrip().endswith(f"all of it, as JSON: {tmp_path}/dvt_tiny.json")


def test_report_on_a_damaged_checkpoint_names_it(trained, tmp_path, capsys):
    _, _, ckpt = trained
    cut = str(tmp_path / "cut.ckpt")
    with open(ckpt, "rb") as handle:
        data = handle.read()
    with open(cut, "wb") as handle:
        handle.write(data[: len(data) // 2])
    assert eval_error(capsys, "--mode", "report", "--checkpoint_path", cut).startswith(f"cannot read checkpoint {cut}")
    whole = str(tmp_path / "whole.ckpt")
    with open(whole, "wb") as handle:
        handle.write(data)
    with open(os.path.join(tmp_path, "whole.json"), "w") as handle:
        handle.write('{"model": "dvt_ti')
    assert eval_error(capsys, "--mode", "report", "--checkpoint_path", whole).startswith(
        f"cannot read {tmp_path}/whole.json")


def test_a_failed_write_is_one_line_and_leaves_no_partial_file(tmp_path):
    good = probs_file(str(tmp_path / "good.npz"))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "eval.py", "--from_probs", good, "--budgets", "official",
                             "--output_dir", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            preexec_fn=limit_file_size(2000))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr == f"eval.py: error: cannot write {out}/budget_curve.json: [Errno 27] File too large\n"
    assert os.listdir(out) == []
