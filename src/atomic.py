"""All-or-nothing writes: every file the project writes appears whole under its final name or not at all.

A writer fills a hidden temp name in the destination's folder (`.<stem>.partial-<pid><ext>`; MindSpore's savers
insist on the extension), flushes it to disk and renames it over the destination. A failure removes the temp
file and raises `WriteFailed`, a one-line message with the path and the OS error. A folder (an export) is built
the same way beside its destination and swapped in only when complete. A run killed mid-write leaves at worst a
temp file, which `remove_partials` finds by its name.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from collections.abc import Callable

PARTIAL_MARK = ".partial-"


class WriteFailed(OSError):
    """A file could not be written; nothing was left under its name. `str()` is the one-line message."""

    def __init__(self, path: str, err: BaseException):
        super().__init__(f"cannot write {path}: {_reason(err)}")
        self.path = path
        self.errno = getattr(err, "errno", None)

    def __reduce__(self):  # raised in a worker process, it crosses to the main one whole
        return _rebuild_write_failed, (self.path, str(self), self.errno)


def _rebuild_write_failed(path: str, message: str, errno: int | None) -> WriteFailed:
    err = WriteFailed.__new__(WriteFailed)
    OSError.__init__(err, message)
    err.path, err.errno = path, errno
    return err


def partial_name(path: str) -> str:
    folder, base = os.path.split(os.path.abspath(path))
    stem, ext = os.path.splitext(base)
    return os.path.join(folder, f".{stem}{PARTIAL_MARK}{os.getpid()}{ext}")


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return f"[Errno {err.errno}] {err.strerror}" if err.errno else err.strerror
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _sync(path: str) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Call `write(temp_path)`, then rename the temp file to `path`; on any failure remove it and raise
    `WriteFailed` naming `path` (MindSpore's savers report a full disk as RuntimeError, hence not only OSError)."""
    tmp = partial_name(path)
    # MindSpore's checkpoint saver writes `<stem>.tmp` first and leaves it behind when it fails.
    saver_tmp = os.path.splitext(tmp)[0] + ".tmp"
    try:
        write(tmp)
        _sync(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        _discard(tmp)
        _discard(saver_tmp)
        if isinstance(err, WriteFailed) or not isinstance(err, (OSError, RuntimeError, ValueError)):
            raise  # a nested write's own message, or not a write error at all
        raise WriteFailed(path, err) from err


def _discard(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)

    write_atomic(path, write)


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def append_line(path: str, line: str) -> None:
    """Append one line whole or not at all: a failed append is cut back to the file's previous end."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as err:
        raise WriteFailed(path, err) from err
    try:
        end = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(28, os.strerror(28))
        except OSError as err:
            os.ftruncate(fd, end)
            raise WriteFailed(path, err) from err
    finally:
        os.close(fd)


def replace_folder(path: str, build: Callable[[str], None]) -> None:
    """Call `build(new_folder)` on an empty folder beside `path`, then swap it in for `path`: whatever was at
    `path` stays there, untouched, until the new folder is complete. On failure the new folder is removed."""
    path = os.path.abspath(path.rstrip(os.sep))
    parent, base = os.path.split(path)
    fresh = os.path.join(parent, f".{base}{PARTIAL_MARK}{os.getpid()}")
    old = os.path.join(parent, f".{base}.replaced-{os.getpid()}")
    try:
        os.makedirs(parent, exist_ok=True)
        _recover_folder(path)
        shutil.rmtree(fresh, ignore_errors=True)
        os.makedirs(fresh)
        build(fresh)
        if os.path.lexists(path):
            os.replace(path, old)
        try:
            os.replace(fresh, path)
        except OSError:
            if os.path.lexists(old):
                os.replace(old, path)
            raise
    except (OSError, RuntimeError, ValueError) as err:
        shutil.rmtree(fresh, ignore_errors=True)
        if isinstance(err, WriteFailed):
            raise
        raise WriteFailed(path, err) from err
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _recover_folder(path: str) -> None:
    """Undo what a process killed inside a swap left: with `path` gone, its old folder goes back there; with
    `path` in place, old folders set aside by finished swaps are removed."""
    parent, base = os.path.split(path)
    aside = sorted(glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(base)}.replaced-*")),
                   key=os.path.getmtime)
    if aside and not os.path.lexists(path):
        os.replace(aside.pop(), path)
    for stale in aside:
        shutil.rmtree(stale, ignore_errors=True)


def remove_partials(folder: str) -> list[str]:
    """Delete the temp files and folders that interrupted writers left in `folder`; returns their paths."""
    stale = sorted(glob.glob(os.path.join(glob.escape(folder), f".*{PARTIAL_MARK}*")))
    for path in stale:
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            _discard(path)
    return stale
