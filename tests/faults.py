"""Fault injection shared by the tests: a subprocess whose files cannot grow past a size, as on a full disk."""

import resource
import signal


def limit_file_size(limit: int):
    """A subprocess pre-exec hook: files beyond `limit` bytes cannot be written (EFBIG, as a full disk fails)."""
    def preexec() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec
