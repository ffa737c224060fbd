"""train.py end to end, as users run it: subprocesses on generated data, resume after SIGKILL, msrun."""

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import mindspore as ms
import numpy as np
import pytest

from src.engine.checkpoint import load_model_weights
from src.models import create_model
from tests.helpers import (
    PYTHON,
    QUIET,
    ROOT,
    assert_same_weights,
    by_step,
    final_weights,
    make_folder,
    records,
    run_train,
    truncate,
    write_cifar10,
)


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


def kill_when(proc: subprocess.Popen, run_dir: str, pattern: str, timeout: float = 300) -> str:
    """SIGKILL `proc` (and its process group) once a training checkpoint matching `pattern` is complete."""
    deadline = time.time() + timeout
    found = []
    while time.time() < deadline and proc.poll() is None:
        found = [p for p in glob.glob(os.path.join(run_dir, pattern)) if os.path.isfile(p[:-5] + ".json")]
        if found:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed mid-epoch"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return found[0]


# Augmented like the ImageNet recipe (RandAugment, erasing, Mixup/CutMix): the runs below must still be exact.
AUGMENTED = ["--auto_augment", "rand-m9-mstd0.5-inc1", "--re_prob", "0.25", "--mixup", "0.8", "--cutmix", "1.0"]
# The demo (T2T: its performer's built-in dropout 0.1) with drop path: both draw keyed masks (src/models/dropout.py).
DEMO_DROPOUT = ["--config_path", "config/demo.yaml", "--drop_path_rate", "0.1"]


def test_same_seed_same_run_whatever_the_workers(tmp_path):
    common = [*DEMO_DROPOUT, "--batch_size", "16", "--epochs", "2", "--warmup_epochs", "1",
              "--max_steps_per_epoch", "8", "--log_interval", "1", "--eval_interval", "0", *AUGMENTED]
    runs = []
    for name, workers, processes in (("a", "2", "true"), ("b", "1", "false")):
        run_dir = str(tmp_path / name)
        run_train(*common, "--num_parallel_workers", workers, "--python_multiprocessing", processes,
                  "--output_dir", run_dir)
        runs.append(run_dir)
    losses = [by_step(d, "loss") for d in runs]
    assert len(losses[0]) == 16 and losses[0] == losses[1]
    for run_dir in runs:  # eval_interval 0: trained without validation
        assert "val" not in records(run_dir, "epoch")[-1] and not os.path.exists(os.path.join(run_dir, "best.ckpt"))
    assert_same_weights(*(final_weights(os.path.join(d, "dvt_tiny_t2t-e0002.ckpt")) for d in runs))


def test_resume_after_sigkill_mid_epoch_matches_an_uninterrupted_run(tmp_path):
    common = [*DEMO_DROPOUT, "--batch_size", "16", "--epochs", "2", "--warmup_epochs", "1",
              "--max_steps_per_epoch", "20", "--log_interval", "1", "--lr_per_step", "true", "--ema", "true",
              "--ema_decay", "0.9", "--save_interval_steps", "6", "--keep_checkpoints", "3", "--eval_interval", "0",
              *AUGMENTED]
    whole = str(tmp_path / "whole")
    run_train(*common, "--output_dir", whole)

    killed = str(tmp_path / "killed")
    proc = subprocess.Popen([PYTHON, "train.py", *QUIET, *common, "--output_dir", killed], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kill_when(proc, killed, "dvt_tiny_t2t-e0002-s00000030.ckpt")  # 10 updates into epoch 2
    for path in glob.glob(os.path.join(killed, "*.ckpt")):  # every checkpoint on disk is whole
        assert ms.load_checkpoint(path)

    result = run_train(*common, "--output_dir", killed, "--resume", "auto")
    assert "resumed" in result.stdout and "epoch 1 done, step " in result.stdout
    resumed_at = int(result.stdout.split("epoch 1 done, step ")[1].split()[0])
    assert 30 <= resumed_at < 40 and resumed_at % 6 == 0
    for key in ("loss", "lr", "loss_scale"):  # every step once, with the uninterrupted run's values
        assert by_step(killed, key) == by_step(whole, key), key
    assert len(by_step(whole, "loss")) == 40
    assert [r["train_loss"] for r in records(killed, "epoch")] == [r["train_loss"] for r in records(whole, "epoch")]
    assert_same_weights(*(final_weights(os.path.join(d, "dvt_tiny_t2t-e0002.ckpt")) for d in (whole, killed)),
                        atol=1e-6)
    with open(os.path.join(killed, "dvt_tiny_t2t-e0002.json")) as handle:
        assert json.load(handle)["step"] == 40


def test_accumulation_trains_the_large_batch_update(folder, tmp_path):
    """accum_steps 2 of batch 4 runs the updates of batch 8: the same losses and weights (augmentation off)."""
    common = ["--model", "dvt_tiny_deit", "--dataset", "folder", "--data_path", folder, "--num_classes", "3",
              "--img_size", "16", "--epochs", "2", "--ema", "true", "--ema_decay", "0.5", "--log_interval", "1",
              "--lr", "0.01", "--eps", "1e-4", "--eval_interval", "0"]  # eps: see trained_weights in test_engine.py
    runs = {}
    for name, batch, accum in (("large", "8", "1"), ("accumulated", "4", "2")):
        runs[name] = str(tmp_path / name)
        run_train(*common, "--batch_size", batch, "--accum_steps", accum, "--output_dir", runs[name])
    losses = [by_step(d, "loss") for d in runs.values()]
    assert list(losses[0]) == list(range(1, 13))  # 48 images: 6 updates per epoch, counted as updates
    assert list(losses[1]) == list(losses[0])
    np.testing.assert_allclose(list(losses[1].values()), list(losses[0].values()), rtol=1e-6)
    assert_same_weights(*(final_weights(os.path.join(d, "dvt_tiny_deit-e0002.ckpt")) for d in runs.values()),
                        atol=1e-6)


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
    assert not os.path.exists(tmp_path / "r")  # a run that fails on its input creates nothing
    blocked = tmp_path / "a_file"
    blocked.write_text("")  # an output_dir that cannot be created: one line naming it, no traceback
    err = error_of("--dataset", "folder", "--data_path", folder, "--model", "dvt_tiny_deit", "--num_classes", "3",
                   "--img_size", "16", "--batch_size", "8", "--output_dir", str(blocked / "run"))
    assert err.strip() == f"train.py: error: [Errno 20] Not a directory: '{blocked / 'run'}'"


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


def test_msrun_job_resumes_mid_epoch_exactly(folder, tmp_path):
    """A 2-worker msrun job killed inside an epoch and resumed gives the uninterrupted job's losses and weights."""
    common = ["bash", "scripts/run_distribute_train.sh", "2", folder, "config/demo.yaml", "CPU", *QUIET,
              "--model", "dvt_tiny_deit", "--dataset", "folder", "--num_classes", "3", "--img_size", "16",
              "--batch_size", "4", "--epochs", "8", "--ema", "false", "--log_interval", "1", "--eval_interval", "0",
              "--save_interval_steps", "4", "--keep_checkpoints", "2", *AUGMENTED]

    def launch(run_dir: str, *extra: str, **popen) -> subprocess.Popen:
        with socket.socket() as sock:  # a free port for this job's msrun scheduler
            sock.bind(("127.0.0.1", 0))
            env = dict(os.environ, MASTER_PORT=str(sock.getsockname()[1]))
        return subprocess.Popen([*common, "--output_dir", run_dir, *extra], cwd=ROOT, env=env, **popen)

    def finish(proc: subprocess.Popen, run_dir: str) -> None:
        assert proc.wait(timeout=600) == 0, "".join(
            open(p).read()[-2000:] for p in glob.glob(os.path.join(run_dir, "logs", "worker_*.log")))

    whole = str(tmp_path / "whole")
    finish(launch(whole, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), whole)
    killed = str(tmp_path / "killed")
    proc = launch(killed, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    kill_when(proc, killed, "dvt_tiny_deit-e000[2-7]-s*.ckpt")  # 48 images, 2 x 4 per update: 6 updates an epoch
    finish(launch(killed, "--resume", "auto", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), killed)
    with open(os.path.join(killed, "logs", "worker_1.log")) as handle:
        assert "resumed" in handle.read()  # every rank restored the state
    assert by_step(killed, "loss") == by_step(whole, "loss") and len(by_step(whole, "loss")) == 48
    assert_same_weights(*(final_weights(os.path.join(d, "dvt_tiny_deit-e0008.ckpt")) for d in (whole, killed)),
                        atol=1e-6)


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
