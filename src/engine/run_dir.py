"""A run directory belongs to one run: a lock names the process that trains into it, and a fresh training
refuses a directory that holds another run's results unless it is told to resume or to move them aside.

The lock is `.lock` in the run directory, created exclusively, holding the host, pid and start time of its
owner. A lock whose owner is gone (same host, no such process, or the pid reused by a process started later)
is stale: it is taken over with a message. A lock of another host cannot be checked from here, so it is
refused, naming the file to delete if that run is known to be dead.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import sys

LOCK_NAME = ".lock"
# What a started run leaves: any of these means the directory holds a run (msrun's logs/ do not: the launch
# script creates them for this job before training starts).
RUN_FILES = ("config.yaml", "metrics.jsonl", "best.ckpt")


class RunDirectoryInUse(RuntimeError):
    """Another run owns the run directory, or holds results there that this run would overwrite."""


def _process_start(pid: int) -> int | None:
    """The start time of `pid` in clock ticks since boot (Linux /proc), None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return int(handle.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(owner: dict) -> bool:
    pid = int(owner.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    started = _process_start(pid)
    return started is None or owner.get("start") is None or started == owner["start"]


def run_contents(run_dir: str) -> list[str]:
    """The files of `run_dir` that show a run has trained there, sorted."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(name for name in os.listdir(run_dir) if name in RUN_FILES or name.endswith(".ckpt"))


class RunLock:
    """The exclusive claim of one process on a run directory; `release` (or the context's end) gives it up."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()),
                      "since": datetime.datetime.now().isoformat(timespec="seconds"), "command": sys.argv}
        self.held = False
        self.taken_over: str | None = None  # the stale owner this lock replaced, for the run's log
        self.moved_to: str | None = None  # where claim() moved the previous run

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(self.owner, handle)
        return True

    def _read_owner(self) -> dict:
        try:
            with open(self.path, encoding="utf-8") as handle:
                return json.load(handle)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return {"unreadable": True}

    def acquire(self) -> None:
        for _ in range(3):  # another process may take over a stale lock at the same moment: look again
            if self._create():
                self.held = True
                return
            owner = self._read_owner()
            if not owner:
                continue
            same_host = owner.get("host") == self.owner["host"]
            if owner.get("unreadable") or (same_host and not _alive(owner)):
                self.taken_over = "an unreadable lock file" if owner.get("unreadable") else \
                    f"pid {owner.get('pid')} on {owner.get('host')} since {owner.get('since')}"
                os.remove(self.path)
                continue
            where = f"pid {owner.get('pid')} on {owner.get('host')}, since {owner.get('since')}"
            hint = "wait for it or use another --output_dir" if same_host else \
                "if that run is dead, delete the lock file"
            raise RunDirectoryInUse(f"{os.path.dirname(self.path)} is in use by another training ({where}); "
                                    f"{hint} ({self.path})")
        raise RunDirectoryInUse(f"cannot take the lock {self.path}: other processes keep taking it")

    def release(self) -> None:
        if self.held and self._read_owner().get("pid") == self.owner["pid"]:
            os.remove(self.path)
        self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def move_aside(run_dir: str, keep: tuple[str, ...] = ()) -> str:
    """Move the run in `run_dir` (all but `keep` and the lock) into a new sibling `<run_dir>.replaced-<time>`;
    returns that folder."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    aside = f"{run_dir.rstrip(os.sep)}.replaced-{stamp}"
    suffix = 1
    while os.path.exists(aside):
        aside, suffix = f"{run_dir.rstrip(os.sep)}.replaced-{stamp}-{suffix}", suffix + 1
    os.makedirs(aside)
    for name in sorted(os.listdir(run_dir)):
        if name not in keep and name != LOCK_NAME:
            os.replace(os.path.join(run_dir, name), os.path.join(aside, name))
    return aside


def check_fresh(run_dir: str, resume: bool, overwrite: bool) -> list[str]:
    """Refuse to start a new run (neither `resume` nor `overwrite`) in a directory that holds another run;
    returns that run's files."""
    found = run_contents(run_dir)
    if found and not resume and not overwrite:
        listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise RunDirectoryInUse(
            f"{run_dir} holds another run ({listed}); continue it with --resume auto, train into another "
            "--output_dir, or add --overwrite true to move that run aside")
    return found


def claim(run_dir: str, resume: bool, overwrite: bool, keep: tuple[str, ...] = ()) -> RunLock:
    """Lock `run_dir` for this run. Without `resume`, a directory that holds another run is refused, or with
    `overwrite` that run is moved aside (never deleted). Creates the directory only once the checks pass."""
    found = check_fresh(run_dir, resume, overwrite)
    os.makedirs(run_dir, exist_ok=True)
    lock = RunLock(run_dir)
    lock.acquire()
    if found and not resume:
        try:
            lock.moved_to = move_aside(run_dir, keep)
        except OSError:
            lock.release()
            raise
    return lock
