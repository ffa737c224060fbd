"""The path a newcomer walks, with the default paths: train the demo, eval, re-solve, --adaptive, export, runner.

Each command finds what the one before wrote from the run's folder alone: eval writes <run>/eval/, --adaptive and
export read its thresholds.json, export writes <run>/export/, the runner takes that folder.
"""

import glob
import json
import os
import subprocess
import sys

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = ["--config_path", "config/demo.yaml"]
QUICK = ["--progress", "false", "--num_parallel_workers", "1"]


def run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout


def budgets_in(path: str) -> list[float]:
    with open(path) as handle:
        return [row["budget_gflops"] for row in json.load(handle)["budgets"]]


def test_demo_train_eval_adaptive_export_runner_with_default_paths(tmp_path):
    run_dir = str(tmp_path / "demo")
    run("train.py", *DEMO, *QUICK, "--epochs", "1", "--warmup_epochs", "0", "--max_steps_per_epoch", "3",
        "--output_dir", run_dir)
    ckpt = os.path.join(run_dir, "best.ckpt")
    eval_dir = os.path.join(run_dir, "eval")

    run("eval.py", *DEMO, *QUICK, "--checkpoint_path", ckpt, "--budgets", "0.5x,1x", "--calib_size", "64",
        "--save_probs", os.path.join(eval_dir, "probs.npz"))
    first = budgets_in(os.path.join(eval_dir, "thresholds.json"))
    assert len(first) == 2 and os.path.isfile(os.path.join(eval_dir, "budget_curve.csv"))

    again = run("eval.py", "--from_probs", os.path.join(eval_dir, "probs.npz"), "--budgets", "0.3x,0.6x,0.9x")
    aside = glob.glob(os.path.join(run_dir, "eval.replaced-*"))
    assert len(aside) == 1 and f"moved to {aside[0]}" in again
    assert budgets_in(os.path.join(aside[0], "thresholds.json")) == first  # the first solve, kept whole
    assert "probs.npz" not in os.listdir(aside[0])
    assert os.path.isfile(os.path.join(eval_dir, "probs.npz"))  # the input of --from_probs stays where it was
    second = budgets_in(os.path.join(eval_dir, "thresholds.json"))
    assert len(second) == 3

    adaptive = run("eval.py", *DEMO, *QUICK, "--checkpoint_path", ckpt, "--adaptive", "--budget", str(second[1]))
    assert "adaptive inference at" in adaptive and "images/s" in adaptive

    exported = run("export.py", "--ckpt_file", ckpt)  # the model from best.json, thresholds from eval/
    export_dir = os.path.join(run_dir, "export")
    assert f"thresholds: {os.path.join(eval_dir, 'thresholds.json')}" in exported
    with open(os.path.join(export_dir, "manifest.json")) as handle:
        manifest = json.load(handle)
    assert [row["budget_gflops"] for row in manifest["thresholds"]] == second
    assert manifest["class_names"] == [str(digit) for digit in range(10)]

    images = []
    for index in range(3):
        path = str(tmp_path / f"digit{index}.png")
        pixels = np.random.default_rng(index).integers(0, 255, (40, 30, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        images.append(path)
    answer = run("-m", "src.deploy.runner", "--manifest", export_dir, "--budget", str(second[1]), *images)
    lines = [line for line in answer.splitlines() if line.startswith(str(tmp_path))]
    assert len(lines) == 3 and all("exit" in line for line in lines)

    replaced = run("export.py", "--ckpt_file", ckpt)
    assert f"replaced the earlier one in {export_dir}" in replaced
