"""The commands explain themselves: --help of every CLI, a model table without MindSpore's log lines."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.parametrize("command", ["train", "eval", "export"])
def test_help_prints_usage_and_exits_0(command, capsys):
    module = __import__(command)
    with pytest.raises(SystemExit) as stopped:
        module.main(["--help"])
    assert stopped.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and "--config_path" in out
    if command == "export":
        assert "--ckpt_file" in out and "--file_name" in out and "python eval.py --help" in out


def test_list_models_prints_its_table_without_mindspore_warnings():
    """The table alone on stdout, nothing of MindSpore's logging on stderr, yet a real error still shows."""
    from src.models import list_models

    result = subprocess.run([sys.executable, os.path.join("scripts", "list_models.py"), "--run", "dvt_tiny"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("model ") and [line.split()[0] for line in lines[1:]] == list_models()
    assert result.returncode == 1 and "WARNING" not in result.stdout + result.stderr
    assert result.stderr.startswith("list_models.py: error: unknown model 'dvt_tiny'")
    assert result.stderr.count("\n") == 1
