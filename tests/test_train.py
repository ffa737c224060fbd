"""train.py end to end, as users run it: subprocesses on generated data, resume after SIGKILL, msrun."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import mindspore as ms
import numpy as np
import pytest

from src.engine.checkpoint import load_model_weights
from src.models import create_model
from tests.test_data import make_folder, truncate, write_cifar10

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
# A tiny deterministic recipe: no augmentation, no mixing, no stochastic depth.
QUIET = ["--progress", "false", "--num_parallel_workers", "1", "--auto_augment", "null", "--re_prob", "0",
         "--mixup", "0", "--cutmix", "0", "--drop_path_rate", "0", "--device_target", "CPU", "--cooldown_epochs", "0",
         "--warmup_epochs", "0"]


def run_train(*args, check=True, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run([PYTHON, "train.py", *QUIET, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-3000:]}")
    return result


def records(run_dir: str, kind: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as handle:
        return [r for r in map(json.loads, handle) if r["type"] == kind]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return make_folder(tmp_path_factory.mktemp("folder"), per_class=16, size=(24, 24), modes=("RGB", "L"))


def test_folder_training_learns_and_writes_a_run(folder, tmp_path):
    run_dir = str(tmp_path / "run")
    run_train("--model", "dvt_tiny_deit", "--dataset", "folder", "--data_path", folder, "--num_classes", "3",
              "--img_size", "16", "--grids", "[2, 4]", "--batch_size", "8", "--epochs", "8", "--warmup_epochs", "1",
              "--lr", "0.005", "--min_lr", "0.0005", "--ema", "true", "--ema_decay", "0.5",
              "--keep_checkpoints", "2", "--log_interval", "1", "--output_dir", run_dir)
    epochs = records(run_dir, "epoch")
    assert [r["epoch"] for r in epochs] == list(range(1, 9))
    assert epochs[-1]["step"] == 8 * 6  # 48 images, batch 8
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert epochs[-1]["val"]["top1"][-1] > 60.0  # three colour-coded classes: chance is 33%
    assert len(epochs[-1]["val"]["top1"]) == 2
    kept = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "*.ckpt")))
    assert kept == ["best.ckpt", "dvt_tiny_deit-e0007.ckpt", "dvt_tiny_deit-e0008.ckpt"]
    assert not glob.glob(os.path.join(run_dir, ".*"))
    for name in ("config.yaml", "train.log", "dvt_tiny_deit-e0008.json", "best.json"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    with open(os.path.join(run_dir, "best.json")) as handle:
        meta = json.load(handle)
    assert meta["model"] == "dvt_tiny_deit" and meta["grids"] == [2, 4] and meta["num_classes"] == 3
    assert meta["ema"] is True and len(meta["exit_gflops"]) == 2
    assert meta["val"]["top1"][-1] == max(r["ema_val"]["top1"][-1] for r in epochs)
    # best.ckpt is a plain model checkpoint: create_model loads it strictly
    net = create_model("dvt_tiny_deit", num_classes=3, img_size=16, grids=(2, 4),
                       checkpoint_path=os.path.join(run_dir, "best.ckpt"))
    assert net.num_exits == 2


def test_cifar_binary_training(tmp_path):
    root = str(tmp_path / "cifar")
    write_cifar10(root, per_file=16)
    run_dir = str(tmp_path / "run")
    result = run_train("--model", "dvt_tiny_t2t", "--dataset", "cifar10", "--data_path", root, "--num_classes", "10",
                       "--batch_size", "8", "--epochs", "1", "--warmup_epochs", "0", "--ema", "false",
                       "--output_dir", run_dir)
    assert "validation top-1 per exit" in result.stdout
    assert records(run_dir, "epoch")[0]["val"]["count"] == 16


def lr_by_step(run_dir: str) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in records(run_dir, "step")}


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    common = ["--config_path", "config/demo.yaml", "--batch_size", "16", "--epochs", "3", "--warmup_epochs", "1",
              "--max_steps_per_epoch", "40", "--log_interval", "1", "--lr_per_step", "true", "--ema", "true",
              "--ema_decay", "0.9"]
    whole = str(tmp_path / "whole")
    run_train(*common, "--output_dir", whole)

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([PYTHON, "train.py", *QUIET, *common, "--output_dir", killed], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(killed, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(metrics) and any(r["epoch"] == 2 and r["step"] >= 50 for r in records(killed, "step")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed mid-epoch"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [os.path.basename(p) for p in glob.glob(os.path.join(killed, "dvt_tiny_t2t-e*.ckpt"))] == [
        "dvt_tiny_t2t-e0001.ckpt"]
    for path in glob.glob(os.path.join(killed, "*.ckpt")):  # every checkpoint on disk is whole
        assert ms.load_checkpoint(path)

    result = run_train(*common, "--output_dir", killed, "--resume", "auto")
    assert "resumed" in result.stdout and "epoch 1 done, step 40" in result.stdout
    assert lr_by_step(killed) == lr_by_step(whole)  # the same step count and learning rate at every step
    assert len(lr_by_step(whole)) == 120
    final = [records(d, "epoch")[-1] for d in (whole, killed)]
    assert final[0]["epoch"] == final[1]["epoch"] == 3 and final[0]["step"] == final[1]["step"] == 120
    with open(os.path.join(killed, "dvt_tiny_t2t-e0003.json")) as handle:
        assert json.load(handle)["step"] == 120


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(folder, tmp_path):
    run_dir = str(tmp_path / "run")
    result = run_train("--model", "dvt_tiny_deit", "--dataset", "folder", "--data_path", folder,
                       "--num_classes", "3", "--img_size", "16", "--batch_size", "8", "--epochs", "3",
                       "--warmup_epochs", "1", "--warmup_lr", "0.001", "--lr", "1e30", "--loss_scale_type", "none",
                       "--ema", "false", "--output_dir", run_dir, check=False)
    assert result.returncode == 1
    assert "the loss is nan at epoch 2" in result.stderr.lower() or "the loss is inf at epoch 2" in result.stderr
    assert "dvt_tiny_deit-e0001.ckpt" in result.stderr
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "*.ckpt"))) == [
        "best.ckpt", "dvt_tiny_deit-e0001.ckpt"]


def test_corrupt_image_in_training(folder, tmp_path):
    data = str(tmp_path / "data")
    shutil.copytree(folder, data)
    bad = sorted(glob.glob(os.path.join(data, "train", "dog", "*.jpg")))[0]
    truncate(bad)
    args = ["--model", "dvt_tiny_deit", "--dataset", "folder", "--data_path", data, "--num_classes", "3",
            "--img_size", "16", "--batch_size", "8", "--epochs", "1", "--ema", "false"]
    failed = run_train(*args, "--output_dir", str(tmp_path / "a"), check=False)
    assert failed.returncode == 1
    assert f"cannot read image {bad}" in failed.stderr and "skip_corrupt" in failed.stderr
    skipped = run_train(*args, "--skip_corrupt", "true", "--output_dir", str(tmp_path / "b"))
    assert f"skipped 1 corrupt image(s): {bad}" in skipped.stdout


def test_bad_input_is_a_clear_error(folder, tmp_path, capsys):
    from train import main

    def error_of(*argv) -> str:
        assert main(list(argv)) == 1
        return capsys.readouterr().err

    assert "dataset folder not found: " in error_of("--dataset", "folder", "--data_path", str(tmp_path / "none"),
                                                    "--model", "dvt_tiny_deit", "--output_dir", str(tmp_path / "r"))
    empty = str(tmp_path / "empty")
    shutil.copytree(folder, empty)
    os.makedirs(os.path.join(empty, "train", "zebra"))
    assert "zebra holds no images" in error_of("--dataset", "folder", "--data_path", empty, "--model",
                                               "dvt_tiny_deit", "--output_dir", str(tmp_path / "r"))
    assert "did you mean 'batch_size'" in error_of("--batch_sise", "8")
    assert "has 3 classes but num_classes is 1000" in error_of(
        "--dataset", "folder", "--data_path", folder, "--model", "dvt_tiny_deit", "--num_classes", "1000",
        "--img_size", "16", "--batch_size", "8", "--output_dir", str(tmp_path / "r"))


def test_resume_from_another_architecture_is_refused(folder, tmp_path, capsys):
    from train import main

    run_dir = str(tmp_path / "run")
    run_train("--model", "dvt_tiny_deit", "--dataset", "folder", "--data_path", folder, "--num_classes", "3",
              "--img_size", "16", "--batch_size", "8", "--epochs", "1", "--max_steps_per_epoch", "1",
              "--ema", "false", "--output_dir", run_dir)
    ckpt = os.path.join(run_dir, "dvt_tiny_deit-e0001.ckpt")
    assert main(["--model", "dvt_tiny_t2t", "--dataset", "folder", "--data_path", folder, "--num_classes", "3",
                 "--img_size", "16", "--batch_size", "8", "--ema", "false", "--resume", ckpt,
                 "--output_dir", str(tmp_path / "t2t")]) == 1
    err = capsys.readouterr().err
    assert "holds a dvt_tiny_deit model, this run builds dvt_tiny_t2t" in err and "family" in err
    assert main(["--model", "dvt_tiny_deit", "--resume", os.path.join(run_dir, "best.ckpt"), "--dataset", "folder",
                 "--data_path", folder, "--num_classes", "3", "--img_size", "16", "--batch_size", "8", "--ema", "false",
                 "--output_dir", str(tmp_path / "x")]) == 1
    assert "not a training checkpoint" in capsys.readouterr().err


def test_pretrained_drops_a_head_of_another_size(folder, tmp_path):
    run_dir = str(tmp_path / "run")
    run_train("--model", "dvt_tiny_deit", "--dataset", "folder", "--data_path", folder, "--num_classes", "3",
              "--img_size", "16", "--batch_size", "8", "--epochs", "1", "--max_steps_per_epoch", "1",
              "--ema", "false", "--output_dir", run_dir)
    net = create_model("dvt_tiny_deit", num_classes=5, img_size=16)
    head_before = net.stages[0].head.weight.asnumpy().copy()
    from src.engine.checkpoint import load_pretrained

    dropped = load_pretrained(net, os.path.join(run_dir, "dvt_tiny_deit-e0001.ckpt"))
    assert sorted(dropped) == sorted(f"stages.{k}.{p}" for k in range(3) for p in ("head.weight", "head.bias"))
    np.testing.assert_array_equal(net.stages[0].head.weight.asnumpy(), head_before)
    same = create_model("dvt_tiny_deit", num_classes=3, img_size=16)
    load_model_weights(same, os.path.join(run_dir, "dvt_tiny_deit-e0001.ckpt"))
    np.testing.assert_array_equal(net.stages[1].cls_token.asnumpy(), same.stages[1].cls_token.asnumpy())


@pytest.fixture(scope="module")
def msrun_weights(folder, tmp_path_factory) -> list[dict]:
    """Final weights of rank 0 and rank 1 of a 2-worker msrun, and of one process on the same global batch."""
    tmp_path = tmp_path_factory.mktemp("msrun")
    common = ["--model", "dvt_tiny_deit", "--dataset", "folder", "--num_classes", "3", "--img_size", "16",
              "--epochs", "1", "--warmup_epochs", "0", "--max_steps_per_epoch", "3", "--shuffle", "false",
              "--ema", "false", "--label_smoothing", "0.1", "--lr", "0.01", "--hflip", "0", "--scale", "[1, 1]",
              "--ratio", "[1, 1]",  # deterministic crops: each rank must see exactly its half of the batch
              # The key bias has a gradient of exactly zero in exact arithmetic (softmax ignores a per-query
              # constant); Adam rescales its rounding noise to lr * g / (|g| + eps). A larger eps keeps that
              # noise below the tolerance without loosening the check on every real gradient.
              "--eps", "1e-6"]
    single = str(tmp_path / "single")
    run_train("--config_path", "config/demo.yaml", *common, "--data_path", folder, "--batch_size", "8",
              "--output_dir", single)
    dist = str(tmp_path / "dist")
    env = dict(os.environ, MASTER_PORT=str(8100 + os.getpid() % 1000))
    result = subprocess.run(
        ["bash", "scripts/run_distribute_train.sh", "2", folder, "config/demo.yaml", "CPU", *QUIET, *common,
         "--batch_size", "4", "--ckpt_all_ranks", "true", "--output_dir", dist],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    logs = sorted(glob.glob(os.path.join(dist, "logs", "worker_*.log")))
    assert result.returncode == 0, "".join(open(p).read()[-2000:] for p in logs) + result.stderr
    assert len(logs) == 2  # one log per rank
    name = "dvt_tiny_deit-e0001.ckpt"
    return [ms.load_checkpoint(os.path.join(d, name)) for d in (dist, os.path.join(dist, "rank_1"), single)]


def model_parameter_names(weights: dict) -> list[str]:
    names = [n for n in weights if n.startswith("stages.")]
    assert names
    return names


def test_msrun_two_workers_end_with_identical_weights(msrun_weights):
    rank0, rank1, _ = msrun_weights
    for n in model_parameter_names(rank0):
        np.testing.assert_array_equal(rank0[n].asnumpy(), rank1[n].asnumpy(), err_msg=n)
    assert int(rank0["global_step"].asnumpy().reshape(-1)[0]) == 3


def test_msrun_two_workers_equal_one_process_on_the_global_batch(msrun_weights):
    rank0, _, single = msrun_weights
    for n in model_parameter_names(single):
        np.testing.assert_allclose(rank0[n].asnumpy(), single[n].asnumpy(), atol=1e-5, err_msg=n)


def test_launch_scripts_check_their_arguments(tmp_path):
    for script in ("run_standalone_train.sh", "run_distribute_train.sh", "run_eval.sh"):
        usage = subprocess.run(["bash", f"scripts/{script}"], cwd=ROOT, capture_output=True, text=True)
        assert usage.returncode == 1 and "usage: bash scripts/" + script in usage.stderr
    missing = subprocess.run(["bash", "scripts/run_distribute_train.sh", "2", str(tmp_path / "none"),
                              "config/demo.yaml"], cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 1 and "dataset path not found" in missing.stderr
    missing = subprocess.run(["bash", "scripts/run_standalone_train.sh", "config/nope.yaml"], cwd=ROOT,
                             capture_output=True, text=True)
    assert missing.returncode == 1 and "config file not found" in missing.stderr
    missing = subprocess.run(["bash", "scripts/run_eval.sh", "config/demo.yaml", str(tmp_path / "none.ckpt")],
                             cwd=ROOT, capture_output=True, text=True)
    assert missing.returncode == 1 and "checkpoint not found" in missing.stderr
