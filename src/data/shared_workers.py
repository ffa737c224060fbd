"""Loader worker processes that build their batches straight into shared memory.

MindSpore's GeneratorDataset with `python_multiprocessing` has each worker copy its finished batch into
MindSpore's shared-memory queue; with the waits of that queue, 2 workers built 0.80-0.88 of what 2 independent
1-worker pipelines build on the same 2 cores (`benchmarks/bench_data.py`). Here each worker owns two slots in
one shared-memory block, builds batch g in a free slot (the images are decoded, transformed and mixed where they
lie) and sends the slot's number and shapes down a pipe. The main process's GeneratorDataset (in-process, one
thread) copies the batch out and frees the slot at once: MindSpore keeps the arrays a source returns without
copying them, so it must not be handed the slot itself. Worker w builds batches start + w, start + w + N, ...;
what a batch holds depends on its number alone (src/data/stream.py), so the bits are those of every other
worker mode.

Workers ignore SIGINT and SIGTERM (the main process decides how to stop and then kills them) and die with the
main process (Linux's parent-death signal). An error in one reaches the main process as the error of the batch
it was building; a DataError keeps its message, which names the unreadable file.
"""

from __future__ import annotations

import atexit
import ctypes
import multiprocessing as mp
import os
import signal
import threading
import traceback
import weakref
from multiprocessing import shared_memory

import numpy as np

from .sources import DataError

SLOTS_PER_WORKER = 2  # one being built while the other waits to be copied out
POLL_SECONDS = 1.0  # how often a wait for a batch checks that its worker is still alive
PR_SET_PDEATHSIG = 1
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _die_with_parent(parent: int) -> None:
    """Linux: SIGKILL this worker when the process that forked it exits (or exit now if it already has);
    elsewhere nothing."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (AttributeError, OSError):
        return
    if os.getppid() != parent:
        os._exit(1)


_LIVE: weakref.WeakSet = weakref.WeakSet()  # sources whose workers may still run


@atexit.register  # after multiprocessing's own exit hook, so it runs first: that hook would SIGTERM our
def _close_all() -> None:  # workers, which ignore it, and then wait for them forever
    for source in list(_LIVE):
        source.close()


def _shut_down(processes: list, blocks: list) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()
    for block in blocks:
        block.close()
        block.unlink()


class SharedMemoryBatches:
    """GeneratorDataset source (in-process, read in order from `start`): batch g of `items` (a BatchSource of
    src/data/pipeline.py), built by worker (g - start) % workers in its shared slots."""

    def __init__(self, items, workers: int, start: int = 0):
        self.items = items
        self.workers = workers
        self.start = start
        self.parent = os.getpid()
        self.layout = [(tuple(shape), np.dtype(dtype)) for shape, dtype in items.slot_layout()]
        self.slot_bytes = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in self.layout)
        self.blocks = []
        try:
            for _ in range(workers):
                self.blocks.append(shared_memory.SharedMemory(create=True, size=self.slot_bytes * SLOTS_PER_WORKER))
        except OSError as err:
            _shut_down([], self.blocks)
            megabytes = self.slot_bytes / 2**20
            raise OSError(f"cannot allocate {workers} x {SLOTS_PER_WORKER} batch slots of {megabytes:.0f} MB in "
                          f"shared memory ({err}); enlarge /dev/shm (e.g. docker run --shm-size), or set fewer "
                          "num_parallel_workers or python_multiprocessing: false") from None
        context = mp.get_context("fork")  # the workers need the items, not a fresh interpreter
        self.free_slots = [context.Semaphore(SLOTS_PER_WORKER) for _ in range(workers)]
        pipes = [context.Pipe(duplex=False) for _ in range(workers)]
        self.ready = [receiver for receiver, _ in pipes]
        self.processes = [context.Process(target=self._work, args=(worker, sender), daemon=True,
                                          name=f"dvt-loader-{worker}")
                          for worker, (_, sender) in enumerate(pipes)]
        held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # until the workers ignore them
        try:
            for process in self.processes:
                process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        for _, sender in pipes:
            sender.close()  # the workers hold theirs: a dead worker's pipe then reads as closed
        self._finalizer = weakref.finalize(self, _shut_down, self.processes, self.blocks)
        _LIVE.add(self)
        self.expected = start
        self._copying = threading.Lock()  # close waits for a copy out of a slot (views do not keep it mapped)
        self._closed = False

    def __len__(self) -> int:
        return len(self.items)

    def _views(self, worker: int, slot: int, shapes) -> tuple[np.ndarray, ...]:
        """The columns of a slot, each the first `shape` elements of its place."""
        offset, views = slot * self.slot_bytes, []
        for (largest, dtype), shape in zip(self.layout, shapes, strict=True):
            views.append(np.ndarray(shape, dtype, self.blocks[worker].buf, offset))
            offset += int(np.prod(largest)) * dtype.itemsize
        return tuple(views)

    def _work(self, worker: int, sender) -> None:
        for stop in STOP_SIGNALS:
            signal.signal(stop, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        _die_with_parent(self.parent)
        largest = [shape for shape, _ in self.layout]
        for count, batch in enumerate(range(self.start + worker, len(self.items), self.workers)):
            self.free_slots[worker].acquire()
            slot = count % SLOTS_PER_WORKER
            try:
                built = self.items.build(batch, self._views(worker, slot, largest))
            except DataError as err:
                sender.send(("data", str(err)))
                return
            except Exception:  # noqa: BLE001 - any failure is the batch's error, raised in the main process
                sender.send(("error", traceback.format_exc()))
                return
            sender.send(("batch", slot, [array.shape for array in built]))

    def _receive(self, worker: int, batch: int) -> tuple:
        receiver, process = self.ready[worker], self.processes[worker]
        while not receiver.poll(POLL_SECONDS):  # no end-of-file when it dies: the other workers hold its pipe too
            if not process.is_alive() and not receiver.poll(0):
                process.join(POLL_SECONDS)
                raise RuntimeError(f"loader worker {worker} died (exit code {process.exitcode}) building batch "
                                   f"{batch}")
        return receiver.recv()

    def __getitem__(self, batch: int) -> tuple[np.ndarray, ...]:
        batch = int(batch)
        if batch != self.expected:
            raise ValueError(f"batches are read in order: expected batch {self.expected}, asked for {batch}")
        worker = (batch - self.start) % self.workers
        message = self._receive(worker, batch)
        if message[0] == "data":
            raise DataError(message[1])
        if message[0] == "error":
            raise RuntimeError(f"loader worker {worker} failed building batch {batch}:\n{message[1]}")
        _, slot, shapes = message
        with self._copying:
            if self._closed:
                raise RuntimeError(f"the loader was closed while batch {batch} was read")
            arrays = tuple(np.array(view) for view in self._views(worker, slot, shapes))  # MindSpore keeps them
        self.free_slots[worker].release()
        self.expected = batch + 1
        return arrays

    def close(self) -> None:
        """Stop the workers and free the shared memory (also done when this source is collected); a batch being
        copied out in another thread is finished first."""
        with self._copying:
            self._closed = True
            self._finalizer()
