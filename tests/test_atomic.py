"""All-or-nothing writes (src/atomic.py): a failure part-way leaves the previous file or folder, whole."""

import errno
import json
import os
import pickle
import subprocess
import sys

import pytest

from src.atomic import WriteFailed, append_line, remove_partials, replace_folder, write_atomic, write_json, write_text
from tests.faults import limit_file_size

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_write_replaces_whole_and_leaves_no_temp(tmp_path):
    path = str(tmp_path / "curve.json")
    write_json(path, {"a": 1})
    write_json(path, {"a": 2})
    with open(path) as handle:
        assert json.load(handle) == {"a": 2}
    assert os.listdir(tmp_path) == ["curve.json"]


def test_a_failing_writer_keeps_the_old_file_and_says_where_and_why(tmp_path):
    path = str(tmp_path / "thresholds.json")
    write_text(path, "old\n")

    def half_then_full_disk(tmp: str) -> None:
        with open(tmp, "w") as handle:
            handle.write("ne")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteFailed) as failed:
        write_atomic(path, half_then_full_disk)
    assert str(failed.value) == f"cannot write {path}: [Errno 28] No space left on device"
    assert failed.value.errno == errno.ENOSPC and "\n" not in str(failed.value)
    assert os.listdir(tmp_path) == ["thresholds.json"]
    with open(path) as handle:
        assert handle.read() == "old\n"


def test_a_file_size_limit_part_way_is_reported_and_cleaned(tmp_path):
    """A real kernel refusal mid-write (RLIMIT_FSIZE), in a child process: the old file stays, no temp file."""
    path = str(tmp_path / "big.bin")
    write_text(path, "old")
    script = ("import sys; from src.atomic import write_text, WriteFailed\n"
              "try:\n    write_text(sys.argv[1], 'x' * 100000)\n"
              "except WriteFailed as err:\n    print(err); sys.exit(3)\n")

    result = subprocess.run([sys.executable, "-c", script, path], cwd=ROOT, capture_output=True, text=True,
                            preexec_fn=limit_file_size(4096))
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == f"cannot write {path}: [Errno 27] File too large"
    assert os.listdir(tmp_path) == ["big.bin"]
    with open(path) as handle:
        assert handle.read() == "old"


def test_append_line_is_cut_back_when_it_fails(tmp_path, monkeypatch):
    path = str(tmp_path / "metrics.jsonl")
    append_line(path, '{"step": 1}')
    real_write = os.write

    def short_write(fd, data):
        real_write(fd, data[:3])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", short_write)
    with pytest.raises(WriteFailed, match="metrics.jsonl: \\[Errno 28\\]"):
        append_line(path, '{"step": 2}')
    monkeypatch.undo()
    with open(path) as handle:
        assert handle.read() == '{"step": 1}\n'


def test_replace_folder_swaps_only_when_complete(tmp_path):
    target = str(tmp_path / "export")

    def build(files: dict):
        def fill(folder: str) -> None:
            for name, text in files.items():
                if text is None:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                with open(os.path.join(folder, name), "w") as handle:
                    handle.write(text)
        return fill

    replace_folder(target, build({"stage_1.mindir": "one", "manifest.json": "{}"}))
    with pytest.raises(WriteFailed, match=f"cannot write {target}: \\[Errno 28\\]"):
        replace_folder(target, build({"stage_1.mindir": "new", "manifest.json": None}))
    assert sorted(os.listdir(tmp_path)) == ["export"]
    assert sorted(os.listdir(target)) == ["manifest.json", "stage_1.mindir"]
    with open(os.path.join(target, "stage_1.mindir")) as handle:
        assert handle.read() == "one"
    replace_folder(target, build({"stage_1.mindir": "two"}))
    assert os.listdir(target) == ["stage_1.mindir"] and sorted(os.listdir(tmp_path)) == ["export"]


def test_remove_partials_finds_what_a_killed_writer_left(tmp_path):
    for name in (".e0004.partial-77.ckpt", ".export.partial-12", "keep.ckpt", ".lock"):
        if name.startswith(".export"):
            os.makedirs(tmp_path / name)
        else:
            (tmp_path / name).write_text("x")
    removed = [os.path.basename(p) for p in remove_partials(str(tmp_path))]
    assert removed == [".e0004.partial-77.ckpt", ".export.partial-12"]
    assert sorted(os.listdir(tmp_path)) == [".lock", "keep.ckpt"]


def test_a_swap_killed_between_its_renames_is_undone_next_time(tmp_path):
    target = tmp_path / "export"
    (tmp_path / ".export.replaced-999").mkdir()  # the old export, set aside by a process killed before its swap
    (tmp_path / ".export.replaced-999" / "stage_1.mindir").write_text("old")

    def fail(folder: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(WriteFailed):
        replace_folder(str(target), fail)
    assert sorted(os.listdir(tmp_path)) == ["export"] and (target / "stage_1.mindir").read_text() == "old"


def test_write_failed_crosses_processes_whole():
    err = WriteFailed("/x/y.ckpt", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, WriteFailed) and str(again) == str(err) and again.errno == errno.ENOSPC
    assert again.path == "/x/y.ckpt"
