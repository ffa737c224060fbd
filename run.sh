#!/usr/bin/env bash
# The main job on the embedded default: set up .venv, then train and evaluate the tiny DVT on the demo
# digits (config/demo.yaml) on the CPU. Extra arguments override recipe keys (--epochs 5, --output_dir D).
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh run
.venv/bin/python train.py --config_path config/demo.yaml "$@"
