#!/usr/bin/env bash
# The main job on the embedded default: set up .venv, train the tiny DVT on the demo digits
# (config/demo.yaml) on the CPU, then evaluate it under compute budgets (accuracy-vs-GFLOPs table).
# Extra arguments override recipe keys for both steps (--epochs 5, --output_dir D). Run again, it trains anew:
# the previous demo run is moved aside to <output_dir>.replaced-<time> (--overwrite true), never deleted.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/setup_env.sh run
.venv/bin/python train.py --config_path config/demo.yaml --overwrite true "$@"
source scripts/common.sh
out=$(output_dir --config_path config/demo.yaml "$@")
echo
.venv/bin/python eval.py --config_path config/demo.yaml "$@" --checkpoint_path "$out/best.ckpt" \
  --output_dir "$out/eval" --budgets 0.12x,0.15x,0.2x,0.3x,0.5x,0.75x,1x
