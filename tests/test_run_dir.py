"""A run directory belongs to one run (src/engine/run_dir.py): the lock, stale locks, refusal and moving aside."""

import json
import os
import socket
import subprocess
import sys

import pytest

from src.engine.run_dir import LOCK_NAME, RunDirectoryInUse, RunLock, check_fresh, claim
from tests.helpers import dead_pid, plant_lock


def test_a_live_lock_is_refused_naming_its_owner(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        plant_lock(tmp_path, pid=other.pid)
        with pytest.raises(RunDirectoryInUse, match=f"in use by another training \\(pid {other.pid} on "
                                                    f"{socket.gethostname()}"):
            RunLock(str(tmp_path)).acquire()
    finally:
        other.kill()
        other.wait()


def test_the_lock_is_exclusive_and_released(tmp_path):
    with RunLock(str(tmp_path)) as lock:
        with open(lock.path) as handle:
            assert json.load(handle)["pid"] == os.getpid()
        second = RunLock(str(tmp_path))
        second.owner = dict(second.owner, pid=os.getpid() + 1)  # another process on this host...
        with pytest.raises(RunDirectoryInUse):  # ...finds this one alive
            second.acquire()
    assert not os.path.exists(os.path.join(tmp_path, LOCK_NAME))


@pytest.mark.parametrize("owner", ["dead", "reused", "unreadable"])
def test_a_stale_lock_is_taken_over_and_said(tmp_path, owner):
    if owner == "unreadable":
        with open(os.path.join(tmp_path, LOCK_NAME), "w") as handle:
            handle.write("{")
    else:  # a pid that is gone, or alive but started at another time (the pid was reused)
        plant_lock(tmp_path, pid=dead_pid() if owner == "dead" else os.getpid(), start=1)
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert lock.held and lock.taken_over
    with open(lock.path) as handle:
        assert json.load(handle)["pid"] == os.getpid()
    lock.release()


def test_a_lock_of_another_host_is_never_guessed_stale(tmp_path):
    path = plant_lock(tmp_path, host="node-7", pid=dead_pid())
    with pytest.raises(RunDirectoryInUse, match=f"if that run is dead, delete the lock file \\({path}\\)"):
        RunLock(str(tmp_path)).acquire()


def test_a_new_run_refuses_another_runs_directory_and_creates_nothing(tmp_path):
    missing = str(tmp_path / "new")
    assert check_fresh(missing, resume=False, overwrite=False) == []
    assert not os.path.exists(missing)
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "logs").mkdir()  # msrun's, created for this job: not a run
    assert check_fresh(str(run_dir), resume=False, overwrite=False) == []
    (run_dir / "best.ckpt").write_text("weights")
    (run_dir / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunDirectoryInUse, match="holds another run \\(best.ckpt, metrics.jsonl\\); continue it with "
                                                "--resume auto, train into another --output_dir, or add --overwrite"):
        claim(str(run_dir), resume=False, overwrite=False)
    assert sorted(os.listdir(run_dir)) == ["best.ckpt", "logs", "metrics.jsonl"]
    claim(str(run_dir), resume=True, overwrite=False).release()  # resuming it is what the directory is for


def test_overwrite_moves_the_old_run_aside(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "best.ckpt").write_text("96% top-1")
    (run_dir / "logs").mkdir()
    lock = claim(str(run_dir), resume=False, overwrite=True, keep=("logs",))
    assert lock.moved_to == f"{run_dir}.replaced-{lock.moved_to.rsplit('.replaced-', 1)[1]}"
    with open(os.path.join(lock.moved_to, "best.ckpt")) as handle:
        assert handle.read() == "96% top-1"
    assert sorted(os.listdir(run_dir)) == [LOCK_NAME, "logs"]
    lock.release()
