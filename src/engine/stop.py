"""Clean stops on SIGTERM (a cluster scheduler's pre-emption) and SIGINT (Ctrl+C).

The handler only records the signal; training looks at it after each update and stops at that step boundary.
In a data-parallel job every rank must stop at the same step (the others would wait for it in the next
all-reduce), so the ranks agree with a small all-reduce of the signals each has seen, at steps every rank
visits (every log_interval updates and at each epoch's end). A second signal stops the process at once.

MindSpore's runtime installs its own SIGINT handler while it compiles and runs graphs (it turns Ctrl+C into
SIGTERM, in any of its threads). So train.py blocks SIGINT before MindSpore starts a thread (dataset workers
inherit the block; MindSpore has them ignore SIGINT anyway): a Ctrl+C waits, pending, until training looks
between two updates, and is then delivered to this module's handler, re-armed (a few system calls per update).
"""

from __future__ import annotations

import signal
import sys
import threading

import mindspore as ms
import numpy as np
from mindspore import Tensor

from .evaluate import sum_over_ranks

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(RuntimeError):
    """Training stopped on a signal at a step boundary; `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum
        self.exit_code = 128 + signum


class StopRequests:
    """Install SIGTERM/SIGINT handlers for the duration of a `with` block; `signum(sync)` says whether to stop."""

    def __init__(self, group_size: int):
        self.seen = 0
        self.agree = sum_over_ranks() if group_size > 1 else None
        self.previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.seen:
            self._restore()
            signal.raise_signal(signum)
            return
        self.seen = signum
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a second Ctrl+C is not held (see above)
        sys.stderr.write(f"received {signal.Signals(signum).name}: stopping at the next step boundary "
                         "(send it again to stop at once)\n")
        sys.stderr.flush()

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _collect(self) -> None:
        """Deliver a held SIGINT to this module's handler."""
        if self.previous and signal.SIGINT in signal.sigpending():
            signal.signal(signal.SIGINT, self._handle)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def _restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def __exit__(self, *exc) -> None:
        self._restore()

    def signum(self, sync_point: bool) -> int:
        """The signal to stop on, or 0. One process stops at any step; ranks only at a `sync_point`, where each
        calls this together: SIGTERM wins if any rank saw it, else SIGINT if any did."""
        self._collect()
        if self.agree is None:
            return self.seen
        if not sync_point:
            return 0
        seen = np.array([self.seen == signal.SIGTERM, self.seen == signal.SIGINT], np.float32)
        term, interrupt = self.agree(Tensor(seen, ms.float32)).asnumpy()
        return int(signal.SIGTERM) if term > 0 else int(signal.SIGINT) if interrupt > 0 else 0

    def barrier(self) -> None:
        """Wait until every rank is here (rank 0 has written its final state) before any rank exits."""
        if self.agree is not None:
            self.agree(Tensor(np.zeros(2, np.float32), ms.float32)).asnumpy()
