"""Nothing lost, nothing mixed: train.py under signals, a second training, a full disk and damaged states.

Each case runs train.py (or the msrun launch script) as a user or a cluster scheduler would, on the demo digits
with the tiny DeiT, and checks the files it leaves against an uninterrupted run.
"""

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import mindspore as ms
import pytest

from tests.faults import limit_file_size
from tests.helpers import (
    PYTHON,
    QUIET,
    ROOT,
    assert_same_weights,
    by_step,
    dead_pid,
    final_weights,
    plant_lock,
    run_train,
)

COMMON = ["--config_path", "config/demo.yaml", "--model", "dvt_tiny_deit", "--batch_size", "16", "--epochs", "2",
          "--warmup_epochs", "1", "--max_steps_per_epoch", "12", "--log_interval", "1", "--keep_checkpoints", "3",
          "--eval_interval", "0"]  # these tests are about stopping and resuming, not validation
STATE = "dvt_tiny_deit-e0002.ckpt"


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> str:
    run_dir = str(tmp_path_factory.mktemp("whole") / "run")
    run_train(*COMMON, "--output_dir", run_dir)
    return run_dir


def start(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "train.py", *QUIET, *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def wait_for_steps(run_dir: str, count: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    path = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.isfile(path):
            with open(path) as handle:
                if sum(1 for _ in handle) >= count:
                    return
        time.sleep(0.05)
    raise AssertionError(f"no {count} step records in {path} after {timeout} s")


def digests(run_dir: str, but: tuple[str, ...] = ()) -> dict[str, str]:
    found = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "**"), recursive=True)):
        if os.path.isfile(path) and os.path.basename(path) not in but:
            with open(path, "rb") as handle:
                found[os.path.relpath(path, run_dir)] = hashlib.sha256(handle.read()).hexdigest()
    return found


def stop_message(text: str, name: str) -> tuple[int, str]:
    """(step, training state) out of the stop message in `text`."""
    found = re.search(f"stopped by {name} (in|after) epoch \\d+, step (\\d+); last training state: ([^;]+); to "
                      "continue, run the same command with --resume auto$", text, re.MULTILINE)
    assert found, text
    return int(found.group(2)), found.group(3)


def test_sigterm_stops_at_a_step_boundary_and_resume_is_exact(whole, tmp_path):
    run_dir = str(tmp_path / "run")
    proc = start(*COMMON, "--output_dir", run_dir)
    wait_for_steps(run_dir, 4, proc)
    proc.send_signal(signal.SIGTERM)  # what a scheduler sends on pre-emption
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    step, state = stop_message(err, "SIGTERM")
    assert "Traceback" not in err and state == os.path.join(run_dir, f"dvt_tiny_deit-e0001-s{step:08d}.ckpt")
    with open(os.path.join(run_dir, "train.log")) as handle:
        assert f"stopped by SIGTERM in epoch 1, step {step};" in handle.read()
    with open(state[:-5] + ".json") as handle:
        assert json.load(handle)["step"] == step
    assert ms.load_checkpoint(state) and not os.path.exists(os.path.join(run_dir, ".lock"))
    assert list(by_step(run_dir, "loss")) == list(range(1, step + 1))

    plant_lock(run_dir, pid=dead_pid())  # as if the stopped run had died holding the lock
    resumed = run_train(*COMMON, "--output_dir", run_dir, "--resume", "auto")
    assert "took over the lock of a run that is gone" in resumed.stdout
    assert f"resumed {state}: epoch 0 done, step {step}" in resumed.stdout
    for key in ("loss", "lr"):  # every step once, with the uninterrupted run's values
        assert by_step(run_dir, key) == by_step(whole, key), key
    assert_same_weights(final_weights(os.path.join(run_dir, STATE)), final_weights(os.path.join(whole, STATE)),
                        atol=1e-6)


def test_a_busy_run_directory_refuses_a_second_training_and_ctrl_c_stops_the_first(tmp_path):
    run_dir = str(tmp_path / "run")
    first = start(*COMMON, "--max_steps_per_epoch", "80", "--output_dir", run_dir, start_new_session=True)
    wait_for_steps(run_dir, 2, first)
    with open(os.path.join(run_dir, "config.yaml"), "rb") as handle:
        config = handle.read()
    fresh = run_train(*COMMON, "--output_dir", run_dir, check=False)
    assert fresh.returncode == 1 and f"{run_dir} holds another run" in fresh.stderr
    resume = run_train(*COMMON, "--output_dir", run_dir, "--resume", "auto", check=False)
    assert resume.returncode == 1
    assert f"{run_dir} is in use by another training (pid {first.pid} on {socket.gethostname()}" in resume.stderr
    os.killpg(first.pid, signal.SIGINT)  # Ctrl+C: the whole foreground process group
    _, err = first.communicate(timeout=300)
    assert first.returncode == 130, err
    step, state = stop_message(err, "SIGINT")
    assert ms.load_checkpoint(state)
    with open(os.path.join(run_dir, "config.yaml"), "rb") as handle:
        assert handle.read() == config
    assert list(by_step(run_dir, "loss")) == list(range(1, step + 1))  # one run's records, once each


def test_a_new_run_refuses_a_finished_one_and_overwrite_moves_it_aside(whole, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(whole, run_dir)
    before = digests(run_dir)
    refused = run_train(*COMMON, "--output_dir", run_dir, "--epochs", "1", "--warmup_epochs", "0", check=False)
    assert refused.returncode == 1 and "--resume auto" in refused.stderr and "--overwrite true" in refused.stderr
    assert digests(run_dir) == before
    run_train(*COMMON, "--output_dir", run_dir, "--epochs", "1", "--warmup_epochs", "0", "--max_steps_per_epoch", "2",
              "--overwrite", "true")
    aside = glob.glob(f"{run_dir}.replaced-*")
    assert len(aside) == 1 and digests(aside[0]) == before
    kept = sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "*.ckpt")))
    assert kept == ["dvt_tiny_deit-e0001.ckpt"]  # the new run's own, not pruned for older ones


def test_resume_auto_skips_a_damaged_state_and_a_failed_resume_writes_nothing(whole, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(whole, run_dir)
    newest = os.path.join(run_dir, STATE)
    os.chmod(newest, 0o600)
    with open(newest, "r+b") as handle:
        handle.truncate(os.path.getsize(newest) // 2)
    before = digests(run_dir, but=("train.log",))
    explicit = run_train(*COMMON, "--output_dir", run_dir, "--resume", newest, check=False)
    assert explicit.returncode == 1 and f"cannot read checkpoint {newest}" in explicit.stderr
    assert digests(run_dir, but=("train.log",)) == before  # the log says why it stopped; nothing else changed
    with open(os.path.join(run_dir, "train.log")) as handle:
        assert f"cannot read checkpoint {newest}" in handle.read().splitlines()[-1]

    resumed = run_train(*COMMON, "--output_dir", run_dir, "--resume", "auto")
    assert f"skipped a damaged training state: cannot read checkpoint {newest}" in resumed.stdout
    assert "resumed " + os.path.join(run_dir, "dvt_tiny_deit-e0001.ckpt") in resumed.stdout
    assert by_step(run_dir, "loss") == by_step(whole, "loss")
    assert_same_weights(final_weights(newest), final_weights(os.path.join(whole, STATE)), atol=1e-6)
    assert os.path.getsize(newest + ".damaged") == os.path.getsize(newest) // 2  # kept aside, not deleted


def test_resume_auto_with_every_state_damaged_stops_instead_of_starting_over(whole, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(whole, run_dir)
    for path in glob.glob(os.path.join(run_dir, "dvt_tiny_deit-e*.ckpt")):
        os.chmod(path, 0o600)
        with open(path, "r+b") as handle:
            handle.truncate(100)
    failed = run_train(*COMMON, "--output_dir", run_dir, "--resume", "auto", check=False)
    assert failed.returncode == 1
    assert f"none of the 2 training state(s) in {run_dir} loads" in failed.stderr.splitlines()[-1]


def test_a_full_disk_is_one_line_and_keeps_the_last_good_state(whole, tmp_path):
    """Files may not grow past 1 MB (RLIMIT_FSIZE): the next 1.8 MB training state fails part-way."""
    run_dir = str(tmp_path / "run")
    shutil.copytree(whole, run_dir)
    good = final_weights(os.path.join(run_dir, STATE))

    failed = subprocess.run([PYTHON, "train.py", *QUIET, *COMMON, "--epochs", "3", "--output_dir", run_dir,
                             "--resume", "auto"], cwd=ROOT, capture_output=True, text=True,
                            preexec_fn=limit_file_size(1 << 20))
    assert failed.returncode == 1
    message = f"cannot write {run_dir}/dvt_tiny_deit-e0003.ckpt: [Errno 27] File too large"
    assert failed.stderr.strip().splitlines()[-1] == f"train.py: error: {message}"
    assert "Traceback" not in failed.stderr
    with open(os.path.join(run_dir, "train.log")) as handle:
        assert message in handle.read()
    assert not glob.glob(os.path.join(run_dir, ".*"))
    assert not os.path.exists(os.path.join(run_dir, "dvt_tiny_deit-e0003.ckpt"))
    assert_same_weights(final_weights(os.path.join(run_dir, STATE)), good)


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_an_msrun_job_stops_on_every_rank_at_one_step(tmp_path, name):
    """SIGTERM to the launch script (a scheduler), SIGINT to its process group (Ctrl+C): both workers stop at the
    same step, rank 0 saves the state, the script exits 128 + the signal."""
    run_dir = str(tmp_path / "run")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        env = dict(os.environ, MASTER_PORT=str(sock.getsockname()[1]))
    proc = subprocess.Popen(["bash", "scripts/run_distribute_train.sh", "2", ROOT, "config/demo.yaml", "CPU", *QUIET,
                             *COMMON, "--num_parallel_workers", "1", "--output_dir", run_dir], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for_steps(run_dir, 3, proc)
    sig = getattr(signal, name)
    if name == "SIGINT":
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err
    assert f"stopped by {name}" in err.splitlines()[-1]
    steps = []
    for rank in (0, 1):
        with open(os.path.join(run_dir, "logs", f"worker_{rank}.log")) as handle:
            steps.append(stop_message(handle.read(), name))
    assert steps[0][0] == steps[1][0] and steps[1][1] == f"rank 0's, in {run_dir}"
    with open(steps[0][1][:-5] + ".json") as handle:
        assert json.load(handle)["step"] == steps[0][0]
    assert ms.load_checkpoint(steps[0][1])
    leftover = subprocess.run(["pgrep", "-f", f"train.py.*{run_dir}"], capture_output=True, text=True)
    assert leftover.stdout == "", "a worker is still running"
