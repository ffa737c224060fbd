#!/usr/bin/env bash
# usage: bash scripts/run_standalone_train.sh CONFIG_PATH [DATA_PATH|-] [DEVICE_TARGET] [train.py --KEY VALUE ...]
#   e.g. bash scripts/run_standalone_train.sh config/dvt_t2t_vit_12.yaml /data/imagenet Ascend
#        bash scripts/run_standalone_train.sh config/demo.yaml - CPU --epochs 5
# One process on one device (DEVICE_ID selects the card on Ascend/GPU, default 0). DATA_PATH "-" keeps the
# recipe's. The console output also goes to OUTPUT_DIR/train_stdout.log (OUTPUT_DIR: the recipe's output_dir).
set -euo pipefail
usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 1; }
[ $# -ge 1 ] || usage
source "$(dirname "$0")/common.sh"
config=$(realpath -m "$1"); shift
[ -f "$config" ] || { echo "error: config file not found: $config" >&2; exit 1; }
args=(--config_path "$config")
optional_data_and_device "$@"
shift "$consumed"
export DEVICE_ID="${DEVICE_ID:-0}"
cd "$repo"
out=$(output_dir "${args[@]}" "$@")
mkdir -p "$out"
python train.py "${args[@]}" "$@" 2>&1 | tee -a "$out/train_stdout.log"
