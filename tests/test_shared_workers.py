"""Loader worker processes that build batches in shared memory: the batches, their order, errors, dead workers and
clean-up (the recipe's batches in every worker mode are compared in test_data.py)."""

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from src.data.pipeline import BatchSource, Loader
from src.data.shared_workers import SharedMemoryBatches
from src.data.sources import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Numbered(BatchSource):
    """Batch b: images filled with b + the image's index, labels b, and a shorter last batch; `fail` maps a
    batch to what building it does instead."""

    columns = ["image", "label", "skipped"]

    def __init__(self, batches: int = 7, size: int = 4, fail: dict | None = None):
        self.batches, self.size, self.fail = batches, size, fail or {}

    def __len__(self) -> int:
        return self.batches

    def slot_layout(self):
        return [((self.size, 3, 5, 5), np.float32), ((self.size,), np.int32), ((self.size,), np.int64)]

    def build(self, batch, out):
        action = self.fail.get(batch)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "data":
            raise DataError(f"cannot read image /data/{batch}.jpg")
        if action == "bug":
            raise ZeroDivisionError("a bug in a transform")
        images, labels, skipped = out
        count = self.size - 1 if batch == self.batches - 1 else self.size
        images[:count] = batch + np.arange(count, dtype=np.float32)[:, None, None, None]
        labels[:count] = batch
        skipped.fill(-1)
        return images[:count], labels[:count], skipped


def loader(source: Numbered, workers: int = 2) -> Loader:
    return Loader(source, source.batches * source.size, 1, source.batches, workers, processes=True)


def test_batches_arrive_in_order_as_copies_from_any_start():
    """Every batch from `start` on, in order, equal to the source's own; batches kept by the reader stay intact
    while the workers reuse their slots (MindSpore keeps the arrays a source returns, uncopied)."""
    source = Numbered(batches=9)
    for workers in (2, 3):
        for start in (0, 4):
            kept = list(loader(source, workers).dataset(start).create_tuple_iterator(num_epochs=1, output_numpy=True))
            assert len(kept) == source.batches - start
            for batch, row in enumerate(kept, start):
                for got, want in zip(row, source[batch], strict=True):
                    np.testing.assert_array_equal(got, want)
    assert kept[-1][0].shape == (3, 3, 5, 5)  # the short last batch keeps its shape


def test_reads_out_of_order_are_refused():
    shared = SharedMemoryBatches(Numbered(), 2, start=2)
    try:
        with pytest.raises(ValueError, match="expected batch 2, asked for 3"):
            shared[3]
        np.testing.assert_array_equal(shared[2][1], [2] * 4)
    finally:
        shared.close()


@pytest.mark.parametrize(("action", "error", "message"), [
    ("data", DataError, r"cannot read image /data/3.jpg"),
    ("bug", RuntimeError, r"loader worker 1 failed building batch 3:(.|\n)*ZeroDivisionError: a bug in a transform"),
    ("kill", RuntimeError, r"loader worker 1 died \(exit code -9\) building batch 3"),
])
def test_a_failing_worker_fails_its_batch(action, error, message):
    """An unreadable image keeps its message, any other error its traceback, and a killed worker is noticed
    instead of waited for; the batches before it arrive."""
    shared = SharedMemoryBatches(Numbered(batches=50, fail={3: action}), 2)  # worker 0 keeps running
    try:
        for batch in range(3):
            np.testing.assert_array_equal(shared[batch][1], [batch] * 4)
        started = time.monotonic()
        with pytest.raises(error, match=message):
            shared[3]
        assert time.monotonic() - started < 10
    finally:
        shared.close()


def test_close_stops_the_workers_and_frees_the_memory():
    """Also when the reader stops early, and the workers ignore a SIGTERM meant for the job (the main process
    decides when to stop)."""
    shared = SharedMemoryBatches(Numbered(batches=50), 2)
    shared[0]
    names = [block.name for block in shared.blocks]
    assert all(os.path.exists(f"/dev/shm/{name}") for name in names)
    for process in shared.processes:
        os.kill(process.pid, signal.SIGTERM)
    time.sleep(0.2)
    assert all(process.is_alive() for process in shared.processes)
    np.testing.assert_array_equal(shared[1][1], [1] * 4)
    shared.close()
    assert not any(process.is_alive() for process in shared.processes)
    assert not any(os.path.exists(f"/dev/shm/{name}") for name in names)


def test_workers_die_with_the_main_process(tmp_path):
    """A main process killed outright (SIGKILL: no clean-up of its own runs) leaves no worker and no shared memory
    behind (multiprocessing's resource tracker removes the blocks once the workers are gone)."""
    pids, names = tmp_path / "pids", tmp_path / "names"
    script = (f"import os, sys; sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
              "from test_shared_workers import Numbered\n"
              "from src.data.shared_workers import SharedMemoryBatches\n"
              "shared = SharedMemoryBatches(Numbered(batches=50), 2)\n"
              "shared[0]\n"
              f"open({str(pids)!r}, 'w').write(' '.join(str(p.pid) for p in shared.processes))\n"
              f"open({str(names)!r}, 'w').write(' '.join(block.name for block in shared.blocks))\n"
              "os.kill(os.getpid(), 9)\n")
    subprocess.run([sys.executable, "-c", script], check=False, timeout=60, capture_output=True)
    workers = [int(pid) for pid in pids.read_text().split()]
    blocks = [f"/dev/shm/{name}" for name in names.read_text().split()]

    def left() -> list:
        return [pid for pid in workers if running(pid)] + [path for path in blocks if os.path.exists(path)]
    deadline = time.monotonic() + 10
    while left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left()


def running(pid: int) -> bool:
    """The process exists and is not a zombie waiting for a parent that does not reap (PID 1 in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_exit_with_workers_running_neither_hangs_nor_leaves_them(tmp_path):
    """A script that ends while its workers still run: multiprocessing's exit hook would SIGTERM them (ignored)
    and wait forever, so ours stops them first, whatever else registered a finalizer before multiprocessing
    was imported."""
    pids = tmp_path / "pids"
    script = ("import weakref\n"
              "class Early: pass\n"
              "early = Early(); weakref.finalize(early, print)  # weakref's exit hook before multiprocessing's\n"
              f"import os, sys; sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
              "from test_shared_workers import Numbered\n"
              "from src.data.shared_workers import SharedMemoryBatches\n"
              "shared = SharedMemoryBatches(Numbered(batches=50), 2)\n"
              "shared[0]\n"
              f"open({str(pids)!r}, 'w').write(' '.join(str(p.pid) for p in shared.processes))\n")
    done = subprocess.run([sys.executable, "-c", script], check=False, timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not any(running(int(pid)) for pid in pids.read_text().split())



def test_close_waits_for_a_batch_being_copied_out():
    """The pipeline's thread may be copying a batch out of a slot when the reader stops: close waits for the copy
    (a view does not keep the memory mapped), and a read after it fails clearly instead of touching freed memory."""
    shared = SharedMemoryBatches(Numbered(), 2)
    shared[0]
    copy_started, release_copy = threading.Event(), threading.Event()
    copied = []

    def slow_copy():
        with shared._copying:  # what __getitem__ holds while it copies
            copy_started.set()
            release_copy.wait(5)
            copied.append(np.array(shared._views(0, 0, [shape for shape, _ in shared.layout])[1]))
    copier = threading.Thread(target=slow_copy)
    copier.start()
    copy_started.wait(5)
    closer = threading.Thread(target=shared.close)
    closer.start()
    time.sleep(0.2)
    assert closer.is_alive()  # waiting for the copy
    release_copy.set()
    copier.join(5)
    closer.join(5)
    labels = copied[0]  # slot 0 of worker 0 holds one of its batches (0, 2, 4 or 6)
    assert len(set(labels.tolist())) == 1 and labels[0] in (0, 2, 4, 6)
    with pytest.raises(RuntimeError, match="closed while batch 1 was read"):
        shared[1]
