#!/usr/bin/env bash
# The test command: set up .venv with the test extras, then run the whole suite (CPU, a few minutes).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh test
.venv/bin/python -m pytest "$@"
