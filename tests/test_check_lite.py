"""scripts/check_lite.sh refuses bad arguments and a missing compiler in one line, before any download.

The check itself is not a test (it downloads MindSpore Lite, 168 MB): README "Deploy with MindSpore Lite".
"""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "check_lite.sh")


def check_lite(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", SCRIPT, *args], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60)


def test_usage_errors():
    for args in (("a", "b"), ("--work",)):
        result = check_lite(*args)
        assert result.returncode == 2 and result.stderr.strip() == "usage: bash scripts/check_lite.sh [WORK_DIR]"
    assert check_lite("--help").returncode == 0


def test_missing_compiler_stops_before_the_download(tmp_path):
    cache = tmp_path / "cache"
    result = check_lite(str(tmp_path / "work"), CXX="no-such-compiler", DVT_LITE_CACHE=str(cache))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("check_lite.sh: error: no-such-compiler not found") and not cache.exists()
