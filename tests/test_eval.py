"""eval.py as users run it: a tiny trained DVT on a generated folder, curve files, --from_probs, errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from src.budget import confidences, simulate
from src.report import plot_curve
from tests.test_data import make_folder
from tests.test_train import QUIET, run_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    assert "exit  GFLOPs   top-1   top-5" in result.stdout
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
    probs = str(tmp / "p.npz")
    run_eval(*model, "--checkpoint_path", ckpt, "--output_dir", str(tmp / "o"), "--save_probs", probs,
             "--budgets", "0.5x", "--calib_size", "12")
    low = run_eval("--from_probs", probs, "--budgets", "0.00001", "--output_dir", str(tmp / "o2"), check=False)
    assert low.returncode == 1 and "below the first exit's cost" in low.stderr
    report = run_eval("--mode", "report", "--checkpoint_path", ckpt)
    assert '"model": "dvt_tiny_deit"' in report.stdout and '"exit_gflops"' in report.stdout


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
    missing = run_eval(*model, "--checkpoint_path", ckpt, "--output_dir", str(tmp / "none"), "--adaptive",
                       "--budget", "1", check=False)
    assert missing.returncode == 1 and "thresholds file not found" in missing.stderr
