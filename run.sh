#!/usr/bin/env bash
# The main job on the embedded default: set up .venv, then describe the registered models and run the
# tiny DVT once in graph mode. (Training and evaluating the demo DVT joins this with the training issue.)
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh run
.venv/bin/python scripts/list_models.py --run dvt_tiny_t2t "$@"
