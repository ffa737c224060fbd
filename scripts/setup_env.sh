#!/usr/bin/env bash
# usage: bash scripts/setup_env.sh [run|test]
# Creates .venv beside the repo (once) and installs requirements.txt with the demo data and plot extras ("run":
# ./run.sh trains the demo and draws its budget curve), or everything with the test tools ("test").
# Re-running is cheap: it reinstalls only when the requirement files change.
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-run}"
case "$kind" in
  run) reqs=(requirements.txt requirements-demo.txt requirements-plot.txt) ;;
  test) reqs=(requirements-test.txt) ;;
  *) echo "usage: bash scripts/setup_env.sh [run|test]" >&2; exit 2 ;;
esac
python_bin="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
stamp=".venv/.installed-$kind"
digest=$(cat requirements*.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
  .venv/bin/pip install -q --disable-pip-version-check "${reqs[@]/#/-r}"
  echo "$digest" > "$stamp"
fi
