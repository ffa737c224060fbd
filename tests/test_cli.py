"""The commands explain themselves: --help of every CLI."""

import pytest


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
